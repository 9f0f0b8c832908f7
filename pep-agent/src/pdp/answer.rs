//! The answer's `result`: SPEC allows a boolean or
//! `{"allow": bool, "ttl_s": N, "reason": "..."}`. A missing `result` (OPA's
//! answer for an undefined decision) is a deny. Any other shape is a deny
//! whose `error` says why, so the audit record can show it.

use serde_json::Value;

/// A decision's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub allow: bool,
    /// How long the verdict may be cached; `None`: the policy's `cache_ttl_s`.
    pub ttl_s: Option<u64>,
    pub reason: Option<String>,
    /// Set when the answer was not one of SPEC's shapes (or undefined): the
    /// deny is ours, not the PDP's, and this says why.
    pub error: Option<String>,
}

impl Answer {
    fn deny_because(why: impl Into<String>) -> Self {
        Self {
            allow: false,
            ttl_s: None,
            reason: None,
            error: Some(why.into()),
        }
    }
}

/// The answer for a decision's `result` (`None`: no `result`).
pub fn parse_result(result: Option<&Value>) -> Answer {
    match result {
        None | Some(Value::Null) => Answer::deny_because("undefined decision (no `result`): deny"),
        Some(Value::Bool(allow)) => Answer {
            allow: *allow,
            ttl_s: None,
            reason: None,
            error: None,
        },
        Some(Value::Object(obj)) => {
            let Some(allow) = obj.get("allow") else {
                return Answer::deny_because("`result` object without `allow`: deny");
            };
            let Value::Bool(allow) = allow else {
                return Answer::deny_because(format!(
                    "`result.allow` is {}, not a boolean: deny",
                    kind(allow)
                ));
            };
            let ttl_s = match obj.get("ttl_s") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(t) => Some(t),
                    None => {
                        return Answer::deny_because(format!(
                            "`result.ttl_s` is {n}, not a whole number of seconds >= 0: deny"
                        ));
                    }
                },
                Some(v) => {
                    return Answer::deny_because(format!(
                        "`result.ttl_s` is {}, not a number: deny",
                        kind(v)
                    ));
                }
            };
            let reason = match obj.get("reason") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(v) => Some(v.to_string()),
            };
            Answer {
                allow: *allow,
                ttl_s,
                reason,
                error: None,
            }
        }
        Some(v) => Answer::deny_because(format!(
            "`result` is {}, expected a boolean or {{allow, ttl_s, reason}}: deny",
            kind(v)
        )),
    }
}

/// An OPA Data API response body: `{"result": ..., "decision_id": ...}`.
/// Returns the answer and the decision id.
pub fn parse_response(body: &Value) -> (Answer, Option<String>) {
    let Value::Object(obj) = body else {
        return (
            Answer::deny_because(format!("the response is {}, not a JSON object: deny", kind(body))),
            None,
        );
    };
    let id = obj.get("decision_id").and_then(Value::as_str).map(str::to_owned);
    (parse_result(obj.get("result")), id)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn boolean_results() {
        assert!(parse_result(Some(&json!(true))).allow);
        let a = parse_result(Some(&json!(false)));
        assert!(!a.allow);
        assert_eq!(a.error, None);
    }

    #[test]
    fn object_results() {
        let a = parse_result(Some(&json!({"allow": true, "ttl_s": 5, "reason": "ok"})));
        assert_eq!(
            a,
            Answer {
                allow: true,
                ttl_s: Some(5),
                reason: Some("ok".into()),
                error: None
            }
        );
        let a = parse_result(Some(&json!({"allow": false})));
        assert_eq!((a.allow, a.ttl_s, a.error), (false, None, None));
    }

    #[test]
    fn undefined_is_deny() {
        let (a, id) = parse_response(&json!({}));
        assert!(!a.allow);
        assert!(
            a.error.as_deref().is_some_and(|e| e.contains("undefined")),
            "{a:?}"
        );
        assert_eq!(id, None);
        let (a, id) = parse_response(&json!({"result": true, "decision_id": "d-1"}));
        assert!(a.allow);
        assert_eq!(id.as_deref(), Some("d-1"));
    }

    #[test]
    fn other_shapes_are_deny_with_a_reason() {
        for (v, needle) in [
            (json!("yes"), "a string"),
            (json!(1), "a number"),
            (json!([true]), "an array"),
            (json!({"allowed": true}), "without `allow`"),
            (json!({"allow": "true"}), "not a boolean"),
            (json!({"allow": true, "ttl_s": -1}), "ttl_s"),
            (json!({"allow": true, "ttl_s": "5"}), "ttl_s"),
        ] {
            let a = parse_result(Some(&v));
            assert!(!a.allow, "{v} must deny");
            let e = a.error.unwrap_or_else(|| panic!("{v}: no error"));
            assert!(e.contains(needle), "{v}: {e}");
        }
        let (a, _) = parse_response(&json!([1]));
        assert!(!a.allow && a.error.is_some());
    }
}
