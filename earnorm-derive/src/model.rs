//! `#[derive(Model)]`: parse the struct into [`Container`], check the rules
//! that involve several fields, then generate the `Model` impl and the field
//! name constants.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Expr, ExprLit, ExprUnary, Fields, Ident, Lit, LitStr, Meta, Token, Type, UnOp};

use crate::ctxt::{refresh_not_shorter, Attr, Ctxt};
use crate::shape::last_segment;

/// The struct, as far as the derive cares.
struct Container<'a> {
    input: &'a DeriveInput,
    collection: Option<LitStr>,
    /// `cache(ttl = N, missing = M, refresh = R, local = false)`: the record cache, in seconds.
    cache: Option<RecordCacheAttr>,
    /// `hooks`: the user implements `earnorm::Hooks`.
    hooks: bool,
    fields: Vec<Field<'a>>,
}

/// One named field and its attributes, each remembering its tokens.
struct Field<'a> {
    ident: &'a Ident,
    ty: &'a Type,
    /// Name in MongoDB (`#[serde(rename = "..")]`, the `serialize` name of
    /// `#[serde(rename(serialize = .., deserialize = ..))]`, or the Rust name).
    bson_name: String,
    /// Whether the field is stored at all (not `#[serde(skip)]` or
    /// `#[serde(skip_serializing)]`).
    stored: bool,
    id: Option<Ident>,
    version: Option<Ident>,
    created_at: Option<Ident>,
    updated_at: Option<Ident>,
    required: Option<Ident>,
    email: Option<Ident>,
    unique: Option<Ident>,
    index: Option<Ident>,
    min_length: Option<(Ident, usize)>,
    max_length: Option<(Ident, usize)>,
    min: Option<(Ident, Bound)>,
    max: Option<(Ident, Bound)>,
    pattern: Option<(Ident, LitStr)>,
}

pub(crate) fn expand(input: &DeriveInput) -> Result<TokenStream, Vec<syn::Error>> {
    let cx = Ctxt::new();
    let container = parse(&cx, input);
    let id_field = container.as_ref().and_then(|c| check(&cx, c));
    cx.check()?;
    match (&container, id_field) {
        (Some(container), Some(id)) => Ok(generate(container, id)),
        // `check` reported why.
        _ => Err(vec![syn::Error::new(Span::call_site(), "earnorm: invalid model")]),
    }
}

/// What is generated next to the errors when the derive fails: an `impl
/// Model` whose bodies are never reached (the build fails anyway), so that one
/// mistake in the struct does not also raise an error at every use of the
/// model. Only for structs with named fields (anything else is not a model).
pub(crate) fn fallback(input: &DeriveInput) -> TokenStream {
    let Data::Struct(syn::DataStruct {
        fields: Fields::Named(_),
        ..
    }) = &input.data
    else {
        return TokenStream::new();
    };
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let hooks = default_hooks(input, declares_hooks(input));
    quote! {
        #hooks
        #[automatically_derived]
        impl #impl_generics ::earnorm::Model for #ident #ty_generics #where_clause {
            const COLLECTION: &'static str = "";
            type Id = ::earnorm::__private::bson::oid::ObjectId;
            fn id(&self) -> ::earnorm::__private::Option<&Self::Id> {
                ::core::unreachable!()
            }
            fn set_id(&mut self, _: ::earnorm::__private::Option<Self::Id>) {
                ::core::unreachable!()
            }
            fn validate(&self) -> ::earnorm::__private::Result<(), ::earnorm::__private::ValidationErrors> {
                ::core::unreachable!()
            }
        }
    }
}

fn parse<'a>(cx: &Ctxt, input: &'a DeriveInput) -> Option<Container<'a>> {
    let fields = match &input.data {
        Data::Struct(data) => match &data.fields {
            Fields::Named(named) => &named.named,
            Fields::Unnamed(_) | Fields::Unit => {
                cx.error_spanned_by(
                    &input.ident,
                    "#[derive(Model)] needs a struct with named fields, not a tuple or unit struct",
                );
                return None;
            }
        },
        Data::Enum(data) => {
            cx.error_spanned_by(data.enum_token, "#[derive(Model)] works on structs, not enums");
            return None;
        }
        Data::Union(data) => {
            cx.error_spanned_by(data.union_token, "#[derive(Model)] works on structs, not unions");
            return None;
        }
    };
    let (collection, cache, hooks) = parse_container_attrs(cx, input);
    let fields = fields.iter().filter_map(|f| parse_field(cx, f)).collect();
    Some(Container {
        input,
        collection,
        cache,
        hooks,
        fields,
    })
}

/// What `#[earnorm(..)]` on a struct says: the collection, the record cache,
/// and whether the user implements the hooks.
type ContainerAttrs = (Option<LitStr>, Option<RecordCacheAttr>, bool);

/// `cache(ttl = N, missing = M, refresh = R)`, in seconds.
#[derive(Clone, Copy)]
struct RecordCacheAttr {
    ttl: u64,
    missing: Option<u64>,
    refresh: Option<u64>,
    /// `local = false`: kept out of the in-process tier.
    local: Option<bool>,
}

fn parse_container_attrs(cx: &Ctxt, input: &DeriveInput) -> ContainerAttrs {
    let mut collection: Option<LitStr> = None;
    let mut cache = None;
    let mut hooks = None;
    for meta in serde_items(&input.attrs) {
        if meta.path().is_ident("rename_all") {
            cx.error_spanned_by(
                meta,
                "earnorm does not support `#[serde(rename_all)]` on models yet; rename fields one by one",
            );
        }
    }
    for_each_earnorm_item(cx, &input.attrs, |key, meta| {
        match key.to_string().as_str() {
            "collection" => {
                let value: Expr = meta.value()?.parse()?;
                match value {
                    Expr::Lit(ExprLit { lit: Lit::Str(lit), .. }) => {
                        if lit.value().is_empty() {
                            cx.error_spanned_by(&lit, "the collection name must not be empty");
                        } else {
                            cx.set_once(&mut collection, &key, "earnorm attribute", lit);
                        }
                    }
                    other => cx.error_spanned_by(
                        other,
                        "`collection` must be a string literal, like collection = \"users\"",
                    ),
                }
            }
            "cache" => {
                let parsed = parse_record_cache(cx, &key, &meta)?;
                if let Some(parsed) = parsed {
                    cx.set_once(&mut cache, &key, "earnorm attribute", parsed);
                }
            }
            "hooks" => cx.set_once(&mut hooks, &key, "earnorm attribute", ()),
            other => cx.error_spanned_by(
                &key,
                format!("unknown earnorm attribute `{other}` on a struct (expected `collection`, `cache` or `hooks`)"),
            ),
        }
        Ok(())
    });
    (collection, cache, hooks.is_some())
}

/// Whether `#[earnorm(.. hooks ..)]` is on the struct, read without the
/// full parse (for the fallback impl of a struct that failed to derive).
fn declares_hooks(input: &DeriveInput) -> bool {
    input
        .attrs
        .iter()
        .filter(|attr| attr.path().is_ident("earnorm"))
        .any(|attr| {
            let mut found = false;
            let _ = attr.parse_nested_meta(|meta| {
                found |= meta.path.is_ident("hooks");
                if meta.input.peek(Token![=]) {
                    let _: Expr = meta.value()?.parse()?;
                } else if meta.input.peek(syn::token::Paren) {
                    let _ = meta.parse_nested_meta(|inner| {
                        let _: Option<Expr> = if inner.input.peek(Token![=]) {
                            Some(inner.value()?.parse()?)
                        } else {
                            None
                        };
                        Ok(())
                    });
                }
                Ok(())
            });
            found
        })
}

/// `impl Hooks` with the defaults, unless the user writes their own.
fn default_hooks(input: &DeriveInput, user_hooks: bool) -> TokenStream {
    if user_hooks {
        return TokenStream::new();
    }
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    quote! {
        #[automatically_derived]
        impl #impl_generics ::earnorm::Hooks for #ident #ty_generics #where_clause {}
    }
}

/// `cache(ttl = N)`, with `missing = M` and `refresh = R` optional, in seconds.
fn parse_record_cache(
    cx: &Ctxt,
    key: &Ident,
    meta: &syn::meta::ParseNestedMeta<'_>,
) -> syn::Result<Option<RecordCacheAttr>> {
    const OPTION: &str = "record cache option";
    let (mut ttl, mut missing, mut refresh) = (Attr::none(OPTION), Attr::none(OPTION), Attr::none(OPTION));
    let mut local = Attr::none(OPTION);
    let mut ttl_given = false;
    meta.parse_nested_meta(|inner| {
        let Some(name) = inner.path.get_ident().cloned() else {
            return Err(inner.error("unknown record cache option (expected `ttl`, `missing`, `refresh` or `local`)"));
        };
        let option = name.to_string();
        if option == "local" {
            let value: syn::LitBool = inner.value()?.parse()?;
            local.set(cx, &name, quote!(#name = #value), value.value);
            return Ok(());
        }
        let value: Expr = inner.value()?.parse()?;
        let slot = match option.as_str() {
            "ttl" => {
                ttl_given = true;
                &mut ttl
            }
            "missing" => &mut missing,
            "refresh" => &mut refresh,
            other => {
                cx.error_spanned_by(
                    &name,
                    format!("unknown record cache option `{other}` (expected `ttl`, `missing`, `refresh` or `local`)"),
                );
                return Ok(());
            }
        };
        if let Some(n) = cx.seconds(&option, &value) {
            slot.set(cx, &name, quote!(#name = #value), n);
        }
        Ok(())
    })?;
    if !ttl_given {
        cx.error_spanned_by(key, "missing `ttl`: write cache(ttl = SECONDS)");
    }
    refresh_not_shorter(cx, &ttl, &refresh);
    Ok(ttl.into_inner().map(|ttl| RecordCacheAttr {
        ttl,
        missing: missing.into_inner(),
        refresh: refresh.into_inner(),
        local: local.into_inner(),
    }))
}

/// The `key`, `key = value` and `key(..)` items of every `#[serde(..)]`
/// attribute in `attrs`.
fn serde_items(attrs: &[syn::Attribute]) -> impl Iterator<Item = Meta> + '_ {
    attrs
        .iter()
        .filter(|attr| attr.path().is_ident("serde"))
        .flat_map(|attr| {
            attr.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated)
                .map(|p| p.into_iter().collect::<Vec<_>>())
                .unwrap_or_default()
        })
}

/// Calls `f` with the key and the rest of every item of every
/// `#[earnorm(..)]` attribute in `attrs`, reporting malformed items.
fn for_each_earnorm_item(
    cx: &Ctxt,
    attrs: &[syn::Attribute],
    mut f: impl FnMut(Ident, syn::meta::ParseNestedMeta<'_>) -> syn::Result<()>,
) {
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("earnorm")) {
        let result = attr.parse_nested_meta(|meta| {
            let Some(key) = meta.path.get_ident().cloned() else {
                return Err(meta.error("unknown earnorm attribute"));
            };
            f(key, meta)
        });
        if let Err(err) = result {
            cx.syn_error(err);
        }
    }
}

fn parse_field<'a>(cx: &Ctxt, field: &'a syn::Field) -> Option<Field<'a>> {
    let ident = field.ident.as_ref()?;
    let mut out = Field {
        ident,
        ty: &field.ty,
        bson_name: ident.to_string().trim_start_matches("r#").to_owned(),
        stored: true,
        id: None,
        version: None,
        created_at: None,
        updated_at: None,
        required: None,
        email: None,
        unique: None,
        index: None,
        min_length: None,
        max_length: None,
        min: None,
        max: None,
        pattern: None,
    };
    for meta in serde_items(&field.attrs) {
        match &meta {
            Meta::NameValue(nv) if nv.path.is_ident("rename") => {
                if let Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) = &nv.value {
                    out.bson_name = s.value();
                }
            }
            // `rename(serialize = "..", deserialize = "..")`: stored under
            // the serialized name.
            Meta::List(list) if list.path.is_ident("rename") => {
                let _ = list.parse_nested_meta(|inner| {
                    let value: LitStr = inner.value()?.parse()?;
                    if inner.path.is_ident("serialize") {
                        out.bson_name = value.value();
                    }
                    Ok(())
                });
            }
            Meta::Path(path) if path.is_ident("skip") || path.is_ident("skip_serializing") => out.stored = false,
            Meta::Path(path) if path.is_ident("flatten") => cx.error_spanned_by(
                path,
                "earnorm does not support `#[serde(flatten)]` on model fields: `FIELDS`, indexes and the id need \
                 each stored name; write the fields out, or nest them as a sub-document",
            ),
            _ => {}
        }
    }
    for_each_earnorm_item(cx, &field.attrs, |key, meta| {
        let name = key.to_string();
        let attribute = "earnorm attribute";
        let flag = |slot: &mut Option<Ident>| cx.set_once(slot, &key, attribute, key.clone());
        match name.as_str() {
                "id" => flag(&mut out.id),
                "version" => flag(&mut out.version),
                "created_at" => flag(&mut out.created_at),
                "updated_at" => flag(&mut out.updated_at),
                "required" => flag(&mut out.required),
                "email" => flag(&mut out.email),
                "unique" => flag(&mut out.unique),
                "index" => flag(&mut out.index),
                "min_length" | "max_length" => {
                    let value: Expr = meta.value()?.parse()?;
                    let n = match &value {
                        Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => i.base10_parse::<usize>().ok(),
                        _ => None,
                    };
                    let Some(n) = n else {
                        cx.error_spanned_by(&value, format!("`{name}` must be a non-negative integer"));
                        return Ok(());
                    };
                    let slot = if name == "min_length" { &mut out.min_length } else { &mut out.max_length };
                    cx.set_once(slot, &key, attribute, (key.clone(), n));
                }
                "min" | "max" => {
                    let value: Expr = meta.value()?.parse()?;
                    let Some(n) = bound(&value) else {
                        cx.error_spanned_by(&value, format!("`{name}` must be a number literal"));
                        return Ok(());
                    };
                    let slot = if name == "min" { &mut out.min } else { &mut out.max };
                    cx.set_once(slot, &key, attribute, (key.clone(), n));
                }
                "pattern" => {
                    let value: Expr = meta.value()?.parse()?;
                    match value {
                        Expr::Lit(ExprLit { lit: Lit::Str(lit), .. }) => {
                            if let Err(why) = crate::pattern::check(&lit.value()) {
                                cx.error_spanned_by(&lit, format!("invalid `pattern`: {why}"));
                            }
                            cx.set_once(&mut out.pattern, &key, attribute, (key.clone(), lit));
                        }
                        other => cx.error_spanned_by(other, "`pattern` must be a string literal"),
                    }
                }
                other => cx.error_spanned_by(
                    &key,
                    format!(
                        "unknown earnorm attribute `{other}` (expected one of id, version, created_at, updated_at, required, email, min_length, max_length, min, max, pattern, unique, index)"
                    ),
                ),
            }
        Ok(())
    });
    Some(out)
}

/// A bound as written: an integer literal stays an integer (compared
/// exactly), anything else is a finite float.
#[derive(Clone, Copy)]
enum Bound {
    Int(i128),
    Float(f64),
}

impl Bound {
    #[allow(clippy::cast_precision_loss)]
    fn as_f64(self) -> f64 {
        match self {
            Bound::Int(n) => n as f64,
            Bound::Float(x) => x,
        }
    }

    fn to_tokens(self) -> TokenStream {
        match self {
            Bound::Int(n) => quote!(::earnorm::__private::validate::Bound::Int(#n)),
            Bound::Float(x) => quote!(::earnorm::__private::validate::Bound::Float(#x)),
        }
    }
}

/// A number literal, possibly negated.
fn bound(expr: &Expr) -> Option<Bound> {
    match expr {
        Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => i.base10_parse::<i128>().ok().map(Bound::Int),
        Expr::Lit(ExprLit { lit: Lit::Float(f), .. }) => {
            f.base10_parse::<f64>().ok().filter(|x| x.is_finite()).map(Bound::Float)
        }
        Expr::Unary(ExprUnary {
            op: UnOp::Neg(_), expr, ..
        }) => match bound(expr)? {
            Bound::Int(n) => n.checked_neg().map(Bound::Int),
            Bound::Float(x) => Some(Bound::Float(-x)),
        },
        _ => None,
    }
}

/// Rules across fields; returns the id field.
fn check<'c, 'a>(cx: &Ctxt, container: &'c Container<'a>) -> Option<&'c Field<'a>> {
    for field in &container.fields {
        let text_rules = [
            field.email.as_ref().map(|k| (k, "email")),
            field.pattern.as_ref().map(|(k, _)| (k, "pattern")),
            field.min_length.as_ref().map(|(k, _)| (k, "min_length")),
            field.max_length.as_ref().map(|(k, _)| (k, "max_length")),
        ];
        for (key, rule) in text_rules.into_iter().flatten() {
            if !is_text(field.ty) {
                cx.error_spanned_by(
                    key,
                    format!(
                        "`{rule}` applies to `String` or `Option<String>` fields, not `{}`",
                        field.ty.to_token_stream()
                    ),
                );
            }
        }
        if let (Some((_, lo)), Some((key, hi))) = (&field.min_length, &field.max_length) {
            if lo > hi {
                cx.error_spanned_by(key, "`max_length` is smaller than `min_length`");
            }
        }
        if let (Some((_, lo)), Some((key, hi))) = (&field.min, &field.max) {
            if lo.as_f64() > hi.as_f64() {
                cx.error_spanned_by(key, "`max` is smaller than `min`");
            }
        }
    }
    let versions: Vec<&Field<'a>> = container.fields.iter().filter(|f| f.version.is_some()).collect();
    if let [_, second, ..] = versions.as_slice() {
        cx.error_spanned_by(second.version.as_ref(), "only one field can be the version");
    }
    for field in &versions {
        if !matches!(last_segment(field.ty), Some((name, None)) if name == "i64" || name == "i32") {
            cx.error_spanned_by(
                field.ty,
                format!(
                    "`version` applies to an `i64` or `i32` field, not `{}`",
                    field.ty.to_token_stream()
                ),
            );
        } else if !field.stored {
            cx.error_spanned_by(
                field.version.as_ref(),
                "the version field must be stored (not `#[serde(skip)]`)",
            );
        }
    }
    for (attr, name) in [("created_at", true), ("updated_at", false)] {
        let stamped: Vec<&Field<'a>> = container
            .fields
            .iter()
            .filter(|f| {
                if name {
                    f.created_at.is_some()
                } else {
                    f.updated_at.is_some()
                }
            })
            .collect();
        if let [_, second, ..] = stamped.as_slice() {
            let key = if name { &second.created_at } else { &second.updated_at };
            cx.error_spanned_by(key.as_ref(), format!("only one field can be `{attr}`"));
        }
        for field in stamped {
            if date_time(field.ty).is_none() {
                cx.error_spanned_by(
                    field.ty,
                    format!(
                        "`{attr}` applies to a `bson::DateTime` or `Option<bson::DateTime>` field, not `{}`",
                        field.ty.to_token_stream()
                    ),
                );
            }
        }
    }
    let marked: Vec<&Field<'a>> = container.fields.iter().filter(|f| f.id.is_some()).collect();
    let id = match marked.as_slice() {
        [one] => Some(*one),
        [] => container.fields.iter().find(|f| f.stored && f.bson_name == "_id"),
        [_, second, ..] => {
            cx.error_spanned_by(second.id.as_ref(), "only one field can be the id");
            None
        }
    };
    let Some(id) = id else {
        if marked.is_empty() {
            cx.error_spanned_by(
                &container.input.ident,
                "missing id field: add `#[serde(rename = \"_id\", default, skip_serializing_if = \"Option::is_none\")] id: Option<ObjectId>`",
            );
        }
        return None;
    };
    if id.bson_name != "_id" {
        cx.error_spanned_by(
            id.ident,
            "the id field must be stored as `_id`: add `#[serde(rename = \"_id\")]`",
        );
        return None;
    }
    Some(id)
}

/// For a `DateTime` field: `Some(false)`; `Option<DateTime>`: `Some(true)`.
fn date_time(ty: &Type) -> Option<bool> {
    match last_segment(ty)? {
        (name, None) if name == "DateTime" => Some(false),
        (name, Some(inner)) if name == "Option" => match last_segment(inner)? {
            (name, None) if name == "DateTime" => Some(true),
            _ => None,
        },
        _ => None,
    }
}

/// `String`, `Option<String>`.
fn is_text(ty: &Type) -> bool {
    last_segment(ty).is_some_and(|(name, inner)| {
        name == "String"
            || (name == "Option" && inner.is_some_and(|t| last_segment(t).is_some_and(|(n, _)| n == "String")))
    })
}

fn generate(container: &Container<'_>, id: &Field<'_>) -> TokenStream {
    let input = container.input;
    let ident = &input.ident;
    let vis = &input.vis;
    // Every type parameter must allow the model to be stored and shared.
    let mut generics = input.generics.clone();
    let params: Vec<Ident> = generics.type_params().map(|p| p.ident.clone()).collect();
    for param in params {
        generics.make_where_clause().predicates.push(syn::parse_quote! {
            #param: ::earnorm::__private::serde::Serialize
                + ::earnorm::__private::serde::de::DeserializeOwned
                + ::core::marker::Send + ::core::marker::Sync + ::core::marker::Unpin + 'static
        });
    }
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    let collection = container
        .collection
        .as_ref()
        .map_or_else(|| default_collection(&ident.to_string()), LitStr::value);

    let record_cache = container.cache.map(
        |RecordCacheAttr {
             ttl,
             missing,
             refresh,
             local,
         }| {
            let seconds = |value: Option<u64>| match value {
                Some(seconds) => quote!(::earnorm::__private::ttl(#seconds)),
                None => quote!(::earnorm::__private::Option::None),
            };
            let (missing, refresh) = (seconds(missing), seconds(refresh));
            let local = local.unwrap_or(true);
            quote! {
                const CACHE: ::earnorm::__private::Option<::earnorm::RecordCache> = ::earnorm::__private::Option::Some(
                    ::earnorm::RecordCache::new(#ttl, #missing).refreshing(#refresh).in_process(#local),
                );
            }
        },
    );
    let version = container.fields.iter().find(|f| f.version.is_some()).map(|f| {
        let (name, ident) = (&f.bson_name, f.ident);
        quote! {
            const VERSION_FIELD: ::earnorm::__private::Option<&'static str> = ::earnorm::__private::Option::Some(#name);
            fn version(&self) -> ::earnorm::__private::Option<i64> {
                ::earnorm::__private::Option::Some(::core::convert::From::from(self.#ident))
            }
            fn set_version(&mut self, version: i64) {
                if let ::core::result::Result::Ok(version) = ::core::convert::TryFrom::try_from(version) {
                    self.#ident = version;
                }
            }
        }
    });
    let stamp_field = |pick: fn(&Field<'_>) -> bool| container.fields.iter().find(|f| pick(f));
    let created = stamp_field(|f| f.created_at.is_some());
    let updated = stamp_field(|f| f.updated_at.is_some());
    let timestamps = (created.is_some() || updated.is_some()).then(|| {
        let name = |f: Option<&Field<'_>>| match f {
            Some(f) => {
                let name = &f.bson_name;
                quote!(::earnorm::__private::Option::Some(#name))
            }
            None => quote!(::earnorm::__private::Option::None),
        };
        let (created_name, updated_name) = (name(created), name(updated));
        let set_created = created.map(|f| {
            let ident = f.ident;
            if date_time(f.ty) == Some(true) {
                quote! {
                    if inserting || self.#ident.is_none() {
                        self.#ident = ::earnorm::__private::Option::Some(now);
                    }
                }
            } else {
                quote! {
                    if inserting {
                        self.#ident = now;
                    }
                }
            }
        });
        let set_updated = updated.map(|f| {
            let ident = f.ident;
            if date_time(f.ty) == Some(true) {
                quote!(self.#ident = ::earnorm::__private::Option::Some(now);)
            } else {
                quote!(self.#ident = now;)
            }
        });
        quote! {
            const CREATED_AT_FIELD: ::earnorm::__private::Option<&'static str> = #created_name;
            const UPDATED_AT_FIELD: ::earnorm::__private::Option<&'static str> = #updated_name;
            fn stamp(&mut self, now: ::earnorm::__private::bson::DateTime, inserting: bool) {
                let _ = inserting;
                #set_created
                #set_updated
            }
        }
    });
    let hooks = default_hooks(container.input, container.hooks);
    let id_ident = id.ident;
    let (id_ty, id_accessors) = match last_segment(id.ty) {
        Some((name, Some(inner))) if name == "Option" => (
            inner.clone(),
            quote! {
                fn id(&self) -> ::earnorm::__private::Option<&Self::Id> { self.#id_ident.as_ref() }
                fn set_id(&mut self, id: ::earnorm::__private::Option<Self::Id>) { self.#id_ident = id; }
            },
        ),
        _ => (
            id.ty.clone(),
            quote! {
                fn id(&self) -> ::earnorm::__private::Option<&Self::Id> { ::earnorm::__private::Option::Some(&self.#id_ident) }
                fn set_id(&mut self, id: ::earnorm::__private::Option<Self::Id>) {
                    if let ::earnorm::__private::Option::Some(id) = id { self.#id_ident = id; }
                }
            },
        ),
    };

    let checks = container.fields.iter().map(|f| validations(f));
    let indexes = container
        .fields
        .iter()
        .filter(|f| f.unique.is_some() || f.index.is_some())
        .map(|f| {
            let name = &f.bson_name;
            let unique = f.unique.is_some();
            quote!(::earnorm::__private::IndexSpec { field: #name, unique: #unique })
        });

    let fields_ident = format_ident!("{}Fields", ident);
    let stored: Vec<&Field<'_>> = container.fields.iter().filter(|f| f.stored).collect();
    let field_decls = stored.iter().map(|f| {
        let (name, doc) = (f.ident, format!("`{}`", f.bson_name));
        quote!(#[doc = #doc] pub #name: &'static str)
    });
    let field_values = stored.iter().map(|f| {
        let (name, bson) = (f.ident, &f.bson_name);
        quote!(#name: #bson)
    });
    let fields_doc =
        format!("Names of [`{ident}`]'s fields as stored in MongoDB, for building filters: `{ident}::FIELDS.name`.");

    quote! {
        #hooks
        #[automatically_derived]
        impl #impl_generics ::earnorm::Model for #ident #ty_generics #where_clause {
            const COLLECTION: &'static str = #collection;
            #record_cache
            #version
            #timestamps
            type Id = #id_ty;
            #id_accessors
            fn validate(&self) -> ::earnorm::__private::Result<(), ::earnorm::__private::ValidationErrors> {
                #[allow(unused_mut)]
                let mut errors = ::earnorm::__private::ValidationErrors::new();
                #(#checks)*
                errors.into_result()
            }
            fn indexes() -> ::earnorm::__private::Vec<::earnorm::__private::IndexSpec> {
                ::earnorm::__private::Vec::from([#(#indexes),*])
            }
        }

        #[doc = #fields_doc]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #vis struct #fields_ident {
            #(#field_decls,)*
        }

        #[automatically_derived]
        impl #impl_generics #ident #ty_generics #where_clause {
            /// Field names as stored in MongoDB.
            #vis const FIELDS: #fields_ident = #fields_ident { #(#field_values,)* };
        }
    }
}

fn validations(field: &Field<'_>) -> TokenStream {
    let ident = field.ident;
    let name = ident.to_string();
    let span = field.ty.span();
    let mut out = TokenStream::new();
    let v = quote!(::earnorm::__private::validate);
    if field.required.is_some() {
        out.extend(quote_spanned!(span=> #v::required(&mut errors, #name, &self.#ident);));
    }
    if field.email.is_some() {
        out.extend(quote_spanned!(span=> #v::email(&mut errors, #name, &self.#ident);));
    }
    if let Some((_, n)) = field.min_length {
        out.extend(quote_spanned!(span=> #v::min_length(&mut errors, #name, &self.#ident, #n);));
    }
    if let Some((_, n)) = field.max_length {
        out.extend(quote_spanned!(span=> #v::max_length(&mut errors, #name, &self.#ident, #n);));
    }
    if let Some((_, n)) = &field.min {
        let n = n.to_tokens();
        out.extend(quote_spanned!(span=> #v::min(&mut errors, #name, &self.#ident, #n);));
    }
    if let Some((_, n)) = &field.max {
        let n = n.to_tokens();
        out.extend(quote_spanned!(span=> #v::max(&mut errors, #name, &self.#ident, #n);));
    }
    if let Some((_, pattern)) = &field.pattern {
        out.extend(quote_spanned!(span=> {
            static PATTERN: ::earnorm::__private::OnceLock<::earnorm::__private::Option<::earnorm::__private::Regex>> =
                ::earnorm::__private::OnceLock::new();
            #v::pattern(&mut errors, #name, &self.#ident, #pattern, &PATTERN);
        }));
    }
    out
}

/// `UserProfile` -> `user_profiles`.
fn default_collection(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out.push('s');
    out
}
