//! The audit record as one JSON line, written by hand into a reused buffer.
//!
//! This is the audit hot path (one call per kernel decision, hundreds of
//! thousands per second): no allocation, no `fmt` machinery, strings copied
//! in runs between the bytes that need escaping. The output is byte for byte
//! what `serde_json::to_string(&record)` writes (same key order, same
//! escapes, same optional keys left out); `line_tests` proves it on
//! arbitrary records, so readers (`events verify`, `tail`, the chain hash)
//! see no difference.

use std::fmt::Write as _;

use super::{
    decode::{Mode, Source, Verdict},
    record::{Exec, File, Net, Process, Record},
};

/// Appends `rec` as one JSON object (no newline) to `out`.
pub fn write_record(out: &mut String, rec: &Record) {
    out.push_str("{\"ts\":");
    write_str(out, &rec.ts);
    out.push_str(",\"seq\":");
    write_u64(out, rec.seq);
    out.push_str(",\"id\":");
    write_str(out, &rec.id);
    out.push_str(",\"sandbox\":");
    write_str(out, &rec.sandbox);
    out.push_str(",\"action\":");
    write_str(out, &rec.action);
    out.push_str(",\"verdict\":");
    match rec.verdict {
        Some(Verdict::Allow) => out.push_str("\"allow\""),
        Some(Verdict::Deny) => out.push_str("\"deny\""),
        None => out.push_str("null"),
    }
    out.push_str(",\"mode\":");
    match rec.mode {
        Some(Mode::Enforce) => out.push_str("\"enforce\""),
        Some(Mode::Audit) => out.push_str("\"audit\""),
        None => out.push_str("null"),
    }
    out.push_str(",\"source\":");
    match rec.source {
        Some(Source::Rule) => out.push_str("\"rule\""),
        Some(Source::Cache) => out.push_str("\"cache\""),
        Some(Source::Pdp) => out.push_str("\"pdp\""),
        Some(Source::Default) => out.push_str("\"default\""),
        None => out.push_str("null"),
    }
    out.push_str(",\"rule\":");
    write_opt_str(out, rec.rule.as_deref());
    out.push_str(",\"process\":");
    match &rec.process {
        Some(p) => write_process(out, p),
        None => out.push_str("null"),
    }
    out.push_str(",\"net\":");
    match &rec.net {
        Some(n) => write_net(out, n),
        None => out.push_str("null"),
    }
    out.push_str(",\"file\":");
    match &rec.file {
        Some(f) => write_file(out, f),
        None => out.push_str("null"),
    }
    out.push_str(",\"exec\":");
    match &rec.exec {
        Some(e) => write_exec(out, e),
        None => out.push_str("null"),
    }
    out.push_str(",\"pdp\":");
    match &rec.pdp {
        // Rare (PDP-decided records only) and free-form: serde writes it.
        Some(v) => {
            let _ = write!(out, "{v}");
        }
        None => out.push_str("null"),
    }
    if let Some(c) = rec.count {
        out.push_str(",\"count\":");
        write_u64(out, c);
    }
    if let Some(r) = &rec.reason {
        out.push_str(",\"reason\":");
        write_str(out, r);
    }
    if let Some(d) = &rec.degraded {
        out.push_str(",\"degraded\":");
        write_str(out, d);
    }
    out.push_str(",\"policy_revision\":");
    write_str(out, &rec.policy_revision);
    out.push_str(",\"prev\":");
    write_str(out, &rec.prev);
    out.push('}');
}

/// `rec` as one JSON line (no newline), in a fresh string.
pub fn to_line(rec: &Record) -> String {
    let mut s = String::with_capacity(1024);
    write_record(&mut s, rec);
    s
}

fn write_process(out: &mut String, p: &Process) {
    out.push_str("{\"pid\":");
    write_u64(out, p.pid.into());
    out.push_str(",\"tid\":");
    write_u64(out, p.tid.into());
    out.push_str(",\"ppid\":");
    write_u64(out, p.ppid.into());
    out.push_str(",\"uid\":");
    write_u64(out, p.uid.into());
    out.push_str(",\"gid\":");
    write_u64(out, p.gid.into());
    out.push_str(",\"comm\":");
    write_str(out, &p.comm);
    out.push_str(",\"exe\":");
    write_opt_str(out, p.exe.as_deref());
    out.push_str(",\"cgroup_id\":");
    write_u64(out, p.cgroup_id);
    out.push_str(",\"key\":");
    write_str(out, &p.key);
    out.push_str(",\"ancestors\":[");
    for (i, a) in p.ancestors.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"pid\":");
        write_u64(out, a.pid.into());
        out.push_str(",\"comm\":");
        write_str(out, &a.comm);
        out.push('}');
    }
    out.push_str("]}");
}

fn write_net(out: &mut String, n: &Net) {
    out.push_str("{\"family\":");
    write_str(out, &n.family);
    out.push_str(",\"protocol\":");
    write_str(out, &n.protocol);
    out.push_str(",\"daddr\":");
    write_str(out, &n.daddr);
    out.push_str(",\"dport\":");
    write_u64(out, n.dport.into());
    if let Some(d) = &n.domain {
        out.push_str(",\"domain\":");
        write_str(out, d);
    }
    out.push('}');
}

fn write_file(out: &mut String, f: &File) {
    out.push_str("{\"path\":");
    write_opt_str(out, f.path.as_deref());
    out.push_str(",\"access\":");
    write_str_array(out, &f.access);
    out.push('}');
}

fn write_exec(out: &mut String, e: &Exec) {
    out.push_str("{\"path\":");
    write_opt_str(out, e.path.as_deref());
    out.push_str(",\"argv\":");
    write_str_array(out, &e.argv);
    out.push('}');
}

fn write_str_array(out: &mut String, v: &[String]) {
    out.push('[');
    for (i, s) in v.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(out, s);
    }
    out.push(']');
}

fn write_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => write_str(out, s),
        None => out.push_str("null"),
    }
}

/// Decimal, as serde_json writes integers.
pub fn write_u64(out: &mut String, n: u64) {
    let mut b = itoa::Buffer::new();
    out.push_str(b.format(n));
}

/// What a byte becomes inside a JSON string: 0 (itself), or the letter of
/// its short escape, or `u` (`\u00XX`). serde_json's table.
const ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// `s` as a quoted JSON string: runs of plain bytes are copied at once,
/// quotes, backslashes and control characters escaped as serde_json does
/// (everything else, non-ASCII included, is copied as is).
pub fn write_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc = ESCAPE[usize::from(b)];
        if esc == 0 {
            continue;
        }
        // `i` is at an ASCII byte, so both slices end on char boundaries.
        out.push_str(&s[start..i]);
        out.push('\\');
        if esc == b'u' {
            out.push_str("u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push(char::from(esc));
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// An address as `Display` writes it (`1.2.3.4`, `::1`, `::ffff:1.2.3.4`),
/// without allocating for IPv4, the flood case.
pub fn write_ip(out: &mut String, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut b = itoa::Buffer::new();
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(b.format(o));
            }
        }
        // The zero-run compression rules are subtle: the standard library's.
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}
