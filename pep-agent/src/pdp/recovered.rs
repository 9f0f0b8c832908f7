//! Misses the ask task cannot ask about as usual:
//! - an orphan: a miss of a sandbox generation nobody serves (a reload or a
//!   removal retired it while its connect waited) is denied, with a record
//!   that says why (fail closed);
//! - a replay: a miss an earlier daemon answered and applied but was killed
//!   before writing its record (`pdp::acks`) is written from what that
//!   daemon kept in `ASK_APPLIED`, without asking again: a second answer
//!   could contradict what happened to the attempt. A held connect that
//!   still waits (killed before the answer was applied) gets that answer.

use std::{sync::Arc, time::Duration};

use pep_common::{
    ask::{ASK_HELD, AppliedAnswer},
    event::VERDICT_ALLOW,
};
use serde_json::{Value, json};

use super::{
    Pdp, PdpDecision, PdpError,
    apply::{Parts, Target, decision_of, release_or_destroy, send},
    miss::Miss,
    query::Query,
    task::{AskRecord, AskSettings, Shared, finish_orphan},
};
use crate::{audit::decode::Source, policy::OnUnavailable};

/// The PDP of a sandbox id nobody serves: unavailable, so `deny`.
struct Orphaned;

impl Pdp for Orphaned {
    fn engine(&self) -> &'static str {
        "none"
    }

    fn decide<'a>(&'a self, _input: &'a Value) -> super::DecideFuture<'a> {
        Box::pin(async { Err(orphaned()) })
    }

    fn decide_now(&self, _query: &Query) -> Option<Result<PdpDecision, PdpError>> {
        Some(Err(orphaned()))
    }
}

fn orphaned() -> PdpError {
    PdpError::Unavailable("no PDP serves this sandbox generation (it has been replaced or removed)".into())
}

/// Denies a miss of a sandbox id without settings (a held connect is
/// destroyed), with a record that says why.
pub(super) fn orphan(shared: &Shared, miss: Miss, token: Option<u64>) {
    let id = miss.sandbox_id();
    tracing::warn!("pdp: a miss of sandbox id {id}, which no PDP serves: denied");
    let settings = Arc::new(AskSettings {
        pdp: Arc::new(Orphaned),
        sandbox_id: id,
        sandbox_name: String::new(),
        policy_revision: String::new(),
        fingerprint: String::new(),
        revision: 0,
        cache_ttl_s: 0,
        on_unavailable: OnUnavailable::Deny,
        stale_window_s: 0,
        budget: Duration::ZERO,
        busy_poll: Duration::ZERO,
    });
    finish_orphan(shared, settings, miss, token, Err(orphaned()));
}

/// Writes the record an earlier daemon kept for `miss` (`answer`), marked
/// `pdp.recovered`, and asks nothing.
pub(super) fn replay(shared: &Shared, miss: Miss, answer: &AppliedAnswer, token: u64) {
    let text = &answer.pdp[..(answer.len as usize).min(answer.pdp.len())];
    let mut pdp: Value = serde_json::from_slice(text).unwrap_or_else(|e| {
        tracing::error!("an applied answer that does not parse ({e}): recorded without its details");
        json!({})
    });
    pdp["recovered"] = json!(true);
    let Some((parts, ..)) = Parts::of(miss) else {
        // Unreadable now as when it was asked about: no record either way.
        if let Some(a) = &shared.acks {
            a.written(&[token]);
        }
        return;
    };
    // Killed between keeping the answer and applying it: the connect
    // still waits. Apply it now, as recorded.
    if let Target::Net { ev, daddr } = &parts.target
        && parts.disposition == ASK_HELD
    {
        let mut maps = shared.maps.lock().unwrap_or_else(|e| e.into_inner());
        if maps.pending.get(&ev.cookie, 0).is_ok() {
            release_or_destroy(&mut maps, ev, answer.verdict == VERDICT_ALLOW, *daddr);
        }
    }
    let decision = decision_of(
        parts.header,
        Source::Pdp,
        answer.verdict == VERDICT_ALLOW,
        &parts.key,
        parts.target,
    );
    tracing::debug!("pdp: the record of an answer applied before a restart");
    send(
        shared,
        AskRecord {
            decision,
            pdp,
            token: Some(token),
        },
    );
}
