//! Connects a retired build holds (its `PENDING`, keyed by socket cookie)
//! at a switch-over. Its egress program drops their SYNs until its PDP task
//! answers; once that program is detached, the next SYN retransmit would
//! leave with no decision made. So before the detach, this build's
//! `PENDING` takes them over: its own egress program (attached beside the
//! old one to every sandbox that asks) goes on dropping their SYNs, and its
//! sock_ops program removes each entry when the socket closes. No daemon of
//! this build was asked about them (their asks wait in the old ring, which
//! this build cannot decode and counts as lost), so their SYN retries run
//! out and the connects fail with ETIMEDOUT: held until then, never
//! released. Fail closed.
//!
//! Only the cookies are read from the old map: its values have the retired
//! build's layout.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData};
use pep_common::ask::{ASK_HELD, AskEvent};

use super::pinned::{obj_get, obj_info, sys_bpf};

/// `AskEvent::sent` of an entry taken over from a retired build: no event
/// is to be sent for it (and this build's sock_ops program sends none, as
/// for any socket whose event went out).
const SENT_BY_RETIRED: u32 = 1;

/// Puts every connect held in the retired `PENDING` at `old` into this
/// build's `PENDING` at `new` (one that is there already, held by both
/// builds, stays as it is). Returns how many were taken over. A retired
/// build without the map held nothing.
pub fn take_over(old: &Path, new: &Path) -> io::Result<u64> {
    let old_fd = match obj_get(old) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let (key_size, value_size) = map_sizes(old_fd.as_fd())?;
    if key_size != 8 {
        return Err(io::Error::other(format!(
            "{}: keys of {key_size} bytes, not socket cookies",
            old.display()
        )));
    }
    let cookies = cookies(old_fd.as_fd())?;
    if cookies.is_empty() {
        return Ok(0);
    }
    let data = MapData::from_pin(new).map_err(io::Error::other)?;
    let mut pending: HashMap<MapData, u64, AskEvent> =
        HashMap::try_from(Map::HashMap(data)).map_err(io::Error::other)?;
    let now = crate::pdp::cache::boot_ns();
    let mut taken = 0;
    for cookie in cookies {
        if pending.get(&cookie, 0).is_ok() {
            continue;
        }
        // SAFETY: `AskEvent` is plain integers and integer arrays: all
        // zeroes is a valid value.
        let mut ev: AskEvent = unsafe { std::mem::zeroed() };
        ev.header.ts_boot_ns = now;
        ev.cookie = cookie;
        ev.disposition = ASK_HELD;
        ev.sent = SENT_BY_RETIRED;
        pending.insert(cookie, ev, 0).map_err(io::Error::other)?;
        // A socket that closed after the listing had its close callback run
        // before the entry existed: nothing would ever remove it.
        if lookup(old_fd.as_fd(), cookie, value_size)? {
            taken += 1;
        } else {
            pending.remove(&cookie).map_err(io::Error::other)?;
        }
    }
    Ok(taken)
}

/// A map's key and value sizes.
fn map_sizes(map: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // `struct bpf_map_info` starts with `type`, `id`, `key_size`, `value_size`.
    let mut info = [0u32; 4];
    obj_info(map, &mut info)?;
    Ok((info[2], info[3]))
}

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value` for a lookup, `next_key` for a walk.
    value: u64,
    flags: u64,
}

/// Every key of a hash map of 8-byte keys (`BPF_MAP_GET_NEXT_KEY`). A walk
/// of a map that changes meanwhile may miss keys added during it: those
/// connects began after this build's programs were attached, which hold
/// them too.
fn cookies(map: BorrowedFd<'_>) -> io::Result<Vec<u64>> {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let mut out = Vec::new();
    let mut prev: Option<u64> = None;
    // Bounded: the map holds at most its max_entries keys.
    for _ in 0..1 << 20 {
        let mut next = 0u64;
        let mut attr = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: prev.as_ref().map_or(0, |k| k as *const u64 as u64),
            value: &mut next as *mut u64 as u64,
            flags: 0,
        };
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                out.push(next);
                prev = Some(next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("a PENDING map that never ends"))
}

/// Whether `cookie` is a key of the map (`BPF_MAP_LOOKUP_ELEM`, into a
/// buffer of the map's value size).
fn lookup(map: BorrowedFd<'_>, cookie: u64, value_size: u32) -> io::Result<bool> {
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    let mut value = vec![0u8; value_size as usize];
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &cookie as *const u64 as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}
