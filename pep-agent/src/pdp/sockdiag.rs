//! SOCK_DESTROY over NETLINK_SOCK_DIAG: aborts a held connect the PDP
//! denied. The application's connect() then fails with ECONNABORTED (a
//! blocking connect returns it; a non-blocking one reports it through
//! SO_ERROR / poll). Needs CAP_NET_ADMIN and `CONFIG_INET_DIAG_DESTROY`.

use std::{io, net::IpAddr};

use crate::kernel::sockdiag::{NLM_F_REQUEST, Reply, Request, SockId, exchange, octets};

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

/// Destroys the TCP socket `t`. The cookie makes sure it is that socket and
/// not a later one that reused the 4-tuple (the kernel answers ESTALE).
pub fn destroy(t: &Tcp4Tuple) -> io::Result<()> {
    let msg = Request::new(
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        t.family,
        IPPROTO_TCP,
        SockId {
            sport: t.sport.to_be_bytes(),
            dport: t.dport.to_be_bytes(),
            src: octets(t.local, t.family),
            dst: octets(t.remote, t.family),
            ifindex: 0,
            cookie: [t.cookie as u32, (t.cookie >> 32) as u32],
        },
    );
    match exchange(&msg, &mut [0u8; 512])? {
        Reply::Ack => Ok(()),
        Reply::Msg { .. } => Err(io::Error::other("unexpected SOCK_DESTROY reply")),
    }
}
