//! Compiles `exec:` rules into `EXEC_RULES` entries and exec inode denials.
//!
//! Keys are those of file rules (`FileRuleKey`, `KIND_PREFIX` for `dir/**`,
//! `KIND_EXACT` otherwise, FNV-1a of the path; `/**` is the empty string), so
//! the kernel walks an exec'd path exactly as it walks an opened one. Rules on
//! the same key merge with deny winning the tie; the longest match decides.

use std::{collections::BTreeMap, path::Path};

use pep_common::{
    event::{VERDICT_ALLOW, VERDICT_DENY},
    file::{
        ExecRuleValue, FileRuleKey, FileRuleValue, INODE_KIND_EXEC, InodeKey, KIND_EXACT, KIND_PREFIX, fnv1a,
    },
};

use super::files::{MAX_INODE_SCAN, inode_id, scan_linked};
use crate::policy::{ExecSection, Verdict};

fn key_path(path: &str) -> &str {
    if path == "/" { "" } else { path }
}

pub fn compile_exec(exec: &ExecSection, sandbox_id: u32) -> Vec<(FileRuleKey, ExecRuleValue)> {
    let mut out: BTreeMap<(u32, u64), ExecRuleValue> = BTreeMap::new();
    for rule in &exec.rules {
        let (kind, hash) = if rule.path.prefix {
            (KIND_PREFIX, fnv1a(key_path(&rule.path.path).as_bytes()))
        } else {
            (KIND_EXACT, fnv1a(rule.path.path.as_bytes()))
        };
        let idx = u32::try_from(rule.index).unwrap_or(u32::MAX - 1);
        let verdict = rule.verdict.to_kernel();
        let v = out.entry((kind, hash)).or_default();
        if v.verdict == 0 || (v.verdict == VERDICT_ALLOW && verdict == VERDICT_DENY) {
            *v = ExecRuleValue { verdict, rule: idx };
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

/// The exec verdict the kernel reaches for `path` (mirrors `decide_exec` in
/// pep-ebpf `exec.rs`): (verdict, rule index or `u32::MAX`).
pub fn lookup(entries: &[(FileRuleKey, ExecRuleValue)], default: u32, path: &str) -> (u32, u32) {
    let get = |kind: u32, bytes: &[u8]| {
        let hash = fnv1a(bytes);
        entries
            .iter()
            .find(|(k, _)| k.kind == kind && k.hash == hash)
            .map(|(_, v)| (v.verdict, v.rule))
    };
    let bytes = path.as_bytes();
    let mut best = None;
    for (i, c) in bytes.iter().enumerate() {
        if *c == b'/' {
            best = get(KIND_PREFIX, &bytes[..i]).or(best);
        }
    }
    best = get(KIND_PREFIX, bytes).or(best);
    best = get(KIND_EXACT, bytes).or(best);
    best.unwrap_or((default, u32::MAX))
}

/// Inode denials for exec (kind `INODE_KIND_EXEC`; the verdict in
/// `read_verdict`/`read_rule`): the binary named by each exact deny, and every
/// regular file with more than one link under each denied prefix, when its
/// own path is denied. A hard link to a denied binary is then denied by
/// identity wherever it is.
pub fn inode_denies(
    exec: &ExecSection,
    entries: &[(FileRuleKey, ExecRuleValue)],
    sandbox_id: u32,
) -> Vec<(InodeKey, FileRuleValue)> {
    let default = exec.default.to_kernel();
    let mut out: BTreeMap<(u64, u64), FileRuleValue> = BTreeMap::new();
    let mut add = |path: &Path, meta: &std::fs::Metadata| {
        let Some(p) = path.to_str() else { return };
        let (verdict, rule) = lookup(entries, default, p);
        if verdict == VERDICT_DENY {
            out.insert(
                inode_id(meta),
                FileRuleValue {
                    read_verdict: VERDICT_DENY,
                    read_rule: rule,
                    ..Default::default()
                },
            );
        }
    };
    let mut budget = MAX_INODE_SCAN;
    for rule in exec.rules.iter().filter(|r| r.verdict == Verdict::Deny) {
        let path = Path::new(&rule.path.path);
        if rule.path.prefix {
            scan_linked(path, &mut budget, &mut add);
        } else if let Ok(meta) = std::fs::metadata(path) {
            add(path, &meta);
        }
    }
    out.into_iter()
        .map(|((dev, ino), v)| {
            (
                InodeKey {
                    sandbox_id,
                    kind: INODE_KIND_EXEC,
                    dev,
                    ino,
                },
                v,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{LoadContext, load_str};

    fn policy(rules: &str, default: &str) -> crate::policy::Policy {
        load_str(
            &format!("apiVersion: pep/v1\nexec:\n  default: {default}\n  rules:\n{rules}"),
            "t.yaml",
            &LoadContext::new("/home/u"),
        )
        .expect("policy")
    }

    #[test]
    fn longest_match_and_deny_ties() {
        let p = policy(
            "    - allow: { path: \"/usr/bin/**\" }\n\
             \x20   - deny: { path: /usr/bin/nc }\n\
             \x20   - allow: { path: /usr/bin/nc }\n\
             \x20   - deny: { path: \"/usr/bin/sub/**\" }\n",
            "deny",
        );
        let e = compile_exec(&p.exec, 2);
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e.iter().all(|(k, _)| k.sandbox_id == 2));
        let d = p.exec.default.to_kernel();
        assert_eq!(lookup(&e, d, "/usr/bin/ls"), (VERDICT_ALLOW, 0));
        assert_eq!(
            lookup(&e, d, "/usr/bin/nc"),
            (VERDICT_DENY, 1),
            "deny wins the tie"
        );
        assert_eq!(lookup(&e, d, "/usr/bin/sub/x"), (VERDICT_DENY, 3));
        assert_eq!(lookup(&e, d, "/tmp/nc"), (VERDICT_DENY, u32::MAX), "default");
        assert_eq!(
            lookup(&e, d, "/usr/binx"),
            (VERDICT_DENY, u32::MAX),
            "not under /usr/bin"
        );
    }

    #[test]
    fn root_prefix_is_the_empty_key() {
        let p = policy("    - allow: { path: \"/**\" }\n", "deny");
        let e = compile_exec(&p.exec, 1);
        assert_eq!(e[0].0.hash, fnv1a(b""));
        assert_eq!(lookup(&e, VERDICT_DENY, "/bin/sh"), (VERDICT_ALLOW, 0));
    }
}
