//! When the host daemon may give the `ASKS` ring buffer back its misses:
//! only once every miss up to a position has its record in the audit log.
//!
//! The ask thread reads a miss (`CommitRing`, which leaves it in the ring),
//! answers it, and sends its record to the audit task with a token. The
//! audit task writes and flushes the record, then hands the token back
//! (`Acks::written`). Misses are answered out of order (a remote PDP is
//! asked concurrently), so the ring is committed up to the end of the
//! longest run of misses, from the oldest, whose records are all written.
//! A daemon killed before that leaves those misses in the ring: the next
//! one reads them again. Before an answer is applied (the verdict cached,
//! a held connect released or destroyed) its record is kept in the pinned
//! `ASK_APPLIED` map, so that the next daemon writes that record rather
//! than asking again about an attempt that is over; the entry goes once
//! the ring is committed past the miss.

use std::{collections::VecDeque, sync::Mutex};

use aya::maps::{HashMap, MapData};
use pep_common::ask::{AppliedAnswer, AppliedKey};

use crate::audit::ring::Committer;

/// A miss read and not yet given back.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    token: u64,
    /// Ring position after the miss.
    end: u64,
    key: AppliedKey,
    written: bool,
}

/// The misses read and not yet committed, oldest first.
#[derive(Debug, Default)]
struct Ledger {
    next_token: u64,
    outstanding: VecDeque<Outstanding>,
}

impl Ledger {
    fn read(&mut self, end: u64, key: AppliedKey) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        self.outstanding.push_back(Outstanding {
            token,
            end,
            key,
            written: false,
        });
        token
    }

    /// Marks `tokens` written; returns the position the ring may be
    /// committed to, if it moved, and the keys of the misses it passed.
    fn written(&mut self, tokens: &[u64]) -> (Option<u64>, Vec<AppliedKey>) {
        for t in tokens {
            // Tokens are handed out in order: find by position.
            let Some(front) = self.outstanding.front() else {
                break;
            };
            let Some(i) = t.checked_sub(front.token) else {
                continue;
            };
            if let Some(o) = self.outstanding.get_mut(i as usize) {
                debug_assert_eq!(o.token, *t);
                o.written = true;
            }
        }
        let mut to = None;
        let mut passed = Vec::new();
        while self.outstanding.front().is_some_and(|o| o.written) {
            let o = self.outstanding.pop_front().expect("front checked");
            to = Some(o.end);
            passed.push(o.key);
        }
        (to, passed)
    }
}

/// Shared by the ask thread (`read`) and the audit task (`written`).
pub struct Acks {
    ledger: Mutex<Ledger>,
    committer: Committer,
    applied: Mutex<HashMap<MapData, AppliedKey, AppliedAnswer>>,
}

impl Acks {
    pub fn new(committer: Committer, applied: HashMap<MapData, AppliedKey, AppliedAnswer>) -> Self {
        Self {
            ledger: Mutex::new(Ledger::default()),
            committer,
            applied: Mutex::new(applied),
        }
    }

    /// A miss was read; `end` is the ring position after it. Returns its
    /// token.
    pub fn read(&self, end: u64, key: AppliedKey) -> u64 {
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(end, key)
    }

    /// The records of `tokens` are in the log (flushed), or the misses
    /// have none to write: commits what it can, then forgets their
    /// applied answers. In that order: a daemon killed in between leaves
    /// entries nobody reads, which `expire` removes, never a miss read
    /// again without its answer.
    pub fn written(&self, tokens: &[u64]) {
        if tokens.is_empty() {
            return;
        }
        let (to, passed) = self
            .ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .written(tokens);
        if let Some(to) = to {
            self.committer.commit_to(to);
        }
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        for k in passed {
            let _ = applied.remove(&k);
        }
    }

    /// Keeps the record of an answer about to be applied.
    pub fn applied(&self, key: AppliedKey, answer: &AppliedAnswer) -> Result<(), aya::maps::MapError> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, answer, 0)
    }

    /// The kept record of an answer applied to this miss by an earlier
    /// daemon, if any.
    pub fn applied_answer(&self, key: &AppliedKey) -> Option<AppliedAnswer> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key, 0)
            .ok()
    }

    /// Removes kept answers of misses older than `before_ns` (boot clock):
    /// the ones a daemon killed between committing and removing left.
    pub fn expire(&self, before_ns: u64) -> usize {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        let old: Vec<AppliedKey> = applied
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.ts_boot_ns < before_ns)
            .collect();
        let n = old.len();
        for k in old {
            let _ = applied.remove(&k);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> AppliedKey {
        AppliedKey { ts_boot_ns: n, id: n }
    }

    #[test]
    fn the_ring_moves_only_past_misses_whose_records_are_all_written() {
        let mut l = Ledger::default();
        let t: Vec<u64> = (1..=4).map(|i| l.read(i * 100, key(i))).collect();
        // Answered out of order: the third and second first.
        assert_eq!(l.written(&[t[2]]), (None, vec![]), "the oldest is not written");
        assert_eq!(l.written(&[t[1]]), (None, vec![]));
        assert_eq!(l.written(&[t[0]]), (Some(300), vec![key(1), key(2), key(3)]));
        assert_eq!(l.written(&[]), (None, vec![]));
        // A token given back twice, or one already passed, changes nothing.
        assert_eq!(l.written(&[t[0], t[2]]), (None, vec![]));
        let t5 = l.read(500, key(5));
        assert_eq!(l.written(&[t5]), (None, vec![]), "the fourth still waits");
        assert_eq!(l.written(&[t[3]]), (Some(500), vec![key(4), key(5)]));
        assert!(l.outstanding.is_empty());
    }
}
