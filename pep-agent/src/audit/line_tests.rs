//! The hand-written line writer (`line`) against serde_json: byte for byte
//! the same line for arbitrary records, and the reused record of the
//! pipeline (`record::fill`) equal to a freshly built one.

use proptest::prelude::*;

use super::{
    clock::{BootClock, Rfc3339Cache},
    decode::{Decision, ExecOp, Header, Mode, NetOp, SelfOp, Source, Verdict},
    line,
    record::{self, Ancestor, Exec, File, Net, Process, Record, SandboxContext},
};

/// Strings that stress the escaping: quotes, backslashes, every control
/// character, DEL, the replacement character the decoder puts for
/// non-UTF-8 bytes, and any other char.
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => any::<char>(),
            2 => (0u8..0x20).prop_map(char::from),
            1 => Just('"'),
            1 => Just('\\'),
            1 => Just('\u{7f}'),
            1 => Just('\u{fffd}'),
            1 => Just('/'),
            2 => prop::char::range('a', 'z'),
        ],
        0..24,
    )
    .prop_map(String::from_iter)
}

fn opt_text() -> impl Strategy<Value = Option<String>> {
    prop::option::of(text())
}

fn process() -> impl Strategy<Value = Process> {
    (
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        ),
        text(),
        opt_text(),
        any::<u64>(),
        text(),
        prop::collection::vec((any::<u32>(), text()), 0..5),
    )
        .prop_map(
            |((pid, tid, ppid, uid, gid), comm, exe, cgroup_id, key, anc)| Process {
                pid,
                tid,
                ppid,
                uid,
                gid,
                comm,
                exe,
                cgroup_id,
                key,
                ancestors: anc
                    .into_iter()
                    .map(|(pid, comm)| Ancestor { pid, comm })
                    .collect(),
            },
        )
}

fn net() -> impl Strategy<Value = Net> {
    (text(), text(), text(), any::<u16>(), opt_text()).prop_map(|(family, protocol, daddr, dport, domain)| {
        Net {
            family,
            protocol,
            daddr,
            dport,
            domain,
        }
    })
}

fn pdp() -> impl Strategy<Value = Option<serde_json::Value>> {
    prop::option::of((text(), any::<i64>(), any::<bool>(), text()).prop_map(
        |(k, n, b, s)| serde_json::json!({ k: n, "allow": b, "reason": s, "nested": [1, null, {"x": 0.5}] }),
    ))
}

fn record_strategy() -> impl Strategy<Value = Record> {
    let head = (
        text(),
        any::<u64>(),
        text(),
        text(),
        text(),
        prop::option::of(prop_oneof![Just(Verdict::Allow), Just(Verdict::Deny)]),
        prop::option::of(prop_oneof![Just(Mode::Enforce), Just(Mode::Audit)]),
        prop::option::of(prop_oneof![
            Just(Source::Rule),
            Just(Source::Cache),
            Just(Source::Pdp),
            Just(Source::Default)
        ]),
        opt_text(),
    );
    let body = (
        prop::option::of(process()),
        prop::option::of(net()),
        prop::option::of(
            (opt_text(), prop::collection::vec(text(), 0..3))
                .prop_map(|(path, access)| File { path, access }),
        ),
        prop::option::of(
            (opt_text(), prop::collection::vec(text(), 0..4)).prop_map(|(path, argv)| Exec { path, argv }),
        ),
        pdp(),
    );
    let tail = (
        prop::option::of(any::<u64>()),
        opt_text(),
        opt_text(),
        text(),
        text(),
    );
    (head, body, tail).prop_map(
        |(
            (ts, seq, id, sandbox, action, verdict, mode, source, rule),
            (process, net, file, exec, pdp),
            (count, reason, degraded, policy_revision, prev),
        )| Record {
            ts,
            seq,
            id,
            sandbox,
            action,
            verdict,
            mode,
            source,
            rule,
            process,
            net,
            file,
            exec,
            pdp,
            count,
            reason,
            degraded,
            policy_revision,
            prev,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The fast writer writes serde_json's bytes, so the same JSON value,
    /// and the line reads back as the record.
    #[test]
    fn writer_is_serde_json_byte_for_byte(rec in record_strategy()) {
        let want = serde_json::to_string(&rec).expect("serializes");
        let mut got = String::from("left over from the last record");
        got.clear();
        line::write_record(&mut got, &rec);
        prop_assert_eq!(&got, &want);
        let a: serde_json::Value = serde_json::from_str(&got).expect("valid JSON");
        let b: serde_json::Value = serde_json::from_str(&want).expect("valid JSON");
        prop_assert_eq!(a, b);
        let back: Record = serde_json::from_str(&got).expect("a record");
        prop_assert_eq!(back, rec);
    }

    #[test]
    fn ip_writer_is_display(v4 in any::<std::net::Ipv4Addr>(), v6 in any::<std::net::Ipv6Addr>()) {
        for ip in [std::net::IpAddr::V4(v4), std::net::IpAddr::V6(v6), v4.to_ipv6_mapped().into()] {
            let mut s = String::new();
            line::write_ip(&mut s, ip);
            prop_assert_eq!(s, ip.to_string());
        }
    }

    /// One record refilled decision after decision (the pipeline's) equals
    /// the record built fresh for each: nothing of an earlier decision
    /// survives in it.
    #[test]
    fn refilled_record_equals_a_fresh_one(decisions in prop::collection::vec(decision(), 1..12)) {
        let clock = BootClock::new();
        let mut ts = Rfc3339Cache::default();
        let mut reused = Record::default();
        let ctxs = [ctx("a\"b", None), ctx("sandbox-2", Some("files: no BPF LSM"))];
        for (i, (d, exe)) in decisions.iter().enumerate() {
            let c = &ctxs[i % 2];
            record::fill(&mut reused, &mut ts, &clock, d, c, exe.as_deref());
            let mut fresh = record::build(&clock, d, c, exe.clone());
            // The id is random: the only field that may differ.
            fresh.id.clone_from(&reused.id);
            prop_assert_eq!(&reused, &fresh);
            prop_assert_eq!(line::to_line(&reused), serde_json::to_string(&fresh).expect("json"));
        }
    }
}

fn ctx(name: &str, degraded: Option<&str>) -> SandboxContext {
    SandboxContext {
        name: name.into(),
        policy_revision: "sha256:ab\\cd".into(),
        degraded: degraded.map(String::from),
    }
}

fn header() -> impl Strategy<Value = Header> {
    (
        (
            any::<bool>(),
            any::<bool>(),
            prop::option::of(0u32..100),
            any::<u64>(),
        ),
        (any::<u32>(), any::<u32>(), any::<u64>()),
        text(),
        prop::collection::vec((any::<u32>(), text()), 0..5),
    )
        .prop_map(
            |((deny, audit, rule_idx, ts), (pid, uid, start_ns), comm, ancestors)| Header {
                verdict: if deny { Verdict::Deny } else { Verdict::Allow },
                mode: if audit { Mode::Audit } else { Mode::Enforce },
                source: if rule_idx.is_some() {
                    Source::Rule
                } else {
                    Source::Default
                },
                rule_idx,
                sandbox_id: 1,
                ts_boot_ns: ts >> 2,
                cgroup_id: ts ^ 7,
                pid,
                tid: pid.wrapping_add(1),
                ppid: 1,
                uid,
                gid: uid ^ 1,
                comm,
                start_ns,
                exe: Default::default(),
                ancestors,
            },
        )
}

fn decision() -> impl Strategy<Value = (Decision, Option<String>)> {
    let d = prop_oneof![
        (
            header(),
            any::<bool>(),
            any::<u8>(),
            any::<std::net::IpAddr>(),
            any::<u16>()
        )
            .prop_map(|(header, connect, protocol, daddr, dport)| Decision::Net {
                header,
                op: if connect { NetOp::Connect } else { NetOp::Send },
                protocol,
                daddr,
                dport,
            }),
        (header(), any::<bool>(), any::<bool>(), opt_text()).prop_map(|(header, read, write, path)| {
            Decision::File {
                header,
                read,
                write,
                path,
            }
        }),
        (header(), opt_text(), prop::collection::vec(text(), 0..4)).prop_map(|(header, path, argv)| {
            Decision::Exec {
                header,
                op: ExecOp::Mmap,
                path,
                argv,
            }
        }),
        (header(), opt_text(), any::<u64>()).prop_map(|(header, path, arg)| Decision::SelfProtect {
            header,
            op: SelfOp::Cgroup,
            target_pid: None,
            arg,
            path,
        }),
    ];
    (d, opt_text())
}

/// A kernel event whose comm and ancestor comm are not UTF-8 (and hold a
/// quote, a backslash and control bytes): the decoder replaces the invalid
/// bytes, and the line is serde's and valid JSON.
#[test]
fn non_utf8_kernel_strings_decode_and_escape_like_serde() {
    use pep_common::event::{AF_INET, KIND_NET, NET_OP_CONNECT, NetEvent, RULE_NONE, VERDICT_DENY};
    // SAFETY: plain-old-data; all-zero is valid.
    let mut ev: NetEvent = unsafe { std::mem::zeroed() };
    ev.header.kind = KIND_NET;
    ev.header.verdict = VERDICT_DENY;
    ev.header.mode = pep_common::sandbox::MODE_ENFORCE;
    ev.header.source = pep_common::event::SOURCE_DEFAULT;
    ev.header.rule_idx = RULE_NONE;
    ev.header.pid = 42;
    let comm = [b'a', 0xff, b'"', b'\\', 0x01, 0x1f, 0xc3, b'\n', 0xe2, 0x82, b'z'];
    ev.header.comm[..comm.len()].copy_from_slice(&comm);
    ev.header.ancestors[0].pid = 1;
    ev.header.ancestors[0].comm[..3].copy_from_slice(&[0x80, b'\t', 0xfe]);
    ev.header.n_ancestors = 1;
    ev.family = AF_INET;
    ev.op = NET_OP_CONNECT;
    ev.protocol = 6;
    ev.daddr[..4].copy_from_slice(&[10, 0, 0, 1]);
    // SAFETY: the bytes of a repr(C) value.
    let raw = unsafe { std::slice::from_raw_parts((&raw const ev).cast::<u8>(), size_of::<NetEvent>()) };
    let d = Decision::try_from(raw).expect("decodes");
    let mut chain = record::Chain::default();
    let mut rec = Record::default();
    chain.fill(&mut rec, &d, &ctx("t", None), Some("/bin/\u{1}x"));
    let mut got = String::new();
    chain.seal_into(&mut rec, &mut got);
    assert_eq!(got, serde_json::to_string(&rec).expect("json"));
    let v: serde_json::Value = serde_json::from_str(&got).expect("valid JSON");
    assert_eq!(
        v["process"]["comm"],
        "a\u{fffd}\"\\\u{1}\u{1f}\u{fffd}\n\u{fffd}z"
    );
    assert_eq!(v["process"]["ancestors"][0]["comm"], "\u{fffd}\t\u{fffd}");
    assert_eq!(v["net"]["daddr"], "10.0.0.1");
    // Control characters as `\u00XX` (lowercase hex), quote and backslash
    // escaped, the replacement character as UTF-8.
    let want = "\"comm\":\"a\u{fffd}\\\"\\\\\\u0001\\u001f\u{fffd}\\n\u{fffd}z\"";
    assert!(got.contains(want), "{got}");
}
