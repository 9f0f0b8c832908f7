//! The wire format of NETLINK_SOCK_DIAG requests (`linux/inet_diag.h`),
//! shared by the DNS resolver's peer lookup and the PDP's SOCK_DESTROY, and
//! the one request-reply exchange both make.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

pub const NETLINK_SOCK_DIAG: i32 = 4;
pub const NLM_F_REQUEST: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;

#[repr(C)]
pub struct NlMsgHdr {
    pub len: u32,
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
}

/// `struct inet_diag_sockid`.
#[repr(C)]
pub struct SockId {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub ifindex: u32,
    pub cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
pub struct ReqV2 {
    pub family: u8,
    pub protocol: u8,
    pub ext: u8,
    pub pad: u8,
    pub states: u32,
    pub id: SockId,
}

/// A request: the netlink header, then the inet_diag request.
#[repr(C)]
pub struct Request {
    pub hdr: NlMsgHdr,
    pub req: ReqV2,
}

impl Request {
    /// A request of type `ty` for one socket of `family`/`protocol`.
    pub fn new(ty: u16, flags: u16, family: u8, protocol: u8, id: SockId) -> Self {
        Self {
            hdr: NlMsgHdr {
                len: size_of::<Request>() as u32,
                ty,
                flags,
                seq: 1,
                pid: 0,
            },
            req: ReqV2 {
                family,
                protocol,
                ext: 0,
                pad: 0,
                states: u32::MAX,
                id,
            },
        }
    }
}

/// An address as `inet_diag_sockid` holds it for a socket of `family`: an
/// IPv4 address of an `AF_INET` socket in the first 4 bytes, IPv4-mapped for
/// an `AF_INET6` one.
pub fn octets(a: IpAddr, family: u8) -> [u8; 16] {
    let mut out = [0u8; 16];
    match (a, i32::from(family)) {
        (IpAddr::V4(v4), libc::AF_INET) => out[..4].copy_from_slice(&v4.octets()),
        (IpAddr::V4(v4), _) => out = v4.to_ipv6_mapped().octets(),
        (IpAddr::V6(v6), _) => out = v6.octets(),
    }
    out
}

/// What the kernel answered.
pub enum Reply {
    /// `NLMSG_ERROR` with error 0: the acknowledgement of a request.
    Ack,
    /// Any other message: its type and length, in the caller's buffer.
    Msg { ty: u16, len: usize },
}

/// Sends `msg` on a fresh NETLINK_SOCK_DIAG socket and receives the first
/// reply into `buf`. A kernel error (`NLMSG_ERROR` with an error) is `Err`.
pub fn exchange(msg: &Request, buf: &mut [u8]) -> io::Result<Reply> {
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
    // SAFETY: sending a fully initialised, repr(C) message of its own size
    // (no implicit padding: every field is spelled out).
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            (msg as *const Request).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: receiving into a buffer we own, of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n < 16 {
        return Err(io::Error::other("short sock_diag reply"));
    }
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    // nlmsghdr (16 bytes), then for NLMSG_ERROR an i32 error (0 = ACK).
    if ty == NLMSG_ERROR {
        if n < 20 {
            return Err(io::Error::other("short sock_diag error reply"));
        }
        let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        return if err == 0 {
            Ok(Reply::Ack)
        } else {
            Err(io::Error::from_raw_os_error(-err))
        };
    }
    Ok(Reply::Msg { ty, len: n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_matches_the_kernel() {
        // inet_diag_sockid is 48 bytes, inet_diag_req_v2 56, nlmsghdr 16.
        assert_eq!(size_of::<SockId>(), 48);
        assert_eq!(size_of::<ReqV2>(), 56);
        assert_eq!(size_of::<Request>(), 72);
    }

    #[test]
    fn addresses_follow_the_socket_family() {
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        let m = octets(v4, libc::AF_INET6 as u8);
        assert_eq!(&m[10..], &[0xff, 0xff, 127, 0, 0, 1]);
        let plain = octets(v4, libc::AF_INET as u8);
        assert_eq!(&plain[..4], &[127, 0, 0, 1]);
        assert!(plain[4..].iter().all(|b| *b == 0));
    }
}
