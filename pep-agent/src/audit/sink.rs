//! Where records go: a file with size-based rotation, or standard output.
//!
//! A file sink resumes the chain of the log it appends to (`seq` and `prev`
//! continue from its last record, or from the newest rotated file's), so one
//! log stays one chain across runs and across rotations.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Read as _, Seek as _, SeekFrom, Write},
    path::{Path, PathBuf},
};

use super::record::{GENESIS, Record, line_hash};

/// Size-based rotation: when writing a line would take the live file past
/// `max_bytes`, it becomes `<path>.1` (`.1` becomes `.2`, ...; at most
/// `max_files` rotated files are kept, the oldest is removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// 0: never rotate.
    pub max_bytes: u64,
    pub max_files: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_bytes: 0,
            max_files: 5,
        }
    }
}

/// A line sink. Lines are flushed per batch, not per record.
pub struct Sink {
    out: Out,
    written: u64,
}

enum Out {
    Null,
    Stdout(BufWriter<io::Stdout>),
    File(RotatingFile),
}

/// `<path>.<n>`.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

struct RotatingFile {
    path: PathBuf,
    rotation: Rotation,
    file: BufWriter<File>,
    size: u64,
}

impl RotatingFile {
    fn open(path: &Path, rotation: Rotation) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        let mut this = Self {
            path: path.to_path_buf(),
            rotation,
            // Large buffer: the file sink writes batches of thousands of lines.
            file: BufWriter::with_capacity(256 << 10, file),
            size,
        };
        // A crash mid-line left a partial record: start a fresh line so the
        // next record parses (`events verify` still reports the partial one).
        if size > 0 && !ends_with_newline(path)? {
            this.file.write_all(b"\n")?;
            this.size += 1;
        }
        Ok(this)
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.rotation.max_bytes > 0 && self.size > 0 && self.size + len > self.rotation.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line.as_bytes())?;
        self.file.write_all(b"\n")?;
        self.size += len;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        let keep = self.rotation.max_files.max(1);
        // The oldest goes; every other moves up by one; the live file is .1.
        let _ = std::fs::remove_file(rotated(&self.path, keep));
        for n in (1..keep).rev() {
            let from = rotated(&self.path, n);
            if from.exists() {
                std::fs::rename(&from, rotated(&self.path, n + 1))?;
            }
        }
        std::fs::rename(&self.path, rotated(&self.path, 1))?;
        self.reopen()
    }

    /// Opens `path` again (after an outside rotation, e.g. logrotate).
    fn reopen(&mut self) -> io::Result<()> {
        self.file.flush()?;
        let file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = BufWriter::with_capacity(256 << 10, file);
        Ok(())
    }
}

fn ends_with_newline(path: &Path) -> io::Result<bool> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(true);
    }
    f.seek(SeekFrom::Start(len - 1))?;
    let mut b = [0u8; 1];
    f.read_exact(&mut b)?;
    Ok(b[0] == b'\n')
}

/// Cuts `path` back to its last complete line, dropping a line a writer
/// killed mid-write left partial; returns how many bytes went. Only for a
/// writer whose sources keep what it has not flushed (the host daemon
/// gives its ring buffers back only after a flush), so the dropped line is
/// written again, whole, by the next writer.
pub fn drop_torn_tail(path: &Path) -> io::Result<u64> {
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len == 0 || ends_with_newline(path)? {
        return Ok(0);
    }
    // Search back from the end for the last newline.
    let mut end = len;
    let mut keep = 0;
    while end > 0 {
        let start = end.saturating_sub(64 << 10);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = vec![0u8; (end - start) as usize];
        f.read_exact(&mut buf)?;
        if let Some(i) = buf.iter().rposition(|b| *b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    f.set_len(keep)?;
    Ok(len - keep)
}

/// The last complete line of `path`, if any.
pub fn last_line(path: &Path) -> io::Result<Option<String>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    // Records are well under 64 KiB; read more if a line is longer.
    let mut window = 64u64 << 10;
    loop {
        let start = len.saturating_sub(window);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        // Only complete lines count.
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
            if start == 0 {
                return Ok(None);
            }
            window *= 4;
            continue;
        };
        let body = &buf[..end];
        match body.iter().rposition(|b| *b == b'\n') {
            Some(i) => return Ok(Some(String::from_utf8_lossy(&body[i + 1..]).into_owned())),
            None if start == 0 => return Ok(Some(String::from_utf8_lossy(body).into_owned())),
            None => window *= 4,
        }
    }
}

/// Where the chain of the log at `path` stands: (next seq, prev), from its
/// last record, or the newest rotated file's; a fresh chain otherwise.
pub fn resume_point(path: &Path) -> (u64, String) {
    for p in [path.to_path_buf(), rotated(path, 1)] {
        if let Ok(Some(line)) = last_line(&p)
            && !line.trim().is_empty()
        {
            if let Ok(rec) = serde_json::from_str::<Record>(&line) {
                return (rec.seq + 1, line_hash(&line));
            }
            // An unreadable last line: keep chaining from it, so `verify`
            // points at it rather than at the next record.
            tracing::warn!(
                "{}: last line is not a record; chaining from it anyway",
                p.display()
            );
            return (1, line_hash(&line));
        }
    }
    (1, GENESIS.to_string())
}

impl Sink {
    /// `-` is standard output; anything else a file opened for append.
    pub fn open(target: &str) -> io::Result<Self> {
        Self::open_rotating(target, Rotation::default())
    }

    /// As `open`, with rotation for a file.
    pub fn open_rotating(target: &str, rotation: Rotation) -> io::Result<Self> {
        let out = if target == "-" {
            Out::Stdout(BufWriter::with_capacity(256 << 10, io::stdout()))
        } else {
            Out::File(RotatingFile::open(Path::new(target), rotation)?)
        };
        Ok(Self { out, written: 0 })
    }

    /// A sink that discards, for runs without `--audit`.
    pub fn null() -> Self {
        Self {
            out: Out::Null,
            written: 0,
        }
    }

    /// Where this sink's chain continues from: see `resume_point`.
    pub fn resume(&self) -> (u64, String) {
        match &self.out {
            Out::File(f) => resume_point(&f.path),
            _ => (1, GENESIS.to_string()),
        }
    }

    pub fn write_line(&mut self, line: &str) -> io::Result<()> {
        self.written += 1;
        match &mut self.out {
            Out::Null => Ok(()),
            Out::Stdout(w) => {
                w.write_all(line.as_bytes())?;
                w.write_all(b"\n")
            }
            Out::File(f) => f.write_line(line),
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Out::Null => Ok(()),
            Out::Stdout(w) => w.flush(),
            Out::File(f) => f.file.flush(),
        }
    }

    /// Reopens a file sink (SIGUSR1, after an outside rotation).
    pub fn reopen(&mut self) -> io::Result<()> {
        match &mut self.out {
            Out::File(f) => f.reopen(),
            _ => Ok(()),
        }
    }

    /// Lines written since opened.
    pub fn written(&self) -> u64 {
        self.written
    }
}

#[cfg(test)]
mod torn_tests {
    use super::*;

    #[test]
    fn only_a_partial_last_line_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.jsonl");
        std::fs::write(&p, "{\"a\":1}\n{\"b\":2}\n{\"c\":").expect("write");
        assert_eq!(drop_torn_tail(&p).expect("drop"), 5);
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "{\"a\":1}\n{\"b\":2}\n"
        );
        assert_eq!(drop_torn_tail(&p).expect("again"), 0, "whole lines stay");
        std::fs::write(&p, "partial").expect("write");
        assert_eq!(drop_torn_tail(&p).expect("drop"), 7);
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "");
        assert_eq!(drop_torn_tail(&dir.path().join("none")).expect("missing"), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Chain, SandboxContext};

    fn ctx() -> SandboxContext {
        SandboxContext {
            name: "t".into(),
            policy_revision: "sha256:x".into(),
            degraded: None,
        }
    }

    #[test]
    fn rotates_by_size_and_keeps_max_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let rotation = Rotation {
            max_bytes: 2000,
            max_files: 3,
        };
        let mut sink = Sink::open_rotating(path.to_str().expect("utf8"), rotation).expect("open");
        let mut chain = Chain::default();
        for _ in 0..100 {
            let (_, line) = chain.lost(1, &ctx());
            sink.write_line(&line).expect("write");
        }
        sink.flush().expect("flush");
        for p in [
            path.clone(),
            rotated(&path, 1),
            rotated(&path, 2),
            rotated(&path, 3),
        ] {
            let len = std::fs::metadata(&p)
                .map(|m| m.len())
                .unwrap_or_else(|e| panic!("{p:?}: {e}"));
            assert!(len <= 2000, "{p:?} is {len} bytes");
        }
        assert!(!rotated(&path, 4).exists(), "only 3 rotated files are kept");
        // The live file continues the chain of .1.
        let first_live: Record = serde_json::from_str(
            std::fs::read_to_string(&path)
                .expect("read")
                .lines()
                .next()
                .expect("a line"),
        )
        .expect("record");
        let last_rotated = last_line(&rotated(&path, 1)).expect("read").expect("a line");
        assert_eq!(first_live.prev, line_hash(&last_rotated));
        // A new sink on the same path resumes after the last record.
        let (next, prev) = resume_point(&path);
        assert_eq!(next, 101);
        assert_eq!(prev, line_hash(&last_line(&path).expect("read").expect("line")));
    }

    #[test]
    fn last_line_ignores_a_partial_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, "a\nbb\npartial").expect("write");
        assert_eq!(last_line(&p).expect("read").as_deref(), Some("bb"));
        std::fs::write(&p, "only\n").expect("write");
        assert_eq!(last_line(&p).expect("read").as_deref(), Some("only"));
        std::fs::write(&p, "").expect("write");
        assert_eq!(last_line(&p).expect("read"), None);
    }
}
