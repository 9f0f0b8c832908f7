//! The misses the kernel sends on the `ASKS` ring buffer, decoded: a
//! network miss (`AskEvent`) or an exec miss (`ExecAskEvent`, which carries
//! the exec record the kernel would have written).

use pep_common::{
    ask::{AppliedKey, AskEvent, ExecAskEvent, KIND_ASK, KIND_ASK_EXEC},
    event::{EventHeader, ExecEvent, KIND_EXEC},
};

use crate::audit::decode::{Decision, Header};

/// A miss as read from the ring buffer.
pub enum Miss {
    Net(Box<AskEvent>),
    Exec(Box<ExecAskEvent>),
}

impl Miss {
    /// The sandbox (generation) id whose miss this is.
    pub fn sandbox_id(&self) -> u32 {
        match self {
            Miss::Net(e) => e.key.sandbox_id,
            Miss::Exec(e) => e.key.sandbox_id,
        }
    }

    /// What the host daemon keeps this miss's applied answer under
    /// (`pdp::acks`): its kernel timestamp, and its socket cookie (a held
    /// connect) or its pid and tid.
    pub fn applied_key(&self) -> AppliedKey {
        let (h, cookie) = match self {
            Miss::Net(e) => (&e.header, e.cookie),
            Miss::Exec(e) => (&e.exec.header, 0),
        };
        AppliedKey {
            ts_boot_ns: h.ts_boot_ns,
            id: if cookie != 0 {
                cookie
            } else {
                (u64::from(h.pid) << 32) | u64::from(h.tid)
            },
        }
    }

    /// Decodes one ring-buffer item (`None`, logged, if malformed).
    pub fn read(item: &[u8]) -> Option<Self> {
        fn read_as<T: Copy>(item: &[u8]) -> Option<T> {
            if item.len() < size_of::<T>() {
                tracing::error!("short ask event: {} bytes", item.len());
                return None;
            }
            // SAFETY: length checked; T is plain old data.
            Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<T>()) })
        }
        let header: EventHeader = read_as(item)?;
        match header.kind {
            KIND_ASK => read_as(item).map(|e| Miss::Net(Box::new(e))),
            KIND_ASK_EXEC => read_as(item).map(|e| Miss::Exec(Box::new(e))),
            k => {
                tracing::error!("unexpected event kind {k} on the ask ring");
                None
            }
        }
    }
}

/// The exec record inside an exec miss, decoded as the audit stream's:
/// (header, path, argv). The kernel asks only about resolved paths.
pub fn decode_exec(ev: &ExecEvent) -> Option<(Header, String, Vec<String>)> {
    let mut ev = *ev;
    ev.header.kind = KIND_EXEC;
    // SAFETY: plain old data viewed as its bytes.
    let bytes =
        unsafe { std::slice::from_raw_parts((&ev as *const ExecEvent).cast::<u8>(), size_of::<ExecEvent>()) };
    match Decision::try_from(bytes) {
        Ok(Decision::Exec {
            header,
            path: Some(path),
            argv,
            ..
        }) => Some((header, path, argv)),
        Ok(_) => {
            tracing::error!("exec ask event without a path");
            None
        }
        Err(e) => {
            tracing::error!("bad exec ask event: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use pep_common::{
        ask::{ACTION_EXEC, ASK_DENIED_NOW},
        event::{EXEC_OP_EXEC, SOURCE_PDP, VERDICT_DENY},
        sandbox::MODE_ENFORCE,
    };

    use super::*;
    use crate::audit::decode::Source;

    #[test]
    fn exec_miss_decodes_as_its_exec_record() {
        // SAFETY: plain data.
        let mut ev: ExecAskEvent = unsafe { std::mem::zeroed() };
        ev.exec.header.kind = KIND_ASK_EXEC;
        ev.exec.header.verdict = VERDICT_DENY;
        ev.exec.header.mode = MODE_ENFORCE;
        ev.exec.header.source = SOURCE_PDP;
        ev.exec.op = EXEC_OP_EXEC;
        ev.exec.path[..9].copy_from_slice(b"/bin/tool");
        ev.exec.path_len = 9;
        ev.exec.argv[..7].copy_from_slice(b"tool\0-x");
        ev.exec.argc = 2;
        ev.exec.argv_len = 7;
        ev.key.action = ACTION_EXEC;
        ev.disposition = ASK_DENIED_NOW;
        // SAFETY: plain data viewed as its bytes.
        let raw = unsafe {
            std::slice::from_raw_parts(
                (&ev as *const ExecAskEvent).cast::<u8>(),
                size_of::<ExecAskEvent>(),
            )
        };
        let Some(Miss::Exec(got)) = Miss::read(raw) else {
            panic!("not an exec miss")
        };
        assert_eq!((got.key, got.disposition), (ev.key, ASK_DENIED_NOW));
        let (header, path, argv) = decode_exec(&got.exec).expect("decodes");
        assert_eq!((header.source, path.as_str()), (Source::Pdp, "/bin/tool"));
        assert_eq!(argv, ["tool", "-x"]);
        assert!(
            Miss::read(&raw[..size_of::<ExecAskEvent>() - 1]).is_none(),
            "short"
        );
        // An unresolved path is never asked about: refused, not guessed.
        let mut bad = got.exec;
        bad.path_len = u32::MAX;
        assert!(decode_exec(&bad).is_none());
    }
}
