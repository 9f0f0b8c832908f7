//! DNS-aware network policy (issue 7) through `pep-agent run`, on the host
//! kernel: a real DNS server (dnsmasq on a loopback address) as the
//! upstream, real clients (python3's getaddrinfo through the host's own
//! /etc/resolv.conf, curl) inside the sandbox. The sandbox's resolv.conf is
//! the host's, whatever server it names: the kernel steers every port-53
//! connect and send to the agent's resolver before a packet exists, so these
//! tests never reach a real DNS server.

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use pep_tests::*;

/// Where dnsmasq listens (loopback, not 127.0.0.1, so nothing else there).
const DNS_ADDR: &str = "127.0.1.53";

/// A dnsmasq serving only what the test gives it, killed on drop.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
}

impl Dnsmasq {
    fn start(ttl: u32, records: &[String]) -> Self {
        let port = {
            let s = UdpSocket::bind((DNS_ADDR, 0)).expect("bind a free port for dnsmasq");
            s.local_addr().expect("local_addr").port()
        };
        let addr: SocketAddr = format!("{DNS_ADDR}:{port}").parse().expect("addr");
        let child = Command::new("dnsmasq")
            .args([
                "-k",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--no-negcache",
                "--bind-interfaces",
                "--pid-file=",
                &format!("--listen-address={DNS_ADDR}"),
                &format!("--port={port}"),
                &format!("--local-ttl={ttl}"),
                &format!("--auth-ttl={ttl}"),
            ])
            .args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dnsmasq (cargo xtask setup installs dnsmasq-base)");
        let d = Self { child, addr };
        d.wait_ready();
        d
    }

    /// Until it answers a query.
    fn wait_ready(&self) {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let q = query_bytes("ready.invalid");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            let _ = s.send_to(&q, self.addr);
            if s.recv_from(&mut buf).is_ok() {
                return;
            }
        }
        panic!("dnsmasq on {} did not answer within 10 s", self.addr);
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal A query for `name`.
fn query_bytes(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn dns_probe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dns_probe.py")
}

fn policy(s: &Scratch, dns: &Dnsmasq, extra_dns: &str, rules: &str) -> PathBuf {
    s.write(
        "policy.yaml",
        &format!(
            "apiVersion: pep/v1\nname: dnstest\nnetwork:\n  default: deny\n  dns:\n    upstream: \"{}\"\n{extra_dns}  rules:\n{rules}",
            dns.addr
        ),
    )
}

/// Runs the probe under `policy` with an audit log; returns the results,
/// the output and the records.
fn probe(
    s: &Scratch,
    policy: &Path,
    ops: &[&str],
) -> (Vec<String>, std::process::Output, Vec<serde_json::Value>) {
    let audit = s.dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let script = dns_probe();
    let mut cmd = vec!["python3", script.to_str().expect("utf8")];
    cmd.extend_from_slice(ops);
    let audit_s = audit.display().to_string();
    let out = pep_run(policy, &["--audit", &audit_s], &cmd);
    let recs = read_audit(&audit);
    (probe_results(&out), out, recs)
}

fn dns_records<'a>(recs: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    recs.iter()
        .filter(|r| r["action"] == "dns.query" && r["net"]["domain"] == name)
        .collect()
}

#[test]
fn allowed_name_resolves_and_connects_denied_name_is_nxdomain() {
    let s = Scratch::new("dns-basic");
    let web = tcp_server("127.0.0.2:0");
    let other = tcp_server("127.0.0.2:0");
    let doh = tcp_server("127.0.0.3:0");
    let dns = Dnsmasq::start(
        300,
        &[
            "--host-record=app.allowed.test,127.0.0.2".into(),
            "--host-record=secret.test,127.0.0.2".into(),
        ],
    );
    let p = policy(
        &s,
        &dns,
        "",
        &format!(
            "    - allow: {{ domain: \"APP.allowed.test.\", ports: [{}], protocol: tcp }}\n",
            web.port()
        ),
    );
    let web_port = web.port().to_string();
    let other_port = other.port().to_string();
    let doh_port = doh.port().to_string();
    let (res, out, recs) = probe(
        &s,
        &p,
        &[
            "resolve",
            "app.allowed.test",
            "connect",
            "app.allowed.test",
            &web_port,
            // The rule's ports apply to the learned address.
            "connect-addr",
            "127.0.0.2",
            &other_port,
            "resolve",
            "secret.test",
            // Encrypted DNS is just a connect: to an address the policy does
            // not allow, denied.
            "connect-addr",
            "127.0.0.3",
            &doh_port,
            "tcpdns",
            "app.allowed.test",
            "tcpdns",
            "secret.test",
        ],
    );
    let ns = std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("nameserver").map(|v| v.trim().to_owned()))
        })
        .unwrap_or_default();
    assert_eq!(res.len(), 7, "{}", describe(&out));
    assert_eq!(res[0], "127.0.0.2", "{}", describe(&out));
    assert_eq!(res[1], "OK", "{}", describe(&out));
    assert_eq!(res[2], "EPERM", "{}", describe(&out));
    assert_eq!(res[3], "NXDOMAIN", "{}", describe(&out));
    assert_eq!(res[4], "EPERM", "{}", describe(&out));
    // TCP DNS to the server resolv.conf names: answered by the agent, and
    // getpeername says it came from the server asked.
    assert_eq!(
        res[5],
        format!("rcode=0,peer={ns}:53,addrs=127.0.0.2"),
        "{}",
        describe(&out)
    );
    assert!(res[6].starts_with("rcode=3,"), "{}", describe(&out));

    let denied = dns_records(&recs, "secret.test");
    assert!(
        denied
            .iter()
            .any(|r| r["verdict"] == "deny" && r["source"] == "default"),
        "a deny record for secret.test: {recs:#?}"
    );
    let allowed = dns_records(&recs, "app.allowed.test");
    assert!(
        allowed
            .iter()
            .any(|r| r["verdict"] == "allow" && r["rule"] == "network.rules[0]"),
        "an allow record for app.allowed.test: {recs:#?}"
    );
    assert!(
        allowed.iter().any(|r| r["process"]["comm"] == "python3"),
        "the querying process is named: {allowed:#?}"
    );
    let connect = recs
        .iter()
        .find(|r| r["action"] == "net.connect" && r["net"]["dport"] == web.port() && r["verdict"] == "allow")
        .unwrap_or_else(|| panic!("the allowed connect's record: {recs:#?}"));
    assert_eq!(connect["net"]["domain"], "app.allowed.test", "{connect:#}");
    assert_eq!(connect["rule"], "network.rules[0]", "{connect:#}");
}

#[test]
fn curl_resolves_through_the_agent() {
    let s = Scratch::new("dns-curl");
    let web = tcp_server("127.0.0.4:0");
    let dns = Dnsmasq::start(300, &["--host-record=web.curl.test,127.0.0.4".into()]);
    let p = policy(
        &s,
        &dns,
        "",
        &format!(
            "    - allow: {{ domain: \"web.curl.test\", ports: [{}] }}\n",
            web.port()
        ),
    );
    let url = format!("http://web.curl.test:{}/", web.port());
    let out = pep_run(
        &p,
        &[],
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{}", describe(&out));
    let url = format!("http://nope.curl.test:{}/", web.port());
    let out = pep_run(&p, &[], &["curl", "-sS", "--max-time", "5", &url]);
    // curl exit 6: could not resolve host.
    assert_eq!(out.status.code(), Some(6), "{}", describe(&out));
}

#[test]
fn wildcard_cname_and_aaaa() {
    let s = Scratch::new("dns-kinds");
    let v4 = tcp_server("127.0.0.5:0");
    let v6 = tcp_server("[::1]:0");
    let dns = Dnsmasq::start(
        300,
        &[
            "--host-record=a.b.wild.test,127.0.0.5".into(),
            "--host-record=wild.test,127.0.0.5".into(),
            "--host-record=real.backend.test,127.0.0.5".into(),
            "--cname=alias.cname.test,real.backend.test".into(),
            "--host-record=six.allowed.test,::1".into(),
        ],
    );
    let p = policy(
        &s,
        &dns,
        "",
        &format!(
            "    - allow: {{ domain: \"*.wild.test\", ports: [{p4}] }}\n\
             \x20   - allow: {{ domain: \"alias.cname.test\", ports: [{p4}] }}\n\
             \x20   - allow: {{ domain: \"six.allowed.test\", ports: [{p6}] }}\n",
            p4 = v4.port(),
            p6 = v6.port()
        ),
    );
    let p4 = v4.port().to_string();
    let p6 = v6.port().to_string();
    let (res, out, recs) = probe(
        &s,
        &p,
        &[
            "connect",
            "a.b.wild.test",
            &p4,
            // A wildcard does not match its bare suffix.
            "resolve",
            "wild.test",
            // The name asked is what is allowed; its CNAME target is not.
            "resolve",
            "real.backend.test",
            "resolve",
            "alias.cname.test",
            "resolve6",
            "six.allowed.test",
            "connect6",
            "six.allowed.test",
            &p6,
        ],
    );
    assert_eq!(
        res,
        ["OK", "NXDOMAIN", "NXDOMAIN", "127.0.0.5", "::1", "OK"],
        "{}",
        describe(&out)
    );
    // The CNAME's answer was learned for the name asked: a fresh run that
    // only resolves the alias can connect.
    let (res, out, _) = probe(&s, &p, &["connect", "alias.cname.test", &p4]);
    assert_eq!(res, ["OK"], "{}", describe(&out));
    let connect6 = recs
        .iter()
        .find(|r| r["action"] == "net.connect" && r["net"]["daddr"] == "::1" && r["verdict"] == "allow")
        .unwrap_or_else(|| panic!("the IPv6 connect's record: {recs:#?}"));
    assert_eq!(connect6["net"]["domain"], "six.allowed.test");
}

#[test]
fn learned_addresses_expire_after_the_ttl() {
    let s = Scratch::new("dns-ttl");
    let web = tcp_server("127.0.0.6:0");
    let dns = Dnsmasq::start(2, &["--host-record=short.ttl.test,127.0.0.6,2".into()]);
    let p = policy(
        &s,
        &dns,
        "    min_ttl_s: 1\n",
        &format!(
            "    - allow: {{ domain: \"short.ttl.test\", ports: [{}] }}\n",
            web.port()
        ),
    );
    let port = web.port().to_string();
    let (res, out, recs) = probe(
        &s,
        &p,
        &[
            "connect",
            "short.ttl.test",
            &port,
            "connect-addr",
            "127.0.0.6",
            &port,
            "sleep",
            "3",
            // No new lookup: the 2 s answer has expired.
            "connect-addr",
            "127.0.0.6",
            &port,
            // A new lookup makes it reachable again.
            "connect",
            "short.ttl.test",
            &port,
        ],
    );
    assert_eq!(res, ["OK", "OK", "EPERM", "OK"], "{}", describe(&out));
    let expired = recs
        .iter()
        .find(|r| r["action"] == "net.connect" && r["verdict"] == "deny")
        .unwrap_or_else(|| panic!("the expired connect's record: {recs:#?}"));
    assert_eq!(expired["source"], "default", "{expired:#}");
}

#[test]
fn another_sandbox_cannot_use_an_address_it_did_not_resolve() {
    let s = Scratch::new("dns-iso");
    let web = tcp_server("127.0.0.7:0");
    let dns = Dnsmasq::start(300, &["--host-record=iso.test,127.0.0.7".into()]);
    let p = policy(
        &s,
        &dns,
        "",
        &format!(
            "    - allow: {{ domain: \"iso.test\", ports: [{}] }}\n",
            web.port()
        ),
    );
    let port = web.port().to_string();
    let script = dns_probe();
    // Sandbox A resolves and connects, then stays alive while B tries.
    let mut a = Command::new(pep_agent_bin())
        .args(["run", "--policy"])
        .arg(&p)
        .args(["--name", "iso-a", "--", "python3"])
        .arg(&script)
        .args(["connect", "iso.test", &port, "sleep", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sandbox A");
    let mut line = String::new();
    BufReader::new(a.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read A's result");
    assert!(line.trim_end().ends_with(" OK"), "sandbox A: {line:?}");
    let out = pep_run(
        &p,
        &["--name", "iso-b"],
        &[
            "python3",
            script.to_str().expect("utf8"),
            "connect-addr",
            "127.0.0.7",
            &port,
        ],
    );
    assert_eq!(probe_results(&out), ["EPERM"], "{}", describe(&out));
    let status = a.wait().expect("wait for sandbox A");
    assert!(status.success(), "sandbox A: {status:?}");
}
