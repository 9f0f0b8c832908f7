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

    /// The `pdp` object of a `source: cache` decision, from the kernel.
    pub fn annotate(&self, d: &Decision, engine: &str) -> Option<Value> {
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
