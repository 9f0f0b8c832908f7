//! Who sent a query: the client socket (NETLINK_SOCK_DIAG lookup by
//! 4-tuple gives its inode, owner and cookie) and the sandboxed process that
//! holds it (a scan of the sandbox cgroup's processes' descriptors).
//! Best effort: a client that exits before the scan is recorded without a
//! process.

use std::{io, net::SocketAddr, path::Path};

use crate::kernel::sockdiag::{NLM_F_REQUEST, Reply, Request, SockId, exchange, octets};

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

/// Looks up a socket by its two ends. The kernel's UDP lookup reads the
/// request's src/dst the other way round from TCP's ("swapped for
/// historical reasons"), so callers try both orientations and check that the
/// owner is in the sandbox. `protocol`: IPPROTO_TCP or IPPROTO_UDP.
pub fn query(src: SocketAddr, dst: SocketAddr, protocol: u8) -> io::Result<SockInfo> {
    let family = if src.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    } as u8;
    let msg = Request::new(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST,
        family,
        protocol,
        SockId {
            sport: src.port().to_be_bytes(),
            dport: dst.port().to_be_bytes(),
            src: octets(src.ip(), family),
            dst: octets(dst.ip(), family),
            ifindex: 0,
            cookie: [NO_COOKIE, NO_COOKIE],
        },
    );
    let mut buf = [0u8; 1024];
    let Reply::Msg { ty, len: n } = exchange(&msg, &mut buf)? else {
        return Err(io::Error::other("unexpected sock_diag reply"));
    };
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
