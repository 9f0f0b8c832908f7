//! Who sent a query: the client socket (NETLINK_SOCK_DIAG lookup by
//! 4-tuple gives its inode, owner and cookie) and the sandboxed process that
//! holds it (a scan of the sandbox cgroup's processes' descriptors).
//! Best effort: a client that exits before the scan is recorded without a
//! process.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use crate::kernel::sockdiag::{
    NETLINK_SOCK_DIAG, NLM_F_REQUEST, NLMSG_ERROR, NlMsgHdr, ReqV2, Request, SockId,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `INET_DIAG_NOCOOKIE`: do not check the cookie.
const NO_COOKIE: u32 = u32::MAX;

/// A socket as sock_diag describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockInfo {
    pub uid: u32,
    pub inode: u32,
    pub cookie: u64,
}

fn octets(a: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match a {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

/// Looks up a socket by its two ends. The kernel's UDP lookup reads the
/// request's src/dst the other way round from TCP's ("swapped for
/// historical reasons"), so callers try both orientations and check that the
/// owner is in the sandbox. `protocol`: IPPROTO_TCP or IPPROTO_UDP.
pub fn query(src: SocketAddr, dst: SocketAddr, protocol: u8) -> io::Result<SockInfo> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let family = if src.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    } as u8;
    let msg = Request {
        hdr: NlMsgHdr {
            len: size_of::<Request>() as u32,
            ty: SOCK_DIAG_BY_FAMILY,
            flags: NLM_F_REQUEST,
            seq: 1,
            pid: 0,
        },
        req: ReqV2 {
            family,
            protocol,
            ext: 0,
            pad: 0,
            states: u32::MAX,
            id: SockId {
                sport: src.port().to_be_bytes(),
                dport: dst.port().to_be_bytes(),
                src: octets(src.ip()),
                dst: octets(dst.ip()),
                ifindex: 0,
                cookie: [NO_COOKIE, NO_COOKIE],
            },
        },
    };
    // SAFETY: a fully initialised repr(C) message of its own size (every
    // padding byte is a field).
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            (&msg as *const Request).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // SAFETY: receiving into a buffer we own, of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    if ty == NLMSG_ERROR {
        let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        return Err(io::Error::from_raw_os_error(-err));
    }
    // nlmsghdr (16), then inet_diag_msg: family, state, timer, retrans (4),
    // sockid (48: cookie at 40), expires, rqueue, wqueue, uid, inode.
    if ty != SOCK_DIAG_BY_FAMILY || n < 16 + 72 {
        return Err(io::Error::other("unexpected sock_diag reply"));
    }
    let u32_at = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
    let m = 16;
    let cookie = u64::from(u32_at(m + 4 + 40)) | (u64::from(u32_at(m + 4 + 44)) << 32);
    Ok(SockInfo {
        uid: u32_at(m + 64),
        inode: u32_at(m + 68),
        cookie,
    })
}

/// A process, as a `dns.query` record names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub cgroup_id: u64,
}

/// The process in the cgroup tree at `cgroup` that holds socket `inode`.
pub fn owner(cgroup: &Path, inode: u32) -> Option<ProcInfo> {
    let want = format!("socket:[{inode}]");
    let mut dirs = vec![cgroup.to_path_buf()];
    // Bounded: a sandbox's cgroup tree, breadth first.
    while let Some(dir) = dirs.pop() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            let holds = fds
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()));
            if holds {
                return Some(proc_info(pid, &dir));
            }
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            dirs.extend(rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()));
        }
    }
    None
}

fn proc_info(pid: u32, cgroup: &Path) -> ProcInfo {
    use std::os::unix::fs::MetadataExt as _;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    ProcInfo {
        pid,
        ppid: field("PPid:"),
        uid: field("Uid:"),
        gid: field("Gid:"),
        comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim_end().to_owned())
            .unwrap_or_default(),
        cgroup_id: std::fs::metadata(cgroup).map(|m| m.ino()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_matches_the_kernel() {
        assert_eq!(size_of::<SockId>(), 48);
        assert_eq!(size_of::<ReqV2>(), 56);
        assert_eq!(size_of::<Request>(), 72);
    }
}
