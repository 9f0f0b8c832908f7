//! Compiles `files:` rules into `FILE_RULES` entries (see `pep_common::file`).
//!
//! Rules on the same key merge per access: deny wins a tie. `name` rules
//! compile only their denials: SPEC gives a `name` deny precedence over every
//! allow, and a `name` allow has no defined precedence, so `policy check`
//! reports it (see `name_allow_rules`).

use std::{collections::BTreeMap, os::unix::fs::MetadataExt as _, path::Path};

use pep_common::{
    event::{VERDICT_ALLOW, VERDICT_DENY},
    file::{
        FileRuleKey, FileRuleValue, INODE_KIND_FILE, InodeKey, KIND_EXACT, KIND_NAME, KIND_PREFIX, fnv1a,
        kernel_dev,
    },
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

/// The verdicts (per access) that the kernel's `match_path` reaches for
/// `path` with `entries` from `compile_files`: the same walk over the same
/// keys, so userspace can predict the kernel (used for inode identity below
/// and in tests). Returns (read, write) as (verdict, rule index or
/// `u32::MAX`).
pub fn lookup(
    entries: &[(FileRuleKey, FileRuleValue)],
    default: u32,
    path: &str,
) -> ((u32, u32), (u32, u32)) {
    let get = |kind: u32, bytes: &[u8]| {
        let hash = fnv1a(bytes);
        entries
            .iter()
            .find(|(k, _)| k.kind == kind && k.hash == hash)
            .map(|(_, v)| *v)
    };
    let bytes = path.as_bytes();
    let (mut read, mut write) = (None, None);
    let mut visit = |v: Option<FileRuleValue>| {
        if let Some(v) = v {
            if v.read_verdict != 0 {
                read = Some((v.read_verdict, v.read_rule));
            }
            if v.write_verdict != 0 {
                write = Some((v.write_verdict, v.write_rule));
            }
        }
    };
    for (i, c) in bytes.iter().enumerate() {
        if *c == b'/' {
            visit(get(KIND_PREFIX, &bytes[..i]));
        }
    }
    visit(get(KIND_PREFIX, bytes));
    visit(get(KIND_EXACT, bytes));
    let mut read = read.unwrap_or((default, u32::MAX));
    let mut write = write.unwrap_or((default, u32::MAX));
    let name = bytes.rsplit(|c| *c == b'/').next().unwrap_or(bytes);
    if let Some(v) = get(KIND_NAME, name) {
        if v.read_verdict == VERDICT_DENY {
            read = (VERDICT_DENY, v.read_rule);
        }
        if v.write_verdict == VERDICT_DENY {
            write = (VERDICT_DENY, v.write_rule);
        }
    }
    (read, write)
}

/// Most directory entries scanned under denied prefixes when looking for
/// hard-linked files; past it the scan stops (and says so in the log).
pub const MAX_INODE_SCAN: usize = 100_000;

/// Inode-identity denials (`INODE_RULES`, kind `INODE_KIND_FILE`), so that a
/// hard link made before the sandbox started cannot reach a denied file by
/// another name. Recorded: the file named by each exact-path deny, and every
/// regular file with more than one link under each denied prefix (a file with
/// one link has no other name; links made later, inside the sandbox, go
/// through `path_link`, which requires the source to be readable and
/// writable). Each file gets the deny bits its own path has. Files that do
/// not exist are skipped. Name rules match names only.
pub fn inode_denies(
    files: &FilesSection,
    entries: &[(FileRuleKey, FileRuleValue)],
    sandbox_id: u32,
) -> Vec<(InodeKey, FileRuleValue)> {
    let default = files.default.to_kernel();
    let mut out: BTreeMap<(u64, u64), FileRuleValue> = BTreeMap::new();
    let mut add = |path: &Path, meta: &std::fs::Metadata| {
        let Some(p) = path.to_str() else { return };
        let (read, write) = lookup(entries, default, p);
        let mut v = FileRuleValue::default();
        if read.0 == VERDICT_DENY {
            (v.read_verdict, v.read_rule) = read;
        }
        if write.0 == VERDICT_DENY {
            (v.write_verdict, v.write_rule) = write;
        }
        if v != FileRuleValue::default() {
            out.insert(inode_id(meta), v);
        }
    };
    let mut budget = MAX_INODE_SCAN;
    for rule in files.rules.iter().filter(|r| r.verdict == Verdict::Deny) {
        let FileTarget::Path(p) = &rule.target else {
            continue;
        };
        let path = Path::new(&p.path);
        if !p.prefix {
            if let Ok(meta) = std::fs::metadata(path) {
                add(path, &meta);
            }
            continue;
        }
        scan_linked(path, &mut budget, &mut add);
    }
    out.into_iter()
        .map(|((dev, ino), v)| {
            (
                InodeKey {
                    sandbox_id,
                    kind: INODE_KIND_FILE,
                    dev,
                    ino,
                },
                v,
            )
        })
        .collect()
}

/// (`s_dev` as the kernel encodes it, inode number) of a file.
pub fn inode_id(meta: &std::fs::Metadata) -> (u64, u64) {
    let dev = meta.dev();
    (kernel_dev(libc::major(dev), libc::minor(dev)), meta.ino())
}

/// Calls `found` for every regular file with more than one link under
/// `dir`, without following symlinks, within `budget` entries.
pub fn scan_linked(dir: &Path, budget: &mut usize, found: &mut impl FnMut(&Path, &std::fs::Metadata)) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            if *budget == 0 {
                tracing::warn!(
                    "inode scan under {} stopped after {MAX_INODE_SCAN} entries: hard links below are not all known",
                    dir.display()
                );
                return;
            }
            *budget -= 1;
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() && meta.nlink() > 1 {
                found(&e.path(), &meta);
            }
        }
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

    #[test]
    fn lookup_mirrors_the_kernel_walk() {
        let yaml = "apiVersion: pep/v1\nfiles:\n  default: allow\n  rules:\n\
             \x20   - allow: { path: \"/w/**\", access: [read, write] }\n\
             \x20   - deny: { path: \"/w/ro/**\", access: [write] }\n\
             \x20   - deny: { path: \"/w/ro/secret\" }\n\
             \x20   - deny: { name: \".env\" }\n";
        let p = load_str(yaml, "t.yaml", &LoadContext::new("/home/u")).expect("policy");
        let e = compile_files(&p.files, 1);
        let d = p.files.default.to_kernel();
        assert_eq!(lookup(&e, d, "/w/a"), ((VERDICT_ALLOW, 0), (VERDICT_ALLOW, 0)));
        assert_eq!(lookup(&e, d, "/w/ro/a"), ((VERDICT_ALLOW, 0), (VERDICT_DENY, 1)));
        assert_eq!(
            lookup(&e, d, "/w/ro/secret"),
            ((VERDICT_DENY, 2), (VERDICT_DENY, 2))
        );
        assert_eq!(lookup(&e, d, "/x/.env"), ((VERDICT_DENY, 3), (VERDICT_DENY, 3)));
        assert_eq!(
            lookup(&e, d, "/other"),
            ((VERDICT_ALLOW, u32::MAX), (VERDICT_ALLOW, u32::MAX))
        );
    }

    #[test]
    fn inode_denies_cover_exact_denies_and_linked_files_under_denied_prefixes() {
        let dir = std::env::temp_dir().join(format!("pep-inode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("secret/sub")).expect("mkdir");
        std::fs::write(dir.join("secret/sub/linked"), "x").expect("write");
        std::fs::write(dir.join("secret/single"), "x").expect("write");
        std::fs::hard_link(dir.join("secret/sub/linked"), dir.join("elsewhere")).expect("link");
        std::fs::write(dir.join("exact"), "x").expect("write");
        let d = dir.display();
        let yaml = format!(
            "apiVersion: pep/v1\nfiles:\n  default: allow\n  rules:\n\
             \x20   - deny: {{ path: \"{d}/secret/**\", access: [read] }}\n\
             \x20   - deny: {{ path: \"{d}/exact\", access: [write] }}\n\
             \x20   - deny: {{ path: \"{d}/missing\" }}\n"
        );
        let p = load_str(&yaml, "t.yaml", &LoadContext::new("/home/u")).expect("policy");
        let e = compile_files(&p.files, 4);
        let ids = inode_denies(&p.files, &e, 4);
        let id = |f: &str| inode_id(&std::fs::metadata(dir.join(f)).expect("stat"));
        let find = |f: &str| ids.iter().find(|(k, _)| (k.dev, k.ino) == id(f)).map(|(_, v)| *v);
        let linked = find("secret/sub/linked").expect("a linked file under a denied prefix");
        assert_eq!(
            (linked.read_verdict, linked.read_rule, linked.write_verdict),
            (VERDICT_DENY, 0, 0)
        );
        let exact = find("exact").expect("the exact deny");
        assert_eq!(
            (exact.read_verdict, exact.write_verdict, exact.write_rule),
            (0, VERDICT_DENY, 1)
        );
        assert!(
            find("secret/single").is_none(),
            "one link: no other name to guard"
        );
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(
            ids.iter()
                .all(|(k, _)| k.sandbox_id == 4 && k.kind == INODE_KIND_FILE)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
