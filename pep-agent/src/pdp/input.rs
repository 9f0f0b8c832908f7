//! SPEC's decision query as regorus' input value, built field by field: the
//! same document as `Value::from(query.to_input())` (a test checks), without
//! the JSON document in between.
//!
//! A miss is decided right after the ask thread wakes, with cold caches;
//! every allocation then costs. So the strings that recur from ask to ask
//! (the field names, the actions and protocols, the sandbox, the host, the
//! policy revision) are made once (`Interned`), and each ask clones their
//! reference counts; only the per-ask strings (comm, exe, address, time) and
//! the objects are allocated.

use std::collections::BTreeMap;

use regorus::Value as V;

use super::query::{Query, Resource};

/// Field names.
struct Keys {
    subject: V,
    action: V,
    resource: V,
    context: V,
    sandbox: V,
    pid: V,
    uid: V,
    comm: V,
    exe: V,
    labels: V,
    daddr: V,
    dport: V,
    protocol: V,
    domain: V,
    path: V,
    access: V,
    time: V,
    host: V,
    policy_revision: V,
}

/// What the input is built from besides the query: made once per engine.
pub struct Interned {
    k: Keys,
    /// Values every query of a run shares, each with the text it was made
    /// from; replaced when the text differs (a reload).
    recurring: [(String, Option<V>); 3],
    /// Small closed sets: actions, protocols.
    words: Vec<(&'static str, V)>,
}

impl Default for Interned {
    fn default() -> Self {
        let v = |s: &str| V::from(s);
        Self {
            k: Keys {
                subject: v("subject"),
                action: v("action"),
                resource: v("resource"),
                context: v("context"),
                sandbox: v("sandbox"),
                pid: v("pid"),
                uid: v("uid"),
                comm: v("comm"),
                exe: v("exe"),
                labels: v("labels"),
                daddr: v("daddr"),
                dport: v("dport"),
                protocol: v("protocol"),
                domain: v("domain"),
                path: v("path"),
                access: v("access"),
                time: v("time"),
                host: v("host"),
                policy_revision: v("policy_revision"),
            },
            recurring: Default::default(),
            words: [
                "net.connect",
                "net.send",
                "exec",
                "dns.query",
                "file.open",
                "file.write",
                "tcp",
                "udp",
            ]
            .into_iter()
            .map(|w| (w, v(w)))
            .collect(),
        }
    }
}

/// Slots of `Interned::recurring`.
const SANDBOX: usize = 0;
const HOST: usize = 1;
const REVISION: usize = 2;

impl Interned {
    fn recurring(&mut self, slot: usize, text: &str) -> V {
        let (t, v) = &mut self.recurring[slot];
        match v {
            Some(v) if t == text => v.clone(),
            _ => {
                *t = text.to_owned();
                v.insert(V::from(text)).clone()
            }
        }
    }

    fn word(&self, text: &str) -> V {
        self.words
            .iter()
            .find(|(w, _)| *w == text)
            .map_or_else(|| V::from(text), |(_, v)| v.clone())
    }

    /// `q` as regorus' input.
    pub fn input(&mut self, q: &Query) -> V {
        let obj = |fields: Vec<(V, V)>| V::from(fields.into_iter().collect::<BTreeMap<V, V>>());
        let s = &q.subject;
        let labels: BTreeMap<V, V> = s
            .labels
            .iter()
            .map(|(k, v)| (V::from(k.as_str()), V::from(v.as_str())))
            .collect();
        let sandbox = self.recurring(SANDBOX, &s.sandbox);
        let k = &self.k;
        let subject = obj(vec![
            (k.sandbox.clone(), sandbox),
            (k.pid.clone(), V::from(s.pid)),
            (k.uid.clone(), V::from(s.uid)),
            (k.comm.clone(), V::from(s.comm.as_str())),
            (k.exe.clone(), s.exe.as_deref().map_or(V::Null, V::from)),
            (k.labels.clone(), V::from(labels)),
        ]);
        let resource = match &q.resource {
            Resource::Net {
                daddr,
                dport,
                protocol,
                domain,
            } => {
                let mut f = vec![
                    (k.daddr.clone(), V::from(daddr.as_str())),
                    (k.dport.clone(), V::from(u32::from(*dport))),
                    (k.protocol.clone(), self.word(protocol)),
                ];
                if let Some(d) = domain {
                    f.push((k.domain.clone(), V::from(d.as_str())));
                }
                obj(f)
            }
            Resource::File { path, access } => obj(vec![
                (k.path.clone(), V::from(path.as_str())),
                (
                    k.access.clone(),
                    V::from(access.iter().map(|a| V::from(a.as_str())).collect::<Vec<_>>()),
                ),
            ]),
            Resource::Exec { path } => obj(vec![(k.path.clone(), V::from(path.as_str()))]),
        };
        let action = self.word(&q.action);
        let c = &q.context;
        let host = self.recurring(HOST, &c.host);
        let revision = self.recurring(REVISION, &c.policy_revision);
        let k = &self.k;
        let context = obj(vec![
            (k.time.clone(), V::from(c.time.as_str())),
            (k.host.clone(), host),
            (k.policy_revision.clone(), revision),
        ]);
        obj(vec![
            (k.subject.clone(), subject),
            (k.action.clone(), action),
            (k.resource.clone(), resource),
            (k.context.clone(), context),
        ])
    }
}

/// `q` as regorus' input, with nothing made beforehand.
pub fn input_value(q: &Query) -> V {
    Interned::default().input(q)
}
