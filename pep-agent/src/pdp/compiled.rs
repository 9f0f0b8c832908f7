//! The `rego` engine's fast path: the decision rule compiled to regorus'
//! bytecode VM (RVM), the tree-walking interpreter kept as the reference.
//!
//! Why: a miss is decided right after the ask thread wakes, on caches the
//! rest of the machine has been using. The interpreter walks the rule's
//! syntax tree and builds a fresh evaluation context each time: about 10 us
//! warm here and 35-90 us after a millisecond of other work. The VM runs a
//! flat instruction array with the rule's constants resolved: about 1.6 us
//! warm and 10-30 us after the same millisecond (`benches/pdp.rs` measures
//! both).
//!
//! Trust: the interpreter is the reference (`pdp serve` uses it for any
//! path), so the VM must never answer otherwise.
//! - A rule the VM compiler does not take (`with`, some partial objects, a
//!   package path as the query) is left to the interpreter.
//! - So is a program in which a rule the decision uses could have two
//!   values for one input (`may_conflict`, `single_valued`): there the VM
//!   gives a value, undefined or the first, where the interpreter and OPA
//!   fail the evaluation.
//! - At load, the VM must give the interpreter's result for every probe
//!   input (`probes`: each action and resource kind); any difference and
//!   the interpreter decides, with a warning.
//! - At run time only a defined value from the VM is an answer. A VM error
//!   (an instruction limit, a builtin it lacks) or undefined (also what the
//!   VM gives for conflicting rule values, an error for the interpreter and
//!   for OPA) has the query evaluated again by the interpreter, whose
//!   result stands. So a policy without a `default` for the rule pays the
//!   interpreter's time for what it leaves undefined.

use regorus::{
    Rc, Value,
    languages::rego::compiler::Compiler,
    rvm::{
        program::{Program, RuleType},
        vm::RegoVM,
    },
};

/// Instructions one decision may run: at the VM's few ns each, some ms. A
/// query past it is evaluated by the interpreter instead (no limit there).
const MAX_INSTRUCTIONS: usize = 1_000_000;

/// The decision rule as a VM program, with the VM that runs it.
pub(super) struct Compiled {
    vm: RegoVM,
}

/// Why the rule is left to the interpreter.
#[derive(Debug, thiserror::Error)]
pub(super) enum NotCompiled {
    #[error("regorus' VM compiler does not take it: {0}")]
    Unsupported(String),
    #[error("{0}")]
    MayDiffer(String),
    #[error("the VM answered {vm} where the interpreter answered {interpreter} for input {input}")]
    Disagrees {
        input: String,
        vm: String,
        interpreter: String,
    },
}

impl Compiled {
    /// `rule` (`data.<package>.<rule>`) of the modules loaded in `engine`,
    /// compiled, and checked against the interpreter on `probes`.
    pub(super) fn new(
        engine: &mut regorus::Engine,
        rule: &str,
        probes: &[Value],
    ) -> Result<Self, NotCompiled> {
        let entry: Rc<str> = rule.into();
        let policy = engine
            .compile_with_entrypoint(&entry)
            .map_err(|e| NotCompiled::Unsupported(format!("{e:#}")))?;
        let program = Compiler::compile_from_policy(&policy, &[rule])
            .map_err(|e| NotCompiled::Unsupported(format!("{e:#}")))?;
        may_conflict(&program, rule)?;
        single_valued(engine.get_modules())?;
        // With the compiled policy: `default` rules are answered from it.
        let mut vm = RegoVM::new_with_policy(policy);
        vm.load_program(program);
        vm.set_max_instructions(MAX_INSTRUCTIONS);
        // As the interpreter: a builtin's error is an error, not undefined.
        vm.set_strict_builtin_errors(true);
        let mut compiled = Self { vm };
        for input in probes {
            // Where the VM has no answer, the interpreter decides anyway.
            let Some(vm) = compiled.run(input.clone()) else {
                continue;
            };
            engine.set_input(input.clone());
            let interpreter = engine.eval_rule(rule.to_owned());
            if interpreter.as_ref().ok() != Some(&vm) {
                return Err(NotCompiled::Disagrees {
                    input: input.to_string(),
                    vm: vm.to_string(),
                    interpreter: match interpreter {
                        Ok(v) => v.to_string(),
                        Err(e) => format!("an error ({e:#})"),
                    },
                });
            }
        }
        Ok(compiled)
    }

    /// The rule's value for `input`; `None`: the interpreter must decide.
    /// That is a VM error, and also undefined: where the interpreter fails
    /// on conflicting rule values (as OPA does), the VM gives undefined.
    pub(super) fn run(&mut self, input: Value) -> Option<Value> {
        self.vm.set_input(input);
        let out = self.vm.execute();
        // Not kept: the ask thread refills its last input in place when
        // nothing else holds it (`input::Interned`).
        self.vm.set_input(Value::Null);
        match out {
            Ok(Value::Undefined) => None,
            Ok(v) => Some(v),
            Err(e) => {
                tracing::debug!("rego: the VM gave no answer ({e:#}); the interpreter decides");
                None
            }
        }
    }
}

/// The VM makes a complete rule or function whose definitions give
/// different values undefined, where the interpreter (and OPA) fail the
/// evaluation. For the decision rule itself that is harmless (`run` leaves
/// undefined to the interpreter); for a rule it uses, undefined is a value:
/// `decision if not helper` with a conflicting `helper` would allow where
/// OPA fails. So a program in which any other complete rule or function
/// has definitions that may disagree is left to the interpreter. (Two
/// definitions the compiler knows give the same value cannot disagree; an
/// `else` chain is one definition, first success wins.)
fn may_conflict(program: &Program, rule: &str) -> Result<(), NotCompiled> {
    let risky: Vec<&str> = program
        .rule_infos
        .iter()
        .filter(|i| {
            matches!(i.rule_type, RuleType::Complete)
                && i.definitions.len() > 1
                && !i.early_exit_on_first_success
                && i.name != rule
        })
        .map(|i| i.name.as_str())
        .collect();
    if risky.is_empty() {
        Ok(())
    } else {
        Err(NotCompiled::MayDiffer(format!(
            "{} may have definitions that disagree, which regorus' VM makes undefined (an error in OPA)",
            risky.join(", ")
        )))
    }
}

/// A complete rule or function whose body succeeds more than once with
/// different values fails in the interpreter (and OPA: "must not produce
/// multiple outputs"); the VM takes the first value. So every complete
/// rule and function must have one value whatever its body binds: a
/// constant (`allow if ...`, `decision := {"allow": true} if ...`), or no
/// body at all (`port := input.resource.dport`); a partial object's
/// (`obj[k] := v`) the same. Anything else (`reason := r if { some r in
/// deny }`) is left to the interpreter.
fn single_valued(modules: &[regorus::unstable::Ref<regorus::unstable::Module>]) -> Result<(), NotCompiled> {
    use regorus::unstable::{Rule, RuleHead};
    for m in modules {
        for r in &m.policy {
            let Rule::Spec { head, bodies, .. } = r.as_ref() else {
                continue;
            };
            let (span, value) = match head {
                RuleHead::Compr { span, assign, .. } | RuleHead::Func { span, assign, .. } => {
                    (span, assign.as_ref().map(|a| &a.value))
                }
                // A partial set: its values are collected, never in conflict.
                RuleHead::Set { .. } => continue,
            };
            let single = match value {
                None => true,
                Some(v) => bodies.is_empty() || constant(v),
            };
            if !single {
                return Err(NotCompiled::MayDiffer(format!(
                    "`{}` (line {}) may give several values, which regorus' VM does not refuse as OPA does",
                    span.text().lines().next().unwrap_or_default(),
                    span.line
                )));
            }
        }
    }
    Ok(())
}

fn constant(e: &regorus::unstable::Expr) -> bool {
    use regorus::unstable::Expr;
    match e {
        Expr::String { .. }
        | Expr::RawString { .. }
        | Expr::Number { .. }
        | Expr::Bool { .. }
        | Expr::Null { .. } => true,
        Expr::Array { items, .. } | Expr::Set { items, .. } => items.iter().all(|i| constant(i)),
        Expr::Object { fields, .. } => fields.iter().all(|(_, k, v)| constant(k) && constant(v)),
        _ => false,
    }
}

/// Inputs of each kind a sandbox asks about, as the ask thread builds them.
pub(super) fn probes(sandbox: &str, policy_revision: &str) -> Vec<Value> {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use pep_common::net::{PROTO_TCP, PROTO_UDP};

    use super::query::{Context, Query, Resource, Subject};
    let query = |action: &str, resource: Resource| Query {
        subject: Subject {
            sandbox: sandbox.to_owned(),
            pid: 1,
            uid: 0,
            comm: "probe".into(),
            exe: Some("/usr/bin/probe".into()),
            labels: Default::default(),
        },
        action: action.into(),
        resource,
        context: Context::now(policy_revision),
    };
    [
        query(
            "net.connect",
            Resource::net(Ipv4Addr::LOCALHOST.into(), 443, PROTO_TCP),
        ),
        query(
            "net.connect",
            Resource::net(Ipv6Addr::LOCALHOST.into(), 80, PROTO_TCP),
        ),
        query(
            "net.send",
            Resource::Net {
                daddr: "192.0.2.1".into(),
                dport: 53,
                protocol: "udp".into(),
                domain: Some("example.com".into()),
            },
        ),
        query(
            "net.send",
            Resource::net(Ipv4Addr::UNSPECIFIED.into(), 0, PROTO_UDP),
        ),
        query(
            "file.open",
            Resource::File {
                path: "/etc/passwd".into(),
                access: vec!["read".into()],
            },
        ),
        query(
            "exec",
            Resource::Exec {
                path: "/bin/sh".into(),
            },
        ),
    ]
    .iter()
    .map(super::input::input_value)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: &str = "data.pep.decision";

    fn engine(modules: &[&str]) -> regorus::Engine {
        let mut e = regorus::Engine::new();
        for (i, m) in modules.iter().enumerate() {
            e.add_policy(format!("m{i}.rego"), (*m).to_owned())
                .unwrap_or_else(|err| panic!("module {i}: {err:#}\n{m}"));
        }
        e
    }

    /// The probes, and variations of what they ask about.
    fn inputs() -> Vec<Value> {
        let mut all = probes("agent", "sha256:x");
        for (k, v) in [
            (&["resource", "dport"][..], Value::from(22u64)),
            (&["resource", "dport"], Value::from(8443u64)),
            (&["resource", "daddr"], Value::from("10.1.2.3")),
            (&["resource", "path"], Value::from("/usr/bin/curl")),
            (&["resource", "path"], Value::from("/home/agent/.ssh/id_rsa")),
            (&["subject", "uid"], Value::from(1000u64)),
            (&["subject", "exe"], Value::Null),
        ] {
            for base in probes("agent", "sha256:x") {
                let mut doc: serde_json::Value = serde_json::to_value(&base).expect("json");
                let Some(slot) = k.iter().try_fold(&mut doc, |d, f| d.get_mut(f)) else {
                    continue;
                };
                *slot = serde_json::to_value(&v).expect("json");
                all.push(Value::from(doc));
            }
        }
        all
    }

    /// Rego the VM compiles: for each policy and input, whatever the VM
    /// answers is what the interpreter answers (where it does not answer,
    /// the interpreter decides).
    #[test]
    fn the_vm_answers_as_the_interpreter() {
        let lib = "package lib\n\
                   web_ports := {80, 443}\n\
                   is_web(p) if p in web_ports\n";
        let cases: &[&[&str]] = &[
            // The bench's indexed policy.
            &["package pep\ndefault decision := false\n\
               decision := {\"allow\": true, \"ttl_s\": 600} if input.resource.dport == 443\n\
               decision := {\"allow\": true, \"ttl_s\": 600} if input.action == \"net.connect\"\n"],
            // Boolean, with and without a default (undefined).
            &["package pep\ndefault decision := false\ndecision if input.resource.dport == 443\n"],
            &["package pep\ndecision if input.resource.dport == 443\n"],
            // Set membership, an else chain, negation.
            &["package pep\n\
               decision := {\"allow\": true, \"reason\": \"listed\"} if input.resource.dport in {80, 443}\n\
               else := {\"allow\": false, \"reason\": \"ssh\"} if input.resource.dport == 22\n\
               else := false\n"],
            &["package pep\ndefault decision := true\n\
               decision := false if { not input.subject.exe; input.action == \"exec\" }\n"],
            // Partial sets of reasons, count, sprintf, concat.
            &["package pep\n\
               deny contains msg if { input.action == \"file.open\"; startswith(input.resource.path, \"/etc/\"); msg := sprintf(\"%s is private\", [input.resource.path]) }\n\
               deny contains \"ssh keys\" if contains(input.resource.path, \"/.ssh/\")\n\
               deny contains msg if { input.subject.uid != 0; msg := concat(\" \", [\"uid\", format_int(input.subject.uid, 10)]) }\n\
               decision := {\"allow\": count(deny) == 0, \"reason\": concat(\"; \", sort(deny))}\n"],
            // Iteration, every, comprehensions, object.get, arithmetic.
            &["package pep\n\
               allowed := [{\"net\": \"127.0.0.1\", \"ports\": [443, 80]}, {\"net\": \"::1\", \"ports\": [80]}]\n\
               ok if { some a in allowed; a.net == input.resource.daddr; input.resource.dport in a.ports }\n\
               small if every p in [input.resource.dport] { p < 1024 }\n\
               doubled := {x | some p in [input.resource.dport]; x := p * 2}\n\
               default decision := {\"allow\": false}\n\
               decision := {\"allow\": true, \"ttl_s\": 60} if { ok; small; count(doubled) == 1; object.get(input.subject.labels, \"team\", \"none\") == \"none\" }\n"],
            // Functions from another package.
            &[
                "package pep\nimport data.lib\n\
               default decision := false\n\
               decision if lib.is_web(input.resource.dport)\n\
               decision if { input.action == \"exec\"; endswith(input.resource.path, \"/sh\") }\n",
                lib,
            ],
            // Conflicts: two complete values for one input, an error for
            // the interpreter (as for OPA).
            &["package pep\n\
               decision := true if input.resource.dport == 443\n\
               decision := false if input.action == \"net.connect\"\n"],
            &["package pep\n\
               decision := true if input.resource.dport == 443\n\
               decision := {\"allow\": true} if input.action == \"net.connect\"\n"],
            &["package pep\n\
               default decision := false\n\
               decision := {\"allow\": true} if input.resource.dport == 443\n\
               decision := {\"allow\": false} if input.resource.daddr == \"127.0.0.1\"\n"],
            // One definition, several values (an error for the interpreter).
            &["package pep\n\
               port := p if { some p in [input.resource.dport, 1] }\n\
               default decision := false\n\
               decision if not port == 1\n"],
            &["package pep\n\
               default decision := false\n\
               decision if { some p in [input.resource.dport, 443]; p == 443 }\n"],
        ];
        let inputs = inputs();
        assert!(inputs.len() > 20, "{} inputs", inputs.len());
        let mut refused = Vec::new();
        for modules in cases {
            let mut e = engine(modules);
            let mut c = match Compiled::new(&mut e, RULE, &[]) {
                Ok(c) => c,
                Err(err) => {
                    refused.push(err.to_string());
                    continue;
                }
            };
            let (mut answered, mut left) = (0, 0);
            for input in &inputs {
                let vm = c.run(input.clone());
                e.set_input(input.clone());
                let interpreter = e.eval_rule(RULE.to_owned());
                if let Some(v) = vm {
                    assert_eq!(
                        Some(&v),
                        interpreter.as_ref().ok(),
                        "the VM answered, the interpreter gave {:?}\n{}\ninput {input}",
                        interpreter.as_ref().map_err(ToString::to_string),
                        modules[0]
                    );
                    answered += 1;
                } else if interpreter.is_ok_and(|v| v != Value::Undefined) {
                    left += 1;
                }
            }
            // The VM is the fast path: it answers whatever the interpreter
            // answers without an error.
            assert_eq!(left, 0, "left to the interpreter: {left}\n{}", modules[0]);
            assert!(answered > 0, "{}", modules[0]);
        }
        // Only the rule that may give several values.
        assert_eq!(refused.len(), 1, "{refused:#?}");
        assert!(
            refused[0].contains("`port := p` (line 2) may give several values"),
            "{refused:#?}"
        );
    }

    #[test]
    fn a_program_whose_rules_may_disagree_is_left_to_the_interpreter() {
        // Conflicting helpers: the VM would make `helper` undefined, so
        // `not helper` would allow where the interpreter fails.
        for modules in [
            "package pep\n\
             helper := true if input.resource.dport == 443\n\
             helper := false if input.action == \"net.connect\"\n\
             decision if not helper\n",
            "package pep\n\
             f(x) := 1 if x > 0\n\
             f(x) := 2 if x > 1\n\
             decision if not f(input.resource.dport) == 2\n",
        ] {
            let mut e = engine(&[modules]);
            let err = Compiled::new(&mut e, RULE, &[]).err().expect("must not compile");
            assert!(err.to_string().contains("disagree"), "{err}\n{modules}");
            e.set_input(probes("s", "r").remove(0));
            assert!(
                e.eval_rule(RULE.to_owned()).is_err(),
                "the interpreter fails it\n{modules}"
            );
        }
        // Alternatives the compiler knows agree, and an `else` chain, are
        // taken.
        for modules in [
            "package pep\n\
             web if input.resource.dport == 443\n\
             web if input.resource.dport == 80\n\
             decision if web\n",
            "package pep\n\
             kind := \"web\" if input.resource.dport == 443 else := \"other\"\n\
             decision if kind == \"web\"\n",
        ] {
            let mut e = engine(&[modules]);
            assert!(Compiled::new(&mut e, RULE, &[]).is_ok(), "{modules}");
        }
    }

    #[test]
    fn what_the_vm_does_not_take_is_left_to_the_interpreter() {
        // `with` is not compiled; a package is not a rule.
        let mut e = engine(&["package pep\n\
             port := input.resource.dport\n\
             decision if { port == 443 with input.resource.dport as 443 }\n"]);
        assert!(matches!(
            Compiled::new(&mut e, RULE, &[]),
            Err(NotCompiled::Unsupported(_))
        ));
        assert!(matches!(
            Compiled::new(&mut e, "data.pep", &[]),
            Err(NotCompiled::Unsupported(_))
        ));
    }

    #[test]
    fn past_the_instruction_limit_the_vm_gives_no_answer() {
        let mut e = engine(&["package pep\n\
             decision if count([x | some x in numbers.range(1, 400000); x % 7 == 0]) > input.resource.dport\n"]);
        let mut c = Compiled::new(&mut e, RULE, &[]).expect("compiles");
        let input = probes("s", "r").remove(0);
        assert_eq!(c.run(input.clone()), None, "the VM must stop at its limit");
        e.set_input(input);
        assert_eq!(
            e.eval_rule(RULE.to_owned()).expect("the interpreter decides"),
            Value::from(true)
        );
    }
}
