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
//! The slot is 48 bytes at the start of a page-sized file: the stamping process's pid, the due
//! time in nanoseconds, two counters of shed requests (the supervisor's, when the stage is
//! over its soft memory budget) and of the requests the stage has handled, receive's intake
//! pause, and whether the process is past its startup (its first stamp from its own work: the
//! supervisor's READY waits for every stage's); each an aligned
//! atomic u64 in a shared mapping, so a stamp is one store and a read is one load: no torn
//! values, no syscalls. A slot left by an earlier process of the stage carries that process's
//! pid and is not taken for the new one's.
//!
//! The rest of the page holds the stage's event counters (items received, sent, dropped by
//! reason, errors by kind), which the stage publishes a few times a second and the supervisor
//! exposes as self-metrics: a count of entries at byte 64, then entries of a 40-byte name and
//! an atomic u64 value from byte 128. Only the stage writes them (it appends a name, then
//! publishes the new count); the file outlives the process, so the supervisor reads a dead
//! process's final counts before it starts the next one, which resets them.

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

/// Opens the slot file of `stage` for reading and writing, creating it (owner-only) if asked.
fn open_slot_file(run_dir: &Path, stage: StageId, create: bool) -> std::io::Result<std::fs::File> {
    OpenOptions::new().read(true).write(true).create(create).truncate(false).mode(0o600).open(slot_path(run_dir, stage))
}

/// Makes a slot file SLOT_BYTES long with every block allocated. A length set with `set_len`
/// alone is a hole: the first store through the shared map then allocates the page, and on a full
/// filesystem that store is a SIGBUS. `fallocate` allocates up front (a full filesystem is an
/// ENOSPC error here, which the caller reports) and leaves existing contents as they are.
fn back_with_blocks(file: &std::fs::File) -> std::io::Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, SLOT_BYTES as u64) {
        Ok(()) => Ok(()),
        // Filesystems without fallocate: the length at least, as before.
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {
            if file.metadata()?.len() < SLOT_BYTES as u64 {
                file.set_len(SLOT_BYTES as u64)?;
            }
            Ok(())
        }
        Err(err) => Err(std::io::Error::from(err)),
    }
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
    /// Whether this handle has marked the slot started.
    started: std::sync::atomic::AtomicBool,
}

/// Where the counter table starts, its entry size and name size.
const COUNTERS_LEN_AT: usize = 64;
const COUNTERS_AT: usize = 128;
const COUNTER_BYTES: usize = 48;
const COUNTER_NAME_BYTES: usize = 40;
/// Counters a slot holds.
pub const MAX_COUNTERS: usize = (SLOT_BYTES - COUNTERS_AT) / COUNTER_BYTES;

/// Words of a slot: pid, due, shed requests, shed requests handled, intake paused (receive),
/// started (the process has stamped from its own loop, not only the startup promise), busy and
/// the wake-up epoch ([`crate::wake`]).
const WORDS: usize = 8;
const PID: usize = 0;
const DUE: usize = 1;
const SHED_REQUESTED: usize = 2;
const SHED_HANDLED: usize = 3;
const INTAKE_PAUSED: usize = 4;
const STARTED: usize = 5;
const BUSY: usize = 6;
const WAKE_EPOCH: usize = 7;

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
        slot.words()[STARTED].store(0, Ordering::Release);
        // Requests made to an earlier process do not apply to this one.
        let requested = slot.words()[SHED_REQUESTED].load(Ordering::Acquire);
        slot.words()[SHED_HANDLED].store(requested, Ordering::Release);
        slot.counters_len().store(0, Ordering::Release);
        // Until it says otherwise, the new process is sent every wake-up.
        slot.words()[BUSY].store(0, Ordering::SeqCst);
        slot.words()[PID].store(u64::from(std::process::id()), Ordering::Release);
        slot.promise(startup);
        Ok(slot)
    }

    /// Creates the slot file of `stage` with its disk blocks allocated, without claiming it:
    /// the supervisor does this for every stage at start, so a stage (re)started after the
    /// filesystem filled up finds its slot backed instead of faulting a hole (SIGBUS on tmpfs).
    pub fn reserve(run_dir: &Path, stage: StageId) -> std::io::Result<()> {
        back_with_blocks(&open_slot_file(run_dir, stage, true)?)
    }

    /// Opens the slot of `stage` to read it (the supervisor); `None` while no stage created it.
    pub fn open(run_dir: &Path, stage: StageId) -> Option<Heartbeat> {
        Heartbeat::map(run_dir, stage, false).ok()
    }

    fn map(run_dir: &Path, stage: StageId, create: bool) -> std::io::Result<Heartbeat> {
        let file = open_slot_file(run_dir, stage, create)?;
        if create {
            back_with_blocks(&file)?;
        } else if file.metadata()?.len() < SLOT_BYTES as u64 {
            // Not (yet) a whole slot: mapping past the end would fault on the first read.
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "heartbeat slot not created yet"));
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
        Ok(Heartbeat { map, last_due: AtomicU64::new(0), started: std::sync::atomic::AtomicBool::new(false) })
    }

    fn words(&self) -> &[AtomicU64; WORDS] {
        // SAFETY: the mapping is page-aligned, SLOT_BYTES long and valid until Drop; AtomicU64
        // has the layout of u64, and all access to the words is atomic.
        unsafe { self.map.as_ref() }
    }

    /// Stamps: this process will stamp again within `within`. The first stamp marks the slot
    /// started: the stage is past its startup and doing its work (receive: listening).
    pub fn beat_within(&self, within: Duration) {
        if !self.started.swap(true, Ordering::Relaxed) {
            self.words()[STARTED].store(1, Ordering::Release);
        }
        self.promise(within);
    }

    /// Promises the next stamp within `within` without marking the slot started.
    fn promise(&self, within: Duration) {
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

    /// Whether `pid` claimed the slot and has stamped from its work since (not only the startup
    /// promise of [`Heartbeat::claim`]).
    pub fn started_by(&self, pid: u32) -> bool {
        self.read().0 == pid && self.words()[STARTED].load(Ordering::Acquire) == 1
    }

    /// How long ago `pid`'s promise fell due (zero while it holds); `None` when the slot is not
    /// `pid`'s (the process has not claimed it yet).
    pub fn overdue(&self, pid: u32) -> Option<Duration> {
        let (claimed_by, due) = self.read();
        (claimed_by == pid).then(|| monotonic_now().saturating_sub(due))
    }
}

/// The wake-up words ([`crate::wake`]): a producer that committed to an edge counts the commit
/// in the consumer's epoch and sends a wake-up only when the consumer is not busy; a busy
/// consumer has promised to read the queue again before it sleeps, and checks the epoch before
/// it does. Sequentially consistent on both sides, so one of the two always sees the other.
impl Heartbeat {
    /// Producer: counts a commit the stage consumes; whether the stage needs a wake-up for it.
    pub fn commit_needs_wake(&self) -> bool {
        self.words()[WAKE_EPOCH].fetch_add(1, Ordering::SeqCst);
        self.words()[BUSY].load(Ordering::SeqCst) == 0
    }

    /// Consumer: marks the stage busy (it reads the queue before it waits again) or not.
    pub fn set_busy(&self, busy: bool) {
        self.words()[BUSY].store(u64::from(busy), Ordering::SeqCst);
    }

    /// Consumer: the commits counted so far.
    pub fn wake_epoch(&self) -> u64 {
        self.words()[WAKE_EPOCH].load(Ordering::SeqCst)
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

    /// Pauses or resumes intake (the supervisor, for a drain; read by receive). Kept across the
    /// stage's restarts: a drained pipeline stays drained until resumed.
    pub fn set_intake_paused(&self, paused: bool) {
        self.words()[INTAKE_PAUSED].store(u64::from(paused), Ordering::Release);
    }

    /// Whether intake is paused (one load).
    pub fn intake_paused(&self) -> bool {
        self.words()[INTAKE_PAUSED].load(Ordering::Acquire) != 0
    }

    /// Shed requests made and handled so far (the supervisor's view).
    pub fn shed_counts(&self) -> (u64, u64) {
        (self.words()[SHED_REQUESTED].load(Ordering::Acquire), self.words()[SHED_HANDLED].load(Ordering::Acquire))
    }
}

impl Heartbeat {
    fn base(&self) -> *mut u8 {
        self.map.as_ptr().cast::<u8>()
    }

    fn counters_len(&self) -> &AtomicU64 {
        // SAFETY: byte 64 of the page-aligned mapping is 8-aligned and inside it; only atomics
        // touch it.
        unsafe { &*self.base().add(COUNTERS_LEN_AT).cast::<AtomicU64>() }
    }

    fn counter_value(&self, index: usize) -> &AtomicU64 {
        // SAFETY: index < MAX_COUNTERS keeps the entry inside the page; the value word is
        // 8-aligned (entries are 48 bytes from byte 128, the value after a 40-byte name).
        unsafe { &*self.base().add(COUNTERS_AT + index * COUNTER_BYTES + COUNTER_NAME_BYTES).cast::<AtomicU64>() }
    }

    fn counter_name_is(&self, index: usize, name: &[u8]) -> bool {
        // SAFETY: inside the page (index < MAX_COUNTERS, i < 40); volatile as in counter_name.
        let byte =
            |i: usize| unsafe { std::ptr::read_volatile(self.base().add(COUNTERS_AT + index * COUNTER_BYTES + i)) };
        name.iter().enumerate().all(|(i, b)| byte(i) == *b)
            && (name.len() == COUNTER_NAME_BYTES || byte(name.len()) == 0)
    }

    fn counter_name(&self, index: usize) -> Vec<u8> {
        let mut name = vec![0u8; COUNTER_NAME_BYTES];
        for (i, byte) in name.iter_mut().enumerate() {
            // SAFETY: inside the page (index < MAX_COUNTERS); volatile because another process
            // writes these bytes (only before it publishes the entry through the count).
            *byte = unsafe { std::ptr::read_volatile(self.base().add(COUNTERS_AT + index * COUNTER_BYTES + i)) };
        }
        let end = name.iter().position(|b| *b == 0).unwrap_or(COUNTER_NAME_BYTES);
        name.truncate(end);
        name
    }

    /// Publishes counters (the stage): each `(name, value)` is written to its entry, appending
    /// names not seen yet; names longer than 40 bytes are cut, and counters beyond
    /// [`MAX_COUNTERS`] are not published. One process writes a slot, from one thread at a time.
    pub fn publish_counters<'a>(&self, counters: impl IntoIterator<Item = (&'a str, u64)>) {
        let mut len = self.counters_len().load(Ordering::Acquire) as usize;
        for (name, value) in counters {
            let name = &name.as_bytes()[..name.len().min(COUNTER_NAME_BYTES)];
            let found = (0..len).find(|i| self.counter_name_is(*i, name));
            let index = match found {
                Some(index) => index,
                None if len < MAX_COUNTERS => {
                    for (i, byte) in name.iter().chain(std::iter::repeat(&0u8)).take(COUNTER_NAME_BYTES).enumerate() {
                        // SAFETY: inside the page; the entry is not published yet (readers
                        // stop at the count).
                        unsafe {
                            std::ptr::write_volatile(self.base().add(COUNTERS_AT + len * COUNTER_BYTES + i), *byte)
                        };
                    }
                    self.counter_value(len).store(value, Ordering::Release);
                    len += 1;
                    self.counters_len().store(len as u64, Ordering::Release);
                    continue;
                }
                None => continue,
            };
            self.counter_value(index).store(value, Ordering::Release);
        }
    }

    /// The published counters (the supervisor's view).
    pub fn counters(&self) -> Vec<(String, u64)> {
        let len = (self.counters_len().load(Ordering::Acquire) as usize).min(MAX_COUNTERS);
        (0..len)
            .map(|i| {
                (
                    String::from_utf8_lossy(&self.counter_name(i)).into_owned(),
                    self.counter_value(i).load(Ordering::Acquire),
                )
            })
            .collect()
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

    /// A slot claimed for the first time on a full filesystem is an ENOSPC error, not a SIGBUS
    /// through the map; a slot reserved before the filesystem filled is claimed and stamped.
    /// Mounts a small tmpfs, so it runs as root (as CI does).
    #[test]
    fn on_a_full_filesystem_a_reserved_slot_works_and_an_unreserved_one_is_an_error() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let fs = dir.path().join("fs");
        std::fs::create_dir_all(&fs).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
            .arg(&fs)
            .status()
            .expect("mount(8) runs");
        assert!(mounted.success(), "mounting a tmpfs needs root (CI runs the tests as root)");
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(fs.clone());
        Heartbeat::reserve(&fs, StageId::Export).unwrap();
        let mut filler = std::fs::File::create(fs.join("filler")).unwrap();
        while filler.write_all(&[0u8; 4096]).is_ok() {}
        let refused = Heartbeat::claim(&fs, StageId::LogMirror, Duration::from_secs(60)).err();
        assert_eq!(
            refused.as_ref().and_then(std::io::Error::raw_os_error),
            Some(rustix::io::Errno::NOSPC.raw_os_error()),
            "{refused:?}"
        );
        assert!(Heartbeat::open(&fs, StageId::LogMirror).is_none(), "a slot that was never made is not read");
        let slot = Heartbeat::claim(&fs, StageId::Export, Duration::from_secs(60)).unwrap();
        slot.beat_within(Duration::from_secs(60));
        let reader = Heartbeat::open(&fs, StageId::Export).unwrap();
        assert!(reader.started_by(std::process::id()));
    }

    #[test]
    fn a_claimed_slot_is_read_by_another_handle_and_falls_due() {
        let dir = tempfile::tempdir().unwrap();
        let stamper = Heartbeat::claim(dir.path(), StageId::TailSample, Duration::from_secs(60)).unwrap();
        let reader = Heartbeat::open(dir.path(), StageId::TailSample).unwrap();
        let me = std::process::id();
        assert_eq!(reader.overdue(me), Some(Duration::ZERO));
        assert_eq!(reader.overdue(me + 1), None, "a slot is only its claimer's");
        // The startup promise is not a start: only a stamp from the stage's work is.
        assert!(!reader.started_by(me));
        stamper.beat();
        assert!(reader.started_by(me));
        assert!(!reader.started_by(me + 1));
        // A new claim (the next process of the stage) starts unstarted.
        let next = Heartbeat::claim(dir.path(), StageId::TailSample, Duration::from_secs(60)).unwrap();
        assert!(!reader.started_by(me));
        next.beat();
        assert!(reader.started_by(me));
        std::thread::sleep(Duration::from_millis(30));
        let overdue = reader.overdue(me).unwrap();
        assert!(overdue >= Duration::from_millis(30), "{overdue:?}");
        stamper.beat_within(Duration::from_secs(5));
        assert_eq!(reader.overdue(me), Some(Duration::ZERO));
        assert!(Heartbeat::open(dir.path(), StageId::Export).is_none());
    }

    #[test]
    fn counters_are_published_to_the_reader_and_reset_by_the_next_process() {
        let dir = tempfile::tempdir().unwrap();
        let stage = Heartbeat::claim(dir.path(), StageId::Export, Duration::from_secs(60)).unwrap();
        let supervisor = Heartbeat::open(dir.path(), StageId::Export).unwrap();
        assert!(supervisor.counters().is_empty());
        stage.publish_counters([("received", 5), ("dropped/sampled_out", 2)]);
        stage.publish_counters([("received", 9), ("error/a_kind_with_a_name_longer_than_forty_bytes_cut", 1)]);
        assert_eq!(
            supervisor.counters(),
            vec![
                ("received".to_string(), 9),
                ("dropped/sampled_out".to_string(), 2),
                ("error/a_kind_with_a_name_longer_than_for".to_string(), 1)
            ]
        );
        let many: Vec<String> = (0..2 * MAX_COUNTERS).map(|i| format!("c{i}")).collect();
        stage.publish_counters(many.iter().map(|name| (name.as_str(), 1)));
        assert_eq!(supervisor.counters().len(), MAX_COUNTERS);
        drop(stage);
        assert_eq!(supervisor.counters().len(), MAX_COUNTERS, "a dead process's counts stay readable");
        let _next = Heartbeat::claim(dir.path(), StageId::Export, Duration::from_secs(60)).unwrap();
        assert!(supervisor.counters().is_empty());
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
