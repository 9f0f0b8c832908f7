//! `-o ocsf`: records as OCSF 1.3 events, for SIEMs.
//!
//! - `net.connect`, `net.send` -> Network Activity (class 4001), activity
//!   Open (1) for a connect, Traffic (6) for a send;
//! - `file.open`, `file.write` -> File System Activity (1001), activity Read
//!   (2) or Update (3);
//! - `exec` -> Process Activity (1007), activity Launch (1);
//! - anything else (`audit.lost`) -> Base Event (0), activity Other (99).
//!
//! `action_id`/`disposition_id`: allowed -> 1/1 (Allowed/Allowed); denied in
//! enforce mode -> 2/2 (Denied/Blocked); denied in audit mode (the syscall
//! went through) -> 1/17 (Allowed/Logged). Fields OCSF has no place for
//! (sandbox, rule, source, chain) are under `unmapped`.

use serde_json::{Value, json};

use super::{
    decode::{Mode, Verdict},
    record::Record,
};

pub const OCSF_VERSION: &str = "1.3.0";

pub const CLASS_BASE: u32 = 0;
pub const CLASS_FILE_SYSTEM: u32 = 1001;
pub const CLASS_PROCESS: u32 = 1007;
pub const CLASS_NETWORK: u32 = 4001;

/// (class_uid, category_uid, activity_id, activity name) of an action.
fn class_of(action: &str) -> (u32, u32, u32, &'static str) {
    match action {
        "net.connect" => (CLASS_NETWORK, 4, 1, "Open"),
        "net.send" => (CLASS_NETWORK, 4, 6, "Traffic"),
        "file.open" => (CLASS_FILE_SYSTEM, 1, 2, "Read"),
        "file.write" => (CLASS_FILE_SYSTEM, 1, 3, "Update"),
        "exec" => (CLASS_PROCESS, 1, 1, "Launch"),
        _ => (CLASS_BASE, 0, 99, "Other"),
    }
}

fn class_name(class: u32) -> &'static str {
    match class {
        CLASS_NETWORK => "Network Activity",
        CLASS_FILE_SYSTEM => "File System Activity",
        CLASS_PROCESS => "Process Activity",
        _ => "Base Event",
    }
}

/// (action_id, action, disposition_id, disposition).
fn disposition(r: &Record) -> (u32, &'static str, u32, &'static str) {
    match (r.verdict, r.mode) {
        (Some(Verdict::Allow), _) => (1, "Allowed", 1, "Allowed"),
        (Some(Verdict::Deny), Some(Mode::Audit)) => (1, "Allowed", 17, "Logged"),
        (Some(Verdict::Deny), _) => (2, "Denied", 2, "Blocked"),
        (None, _) => (0, "Unknown", 0, "Unknown"),
    }
}

/// Milliseconds since the epoch of a record's `ts`
/// (`2026-11-25T16:20:20.123456789Z`, always UTC as the pipeline writes it).
fn epoch_ms(ts: &str) -> Option<i64> {
    let num = |a: usize, b: usize| ts.get(a..b)?.parse::<u32>().ok();
    if ts.len() < 20 || !ts.ends_with('Z') {
        return None;
    }
    let month = time::Month::try_from(u8::try_from(num(5, 7)?).ok()?).ok()?;
    let date = time::Date::from_calendar_date(
        i32::try_from(num(0, 4)?).ok()?,
        month,
        u8::try_from(num(8, 10)?).ok()?,
    )
    .ok()?;
    let frac = ts.get(20..ts.len() - 1).unwrap_or("");
    let ms = frac
        .get(..3.min(frac.len()))
        .map(|f| format!("{f:0<3}"))
        .and_then(|f| f.parse::<i64>().ok())
        .unwrap_or(0);
    let t = time::Time::from_hms(
        u8::try_from(num(11, 13)?).ok()?,
        u8::try_from(num(14, 16)?).ok()?,
        u8::try_from(num(17, 19)?).ok()?,
    )
    .ok()?;
    Some(
        time::PrimitiveDateTime::new(date, t)
            .assume_utc()
            .unix_timestamp()
            * 1000
            + ms,
    )
}

/// The OCSF event for one record.
pub fn to_ocsf(r: &Record) -> Value {
    let (class_uid, category_uid, activity_id, activity_name) = class_of(&r.action);
    let (action_id, action, disposition_id, disposition) = disposition(r);
    let denied = r.verdict == Some(Verdict::Deny);
    let mut ev = json!({
        "class_uid": class_uid,
        "class_name": class_name(class_uid),
        "category_uid": category_uid,
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": u64::from(class_uid) * 100 + u64::from(activity_id),
        "action_id": action_id,
        "action": action,
        "disposition_id": disposition_id,
        "disposition": disposition,
        "severity_id": if denied { 3 } else { 1 },
        "status_id": if action_id == 2 { 2 } else { 1 },
        "time": epoch_ms(&r.ts),
        "metadata": {
            "version": OCSF_VERSION,
            "uid": r.id,
            "sequence": r.seq,
            "product": {"name": "pep-agent", "vendor_name": "pep-agent", "version": env!("CARGO_PKG_VERSION")},
        },
        "unmapped": {
            "sandbox": r.sandbox,
            "pep_action": r.action,
            "rule": r.rule,
            "source": r.source,
            "mode": r.mode,
            "policy_revision": r.policy_revision,
            "prev": r.prev,
        },
    });
    if let Some(c) = r.count {
        ev["count"] = json!(c);
    }
    if let Some(p) = &r.process {
        let proc_obj = json!({
            "pid": p.pid,
            "tid": p.tid,
            "uid": p.key,
            "name": p.comm,
            "file": p.exe.as_ref().map(|e| json!({"path": e, "type_id": 1})),
            "user": {"uid": p.uid.to_string()},
            "group": {"uid": p.gid.to_string()},
            "parent_process": {"pid": p.ppid},
            "lineage": p.ancestors.iter().map(|a| format!("{}({})", a.comm, a.pid)).collect::<Vec<_>>(),
        });
        ev["actor"] = json!({"process": proc_obj});
    }
    if let Some(n) = &r.net {
        ev["dst_endpoint"] = json!({"ip": n.daddr, "port": n.dport, "hostname": n.domain});
        ev["connection_info"] = json!({
            "protocol_name": n.protocol,
            "protocol_ver_id": if n.family == "inet6" { 6 } else { 4 },
            "direction_id": 2,
            "direction": "Outbound",
        });
    }
    if let Some(f) = &r.file {
        let name = f.path.as_deref().and_then(|p| p.rsplit('/').next());
        ev["file"] = json!({"path": f.path, "name": name, "type_id": 1});
        ev["unmapped"]["access"] = json!(f.access);
    }
    if let Some(e) = &r.exec {
        ev["process"] = json!({
            "file": {"path": e.path, "type_id": 1},
            "cmd_line": e.argv.join(" "),
        });
    }
    if r.action == "audit.lost" {
        ev["message"] = json!(format!(
            "{} audit events lost ({})",
            r.count.unwrap_or(0),
            r.reason.as_deref().unwrap_or("unknown")
        ));
    }
    ev
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Exec, File, Net, Process};

    fn rec(action: &str, verdict: Verdict, mode: Mode) -> Record {
        Record {
            ts: "2026-11-25T16:20:20.123456789Z".into(),
            seq: 42,
            id: "01JD".into(),
            sandbox: "agent-1".into(),
            action: action.into(),
            verdict: Some(verdict),
            mode: Some(mode),
            source: Some(crate::audit::decode::Source::Rule),
            rule: Some("network.rules[1]".into()),
            process: Some(Process {
                pid: 4242,
                tid: 4243,
                ppid: 4200,
                uid: 1000,
                gid: 1001,
                comm: "curl".into(),
                exe: Some("/usr/bin/curl".into()),
                cgroup_id: 8123,
                key: "4242:99".into(),
                ancestors: vec![crate::audit::record::Ancestor {
                    pid: 4200,
                    comm: "bash".into(),
                }],
            }),
            net: None,
            file: None,
            exec: None,
            pdp: None,
            count: None,
            reason: None,
            degraded: None,
            policy_revision: "sha256:x".into(),
            prev: "sha256:y".into(),
        }
    }

    #[test]
    fn denied_connect_is_network_activity_blocked() {
        let mut r = rec("net.connect", Verdict::Deny, Mode::Enforce);
        r.net = Some(Net {
            family: "inet".into(),
            protocol: "tcp".into(),
            daddr: "169.254.169.254".into(),
            dport: 80,
            domain: None,
        });
        let e = to_ocsf(&r);
        assert_eq!(e["class_uid"], 4001);
        assert_eq!(e["category_uid"], 4);
        assert_eq!(e["activity_id"], 1);
        assert_eq!(e["type_uid"], 400101);
        assert_eq!(
            (e["action_id"].clone(), e["disposition_id"].clone()),
            (json!(2), json!(2))
        );
        assert_eq!(e["dst_endpoint"]["ip"], "169.254.169.254");
        assert_eq!(e["dst_endpoint"]["port"], 80);
        assert_eq!(e["actor"]["process"]["pid"], 4242);
        assert_eq!(e["actor"]["process"]["uid"], "4242:99");
        assert_eq!(e["actor"]["process"]["file"]["path"], "/usr/bin/curl");
        assert_eq!(e["actor"]["process"]["lineage"][0], "bash(4200)");
        assert_eq!(e["time"], 1_795_623_620_123i64);
        assert_eq!(e["metadata"]["sequence"], 42);
        assert_eq!(e["unmapped"]["rule"], "network.rules[1]");
    }

    #[test]
    fn send_allowed_and_audit_mode_deny() {
        let mut r = rec("net.send", Verdict::Allow, Mode::Enforce);
        r.net = Some(Net {
            family: "inet6".into(),
            protocol: "udp".into(),
            daddr: "::1".into(),
            dport: 53,
            domain: None,
        });
        let e = to_ocsf(&r);
        assert_eq!(
            (e["class_uid"].clone(), e["activity_id"].clone()),
            (json!(4001), json!(6))
        );
        assert_eq!(
            (e["action_id"].clone(), e["disposition_id"].clone()),
            (json!(1), json!(1))
        );
        assert_eq!(e["connection_info"]["protocol_ver_id"], 6);
        r.verdict = Some(Verdict::Deny);
        r.mode = Some(Mode::Audit);
        let e = to_ocsf(&r);
        assert_eq!(
            (e["action_id"].clone(), e["disposition_id"].clone()),
            (json!(1), json!(17))
        );
    }

    #[test]
    fn file_and_exec_classes() {
        let mut r = rec("file.write", Verdict::Deny, Mode::Enforce);
        r.file = Some(File {
            path: Some("/home/dev/.ssh/id_rsa".into()),
            access: vec!["read".into(), "write".into()],
        });
        r.count = Some(7);
        let e = to_ocsf(&r);
        assert_eq!(
            (e["class_uid"].clone(), e["category_uid"].clone()),
            (json!(1001), json!(1))
        );
        assert_eq!(e["activity_id"], 3);
        assert_eq!(e["file"]["name"], "id_rsa");
        assert_eq!(e["count"], 7);
        let mut r = rec("file.open", Verdict::Allow, Mode::Enforce);
        r.file = Some(File {
            path: Some("/usr/lib/x".into()),
            access: vec!["read".into()],
        });
        assert_eq!(to_ocsf(&r)["activity_id"], 2);
        let mut r = rec("exec", Verdict::Deny, Mode::Enforce);
        r.exec = Some(Exec {
            path: Some("/usr/bin/nc".into()),
            argv: vec!["nc".into(), "-l".into()],
        });
        let e = to_ocsf(&r);
        assert_eq!(
            (e["class_uid"].clone(), e["activity_id"].clone()),
            (json!(1007), json!(1))
        );
        assert_eq!(e["type_uid"], 100701);
        assert_eq!(e["process"]["cmd_line"], "nc -l");
        assert_eq!(
            (e["action_id"].clone(), e["disposition_id"].clone()),
            (json!(2), json!(2))
        );
    }

    #[test]
    fn lost_is_a_base_event() {
        let mut r = rec("audit.lost", Verdict::Deny, Mode::Enforce);
        r.verdict = None;
        r.process = None;
        r.count = Some(5);
        r.reason = Some("kernel".into());
        let e = to_ocsf(&r);
        assert_eq!(
            (e["class_uid"].clone(), e["activity_id"].clone()),
            (json!(0), json!(99))
        );
        assert_eq!(e["count"], 5);
        assert_eq!(e["message"], "5 audit events lost (kernel)");
    }
}
