//! Error collection: every mistake in one build, each at its token.

use std::cell::RefCell;
use std::fmt::Display;

use proc_macro2::TokenStream;
use quote::{quote, ToTokens};

/// Collects errors while a macro input is checked. Must be finished with
/// [`Ctxt::check`]; dropping it unchecked is a bug in the macro.
pub(crate) struct Ctxt {
    errors: RefCell<Option<Vec<syn::Error>>>,
}

impl Ctxt {
    pub(crate) fn new() -> Self {
        Self {
            errors: RefCell::new(Some(Vec::new())),
        }
    }

    /// An error spanning `tokens`.
    pub(crate) fn error_spanned_by<T: ToTokens, M: Display>(&self, tokens: T, message: M) {
        self.syn_error(syn::Error::new_spanned(tokens, message));
    }

    /// A ready-made error.
    pub(crate) fn syn_error(&self, err: syn::Error) {
        if let Some(errors) = self.errors.borrow_mut().as_mut() {
            errors.push(err);
        }
    }

    /// Stores `value` in `slot`, or reports `key` as a duplicate of `what`
    /// when the slot is already taken.
    pub(crate) fn set_once<T>(&self, slot: &mut Option<T>, key: &syn::Ident, what: &str, value: T) {
        if slot.is_some() {
            self.error_spanned_by(key, format!("duplicate {what} `{key}`"));
        } else {
            *slot = Some(value);
        }
    }

    /// A whole number of seconds, at least 1, written as an integer
    /// literal for the option `name`; reports anything else.
    pub(crate) fn seconds(&self, name: &str, value: &syn::Expr) -> Option<u64> {
        match value {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Int(lit),
                ..
            }) => match lit.base10_parse::<u64>() {
                Ok(0) => self.error_spanned_by(lit, format!("`{name}` must be at least 1 second")),
                Ok(n) => return Some(n),
                Err(_) => self.error_spanned_by(lit, format!("`{name}` must be a whole number of seconds")),
            },
            _ => self.error_spanned_by(
                value,
                format!("`{name}` must be a positive integer literal (seconds), like {name} = 300"),
            ),
        }
        None
    }

    /// All collected errors, or `Ok` when there were none.
    pub(crate) fn check(self) -> Result<(), Vec<syn::Error>> {
        let errors = self.errors.borrow_mut().take().unwrap_or_default();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

impl Drop for Ctxt {
    fn drop(&mut self) {
        if !std::thread::panicking() && self.errors.borrow().is_some() {
            panic!("earnorm-derive: Ctxt dropped without checking for errors");
        }
    }
}

/// An attribute's value with the tokens it was written as (`ttl = 60`), as
/// serde_derive's `Attr` keeps them: every error about the attribute (a
/// duplicate, a clash with another one) can point at what the user wrote.
pub(crate) struct Attr<T> {
    /// What the attribute is, for messages: "#[cached] option".
    what: &'static str,
    tokens: TokenStream,
    value: Option<T>,
}

impl<T> Attr<T> {
    /// No value yet.
    pub(crate) fn none(what: &'static str) -> Self {
        Self {
            what,
            tokens: TokenStream::new(),
            value: None,
        }
    }

    /// Sets the value of `key`, written as `tokens` (the key and its
    /// value); a second value is reported as a duplicate, at its key.
    pub(crate) fn set(&mut self, cx: &Ctxt, key: &syn::Ident, tokens: impl ToTokens, value: T) {
        if self.value.is_none() {
            self.tokens = tokens.into_token_stream();
        }
        cx.set_once(&mut self.value, key, self.what, value);
    }

    /// The value, if one was set.
    pub(crate) fn get(&self) -> Option<&T> {
        self.value.as_ref()
    }

    /// The tokens the value was written as (empty when none was).
    pub(crate) fn tokens(&self) -> &TokenStream {
        &self.tokens
    }

    /// The value, dropping its tokens.
    pub(crate) fn into_inner(self) -> Option<T> {
        self.value
    }
}

/// Reports that `refresh` is not shorter than `ttl`, at both.
pub(crate) fn refresh_not_shorter(cx: &Ctxt, ttl: &Attr<u64>, refresh: &Attr<u64>) {
    if let (Some(ttl_value), Some(refresh_value)) = (ttl.get(), refresh.get()) {
        if refresh_value >= ttl_value {
            cx.error_spanned_by(
                refresh.tokens(),
                "`refresh` must be shorter than `ttl`: it is the last part of the TTL",
            );
            cx.error_spanned_by(ttl.tokens(), "the `ttl` that `refresh` must be shorter than");
        }
    }
}

/// The errors as `compile_error!` invocations.
pub(crate) fn to_compile_errors(errors: Vec<syn::Error>) -> TokenStream {
    let errors = errors.iter().map(syn::Error::to_compile_error);
    quote!(#(#errors)*)
}

/// The errors followed by the user's item unchanged, so one mistake does not
/// cascade into errors at every use of the item.
pub(crate) fn with_original(errors: Vec<syn::Error>, original: TokenStream) -> TokenStream {
    let errors = to_compile_errors(errors);
    quote!(#errors #original)
}
