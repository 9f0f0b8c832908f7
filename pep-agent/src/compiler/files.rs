//! Compiles `files:` rules into `FILE_RULES` entries (see `pep_common::file`).
//!
//! Rules on the same key merge per access: deny wins a tie. `name` rules
//! compile only their denials: SPEC gives a `name` deny precedence over every
//! allow, and a `name` allow has no defined precedence, so `policy check`
//! reports it (see `name_allow_rules`).

use std::collections::BTreeMap;

use pep_common::{
    event::{VERDICT_ALLOW, VERDICT_DENY},
    file::{FileRuleKey, FileRuleValue, KIND_EXACT, KIND_NAME, KIND_PREFIX, fnv1a},
};

use crate::policy::{FileTarget, FilesSection, Verdict};

/// The key bytes of a path pattern: `/**` (the root prefix) is the empty
/// string, which the kernel looks up at the leading `/`.
fn key_path(path: &str) -> &str {
    if path == "/" { "" } else { path }
}

pub fn compile_files(files: &FilesSection, sandbox_id: u32) -> Vec<(FileRuleKey, FileRuleValue)> {
    let mut out: BTreeMap<(u32, u64), FileRuleValue> = BTreeMap::new();
    for rule in &files.rules {
        let (kind, hash) = match &rule.target {
            FileTarget::Path(p) if p.prefix => (KIND_PREFIX, fnv1a(key_path(&p.path).as_bytes())),
            FileTarget::Path(p) => (KIND_EXACT, fnv1a(p.path.as_bytes())),
            FileTarget::Name(n) if rule.verdict == Verdict::Deny => (KIND_NAME, fnv1a(n.0.as_bytes())),
            FileTarget::Name(_) => continue,
        };
        let v = out.entry((kind, hash)).or_default();
        let verdict = rule.verdict.to_kernel();
        let idx = u32::try_from(rule.index).unwrap_or(u32::MAX - 1);
        if rule.access.read {
            merge(&mut v.read_verdict, &mut v.read_rule, verdict, idx);
        }
        if rule.access.write {
            merge(&mut v.write_verdict, &mut v.write_rule, verdict, idx);
        }
    }
    out.into_iter()
        .map(|((kind, hash), v)| {
            (
                FileRuleKey {
                    sandbox_id,
                    kind,
                    hash,
                },
                v,
            )
        })
        .collect()
}

fn merge(verdict: &mut u32, rule: &mut u32, new: u32, idx: u32) {
    if *verdict == 0 || (*verdict == VERDICT_ALLOW && new == VERDICT_DENY) {
        *verdict = new;
        *rule = idx;
    }
}

/// Indexes of `name` allow rules, which have no effect.
pub fn name_allow_rules(files: &FilesSection) -> Vec<usize> {
    files
        .rules
        .iter()
        .filter(|r| matches!(r.target, FileTarget::Name(_)) && r.verdict == Verdict::Allow)
        .map(|r| r.index)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{LoadContext, load_str};

    fn compile(yaml: &str) -> Vec<(FileRuleKey, FileRuleValue)> {
        let p = load_str(yaml, "t.yaml", &LoadContext::new("/home/u")).expect("policy");
        compile_files(&p.files, 3)
    }

    fn find(entries: &[(FileRuleKey, FileRuleValue)], kind: u32, s: &str) -> FileRuleValue {
        entries
            .iter()
            .find(|(k, _)| k.kind == kind && k.hash == fnv1a(s.as_bytes()) && k.sandbox_id == 3)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no entry {kind} {s} in {entries:?}"))
    }

    #[test]
    fn kinds_and_tie_merging() {
        let e = compile(
            "apiVersion: pep/v1\nfiles:\n  default: deny\n  rules:\n\
             \x20   - allow: { path: \"/usr/**\", access: [read] }\n\
             \x20   - allow: { path: \"/w/**\", access: [read, write] }\n\
             \x20   - deny: { path: \"/w/**\", access: [write] }\n\
             \x20   - deny: { path: \"/etc/shadow\" }\n\
             \x20   - deny: { name: \".env\", access: [read, write] }\n\
             \x20   - allow: { path: \"/**\", access: [read] }\n",
        );
        let usr = find(&e, KIND_PREFIX, "/usr");
        assert_eq!((usr.read_verdict, usr.write_verdict), (VERDICT_ALLOW, 0));
        let w = find(&e, KIND_PREFIX, "/w");
        assert_eq!(
            (w.read_verdict, w.write_verdict, w.write_rule),
            (VERDICT_ALLOW, VERDICT_DENY, 2)
        );
        let shadow = find(&e, KIND_EXACT, "/etc/shadow");
        assert_eq!(
            (shadow.read_verdict, shadow.write_verdict),
            (VERDICT_DENY, VERDICT_DENY)
        );
        let env = find(&e, KIND_NAME, ".env");
        assert_eq!(env.read_rule, 4);
        let root = find(&e, KIND_PREFIX, "");
        assert_eq!(root.read_verdict, VERDICT_ALLOW);
    }
}
