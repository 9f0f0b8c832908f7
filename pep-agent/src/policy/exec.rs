//! The `exec:` section: which programs may be executed.

use serde::{Deserialize, Deserializer};

use super::de::checked_map;
use super::path::PathPattern;
use super::rule::{Rule, Verdict};

/// `exec:`. A policy without this section does not restrict execution:
/// `default` is `allow` and there are no rules. Within the section, an omitted
/// `default` is `allow` too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecSection {
    pub default: Verdict,
    pub rules: Vec<ExecRule>,
}

impl Default for ExecSection {
    fn default() -> Self {
        Self {
            default: Verdict::Allow,
            rules: Vec::new(),
        }
    }
}

/// One `exec.rules[i]`: the executed file's resolved path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecRule {
    /// Position in `exec.rules`, as audit records name it.
    pub index: usize,
    pub verdict: Verdict,
    pub path: PathPattern,
}

impl ExecRule {
    /// `exec.rules[i]`, the audit record's `rule` field.
    pub fn name(&self) -> String {
        format!("exec.rules[{}]", self.index)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSection {
    #[serde(default)]
    default: Option<Verdict>,
    #[serde(default)]
    rules: Option<Vec<Rule<ExecMatch>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecMatch {
    path: PathPattern,
}

impl<'de> Deserialize<'de> for ExecSection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, "the `exec` section", |raw: RawSection| {
            Ok(Self {
                default: raw.default.unwrap_or(Verdict::Allow),
                rules: raw
                    .rules
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                    .map(|(index, rule)| ExecRule {
                        index,
                        verdict: rule.verdict,
                        path: rule.body.path,
                    })
                    .collect(),
            })
        })
    }
}
