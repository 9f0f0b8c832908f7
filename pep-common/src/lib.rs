//! Types shared by the eBPF programs (`pep-ebpf`) and userspace (`pep-agent`).
//!
//! Every type here is `#[repr(C)]` with explicit padding fields, so its layout is
//! the same on both sides and no uninitialised bytes travel through a map or the
//! ring buffer. Fields carry raw integers; userspace converts them with `TryFrom`.
#![no_std]

pub mod ask;
pub mod dns;
pub mod event;
pub mod file;
pub mod net;
pub mod sandbox;

#[cfg(feature = "user")]
mod pod {
    //! `aya::Pod` for every type userspace puts in a map.
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made of integers and integer
    // arrays only, with every padding byte spelled out as a field.
    unsafe impl aya::Pod for crate::net::NetKeyV4 {}
    unsafe impl aya::Pod for crate::net::NetKeyV6 {}
    unsafe impl aya::Pod for crate::net::NetRuleSet {}
    unsafe impl aya::Pod for crate::sandbox::SandboxConfig {}
    unsafe impl aya::Pod for crate::file::FileRuleKey {}
    unsafe impl aya::Pod for crate::file::FileRuleValue {}
    unsafe impl aya::Pod for crate::file::InodeKey {}
    unsafe impl aya::Pod for crate::file::ExecRuleValue {}
    unsafe impl aya::Pod for crate::ask::VerdictKey {}
    unsafe impl aya::Pod for crate::ask::AppliedKey {}
    unsafe impl aya::Pod for crate::ask::AppliedAnswer {}
    unsafe impl aya::Pod for crate::ask::VerdictEntry {}
    unsafe impl aya::Pod for crate::ask::AskSandbox {}
    unsafe impl aya::Pod for crate::ask::AskEvent {}
    unsafe impl aya::Pod for crate::dns::DnsSteer {}
    unsafe impl aya::Pod for crate::dns::DnsOrig {}
    unsafe impl aya::Pod for crate::dns::LearnedKey {}
    unsafe impl aya::Pod for crate::dns::LearnedEntry {}
}
