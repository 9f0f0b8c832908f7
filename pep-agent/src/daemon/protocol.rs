//! The control protocol: one JSON object per line each way over the unix
//! socket; every request gets exactly one response line.
//!
//! ```text
//! -> {"op":"create","name":"agent-1","policy":"coding-agent","pid":4242}
//! <- {"ok":true,"data":{"name":"agent-1",...}}
//! -> {"op":"delete","name":"nope"}
//! <- {"ok":false,"code":"not_found","error":"no sandbox named nope"}
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Is a daemon there?
    Ping,
    /// Loaded programs, sandboxes, counters.
    Status,
    /// The sandboxes the caller may see (root: all).
    List,
    /// A new sandbox cgroup under `policy` (a name from the config's
    /// `policies`, or, for root, a policy file), optionally placing `pid`.
    Create {
        name: String,
        policy: String,
        #[serde(default)]
        pid: Option<u32>,
        /// `enforce` or `audit`, overriding the policy's.
        #[serde(default)]
        mode: Option<String>,
        /// Delete the sandbox once its last process has exited.
        #[serde(default)]
        ephemeral: bool,
    },
    /// Adopts an existing cgroup (`cgroup`, or the cgroup of `pid`) as a
    /// new sandbox under `policy`; or, when sandbox `name` exists, moves
    /// `pid` into it.
    Attach {
        name: String,
        #[serde(default)]
        policy: Option<String>,
        #[serde(default)]
        cgroup: Option<PathBuf>,
        #[serde(default)]
        pid: Option<u32>,
        #[serde(default)]
        mode: Option<String>,
    },
    /// Removes a sandbox: a cgroup the daemon created is killed and removed;
    /// an adopted one is released (its processes go on, unsandboxed).
    Delete { name: String },
    /// Reads the policies again (one sandbox, or, without `name`, the config
    /// and every sandbox) and replaces them atomically.
    Reload {
        #[serde(default)]
        name: Option<String>,
    },
}

impl Request {
    pub fn op(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Status => "status",
            Request::List => "list",
            Request::Create { .. } => "create",
            Request::Attach { .. } => "attach",
            Request::Delete { .. } => "delete",
            Request::Reload { .. } => "reload",
        }
    }
}

/// Error codes.
pub const BAD_REQUEST: &str = "bad_request";
pub const DENIED: &str = "denied";
pub const NOT_FOUND: &str = "not_found";
pub const EXISTS: &str = "exists";
pub const INVALID_POLICY: &str = "invalid_policy";
pub const FAILED: &str = "failed";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            code: None,
            error: None,
            data,
        }
    }

    pub fn err(code: &str, error: impl Into<String>) -> Self {
        Self {
            ok: false,
            code: Some(code.into()),
            error: Some(error.into()),
            data: serde_json::Value::Null,
        }
    }
}

/// One sandbox as `list` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub name: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub owner_uid: u32,
    pub policy: String,
    pub revision: String,
    pub sandbox_id: u32,
    pub created: bool,
    pub ephemeral: bool,
    pub pids: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        let r: Request =
            serde_json::from_str(r#"{"op":"create","name":"a","policy":"p","pid":5}"#).expect("create");
        assert_eq!(r.op(), "create");
        let line = serde_json::to_string(&r).expect("ser");
        assert_eq!(serde_json::from_str::<Request>(&line).expect("de"), r);
        for bad in [
            r#"{"op":"nope"}"#,
            r#"{"op":"delete"}"#,
            r#"{"op":"delete","name":"a","extra":1}"#,
            r#"{"name":"a"}"#,
            r#"[1,2]"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
