//! When a reload changes the PDP's answers: the fingerprint of everything a
//! decision depends on besides its query. Two policies with the same
//! fingerprint answer every query alike, so a reload between them keeps
//! the verdict cache; any other reload bumps the cache's revision stamp
//! (`task::AskTask::reload`), which turns every verdict cached before it
//! into a miss.
//!
//! In it: the engine; for `rego`, the query and each module's name and
//! bytes; for `opa`, the URL (what the remote server answers may change
//! without us knowing: that is what `ttl_s` bounds); for `builtin`, the
//! policy's own sections, which it evaluates. Not in it: what changes no
//! answer (`cache_ttl_s`, `on_unavailable`, timeouts, the file's comments).
//! A Rego module that cannot be read makes a fingerprint no other has, so
//! the reload errs on the side of asking again.

use sha2::{Digest as _, Sha256};

use crate::policy::{Engine, Policy};

/// `sha256:<hex>` of what `policy`'s PDP answers from.
pub fn fingerprint(policy: &Policy) -> String {
    let mut h = Sha256::new();
    let mut field = |tag: &str, bytes: &[u8]| {
        // Length-prefixed, so no two different field lists hash alike.
        h.update((tag.len() as u64).to_le_bytes());
        h.update(tag.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    let pdp = &policy.pdp;
    match pdp.engine {
        Engine::Builtin => {
            field("engine", b"builtin");
            field("network", format!("{:?}", policy.network).as_bytes());
            field("files", format!("{:?}", policy.files).as_bytes());
            field("exec", format!("{:?}", policy.exec).as_bytes());
        }
        Engine::Rego => {
            field("engine", b"rego");
            if let Some(r) = &pdp.rego {
                field("query", r.query.as_bytes());
                for f in &r.files {
                    field("module", f.as_os_str().as_encoded_bytes());
                    match std::fs::read(f) {
                        Ok(bytes) => field("text", &bytes),
                        Err(_) => field("unreadable", ulid::Ulid::new().to_string().as_bytes()),
                    }
                }
            }
        }
        Engine::Opa => {
            field("engine", b"opa");
            if let Some(o) = &pdp.opa {
                field("url", o.url.as_bytes());
            }
        }
    }
    format!("sha256:{:x}", h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{LoadContext, load_str};

    fn policy(dir: &std::path::Path, extra: &str) -> Policy {
        load_str(
            &format!(
                "apiVersion: pep/v1\nnetwork:\n  default: ask\npdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n{extra}",
                dir.join("p.rego").display()
            ),
            "p.yaml",
            &LoadContext::new("/home/u"),
        )
        .expect("policy")
    }

    #[test]
    fn only_what_changes_answers_changes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rego = dir.path().join("p.rego");
        std::fs::write(&rego, "package pep\ndecision := true\n").expect("write");
        let a = fingerprint(&policy(dir.path(), ""));
        assert_eq!(a, fingerprint(&policy(dir.path(), "")), "stable");
        // Caching and availability settings answer nothing.
        assert_eq!(
            a,
            fingerprint(&policy(dir.path(), "  cache_ttl_s: 5\n  on_unavailable: allow\n"))
        );
        // The module's text does.
        std::fs::write(&rego, "package pep\ndecision := false\n").expect("write");
        let b = fingerprint(&policy(dir.path(), ""));
        assert_ne!(a, b);
        // So does the query.
        let other_query = load_str(
            &format!(
                "apiVersion: pep/v1\nnetwork:\n  default: ask\npdp:\n  engine: rego\n  rego: {{ files: [{}], query: data.pep.other }}\n",
                rego.display()
            ),
            "p.yaml",
            &LoadContext::new("/home/u"),
        )
        .expect("policy");
        assert_ne!(b, fingerprint(&other_query));
        let builtin = |rules: &str| {
            fingerprint(
                &load_str(
                    &format!("apiVersion: pep/v1\nnetwork:\n  default: ask\n{rules}"),
                    "p.yaml",
                    &LoadContext::new("/home/u"),
                )
                .expect("policy"),
            )
        };
        let none = builtin("");
        assert_ne!(none, b);
        assert_ne!(
            none,
            builtin("  rules:\n    - allow: { cidr: 10.0.0.0/8 }\n"),
            "builtin answers from the file's rules"
        );
        // An unreadable module never matches anything, itself included.
        std::fs::remove_file(&rego).expect("rm");
        assert_ne!(
            fingerprint(&policy(dir.path(), "")),
            fingerprint(&policy(dir.path(), ""))
        );
    }
}
