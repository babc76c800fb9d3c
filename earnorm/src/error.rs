//! The ORM's error type.

use std::fmt;

use mongodb::bson::Document;
use thiserror::Error;

/// `Result` with [`Error`](enum@Error) as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in an EarnORM call. Never carries credentials.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// One or more fields failed validation; nothing was written.
    #[error("{0}")]
    Validation(#[from] ValidationErrors),
    /// A unique index refused the write.
    #[error("duplicate key in `{model}`: {message}")]
    DuplicateKey {
        /// The model's collection.
        model: &'static str,
        /// The server's message (names the index and the value).
        message: String,
    },
    /// MongoDB could not be reached at `init`/`connect`.
    #[error("cannot connect to MongoDB at {uri}")]
    Connection {
        /// The URI with its password redacted.
        uri: String,
        /// The driver's error.
        #[source]
        source: mongodb::error::Error,
    },
    /// Any other error from MongoDB.
    #[error("MongoDB operation failed")]
    Mongo(#[source] mongodb::error::Error),
    /// A value could not be turned into BSON (or BSON into a value other
    /// than a stored record: see [`Error::Decode`]).
    #[error("could not convert between a value and BSON")]
    Serialization(#[source] mongodb::bson::error::Error),
    /// A stored document does not decode into its model: a field missing,
    /// or of another type (written by another program, or by an older
    /// shape of the model).
    #[error("`{model}`: a stored document does not decode into the model{}", at_field(.field.as_deref()))]
    Decode {
        /// The model's collection.
        model: &'static str,
        /// The field that did not decode, when the decoder says.
        field: Option<String>,
        /// The decoder's error.
        #[source]
        source: Box<mongodb::bson::error::Error>,
    },
    /// `save`, `update` or `delete` of a versioned record
    /// (`#[earnorm(version)]`) whose copy is outdated: the stored record was
    /// written (or deleted) since this copy was read. Nothing was written
    /// and nothing invalidated; read the record again, apply the change,
    /// and write that.
    #[error("`{model}`: record {id} was changed or deleted since this copy (version {version}) was read")]
    Conflict {
        /// The model's collection.
        model: &'static str,
        /// The record's id (its key form).
        id: String,
        /// The version of the outdated copy.
        version: i64,
    },
    /// A hook ([`Hooks`](crate::Hooks)) refused the write; nothing was
    /// written. Build it with [`Error::refused`].
    #[error("refused by a hook: {0}")]
    Refused(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An update document EarnORM does not send: an operator whose value is
    /// not a document (`{"$inc": 5}`), or one that touches the version field
    /// of a versioned model (the ORM moves it). Nothing was written.
    #[error("`{model}`: invalid update: {reason}")]
    InvalidUpdate {
        /// The model's collection.
        model: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A query MongoDB cannot take (a limit of `i64::MIN`, a skip past
    /// `i64::MAX`). Nothing was sent.
    #[error("`{model}`: invalid query: {reason}")]
    InvalidQuery {
        /// The model's collection.
        model: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A record has no id where one is needed, or an id of the wrong kind.
    #[error("{0}")]
    Id(String),
    /// No environment: call [`init`](crate::init) or run inside
    /// [`Environment::scope`](crate::Environment::scope).
    #[error("EarnORM is not initialized: call earnorm::init(config) first, or run inside Environment::scope")]
    NotInitialized,
    /// The runtime shut down before a write finished; it may or may not have
    /// been applied.
    #[error("the write was cancelled by the runtime shutting down; it may or may not have been applied")]
    Cancelled,
    /// A transaction that could not commit: a write inside it changed the
    /// transaction's data and then failed (a partial update whose result
    /// failed validation), so it was aborted at `commit`: nothing it wrote
    /// was applied. Run the whole transaction again, without that write.
    #[error("the transaction was aborted: {reason}")]
    TransactionAborted {
        /// Why.
        reason: String,
    },
    /// The configuration is unusable (an invalid database name, for example).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The cache could not be set up (only an invalid Redis URL does this).
    #[error(transparent)]
    Cache(#[from] earnorm_cache::CacheError),
}

impl Error {
    /// Whether a failed write may still have changed something (a network error
    /// after sending, a bulk write stopped half-way). Validation, id and
    /// serialization errors and duplicate keys are raised before anything is
    /// written.
    pub(crate) fn may_have_written(&self) -> bool {
        match self {
            Error::Validation(_)
            | Error::DuplicateKey { .. }
            | Error::Conflict { .. }
            | Error::Refused(_)
            | Error::InvalidUpdate { .. }
            | Error::Id(_)
            | Error::Serialization(_)
            | Error::Decode { .. }
            | Error::TransactionAborted { .. } => false,
            // Refused by the driver before sending (a document over 16 MiB).
            Error::Mongo(e) => !matches!(e.kind.as_ref(), mongodb::error::ErrorKind::InvalidArgument { .. }),
            _ => true,
        }
    }

    /// A hook's refusal, with its reason (a message, or any error).
    pub fn refused(reason: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error::Refused(reason.into())
    }

    /// Maps a driver error, recognising duplicate-key failures.
    pub(crate) fn from_mongo(model: &'static str, err: mongodb::error::Error) -> Self {
        use mongodb::error::{ErrorKind, WriteFailure};
        let duplicate = match err.kind.as_ref() {
            ErrorKind::Write(WriteFailure::WriteError(we)) if we.code == 11000 => Some(we.message.clone()),
            ErrorKind::InsertMany(e) => e
                .write_errors
                .as_ref()
                .and_then(|errs| errs.iter().find(|we| we.code == 11000))
                .map(|we| we.message.clone()),
            ErrorKind::Command(c) if c.code == 11000 => Some(c.message.clone()),
            _ => None,
        };
        if let Some(message) = duplicate {
            return Error::DuplicateKey { model, message };
        }
        match err.kind.as_ref() {
            ErrorKind::BsonDeserialization(e) => Error::decode(model, e.clone()),
            ErrorKind::Bson(e) if matches!(e.kind, mongodb::bson::error::ErrorKind::Deserialization { .. }) => {
                Error::decode(model, e.clone())
            }
            ErrorKind::BsonSerialization(e) | ErrorKind::Bson(e) => Error::Serialization(e.clone()),
            _ => Error::Mongo(err),
        }
    }

    /// A stored document of `model` that did not decode, naming the field
    /// when the decoder says which.
    pub(crate) fn decode(model: &'static str, source: mongodb::bson::error::Error) -> Self {
        // The decoder names the field as a key, or in serde's own words.
        let field = source.key.clone().or_else(|| {
            let message = source.message.as_deref()?;
            let (_, rest) = message.split_once("missing field `")?;
            rest.split_once('`').map(|(name, _)| name.to_owned())
        });
        Error::Decode {
            model,
            field,
            source: Box::new(source),
        }
    }

    /// This error, naming the field of `document` that does not decode
    /// into `T` when it is a [`Decode`](Error::Decode) that names none yet.
    /// On the error's path only: it decodes `document` again, tracking the
    /// path.
    pub(crate) fn locate<T: serde::de::DeserializeOwned>(self, document: Option<Document>) -> Self {
        match self {
            Error::Decode {
                model,
                field: None,
                source,
            } => Error::Decode {
                model,
                field: document.and_then(undecodable_field::<T>),
                source,
            },
            other => other,
        }
    }
}

/// The path of the first field of `document` that does not decode into
/// `T`, if one does not.
pub(crate) fn undecodable_field<T: serde::de::DeserializeOwned>(document: Document) -> Option<String> {
    let decoder = mongodb::bson::de::Deserializer::new(mongodb::bson::Bson::Document(document));
    let err = serde_path_to_error::deserialize::<_, T>(decoder).err()?;
    let path = err.path().to_string();
    (!path.is_empty() && path != ".").then_some(path)
}

/// ` (field `F`)`, or nothing.
fn at_field(field: Option<&str>) -> String {
    field.map(|field| format!(" (field `{field}`)")).unwrap_or_default()
}

impl From<mongodb::bson::error::Error> for Error {
    fn from(err: mongodb::bson::error::Error) -> Self {
        Error::Serialization(err)
    }
}

/// One field's validation failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's Rust name.
    pub field: &'static str,
    /// The rule that failed: `required`, `email`, `min_length`, `max_length`,
    /// `min`, `max` or `pattern`.
    pub rule: &'static str,
    /// A human-readable message.
    pub message: String,
}

/// Every validation failure of one record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Error)]
pub struct ValidationErrors {
    /// The failures, in field order.
    pub errors: Vec<FieldError>,
}

impl ValidationErrors {
    /// No failures yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a failure.
    pub fn add(&mut self, field: &'static str, rule: &'static str, message: impl Into<String>) {
        self.errors.push(FieldError {
            field,
            rule,
            message: message.into(),
        });
    }

    /// Whether `field` failed `rule`.
    pub fn has(&self, field: &str, rule: &str) -> bool {
        self.errors.iter().any(|e| e.field == field && e.rule == rule)
    }

    /// The names of the failing fields.
    pub fn fields(&self) -> Vec<&'static str> {
        self.errors.iter().map(|e| e.field).collect()
    }

    /// `Ok(())` when nothing failed.
    ///
    /// # Errors
    /// `self` when any rule failed.
    pub fn into_result(self) -> Result<(), ValidationErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "validation failed:")?;
        for (i, e) in self.errors.iter().enumerate() {
            write!(f, "{} {}: {}", if i == 0 { "" } else { ";" }, e.field, e.message)?;
        }
        Ok(())
    }
}
