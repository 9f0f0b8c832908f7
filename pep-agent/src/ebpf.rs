//! The embedded eBPF object.

/// The eBPF object built by build.rs, aligned as the ELF parser needs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pep-ebpf"));
