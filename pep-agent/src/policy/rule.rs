//! The shape every rule list shares: `- allow: {...}` or `- deny: {...}`.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};

use pep_common::event::{VERDICT_ALLOW, VERDICT_DENY};

/// What a rule (or a section's `default`) decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    /// The kernel's `VERDICT_*` value.
    pub fn to_kernel(self) -> u32 {
        match self {
            Self::Allow => VERDICT_ALLOW,
            Self::Deny => VERDICT_DENY,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of a `rules:` list before its section numbers it: a mapping with
/// exactly one key, `allow` or `deny`, whose value is the rule's body `T`.
#[derive(Debug)]
pub(crate) struct Rule<T> {
    pub verdict: Verdict,
    pub body: T,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Rule<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(RuleVisitor(PhantomData))
    }
}

struct RuleVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for RuleVisitor<T> {
    type Value = Rule<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a rule: `allow: {...}` or `deny: {...}`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut rule: Option<Rule<T>> = None;
        while let Some(verdict) = map.next_key_seed(VerdictKey {
            seen: rule.as_ref().map(|r| r.verdict),
        })? {
            let body = map.next_value()?;
            rule = Some(Rule { verdict, body });
        }
        rule.ok_or_else(|| de::Error::custom("a rule needs `allow:` or `deny:`"))
    }
}

/// The key of a rule mapping. It rejects a second verdict key while that key
/// is being visited, so the error points at it.
struct VerdictKey {
    seen: Option<Verdict>,
}

impl<'de> DeserializeSeed<'de> for VerdictKey {
    type Value = Verdict;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Verdict, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for VerdictKey {
    type Value = Verdict;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("`allow` or `deny`")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Verdict, E> {
        let verdict = match v {
            "allow" => Verdict::Allow,
            "deny" => Verdict::Deny,
            other => return Err(E::unknown_field(other, &["allow", "deny"])),
        };
        match self.seen {
            None => Ok(verdict),
            Some(seen) if seen == verdict => Err(E::custom(format!("duplicate `{verdict}`"))),
            Some(_) => Err(E::custom(
                "a rule has both `allow` and `deny`; write them as two rules",
            )),
        }
    }
}
