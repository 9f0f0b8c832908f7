//! Reloads and the PDP: a reload that changes the PDP's answers makes the
//! verdicts cached before it misses (and only such a reload does); Rego
//! that is invalid, or a rules query of the wrong shape, is rejected at
//! load with its location and leaves the running policy in force.

use std::{
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use pep_tests::{daemon::TestDaemon, *};

/// A reload that changes the PDP's answers bumps the verdict cache's
/// revision: a verdict cached before it is a miss (counted as one) and is
/// asked again, so the old answer is never served; a reload that changes
/// nothing the PDP answers from keeps every cached verdict. Through the
/// library (the reload is `AskTask::reload`, whatever triggers it), with the
/// kernel's own counters as the witness.
#[test]
fn a_reload_that_changes_answers_makes_older_verdicts_misses() {
    use pep_agent::{
        compiler,
        enforcer::{Enforcer, LoadOptions, SandboxSpec},
        kernel::cgroup::Cgroup,
        pdp::{check_policy, standalone, task},
        policy::{LoadContext, load_file},
    };
    use pep_common::sandbox::{MODE_ENFORCE, SandboxConfig};

    const ID: u32 = 11;
    let s = Scratch::new("pdp-reload");
    let a = tcp_server("127.0.0.1:0").port();
    let b = tcp_server("127.0.0.1:0").port();
    let rego = s.dir.join("p.rego");
    let allow_only = |port: u16| {
        std::fs::write(
            &rego,
            format!("package pep\ndefault decision := false\ndecision if input.resource.dport == {port}\n"),
        )
        .expect("write rego")
    };
    allow_only(a);
    let yaml = s.write(
        "p.yaml",
        &format!(
            "apiVersion: pep/v1\nname: reload\nnetwork:\n  default: ask\n\
             pdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n  cache_ttl_s: 600\n",
            rego.display()
        ),
    );
    let load = || {
        let ctx = LoadContext::new("/root");
        let mut p = load_file(&yaml, &ctx).expect("policy");
        check_policy(&mut p, &ctx.home).expect("check");
        p
    };
    let policy = load();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _in_rt = rt.enter();
    let net = compiler::net::compile_network(&policy.network, ID).expect("compile");
    let mut enforcer = Enforcer::load(LoadOptions::default()).unwrap_or_else(|e| panic!("load: {e}"));
    let mut cg = Cgroup::create(
        &cgroup2_root(),
        Path::new(&format!("pep-agent/pdp-reload.{}", std::process::id())),
    )
    .expect("cgroup");
    standalone::prepare(&mut enforcer, ID).expect("prepare");
    let spec = SandboxSpec {
        cgroup_id: cg.id(),
        cgroup_level: cg.level(),
        config: SandboxConfig {
            sandbox_id: ID,
            mode: MODE_ENFORCE,
            net_default: net.default_verdict,
            file_default: 1,
            exec_default: 1,
            flags: 0,
        },
    };
    enforcer.install_sandbox(&spec, &net, &[]).expect("install");
    enforcer.attach_ask(cg.path()).expect("attach ask");
    enforcer.attach_net(cg.path()).expect("attach net");
    let (maps, asks) = enforcer.take_ask().expect("ask maps");
    let (tx, mut records) = tokio::sync::mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    let mut settings = standalone::settings(
        pep_agent::pdp::build_engine(&policy).expect("engine"),
        &policy,
        ID,
        "reload",
    );
    settings.revision = standalone::STANDALONE_REVISION;
    let t = task::spawn(
        Some(settings),
        maps,
        asks,
        tx,
        task::CacheOrigins::default(),
        stop.clone(),
    )
    .expect("task");

    let connect = |port: u16| in_cgroup(cg.path(), &["tcp", "127.0.0.1", &port.to_string()]);
    let counters = |e: &Enforcer| {
        let c = e.ask_counters().expect("counters");
        (c.hits, c.misses)
    };

    let c0 = counters(&enforcer);
    assert_eq!(connect(a), "OK", "asked, allowed");
    assert_eq!(connect(b), "ECONNABORTED", "asked, denied");
    assert_eq!(connect(a), "OK", "from the cache");
    let c1 = counters(&enforcer);
    assert_eq!((c1.0 - c0.0, c1.1 - c0.1), (1, 2), "two misses, then a hit");

    // The PDP now answers the other way round.
    allow_only(b);
    let rev = standalone::reload(&t, &load(), ID, "reload").expect("reload");
    assert_eq!(rev, standalone::STANDALONE_REVISION + 1, "bumped");
    assert_eq!(connect(a), "ECONNABORTED", "the old allow is not served");
    assert_eq!(connect(b), "OK", "the old deny is not served");
    let c2 = counters(&enforcer);
    assert_eq!((c2.0 - c1.0, c2.1 - c1.1), (0, 2), "both were misses");

    // A reload that changes nothing the PDP answers from keeps the cache.
    let rev2 = standalone::reload(&t, &load(), ID, "reload").expect("reload");
    assert_eq!(rev2, rev, "not bumped");
    assert_eq!(connect(a), "EPERM", "the cached deny, at once");
    assert_eq!(connect(b), "OK");
    let c3 = counters(&enforcer);
    assert_eq!((c3.0 - c2.0, c3.1 - c2.1), (2, 0), "both were hits");

    // An engine that cannot be built leaves the running one in force.
    std::fs::write(&rego, "package pep\ndecision if { == }\n").expect("write");
    let mut broken = load_file(&yaml, &LoadContext::new("/root")).expect("yaml still loads");
    assert!(
        check_policy(&mut broken, Path::new("/root")).is_err(),
        "invalid Rego"
    );
    assert!(standalone::reload(&t, &broken, ID, "reload").is_err());
    assert_eq!(t.revision(), rev);
    assert_eq!(connect(b), "OK");

    stop.store(true, Ordering::SeqCst);
    t.join.join().expect("ask thread");
    let mut answers = Vec::new();
    while let Ok(r) = records.try_recv() {
        answers.push(r.pdp["answer"].as_str().unwrap_or("").to_owned());
    }
    assert_eq!(answers, ["allow", "deny", "deny", "allow"], "one record per ask");
    let _ = enforcer.detach_net(cg.path());
    let _ = enforcer.detach_ask(cg.path());
    cg.destroy().expect("cgroup cleanup");
}

/// `probe` (net_probe arguments) run inside cgroup `cg`; its result.
fn in_cgroup(cg: &Path, probe: &[&str]) -> String {
    use std::os::unix::process::CommandExt as _;
    let procs = cg.join("cgroup.procs");
    let mut cmd = Command::new("python3");
    cmd.arg(net_probe()).args(probe);
    // SAFETY: a write(2) to a cgroup file between fork and exec.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, "0"));
    }
    probe_results(&cmd.output().expect("probe")).join(" ")
}

/// A daemon sandbox whose network rules come from a Rego rules query: a
/// reload with invalid Rego, or with rules of the wrong shape, is refused
/// with the Rego's location and the running rules stay; a good one applies.
#[test]
fn a_bad_rules_query_at_reload_leaves_the_running_policy() {
    let rs = Scratch::new("pdp-rules-reload");
    let a = tcp_server("127.0.0.1:0").port();
    let b = tcp_server("127.0.0.1:0").port();
    let rules = |ports: &str| {
        format!(
            "package pep\nrules := {{\"network\": {{\"default\": \"deny\", \"rules\": [{{\"allow\": {{\"cidr\": \"127.0.0.1/32\", \"ports\": [{ports}]}}}}]}}}}\ndecision := false\n"
        )
    };
    let rego = rs.write("rules.rego", &rules(&a.to_string()));
    let policy = format!(
        "apiVersion: pep/v1\nname: r\nnetwork:\n  default: allow\n\
         pdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n  rules: data.pep.rules\n",
        rego.display()
    );
    let mut d = TestDaemon::new("dpdprules", &[("p", &policy)], "", false);
    d.start();
    let r = d.request(r#"{"op":"create","name":"r","policy":"p"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", d.logs());
    let cg = d.cgroup("r");
    let tcp = |port: u16| in_cgroup(&cg, &["tcp", "127.0.0.1", &port.to_string()]);
    let enforced = || {
        assert_eq!(tcp(a), "OK", "the Rego rules allow a");
        assert_eq!(
            tcp(b),
            "EPERM",
            "the Rego rules' default denies b (the file's allows)"
        );
    };
    enforced();
    let id = |d: &TestDaemon| d.request(r#"{"op":"list"}"#)["data"][0]["sandbox_id"].clone();
    let before = id(&d);

    for (text, want) in [
        // Invalid Rego: located in the module.
        (
            "package pep\n\nrules := {\"network\": == }\n".to_string(),
            vec!["rules.rego:3:"],
        ),
        // Valid Rego whose rules have the wrong shape: located by the rule
        // and by the path inside its value.
        (
            rules("\"http\""),
            vec!["rules.rego:2:1", "network.rules[0].allow.ports[0]"],
        ),
    ] {
        std::fs::write(&rego, text).expect("write rego");
        let r = d.request(r#"{"op":"reload","name":"r"}"#);
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["code"], "invalid_policy", "{r}");
        let err = r["error"].as_str().unwrap_or_default();
        for w in want {
            assert!(err.contains(w), "{w} in {err}");
        }
        assert_eq!(id(&d), before, "no new generation");
        enforced();
    }

    // A good change applies (so the checks above were not vacuous).
    std::fs::write(&rego, rules(&format!("{a}, {b}"))).expect("write rego");
    let r = d.request(r#"{"op":"reload","name":"r"}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_ne!(id(&d), before);
    assert_eq!(tcp(b), "OK", "the reloaded Rego rules allow b");
    d.stop();
}

/// `pep-agent run` with Rego that does not parse: exit 1, the location,
/// and the command never runs.
#[test]
fn invalid_rego_fails_a_run_before_anything_runs() {
    let s = Scratch::new("pdp-bad-run");
    let bad = s.write("bad.rego", "package pep\n\ndecision if { input.x == == 1 }\n");
    let yaml = s.write(
        "p.yaml",
        &format!(
            "apiVersion: pep/v1\nnetwork:\n  default: ask\npdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n",
            bad.display()
        ),
    );
    let marker = s.dir.join("ran");
    let out = pep_run(&yaml, &[], &["touch", &marker.display().to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.rego:3:"), "location: {err}");
    assert!(!marker.exists(), "the command must not run");
}
