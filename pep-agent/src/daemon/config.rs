//! The daemon's configuration file, YAML or TOML (by extension: `.toml` is
//! TOML, anything else YAML). Every key is optional; docs/DAEMON.md lists
//! them with their defaults.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

pub const DEFAULT_SOCKET: &str = "/run/pep-agent/agent.sock";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/pep-agent";
pub const DEFAULT_STATE_DIR: &str = "/run/pep-agent";
pub const DEFAULT_AUDIT: &str = "/var/log/pep-agent/audit.jsonl";
pub const DEFAULT_CGROUP_PARENT: &str = "pep-agent.d";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The control socket.
    pub socket: PathBuf,
    /// Permission bits of the control socket: who may connect. Who may do
    /// what is decided per request from the caller's credentials.
    pub socket_mode: u32,
    /// bpffs directory holding the pinned programs, links and maps.
    pub pin_dir: PathBuf,
    /// Where the sandbox list survives a restart (keep it on tmpfs beside
    /// the pins: both end with the boot).
    pub state_dir: PathBuf,
    /// Sandbox cgroups the daemon creates go under `<cgroup2>/<cgroup_parent>/`.
    pub cgroup_parent: PathBuf,
    /// Load the BPF LSM programs (files, exec, self-protection): `auto`
    /// when the kernel allows, `on` required, `off` never.
    pub lsm: LsmMode,
    pub audit: AuditConfig,
    pub metrics: MetricsConfig,
    /// Named policies: name -> policy file.
    pub policies: BTreeMap<String, PathBuf>,
    /// Which users and groups may use which named policies.
    pub grants: Vec<Grant>,
    /// A client that sends nothing for this long is disconnected.
    pub client_timeout_ms: u64,
    /// Longest request line, bytes.
    pub max_request_bytes: usize,
    /// Testing aid: wait this long before loading, so a test can see
    /// `/readyz` answer "not ready". 0 in production.
    pub startup_delay_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LsmMode {
    #[default]
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The audit log (JSON lines); `-` for standard output.
    pub path: String,
    /// Rotate when the file would exceed this many bytes (0: never).
    pub max_bytes: u64,
    /// Rotated files kept.
    pub max_files: u32,
    /// Live stream for `events tail --socket` (none when absent).
    pub socket: Option<PathBuf>,
    /// Fold identical denials of one process within this many ms (0: off).
    pub coalesce_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: DEFAULT_AUDIT.into(),
            max_bytes: 0,
            max_files: 5,
            socket: None,
            coalesce_ms: 0,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` for `/metrics`, `/healthz`, `/readyz`; none: off.
    pub listen: Option<String>,
}

/// Users (names or numeric ids) and groups that may use `policies`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Grant {
    pub users: Vec<String>,
    pub groups: Vec<String>,
    pub policies: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: DEFAULT_SOCKET.into(),
            socket_mode: 0o666,
            pin_dir: DEFAULT_PIN_DIR.into(),
            state_dir: DEFAULT_STATE_DIR.into(),
            cgroup_parent: DEFAULT_CGROUP_PARENT.into(),
            lsm: LsmMode::Auto,
            audit: AuditConfig::default(),
            metrics: MetricsConfig::default(),
            policies: BTreeMap::new(),
            grants: Vec::new(),
            client_timeout_ms: 5000,
            max_request_bytes: 64 << 10,
            startup_delay_ms: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

impl Config {
    /// Reads and checks a config file. Relative policy paths are taken
    /// relative to the config file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("/"));
        for p in cfg.policies.values_mut() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let parse_err = |msg: String| ConfigError::Parse {
            path: path.to_path_buf(),
            msg,
        };
        let cfg: Config = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(text).map_err(|e| parse_err(e.to_string()))?
        } else if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| parse_err(e.to_string()))?
        };
        cfg.check(path)?;
        Ok(cfg)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |msg: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            msg,
        };
        for (i, g) in self.grants.iter().enumerate() {
            for p in &g.policies {
                if !self.policies.contains_key(p) {
                    return Err(invalid(format!(
                        "grants[{i}]: no policy named `{p}` under `policies`"
                    )));
                }
            }
        }
        if self.cgroup_parent.is_absolute() || self.cgroup_parent.as_os_str().is_empty() {
            return Err(invalid("cgroup_parent must be a relative path".into()));
        }
        Ok(())
    }

    /// The named policies granted to a user (by name or uid) or any of its
    /// groups (by name or gid).
    pub fn granted(&self, user: &str, uid: u32, groups: &[(String, u32)]) -> Vec<String> {
        let mut out = Vec::new();
        for g in &self.grants {
            let user_ok = g.users.iter().any(|u| u == user || u.parse::<u32>() == Ok(uid));
            let group_ok = g.groups.iter().any(|want| {
                groups
                    .iter()
                    .any(|(name, gid)| want == name || want.parse::<u32>() == Ok(*gid))
            });
            if user_ok || group_ok {
                out.extend(g.policies.iter().cloned());
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_yaml() {
        let c = Config::parse("", Path::new("c.yaml")).expect("empty is defaults");
        assert_eq!(c.socket, Path::new(DEFAULT_SOCKET));
        let c = Config::parse(
            "socket: /tmp/s\npolicies:\n  agent: /etc/p.yaml\ngrants:\n  - users: [alice, \"1001\"]\n    groups: [dev]\n    policies: [agent]\n",
            Path::new("c.yaml"),
        )
        .expect("yaml");
        assert_eq!(c.granted("alice", 1000, &[]), ["agent"]);
        assert_eq!(c.granted("bob", 1001, &[]), ["agent"]);
        assert_eq!(c.granted("carol", 1002, &[("dev".into(), 50)]), ["agent"]);
        assert!(c.granted("carol", 1002, &[("ops".into(), 51)]).is_empty());
    }

    #[test]
    fn the_packaged_sample_parses() {
        let c = Config::parse(
            include_str!("../../../packaging/daemon.yaml"),
            Path::new("daemon.yaml"),
        )
        .expect("packaging/daemon.yaml");
        assert_eq!(c.socket_mode, 0o666);
        assert_eq!(c.pin_dir, Path::new(DEFAULT_PIN_DIR));
    }

    #[test]
    fn toml_and_errors() {
        let c = Config::parse(
            "socket = \"/tmp/s\"\n[metrics]\nlisten = \"127.0.0.1:9464\"\n[policies]\nagent = \"/p.yaml\"\n",
            Path::new("c.toml"),
        )
        .expect("toml");
        assert_eq!(c.metrics.listen.as_deref(), Some("127.0.0.1:9464"));
        let e = Config::parse("sockett: x\n", Path::new("c.yaml")).expect_err("unknown key");
        assert!(e.to_string().contains("sockett"), "{e}");
        let e = Config::parse("grants:\n  - policies: [nope]\n", Path::new("c.yaml")).expect_err("bad grant");
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
