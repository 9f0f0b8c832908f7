//! SPEC's decision query: the `input` the PEP sends to the PDP (and gives
//! the embedded engines unchanged).

use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

/// `input.subject`: who acts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subject {
    pub sandbox: String,
    pub pid: u32,
    pub uid: u32,
    pub comm: String,
    /// `/proc/<pid>/exe` when it could be read.
    pub exe: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// `input.resource`: what is acted on; its fields depend on the action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Resource {
    Net {
        daddr: String,
        dport: u16,
        protocol: String,
        /// The name the address was resolved from, when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        domain: Option<String>,
    },
    File {
        path: String,
        access: Vec<String>,
    },
    Exec {
        path: String,
    },
}

impl Resource {
    /// A network resource; `protocol` is the IP protocol number.
    pub fn net(daddr: IpAddr, dport: u16, protocol: u8) -> Self {
        Self::Net {
            daddr: daddr.to_string(),
            dport,
            protocol: protocol_name(protocol),
            domain: None,
        }
    }
}

/// `input.context`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Context {
    /// RFC 3339, UTC.
    pub time: String,
    pub host: String,
    pub policy_revision: String,
}

impl Context {
    /// Now, on this host, under `policy_revision`.
    pub fn now(policy_revision: &str) -> Self {
        Self {
            time: crate::audit::clock::rfc3339(time::OffsetDateTime::now_utc()),
            host: hostname(),
            policy_revision: policy_revision.to_owned(),
        }
    }
}

/// The whole query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Query {
    pub subject: Subject,
    /// `net.connect`, `net.send`, `dns.query`, `file.open`, `file.write`, `exec`.
    pub action: String,
    pub resource: Resource,
    pub context: Context,
}

impl Query {
    /// The JSON `input`.
    pub fn to_input(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a query always serializes")
    }
}

/// The host name, cached: it is asked for on every query.
pub fn hostname() -> String {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let mut buf = [0u8; 256];
        // SAFETY: a buffer we own, of its length; the result is NUL-terminated
        // unless truncated, which the search below tolerates.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        match rc {
            0 if end > 0 => String::from_utf8_lossy(&buf[..end]).into_owned(),
            _ => "localhost".into(),
        }
    })
    .clone()
}

pub fn protocol_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn input_has_spec_shape() {
        let q = Query {
            subject: Subject {
                sandbox: "agent-1".into(),
                pid: 4242,
                uid: 1000,
                comm: "curl".into(),
                exe: Some("/usr/bin/curl".into()),
                labels: BTreeMap::new(),
            },
            action: "net.connect".into(),
            resource: Resource::net("203.0.113.7".parse().unwrap(), 443, 6),
            context: Context {
                time: "2026-11-25T16:20:20Z".into(),
                host: "node-1".into(),
                policy_revision: "sha256:ab".into(),
            },
        };
        assert_eq!(
            q.to_input(),
            json!({
                "subject": {"sandbox": "agent-1", "pid": 4242, "uid": 1000, "comm": "curl",
                            "exe": "/usr/bin/curl", "labels": {}},
                "action": "net.connect",
                "resource": {"daddr": "203.0.113.7", "dport": 443, "protocol": "tcp"},
                "context": {"time": "2026-11-25T16:20:20Z", "host": "node-1", "policy_revision": "sha256:ab"}
            })
        );
        let v6 = Resource::net("::1".parse().unwrap(), 80, 17);
        assert_eq!(
            serde_json::to_value(v6).unwrap(),
            json!({"daddr": "::1", "dport": 80, "protocol": "udp"})
        );
        assert_eq!(
            serde_json::to_value(Resource::File {
                path: "/etc/passwd".into(),
                access: vec!["read".into()]
            })
            .unwrap(),
            json!({"path": "/etc/passwd", "access": ["read"]})
        );
    }
}
