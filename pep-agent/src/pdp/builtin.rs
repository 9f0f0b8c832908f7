//! The `builtin` engine: the policy file's own rules, evaluated from SPEC's
//! words (the compiler's reference evaluator for the network). It knows
//! nothing beyond the file, so where no rule matches and the section's
//! default is `ask`, it answers deny.

use std::net::IpAddr;

use serde_json::Value;

use super::{Answer, DecideFuture, Pdp, PdpDecision, PdpError, new_decision_id};
use crate::{
    compiler::net::reference_decide,
    policy::{FileTarget, NetDefault, Policy, Verdict},
};

pub struct Builtin {
    policy: Policy,
}

impl Builtin {
    pub fn new(policy: Policy) -> Self {
        Self { policy }
    }

    /// The answer to `input`, synchronously.
    pub fn evaluate(&self, input: &Value) -> Result<Answer, PdpError> {
        let action = input
            .pointer("/action")
            .and_then(Value::as_str)
            .ok_or_else(|| PdpError::Eval("input has no `action` string".into()))?;
        let res = |k: &str| input.pointer(&format!("/resource/{k}"));
        let (allow, reason) = match action {
            "net.connect" | "net.send" => {
                let addr: IpAddr = res("daddr")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| PdpError::Eval("`resource.daddr` is not an IP address".into()))?;
                let port = res("dport")
                    .and_then(Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| PdpError::Eval("`resource.dport` is not a port".into()))?;
                let proto = match res("protocol").and_then(Value::as_str) {
                    Some("tcp") | None => 6,
                    Some("udp") => 17,
                    Some(other) => other.parse::<u8>().unwrap_or(0),
                };
                let net = &self.policy.network;
                let default = match net.default {
                    NetDefault::Allow => Verdict::Allow,
                    NetDefault::Deny | NetDefault::Ask => Verdict::Deny,
                };
                let (verdict, rule) = reference_decide(&net.rules, default.to_kernel(), addr, port, proto);
                (
                    verdict == Verdict::Allow.to_kernel(),
                    rule.map_or_else(
                        || format!("network.default ({:?})", net.default).to_lowercase(),
                        |i| format!("network.rules[{i}]"),
                    ),
                )
            }
            "file.open" | "file.write" => {
                let path = res("path")
                    .and_then(Value::as_str)
                    .ok_or_else(|| PdpError::Eval("`resource.path` is not a string".into()))?;
                let write = action == "file.write";
                let (v, why) = self.decide_file(path, write);
                (v == Verdict::Allow, why)
            }
            "exec" => {
                let path = res("path")
                    .and_then(Value::as_str)
                    .ok_or_else(|| PdpError::Eval("`resource.path` is not a string".into()))?;
                let exec = &self.policy.exec;
                // Longest matching pattern wins, deny on a tie.
                let best = exec
                    .rules
                    .iter()
                    .filter(|r| r.path.matches(path))
                    .max_by_key(|r| (r.path.path.len(), !r.path.prefix, r.verdict == Verdict::Deny));
                match best {
                    Some(r) => (r.verdict == Verdict::Allow, r.name()),
                    None => (exec.default == Verdict::Allow, "exec.default".into()),
                }
            }
            other => return Err(PdpError::Eval(format!("unknown action `{other}`"))),
        };
        Ok(Answer {
            allow,
            ttl_s: None,
            reason: Some(reason),
            error: None,
        })
    }

    /// SPEC's file decision: a `name` deny beats every allow; otherwise the
    /// most specific matching path rule, deny on a tie; else the default.
    fn decide_file(&self, path: &str, write: bool) -> (Verdict, String) {
        let files = &self.policy.files;
        let wants = |r: &crate::policy::FileRule| if write { r.access.write } else { r.access.read };
        let base = path.rsplit('/').next().unwrap_or(path);
        if let Some(r) = files.rules.iter().find(|r| {
            wants(r) && r.verdict == Verdict::Deny && matches!(&r.target, FileTarget::Name(n) if n.0 == base)
        }) {
            return (Verdict::Deny, r.name());
        }
        let best = files
            .rules
            .iter()
            .filter(|r| wants(r))
            .filter_map(|r| match &r.target {
                FileTarget::Path(p) if p.matches(path) => Some((p.path.len(), !p.prefix, r)),
                _ => None,
            })
            .max_by_key(|(len, exact, r)| (*len, *exact, r.verdict == Verdict::Deny));
        match best {
            Some((_, _, r)) => (r.verdict, r.name()),
            None => (files.default, "files.default".into()),
        }
    }
}

impl Pdp for Builtin {
    fn engine(&self) -> &'static str {
        "builtin"
    }

    fn decide<'a>(&'a self, input: &'a Value) -> DecideFuture<'a> {
        Box::pin(async move {
            Ok(PdpDecision {
                answer: self.evaluate(input)?,
                decision_id: Some(new_decision_id()),
            })
        })
    }

    fn decide_now(&self, query: &super::query::Query) -> Option<Result<PdpDecision, PdpError>> {
        Some(self.evaluate(&query.to_input()).map(|answer| PdpDecision {
            answer,
            decision_id: Some(new_decision_id()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::{LoadContext, load_str};

    fn engine(body: &str) -> Builtin {
        let p = load_str(
            &format!("apiVersion: pep/v1\n{body}"),
            "t.yaml",
            &LoadContext::new("/home/u"),
        )
        .expect("policy");
        Builtin::new(p)
    }

    fn net(daddr: &str, dport: u16) -> Value {
        json!({"action": "net.connect", "resource": {"daddr": daddr, "dport": dport, "protocol": "tcp"}})
    }

    #[test]
    fn network_rules_and_ask_default() {
        let b = engine(
            "network:\n  default: ask\n  rules:\n    - allow: { cidr: 10.0.0.0/8, ports: [443] }\n    - deny: { cidr: 10.1.0.0/16 }\n",
        );
        let a = b.evaluate(&net("10.2.3.4", 443)).unwrap();
        assert!(a.allow);
        assert_eq!(a.reason.as_deref(), Some("network.rules[0]"));
        assert!(!b.evaluate(&net("10.1.3.4", 443)).unwrap().allow);
        // No rule: `ask` has nobody else to ask here.
        assert!(!b.evaluate(&net("192.0.2.1", 443)).unwrap().allow);
    }

    #[test]
    fn files_and_exec() {
        let b = engine(
            "files:\n  default: deny\n  rules:\n    - allow: { path: \"/w/**\", access: [read, write] }\n    - deny: { name: \".env\" }\nexec:\n  default: allow\n  rules:\n    - deny: { path: /usr/bin/nc }\n",
        );
        let f = |p: &str, a: &str| json!({"action": a, "resource": {"path": p}});
        assert!(b.evaluate(&f("/w/x", "file.write")).unwrap().allow);
        assert!(!b.evaluate(&f("/w/.env", "file.open")).unwrap().allow);
        assert!(!b.evaluate(&f("/etc/x", "file.open")).unwrap().allow);
        let e = |p: &str| json!({"action": "exec", "resource": {"path": p}});
        assert!(!b.evaluate(&e("/usr/bin/nc")).unwrap().allow);
        assert!(b.evaluate(&e("/usr/bin/ls")).unwrap().allow);
        assert!(b.evaluate(&json!({"action": "nope"})).is_err());
    }
}
