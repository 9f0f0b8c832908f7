//! pep-agent: a Policy Enforcement Point for AI agents.
//!
//! The flow, one module each:
//! `policy` (the YAML contract) -> `compiler` (rules to map entries) ->
//! `enforcer` (load the embedded `ebpf` object, attach, write the maps) ->
//! kernel hooks (crate `pep-ebpf`) -> ring buffer -> `audit` (records, sinks).
//! `kernel` says what the running kernel offers; `sandbox` runs a command in one.

pub mod audit;
pub mod client;
pub mod compiler;
pub mod daemon;
pub mod dns;
pub mod ebpf;
pub mod enforcer;
pub mod kernel;
pub mod pdp;
pub mod policy;
pub mod sandbox;
