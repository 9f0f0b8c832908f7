//! SOCK_DESTROY over NETLINK_SOCK_DIAG: aborts a held connect the PDP
//! denied. The application's connect() then fails with ECONNABORTED (a
//! blocking connect returns it; a non-blocking one reports it through
//! SO_ERROR / poll). Needs CAP_NET_ADMIN and `CONFIG_INET_DIAG_DESTROY`.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use crate::kernel::sockdiag::{
    NETLINK_SOCK_DIAG, NLM_F_REQUEST, NLMSG_ERROR, NlMsgHdr, ReqV2, Request, SockId,
};

/// `SOCK_DESTROY` netlink message type.
const SOCK_DESTROY: u16 = 21;
const NLM_F_ACK: u16 = 4;
const IPPROTO_TCP: u8 = 6;

/// One TCP socket, as the kernel's socket lookup wants it.
#[derive(Debug, Clone, Copy)]
pub struct Tcp4Tuple {
    /// The socket's family (`AF_INET` or `AF_INET6`); for an IPv6 socket
    /// talking to an IPv4 peer both addresses are IPv4-mapped.
    pub family: u8,
    pub local: IpAddr,
    pub sport: u16,
    pub remote: IpAddr,
    pub dport: u16,
    pub cookie: u64,
}

fn octets(a: IpAddr, family: u8) -> [u8; 16] {
    let mut out = [0u8; 16];
    match (a, i32::from(family)) {
        (IpAddr::V4(v4), libc::AF_INET) => out[..4].copy_from_slice(&v4.octets()),
        (IpAddr::V4(v4), _) => out = v4.to_ipv6_mapped().octets(),
        (IpAddr::V6(v6), _) => out = v6.octets(),
    }
    out
}

/// Destroys the TCP socket `t`. The cookie makes sure it is that socket and
/// not a later one that reused the 4-tuple (the kernel answers ESTALE).
pub fn destroy(t: &Tcp4Tuple) -> io::Result<()> {
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
    let msg = Request {
        hdr: NlMsgHdr {
            len: size_of::<Request>() as u32,
            ty: SOCK_DESTROY,
            flags: NLM_F_REQUEST | NLM_F_ACK,
            seq: 1,
            pid: 0,
        },
        req: ReqV2 {
            family: t.family,
            protocol: IPPROTO_TCP,
            ext: 0,
            pad: 0,
            states: u32::MAX,
            id: SockId {
                sport: t.sport.to_be_bytes(),
                dport: t.dport.to_be_bytes(),
                src: octets(t.local, t.family),
                dst: octets(t.remote, t.family),
                ifindex: 0,
                cookie: [t.cookie as u32, (t.cookie >> 32) as u32],
            },
        },
    };
    // SAFETY: sending a fully initialised, repr(C) message of its own size
    // (no implicit padding: every field is spelled out).
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
    let mut buf = [0u8; 512];
    // SAFETY: receiving into a buffer we own, of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // nlmsghdr (16 bytes), then for NLMSG_ERROR an i32 error (0 = ACK).
    if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
        let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        return if err == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(-err))
        };
    }
    Err(io::Error::other("unexpected SOCK_DESTROY reply"))
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
        let m = octets("127.0.0.1".parse().unwrap(), libc::AF_INET6 as u8);
        assert_eq!(&m[10..], &[0xff, 0xff, 127, 0, 0, 1]);
    }
}
