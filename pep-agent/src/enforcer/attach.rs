//! Cgroup attachment with the legacy `BPF_PROG_ATTACH` command, so that the
//! cgroup, not a file descriptor of ours, holds the program: enforcement
//! survives the death of the process that attached it.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `enum bpf_cmd`.
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
/// `BPF_F_ALLOW_MULTI`.
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;

/// `enum bpf_attach_type` for connect4, connect6, sendmsg4, sendmsg6, in the
/// order of `loader::NET_PROGRAMS`.
pub const NET_ATTACH_TYPES: [u32; 4] = [10, 11, 14, 15];

#[derive(Debug, Clone, Copy)]
pub enum Op {
    Attach,
    Detach,
}

/// The attach/detach part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    _pad: [u32; 3],
}

pub fn cgroup(op: Op, cgroup: BorrowedFd<'_>, prog: BorrowedFd<'_>, attach_type: u32) -> io::Result<()> {
    let attr = AttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: match op {
            Op::Attach => BPF_F_ALLOW_MULTI,
            Op::Detach => 0,
        },
        ..Default::default()
    };
    let cmd = match op {
        Op::Attach => BPF_PROG_ATTACH,
        Op::Detach => BPF_PROG_DETACH,
    };
    // SAFETY: bpf(2) with a valid, fully initialised attr of the given size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const AttachAttr,
            size_of::<AttachAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
