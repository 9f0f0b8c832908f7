//! `pep-agent events tail`: print, filter and follow an audit log (`--file`),
//! or the live stream of a running pep-agent (`--socket`).

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Seek as _, SeekFrom},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{compact, ocsf, record::Record, sink::rotated};

/// Which records to print.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub sandbox: Option<String>,
    pub verdict: Option<String>,
    pub action: Option<String>,
}

impl Filter {
    pub fn matches(&self, r: &Record) -> bool {
        let sandbox_ok = self.sandbox.as_ref().is_none_or(|s| *s == r.sandbox);
        // Losses pass every filter but the sandbox: whoever follows a part
        // of the stream must learn that part of it may be missing.
        if r.action == "audit.lost" {
            return sandbox_ok;
        }
        let verdict = r
            .verdict
            .and_then(|v| serde_json::to_value(v).ok())
            .and_then(|v| v.as_str().map(String::from));
        sandbox_ok
            && self.verdict.as_ref().is_none_or(|v| Some(v) == verdict.as_ref())
            && self.action.as_ref().is_none_or(|a| {
                // `net` selects net.connect and net.send; `net.connect` itself.
                r.action == *a
                    || r.action
                        .strip_prefix(a.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Json,
    Compact,
    Ocsf,
}

/// How often a follower looks for more.
const POLL: Duration = Duration::from_millis(20);

fn ino(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

/// Prints the records of `path` that `filter` selects; with `follow`, keeps
/// reading as the file grows, across rotations (the writer renaming it to
/// `<path>.1`), until `stop` returns true.
pub fn tail(
    path: &Path,
    filter: &Filter,
    output: Output,
    follow: bool,
    out: &mut dyn std::io::Write,
    stop: &dyn Fn() -> bool,
) -> anyhow::Result<()> {
    let file = File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut cur = Reader::new(path.to_path_buf(), file)?;
    loop {
        cur.read_available(filter, output, out)?;
        if !follow {
            cur.finish(filter, output, out)?;
            return Ok(());
        }
        out.flush()?;
        if stop() {
            return Ok(());
        }
        // Rotated? The live path now names another file.
        match std::fs::metadata(path) {
            Ok(m) if ino(&m) != cur.id => {
                // The old file is complete once renamed (the writer flushes
                // before it rotates): read its rest, then go on with the
                // file written after it. One file at a time: the writer
                // may rotate again meanwhile (several times between two
                // looks), which this loop sees as the live path still
                // naming another file than `cur`.
                cur.read_available(filter, output, out)?;
                match next_file(path, cur.id)? {
                    Some(next) => cur = next,
                    None => std::thread::sleep(POLL),
                }
                continue;
            }
            Ok(m) if m.len() < cur.pos => {
                // Truncated in place: start over.
                cur.reader.seek(SeekFrom::Start(0))?;
                cur.pos = 0;
                cur.partial.clear();
            }
            _ => {}
        }
        std::thread::sleep(POLL);
    }
}

/// The file written after the one with id `done`: the name just before
/// it in `path`, `path.1`, `path.2`, ... (newest first), opened and checked
/// to be the file that name held when looked up (names shift when the
/// writer rotates). The live file when `done` is not among them (rotated
/// away, or moved elsewhere by an outside rotator). `None` if that is
/// missing too, for now.
fn next_file(path: &Path, done: (u64, u64)) -> anyhow::Result<Option<Reader>> {
    /// More lookups than this in a row means the names keep shifting
    /// under us faster than we can look; settle for the live file.
    const TRIES: usize = 100;
    for _ in 0..TRIES {
        // Newest first, up to `done`: the last of them was written after it.
        let mut newer: Vec<(PathBuf, (u64, u64))> = Vec::new();
        let mut found = false;
        for n in 0..=MAX_ROTATED {
            let p = if n == 0 {
                path.to_path_buf()
            } else {
                rotated(path, n)
            };
            let Ok(m) = std::fs::metadata(&p) else { break };
            if ino(&m) == done {
                found = true;
                break;
            }
            newer.push((p, ino(&m)));
        }
        let Some((name, want)) = newer.pop().filter(|_| found) else {
            if found {
                // `done` is the live file again: nothing newer yet.
                return Ok(None);
            }
            return open_live(path);
        };
        let Ok(f) = File::open(&name) else { continue };
        if ino(&f.metadata()?) == want {
            return Ok(Some(Reader::new(name, f)?));
        }
    }
    open_live(path)
}

/// The most rotated files `next_file` looks through.
const MAX_ROTATED: u32 = 10_000;

fn open_live(path: &Path) -> anyhow::Result<Option<Reader>> {
    match File::open(path) {
        Ok(f) => Ok(Some(Reader::new(path.to_path_buf(), f)?)),
        Err(_) => Ok(None),
    }
}

struct Reader {
    path: PathBuf,
    id: (u64, u64),
    reader: BufReader<File>,
    pos: u64,
    lineno: u64,
    partial: String,
}

impl Reader {
    fn new(path: PathBuf, file: File) -> anyhow::Result<Self> {
        let id = ino(&file.metadata()?);
        Ok(Self {
            path,
            id,
            reader: BufReader::with_capacity(256 << 10, file),
            pos: 0,
            lineno: 0,
            partial: String::new(),
        })
    }

    /// Prints every complete line there is now.
    fn read_available(
        &mut self,
        filter: &Filter,
        output: Output,
        out: &mut dyn std::io::Write,
    ) -> anyhow::Result<()> {
        loop {
            let n = self.reader.read_line(&mut self.partial)?;
            self.pos += n as u64;
            if n == 0 || !self.partial.ends_with('\n') {
                // Keep a partial last line for when the rest arrives.
                return Ok(());
            }
            self.lineno += 1;
            let line = std::mem::take(&mut self.partial);
            emit(&line, self.lineno, filter, output, out, &self.path)?;
        }
    }

    /// A last line without a newline, when not following.
    fn finish(
        &mut self,
        filter: &Filter,
        output: Output,
        out: &mut dyn std::io::Write,
    ) -> anyhow::Result<()> {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            emit(&line, self.lineno + 1, filter, output, out, &self.path)?;
        }
        Ok(())
    }
}

/// Prints one record in `output` form.
pub fn print(rec: &Record, line: &str, output: Output, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    match output {
        Output::Json => writeln!(out, "{line}"),
        Output::Compact => writeln!(out, "{}", compact::format(rec)),
        Output::Ocsf => writeln!(out, "{}", ocsf::to_ocsf(rec)),
    }
}

fn emit(
    line: &str,
    lineno: u64,
    filter: &Filter,
    output: Output,
    out: &mut dyn std::io::Write,
    path: &Path,
) -> anyhow::Result<()> {
    let line = line.trim_end_matches('\n');
    if line.is_empty() {
        return Ok(());
    }
    let rec: Record = serde_json::from_str(line)
        .map_err(|e| anyhow::anyhow!("{}:{lineno}: not an audit record: {e}", path.display()))?;
    if filter.matches(&rec) {
        print(&rec, line, output, out)?;
    }
    Ok(())
}

/// Follows the live stream at `socket` with `filter` (applied by the
/// server), printing until the stream ends. Waits up to `wait` for the
/// socket to appear.
pub fn tail_socket(
    socket: &Path,
    filter: &Filter,
    output: Output,
    wait: Duration,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let deadline = std::time::Instant::now() + wait;
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!("{}: {e}; retrying", socket.display());
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => anyhow::bail!("{}: {e}", socket.display()),
        }
    };
    let sub = super::hub::Subscribe {
        sandbox: filter.sandbox.clone(),
        verdict: filter.verdict.clone(),
        action: filter.action.clone(),
    };
    let mut w = &stream;
    writeln!(w, "{}", serde_json::to_string(&sub)?)?;
    let mut rd = BufReader::new(&stream);
    let mut line = String::new();
    let mut lineno = 0u64;
    loop {
        line.clear();
        if rd.read_line(&mut line)? == 0 {
            out.flush()?;
            return Ok(());
        }
        lineno += 1;
        let l = line.trim_end();
        if lineno == 1 && l == "{\"subscribed\":true}" {
            eprintln!("pep-agent: following {}", socket.display());
            continue;
        }
        let rec: Record = serde_json::from_str(l)
            .map_err(|e| anyhow::anyhow!("{}: not an audit record: {e}: {l}", socket.display()))?;
        print(&rec, l, output, out)?;
        // Live: each record as it comes, unless more are already waiting.
        if rd.buffer().is_empty() {
            out.flush()?;
        }
    }
}
