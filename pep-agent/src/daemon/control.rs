//! The control socket server: one task per connection, JSON lines each way,
//! the caller identified by SO_PEERCRED. A connection that sends nothing
//! for `client_timeout_ms`, or too long a line, is closed; it never holds
//! the lock that requests take, so a stalled client blocks no one else.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Mutex, watch},
};

use super::{
    authz::Peer,
    protocol::{self as proto, Request, Response},
    sandboxes::Core,
};

pub struct Server {
    pub core: Arc<Mutex<Core>>,
    pub timeout: Duration,
    pub max_request: usize,
}

impl Server {
    pub async fn serve(self: Arc<Self>, listener: UnixListener, mut shutdown: watch::Receiver<bool>) {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("control accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let this = self.clone();
            let mut stop = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    r = this.connection(stream) => if let Err(e) = r {
                        tracing::debug!("control connection: {e}");
                    },
                    _ = stop.changed() => {}
                }
            });
        }
    }

    async fn connection(&self, stream: UnixStream) -> std::io::Result<()> {
        let cred = stream.peer_cred()?;
        let peer = Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
        };
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let mut line = Vec::new();
        loop {
            line.clear();
            let limit = self.max_request as u64 + 1;
            let n =
                match tokio::time::timeout(self.timeout, (&mut r).take(limit).read_until(b'\n', &mut line))
                    .await
                {
                    Err(_) => return Ok(()), // idle too long
                    Ok(res) => res?,
                };
            if n == 0 {
                return Ok(());
            }
            if line.last() != Some(&b'\n') && line.len() > self.max_request {
                let resp = Response::err(
                    proto::BAD_REQUEST,
                    format!("request longer than {} bytes", self.max_request),
                );
                write_line(&mut w, &resp, self.timeout).await?;
                return Ok(());
            }
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            let resp = match serde_json::from_str::<Request>(text.trim()) {
                Ok(req) => {
                    let mut core = self.core.lock().await;
                    // Kernel map writes and cgroup I/O are short blocking
                    // system calls; `block_in_place` keeps the other tasks
                    // (audit, metrics, other clients' reads) running.
                    tokio::task::block_in_place(|| core.handle(req, &peer))
                }
                Err(e) => Response::err(proto::BAD_REQUEST, format!("malformed request: {e}")),
            };
            write_line(&mut w, &resp, self.timeout).await?;
        }
    }
}

async fn write_line(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    resp: &Response,
    timeout: Duration,
) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(resp).expect("responses always serialize");
    out.push(b'\n');
    tokio::time::timeout(timeout, w.write_all(&out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client does not read"))?
}
