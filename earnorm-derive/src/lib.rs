//! Procedural macros for EarnORM: `#[derive(Model)]` and `#[cached]`.
//!
//! Use them through the `earnorm` crate (`use earnorm::prelude::*`); the code
//! they generate names only `::earnorm::__private::...` paths.
//!
//! Layout: `ctxt` collects errors; `model` and `cached` each parse
//! their input into a small model, check it, and expand it.

mod cached;
mod ctxt;
mod model;
mod pattern;
mod shape;

use proc_macro::TokenStream;

/// Derives `earnorm::Model` for a struct with named fields.
///
/// Container attribute: `#[earnorm(collection = "name")]` (default: the
/// struct name in snake case with an `s`).
///
/// Field attributes, combinable: `id` (the id field; otherwise the field
/// serialized as `_id`), `required`, `email`, `min_length = N`,
/// `max_length = N`, `min = X`, `max = X`, `pattern = "regex"`, `unique`,
/// `index`.
#[proc_macro_derive(Model, attributes(earnorm))]
pub fn derive_model(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    match model::expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(errors) => {
            let mut tokens = ctxt::to_compile_errors(errors);
            tokens.extend(model::fallback(&input));
            tokens.into()
        }
    }
}

/// Caches an async function's result in the current EarnORM environment.
///
/// `#[cached(ttl = SECONDS)]`, plus optionally `key = "name"` (default: the
/// function's name), `version = N` (change it when the result's shape
/// changes), `depends_on(OtherModel, ..)` (invalidated by any write to those
/// models), `tags("tag", ..)` (invalidated by `earnorm::invalidate_tag`), and
/// for free functions `scope = "name"`.
///
/// * `&self` methods of a model: record scope (the record's id and content
///   are part of the key; `save`/`delete` of the record invalidate it).
/// * associated functions of a model: model scope (any write to the model
///   invalidates).
/// * free functions: give `scope = "name"` (a tag); invalidate with
///   `earnorm::invalidate_tag("name")`.
///
/// The uncached body stays callable as `NAME_uncached`.
#[proc_macro_attribute]
pub fn cached(args: TokenStream, input: TokenStream) -> TokenStream {
    let original: proc_macro2::TokenStream = input.clone().into();
    let item = match syn::parse::<syn::ItemFn>(input) {
        Ok(item) => item,
        Err(err) => return ctxt::with_original(vec![err], original).into(),
    };
    match cached::expand(args.into(), &item) {
        Ok(tokens) => tokens.into(),
        Err(errors) => ctxt::with_original(errors, original).into(),
    }
}
