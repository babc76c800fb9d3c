//! Scopes: what a cached value depends on, and what a write invalidates.
//! What this module alone owns: the rule of the table below (which writes
//! reach which values); the names of their generation keys are
//! [`Keyspace`](crate::keyspace::Keyspace)'s.

/// What a cached value depends on, and what a write invalidates.
///
/// | a value built with | is invalidated by a write to                      |
/// |--------------------|---------------------------------------------------|
/// | `Record(m, id)`    | `Record(m, id)` or `Model(m)`                      |
/// | `Model(m)`         | `Record(m, any id)` or `Model(m)`                  |
/// | `Tag(t)`           | `Tag(t)`                                          |
///
/// So saving one user drops that user's cached methods and every cached query
/// over users, but not the cached methods of other users; a bulk update of
/// users drops everything cached about users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope<'a> {
    /// One record of a model: `(model, id)`.
    Record(&'a str, &'a str),
    /// A whole model (collection).
    Model(&'a str),
    /// A free-form tag for values that are not tied to a model.
    Tag(&'a str),
}

/// A [`Scope`] that owns its names, for invalidations kept until Redis can
/// take them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum OwnedScope {
    Record(String, String),
    Model(String),
    Tag(String),
}

impl OwnedScope {
    pub(crate) fn as_scope(&self) -> Scope<'_> {
        match self {
            OwnedScope::Record(model, id) => Scope::Record(model, id),
            OwnedScope::Model(model) => Scope::Model(model),
            OwnedScope::Tag(tag) => Scope::Tag(tag),
        }
    }
}

impl From<&Scope<'_>> for OwnedScope {
    fn from(scope: &Scope<'_>) -> Self {
        match *scope {
            Scope::Record(model, id) => OwnedScope::Record(model.to_owned(), id.to_owned()),
            Scope::Model(model) => OwnedScope::Model(model.to_owned()),
            Scope::Tag(tag) => OwnedScope::Tag(tag.to_owned()),
        }
    }
}
