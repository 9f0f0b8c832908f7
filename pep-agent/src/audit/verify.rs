//! `pep-agent events verify FILE...`: checks the `seq` numbering and the
//! `prev` hash chain of a log, rotated files included, and names the first
//! broken record.
//!
//! Given one live file whose rotated siblings exist (`<path>.N` ... `.1`),
//! they are checked first, oldest first, as one chain. Given several files,
//! they are checked in the order given.
//!
//! Locating the altered line: a change anywhere in record L except its
//! `prev` leaves link (L-1, L) intact and breaks (L, L+1); a change to L's
//! `prev` breaks both (L-1, L) and (L, L+1). So at the first broken link
//! (A, B): when (B, C) is broken too, B was altered, else A. The last record
//! has no successor: anchor it elsewhere (see docs/AUDIT.md).

use std::path::{Path, PathBuf};

use super::{
    record::{GENESIS, Record, line_hash},
    sink::rotated,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub file: PathBuf,
    pub line: u64,
    pub seq: Option<u64>,
    pub reason: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if let Some(s) = self.seq {
            write!(f, "seq {s}: ")?;
        }
        write!(f, "{}", self.reason)
    }
}

/// The outcome of a successful check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The hash of the last record: compare it with a copy kept elsewhere to
    /// protect the last record too.
    pub head: String,
    /// The chain does not start at genesis (older files were rotated away).
    pub starts_mid_chain: bool,
}

/// The files to check for `args`: one file plus its rotated siblings
/// (oldest first), or the files as given.
pub fn expand(args: &[PathBuf]) -> Vec<PathBuf> {
    if let [one] = args {
        let mut files = Vec::new();
        let mut n = 1;
        while rotated(one, n).exists() {
            files.push(rotated(one, n));
            n += 1;
        }
        files.reverse();
        files.push(one.clone());
        files
    } else {
        args.to_vec()
    }
}

struct Line {
    file: PathBuf,
    lineno: u64,
    text: String,
    rec: Option<Record>,
}

/// Checks `files` in order as one chain.
pub fn verify(files: &[PathBuf]) -> Result<Verified, Broken> {
    let mut lines = Vec::new();
    for f in files {
        let text = std::fs::read(f).map_err(|e| Broken {
            file: f.clone(),
            line: 0,
            seq: None,
            reason: format!("cannot read: {e}"),
        })?;
        if !text.is_empty() && !text.ends_with(b"\n") {
            let n = text.iter().filter(|b| **b == b'\n').count() as u64 + 1;
            return Err(Broken {
                file: f.clone(),
                line: n,
                seq: None,
                reason: "partial last line (the writer stopped mid-record)".into(),
            });
        }
        for (i, raw) in text.split(|b| *b == b'\n').enumerate() {
            if raw.is_empty() {
                continue;
            }
            let s = String::from_utf8_lossy(raw).into_owned();
            let rec = serde_json::from_str::<Record>(&s).ok();
            lines.push(Line {
                file: f.clone(),
                lineno: i as u64 + 1,
                text: s,
                rec,
            });
        }
    }
    check(&lines)
}

fn broken(l: &Line, reason: String) -> Broken {
    Broken {
        file: l.file.clone(),
        line: l.lineno,
        seq: l.rec.as_ref().map(|r| r.seq),
        reason,
    }
}

fn check(lines: &[Line]) -> Result<Verified, Broken> {
    let Some(first) = lines.first() else {
        return Ok(Verified {
            records: 0,
            first_seq: None,
            last_seq: None,
            head: GENESIS.into(),
            starts_mid_chain: false,
        });
    };
    // Every line must be a record.
    for l in lines {
        if l.rec.is_none() {
            return Err(broken(l, "not an audit record (altered or corrupt)".into()));
        }
    }
    let rec = |i: usize| lines[i].rec.as_ref().expect("checked above");
    let links_ok = |a: usize| -> bool { rec(a + 1).prev == line_hash(&lines[a].text) };
    for i in 0..lines.len() {
        let r = rec(i);
        if i == 0 {
            if r.prev == GENESIS && r.seq != 1 {
                return Err(broken(first, "the chain starts here but seq is not 1".into()));
            }
            continue;
        }
        let prev_seq = rec(i - 1).seq;
        if !links_ok(i - 1) {
            let next_broken = i + 1 < lines.len() && !links_ok(i);
            // A single changed byte cannot both break this link and make
            // `seq` jump (a changed `seq` in the previous record was caught
            // one step earlier): records are missing here.
            if r.seq != prev_seq + 1 && !next_broken {
                return Err(broken(
                    &lines[i],
                    format!(
                        "seq {} follows seq {prev_seq}: records missing or reordered",
                        r.seq
                    ),
                ));
            }
            // Which of the two lines changed: see the module doc.
            let culprit = if next_broken { i } else { i - 1 };
            let why = if next_broken {
                "record altered (its prev does not match the previous record, and its hash does not match the next record's prev)"
            } else {
                "record altered (its hash does not match the next record's prev)"
            };
            return Err(broken(&lines[culprit], why.into()));
        }
        if r.seq != prev_seq + 1 {
            return Err(broken(
                &lines[i],
                format!(
                    "seq {} follows seq {prev_seq}: records missing or reordered",
                    r.seq
                ),
            ));
        }
    }
    let last = lines.last().expect("non-empty");
    Ok(Verified {
        records: lines.len() as u64,
        first_seq: Some(rec(0).seq),
        last_seq: last.rec.as_ref().map(|r| r.seq),
        head: line_hash(&last.text),
        starts_mid_chain: rec(0).prev != GENESIS,
    })
}

/// `events verify`: prints the verdict; exit status 0 intact, 1 broken.
pub fn run(args: &[PathBuf], out: &mut dyn std::io::Write) -> anyhow::Result<i32> {
    let files = expand(args);
    match verify(&files) {
        Ok(v) => {
            let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            writeln!(
                out,
                "ok: {} records, seq {}..{}{} in {}; head {}",
                v.records,
                v.first_seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                v.last_seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                if v.starts_mid_chain {
                    " (older records rotated away)"
                } else {
                    ""
                },
                names.join(", "),
                v.head
            )?;
            Ok(0)
        }
        Err(b) => {
            writeln!(out, "BROKEN: {b}")?;
            Ok(1)
        }
    }
}

/// For callers that only have paths.
pub fn verify_paths(paths: &[&Path]) -> Result<Verified, Broken> {
    let v: Vec<PathBuf> = paths.iter().map(|p| p.to_path_buf()).collect();
    verify(&expand(&v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Chain, SandboxContext};

    fn write_log(path: &Path, n: usize) -> Vec<String> {
        let ctx = SandboxContext {
            name: "t".into(),
            policy_revision: "sha256:x".into(),
            degraded: None,
        };
        let mut chain = Chain::default();
        let lines: Vec<String> = (0..n).map(|i| chain.lost(i as u64 + 1, &ctx).1).collect();
        std::fs::write(path, lines.join("\n") + "\n").expect("write");
        lines
    }

    #[test]
    fn fresh_log_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.jsonl");
        let lines = write_log(&p, 10);
        let v = verify(&expand(&[p])).expect("intact");
        assert_eq!((v.records, v.first_seq, v.last_seq), (10, Some(1), Some(10)));
        assert_eq!(v.head, line_hash(&lines[9]));
    }

    #[test]
    fn names_the_altered_line_wherever_the_byte_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.jsonl");
        let lines = write_log(&p, 10);
        // Each field of line 5 (index 4) in turn, including its prev.
        for field in ["\"count\":5", "\"prev\":\"sha256:", "\"sandbox\":\"t\""] {
            let pos = lines[4].find(field).expect(field) + field.len() - 1;
            let mut bad = lines.clone();
            let mut bytes = bad[4].clone().into_bytes();
            bytes[pos] = if bytes[pos] == b'9' { b'8' } else { b'9' };
            bad[4] = String::from_utf8(bytes).expect("utf8");
            std::fs::write(&p, bad.join("\n") + "\n").expect("write");
            let b = verify(&expand(std::slice::from_ref(&p))).expect_err("must break");
            assert_eq!(b.line, 5, "altering {field}: {b}");
        }
    }

    #[test]
    fn rotated_files_are_one_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.jsonl");
        let lines = write_log(&p, 9);
        std::fs::write(rotated(&p, 2), lines[..3].join("\n") + "\n").expect("write");
        std::fs::write(rotated(&p, 1), lines[3..6].join("\n") + "\n").expect("write");
        std::fs::write(&p, lines[6..].join("\n") + "\n").expect("write");
        let v = verify(&expand(std::slice::from_ref(&p))).expect("intact");
        assert_eq!(v.records, 9);
        // A rotated file missing in the middle is a hole.
        std::fs::remove_file(rotated(&p, 1)).expect("rm");
        std::fs::rename(rotated(&p, 2), rotated(&p, 1)).expect("mv");
        let b = verify(&expand(std::slice::from_ref(&p))).expect_err("hole");
        assert_eq!((b.file.clone(), b.line, b.seq), (p.clone(), 1, Some(7)), "{b}");
    }
}
