//! The resolver of one sandbox: UDP and TCP on 127.0.0.1 and ::1, one port
//! per sandbox (the port tells which sandbox asks, since the kernel steers
//! each sandbox to its own).
//!
//! Each query: decide the name (domain rules, then `network.default`, the
//! PDP for `ask`); denied: answer NXDOMAIN (the name does not exist for this
//! sandbox; REFUSED would make some stub resolvers try the next server,
//! which the kernel steers here again); allowed: forward the query as is to
//! the upstream, learn every A and AAAA address of the answer that the
//! name's CNAME chain reaches, into the kernel map BEFORE the reply leaves
//! (so the connect that follows the lookup never races the map), cap the
//! answer's TTLs at `max_ttl_s` (so the client never caches an address
//! longer than the kernel allows it), and reply. One `dns.query` record per
//! query.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{Name, RData},
};
use pep_common::{
    event::VERDICT_DENY,
    net::{NetRule as KernelRule, PROTO_TCP, PROTO_UDP},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
    task::JoinHandle,
};

use super::{
    DomainNames,
    kernel::DnsMaps,
    peer,
    rules::{DomainRules, NameDecision},
};
use crate::{
    audit::{
        decode::{Mode as RecMode, Source, Verdict as RecVerdict},
        record::{Net, Process, Record, read_exe},
    },
    pdp::{
        Pdp,
        query::{Context, Query, Resource, Subject},
    },
    policy::{Mode, NetDefault},
};

/// Upstream UDP: wait this long for an answer, then send once more.
const UDP_TRY: Duration = Duration::from_millis(1500);
/// Upstream TCP: connect and exchange within this.
const TCP_TIMEOUT: Duration = Duration::from_secs(4);
/// An idle client TCP connection is closed after this.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Most names the domain-id table holds before it starts over.
const MAX_DOMAIN_IDS: usize = 65536;

/// One sandbox's resolver settings.
#[derive(Clone)]
pub struct SandboxDns {
    pub sandbox_id: u32,
    /// The sandbox's name in records.
    pub name: String,
    /// Its cgroup: whose processes may have sent a query.
    pub cgroup: PathBuf,
    pub mode: Mode,
    pub policy_revision: String,
    pub degraded: Option<String>,
    pub rules: DomainRules,
    pub default: NetDefault,
    /// Asked for `dns.query` when no domain rule matches and the default is
    /// `ask`; `None` there means deny.
    pub pdp: Option<Arc<dyn Pdp>>,
    pub pdp_budget: Duration,
    pub upstream: SocketAddr,
    pub min_ttl_s: u32,
    pub max_ttl_s: u32,
}

/// What the resolver tasks share.
pub(crate) struct Shared {
    pub cfg: SandboxDns,
    pub maps: Arc<Mutex<DnsMaps>>,
    pub names: DomainNames,
    pub records: mpsc::UnboundedSender<Record>,
    domain_ids: Mutex<HashMap<String, u32>>,
}

/// Sockets bound before the sandbox exists (the kernel must know the port).
pub struct Bound {
    pub port: u16,
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
}

/// Binds UDP and TCP on 127.0.0.1 and ::1, on one free port. Without IPv6
/// loopback only 127.0.0.1 is served (IPv6 queries then fail: closed).
pub fn bind() -> io::Result<Bound> {
    let mut last = None;
    for _ in 0..16 {
        let u4 = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = u4.local_addr()?.port();
        let t4 = match std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(t) => t,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let mut b = Bound {
            port,
            udp: vec![u4],
            tcp: vec![t4],
        };
        match (
            std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, port)),
            std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, port)),
        ) {
            (Ok(u6), Ok(t6)) => {
                b.udp.push(u6);
                b.tcp.push(t6);
            }
            (Err(e), _) | (_, Err(e)) if e.kind() == io::ErrorKind::AddrInUse => {
                last = Some(e);
                continue;
            }
            (Err(e), _) | (_, Err(e)) => tracing::warn!("DNS resolver: no IPv6 loopback ({e})"),
        }
        for s in &b.udp {
            s.set_nonblocking(true)?;
        }
        for s in &b.tcp {
            s.set_nonblocking(true)?;
        }
        return Ok(b);
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free port for the DNS resolver")))
}

/// Starts serving on `bound`; the tasks run until aborted.
pub(crate) fn serve(bound: Bound, shared: Arc<Shared>) -> io::Result<Vec<JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for s in bound.udp {
        let s = Arc::new(UdpSocket::from_std(s)?);
        tasks.push(tokio::spawn(serve_udp(s, shared.clone())));
    }
    for l in bound.tcp {
        let l = TcpListener::from_std(l)?;
        tasks.push(tokio::spawn(serve_tcp(l, shared.clone())));
    }
    Ok(tasks)
}

impl Shared {
    pub fn new(
        cfg: SandboxDns,
        maps: Arc<Mutex<DnsMaps>>,
        names: DomainNames,
        records: mpsc::UnboundedSender<Record>,
    ) -> Self {
        Self {
            cfg,
            maps,
            names,
            records,
            domain_ids: Mutex::new(HashMap::new()),
        }
    }

    fn domain_id(&self, name: &str) -> u32 {
        let mut ids = self.domain_ids.lock().unwrap_or_else(|e| e.into_inner());
        if ids.len() >= MAX_DOMAIN_IDS && !ids.contains_key(name) {
            ids.clear();
        }
        let next = ids.len() as u32 + 1;
        *ids.entry(name.to_owned()).or_insert(next)
    }
}

async fn serve_udp(sock: Arc<UdpSocket>, shared: Arc<Shared>) {
    let local = match sock.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("DNS resolver: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, client) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("DNS resolver (udp): {e}");
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let (sock, shared) = (sock.clone(), shared.clone());
        tokio::spawn(async move {
            if let Some(reply) = answer(&shared, &query, client, local, PROTO_UDP).await
                && let Err(e) = sock.send_to(&reply, client).await
            {
                tracing::debug!("DNS reply to {client}: {e}");
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("DNS resolver (tcp): {e}");
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = tcp_client(stream, client, &shared).await {
                tracing::debug!("DNS over TCP from {client}: {e}");
            }
        });
    }
}

async fn tcp_client(mut stream: TcpStream, client: SocketAddr, shared: &Shared) -> io::Result<()> {
    let local = stream.local_addr()?;
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            // Closed or idle: done.
            _ => return Ok(()),
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        let Some(reply) = answer(shared, &query, client, local, PROTO_TCP).await else {
            return Ok(());
        };
        let len = u16::try_from(reply.len()).map_err(|_| io::Error::other("reply too long"))?;
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&reply);
        stream.write_all(&out).await?;
    }
}

/// How a name was decided.
struct Verdict {
    allow: bool,
    source: Source,
    rule: Option<u32>,
    /// Allowed by domain rules: the learned entries.
    learn: Option<Vec<KernelRule>>,
    pdp: Option<Value>,
}

/// Who sent the query, best effort.
#[derive(Default)]
struct Who {
    sock: Option<peer::SockInfo>,
    proc_: Option<peer::ProcInfo>,
}

fn identify(client: SocketAddr, local: SocketAddr, protocol: u8, cgroup: &std::path::Path) -> Who {
    let mut who = Who::default();
    // The kernel finds a TCP socket by (src = its local end) and a UDP one
    // by (dst = its local end); the other orientation finds our own socket.
    let orders = if protocol == PROTO_TCP {
        [(client, local), (local, client)]
    } else {
        [(local, client), (client, local)]
    };
    for (src, dst) in orders {
        if let Ok(info) = peer::query(src, dst, protocol) {
            if let Some(p) = peer::owner(cgroup, info.inode) {
                return Who {
                    sock: Some(info),
                    proc_: Some(p),
                };
            }
            who.sock.get_or_insert(info);
        }
    }
    who
}

/// The reply to one query (`None`: not a DNS message, dropped).
async fn answer(
    shared: &Shared,
    query: &[u8],
    client: SocketAddr,
    local: SocketAddr,
    protocol: u8,
) -> Option<Vec<u8>> {
    let cfg = &shared.cfg;
    let req = Message::from_vec(query).ok()?;
    if req.message_type() != MessageType::Query {
        return None;
    }
    let cgroup = cfg.cgroup.clone();
    let who = tokio::task::spawn_blocking(move || identify(client, local, protocol, &cgroup));
    let Some(q) = req.queries().first().cloned() else {
        return Some(reply_code(&req, ResponseCode::FormErr));
    };
    let qname = display_name(q.name());
    let mut verdict = match cfg.rules.decide(&qname) {
        NameDecision::Allow { rule_idx, entries } => Verdict {
            allow: true,
            source: Source::Rule,
            rule: Some(rule_idx),
            learn: Some(entries),
            pdp: None,
        },
        NameDecision::Deny { rule_idx } => Verdict {
            allow: false,
            source: Source::Rule,
            rule: Some(rule_idx),
            learn: None,
            pdp: None,
        },
        NameDecision::NoMatch => Verdict {
            allow: cfg.default == NetDefault::Allow,
            source: Source::Default,
            rule: None,
            learn: None,
            pdp: None,
        },
    };
    let who = who.await.unwrap_or_default();
    let orig = who.sock.and_then(|s| {
        shared
            .maps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .orig(s.cookie)
    });
    if verdict.source == Source::Default && cfg.default == NetDefault::Ask {
        verdict = ask_pdp(cfg, &qname, &who, orig, protocol).await;
    }
    let (reply, reason) = if !verdict.allow && cfg.mode == Mode::Enforce {
        (
            reply_code(&req, ResponseCode::NXDomain),
            Some("NXDOMAIN".to_owned()),
        )
    } else {
        match forward(cfg.upstream, query, protocol).await {
            Ok(resp) => {
                let learn = verdict.learn.as_deref().filter(|_| verdict.allow);
                match finish(shared, &req, &resp, q.name(), &qname, learn) {
                    Ok((bytes, text)) => (bytes, text),
                    Err(e) => (
                        reply_code(&req, ResponseCode::ServFail),
                        Some(format!("{e}; SERVFAIL")),
                    ),
                }
            }
            Err(e) => (
                reply_code(&req, ResponseCode::ServFail),
                Some(format!("upstream {}: {e}; SERVFAIL", cfg.upstream)),
            ),
        }
    };
    let _ = shared.records.send(record(
        cfg,
        &qname,
        &verdict,
        &who,
        orig.unwrap_or((local.ip(), 53)),
        protocol,
        reason,
    ));
    Some(reply)
}

/// `network.default: ask` and no domain rule: the PDP decides `dns.query`.
async fn ask_pdp(
    cfg: &SandboxDns,
    qname: &str,
    who: &Who,
    orig: Option<(IpAddr, u16)>,
    protocol: u8,
) -> Verdict {
    let deny = |pdp: Option<Value>| Verdict {
        allow: false,
        source: Source::Pdp,
        rule: None,
        learn: None,
        pdp,
    };
    let Some(pdp) = &cfg.pdp else {
        return deny(None);
    };
    let (daddr, dport) = orig.unwrap_or((IpAddr::V4(Ipv4Addr::LOCALHOST), 53));
    let p = who.proc_.as_ref();
    let mut resource = Resource::net(daddr, dport, protocol);
    if let Resource::Net { domain, .. } = &mut resource {
        *domain = Some(qname.to_owned());
    }
    let input = Query {
        subject: Subject {
            sandbox: cfg.name.clone(),
            pid: p.map_or(0, |p| p.pid),
            uid: p.map_or(0, |p| p.uid),
            comm: p.map_or_else(String::new, |p| p.comm.clone()),
            exe: p.and_then(|p| read_exe(p.pid)),
            labels: Default::default(),
        },
        action: "dns.query".into(),
        resource,
        context: Context::now(&cfg.policy_revision),
    }
    .to_input();
    let started = Instant::now();
    let result = tokio::time::timeout(cfg.pdp_budget, pdp.decide(&input)).await;
    let latency_us = started.elapsed().as_micros() as u64;
    match result {
        Ok(Ok(d)) => Verdict {
            allow: d.answer.allow,
            source: Source::Pdp,
            rule: None,
            // A PDP-allowed name is forwarded, not learned: the connects
            // that follow are asked on their own (`network.default: ask`).
            learn: None,
            pdp: Some(json!({
                "engine": pdp.engine(),
                "decision_id": d.decision_id,
                "latency_us": latency_us,
                "answer": if d.answer.allow { "allow" } else { "deny" },
            })),
        },
        Ok(Err(e)) => deny(Some(
            json!({"engine": pdp.engine(), "latency_us": latency_us, "error": e.to_string()}),
        )),
        Err(_) => deny(Some(
            json!({"engine": pdp.engine(), "latency_us": latency_us, "error": "timeout"}),
        )),
    }
}

/// `name` lower-cased, without the trailing dot.
fn display_name(name: &Name) -> String {
    let s = name.to_ascii().to_ascii_lowercase();
    s.strip_suffix('.').map(str::to_owned).unwrap_or(s)
}

/// An answer with no records and `code`, to `req`.
fn reply_code(req: &Message, code: ResponseCode) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(req.id())
        .set_message_type(MessageType::Response)
        .set_op_code(req.op_code())
        .set_recursion_desired(req.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    m.add_queries(req.queries().iter().cloned());
    m.to_vec().unwrap_or_default()
}

/// Sends `query` to the upstream over `protocol` (UDP falls back to TCP on
/// a truncated answer only when the client asked over TCP; a UDP client
/// gets the truncated answer and retries over TCP itself).
async fn forward(upstream: SocketAddr, query: &[u8], protocol: u8) -> io::Result<Vec<u8>> {
    if protocol == PROTO_TCP {
        return tokio::time::timeout(TCP_TIMEOUT, forward_tcp(upstream, query))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?;
    }
    let bind: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(upstream).await?;
    let id = query.get(..2).ok_or_else(|| io::Error::other("short query"))?;
    let mut buf = vec![0u8; 65535];
    for _ in 0..2 {
        sock.send(query).await?;
        let deadline = tokio::time::Instant::now() + UDP_TRY;
        loop {
            match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Ok(Ok(n)) if n >= 2 && &buf[..2] == id => return Ok(buf[..n].to_vec()),
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_) => break,
            }
        }
    }
    Err(io::Error::from(io::ErrorKind::TimedOut))
}

async fn forward_tcp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(upstream).await?;
    let len = u16::try_from(query.len()).map_err(|_| io::Error::other("query too long"))?;
    let mut out = Vec::with_capacity(query.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(query);
    s.write_all(&out).await?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut resp = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut resp).await?;
    Ok(resp)
}

/// The addresses of `resp` that `qname` reaches through its CNAME chain,
/// each with the smallest TTL along its chain.
pub fn answer_addrs(resp: &Message, qname: &Name) -> Vec<(IpAddr, u32)> {
    // name -> smallest TTL of the chain that reached it.
    let mut reached: HashMap<Name, u32> = HashMap::new();
    reached.insert(qname.to_lowercase(), u32::MAX);
    // Bounded: each pass adds at least one name or stops.
    for _ in 0..resp.answers().len() {
        let mut grew = false;
        for r in resp.answers() {
            if let RData::CNAME(target) = r.data() {
                let owner = r.name().to_lowercase();
                let target = target.0.to_lowercase();
                if let Some(&ttl) = reached.get(&owner)
                    && !reached.contains_key(&target)
                {
                    reached.insert(target, ttl.min(r.ttl()));
                    grew = true;
                }
            }
        }
        if !grew {
            break;
        }
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for r in resp.answers() {
        let Some(&chain_ttl) = reached.get(&r.name().to_lowercase()) else {
            continue;
        };
        let addr = match r.data() {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        if seen.insert(addr) {
            out.push((addr, r.ttl().min(chain_ttl)));
        }
    }
    out
}

/// Learns what the answer allows (before returning, so before the reply
/// leaves), caps its TTLs, and returns the reply bytes and a summary.
fn finish(
    shared: &Shared,
    req: &Message,
    resp_bytes: &[u8],
    qname: &Name,
    display: &str,
    learn: Option<&[KernelRule]>,
) -> Result<(Vec<u8>, Option<String>), String> {
    let cfg = &shared.cfg;
    let mut resp = Message::from_vec(resp_bytes).map_err(|e| format!("unparseable upstream answer: {e}"))?;
    if resp.id() != req.id() {
        return Err("upstream answer to another query".into());
    }
    let addrs = answer_addrs(&resp, qname);
    let summary = (!addrs.is_empty()).then(|| {
        let list: Vec<String> = addrs.iter().map(|(a, t)| format!("{a} (ttl {t})")).collect();
        format!("answer: {}", list.join(", "))
    });
    if let Some(entries) = learn
        && !addrs.is_empty()
        && entries.iter().any(|e| u32::from(e.verdict) != VERDICT_DENY)
    {
        let now = super::boot_ns();
        let domain_id = shared.domain_id(display);
        let mut maps = shared.maps.lock().unwrap_or_else(|e| e.into_inner());
        for (addr, ttl) in &addrs {
            let ttl = (*ttl).clamp(cfg.min_ttl_s, cfg.max_ttl_s);
            let expires = now + u64::from(ttl) * 1_000_000_000;
            maps.learn(cfg.sandbox_id, *addr, entries, expires, domain_id, now)
                .map_err(|e| format!("learning {addr}: {e}"))?;
            shared.names.insert(cfg.sandbox_id, *addr, display);
        }
    }
    // Cap the TTLs the client sees: it must look the name up again before
    // the kernel forgets the address.
    let over = resp.answers().iter().any(|r| r.ttl() > cfg.max_ttl_s);
    if !over {
        return Ok((resp_bytes.to_vec(), summary));
    }
    for r in resp.answers_mut() {
        if r.ttl() > cfg.max_ttl_s {
            r.set_ttl(cfg.max_ttl_s);
        }
    }
    let bytes = resp
        .to_vec()
        .map_err(|e| format!("re-encoding the answer: {e}"))?;
    Ok((bytes, summary))
}

fn record(
    cfg: &SandboxDns,
    qname: &str,
    v: &Verdict,
    who: &Who,
    server: (IpAddr, u16),
    protocol: u8,
    reason: Option<String>,
) -> Record {
    let process = who.proc_.as_ref().map(|p| Process {
        pid: p.pid,
        tid: p.pid,
        ppid: p.ppid,
        uid: p.uid,
        gid: p.gid,
        comm: p.comm.clone(),
        exe: read_exe(p.pid),
        cgroup_id: p.cgroup_id,
        key: String::new(),
        ancestors: Vec::new(),
    });
    Record {
        ts: crate::audit::clock::rfc3339(time::OffsetDateTime::now_utc()),
        seq: 0,
        id: ulid::Ulid::new().to_string(),
        sandbox: cfg.name.clone(),
        action: "dns.query".into(),
        verdict: Some(if v.allow {
            RecVerdict::Allow
        } else {
            RecVerdict::Deny
        }),
        mode: Some(match cfg.mode {
            Mode::Enforce => RecMode::Enforce,
            Mode::Audit => RecMode::Audit,
        }),
        source: Some(v.source),
        rule: v.rule.map(|i| format!("network.rules[{i}]")),
        process,
        net: Some(Net {
            family: if server.0.is_ipv4() { "inet" } else { "inet6" }.into(),
            protocol: if protocol == PROTO_TCP { "tcp" } else { "udp" }.into(),
            daddr: server.0.to_string(),
            dport: server.1,
            domain: Some(qname.to_owned()),
        }),
        file: None,
        exec: None,
        pdp: v.pdp.clone(),
        count: None,
        reason,
        degraded: cfg.degraded.clone(),
        policy_revision: cfg.policy_revision.clone(),
        prev: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use hickory_proto::rr::{
        Record as Rr,
        rdata::{A, AAAA, CNAME},
    };

    use super::*;

    #[test]
    fn follows_cname_chains_only_from_the_name_asked() {
        let n = |s: &str| Name::from_str(s).unwrap();
        let mut m = Message::new();
        m.add_answer(Rr::from_rdata(
            n("www.Example.com."),
            300,
            RData::CNAME(CNAME(n("edge.cdn.net."))),
        ));
        m.add_answer(Rr::from_rdata(
            n("edge.cdn.net."),
            60,
            RData::CNAME(CNAME(n("e1.cdn.net."))),
        ));
        m.add_answer(Rr::from_rdata(
            n("e1.cdn.net."),
            120,
            RData::A(A("192.0.2.1".parse().unwrap())),
        ));
        m.add_answer(Rr::from_rdata(
            n("e1.cdn.net."),
            120,
            RData::AAAA(AAAA("2001:db8::1".parse().unwrap())),
        ));
        // Not on the chain: never learned.
        m.add_answer(Rr::from_rdata(
            n("evil.net."),
            120,
            RData::A(A("192.0.2.66".parse().unwrap())),
        ));
        let got = answer_addrs(&m, &n("WWW.example.com."));
        assert_eq!(
            got,
            vec![
                ("192.0.2.1".parse().unwrap(), 60),
                ("2001:db8::1".parse().unwrap(), 60)
            ]
        );
    }
}
