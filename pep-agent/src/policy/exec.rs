//! The `exec:` section: which programs may be executed.

use serde::{Deserialize, Deserializer};

use super::de::checked_map;
use super::path::PathPattern;
use super::rule::{Rule, Verdict};

/// `exec:`. A policy without this section does not restrict execution:
/// `default` is `allow` and there are no rules. Within the section, an omitted
/// `default` is `allow` too.
///
/// `default: ask` is `default` deny with `ask` set: what the kernel and
/// every allowlist check see is a deny, and where the default would decide,
/// the PDP's cached verdict decides instead (see docs/PDP.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecSection {
    pub default: Verdict,
    pub rules: Vec<ExecRule>,
    /// `default: ask`.
    pub ask: bool,
}

impl Default for ExecSection {
    fn default() -> Self {
        Self {
            default: Verdict::Allow,
            rules: Vec::new(),
            ask: false,
        }
    }
}

/// `exec.default` as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ExecDefault {
    Allow,
    Deny,
    /// Consult the PDP.
    Ask,
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
    default: Option<ExecDefault>,
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
            let default = raw.default.unwrap_or(ExecDefault::Allow);
            Ok(Self {
                default: match default {
                    ExecDefault::Allow => Verdict::Allow,
                    ExecDefault::Deny | ExecDefault::Ask => Verdict::Deny,
                },
                ask: default == ExecDefault::Ask,
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

#[cfg(test)]
mod tests {
    use super::super::{Engine, LoadContext, load_str};
    use super::*;

    fn load(text: &str) -> Result<super::super::Policy, String> {
        load_str(text, "p.yaml", &LoadContext::new("/home/u")).map_err(|e| e.to_string())
    }

    #[test]
    fn ask_is_a_deny_default_that_asks() {
        // As `network.default: ask`: without a `pdp` section the builtin
        // engine answers, which denies what no rule allows.
        let p = load("apiVersion: pep/v1\nexec:\n  default: ask\n").expect("policy");
        assert!(p.exec.ask);
        assert_eq!(p.exec.default, Verdict::Deny, "the kernel's default under ask");
        assert_eq!(p.pdp.engine, Engine::Builtin);
        assert!(crate::pdp::standalone::asks(&p));
        let p = load("apiVersion: pep/v1\nexec:\n  default: deny\n").expect("policy");
        assert!(!p.exec.ask && !crate::pdp::standalone::asks(&p));
        let err = load("apiVersion: pep/v1\nexec:\n  default: maybe\n").unwrap_err();
        assert!(
            err.starts_with("p.yaml:3:12: ") && err.contains("`allow`, `deny`, `ask`"),
            "{err}"
        );
    }
}
