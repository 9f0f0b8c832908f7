//! The `files:` section: path and file-name rules with read/write access.

use std::fmt;

use serde::{Deserialize, Deserializer};

use super::de::checked_map;
use super::path::{FileName, PathPattern};
use super::rule::{Rule, Verdict};

/// `files:`. A policy without this section does not restrict file access:
/// `default` is `allow` and there are no rules. Within the section, an omitted
/// `default` is `allow` too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilesSection {
    /// For paths that no rule matches.
    pub default: Verdict,
    pub rules: Vec<FileRule>,
}

impl Default for FilesSection {
    fn default() -> Self {
        Self {
            default: Verdict::Allow,
            rules: Vec::new(),
        }
    }
}

/// One `files.rules[i]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRule {
    /// Position in `files.rules`, as audit records name it.
    pub index: usize,
    pub verdict: Verdict,
    pub target: FileTarget,
    pub access: Access,
}

impl FileRule {
    /// `files.rules[i]`, the audit record's `rule` field.
    pub fn name(&self) -> String {
        format!("files.rules[{}]", self.index)
    }
}

/// What a file rule matches on: exactly one of `path` and `name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileTarget {
    Path(PathPattern),
    /// A file name in any directory (SPEC: a `name` deny beats every allow).
    Name(FileName),
}

/// `access:`. An omitted `access` means both read and write; an empty list
/// is an error (a rule that matches nothing is a mistake).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// Opening for read.
    pub read: bool,
    /// Opening for write, create, truncate, unlink, rename (both ends),
    /// mkdir, rmdir, link and symlink.
    pub write: bool,
}

impl Access {
    pub const ALL: Self = Self {
        read: true,
        write: true,
    };
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.read, self.write) {
            (true, true) => f.write_str("read,write"),
            (true, false) => f.write_str("read"),
            (false, true) => f.write_str("write"),
            (false, false) => f.write_str("none"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum AccessKind {
    Read,
    Write,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSection {
    #[serde(default)]
    default: Option<Verdict>,
    #[serde(default)]
    rules: Option<Vec<Rule<FileMatch>>>,
}

impl<'de> Deserialize<'de> for FilesSection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, "the `files` section", |raw: RawSection| {
            Ok(Self {
                default: raw.default.unwrap_or(Verdict::Allow),
                rules: raw
                    .rules
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                    .map(|(index, rule)| FileRule {
                        index,
                        verdict: rule.verdict,
                        target: rule.body.target,
                        access: rule.body.access,
                    })
                    .collect(),
            })
        })
    }
}

struct FileMatch {
    target: FileTarget,
    access: Access,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    path: Option<PathPattern>,
    #[serde(default)]
    name: Option<FileName>,
    #[serde(default)]
    access: Option<Vec<AccessKind>>,
}

impl<'de> Deserialize<'de> for FileMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, "a file rule: `{path|name, access}`", |raw: RawMatch| {
            let target = match (raw.path, raw.name) {
                (Some(path), None) => FileTarget::Path(path),
                (None, Some(name)) => FileTarget::Name(name),
                (None, None) => return Err("a file rule needs `path` or `name`".into()),
                (Some(_), Some(_)) => {
                    return Err("a file rule has either `path` or `name`, not both; write two rules".into());
                }
            };
            let access = match raw.access {
                None => Access::ALL,
                Some(kinds) if kinds.is_empty() => {
                    return Err("`access: []` matches nothing; leave `access` out for read and write".into());
                }
                Some(kinds) => Access {
                    read: kinds.contains(&AccessKind::Read),
                    write: kinds.contains(&AccessKind::Write),
                },
            };
            Ok(Self { target, access })
        })
    }
}
