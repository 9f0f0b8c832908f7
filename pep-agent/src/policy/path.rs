//! Path patterns (`/a/b`, `/a/b/**`) and file names, as the kernel can match them.

use std::fmt;

use serde::{Deserialize, Deserializer};

use super::de::scalar;
use super::expand::{expand_path, expand_vars};

/// Characters that make a glob in other tools. The kernel side matches exact
/// paths and directory prefixes only, so a pattern using them would silently
/// mean something else than written; it is rejected instead.
const GLOB_CHARS: &[char] = &['*', '?', '[', '{'];

/// Longest path the kernel hands a hook (`PATH_MAX`, with its NUL).
const PATH_MAX: usize = 4095;
/// Longest file name (`NAME_MAX`).
const NAME_MAX: usize = 255;

/// A `path:` value after `${var}` and `~` expansion: absolute, normalised
/// (no `.`, `..`, empty components or trailing slash).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PathPattern {
    /// The path, or for a prefix the directory (without the `/**`).
    pub path: String,
    /// `true` for `/a/b/**`: the directory and everything below it.
    pub prefix: bool,
}

impl PathPattern {
    /// Parses an already expanded pattern.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (body, prefix) = match text.strip_suffix("/**") {
            Some(body) => (body, true),
            None => (text, false),
        };
        if body.contains(GLOB_CHARS) {
            return Err(format!(
                "path pattern `{text}` cannot be enforced as written: the kernel matches \
                 exact paths (`/a/b`) and directory prefixes (`/a/b/**`) only"
            ));
        }
        // `/**` leaves an empty body: the root's prefix.
        let absolute = body.starts_with('/') || (prefix && body.is_empty());
        if !absolute {
            return Err(format!(
                "path `{text}` must be absolute (start with `/`, `~/` or a `${{var}}` holding an absolute path)"
            ));
        }
        if body.contains('\0') {
            return Err(format!("path `{text}` contains a NUL byte"));
        }
        let mut parts = Vec::new();
        for part in body.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    return Err(format!(
                        "path `{text}` contains `..`: write the path it resolves to \
                         (paths are matched after the kernel resolves them)"
                    ));
                }
                part => parts.push(part),
            }
        }
        let path = format!("/{}", parts.join("/"));
        if path.len() > PATH_MAX {
            return Err(format!("path `{text}` is longer than {PATH_MAX} bytes"));
        }
        Ok(Self { path, prefix })
    }

    /// Whether `path` (absolute, normalised, as the kernel resolved it) is
    /// matched: equal to an exact pattern, or equal to or below a prefix
    /// pattern's directory.
    pub fn matches(&self, path: &str) -> bool {
        if !self.prefix {
            return path == self.path;
        }
        if self.path == "/" {
            return path.starts_with('/');
        }
        path.strip_prefix(self.path.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.prefix, self.path.as_str()) {
            (true, "/") => f.write_str("/**"),
            (true, path) => write!(f, "{path}/**"),
            (false, path) => f.write_str(path),
        }
    }
}

impl<'de> Deserialize<'de> for PathPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a path: `/a/b` or `/a/b/**`", |text| {
            Self::parse(&expand_path(text)?)
        })
    }
}

/// A `name:` value: one file name, matched in any directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FileName(pub String);

impl FileName {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() || text == "." || text == ".." {
            return Err(format!("`{text}` is not a file name"));
        }
        if text.contains('/') {
            return Err(format!(
                "`name: {text}` must be a plain file name without `/`; use `path:` for paths"
            ));
        }
        if text.contains(GLOB_CHARS) {
            return Err(format!(
                "name pattern `{text}` cannot be enforced as written: the kernel matches \
                 whole file names only"
            ));
        }
        if text.contains('\0') {
            return Err(format!("name `{text}` contains a NUL byte"));
        }
        if text.len() > NAME_MAX {
            return Err(format!("name `{text}` is longer than {NAME_MAX} bytes"));
        }
        Ok(Self(text.to_owned()))
    }
}

impl fmt::Display for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for FileName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a file name", |text| Self::parse(&expand_vars(text)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(text: &str) -> Result<PathPattern, String> {
        PathPattern::parse(text)
    }

    #[test]
    fn exact_and_prefix() {
        assert_eq!(
            pat("/usr/bin/nc").unwrap(),
            PathPattern {
                path: "/usr/bin/nc".into(),
                prefix: false
            }
        );
        assert_eq!(
            pat("/usr/**").unwrap(),
            PathPattern {
                path: "/usr".into(),
                prefix: true
            }
        );
        assert_eq!(
            pat("/**").unwrap(),
            PathPattern {
                path: "/".into(),
                prefix: true
            }
        );
        assert_eq!(
            pat("/").unwrap(),
            PathPattern {
                path: "/".into(),
                prefix: false
            }
        );
        assert_eq!(pat("/usr/**").unwrap().to_string(), "/usr/**");
        assert_eq!(pat("/**").unwrap().to_string(), "/**");
    }

    #[test]
    fn normalises() {
        assert_eq!(pat("/a//b/./c/").unwrap().path, "/a/b/c");
        assert_eq!(
            pat("/a/b//**").unwrap(),
            PathPattern {
                path: "/a/b".into(),
                prefix: true
            }
        );
    }

    #[test]
    fn rejects_what_the_kernel_cannot_match() {
        for bad in [
            "/a/*.txt", "/a/**/b", "/a/b**", "/a/?", "/a/[ab]", "/a/{b,c}", "/a/*/**",
        ] {
            let err = pat(bad).unwrap_err();
            assert!(err.contains("cannot be enforced as written"), "{bad}: {err}");
        }
        assert!(pat("a/b").unwrap_err().contains("must be absolute"));
        assert!(pat("").unwrap_err().contains("must be absolute"));
        assert!(pat("/a/../b").unwrap_err().contains("`..`"));
    }

    #[test]
    fn prefix_matching() {
        let p = pat("/home/u/.ssh/**").unwrap();
        assert!(p.matches("/home/u/.ssh"));
        assert!(p.matches("/home/u/.ssh/id_rsa"));
        assert!(!p.matches("/home/u/.sshx"));
        assert!(pat("/**").unwrap().matches("/etc"));
        assert!(pat("/a").unwrap().matches("/a"));
        assert!(!pat("/a").unwrap().matches("/a/b"));
    }

    #[test]
    fn file_names() {
        assert_eq!(FileName::parse(".env").unwrap().0, ".env");
        assert!(FileName::parse("a/b").unwrap_err().contains("without `/`"));
        assert!(
            FileName::parse("*.pem")
                .unwrap_err()
                .contains("cannot be enforced")
        );
        assert!(FileName::parse("..").is_err());
    }
}
