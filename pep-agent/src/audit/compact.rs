//! The one-line human form of a record (SPEC's `-o compact`):
//! `16:20:20.123 DENY net.connect agent-1 curl(4242) -> 169.254.169.254:80/tcp [network.rules[1]]`

use super::{
    decode::{Mode, Verdict},
    record::Record,
};

pub fn format(r: &Record) -> String {
    // "2026-11-25T16:20:20.123456789Z" -> "16:20:20.123"
    let time =
        r.ts.split('T')
            .nth(1)
            .map(|t| t.get(..12).unwrap_or(t).trim_end_matches('Z'))
            .unwrap_or(&r.ts);
    let verdict = match (r.verdict, r.mode) {
        (Some(Verdict::Deny), Some(Mode::Audit)) => "DENY(audit)",
        (Some(Verdict::Deny), _) => "DENY",
        (Some(Verdict::Allow), _) => "ALLOW",
        (None, _) => "-",
    };
    let who = r
        .process
        .as_ref()
        .map(|p| format!("{}({})", p.comm, p.pid))
        .unwrap_or_else(|| "-".into());
    let target = if let Some(n) = &r.net {
        let host = if n.daddr.contains(':') {
            format!("[{}]", n.daddr)
        } else {
            n.daddr.clone()
        };
        let host = match &n.domain {
            Some(d) => format!("{d}={host}"),
            None => host,
        };
        format!(" -> {host}:{}/{}", n.dport, n.protocol)
    } else if let Some(f) = &r.file {
        format!(
            " -> {} ({})",
            f.path.as_deref().unwrap_or("?"),
            f.access.join(",")
        )
    } else if let Some(e) = &r.exec {
        format!(" -> {} {}", e.path.as_deref().unwrap_or("?"), e.argv.join(" "))
    } else if let Some(c) = r.count {
        format!(" count={c}")
    } else {
        String::new()
    };
    let rule = r.rule.as_deref().map(|x| format!(" [{x}]")).or_else(|| {
        r.source.map(|s| {
            format!(
                " [{}]",
                serde_json::to_value(s)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            )
        })
    });
    format!(
        "{time} {verdict} {} {} {who}{target}{}",
        r.action,
        r.sandbox,
        rule.unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Net, Process};

    #[test]
    fn reads_as_in_spec() {
        let r = Record {
            ts: "2026-11-25T16:20:20.123456789Z".into(),
            seq: 42,
            id: "01JD".into(),
            sandbox: "agent-1".into(),
            action: "net.connect".into(),
            verdict: Some(Verdict::Deny),
            mode: Some(Mode::Enforce),
            source: Some(crate::audit::decode::Source::Rule),
            rule: Some("network.rules[1]".into()),
            process: Some(Process {
                pid: 4242,
                tid: 4242,
                ppid: 4200,
                uid: 1000,
                gid: 1000,
                comm: "curl".into(),
                exe: None,
                cgroup_id: 8123,
                key: "4242:1".into(),
                ancestors: vec![],
            }),
            net: Some(Net {
                family: "inet".into(),
                protocol: "tcp".into(),
                daddr: "169.254.169.254".into(),
                dport: 80,
                domain: None,
            }),
            file: None,
            exec: None,
            pdp: None,
            count: None,
            reason: None,
            degraded: None,
            policy_revision: "sha256:x".into(),
            prev: "sha256:y".into(),
        };
        assert_eq!(
            format(&r),
            "16:20:20.123 DENY net.connect agent-1 curl(4242) -> 169.254.169.254:80/tcp [network.rules[1]]"
        );
    }
}
