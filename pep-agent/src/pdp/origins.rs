//! Which PDP decision each cached verdict came from, so that a `source:
//! cache` record can name it (`pdp: {engine, decision_id, latency_us}`).
//!
//! Network verdicts are remembered by their cache key, which the kernel's
//! record lets userspace rebuild. An exec verdict is keyed in the kernel by
//! the file's inode identity, which the exec record does not carry: it is
//! remembered by sandbox and path, so a hit through another name (a hard
//! link) says `pdp: {engine}` only.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use pep_common::{ask::VerdictKey, event::NET_OP_CONNECT};
use serde_json::{Value, json};

use super::cache::net_key;
use crate::audit::decode::{Decision, NetOp, Source};

/// What a cached verdict is remembered by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OriginKey {
    Net(VerdictKey),
    /// Sandbox id and the executed file's path.
    Exec(u32, String),
}

/// The decision a cached verdict came from. Kept as plain fields: it is
/// stored on the way to writing the verdict, and made into the record's
/// `pdp` object only when a hit is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub engine: &'static str,
    pub decision_id: Option<String>,
    pub latency_us: u64,
}

impl Origin {
    fn to_json(&self) -> Value {
        json!({"engine": self.engine, "decision_id": self.decision_id, "latency_us": self.latency_us})
    }
}

/// What cache-hit records need from the PDP task: the decision each cached
/// verdict came from.
#[derive(Clone, Default)]
pub struct CacheOrigins {
    inner: Arc<Mutex<HashMap<OriginKey, Origin>>>,
    /// The engine of each sandbox id: what a hit whose origin is not
    /// remembered says.
    engines: Arc<Mutex<HashMap<u32, &'static str>>>,
}

/// Most origins remembered (the kernel cache holds 65536 entries; a record
/// for an older one says `pdp: {engine}` only).
const MAX_ORIGINS: usize = 65536;

impl CacheOrigins {
    pub fn insert(&self, key: OriginKey, v: Origin) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_ORIGINS {
            m.clear();
        }
        m.insert(key, v);
    }

    /// Sandbox id `id` asks `engine`.
    pub fn set_engine(&self, id: u32, engine: &'static str) {
        self.engines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, engine);
    }

    /// A new generation `to` serves the verdicts of `from`
    /// (`AskMaps::carry`): their origins go with them.
    pub fn carry(&self, from: u32, to: u32) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let moved: Vec<(OriginKey, Origin)> = m
            .iter()
            .filter_map(|(k, v)| {
                let k = match k {
                    OriginKey::Net(key) if key.sandbox_id == from => OriginKey::Net(VerdictKey {
                        sandbox_id: to,
                        ..*key
                    }),
                    OriginKey::Exec(id, path) if *id == from => OriginKey::Exec(to, path.clone()),
                    _ => return None,
                };
                Some((k, v.clone()))
            })
            .collect();
        m.extend(moved);
    }

    /// The `pdp` object of a `source: cache` decision, from the kernel.
    pub fn annotate(&self, d: &Decision) -> Option<Value> {
        let engine = self
            .engines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&d.header().sandbox_id)
            .copied()
            .unwrap_or("unknown");
        let key = match d {
            Decision::Net {
                header,
                op,
                protocol,
                daddr,
                dport,
            } if header.source == Source::Cache => {
                let op = match op {
                    NetOp::Connect => NET_OP_CONNECT,
                    NetOp::Send => pep_common::event::NET_OP_SENDMSG,
                };
                OriginKey::Net(net_key(header.sandbox_id, op, *daddr, *dport, *protocol))
            }
            Decision::Exec {
                header,
                path: Some(path),
                ..
            } if header.source == Source::Cache => OriginKey::Exec(header.sandbox_id, path.clone()),
            Decision::Exec { header, .. } if header.source == Source::Cache => {
                return Some(json!({ "engine": engine }));
            }
            _ => return None,
        };
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Some(
            m.get(&key)
                .map_or_else(|| json!({ "engine": engine }), Origin::to_json),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::decode::{Header, Mode, Verdict};

    fn hit(sandbox_id: u32, dport: u16) -> Decision {
        Decision::Net {
            header: Header {
                verdict: Verdict::Allow,
                mode: Mode::Enforce,
                source: Source::Cache,
                rule_idx: None,
                sandbox_id,
                ts_boot_ns: 1,
                cgroup_id: 1,
                pid: 2,
                tid: 2,
                ppid: 1,
                uid: 0,
                gid: 0,
                comm: "curl".into(),
                start_ns: 3,
                exe: Default::default(),
                ancestors: vec![],
            },
            op: NetOp::Connect,
            protocol: 6,
            daddr: "127.0.0.1".parse().expect("ip"),
            dport,
        }
    }

    #[test]
    fn a_hit_names_its_decision_and_its_sandboxs_engine_and_carried_origins_follow() {
        let o = CacheOrigins::default();
        o.set_engine(7, "opa");
        o.set_engine(8, "rego");
        let key = net_key(7, NET_OP_CONNECT, "127.0.0.1".parse().expect("ip"), 443, 6);
        o.insert(
            OriginKey::Net(key),
            Origin {
                engine: "opa",
                decision_id: Some("d-1".into()),
                latency_us: 42,
            },
        );
        let named = json!({"engine": "opa", "decision_id": "d-1", "latency_us": 42});
        assert_eq!(o.annotate(&hit(7, 443)), Some(named.clone()));
        // Not remembered: the sandbox's own engine, or "unknown".
        assert_eq!(o.annotate(&hit(7, 80)), Some(json!({"engine": "opa"})));
        assert_eq!(o.annotate(&hit(8, 443)), Some(json!({"engine": "rego"})));
        assert_eq!(o.annotate(&hit(9, 443)), Some(json!({"engine": "unknown"})));
        // A new generation (8) that kept 7's verdicts names their decisions.
        o.carry(7, 8);
        assert_eq!(o.annotate(&hit(8, 443)), Some(named.clone()));
        assert_eq!(o.annotate(&hit(7, 443)), Some(named), "the old one keeps its own");
        let mut not_cache = hit(8, 443);
        if let Decision::Net { header, .. } = &mut not_cache {
            header.source = Source::Pdp;
        }
        assert_eq!(o.annotate(&not_cache), None, "only cache hits are annotated");
    }
}
