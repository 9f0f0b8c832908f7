//! The rules query: a Rego policy may produce a sandbox's policy sections,
//! so that the PDP is the single source of truth for rules the kernel
//! enforces without asking (file rules in particular).
//!
//! `pdp.rules: data.pep.rules` names the query. It is evaluated once, at
//! `policy check` and at load, with `input` `{"sandbox": {"name": NAME}}`,
//! by the `rego` engine (in-process) or the `opa` engine (the same server as
//! `opa.url`, at `/v1/data/pep/rules`). Its value is an object with any of
//! `network`, `files` and `exec`, each in exactly the policy file's shape;
//! each section it gives replaces the file's own. The value goes through
//! the policy loader itself, so a wrong shape is rejected with the same
//! messages as a bad file, located by the path inside the value
//! (`files.rules[0].allow.access`) and, for `rego`, by the rule's position
//! in its module.

use std::time::Duration;

use serde_json::{Value, json};

use super::{opa::Opa, rego::Rego};
use crate::policy::{self, Engine, LoadContext, Policy};

/// The sections a rules query may give.
pub const SECTIONS: [&str; 3] = ["network", "files", "exec"];

/// Evaluates `policy.pdp.rules`, if any, for sandbox `sandbox` and replaces
/// the sections it gives. `home` expands `~` as for the file.
pub fn apply(policy: &mut Policy, sandbox: &str, home: &std::path::Path) -> Result<(), String> {
    let Some(query) = policy.pdp.rules.clone() else {
        return Ok(());
    };
    let input = json!({ "sandbox": { "name": sandbox } });
    let (origin, value) = match policy.pdp.engine {
        Engine::Rego => {
            let rego = policy
                .pdp
                .rego
                .as_ref()
                .ok_or("`pdp.rules` needs `pdp.rego.files`")?;
            let engine = Rego::load(&rego.files, &query).map_err(|e| e.to_string())?;
            let origin = rule_origin(&rego.files, &query);
            let v = engine
                .eval(&query, &input)
                .map_err(|e| format!("{origin}: {e}"))?;
            (origin, v)
        }
        Engine::Opa => {
            let cfg = policy.pdp.opa.as_ref().ok_or("`pdp.rules` needs `pdp.opa.url`")?;
            let opa = Opa::new(cfg).map_err(|e| e.to_string())?;
            let url = opa.sibling_url(&query);
            // Load happens once, before anything runs: allow a few timeouts.
            let opa = Opa::with_url(&url, Duration::from_millis(cfg.timeout_ms.max(1000)))
                .map_err(|e| e.to_string())?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let body = match tokio::runtime::Handle::try_current() {
                // Called from inside a runtime (`pep-agent run`): block on a
                // thread of our own rather than nesting runtimes.
                Ok(_) => std::thread::scope(|s| {
                    s.spawn(|| rt.block_on(opa.post(&url, &input)))
                        .join()
                        .unwrap_or_else(|_| Err(super::PdpError::Eval("rules query thread panicked".into())))
                }),
                Err(_) => rt.block_on(opa.post(&url, &input)),
            }
            .map_err(|e| format!("{url}: {e}"))?;
            (url, body.get("result").cloned())
        }
        Engine::Builtin => {
            return Err("`pdp.rules` needs `engine: rego` or `engine: opa`".into());
        }
    };
    let value = value.ok_or_else(|| format!("{origin}: `{query}` is undefined for sandbox `{sandbox}`"))?;
    let sections =
        parse_sections(&value, &policy.vars, home).map_err(|e| format!("{origin}: `{query}`: {e}"))?;
    if let Some(n) = sections.network {
        policy.network = n;
    }
    if let Some(f) = sections.files {
        policy.files = f;
    }
    if let Some(x) = sections.exec {
        policy.exec = x;
    }
    Ok(())
}

/// The sections a rules query gave.
#[derive(Debug, Default)]
pub struct Sections {
    pub network: Option<policy::NetworkSection>,
    pub files: Option<policy::FilesSection>,
    pub exec: Option<policy::ExecSection>,
}

/// Validates a rules value with the policy loader, with the policy file's
/// `vars` (so `${workspace}` and `~` mean in Rego-produced rules what they
/// mean in the file's). Errors name the path in the value:
/// `files.rules[1].allow.access: ...`.
pub fn parse_sections(
    value: &Value,
    vars: &policy::Vars,
    home: &std::path::Path,
) -> Result<Sections, String> {
    let Value::Object(obj) = value else {
        return Err(format!(
            "the value must be an object with any of {SECTIONS:?}, got {}",
            short(value)
        ));
    };
    if let Some(k) = obj.keys().find(|k| !SECTIONS.contains(&k.as_str())) {
        return Err(format!(
            "at `{k}`: unknown section; a rules query gives only {SECTIONS:?}"
        ));
    }
    let mut doc = Emitter::default();
    doc.line("apiVersion: \"pep/v1\"".into(), String::new());
    if !vars.is_empty() {
        doc.line("vars:".into(), String::new());
        for (name, v) in vars.iter() {
            // Already expanded; `~` is kept and expands where used, as in
            // the file.
            doc.line(
                format!("  {}: {}", flat(&json!(name)), flat(&json!(v))),
                String::new(),
            );
        }
    }
    for (k, v) in obj {
        doc.entry(0, k, v, k.clone());
    }
    let text = doc.text();
    let p = policy::load_str(&text, "rules", &LoadContext::new(home)).map_err(|e| match e.location() {
        Some(loc) => {
            let path = doc.path_at(loc.line);
            let msg = match &e {
                policy::PolicyError::Invalid { message, .. } => message.clone(),
                other => other.to_string(),
            };
            format!("at `{path}`: {msg}")
        }
        None => e.to_string(),
    })?;
    Ok(Sections {
        network: obj.contains_key("network").then_some(p.network),
        files: obj.contains_key("files").then_some(p.files),
        exec: obj.contains_key("exec").then_some(p.exec),
    })
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..60])
    } else {
        s
    }
}

/// `file:line:col` of rule `query`'s last component in `files`, best effort.
fn rule_origin(files: &[std::path::PathBuf], query: &str) -> String {
    let rule = query.rsplit('.').next().unwrap_or(query);
    for f in files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for (i, line) in text.lines().enumerate() {
            let t = line.trim_start();
            let starts = t.strip_prefix(rule).is_some_and(|rest| {
                rest.starts_with([' ', ':', '=', '[', '{', '\t'])
                    || rest.starts_with(" if")
                    || rest.is_empty()
            });
            if starts {
                return format!("{}:{}:{}", f.display(), i + 1, line.len() - t.len() + 1);
            }
        }
    }
    files
        .first()
        .map_or_else(|| query.to_owned(), |f| f.display().to_string())
}

/// Writes a JSON value as block YAML, one node per line, remembering the
/// JSON path of every line so a loader error can be placed in the value.
#[derive(Default)]
struct Emitter {
    lines: Vec<(String, String)>,
}

impl Emitter {
    fn line(&mut self, text: String, path: String) {
        self.lines.push((text, path));
    }

    fn entry(&mut self, depth: usize, key: &str, v: &Value, path: String) {
        let pad = "  ".repeat(depth);
        let key = Value::String(key.to_owned()).to_string();
        match v {
            Value::Object(o) if !o.is_empty() => {
                self.line(format!("{pad}{key}:"), path.clone());
                for (k, v) in o {
                    self.entry(depth + 1, k, v, format!("{path}.{k}"));
                }
            }
            Value::Array(a) if !a.is_empty() => {
                self.line(format!("{pad}{key}:"), path.clone());
                self.items(depth + 1, a, &path);
            }
            scalar => self.line(format!("{pad}{key}: {}", flat(scalar)), path),
        }
    }

    fn items(&mut self, depth: usize, a: &[Value], path: &str) {
        let pad = "  ".repeat(depth);
        for (i, v) in a.iter().enumerate() {
            let p = format!("{path}[{i}]");
            match v {
                Value::Object(o) if !o.is_empty() => {
                    self.line(format!("{pad}-"), p.clone());
                    for (k, v) in o {
                        self.entry(depth + 1, k, v, format!("{p}.{k}"));
                    }
                }
                Value::Array(inner) if !inner.is_empty() => {
                    self.line(format!("{pad}-"), p.clone());
                    self.items(depth + 1, inner, &p);
                }
                scalar => self.line(format!("{pad}- {}", flat(scalar)), p),
            }
        }
    }

    fn text(&self) -> String {
        let mut s = String::new();
        for (l, _) in &self.lines {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// The JSON path of 1-based line `line`.
    fn path_at(&self, line: usize) -> String {
        self.lines
            .get(line.saturating_sub(1))
            .map(|(_, p)| p.clone())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "(top)".into())
    }
}

/// A scalar (or empty collection) as YAML: JSON's own spelling, which YAML
/// reads back as the same value.
fn flat(v: &Value) -> String {
    v.to_string()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn sections_load_like_the_file() {
        let v = json!({
            "files": {"default": "deny", "rules": [
                {"allow": {"path": "/usr/**", "access": ["read"]}},
                {"deny": {"name": ".env"}}
            ]},
            "network": {"default": "ask", "rules": [{"allow": {"cidr": "127.0.0.0/8", "ports": [80, "9000-9100"]}}]}
        });
        let s = parse_sections(&v, &policy::Vars::default(), Path::new("/home/u")).expect("valid");
        let files = s.files.expect("files");
        assert_eq!(files.rules.len(), 2);
        assert_eq!(files.default, policy::Verdict::Deny);
        let net = s.network.expect("network");
        assert_eq!(net.default, policy::NetDefault::Ask);
        assert_eq!(net.rules[0].ports.len(), 2);
        assert!(s.exec.is_none());
    }

    #[test]
    fn wrong_shapes_are_located_in_the_value() {
        let home = Path::new("/home/u");
        let no = &policy::Vars::default();
        let e =
            parse_sections(&json!({"files": {"rules": [{"allow": {"pth": "/x"}}]}}), no, home).unwrap_err();
        assert!(e.contains("files.rules[0].allow"), "{e}");
        let e = parse_sections(
            &json!({"files": {"rules": [{"allow": {"path": "/x", "access": ["exec"]}}]}}),
            no,
            home,
        )
        .unwrap_err();
        assert!(e.contains("files.rules[0].allow.access"), "{e}");
        let e = parse_sections(
            &json!({"network": {"rules": [{"deny": {"cidr": "10.0.0.1/8"}}]}}),
            no,
            home,
        )
        .unwrap_err();
        assert!(
            e.contains("network.rules[0].deny.cidr") && e.contains("host bits"),
            "{e}"
        );
        let e = parse_sections(&json!({"pdp": {}}), no, home).unwrap_err();
        assert!(e.contains("unknown section"), "{e}");
        let e = parse_sections(&json!([1]), no, home).unwrap_err();
        assert!(e.contains("must be an object"), "{e}");
    }

    #[test]
    fn the_files_vars_expand_in_produced_rules() {
        let p = policy::load_str(
            "apiVersion: pep/v1\nvars:\n  ws: /w\n  sub: ${ws}/src\n  cfg: ~/cfg\n",
            "p.yaml",
            &LoadContext::new("/home/u"),
        )
        .expect("policy");
        let v = json!({"files": {"default": "deny", "rules": [
            {"allow": {"path": "${sub}/**", "access": ["read"]}},
            {"deny": {"path": "${cfg}/secret", "access": ["read"]}}
        ]}});
        let s = parse_sections(&v, &p.vars, Path::new("/home/u")).expect("valid");
        let paths: Vec<String> = s
            .files
            .expect("files")
            .rules
            .iter()
            .map(|r| match &r.target {
                policy::FileTarget::Path(p) => p.path.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(paths, ["/w/src", "/home/u/cfg/secret"]);
        // An unknown var is located in the value, as in a file.
        let e = parse_sections(
            &json!({"files": {"rules": [{"allow": {"path": "${nope}/x"}}]}}),
            &p.vars,
            Path::new("/home/u"),
        )
        .unwrap_err();
        assert!(
            e.contains("files.rules[0].allow.path") && e.contains("nope"),
            "{e}"
        );
    }
}
