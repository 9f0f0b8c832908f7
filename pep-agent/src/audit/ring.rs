//! The kernel's `EVENTS` ring buffer, read so that the consumer position
//! moves only on `commit`: the host daemon commits once what it read is
//! written to the audit log, so a daemon killed with SIGKILL leaves every
//! event it had not written in the ring for the next daemon (which may
//! write the last batch a second time, never lose it).
//!
//! aya's `RingBuf` moves the position as each item is dropped, which is
//! right for `pep-agent run`, whose ring dies with it. This is the same
//! protocol (kernel/bpf/ringbuf.c): the consumer page mapped read-write at
//! offset 0, the producer page and the data pages (mapped twice in a row,
//! so a record never wraps) read-only after it; each record an 8-byte
//! header (length, with the busy and discard bits) and its data, padded to
//! 8 bytes.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd, BorrowedFd, RawFd},
    ptr::NonNull,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use aya::maps::MapData;

/// `BPF_RINGBUF_BUSY_BIT`: the producer has not submitted it yet.
const BUSY: u32 = 1 << 31;
/// `BPF_RINGBUF_DISCARD_BIT`: submitted as discarded; skip it.
const DISCARD: u32 = 1 << 30;
/// `BPF_RINGBUF_HDR_SZ`.
const HDR: u64 = 8;

/// One shared mapping of the ring buffer map.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize, prot: libc::c_int, offset: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks
        // the length, offset and protection against the ring buffer.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Self { ptr, len })
    }

    /// The u64 the kernel keeps at the start of a metadata page.
    fn pos(&self) -> &AtomicU64 {
        // SAFETY: the page is at least 8 bytes, page-aligned, and the kernel
        // only ever accesses this word atomically.
        unsafe { self.ptr.cast::<AtomicU64>().as_ref() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped, once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// SAFETY: the mapping is shared memory that the kernel synchronises through
// the atomics above; nothing in it is tied to a thread, and through `&self`
// it is only read.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

/// A reader of a `BPF_MAP_TYPE_RINGBUF` map that commits explicitly.
pub struct CommitRing {
    map: MapData,
    consumer: Arc<Mapping>,
    producer: Mapping,
    page: usize,
    mask: u64,
    /// How far reading has got; the kernel sees it at `commit`.
    read: u64,
}

impl CommitRing {
    /// Reads `map` from where the last commit left it.
    pub fn new(map: MapData) -> io::Result<Self> {
        let size = map.info().map_err(io::Error::other)?.max_entries() as usize;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::Error::other("page size"))?;
        if !size.is_power_of_two() || size < page {
            return Err(io::Error::other(format!("not a ring buffer size: {size}")));
        }
        let fd = map.fd().as_fd();
        let consumer = Arc::new(Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?);
        let producer = Mapping::new(fd, page + 2 * size, libc::PROT_READ, page)?;
        let read = consumer.pos().load(Ordering::Acquire);
        Ok(Self {
            map,
            consumer,
            producer,
            page,
            mask: size as u64 - 1,
            read,
        })
    }

    /// The next record's data, if one is submitted. It stays in the ring
    /// until `commit`.
    pub fn next_record(&mut self) -> Option<&[u8]> {
        loop {
            if self.read >= self.producer.pos().load(Ordering::Acquire) {
                return None;
            }
            let off = self.page + (self.read & self.mask) as usize;
            // SAFETY: `off` is inside the first copy of the data pages, and
            // a header is 8-byte aligned; the kernel writes it atomically.
            let header =
                unsafe { self.producer.ptr.add(off).cast::<AtomicU32>().as_ref() }.load(Ordering::Acquire);
            if header & BUSY != 0 {
                return None;
            }
            let len = u64::from(header & !(BUSY | DISCARD));
            self.read += (len + HDR).next_multiple_of(8);
            if header & DISCARD != 0 {
                continue;
            }
            let start = off + HDR as usize;
            let end = start + len as usize;
            if end > self.producer.len {
                // A length the kernel cannot have written: stop reading
                // rather than read outside the mapping.
                tracing::error!("ring buffer record of {len} bytes at {}: corrupt", self.read);
                return None;
            }
            // SAFETY: `start..end` lies inside the mapping (checked above;
            // the data pages are mapped twice in a row, so a record that
            // wraps is contiguous), and the producer no longer writes a
            // submitted record before the consumer position passes it.
            return Some(unsafe {
                std::slice::from_raw_parts(self.producer.ptr.add(start).as_ptr(), len as usize)
            });
        }
    }

    /// Where the producer stands: the end of everything submitted so far.
    pub fn produced(&self) -> u64 {
        self.producer.pos().load(Ordering::Acquire)
    }

    /// Whether the producer is ahead of the reading.
    pub fn has_unread(&self) -> bool {
        self.read < self.producer.pos().load(Ordering::Acquire)
    }

    /// Gives the kernel back the space of every record read so far.
    pub fn commit(&mut self) {
        self.consumer.pos().store(self.read, Ordering::Release);
    }

    /// Where reading has got: the end of the last record read, the
    /// position to commit once that record is dealt with.
    pub fn position(&self) -> u64 {
        self.read
    }

    /// A handle that commits on another thread than the reading one.
    pub fn committer(&self) -> Committer {
        Committer {
            consumer: self.consumer.clone(),
        }
    }
}

/// Commits a `CommitRing` from elsewhere (`CommitRing::committer`).
#[derive(Clone)]
pub struct Committer {
    consumer: Arc<Mapping>,
}

impl Committer {
    /// Gives the kernel back the space up to `position` (from
    /// `CommitRing::position`); never moves the position back.
    pub fn commit_to(&self, position: u64) {
        self.consumer.pos().fetch_max(position, Ordering::AcqRel);
    }
}

impl AsRawFd for CommitRing {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}
