//! The `rego` engine: Rego modules evaluated in-process by `regorus`.
//!
//! Loading parses every module, so invalid Rego is rejected at `policy
//! check` and at load, with regorus' `file:line:col` message. The decision
//! rule is then compiled to regorus' bytecode VM where it can be
//! (`compiled`): decisions run there, the interpreter stays the reference.

use std::{path::Path, sync::Mutex};

use serde_json::Value;

use super::{
    DecideFuture, Pdp, PdpDecision, PdpError,
    answer::parse_result,
    compiled::{self, Compiled},
    input::Interned,
    new_decision_id,
    query::Query,
};

/// Invalid Rego, or a query that is not a rule of the loaded modules.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RegoError(pub String);

/// Loaded Rego modules and the rule that decides.
pub struct Rego {
    /// regorus evaluates with `&mut self`; one evaluation at a time (each
    /// takes microseconds).
    engine: Mutex<Inner>,
    query: String,
}

struct Inner {
    engine: regorus::Engine,
    /// `query` on the VM, if it compiles there and agrees with `engine`.
    compiled: Option<Compiled>,
    /// What `decide_now` builds its input from.
    input: Interned,
}

impl Inner {
    /// `query`'s value for `input`: on the VM if `query` is the rule it
    /// runs and it answers, else by the interpreter.
    fn eval(&mut self, query: &str, rule: &str, input: regorus::Value) -> Result<regorus::Value, RegoError> {
        if query == rule
            && let Some(c) = &mut self.compiled
            && let Some(v) = c.run(input.clone())
        {
            return Ok(v);
        }
        eval_value(&mut self.engine, query, input)
    }
}

impl Rego {
    /// Loads `files` (Rego v1 syntax, as OPA 1.x) to answer `query`
    /// (`data.<package>.<rule>`).
    pub fn load(files: &[impl AsRef<Path>], query: &str) -> Result<Self, RegoError> {
        let mut engine = load_engine(files)?;
        let compiled = match Compiled::new(&mut engine, query, &compiled::probes("probe", "")) {
            Ok(c) => {
                tracing::info!("rego: `{query}` runs on regorus' VM");
                Some(c)
            }
            Err(e @ (compiled::NotCompiled::Unsupported(_) | compiled::NotCompiled::MayDiffer(_))) => {
                tracing::info!("rego: `{query}` is evaluated by the interpreter: {e}");
                None
            }
            Err(e) => {
                tracing::warn!("rego: `{query}` is evaluated by the interpreter: {e}");
                None
            }
        };
        Ok(Self {
            engine: Mutex::new(Inner {
                engine,
                compiled,
                input: Interned::default(),
            }),
            query: query.to_owned(),
        })
    }

    /// `query`'s value for `input`; `None` when undefined.
    pub fn eval(&self, query: &str, input: &Value) -> Result<Option<Value>, RegoError> {
        let mut inner = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        let value = inner.eval(query, &self.query, regorus::Value::from(input.clone()))?;
        defined_json(query, &value)
    }

    /// This engine with every decision made by the interpreter, the
    /// reference the VM is checked against (what the VM gains is measured
    /// against it).
    pub fn interpreter_only(self) -> Self {
        let mut inner = self.engine.into_inner().unwrap_or_else(|e| e.into_inner());
        inner.compiled = None;
        Self {
            engine: Mutex::new(inner),
            query: self.query,
        }
    }

    /// Whether decisions run on regorus' VM (else on its interpreter).
    pub fn compiled(&self) -> bool {
        self.engine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .compiled
            .is_some()
    }

    pub fn query(&self) -> &str {
        &self.query
    }
}

/// A regorus engine with `files` loaded.
pub fn load_engine(files: &[impl AsRef<Path>]) -> Result<regorus::Engine, RegoError> {
    let mut engine = regorus::Engine::new();
    for f in files {
        let f = f.as_ref();
        engine
            .add_policy_from_file(f)
            .map_err(|e| RegoError(one_line(&format!("{e:#}"), &f.display().to_string())))?;
    }
    if files.is_empty() {
        return Err(RegoError("no Rego files given".into()));
    }
    Ok(engine)
}

/// regorus' multi-line diagnostic (`--> file:L:C`, a source excerpt,
/// `error: message`) as one `file:L:C: invalid Rego: message` line, the
/// format `policy check` prints.
fn one_line(diag: &str, file: &str) -> String {
    let loc = diag
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("-->"))
        .map(str::trim);
    let msg = diag
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("error:"))
        .map(str::trim);
    match (loc, msg) {
        (Some(loc), Some(msg)) => format!("{loc}: invalid Rego: {msg}"),
        _ => format!(
            "{file}: invalid Rego: {}",
            diag.split_whitespace().collect::<Vec<_>>().join(" ")
        ),
    }
}

/// Evaluates `query` (a rule path such as `data.pep.decision`, or any other
/// reference into `data`) against `input`. `None`: undefined.
pub fn eval_in(engine: &mut regorus::Engine, query: &str, input: &Value) -> Result<Option<Value>, RegoError> {
    let value = eval_value(engine, query, regorus::Value::from(input.clone()))?;
    defined_json(query, &value)
}

/// `value` as JSON; `None` when undefined.
fn defined_json(query: &str, value: &regorus::Value) -> Result<Option<Value>, RegoError> {
    if *value == regorus::Value::Undefined {
        return Ok(None);
    }
    to_json(query, value).map(Some)
}

/// `eval_in` on an input already in regorus' form; the value as regorus
/// gives it (`Undefined` when undefined).
fn eval_value(
    engine: &mut regorus::Engine,
    query: &str,
    input: regorus::Value,
) -> Result<regorus::Value, RegoError> {
    engine.set_input(input);
    match engine.eval_rule(query.to_owned()) {
        Ok(v) => Ok(v),
        // Not a rule (e.g. a package, `data.pep`): evaluate it as a query,
        // which is what OPA's Data API does for any path.
        Err(rule_err) => {
            let results = engine
                .eval_query(query.to_owned(), false)
                .map_err(|e| RegoError(format!("evaluating `{query}`: {rule_err:#}; as a query: {e:#}")))?;
            Ok(match results.result.first().and_then(|r| r.expressions.first()) {
                Some(expr) => expr.value.clone(),
                None => regorus::Value::Undefined,
            })
        }
    }
}

fn to_json(query: &str, value: &regorus::Value) -> Result<Value, RegoError> {
    serde_json::to_value(value)
        .map_err(|e| RegoError(format!("`{query}` gave a value that is not JSON: {e}")))
}

/// The answer in `value` (a boolean needs no JSON).
fn answer_of(query: &str, value: &regorus::Value) -> Result<super::Answer, RegoError> {
    Ok(match value {
        regorus::Value::Undefined => parse_result(None),
        regorus::Value::Bool(b) => parse_result(Some(&Value::Bool(*b))),
        v => parse_result(Some(&to_json(query, v)?)),
    })
}

impl Pdp for Rego {
    fn engine(&self) -> &'static str {
        "rego"
    }

    fn decide<'a>(&'a self, input: &'a Value) -> DecideFuture<'a> {
        Box::pin(async move {
            let result = self
                .eval(&self.query, input)
                .map_err(|e| PdpError::Eval(e.to_string()))?;
            Ok(PdpDecision {
                answer: parse_result(result.as_ref()),
                decision_id: Some(new_decision_id()),
            })
        })
    }

    fn decide_now(&self, query: &Query) -> Option<Result<PdpDecision, PdpError>> {
        let mut inner = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        let input = inner.input.input(query);
        let value = inner.eval(&self.query, &self.query, input);
        drop(inner);
        Some(
            value
                .and_then(|v| answer_of(&self.query, &v))
                .map(|answer| PdpDecision {
                    answer,
                    decision_id: Some(new_decision_id()),
                })
                .map_err(|e| PdpError::Eval(e.to_string())),
        )
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::pdp::{input::input_value, query::Resource};

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[tokio::test]
    async fn decides_with_each_shape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = write(
            dir.path(),
            "p.rego",
            "package pep\n\
             default decision := false\n\
             decision if input.resource.dport == 443\n\
             obj := {\"allow\": true, \"ttl_s\": 7, \"reason\": \"r\"} if input.resource.dport == 80\n\
             weird := \"yes\"\n",
        );
        let r = Rego::load(&[&f], "data.pep.decision").expect("load");
        let input = |port: u16| json!({"action": "net.connect", "resource": {"dport": port}});
        assert!(r.decide(&input(443)).await.unwrap().answer.allow);
        assert!(!r.decide(&input(22)).await.unwrap().answer.allow);
        let obj = Rego::load(&[&f], "data.pep.obj").expect("load");
        let a = obj.decide(&input(80)).await.unwrap().answer;
        assert_eq!((a.allow, a.ttl_s), (true, Some(7)));
        // Undefined: deny, and says so.
        let a = obj.decide(&input(81)).await.unwrap().answer;
        assert!(!a.allow && a.error.is_some());
        let weird = Rego::load(&[&f], "data.pep.weird").expect("load");
        let a = weird.decide(&input(1)).await.unwrap().answer;
        assert!(!a.allow && a.error.unwrap().contains("string"));
        // A package path is evaluated as OPA would: the package's document.
        let pkg = r.eval("data.pep", &input(443)).expect("eval").expect("defined");
        assert_eq!(pkg["decision"], json!(true));
    }

    #[tokio::test]
    async fn the_query_struct_is_the_same_input_as_its_json() {
        use crate::pdp::query::{Context, Subject};
        let q = |exe: Option<&str>, resource: Resource| Query {
            subject: Subject {
                sandbox: "s".into(),
                pid: 42,
                uid: 1000,
                comm: "curl".into(),
                exe: exe.map(Into::into),
                labels: [("team".to_string(), "a".to_string())].into(),
            },
            action: "net.connect".into(),
            resource,
            context: Context {
                time: "2026-11-25T16:20:20Z".into(),
                host: "h".into(),
                policy_revision: "sha256:x".into(),
            },
        };
        let queries = [
            q(
                Some("/usr/bin/curl"),
                Resource::net("::1".parse().unwrap(), 443, 6),
            ),
            q(
                None,
                Resource::Net {
                    daddr: "192.0.2.1".into(),
                    dport: 53,
                    protocol: "udp".into(),
                    domain: Some("example.com".into()),
                },
            ),
            q(
                None,
                Resource::File {
                    path: "/etc/x".into(),
                    access: vec!["read".into(), "write".into()],
                },
            ),
            q(
                None,
                Resource::Exec {
                    path: "/bin/sh".into(),
                },
            ),
        ];
        // Fresh, and from one `Interned` reused across queries, as the ask
        // thread does; then with the recurring strings changed (a reload).
        // Queries of one shape in a row refill the last document in place:
        // each field must change, and no document handed out may.
        let mut interned = crate::pdp::input::Interned::default();
        let mut reloaded = queries[0].clone();
        reloaded.subject.sandbox = "other".into();
        reloaded.context.host = "h2".into();
        reloaded.context.policy_revision = "sha256:y".into();
        let mut next = reloaded.clone();
        next.subject.pid = 7;
        next.subject.uid = 0;
        next.subject.comm = "wget".into();
        next.subject.exe = None;
        next.subject.labels.clear();
        next.resource = Resource::net("192.0.2.9".parse().unwrap(), 8443, 17);
        next.action = "net.send".into();
        next.context.time = "2026-11-25T16:20:21Z".into();
        let mut handed = Vec::new();
        for query in queries
            .iter()
            .chain([&reloaded, &next, &next, &queries[1], &queries[1]])
        {
            let json = regorus::Value::from(query.to_input());
            assert_eq!(input_value(query), json, "{query:?}");
            let doc = interned.input(query);
            assert_eq!(doc, json, "{query:?}");
            handed.push((doc, json));
        }
        for (doc, json) in &handed {
            assert_eq!(doc, json, "a document handed out changed");
        }
        drop(handed);
        // And once nothing else holds the last one.
        let again = interned.input(&next);
        assert_eq!(again, regorus::Value::from(next.to_input()));
        // And decides alike: inline and through the JSON document.
        let dir = tempfile::tempdir().expect("tempdir");
        let f = write(
            dir.path(),
            "p.rego",
            "package pep\n\
             default decision := false\n\
             decision := {\"allow\": true, \"ttl_s\": 9} if {\n\
               input.subject.labels.team == \"a\"\n\
               input.resource.dport == 443\n\
               input.subject.exe == \"/usr/bin/curl\"\n\
             }\n",
        );
        let r = Rego::load(&[&f], "data.pep.decision").expect("load");
        for query in &queries {
            let now = r.decide_now(query).expect("embedded").expect("decides").answer;
            let via_json = r.decide(&query.to_input()).await.expect("decides").answer;
            assert_eq!(now, via_json, "{query:?}");
        }
        assert!(r.decide_now(&queries[0]).unwrap().unwrap().answer.allow);
        assert_eq!(r.decide_now(&queries[0]).unwrap().unwrap().answer.ttl_s, Some(9));
    }

    #[test]
    fn decisions_run_on_the_vm_where_it_compiles_and_else_on_the_interpreter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let load = |name: &str, text: &str| {
            Rego::load(&[write(dir.path(), name, text)], "data.pep.decision").expect("load")
        };
        let mut q = crate::pdp::query::Query {
            subject: crate::pdp::query::Subject {
                sandbox: "s".into(),
                pid: 1,
                uid: 0,
                comm: "c".into(),
                exe: None,
                labels: Default::default(),
            },
            action: "net.connect".into(),
            resource: Resource::net("::1".parse().unwrap(), 443, 6),
            context: crate::pdp::query::Context::now("r"),
        };
        let allow = |r: &Rego, q: &Query| r.decide_now(q).unwrap().map(|d| d.answer.allow);
        let vm = load(
            "vm.rego",
            "package pep\ndefault decision := false\ndecision if input.resource.dport == 443\n",
        );
        assert!(vm.compiled());
        // `with` is not compiled: the interpreter decides, alike.
        let interp = load(
            "with.rego",
            "package pep\nport := input.resource.dport\ndefault decision := false\n\
             decision if { port == 443 with input.resource.dport as input.resource.dport }\n",
        );
        assert!(!interp.compiled());
        for r in [&vm, &interp] {
            assert!(allow(r, &q).expect("decides"));
        }
        q.resource = Resource::net("::1".parse().unwrap(), 22, 6);
        for r in [&vm, &interp] {
            assert!(!allow(r, &q).expect("decides"));
        }
        // Conflicting values: the VM gives undefined, which is left to the
        // interpreter, whose error stands (a deny that says why).
        let conflict = load(
            "conflict.rego",
            "package pep\ndecision := true if input.resource.dport == 22\n\
             decision := false if input.action == \"net.connect\"\n",
        );
        assert!(conflict.compiled(), "no probe meets the conflict");
        let err = allow(&conflict, &q).expect_err("a conflict is an error");
        assert!(err.to_string().contains("conflict"), "{err}");
        // Where the VM alone would allow (a conflicting helper it makes
        // undefined; a helper with two values it takes the first of), the
        // interpreter decides, and fails the decision: a deny.
        q.resource = Resource::net("::1".parse().unwrap(), 443, 6);
        for (name, text) in [
            (
                "helper.rego",
                "package pep\nhelper := true if input.resource.dport == 443\n\
                 helper := false if input.action == \"net.connect\"\ndecision if not helper\n",
            ),
            (
                "first.rego",
                "package pep\nport := p if { some p in [1, input.resource.dport] }\ndecision if port == 1\n",
            ),
        ] {
            let r = load(name, text);
            assert!(!r.compiled(), "{name}");
            let err = allow(&r, &q).expect_err(name);
            assert!(err.to_string().contains("rule"), "{name}: {err}");
        }
    }

    #[test]
    fn invalid_rego_names_its_location() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = write(
            dir.path(),
            "bad.rego",
            "package pep\n\ndecision if { input.x == == 1 }\n",
        );
        let err = Rego::load(&[&f], "data.pep.decision").err().expect("must fail").0;
        assert!(err.contains("bad.rego:3:"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }
}
