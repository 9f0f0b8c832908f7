//! The `pdp:` section: which Policy Decision Point answers `ask`.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

use super::de::{checked_map, scalar};
use super::expand::{expand_path, expand_vars};

/// The query the Rego engine evaluates when `rego.query` is omitted.
pub const DEFAULT_REGO_QUERY: &str = "data.pep.decision";
/// `opa.timeout_ms` when omitted.
pub const DEFAULT_OPA_TIMEOUT_MS: u64 = 200;
/// `cache_ttl_s` when omitted.
pub const DEFAULT_CACHE_TTL_S: u64 = 60;
/// `stale_window_s` when omitted: how long past its expiry a cached verdict
/// may still be served by `on_unavailable: stale`.
pub const DEFAULT_STALE_WINDOW_S: u64 = 300;
/// The longest `busy_poll_us`: a second of one CPU per miss at most.
pub const MAX_BUSY_POLL_US: u64 = 1_000_000;

/// `pdp:`. Omitted, it is the builtin engine with the defaults below.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PdpConfig {
    pub engine: Engine,
    /// Settings of the `rego` engine; may be given whatever `engine` says.
    pub rego: Option<RegoConfig>,
    /// Settings of the `opa` engine; may be given whatever `engine` says.
    pub opa: Option<OpaConfig>,
    /// How long a PDP answer is cached when the answer gives no `ttl_s`.
    pub cache_ttl_s: u64,
    pub on_unavailable: OnUnavailable,
    /// With `on_unavailable: stale`: how long past its expiry a cached
    /// verdict may still be served while the PDP cannot answer.
    pub stale_window_s: u64,
    /// `rules:`: a query (`data.<package>.<rule>`) whose value, given the
    /// sandbox as input, holds policy sections (`network`, `files`, `exec`)
    /// that replace the file's own (see `crate::pdp::rules`).
    pub rules: Option<String>,
    /// `busy_poll_us`: after each miss, how long the ask thread polls the
    /// kernel's ring by spinning instead of sleeping (0: never; see
    /// `crate::pdp::spin`). It trades a CPU for the wakeup of the next miss.
    pub busy_poll_us: u64,
}

impl Default for PdpConfig {
    fn default() -> Self {
        Self {
            engine: Engine::Builtin,
            rego: None,
            opa: None,
            cache_ttl_s: DEFAULT_CACHE_TTL_S,
            on_unavailable: OnUnavailable::Deny,
            stale_window_s: DEFAULT_STALE_WINDOW_S,
            rules: None,
            busy_poll_us: 0,
        }
    }
}

/// `pdp.engine`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Builtin,
    /// The embedded Rego engine, with `pdp.rego`.
    Rego,
    /// A remote Open Policy Agent, with `pdp.opa`.
    Opa,
}

/// `pdp.on_unavailable`: what to decide when the PDP cannot answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    Deny,
    Allow,
    /// Serve stale cached verdicts, then deny.
    Stale,
}

/// `pdp.rego`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegoConfig {
    /// Rego modules. Relative paths are resolved against the policy file's
    /// directory by `load_file` (or `LoadContext::base_dir`).
    pub files: Vec<PathBuf>,
    /// The rule to evaluate, `data.<package path>.<rule>`.
    pub query: String,
}

/// `pdp.opa`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpaConfig {
    /// The Data API URL of the decision, `http(s)://host:port/v1/data/...`.
    pub url: String,
    pub timeout_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPdp {
    #[serde(default)]
    engine: Option<Engine>,
    #[serde(default)]
    rego: Option<RegoConfig>,
    #[serde(default)]
    opa: Option<OpaConfig>,
    #[serde(default)]
    cache_ttl_s: Option<u64>,
    #[serde(default)]
    on_unavailable: Option<OnUnavailable>,
    #[serde(default)]
    stale_window_s: Option<u64>,
    #[serde(default)]
    rules: Option<RegoQuery>,
    #[serde(default)]
    busy_poll_us: Option<u64>,
}

impl<'de> Deserialize<'de> for PdpConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, "the `pdp` section", |raw: RawPdp| {
            let engine = raw.engine.unwrap_or(Engine::Builtin);
            match engine {
                Engine::Rego if raw.rego.as_ref().is_none_or(|r| r.files.is_empty()) => {
                    return Err("`engine: rego` needs `rego: { files: [...] }`".into());
                }
                Engine::Opa if raw.opa.is_none() => {
                    return Err("`engine: opa` needs `opa: { url: ... }`".into());
                }
                _ => {}
            }
            let busy_poll_us = raw.busy_poll_us.unwrap_or(0);
            if busy_poll_us > MAX_BUSY_POLL_US {
                return Err(format!(
                    "`busy_poll_us: {busy_poll_us}` is more than {MAX_BUSY_POLL_US} (a second of spinning after each miss)"
                ));
            }
            Ok(Self {
                engine,
                rego: raw.rego,
                opa: raw.opa,
                cache_ttl_s: raw.cache_ttl_s.unwrap_or(DEFAULT_CACHE_TTL_S),
                on_unavailable: raw.on_unavailable.unwrap_or(OnUnavailable::Deny),
                stale_window_s: raw.stale_window_s.unwrap_or(DEFAULT_STALE_WINDOW_S),
                rules: raw.rules.map(|q| q.0),
                busy_poll_us,
            })
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRego {
    #[serde(default)]
    files: Option<Vec<RegoFile>>,
    #[serde(default)]
    query: Option<RegoQuery>,
}

impl<'de> Deserialize<'de> for RegoConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, "`rego: { files, query }`", |raw: RawRego| {
            Ok(Self {
                files: raw.files.unwrap_or_default().into_iter().map(|f| f.0).collect(),
                query: raw.query.map_or_else(|| DEFAULT_REGO_QUERY.to_owned(), |q| q.0),
            })
        })
    }
}

struct RegoFile(PathBuf);

impl<'de> Deserialize<'de> for RegoFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a Rego file path", |text| {
            let path = expand_path(text)?;
            if path.is_empty() {
                return Err("empty Rego file path".into());
            }
            Ok(Self(PathBuf::from(path)))
        })
    }
}

struct RegoQuery(String);

impl<'de> Deserialize<'de> for RegoQuery {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a Rego query such as `data.pep.decision`", |text| {
            let query = expand_vars(text)?;
            let ident = |s: &str| {
                let mut chars = s.chars();
                chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            };
            let mut parts = query.split('.');
            if parts.next() == Some("data") && query.contains('.') && parts.all(ident) {
                Ok(Self(query))
            } else {
                Err(format!(
                    "bad Rego query `{query}`: expected `data.<package>.<rule>` such as `{DEFAULT_REGO_QUERY}`"
                ))
            }
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpa {
    url: OpaUrl,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

impl<'de> Deserialize<'de> for OpaConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, "`opa: { url, timeout_ms }`", |raw: RawOpa| {
            let timeout_ms = raw.timeout_ms.unwrap_or(DEFAULT_OPA_TIMEOUT_MS);
            if timeout_ms == 0 {
                return Err("`timeout_ms: 0` would fail every query; give a positive timeout".into());
            }
            Ok(Self {
                url: raw.url.0,
                timeout_ms,
            })
        })
    }
}

struct OpaUrl(String);

impl<'de> Deserialize<'de> for OpaUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "an http(s) URL", |text| {
            let url = expand_vars(text)?;
            let host = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            match host {
                Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(Self(url)),
                _ => Err(format!(
                    "bad OPA URL `{url}`: expected `http://host:port/v1/data/...` or https"
                )),
            }
        })
    }
}
