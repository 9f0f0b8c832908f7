//! Domain patterns for `network.rules[].domain`: `api.example.com` or `*.example.com`.

use std::fmt;

use serde::{Deserialize, Deserializer};

use super::de::scalar;
use super::expand::expand_vars;

/// A domain name, lower-cased and without a trailing dot, optionally with a
/// leading `*.` wildcard.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DomainPattern {
    /// `true` for `*.suffix`.
    pub wildcard: bool,
    /// The name, or for a wildcard the part after `*.`.
    pub suffix: String,
}

impl DomainPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let lower = text.trim().to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        let (wildcard, suffix) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, name),
        };
        if suffix.contains('*') || name == "*" {
            return Err(format!(
                "domain pattern `{text}` cannot be enforced as written: only a leading `*.` \
                 wildcard is supported (e.g. `*.example.com`)"
            ));
        }
        if suffix.is_empty() || suffix.len() > 253 {
            return Err(format!("`{text}` is not a domain name"));
        }
        for label in suffix.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(format!("`{text}` is not a domain name (bad label `{label}`)"));
            }
        }
        Ok(Self {
            wildcard,
            suffix: suffix.to_owned(),
        })
    }

    /// Whether a DNS name (any case, trailing dot or not) is matched. A
    /// wildcard matches names with one or more labels in front of its suffix,
    /// not the suffix itself: `*.github.com` matches `api.github.com` and
    /// `a.b.github.com`, not `github.com`.
    pub fn matches(&self, name: &str) -> bool {
        let lower = name.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        if !self.wildcard {
            return name == self.suffix;
        }
        name.strip_suffix(self.suffix.as_str())
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|head| !head.is_empty())
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.suffix)
        } else {
            f.write_str(&self.suffix)
        }
    }
}

impl<'de> Deserialize<'de> for DomainPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(
            d,
            "a domain name such as `api.example.com` or `*.example.com`",
            |text| Self::parse(&expand_vars(text)?),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches() {
        let w = DomainPattern::parse("*.GitHub.com.").unwrap();
        assert_eq!(w.to_string(), "*.github.com");
        assert!(w.matches("api.github.com"));
        assert!(w.matches("A.B.github.com."));
        assert!(!w.matches("github.com"));
        assert!(!w.matches("evilgithub.com"));
        let e = DomainPattern::parse("api.example.com").unwrap();
        assert!(e.matches("API.example.com"));
        assert!(!e.matches("x.api.example.com"));
    }

    #[test]
    fn rejects() {
        for bad in ["*", "api.*.com", "*github.com", "a..b", "", "a b.com", "*."] {
            assert!(DomainPattern::parse(bad).is_err(), "{bad}");
        }
        assert!(
            DomainPattern::parse("api.*.com")
                .unwrap_err()
                .contains("cannot be enforced as written")
        );
    }
}
