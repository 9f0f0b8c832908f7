//! SPEC's decision query as regorus' input value, built field by field: the
//! same document as `Value::from(query.to_input())` (a test checks), without
//! the JSON document in between.
//!
//! A miss is decided right after the ask thread wakes, with cold caches;
//! every allocation then costs. So the strings that recur from ask to ask
//! (the field names, the actions and protocols, the sandbox, the host, the
//! policy revision) are made once (`Interned`), and each ask clones their
//! reference counts. And the last document made is kept: the next query of
//! the same shape (the same kind of resource) refills it in place, once
//! nothing else holds it (the VM lets its input go after each run), so
//! only the strings that changed (the address, the time) are allocated,
//! not five objects and their keys' storage.

use std::collections::BTreeMap;

use regorus::{Value as V, value::Object};

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
    /// The last document made, and its shape.
    last: Option<(Shape, V)>,
}

/// What a document's fields are: the same for two queries of one shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Net { domain: bool },
    File,
    Exec,
}

impl Shape {
    fn of(q: &Query) -> Self {
        match &q.resource {
            Resource::Net { domain, .. } => Self::Net {
                domain: domain.is_some(),
            },
            Resource::File { .. } => Self::File,
            Resource::Exec { .. } => Self::Exec,
        }
    }
}

/// A subject's labels as an object.
fn labels_value(labels: &BTreeMap<String, String>) -> V {
    V::from(
        labels
            .iter()
            .map(|(k, v)| (V::from(k.as_str()), V::from(v.as_str())))
            .collect::<BTreeMap<V, V>>(),
    )
}

/// A file resource's access list as an array.
fn access_value(access: &[String]) -> V {
    V::from(access.iter().map(|a| V::from(a.as_str())).collect::<Vec<_>>())
}

/// Field `k` of `o` set to `v` (`None`: no such field).
fn put(o: &mut Object, k: &V, v: V) -> Option<()> {
    *o.get_mut(k)? = v;
    Some(())
}

/// Field `k` of `o` set to the string `s`, made only if it differs.
fn put_str(o: &mut Object, k: &V, s: &str) -> Option<()> {
    let slot = o.get_mut(k)?;
    if !matches!(slot, V::String(cur) if **cur == *s) {
        *slot = V::from(s);
    }
    Some(())
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
            last: None,
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

    /// `q` as regorus' input: the last document refilled if `q` has its
    /// shape, else a new one.
    pub fn input(&mut self, q: &Query) -> V {
        let shape = Shape::of(q);
        if let Some((s, mut doc)) = self.last.take()
            && s == shape
            && self.refill(&mut doc, q).is_some()
        {
            self.last = Some((shape, doc.clone()));
            return doc;
        }
        let doc = self.build(q);
        self.last = Some((shape, doc.clone()));
        doc
    }

    /// Sets every field of `doc`, a document of `q`'s shape, from `q`.
    /// Objects still shared (a caller kept the last input) are copied
    /// first, so a document handed out never changes.
    fn refill(&mut self, doc: &mut V, q: &Query) -> Option<()> {
        let s = &q.subject;
        let c = &q.context;
        let sandbox = self.recurring(SANDBOX, &s.sandbox);
        let host = self.recurring(HOST, &c.host);
        let revision = self.recurring(REVISION, &c.policy_revision);
        let action = self.word(&q.action);
        let protocol = match &q.resource {
            Resource::Net { protocol, .. } => Some(self.word(protocol)),
            _ => None,
        };
        let k = &self.k;
        let top = doc.as_object_mut().ok()?;
        put(top, &k.action, action)?;
        let subject = top.get_mut(&k.subject)?.as_object_mut().ok()?;
        put(subject, &k.sandbox, sandbox)?;
        put(subject, &k.pid, V::from(s.pid))?;
        put(subject, &k.uid, V::from(s.uid))?;
        put_str(subject, &k.comm, &s.comm)?;
        match s.exe.as_deref() {
            Some(exe) => put_str(subject, &k.exe, exe)?,
            None => put(subject, &k.exe, V::Null)?,
        }
        let labels = subject.get_mut(&k.labels)?;
        if !(s.labels.is_empty() && labels.as_object().is_ok_and(Object::is_empty)) {
            *labels = labels_value(&s.labels);
        }
        let resource = top.get_mut(&k.resource)?.as_object_mut().ok()?;
        match &q.resource {
            Resource::Net {
                daddr, dport, domain, ..
            } => {
                put_str(resource, &k.daddr, daddr)?;
                put(resource, &k.dport, V::from(u32::from(*dport)))?;
                put(resource, &k.protocol, protocol?)?;
                if let Some(d) = domain {
                    put_str(resource, &k.domain, d)?;
                }
            }
            Resource::File { path, access } => {
                put_str(resource, &k.path, path)?;
                put(resource, &k.access, access_value(access))?;
            }
            Resource::Exec { path } => put_str(resource, &k.path, path)?,
        }
        let context = top.get_mut(&k.context)?.as_object_mut().ok()?;
        put_str(context, &k.time, &c.time)?;
        put(context, &k.host, host)?;
        put(context, &k.policy_revision, revision)?;
        Some(())
    }

    /// `q` as a new document.
    fn build(&mut self, q: &Query) -> V {
        let obj = |fields: Vec<(V, V)>| V::from(fields.into_iter().collect::<BTreeMap<V, V>>());
        let s = &q.subject;
        let sandbox = self.recurring(SANDBOX, &s.sandbox);
        let k = &self.k;
        let subject = obj(vec![
            (k.sandbox.clone(), sandbox),
            (k.pid.clone(), V::from(s.pid)),
            (k.uid.clone(), V::from(s.uid)),
            (k.comm.clone(), V::from(s.comm.as_str())),
            (k.exe.clone(), s.exe.as_deref().map_or(V::Null, V::from)),
            (k.labels.clone(), labels_value(&s.labels)),
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
                (k.access.clone(), access_value(access)),
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
