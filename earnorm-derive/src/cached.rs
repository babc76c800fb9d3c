//! `#[cached(...)]`: parse the options and the function, check the
//! signature, then generate a cache-aside wrapper and keep the original body
//! as `NAME_uncached`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{FnArg, GenericParam, Ident, ItemFn, LitInt, LitStr, Pat, ReturnType, Type};

use crate::ctxt::Ctxt;

/// The attribute's options.
#[derive(Default)]
struct Options {
    /// Whether `ttl` was written at all (valid or not).
    ttl_given: bool,
    ttl: Option<u64>,
    key: Option<LitStr>,
    version: Option<u32>,
    scope: Option<LitStr>,
    depends_on: Vec<syn::Path>,
    tags: Vec<LitStr>,
}

/// Where the function sits.
enum Receiver {
    /// `&self` of a model.
    Record,
    /// An associated function of a model.
    Model,
    /// A free function with an explicit scope.
    Free(LitStr),
}

/// How the result is cached (see `earnorm_cache::Output`).
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
    let receiver = receiver(&cx, item, &options);
    let args = arguments(&cx, item);
    cx.check()?;
    let (Some(receiver), Some(args)) = (receiver, args) else {
        return Err(vec![syn::Error::new(Span::call_site(), "#[cached]: invalid function")]);
    };
    Ok(generate(item, &options, &receiver, &args))
}

fn parse_options(cx: &Ctxt, args: TokenStream) -> Options {
    let mut options = Options::default();
    let parser = syn::meta::parser(|meta| {
        let Some(key) = meta.path.get_ident().cloned() else {
            return Err(meta.error("unknown #[cached] option"));
        };
        let name = key.to_string();
        let duplicate = || cx.error_spanned_by(&key, format!("duplicate #[cached] option `{name}`"));
        match name.as_str() {
            "ttl" => {
                options.ttl_given = true;
                let value: syn::Expr = meta.value()?.parse()?;
                match &value {
                    syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Int(lit),
                        ..
                    }) => match lit.base10_parse::<u64>() {
                        Ok(0) => cx.error_spanned_by(lit, "`ttl` must be at least 1 second"),
                        Ok(n) if options.ttl.is_none() => options.ttl = Some(n),
                        Ok(_) => duplicate(),
                        Err(_) => cx.error_spanned_by(lit, "`ttl` must be a whole number of seconds"),
                    },
                    _ => cx.error_spanned_by(
                        &value,
                        "`ttl` must be a positive integer literal (seconds), like ttl = 300",
                    ),
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
                if slot.is_some() {
                    duplicate();
                } else {
                    *slot = Some(lit);
                }
            }
            "version" => {
                let lit: LitInt = meta.value()?.parse()?;
                match lit.base10_parse::<u32>() {
                    Ok(n) if options.version.is_none() => options.version = Some(n),
                    Ok(_) => duplicate(),
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
                    format!("unknown #[cached] option `{other}` (expected ttl, key, version, scope, depends_on, tags)"),
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

fn receiver(cx: &Ctxt, item: &ItemFn, options: &Options) -> Option<Receiver> {
    match item.sig.inputs.first() {
        Some(FnArg::Receiver(r)) => {
            if r.reference.is_none() {
                cx.error_spanned_by(r, "#[cached] methods take `&self`, not `self`");
                None
            } else if r.mutability.is_some() {
                cx.error_spanned_by(
                    r,
                    "#[cached] methods take `&self`, not `&mut self`: a cached method must not change the record",
                );
                None
            } else if let Some(scope) = &options.scope {
                cx.error_spanned_by(
                    scope,
                    "`scope` is for free functions; a `&self` method is cached per record",
                );
                None
            } else {
                Some(Receiver::Record)
            }
        }
        _ => Some(options.scope.clone().map_or(Receiver::Model, Receiver::Free)),
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

/// The cached value's type and how it is cached.
fn output(sig: &syn::Signature) -> (OutputKind, Type) {
    let ReturnType::Type(_, ty) = &sig.output else {
        return (OutputKind::Plain, syn::parse_quote!(()));
    };
    if let Type::Path(path) = &**ty {
        if let Some(segment) = path.path.segments.last() {
            let first_arg = match &segment.arguments {
                syn::PathArguments::AngleBracketed(args) => args.args.iter().find_map(|a| match a {
                    syn::GenericArgument::Type(t) => Some(t.clone()),
                    _ => None,
                }),
                _ => None,
            };
            if let Some(inner) = first_arg {
                // `Result`, or an alias named like one (`AppResult<T>`).
                if segment.ident.to_string().ends_with("Result") {
                    return (OutputKind::Result, inner);
                }
                if segment.ident == "Option" {
                    return (OutputKind::Option, inner);
                }
            }
        }
    }
    (OutputKind::Plain, (**ty).clone())
}

fn generate(item: &ItemFn, options: &Options, receiver: &Receiver, args: &[(&Ident, &Type)]) -> TokenStream {
    let ItemFn { attrs, vis, sig, block } = item;
    let name = &sig.ident;
    let uncached = format_ident!("{}_uncached", name);
    let key_name = options.key.as_ref().map_or_else(|| name.to_string(), LitStr::value);
    let version = options.version.unwrap_or(0);
    let ttl = options.ttl.unwrap_or(1);
    let private = quote!(::earnorm::__private);

    let (kind, value_ty) = output(sig);
    let mode = match kind {
        OutputKind::Result => quote!(#private::ResultOutput),
        OutputKind::Option => quote!(#private::OptionOutput),
        OutputKind::Plain => quote!(#private::PlainOutput),
    };
    let value_span = match &sig.output {
        ReturnType::Type(_, ty) => ty.span(),
        ReturnType::Default => sig.ident.span(),
    };
    let value_check = quote_spanned!(value_span=> #private::assert_cacheable::<#value_ty>(););
    let arg_checks = args
        .iter()
        .map(|(_, ty)| quote_spanned!(ty.span()=> #private::assert_serialize::<#ty>();));
    let arg_names: Vec<&Ident> = args.iter().map(|(ident, _)| *ident).collect();
    let key_args = quote!(&(#(&#arg_names,)*));

    let mut deps: Vec<TokenStream> = options
        .depends_on
        .iter()
        .map(|p| quote_spanned!(p.span()=> #private::Dep::Model(<#p as ::earnorm::Model>::COLLECTION)))
        .collect();
    deps.extend(options.tags.iter().map(|t| quote!(#private::Dep::Tag(#t))));
    if let Receiver::Free(scope) = receiver {
        deps.push(quote!(#private::Dep::Tag(#scope)));
    }

    let turbofish = {
        let types: Vec<TokenStream> = sig
            .generics
            .params
            .iter()
            .filter_map(|p| match p {
                GenericParam::Type(t) => Some(t.ident.to_token_stream()),
                GenericParam::Const(c) => Some(c.ident.to_token_stream()),
                GenericParam::Lifetime(_) => None,
            })
            .collect();
        if types.is_empty() {
            quote!()
        } else {
            quote!(::<#(#types),*>)
        }
    };
    let (model_check, key_call, body_call) = match receiver {
        Receiver::Record => {
            let self_token = match sig.inputs.first() {
                Some(FnArg::Receiver(r)) => r.self_token.span,
                _ => sig.ident.span(),
            };
            let model_check = quote_spanned!(self_token=> #private::assert_model::<Self>(););
            (
                model_check,
                quote!(#private::record_key::<Self, _>(self, #key_name, #version, &[#(#deps),*], #key_args)),
                quote!(self.#uncached #turbofish(#(#arg_names),*)),
            )
        }
        Receiver::Model => {
            let model_check = quote_spanned!(sig.ident.span()=> #private::assert_model::<Self>(););
            (
                model_check,
                quote!(#private::model_key::<Self, _>(#key_name, #version, &[#(#deps),*], #key_args)),
                quote!(Self::#uncached #turbofish(#(#arg_names),*)),
            )
        }
        Receiver::Free(_) => (
            quote!(),
            quote!(#private::free_key(::core::module_path!(), #key_name, #version, &[#(#deps),*], #key_args)),
            quote!(#uncached #turbofish(#(#arg_names),*)),
        ),
    };

    let mut uncached_sig = sig.clone();
    uncached_sig.ident = uncached.clone();
    let uncached_doc = format!("[`{name}`](Self::{name}) without the cache: always runs the body.");
    let uncached_doc = if matches!(receiver, Receiver::Free(_)) {
        format!("`{name}` without the cache: always runs the body.")
    } else {
        uncached_doc
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
            match #key_call {
                #private::Option::Some((__earnorm_cache, __earnorm_key)) => {
                    __earnorm_cache.get_or_compute::<_, #mode, _>(&__earnorm_key, #private::ttl(#ttl), #body_call).await
                }
                #private::Option::None => #body_call.await,
            }
        }

        #[doc = #uncached_doc]
        #[allow(clippy::unused_async, clippy::missing_errors_doc, clippy::missing_panics_doc)]
        #vis #uncached_sig #block
    }
}
