//! Exit codes: 0 ok, 1 miss, 2 bad usage or configuration, 3 storage error.

use std::fmt;
use std::process::ExitCode;

/// A command's failure and the exit code it maps to.
#[derive(Debug)]
pub(crate) struct CliError {
    pub(crate) code: u8,
    pub(crate) message: String,
}

pub(crate) type CliResult<T> = Result<T, CliError>;

impl CliError {
    pub(crate) fn miss(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }

    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }

    pub(crate) fn config(err: impl fmt::Display) -> Self {
        Self::usage(err.to_string())
    }

    pub(crate) fn storage(err: impl fmt::Display) -> Self {
        Self {
            code: 3,
            message: err.to_string(),
        }
    }

    /// Adapter errors: configuration problems are usage errors, the rest storage errors.
    pub(crate) fn from_adapter(err: kv_l2_adapter::Error) -> Self {
        match err {
            kv_l2_adapter::Error::Config(inner) => Self::config(inner),
            kv_l2_adapter::Error::Registry(message) => Self::usage(message),
            other => Self::storage(other),
        }
    }

    pub(crate) fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code)
    }
}

impl From<std::io::Error> for CliError {
    fn from(err: std::io::Error) -> Self {
        Self::storage(err)
    }
}
