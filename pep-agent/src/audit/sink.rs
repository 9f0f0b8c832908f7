//! Where records go: a file (appended) or standard output.

use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    path::Path,
};

/// A line sink. Lines are flushed per batch, not per record.
pub struct Sink {
    out: Box<dyn Write + Send>,
}

impl Sink {
    /// `-` is standard output; anything else a file opened for append.
    pub fn open(target: &str) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = if target == "-" {
            Box::new(BufWriter::new(io::stdout()))
        } else {
            Box::new(BufWriter::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(Path::new(target))?,
            ))
        };
        Ok(Self { out })
    }

    /// A sink that discards, for runs without `--audit`.
    pub fn null() -> Self {
        Self {
            out: Box::new(io::sink()),
        }
    }

    pub fn write_line(&mut self, line: &str) -> io::Result<()> {
        self.out.write_all(line.as_bytes())?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
