//! The one error type. Every message names the field and the value that caused it.

use std::fmt;

/// Everything that can go wrong between a person's input and an estimate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A field holds a value outside its allowed range or inconsistent with another field.
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
    /// An enum-like field holds a value that is not one of the allowed ones.
    UnknownValue {
        field: String,
        value: String,
        allowed: &'static [&'static str],
    },
    /// A field the input format does not have.
    UnknownField { field: String },
    /// A field that must be given was not.
    Missing { field: String },
    /// The byte counts for this setup do not fit in 64 bits (or exceed any real device by far).
    TooLarge { what: String },
    /// A file or text could not be read in its format (JSON, nanoGPT config).
    Parse {
        source: String,
        line: Option<usize>,
        message: String,
    },
    /// A combination the estimator does not model (yet), said plainly.
    NotModelled { what: String },
}

impl Error {
    /// An `Invalid` error: "{field} ({value}) {reason}".
    pub fn invalid(field: &str, value: impl fmt::Display, reason: impl Into<String>) -> Error {
        Error::Invalid {
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid {
                field,
                value,
                reason,
            } => write!(f, "{field} ({value}) {reason}"),
            Error::UnknownValue {
                field,
                value,
                allowed,
            } => {
                write!(
                    f,
                    "{field} ({value:?}) is not one of: {}",
                    allowed.join(", ")
                )
            }
            Error::UnknownField { field } => write!(f, "unknown field {field:?}"),
            Error::Missing { field } => write!(f, "missing required field {field:?}"),
            Error::TooLarge { what } => write!(f, "too large to estimate: {what}"),
            Error::Parse {
                source,
                line: Some(line),
                message,
            } => write!(f, "{source}, line {line}: {message}"),
            Error::Parse {
                source,
                line: None,
                message,
            } => write!(f, "{source}: {message}"),
            Error::NotModelled { what } => write!(f, "not modelled: {what}"),
        }
    }
}

impl std::error::Error for Error {}
