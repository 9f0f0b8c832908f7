//! Pins left by another build of pep-agent (an upgrade, a downgrade, or a
//! build from before stamps): the daemon must not adopt them. Its programs
//! would decode another layout's events, and it would write its own layout
//! into maps the old programs read.
//!
//! Enforcement must not stop either. So the switch-over runs in three steps,
//! with the old build enforcing at least until the new one does:
//! 1. `retire_foreign`, before loading: the old `maps/`, `progs/` and
//!    `links/` move aside into `retired-<n>/`. A rename leaves every program
//!    attached and every LSM link in force.
//! 2. The new build loads fresh into the usual places, and the daemon
//!    installs every sandbox again and attaches the new programs next to the
//!    old ones. For that while both enforce, and an action goes through only
//!    if both allow it.
//! 3. `detach_and_count`: the connects the old build holds for its PDP
//!    task are taken over by this build's `PENDING` (`held`), so that no
//!    held SYN leaves once the old egress program is gone. Then the old
//!    programs are detached from the sandboxes' cgroups. The records still
//!    in the old ring buffers (the audit ring, and the asks no old daemon
//!    answered) are counted, since this build cannot decode them, and so
//!    are the drops the old kernel side counted that no daemon reported;
//!    both become `audit.lost` records. Once those are written, `remove`
//!    drops the retired pins, which ends the old LSM links.
//!
//! The build's identity is the name of an empty directory `build-<stamp>`
//! in the pin directory, because bpffs holds no regular files (and no dot
//! in a name). The stamp is `sha256:` and the hash of the embedded
//! eBPF object. It is written only once the load has succeeded, so a load
//! cut short is foreign to the next start and is replaced, never
//! half-adopted; so is a directory with two stamps.

use std::{
    fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use aya::maps::{Map, MapData, RingBuf};
use sha2::{Digest as _, Sha256};

use super::pinned::{attached_ids, obj_get, prog_id, remove_pins};
use crate::audit::pipeline::{KernelCounters, Losses};

/// The prefix of the directory that names the build of what is pinned.
const STAMP: &str = "build-";
/// Where a foreign build's pins wait until the new build enforces.
const RETIRED: &str = "retired-";
/// The subdirectories that hold pinned objects.
const PINNED: [&str; 3] = ["maps", "progs", "links"];

/// This build's identity: `sha256:` and the hash of its eBPF object.
pub fn build_stamp() -> &'static str {
    static STAMP: OnceLock<String> = OnceLock::new();
    STAMP.get_or_init(|| format!("sha256:{:x}", Sha256::digest(crate::ebpf::OBJECT)))
}

/// The names of the stamp directories in `dir`.
fn stamps(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix(STAMP).map(str::to_owned))
        .collect()
}

/// The build that pinned what is in `dir`, if it said (once).
pub fn pinned_stamp(dir: &Path) -> Option<String> {
    match stamps(dir).as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// Records that `dir` holds this build's pins: this build's stamp first,
/// then no other.
pub fn write_stamp(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir.join(format!("{STAMP}{}", build_stamp()))) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    remove_stamps(dir, Some(build_stamp()))
}

/// Removes the stamps in `dir` but `keep`.
pub(crate) fn remove_stamps(dir: &Path, keep: Option<&str>) -> io::Result<()> {
    for s in stamps(dir) {
        if Some(s.as_str()) != keep {
            fs::remove_dir(dir.join(format!("{STAMP}{s}")))?;
        }
    }
    Ok(())
}

fn holds_pins(dir: &Path) -> bool {
    PINNED
        .iter()
        .any(|sub| fs::read_dir(dir.join(sub)).is_ok_and(|mut rd| rd.next().is_some()))
}

/// Step 1. When `dir` holds pins of another build, moves them into a new
/// `retired-<n>/`. Returns every retired directory there is, including
/// those of a switch-over that was cut short, for `detach_and_count`.
pub fn retire_foreign(dir: &Path) -> io::Result<Vec<PathBuf>> {
    if holds_pins(dir) && pinned_stamp(dir).as_deref() != Some(build_stamp()) {
        let n = (0..)
            .find(|n| !dir.join(format!("{RETIRED}{n}")).exists())
            .unwrap_or_default();
        let to = dir.join(format!("{RETIRED}{n}"));
        fs::create_dir(&to)?;
        for sub in PINNED {
            match fs::rename(dir.join(sub), to.join(sub)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        // The stamps go with them (none, for a build from before stamps).
        for s in stamps(dir) {
            let name = format!("{STAMP}{s}");
            fs::rename(dir.join(&name), to.join(&name))?;
        }
        tracing::warn!(
            "{} holds pins of another build ({}); this build ({}) takes over from them",
            dir.display(),
            pinned_stamp(&to).unwrap_or_else(|| "unstamped".into()),
            build_stamp()
        );
    }
    retired(dir)
}

/// The retired directories under `dir`, oldest first.
pub fn retired(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found: Vec<(u32, PathBuf)> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_str()?.strip_prefix(RETIRED)?.parse().ok()?;
                Some((n, e.path()))
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// What the retired builds left unreported.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Leftovers {
    /// Records in their ring buffers, in a layout this build cannot decode.
    pub undecoded: u64,
    /// Drops their kernel side counted beyond `kernel_lost_reported`.
    pub kernel_lost: Losses,
    /// Connects they held for their PDP task, now held by this build until
    /// their SYN retries run out.
    pub held: u64,
}

/// Step 3, once this build enforces every sandbox: detaches the retired
/// programs from `cgroups` and counts what they left. The caller writes
/// that into the audit log before `remove` drops the pins, so a daemon
/// killed in between counts it again rather than never.
/// `kernel_lost_reported`: the kernel drops the last daemon reported.
pub fn detach_and_count(
    retired: &[PathBuf],
    cgroups: &[PathBuf],
    kernel_lost_reported: Losses,
) -> io::Result<Leftovers> {
    let mut left = Leftovers::default();
    for dir in retired {
        // Before the old egress program goes: it is what holds their SYNs.
        if let Some(pin_dir) = dir.parent() {
            left.held += super::held::take_over(&dir.join("maps/PENDING"), &pin_dir.join("maps/PENDING"))?;
        }
        for cg in cgroups.iter().filter(|c| c.exists()) {
            detach_all(dir, cg)?;
        }
        // Nothing produces into them any more: what is there is all there
        // is. An ask is the record of its decision.
        for ring in ["EVENTS", "ASKS"] {
            if let Some(n) = count_ring(&dir.join("maps").join(ring)) {
                left.undecoded += n;
            }
        }
        if let Some(n) = kernel_lost(&dir.join("maps/COUNTERS")) {
            left.kernel_lost.ring += n.ring.saturating_sub(kernel_lost_reported.ring);
            left.kernel_lost.ask += n.ask.saturating_sub(kernel_lost_reported.ask);
        }
    }
    Ok(left)
}

/// Removes the retired pins, which ends the old LSM links.
pub fn remove(retired: &[PathBuf]) -> io::Result<()> {
    for dir in retired {
        remove_pins(dir)?;
        tracing::info!("{}: the retired build's pins are removed", dir.display());
    }
    Ok(())
}

/// The cgroup hooks a build of pep-agent may have attached to: every
/// `enum bpf_attach_type` value of a cgroup hook up to sock_release.
const CGROUP_ATTACH_TYPES: std::ops::RangeInclusive<u32> = 0..=43;

/// Detaches each program pinned in `dir/progs` from whichever of
/// `cgroup`'s hooks it is attached to. An older build may have had other
/// programs, so the pins, not this build's list, say which.
pub fn detach_all(dir: &Path, cgroup: &Path) -> io::Result<()> {
    let cg = fs::File::open(cgroup)?;
    let Ok(rd) = fs::read_dir(dir.join("progs")) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let prog = obj_get(&e.path())?;
        let id = prog_id(prog.as_fd())?;
        for t in CGROUP_ATTACH_TYPES {
            // Not a cgroup hook, or nothing there: EINVAL and the like.
            let Ok(ids) = attached_ids(cg.as_fd(), t) else {
                continue;
            };
            if ids.contains(&id) {
                super::attach::cgroup(super::attach::Op::Detach, cg.as_fd(), prog.as_fd(), t)?;
            }
        }
    }
    Ok(())
}

/// How many records wait in the ring buffer pinned at `path` (read and
/// dropped: the pins go next).
fn count_ring(path: &Path) -> Option<u64> {
    let data = MapData::from_pin(path).ok()?;
    let mut rb = RingBuf::try_from(Map::RingBuf(data)).ok()?;
    let mut n = 0;
    while rb.next().is_some() {
        n += 1;
    }
    Some(n)
}

/// The drops counted in the per-CPU counters pinned at `path`, if they have
/// this build's shape.
fn kernel_lost(path: &Path) -> Option<Losses> {
    let data = MapData::from_pin(path).ok()?;
    Some(KernelCounters::from_map(&data).ok()?.losses())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_names_this_object() {
        let s = build_stamp();
        assert!(s.starts_with("sha256:") && s.len() == 7 + 64, "{s}");
        assert_eq!(s, build_stamp(), "computed once, the same");
    }

    #[test]
    fn only_numbered_retired_directories_count_in_order() {
        let d = tempfile::tempdir().expect("tempdir");
        for n in ["retired-10", "retired-2", "retired-x", "maps"] {
            fs::create_dir(d.path().join(n)).expect("mkdir");
        }
        let names: Vec<String> = retired(d.path())
            .expect("retired")
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["retired-2", "retired-10"]);
    }

    #[test]
    fn pins_of_another_build_or_none_are_retired_and_ours_stay() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path();
        // An empty directory: nothing to retire.
        assert!(retire_foreign(dir).expect("retire").is_empty());
        // Pins without a stamp (a build from before stamps): foreign.
        fs::create_dir_all(dir.join("progs")).expect("mkdir");
        fs::write(dir.join("progs/connect4"), "").expect("write");
        let r = retire_foreign(dir).expect("retire");
        assert_eq!(r, [dir.join("retired-0")]);
        assert!(dir.join("retired-0/progs/connect4").exists());
        assert!(!dir.join("progs").exists());
        // Pins stamped by this build stay; the earlier retired one is still
        // reported until `remove` drops it.
        fs::create_dir_all(dir.join("maps")).expect("mkdir");
        fs::write(dir.join("maps/EVENTS"), "").expect("write");
        write_stamp(dir).expect("stamp");
        assert_eq!(pinned_stamp(dir).as_deref(), Some(build_stamp()));
        let r = retire_foreign(dir).expect("retire");
        assert_eq!(r, [dir.join("retired-0")]);
        assert!(dir.join("maps/EVENTS").exists());
        // Another build's stamp: retired, stamp and all.
        remove_stamps(dir, None).expect("unstamp");
        fs::create_dir(dir.join("build-sha256:other")).expect("mkdir");
        let r = retire_foreign(dir).expect("retire");
        assert_eq!(r, [dir.join("retired-0"), dir.join("retired-1")]);
        assert_eq!(
            pinned_stamp(&dir.join("retired-1")).as_deref(),
            Some("sha256:other")
        );
        assert!(dir.join("retired-1/maps/EVENTS").exists());
        // Two stamps say nothing: foreign.
        fs::create_dir_all(dir.join("maps")).expect("mkdir");
        fs::write(dir.join("maps/EVENTS"), "").expect("write");
        write_stamp(dir).expect("stamp");
        fs::create_dir(dir.join("build-sha256:other")).expect("mkdir");
        assert_eq!(retire_foreign(dir).expect("retire").len(), 3);
        assert!(pinned_stamp(dir).is_none());
    }
}
