//! Stage heartbeats: one shared-memory slot per stage, `<data_dir>/run/<stage>.beat`, that the
//! stage stamps and the supervisor reads without a system call.
//!
//! A stamp is a promise: "this process (`pid`) will stamp again before `due`", on the system's
//! monotonic clock (`CLOCK_MONOTONIC`, the same for every process of the host and immune to
//! wall-clock steps). A stage stamps at the head of every step (due: now) and, while it waits,
//! every [`BEAT_INTERVAL`] (due: now + interval). A process whose promise is older than the
//! supervisor's `liveness_timeout` is hung, whatever it is stuck on: a deadlock, an await that
//! never completes, a blocked runtime thread, an endless loop. (A stopped process and a writer
//! that holds the queue's lock without committing are caught by their own checks as well.)
//!
//! The slot is 32 bytes at the start of a page-sized file: the stamping process's pid, the due
//! time in nanoseconds, and two counters of shed requests (the supervisor's, when the stage is
//! over its soft memory budget) and of the requests the stage has handled; each an aligned
//! atomic u64 in a shared mapping, so a stamp is one store and a read is one load: no torn
//! values, no syscalls. A slot left by an earlier process of the stage carries that process's
//! pid and is not taken for the new one's.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::topology::StageId;

/// How often a waiting stage renews its promise.
pub const BEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Size of a slot's file and mapping.
const SLOT_BYTES: usize = 4096;

fn slot_path(run_dir: &Path, stage: StageId) -> PathBuf {
    run_dir.join(format!("{}.beat", stage.as_str()))
}

/// Now on the system-wide monotonic clock.
pub fn monotonic_now() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// A mapped heartbeat slot.
#[derive(Debug)]
pub struct Heartbeat {
    map: NonNull<[AtomicU64; WORDS]>,
    /// The last due time written by this handle, to skip stores that would not change it much.
    last_due: AtomicU64,
}

/// Words of a slot: pid, due, shed requests, shed requests handled.
const WORDS: usize = 4;
const PID: usize = 0;
const DUE: usize = 1;
const SHED_REQUESTED: usize = 2;
const SHED_HANDLED: usize = 3;

// SAFETY: the mapping is only accessed through atomics, and it lives as long as the handle.
unsafe impl Send for Heartbeat {}
// SAFETY: as above; every access is an atomic load or store.
unsafe impl Sync for Heartbeat {}

impl Heartbeat {
    /// Opens (creating it when missing) the slot of `stage` under `run_dir` for stamping, and
    /// claims it for this process: the first stamp is due within `startup` (opening the queue
    /// and rebuilding the stage's index come before the first step).
    pub fn claim(run_dir: &Path, stage: StageId, startup: Duration) -> std::io::Result<Heartbeat> {
        let slot = Heartbeat::map(run_dir, stage, true)?;
        slot.words()[DUE].store(0, Ordering::Release);
        // Requests made to an earlier process do not apply to this one.
        let requested = slot.words()[SHED_REQUESTED].load(Ordering::Acquire);
        slot.words()[SHED_HANDLED].store(requested, Ordering::Release);
        slot.words()[PID].store(u64::from(std::process::id()), Ordering::Release);
        slot.beat_within(startup);
        Ok(slot)
    }

    /// Opens the slot of `stage` to read it (the supervisor); `None` while no stage created it.
    pub fn open(run_dir: &Path, stage: StageId) -> Option<Heartbeat> {
        Heartbeat::map(run_dir, stage, false).ok()
    }

    fn map(run_dir: &Path, stage: StageId, create: bool) -> std::io::Result<Heartbeat> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .mode(0o600)
            .open(slot_path(run_dir, stage))?;
        if file.metadata()?.len() < SLOT_BYTES as u64 {
            file.set_len(SLOT_BYTES as u64)?;
        }
        // SAFETY: a fresh shared mapping of a file at least SLOT_BYTES long; the kernel picks the
        // address. The mapping outlives the file handle, and is unmapped in Drop.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                SLOT_BYTES,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &file,
                0,
            )
        }?;
        let map =
            NonNull::new(ptr.cast::<[AtomicU64; WORDS]>()).ok_or_else(|| std::io::Error::other("null mapping"))?;
        Ok(Heartbeat { map, last_due: AtomicU64::new(0) })
    }

    fn words(&self) -> &[AtomicU64; WORDS] {
        // SAFETY: the mapping is page-aligned, SLOT_BYTES long and valid until Drop; AtomicU64
        // has the layout of u64, and all access to the words is atomic.
        unsafe { self.map.as_ref() }
    }

    /// Stamps: this process will stamp again within `within`.
    pub fn beat_within(&self, within: Duration) {
        let due = (monotonic_now() + within).as_nanos() as u64;
        // Back-to-back steps stamp often; a store that moves the promise by less than a
        // hundredth of the interval is skipped (the supervisor judges in seconds).
        let last = self.last_due.load(Ordering::Relaxed);
        if due < last || due - last >= (BEAT_INTERVAL / 100).as_nanos() as u64 {
            self.words()[DUE].store(due, Ordering::Release);
            self.last_due.store(due, Ordering::Relaxed);
        }
    }

    /// Stamps at the head of a step: the next stamp is due now.
    pub fn beat(&self) {
        self.beat_within(Duration::ZERO);
    }

    /// The pid that claimed the slot and its promise, on the monotonic clock.
    pub fn read(&self) -> (u32, Duration) {
        let pid = self.words()[PID].load(Ordering::Acquire) as u32;
        let due = self.words()[DUE].load(Ordering::Acquire);
        (pid, Duration::from_nanos(due))
    }

    /// How long ago `pid`'s promise fell due (zero while it holds); `None` when the slot is not
    /// `pid`'s (the process has not claimed it yet).
    pub fn overdue(&self, pid: u32) -> Option<Duration> {
        let (claimed_by, due) = self.read();
        (claimed_by == pid).then(|| monotonic_now().saturating_sub(due))
    }
}

impl Heartbeat {
    /// The supervisor asks the stage to shed memory.
    pub fn request_shed(&self) {
        self.words()[SHED_REQUESTED].fetch_add(1, Ordering::AcqRel);
    }

    /// Whether a shed request is waiting for the stage (one load).
    pub fn shed_requested(&self) -> bool {
        self.words()[SHED_REQUESTED].load(Ordering::Acquire) != self.words()[SHED_HANDLED].load(Ordering::Acquire)
    }

    /// The stage takes the waiting shed requests (true if there were any) and marks them handled.
    pub fn take_shed_request(&self) -> bool {
        let requested = self.words()[SHED_REQUESTED].load(Ordering::Acquire);
        self.words()[SHED_HANDLED].swap(requested, Ordering::AcqRel) != requested
    }

    /// Shed requests made and handled so far (the supervisor's view).
    pub fn shed_counts(&self) -> (u64, u64) {
        (self.words()[SHED_REQUESTED].load(Ordering::Acquire), self.words()[SHED_HANDLED].load(Ordering::Acquire))
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference to it outlives self.
        let _ = unsafe { rustix::mm::munmap(self.map.as_ptr().cast(), SLOT_BYTES) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_slot_is_read_by_another_handle_and_falls_due() {
        let dir = tempfile::tempdir().unwrap();
        let stamper = Heartbeat::claim(dir.path(), StageId::TailSample, Duration::from_secs(60)).unwrap();
        let reader = Heartbeat::open(dir.path(), StageId::TailSample).unwrap();
        let me = std::process::id();
        assert_eq!(reader.overdue(me), Some(Duration::ZERO));
        assert_eq!(reader.overdue(me + 1), None, "a slot is only its claimer's");
        stamper.beat();
        std::thread::sleep(Duration::from_millis(30));
        let overdue = reader.overdue(me).unwrap();
        assert!(overdue >= Duration::from_millis(30), "{overdue:?}");
        stamper.beat_within(Duration::from_secs(5));
        assert_eq!(reader.overdue(me), Some(Duration::ZERO));
        assert!(Heartbeat::open(dir.path(), StageId::Export).is_none());
    }

    #[test]
    fn shed_requests_reach_the_stage_once_and_not_a_later_process() {
        let dir = tempfile::tempdir().unwrap();
        let stage = Heartbeat::claim(dir.path(), StageId::Receive, Duration::from_secs(60)).unwrap();
        let supervisor = Heartbeat::open(dir.path(), StageId::Receive).unwrap();
        assert!(!stage.take_shed_request());
        supervisor.request_shed();
        supervisor.request_shed();
        assert!(stage.shed_requested());
        assert!(stage.take_shed_request());
        assert!(!stage.take_shed_request(), "one shed for the requests that were waiting");
        assert_eq!(supervisor.shed_counts(), (2, 2));
        supervisor.request_shed();
        drop(stage);
        let next = Heartbeat::claim(dir.path(), StageId::Receive, Duration::from_secs(60)).unwrap();
        assert!(!next.take_shed_request(), "a request to the previous process carried over");
    }
}
