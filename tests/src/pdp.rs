//! A `pep-agent pdp serve` of a test's own: the remote PDP the `opa` engine
//! asks, whose request counter the test reads from outside any sandbox.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
};

use crate::pep_agent_bin;

/// A `pep-agent pdp serve` process, killed on drop.
pub struct PdpServer {
    child: Child,
    pub addr: SocketAddr,
}

impl PdpServer {
    /// Serves `rego` on a free loopback port; returns once it listens.
    pub fn start(rego: &Path) -> Self {
        let mut child = Command::new(pep_agent_bin())
            .args(["pdp", "serve", "--listen", "127.0.0.1:0", "--policy"])
            .arg(rego)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pdp serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("pdp serve exited before listening")
                .expect("read stderr");
            if let Some(a) = line.split("listening on http://").nth(1) {
                break a.trim().parse().expect("listen address");
            }
        };
        // Keep draining stderr so the server never blocks on it.
        thread::spawn(move || for _ in lines {});
        Self { child, addr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The Data API URL of `data.pep.decision`, for `pdp.opa.url`.
    pub fn url(&self) -> String {
        format!("http://{}/v1/data/pep/decision", self.addr)
    }

    /// The server's request counter, read from outside the sandbox.
    pub fn requests(&self) -> u64 {
        let mut s = TcpStream::connect(self.addr).expect("connect pdp");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("write");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read");
        text.lines()
            .find_map(|l| l.strip_prefix("pep_pdp_requests_total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no counter in {text}"))
    }
}

impl Drop for PdpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
