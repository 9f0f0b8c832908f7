//! pep-agent's kernel side. One module per subsystem, maps beside the probe
//! that owns them:
//! - `sandbox`: which sandbox (if any) the current task belongs to;
//! - `audit`: the ring buffer of decisions and the counters;
//! - `net`: cgroup sock_addr hooks (connect, sendmsg) over LPM tries of rules;
//! - `file`: BPF LSM hooks on file opens.
#![no_std]
#![no_main]

mod audit;
mod file;
mod kernel;
mod net;
mod sandbox;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach a panic, so this is never
    // executed; it exists to satisfy `no_std`.
    loop {}
}

/// LSM programs and the `bpf_d_path`/`bpf_probe_read_kernel` helpers require a
/// GPL-compatible license.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
