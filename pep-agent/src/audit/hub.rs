//! The live stream: a unix socket that any number of tailers follow at once.
//!
//! A tailer connects and sends one line, its filter as JSON
//! (`{"sandbox": .., "verdict": .., "action": ..}`, every key optional); it
//! then receives every record the filter selects, one JSON line each.
//!
//! Each tailer has its own bounded queue. The pipeline only ever `try_send`s,
//! so a slow or stuck tailer never slows the pipeline (nor enforcement, nor
//! the file sink): when its queue is full the records it misses are counted,
//! and as soon as there is room it receives an in-band `audit.lost` marker
//! (`"reason": "tailer"`, `"seq": 0`: the marker is local to that tailer and
//! not part of the chain) with the count, before the next record.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, BufWriter},
    net::{UnixListener, UnixStream},
    sync::mpsc,
    task::JoinHandle,
};

use super::{
    record::{Record, SandboxContext, lost_record},
    tail::Filter,
};

/// Records a tailer may have in flight before it starts losing them.
pub const DEFAULT_TAILER_QUEUE: usize = 8192;

/// What a tailer asks for, sent as its first line.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Subscribe {
    #[serde(default)]
    pub sandbox: Option<String>,
    #[serde(default)]
    pub verdict: Option<String>,
    #[serde(default)]
    pub action: Option<String>,
}

impl From<&Subscribe> for Filter {
    fn from(s: &Subscribe) -> Self {
        Filter {
            sandbox: s.sandbox.clone(),
            verdict: s.verdict.clone(),
            action: s.action.clone(),
        }
    }
}

struct Tailer {
    filter: Filter,
    tx: mpsc::Sender<Arc<str>>,
    /// Records this tailer's filter selected that its queue had no room for
    /// and that no marker has reported yet.
    dropped: u64,
}

/// The socket server and its tailers.
pub struct Hub {
    tailers: Arc<Mutex<Vec<Tailer>>>,
    writers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
    path: PathBuf,
    lost_ctx: SandboxContext,
}

impl Hub {
    /// Listens on `path` (replacing a stale socket). Must run inside a tokio
    /// runtime.
    pub fn bind(path: &Path, queue: usize, lost_ctx: SandboxContext) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        // Records name processes and files: owner and group only.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        }
        let tailers: Arc<Mutex<Vec<Tailer>>> = Arc::default();
        let writers: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn(accept_loop(
            listener,
            tailers.clone(),
            writers.clone(),
            queue.max(1),
        ));
        Ok(Self {
            tailers,
            writers,
            accept,
            path: path.to_path_buf(),
            lost_ctx,
        })
    }

    /// How many tailers are connected.
    pub fn tailers(&self) -> usize {
        self.tailers.lock().map(|t| t.len()).unwrap_or(0)
    }

    /// Offers one record to every tailer whose filter selects it. Never
    /// blocks.
    pub fn publish(&self, rec: &Record, line: &str) {
        let Ok(mut tailers) = self.tailers.lock() else {
            return;
        };
        if tailers.is_empty() {
            return;
        }
        let mut shared: Option<Arc<str>> = None;
        tailers.retain_mut(|t| {
            if !t.filter.matches(rec) {
                return true;
            }
            if t.dropped > 0 {
                let mut marker = lost_record(t.dropped, "tailer", &self.lost_ctx);
                marker.prev = String::new();
                let m = serde_json::to_string(&marker).expect("records always serialize");
                match t.tx.try_send(m.into()) {
                    Ok(()) => t.dropped = 0,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        t.dropped += 1;
                        return true;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            let l = shared.get_or_insert_with(|| Arc::from(line)).clone();
            match t.tx.try_send(l) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    t.dropped += 1;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// Stops accepting, sends each tailer what it is still owed (a final
    /// marker if it lost records), closes the streams and waits up to
    /// `grace` for the tailers to read what is queued.
    pub async fn close(self, grace: Duration) {
        self.accept.abort();
        let tailers = std::mem::take(&mut *self.tailers.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tailers {
            if t.dropped > 0 {
                let marker = lost_record(t.dropped, "tailer", &self.lost_ctx);
                let m = serde_json::to_string(&marker).expect("records always serialize");
                // Waits for room: the stream is ending, nothing else to slow.
                let _ = tokio::time::timeout(grace, t.tx.send(m.into())).await;
            }
        }
        let writers = std::mem::take(&mut *self.writers.lock().unwrap_or_else(|e| e.into_inner()));
        let deadline = tokio::time::Instant::now() + grace;
        for w in writers {
            if tokio::time::timeout_at(deadline, w).await.is_err() {
                tracing::warn!("a tailer did not read its last records in time");
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept_loop(
    listener: UnixListener,
    tailers: Arc<Mutex<Vec<Tailer>>>,
    writers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    queue: usize,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tailers = tailers.clone();
        let w = tokio::spawn(async move {
            if let Err(e) = serve(stream, tailers, queue).await {
                tracing::debug!("tailer: {e}");
            }
        });
        if let Ok(mut ws) = writers.lock() {
            ws.retain(|h| !h.is_finished());
            ws.push(w);
        }
    }
}

async fn serve(stream: UnixStream, tailers: Arc<Mutex<Vec<Tailer>>>, queue: usize) -> std::io::Result<()> {
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut first = String::new();
    tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut first))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no filter line"))??;
    let sub: Subscribe = if first.trim().is_empty() {
        Subscribe::default()
    } else {
        serde_json::from_str(first.trim())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
    };
    let (tx, mut rx) = mpsc::channel::<Arc<str>>(queue);
    tailers
        .lock()
        .map_err(|_| std::io::Error::other("poisoned"))?
        .push(Tailer {
            filter: Filter::from(&sub),
            tx,
            dropped: 0,
        });
    let mut out = BufWriter::with_capacity(64 << 10, wr);
    // Tells the tailer it is subscribed: records from here on reach it.
    out.write_all(b"{\"subscribed\":true}\n").await?;
    out.flush().await?;
    while let Some(line) = rx.recv().await {
        out.write_all(line.as_bytes()).await?;
        out.write_all(b"\n").await?;
        // Flush only when caught up: batches under load, prompt when idle.
        if rx.is_empty() {
            out.flush().await?;
        }
    }
    out.flush().await?;
    out.shutdown().await
}
