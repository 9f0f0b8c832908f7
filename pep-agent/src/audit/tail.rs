//! `pep-agent events tail --file PATH`: print, filter and follow an audit log.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    path::Path,
    time::Duration,
};

use super::{compact, record::Record};

/// Which records to print.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub sandbox: Option<String>,
    pub verdict: Option<String>,
    pub action: Option<String>,
}

impl Filter {
    pub fn matches(&self, r: &Record) -> bool {
        let verdict = r
            .verdict
            .and_then(|v| serde_json::to_value(v).ok())
            .and_then(|v| v.as_str().map(String::from));
        self.sandbox.as_ref().is_none_or(|s| *s == r.sandbox)
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
}

/// Prints the records of `path` that `filter` selects; with `follow`, keeps
/// reading as the file grows until `stop` returns true.
pub fn tail(
    path: &Path,
    filter: &Filter,
    output: Output,
    follow: bool,
    out: &mut dyn std::io::Write,
    stop: &dyn Fn() -> bool,
) -> anyhow::Result<()> {
    let file = File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    let mut lineno = 0u64;
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            if !follow || stop() {
                if n > 0 && !follow {
                    emit(&line, lineno + 1, filter, output, out, path)?;
                }
                return Ok(());
            }
            // A partial last line: wait for the rest of it.
            if n > 0 {
                let mut rest = String::new();
                loop {
                    std::thread::sleep(Duration::from_millis(50));
                    rest.clear();
                    if reader.read_line(&mut rest)? > 0 {
                        line.push_str(&rest);
                        if line.ends_with('\n') {
                            break;
                        }
                    } else if stop() {
                        return Ok(());
                    }
                }
            } else {
                out.flush()?;
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        lineno += 1;
        emit(&line, lineno, filter, output, out, path)?;
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
        match output {
            Output::Json => writeln!(out, "{line}")?,
            Output::Compact => writeln!(out, "{}", compact::format(&rec))?,
        }
    }
    Ok(())
}
