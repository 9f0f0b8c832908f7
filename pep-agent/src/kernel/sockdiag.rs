//! The wire format of NETLINK_SOCK_DIAG requests (`linux/inet_diag.h`),
//! shared by the DNS resolver's peer lookup and the PDP's SOCK_DESTROY.

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
