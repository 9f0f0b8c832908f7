//! The smallest end-to-end proof on the host kernel, through the library: the
//! connect4 program reads the rules userspace wrote into its map, denies with
//! EPERM, and the ring-buffer event carries the decision's fields.

use std::{net::TcpStream, os::unix::process::CommandExt as _, process::Command};

use pep_agent::{
    audit::decode::{Decision, NetOp, Source, Verdict},
    compiler,
    enforcer::{Enforcer, LoadOptions, SandboxSpec},
    kernel::cgroup::Cgroup,
    policy::{LoadContext, load_str},
};
use pep_common::sandbox::{MODE_ENFORCE, SandboxConfig};
use pep_tests::*;

#[test]
fn connect4_denies_with_eperm_and_reports_through_the_ring_buffer() {
    let server = tcp_server("127.0.0.1:0");
    let policy = load_str(
        &format!("apiVersion: pep/v1\nnetwork:\n  default: allow\n  rules:\n    - deny: {{ cidr: 127.0.0.1/32, ports: [{}] }}\n", server.port()),
        "smoke.yaml",
        &LoadContext::new("/root"),
    )
    .expect("policy");
    let net = compiler::net::compile_network(&policy.network, 7).expect("compile");
    let mut enforcer = Enforcer::load(LoadOptions::default()).unwrap_or_else(|e| panic!("load: {e}"));
    let root = cgroup2_root();
    let mut cg = Cgroup::create(
        &root,
        std::path::Path::new(&format!("pep-agent/smoke.{}", std::process::id())),
    )
    .expect("cgroup");
    let spec = SandboxSpec {
        cgroup_id: cg.id(),
        cgroup_level: cg.level(),
        config: SandboxConfig {
            sandbox_id: 7,
            mode: MODE_ENFORCE,
            net_default: net.default_verdict,
            file_default: 1,
            exec_default: 1,
            flags: 0,
        },
    };
    enforcer.install_sandbox(&spec, &net, &[]).expect("install");
    enforcer.attach_net(cg.path()).expect("attach");
    let mut events = enforcer.take_events().expect("ring buffer");

    // The host itself is unaffected.
    TcpStream::connect(server).expect("unsandboxed connect succeeds");

    let procs = cg.path().join("cgroup.procs");
    let mut cmd = Command::new("python3");
    cmd.arg(net_probe())
        .args(["tcp", "127.0.0.1", &server.port().to_string()]);
    // SAFETY: a write(2) to a cgroup file between fork and exec.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, "0"));
    }
    let out = cmd.output().expect("probe");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim().rsplit(' ').next(),
        Some("EPERM"),
        "{}",
        describe(&out)
    );

    let mut decisions = Vec::new();
    while let Some(item) = events.next() {
        decisions.push(Decision::try_from(&*item).expect("decodes"));
    }
    assert_eq!(decisions.len(), 1, "exactly one decision: {decisions:?}");
    let Decision::Net {
        header,
        op,
        daddr,
        dport,
        protocol,
    } = &decisions[0]
    else {
        panic!("{decisions:?}")
    };
    assert_eq!(header.verdict, Verdict::Deny);
    assert_eq!(header.source, Source::Rule);
    assert_eq!(header.rule_idx, Some(0));
    assert_eq!(header.sandbox_id, 7);
    assert_eq!(header.cgroup_id, cg.id());
    assert_eq!(header.comm, "python3");
    assert_eq!(header.ppid, std::process::id(), "the probe's parent is this test");
    assert_eq!(*op, NetOp::Connect);
    assert_eq!(*daddr, std::net::IpAddr::from([127, 0, 0, 1]));
    assert_eq!((*dport, *protocol), (server.port(), 6));
    let (decided, lost) = enforcer.counters().expect("counters");
    assert_eq!((decided, lost), (1, 0));
    enforcer.detach_net(cg.path()).expect("detach");
    cg.destroy().expect("cgroup removed");
}
