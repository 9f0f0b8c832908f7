//! The Policy Decision Point side of the PEP: asking, answering, caching.
//!
//! - `query`: SPEC's decision query (the `input` every engine is given);
//!   `input`: the same as regorus' input value; `exe`: `subject.exe` named
//!   once per executable image;
//! - `answer`: the answer's shapes (`result` boolean or object; missing is
//!   deny; anything else is deny with the reason recorded);
//! - `builtin`, `rego`, `opa`: the three engines behind the `Pdp` trait;
//!   `engine` builds the one a policy's `pdp:` section selects;
//! - `serve`: `pep-agent pdp serve`, an OPA-compatible Data API over regorus;
//! - `rules`: a Rego rules query producing a sandbox's policy sections;
//! - `revision`: when a reload changes the PDP's answers (and so the
//!   verdict cache's revision stamp);
//! - `eval`: `pep-agent policy eval`;
//! - `cache`, `kernel`, `sockdiag`, `miss`, `task`, `origins`: the kernel
//!   side of asking (the verdict cache and held connects in BPF maps,
//!   SOCK_DESTROY, the misses as decoded, the task that answers them during
//!   `pep-agent run`, and what each cached verdict came from); `warm`:
//!   keeping the embedded engine warm while a sandbox is missing; `spin`:
//!   `pdp.busy_poll_us`, spinning for the next miss instead of sleeping.

pub mod acks;
pub mod answer;
mod apply;
pub mod builtin;
pub mod cache;
mod compiled;
pub mod engine;
pub mod eval;
pub mod input;
pub mod kernel;
pub mod miss;
pub mod opa;
pub mod origins;
pub mod query;
mod recovered;
pub mod rego;
pub mod revision;
pub mod rules;
pub mod serve;
pub mod sockdiag;
mod spin;
pub mod standalone;
pub mod task;
pub mod warm;

use std::{future::Future, pin::Pin, time::Duration};

pub use answer::Answer;
pub use engine::build as build_engine;

/// One decision, as an engine returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct PdpDecision {
    pub answer: Answer,
    /// The PDP's id for this decision (OPA's `decision_id`; a fresh ULID for
    /// the embedded engines), for correlating with the PDP's own logs.
    pub decision_id: Option<String>,
}

/// Why a PDP could not answer. Each case goes to `on_unavailable`.
#[derive(Debug, thiserror::Error)]
pub enum PdpError {
    #[error("the PDP did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the PDP is unavailable: {0}")]
    Unavailable(String),
    #[error("the PDP failed to evaluate: {0}")]
    Eval(String),
}

/// The future a `Pdp::decide` returns (boxed so the trait stays object safe).
pub type DecideFuture<'a> = Pin<Box<dyn Future<Output = Result<PdpDecision, PdpError>> + Send + 'a>>;

/// A Policy Decision Point: given SPEC's decision query `input`, an answer.
pub trait Pdp: Send + Sync {
    /// `builtin`, `rego` or `opa`: the audit record's `pdp.engine`.
    fn engine(&self) -> &'static str;
    fn decide<'a>(&'a self, input: &'a serde_json::Value) -> DecideFuture<'a>;

    /// The embedded engines answer in microseconds, synchronously: they
    /// return `Some`, and the thread that reads the kernel's misses decides
    /// right there, on the query itself (no JSON document in between, no
    /// hop to another thread). A remote engine returns `None` and is asked
    /// through `decide`.
    fn decide_now(&self, _query: &query::Query) -> Option<Result<PdpDecision, PdpError>> {
        None
    }
}

/// A fresh decision id for the embedded engines.
pub(crate) fn new_decision_id() -> String {
    ulid::Ulid::new().to_string()
}

/// The PDP part of validating a policy (`policy check`, and load): the
/// engine must build (Rego parses), and a rules query must give valid
/// sections, which then replace the file's.
pub fn check_policy(policy: &mut crate::policy::Policy, home: &std::path::Path) -> Result<(), String> {
    engine::build(policy)?;
    let name = policy.name.clone().unwrap_or_else(|| "sandbox".into());
    rules::apply(policy, &name, home)
}
