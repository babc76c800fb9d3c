//! `#[cached(...)]`: parse the options and the function, check the
//! signature, then generate a cache-aside wrapper and keep the original body
//! as `NAME_uncached`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{FnArg, GenericParam, Ident, ItemFn, LitInt, LitStr, Pat, ReturnType, Type};

use crate::ctxt::{refresh_not_shorter, Attr, Ctxt};
use crate::shape::last_segment;

/// The attribute's options.
struct Options {
    /// Whether `ttl` was written at all (valid or not).
    ttl_given: bool,
    ttl: Attr<u64>,
    /// `refresh = N`: refresh ahead of the expiry, in the last N seconds.
    refresh: Attr<u64>,
    key: Attr<LitStr>,
    version: Attr<u32>,
    scope: Attr<LitStr>,
    depends_on: Vec<syn::Path>,
    tags: Vec<LitStr>,
    /// `store = "all" | "ok" | "some"`: which results are cached, overriding
    /// what the return type suggests.
    store: Attr<OutputKind>,
    /// `local = false`: kept out of the in-process tier.
    local: Attr<bool>,
}

impl Default for Options {
    fn default() -> Self {
        const OPTION: &str = "#[cached] option";
        Self {
            ttl_given: false,
            ttl: Attr::none(OPTION),
            refresh: Attr::none(OPTION),
            key: Attr::none(OPTION),
            version: Attr::none(OPTION),
            scope: Attr::none(OPTION),
            depends_on: Vec::new(),
            tags: Vec::new(),
            store: Attr::none(OPTION),
            local: Attr::none(OPTION),
        }
    }
}

/// Whose function it is: a record's, a model's, or neither.
enum Owner {
    /// `&self` (or `self: &Self`) of a model.
    Record,
    /// An associated function of a model.
    Model,
    /// A function with an explicit scope: free, or associated (its key does
    /// not depend on a model).
    Scoped(LitStr),
}

/// How the result is cached (see `earnorm_cache::Output`).
#[derive(Clone, Copy)]
enum OutputKind {
    Result,
    Option,
    Plain,
}

pub(crate) fn expand(args: TokenStream, item: &ItemFn) -> Result<TokenStream, Vec<syn::Error>> {
    let cx = Ctxt::new();
    let options = parse_options(&cx, args);
    let sig = &item.sig;
    if sig.asyncness.is_none() {
        cx.error_spanned_by(sig.fn_token, "#[cached] needs an `async fn`");
    }
    if !options.ttl_given {
        cx.syn_error(syn::Error::new(
            Span::call_site(),
            "missing `ttl`: write #[cached(ttl = SECONDS)]",
        ));
    }
    refresh_not_shorter(&cx, &options.ttl, &options.refresh);
    let owner = owner(&cx, item, &options);
    let args = arguments(&cx, item);
    cx.check()?;
    let (Some(owner), Some(args)) = (owner, args) else {
        return Err(vec![syn::Error::new(Span::call_site(), "#[cached]: invalid function")]);
    };
    Ok(generate(item, &options, &owner, &args))
}

fn parse_options(cx: &Ctxt, args: TokenStream) -> Options {
    let mut options = Options::default();
    let parser = syn::meta::parser(|meta| {
        let Some(key) = meta.path.get_ident().cloned() else {
            return Err(meta.error("unknown #[cached] option"));
        };
        let name = key.to_string();
        match name.as_str() {
            "ttl" | "refresh" => {
                options.ttl_given |= name == "ttl";
                let value: syn::Expr = meta.value()?.parse()?;
                if let Some(n) = cx.seconds(&name, &value) {
                    let slot = if name == "ttl" {
                        &mut options.ttl
                    } else {
                        &mut options.refresh
                    };
                    slot.set(cx, &key, quote!(#key = #value), n);
                }
            }
            "key" | "scope" => {
                let lit: LitStr = meta.value()?.parse()?;
                if lit.value().is_empty() {
                    cx.error_spanned_by(&lit, format!("`{name}` must not be empty"));
                }
                let slot = if name == "key" {
                    &mut options.key
                } else {
                    &mut options.scope
                };
                slot.set(cx, &key, quote!(#key = #lit), lit.clone());
            }
            "store" => {
                let lit: LitStr = meta.value()?.parse()?;
                let kind = match lit.value().as_str() {
                    "all" => Some(OutputKind::Plain),
                    "ok" => Some(OutputKind::Result),
                    "some" => Some(OutputKind::Option),
                    _ => {
                        cx.error_spanned_by(
                            &lit,
                            "`store` is \"all\" (every value), \"ok\" (only `Ok` of a Result) or \"some\" (only `Some` of an Option)",
                        );
                        None
                    }
                };
                if let Some(kind) = kind {
                    options.store.set(cx, &key, quote!(#key = #lit), kind);
                }
            }
            "local" => {
                let lit: syn::LitBool = meta.value()?.parse()?;
                options.local.set(cx, &key, quote!(#key = #lit), lit.value);
            }
            "version" => {
                let lit: LitInt = meta.value()?.parse()?;
                match lit.base10_parse::<u32>() {
                    Ok(n) => options.version.set(cx, &key, quote!(#key = #lit), n),
                    Err(_) => cx.error_spanned_by(&lit, "`version` must be a non-negative integer"),
                }
            }
            "depends_on" => meta.parse_nested_meta(|inner| {
                options.depends_on.push(inner.path.clone());
                Ok(())
            })?,
            "tags" => {
                let content;
                syn::parenthesized!(content in meta.input);
                let list = content.parse_terminated(|input| input.parse::<LitStr>(), syn::Token![,])?;
                options.tags.extend(list);
            }
            other => {
                cx.error_spanned_by(
                    &key,
                    format!("unknown #[cached] option `{other}` (expected ttl, refresh, key, version, scope, store, depends_on, tags, local)"),
                );
                // Skip its value so that the rest of the options still parse.
                if meta.input.peek(syn::Token![=]) {
                    let _: syn::Expr = meta.value()?.parse()?;
                } else if meta.input.peek(syn::token::Paren) {
                    let _content;
                    syn::parenthesized!(_content in meta.input);
                }
            }
        }
        Ok(())
    });
    if let Err(err) = syn::parse::Parser::parse2(parser, args) {
        cx.syn_error(err);
    }
    options
}

fn owner(cx: &Ctxt, item: &ItemFn, options: &Options) -> Option<Owner> {
    match item.sig.inputs.first() {
        Some(FnArg::Receiver(r)) => {
            let shared = if r.colon_token.is_some() {
                // `self: &Self` is `&self`; any other typed receiver is not.
                matches!(&*r.ty, Type::Reference(reference)
                    if reference.mutability.is_none()
                    && matches!(&*reference.elem, Type::Path(p) if p.qself.is_none() && p.path.is_ident("Self")))
            } else {
                r.reference.is_some() && r.mutability.is_none()
            };
            if !shared {
                let message = if r.mutability.is_some()
                    || matches!(&*r.ty, Type::Reference(reference) if reference.mutability.is_some())
                {
                    "#[cached] methods take `&self`, not `&mut self`: a cached method must not change the record"
                } else {
                    "#[cached] methods take `&self` (or `self: &Self`), not `self` or another receiver type"
                };
                cx.error_spanned_by(r, message);
                None
            } else if let Some(scope) = options.scope.get() {
                cx.error_spanned_by(
                    scope,
                    "`scope` is for functions without `self`; a `&self` method is cached per record",
                );
                None
            } else {
                Some(Owner::Record)
            }
        }
        _ => Some(options.scope.get().cloned().map_or(Owner::Model, Owner::Scoped)),
    }
}

/// The arguments after the receiver: names and types.
fn arguments<'a>(cx: &Ctxt, item: &'a ItemFn) -> Option<Vec<(&'a Ident, &'a Type)>> {
    let mut out = Vec::new();
    let mut ok = true;
    for arg in &item.sig.inputs {
        let FnArg::Typed(pat_type) = arg else {
            continue;
        };
        if let Type::ImplTrait(_) = &*pat_type.ty {
            cx.error_spanned_by(&pat_type.ty, "#[cached] cannot key on an `impl Trait` argument: use a concrete or generic type that implements Serialize");
            ok = false;
            continue;
        }
        match &*pat_type.pat {
            Pat::Ident(pat) if pat.by_ref.is_none() && pat.subpat.is_none() => out.push((&pat.ident, &*pat_type.ty)),
            other => {
                cx.error_spanned_by(
                    other,
                    "#[cached] arguments must be plain names (`name: Type`), not patterns",
                );
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

/// The cached value's type and how it is cached: as `store` says, or as the
/// return type suggests (`Result` or a name ending in `Result`: only `Ok`;
/// `Option`: only `Some`; anything else: every value).
fn output(sig: &syn::Signature, store: Option<OutputKind>) -> (OutputKind, Type) {
    let ReturnType::Type(_, ty) = &sig.output else {
        return (OutputKind::Plain, syn::parse_quote!(()));
    };
    let shape = last_segment(ty);
    match store {
        Some(OutputKind::Plain) => return (OutputKind::Plain, (**ty).clone()),
        Some(kind) => {
            let inner = shape.and_then(|(_, inner)| inner.cloned());
            return (kind, inner.unwrap_or_else(|| (**ty).clone()));
        }
        None => {}
    }
    if let Some((name, Some(inner))) = shape {
        // `Result`, or an alias named like one (`AppResult<T>`).
        if name.ends_with("Result") {
            return (OutputKind::Result, inner.clone());
        }
        if name == "Option" {
            return (OutputKind::Option, inner.clone());
        }
    }
    (OutputKind::Plain, (**ty).clone())
}

fn generate(item: &ItemFn, options: &Options, owner: &Owner, args: &[(&Ident, &Type)]) -> TokenStream {
    let ItemFn { attrs, vis, sig, block } = item;
    let name = &sig.ident;
    let uncached = format_ident!("{}_uncached", name);
    let key_name = options.key.get().map_or_else(|| name.to_string(), LitStr::value);
    let version = options.version.get().copied().unwrap_or(0);
    let ttl = options.ttl.get().copied().unwrap_or(1);
    let refresh = match options.refresh.get() {
        Some(seconds) => quote!(::earnorm::__private::ttl(#seconds)),
        None => quote!(::earnorm::__private::Option::None),
    };
    let private = quote!(::earnorm::__private);

    let (kind, value_ty) = output(sig, options.store.get().copied());
    let value_span = match &sig.output {
        ReturnType::Type(_, ty) => ty.span(),
        ReturnType::Default => sig.ident.span(),
    };
    let mode = match kind {
        OutputKind::Result => quote_spanned!(value_span=> #private::ResultOutput),
        OutputKind::Option => quote_spanned!(value_span=> #private::OptionOutput),
        OutputKind::Plain => quote_spanned!(value_span=> #private::PlainOutput),
    };
    let value_check = quote_spanned!(value_span=> #private::assert_cacheable::<#value_ty>(););
    let arg_checks = args
        .iter()
        .map(|(_, ty)| quote_spanned!(ty.span()=> #private::assert_serialize::<#ty>();));
    let arg_names: Vec<&Ident> = args.iter().map(|(ident, _)| *ident).collect();

    let mut deps: Vec<TokenStream> = options
        .depends_on
        .iter()
        .map(|p| quote_spanned!(p.span()=> #private::Dep::Model(<#p as ::earnorm::Model>::COLLECTION)))
        .collect();
    deps.extend(options.tags.iter().map(|t| quote!(#private::Dep::Tag(#t))));
    if let Owner::Scoped(scope) = owner {
        deps.push(quote!(#private::Dep::Tag(#scope)));
    }

    let type_params: Vec<TokenStream> = sig
        .generics
        .params
        .iter()
        .filter_map(|p| match p {
            GenericParam::Type(t) => Some(t.ident.to_token_stream()),
            GenericParam::Const(c) => Some(c.ident.to_token_stream()),
            GenericParam::Lifetime(_) => None,
        })
        .collect();
    let turbofish = if type_params.is_empty() {
        quote!()
    } else {
        quote!(::<#(#type_params),*>)
    };
    // Every `Self` the wrapper names carries one span (the method's `self`,
    // or the function's name), so that using #[cached] without `scope`
    // outside an impl is one error there, not one per use.
    let self_span = match sig.inputs.first() {
        Some(FnArg::Receiver(r)) => r.self_token.span,
        _ => sig.ident.span(),
    };
    let self_ty = quote_spanned!(self_span=> Self);
    // What identifies the function beyond its name: the model type, the
    // type parameters (generic parameters that are not types, such as const
    // generics, enter as their values through `type_name` of nothing: they
    // are listed in the key's arguments instead) and the return type.
    let return_ty: Type = match &sig.output {
        ReturnType::Type(_, ty) => (**ty).clone(),
        ReturnType::Default => syn::parse_quote!(()),
    };
    let type_names = sig.generics.params.iter().filter_map(|p| match p {
        GenericParam::Type(t) => {
            let ident = &t.ident;
            Some(quote!(::core::any::type_name::<#ident>()))
        }
        _ => None,
    });
    let const_values = sig.generics.params.iter().filter_map(|p| match p {
        GenericParam::Const(c) => Some(&c.ident),
        _ => None,
    });
    let self_name = match owner {
        Owner::Scoped(_) => quote!(),
        Owner::Record | Owner::Model => quote!(::core::any::type_name::<#self_ty>(),),
    };
    let identity = quote!(&[#self_name #(#type_names,)* ::core::any::type_name::<#return_ty>()]);
    let key_args = quote!(&(#(&#arg_names,)* #(&#const_values,)*));
    let local = options.local.get().copied().unwrap_or(true);
    let method = quote! {
        &#private::Method {
            name: #key_name,
            version: #version,
            local: #local,
            identity: #identity,
            deps: &[#(#deps),*],
        }
    };

    let (model_check, (key_call, hit_call), body_call) = match owner {
        Owner::Record => (
            quote_spanned!(self_span=> #private::assert_model::<Self>();),
            (
                quote!(#private::record_method_key::<#self_ty, _>(self, __earnorm_method, #key_args)),
                quote!(#private::record_method_hit::<#self_ty, #return_ty, #mode, _>(self, __earnorm_method, #key_args, __earnorm_keeper)),
            ),
            quote!(self.#uncached #turbofish(#(#arg_names),*)),
        ),
        Owner::Model => (
            quote_spanned!(self_span=> #private::assert_model::<Self>();),
            (
                quote!(#private::model_key::<#self_ty, _>(__earnorm_method, #key_args)),
                quote!(#private::model_hit::<#self_ty, #return_ty, #mode, _>(__earnorm_method, #key_args, __earnorm_keeper)),
            ),
            quote!(<#self_ty>::#uncached #turbofish(#(#arg_names),*)),
        ),
        // Free or associated: the body is written out in place, since
        // nothing here says whether it needs `Self::` to be called.
        Owner::Scoped(_) => {
            let rebind = sig.inputs.iter().filter_map(|input| match input {
                FnArg::Typed(pat_type) => match &*pat_type.pat {
                    Pat::Ident(pat) if pat.mutability.is_some() => {
                        let ident = &pat.ident;
                        Some(quote!(#[allow(unused_mut)] let mut #ident = #ident;))
                    }
                    _ => None,
                },
                FnArg::Receiver(_) => None,
            });
            (
                quote!(),
                (
                    quote!(#private::free_key(::core::module_path!(), __earnorm_method, #key_args)),
                    quote!(#private::free_hit::<#return_ty, #mode, _>(::core::module_path!(), __earnorm_method, #key_args, __earnorm_keeper)),
                ),
                quote!(async move { #(#rebind)* #block }),
            )
        }
    };

    let mut uncached_sig = sig.clone();
    uncached_sig.ident = uncached.clone();
    let uncached_doc = match owner {
        Owner::Scoped(_) => format!("`{name}` without the cache: always runs the body."),
        Owner::Record | Owner::Model => {
            format!("[`{name}`](Self::{name}) without the cache: always runs the body.")
        }
    };

    // Two cached functions of one impl (or module) with the same key would
    // share entries: this item makes that a compile error at the key.
    let key_span = options.key.get().map_or_else(|| sig.ident.span(), LitStr::span);
    let marker = format_ident!("__earnorm_cached_key_{}", identifier_part(&key_name), span = key_span);
    // The user's lint levels apply to the body, wherever it is generated.
    let lint_attrs = attrs.iter().filter(|attr| {
        ["allow", "expect", "warn", "deny", "forbid"]
            .iter()
            .any(|level| attr.path().is_ident(level))
    });
    let marker_item = quote_spanned! {key_span=>
        #[doc(hidden)]
        #[allow(non_upper_case_globals, dead_code)]
        const #marker: () = ();
    };

    // The wrapper only passes arguments on: `mut` bindings belong to the body.
    let mut sig = sig.clone();
    for input in &mut sig.inputs {
        if let FnArg::Typed(pat_type) = input {
            if let Pat::Ident(pat) = &mut *pat_type.pat {
                pat.mutability = None;
            }
        }
    }

    quote! {
        #(#attrs)*
        #vis #sig {
            #value_check
            #(#arg_checks)*
            #model_check
            let __earnorm_method = #method;
            // Kept in process by value when the cached part of the return
            // type is `Clone` (cloned out on a hit), else as its payload
            // (decoded on a hit).
            let __earnorm_keeper = {
                #[allow(unused_imports)]
                use #private::{KeepByClone as _, KeepByPayload as _};
                (&#private::Pick::<#return_ty, #mode>::new()).keeper()
            };
            // An in-process hit, found without building the key.
            if let #private::Option::Some(__earnorm_hit) = #hit_call {
                return __earnorm_hit;
            }
            match #key_call {
                #private::Option::Some((__earnorm_cache, __earnorm_key)) => {
                    let __earnorm_key = #private::kept(__earnorm_key, __earnorm_keeper);
                    __earnorm_cache
                        .get_or_compute_by::<#return_ty, #mode, _, _>(
                            &__earnorm_key,
                            |_| #private::ttl(#ttl),
                            #refresh,
                            #body_call,
                        )
                        .await
                }
                #private::Option::None => #body_call.await,
            }
        }

        #[doc = #uncached_doc]
        #(#lint_attrs)*
        #[allow(dead_code, clippy::unused_async, clippy::missing_errors_doc, clippy::missing_panics_doc)]
        #vis #uncached_sig #block

        #marker_item
    }
}

/// `text` as part of an identifier: ASCII letters, digits and `_` kept,
/// anything else written as `_xHHHH_`.
fn identifier_part(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            out.push(c);
        } else {
            out.push_str(&format!("_x{:04x}_", u32::from(c)));
        }
    }
    out
}
