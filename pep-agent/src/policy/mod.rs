//! The policy file: schema, loading with locations, validation.
//!
//! The YAML format is SPEC's "Policy file". Everything that can be checked
//! without the kernel is checked here, at load, with the offending node's
//! line and column: unknown keys, bad CIDRs and ports, unknown `${var}`s,
//! path patterns the kernel cannot match. A section that is left out does not
//! restrict that kind of action (its default is `allow`, with no rules).
//!
//! Loading is two passes over the text: the first reads only `vars:`, the
//! second the whole policy with those vars (and the sandbox user's home) at
//! hand, so `${var}` may be used before `vars:` appears in the file.

mod de;
mod dns;
mod domain;
mod error;
mod exec;
mod expand;
mod files;
mod net;
mod path;
mod pdp;
mod rule;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_errors;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};

use pep_common::sandbox::{MODE_AUDIT, MODE_ENFORCE};

pub use dns::{DEFAULT_DNS_MAX_TTL_S, DEFAULT_DNS_MIN_TTL_S, DnsSettings};
pub use domain::DomainPattern;
pub use error::{Location, PolicyError};
pub use exec::{ExecRule, ExecSection};
pub use expand::Vars;
pub use files::{Access, FileRule, FileTarget, FilesSection};
pub use net::{NetDefault, NetRule, NetTarget, NetworkSection, PortRange, Protocol, parse_cidr};
pub use path::{FileName, PathPattern};
pub use pdp::{
    DEFAULT_CACHE_TTL_S, DEFAULT_OPA_TIMEOUT_MS, DEFAULT_REGO_QUERY, DEFAULT_STALE_WINDOW_S, Engine,
    OnUnavailable, OpaConfig, PdpConfig, RegoConfig,
};
pub use rule::Verdict;

use de::{checked_map, scalar};
use expand::{ExpandContext, with_context};

/// The only `apiVersion` this build reads.
pub const API_VERSION: &str = "pep/v1";

/// A loaded, validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `name:`; `pep-agent run --name` may override it.
    pub name: Option<String>,
    pub mode: Mode,
    /// `vars:`, already expanded into every value below.
    pub vars: Vars,
    pub network: NetworkSection,
    pub files: FilesSection,
    pub exec: ExecSection,
    pub pdp: PdpConfig,
    revision: String,
}

impl Policy {
    /// `sha256:<hex>` of the file's bytes: the audit record's `policy_revision`.
    pub fn revision(&self) -> &str {
        &self.revision
    }
}

/// `mode:`; `enforce` when omitted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    /// Allow, but record what enforce would deny.
    Audit,
}

impl Mode {
    /// `pep_common::sandbox::MODE_*`.
    pub fn to_kernel(self) -> u32 {
        match self {
            Self::Enforce => MODE_ENFORCE,
            Self::Audit => MODE_AUDIT,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What loading needs to know beyond the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadContext {
    /// The sandbox user's home, what `~` expands to. An empty path makes any
    /// `~` in the policy an error.
    pub home: PathBuf,
    /// Directory that relative `pdp.rego.files` are resolved against.
    /// `None`: the policy file's directory for `load_file`, left relative
    /// (to the working directory) for `load_str`.
    pub base_dir: Option<PathBuf>,
}

impl LoadContext {
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Self {
            home: home.into(),
            base_dir: None,
        }
    }
}

/// Reads and validates the policy at `path`. Errors name `path` as given.
pub fn load_file(path: &Path, ctx: &LoadContext) -> Result<Policy, PolicyError> {
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| PolicyError::Read {
        origin: origin.clone(),
        source,
    })?;
    let text = String::from_utf8(bytes)
        .map_err(|e| PolicyError::invalid(&origin, format!("not valid UTF-8: {e}")))?;
    let mut ctx = ctx.clone();
    if ctx.base_dir.is_none() {
        ctx.base_dir = path.parent().map(Path::to_path_buf);
    }
    load_str(&text, &origin, &ctx)
}

/// Validates a policy given as text; `origin` names it in errors.
pub fn load_str(text: &str, origin: &str, ctx: &LoadContext) -> Result<Policy, PolicyError> {
    if text.trim().is_empty() {
        return Err(PolicyError::invalid(origin, "the policy is empty"));
    }
    let yaml_err = |e: serde_yaml::Error| PolicyError::from_yaml(origin, &e);
    let VarsPass { vars } = serde_yaml::from_str(text).map_err(yaml_err)?;
    let expand = ExpandContext {
        vars: vars.clone(),
        home: (!ctx.home.as_os_str().is_empty()).then(|| ctx.home.clone()),
    };
    let RawPolicy(raw) = with_context(expand, || serde_yaml::from_str(text)).map_err(yaml_err)?;
    let mut pdp = raw.pdp.unwrap_or_default();
    if let (Some(rego), Some(base)) = (pdp.rego.as_mut(), ctx.base_dir.as_deref()) {
        for file in &mut rego.files {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
    }
    Ok(Policy {
        name: raw.name.map(|n| n.0),
        mode: raw.mode.unwrap_or_default(),
        vars,
        network: raw.network.unwrap_or_default(),
        files: raw.files.unwrap_or_default(),
        exec: raw.exec.unwrap_or_default(),
        pdp,
        revision: format!("sha256:{:x}", Sha256::digest(text.as_bytes())),
    })
}

const EXPECTING_POLICY: &str = "a policy: a mapping starting with `apiVersion: pep/v1`";

/// First pass: `vars:` only, every other key skipped.
struct VarsPass {
    vars: Vars,
}

#[derive(Deserialize)]
struct RawVarsPass {
    #[serde(default)]
    vars: Option<Vars>,
}

impl<'de> Deserialize<'de> for VarsPass {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, EXPECTING_POLICY, |raw: RawVarsPass| {
            Ok(Self {
                vars: raw.vars.unwrap_or_default(),
            })
        })
    }
}

/// Second pass: the whole policy.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicyFields {
    #[serde(rename = "apiVersion")]
    _api_version: ApiVersion,
    #[serde(default)]
    name: Option<PolicyName>,
    #[serde(default)]
    mode: Option<Mode>,
    // Already read by the first pass; parsed again only to be skipped.
    #[serde(default)]
    #[serde(rename = "vars")]
    _vars: Option<Vars>,
    #[serde(default)]
    network: Option<NetworkSection>,
    #[serde(default)]
    files: Option<FilesSection>,
    #[serde(default)]
    exec: Option<ExecSection>,
    #[serde(default)]
    pdp: Option<PdpConfig>,
}

/// The whole policy, with `RawPolicyFields`' type errors phrased for users.
struct RawPolicy(RawPolicyFields);

impl<'de> Deserialize<'de> for RawPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, EXPECTING_POLICY, |raw: RawPolicyFields| Ok(Self(raw)))
    }
}

struct ApiVersion;

impl<'de> Deserialize<'de> for ApiVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "`pep/v1`", |text| {
            if text == API_VERSION {
                Ok(Self)
            } else {
                Err(format!(
                    "unsupported apiVersion `{text}`: this pep-agent reads `{API_VERSION}`"
                ))
            }
        })
    }
}

/// `name:`: it names the sandbox in audit records and its cgroup directory.
struct PolicyName(String);

impl<'de> Deserialize<'de> for PolicyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a policy name", |text| {
            let mut chars = text.chars();
            let ok = text.len() <= 64
                && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
                && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if ok {
                Ok(Self(text.to_owned()))
            } else {
                Err(format!(
                    "bad name `{text}`: use up to 64 letters, digits, `-`, `_` and `.`, \
                     starting with a letter or digit"
                ))
            }
        })
    }
}
