//! `PolicyError`: every way loading a policy can fail, with the node's location.

use std::fmt;
use std::io;

/// A 1-based position in the policy file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Why a policy could not be loaded.
///
/// Displays as `FILE:LINE:COL: message` when the offending node is known and
/// `FILE: message` otherwise: the format `policy check` prints (SPEC).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{origin}: cannot read policy: {source}")]
    Read {
        origin: String,
        #[source]
        source: io::Error,
    },
    /// The text is not a valid policy.
    #[error("{}", located(origin, *location, message))]
    Invalid {
        origin: String,
        location: Option<Location>,
        message: String,
    },
}

fn located(origin: &str, location: Option<Location>, message: &str) -> String {
    match location {
        Some(loc) => format!("{origin}:{loc}: {message}"),
        None => format!("{origin}: {message}"),
    }
}

impl PolicyError {
    /// Where the policy came from (a path, or whatever `load_str` was given).
    pub fn origin(&self) -> &str {
        match self {
            Self::Read { origin, .. } | Self::Invalid { origin, .. } => origin,
        }
    }

    /// The offending node's position, when known.
    pub fn location(&self) -> Option<Location> {
        match self {
            Self::Read { .. } => None,
            Self::Invalid { location, .. } => *location,
        }
    }

    pub(crate) fn invalid(origin: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            origin: origin.to_owned(),
            location: None,
            message: message.into(),
        }
    }

    /// Converts serde_yaml's error, moving its position out of the message
    /// (where serde_yaml appends ` at line L column C`) into `location`.
    pub(crate) fn from_yaml(origin: &str, err: &serde_yaml::Error) -> Self {
        let text = err.to_string();
        let location = err.location().map(|l| Location {
            line: l.line(),
            column: l.column(),
        });
        let message = match location {
            Some(loc) => {
                let suffix = format!(" at line {} column {}", loc.line, loc.column);
                // libyaml's syntax errors may go on after the position
                // (", while parsing ..."), so remove the first occurrence
                // rather than only a trailing one.
                match text.find(&suffix) {
                    Some(at) => format!("{}{}", &text[..at], &text[at + suffix.len()..]),
                    None => text,
                }
            }
            None => text,
        };
        Self::Invalid {
            origin: origin.to_owned(),
            location,
            message,
        }
    }
}
