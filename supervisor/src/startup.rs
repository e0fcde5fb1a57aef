//! Start-up of the queue, before any stage runs: stage processes an earlier run left behind are
//! ended; the queue is opened and, after an unclean end (the durable `RUNNING` marker is still
//! there), every table is checked and repaired; the budget is reserved on disk. The marker is
//! removed again only by a clean shutdown.

use std::path::Path;
use std::time::{Duration, Instant};

use tailgate_config::Config;
use tailgate_ipc::{Queue, StageId};

use crate::proc;

const RUNNING_MARKER: &str = "RUNNING";

/// Opens the queue, verifying it first if the last run did not end cleanly.
pub(crate) fn open_queue(config: &Config) -> anyhow::Result<Queue> {
    let options = crate::stage_process::queue_options(config);
    let marker = config.data_dir.join(RUNNING_MARKER);
    let unclean = marker.exists();
    std::fs::create_dir_all(&config.data_dir)?;
    let queue_dir = config.queue_dir();
    let queue = match Queue::open(&queue_dir, &options) {
        Ok(queue) if !unclean => queue,
        Ok(queue) => {
            tracing::warn!("previous run did not shut down cleanly; checking every table of the queue");
            let report = queue.repair()?;
            for record in &report.records {
                tracing::error!(repair = %record, "queue damage repaired");
            }
            if !report.depth_corrected.is_empty() {
                let edges: Vec<&str> = report.depth_corrected.iter().map(|edge| edge.as_str()).collect();
                tracing::warn!(edges = ?edges, "queue depth recomputed from the stored batches");
            }
            tracing::info!(values = report.checked, repairs = report.records.len(), "queue checked");
            queue
        }
        // Only an environment LMDB cannot open at all is moved aside whole.
        Err(err) => {
            tracing::error!(error = %err, "queue cannot be opened");
            quarantine_and_reopen(&queue_dir, &options)?
        }
    };
    reserve_disk(&queue_dir, queue.capacity_bytes())?;
    reserve_lock_file(&queue_dir)?;
    reserve_heartbeat_slots(&config.data_dir)?;
    let anchor = tailgate_ipc::clock::establish(&queue)?;
    tracing::debug!(anchor_unix_nano = anchor.wall, "pipeline clock anchored");
    write_durably(&marker, std::process::id().to_string().as_bytes())?;
    Ok(queue)
}

/// Backs every page of LMDB's lock file (its reader table, shared by every process through a
/// memory map) with disk blocks. LMDB sizes the file for `max_readers` slots but writes only the
/// pages it uses: a process taking a slot on a page never written before would fault a hole,
/// which on a full filesystem (tmpfs) is a SIGBUS. A few KiB, allocated once.
fn reserve_lock_file(queue_dir: &Path) -> anyhow::Result<()> {
    let path = queue_dir.join("lock.mdb");
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
    let length = file.metadata()?.len();
    match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::KEEP_SIZE, 0, length) {
        Ok(()) | Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => Ok(()),
        Err(err) => Err(anyhow::anyhow!("cannot reserve the disk space of {}: {err}", path.display())),
    }
}

/// Creates every stage's heartbeat slot with its blocks allocated, before any stage starts: a
/// stage claiming its slot for the first time after the filesystem filled up would otherwise
/// fault a hole through the slot's map (SIGBUS, again at every restart).
fn reserve_heartbeat_slots(data_dir: &Path) -> anyhow::Result<()> {
    let run_dir = tailgate_ipc::wake::socket_dir(data_dir);
    std::fs::create_dir_all(&run_dir)?;
    for stage in tailgate_ipc::topology::StageId::ALL {
        tailgate_ipc::heartbeat::Heartbeat::reserve(&run_dir, stage).map_err(|err| {
            anyhow::anyhow!("cannot reserve the heartbeat slot of {stage} in {}: {err}", run_dir.display())
        })?;
    }
    Ok(())
}

/// Backs the whole map with disk blocks before any stage writes. The map's file is sparse: a
/// page the filesystem cannot back would fail a commit in whichever stage wrote it (and a
/// reader faulting a hole past the end of a shrunk filesystem gets SIGBUS). Allocated up front,
/// the budget is the only limit the queue can hit, and that one is a clean `Full` with pushback.
fn reserve_disk(queue_dir: &Path, capacity: u64) -> anyhow::Result<()> {
    let path = queue_dir.join("data.mdb");
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
    match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, capacity) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOSPC) => {
            let free = rustix::fs::fstatvfs(&file).map(|st| st.f_bavail * st.f_frsize).unwrap_or(0);
            let allocated = file.metadata().map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0);
            anyhow::bail!(
                "the filesystem of {} cannot hold the queue's disk budget: queue.max_size_mib needs {} MiB, \
                 {} MiB are allocated and {} MiB free; free space or lower queue.max_size_mib",
                queue_dir.display(),
                capacity >> 20,
                allocated >> 20,
                free >> 20
            )
        }
        // Filesystems without fallocate (some network filesystems): run, but say what is at risk.
        Err(err @ (rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS)) => {
            tracing::warn!(error = %err, "cannot reserve the queue's disk space; a full filesystem will stop stages");
            Ok(())
        }
        Err(err) => Err(anyhow::anyhow!("cannot reserve the queue's disk space in {}: {err}", path.display())),
    }
}

/// Ends stage processes a dead predecessor left running on this data directory (they hold their
/// stage locks, so new stages would fail to start and count as crashes): SIGTERM, then SIGKILL
/// after `grace`. Found by their command line (`tailgate stage <name> --data-dir <dir>`).
pub(crate) fn end_orphaned_stages(data_dir: &Path, grace: Duration) {
    let me = std::process::id();
    let dir = data_dir.as_os_str().as_encoded_bytes().to_vec();
    let orphans: Vec<(i32, String)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid as u32 != me)
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let at = args.iter().position(|arg| *arg == b"stage")?;
            let name = std::str::from_utf8(args.get(at + 1)?).ok()?;
            StageId::parse(name)?;
            let dir_at = args.iter().position(|arg| *arg == b"--data-dir")?;
            (args.get(dir_at + 1)? == &dir.as_slice()).then(|| (pid, name.to_string()))
        })
        .collect();
    if orphans.is_empty() {
        return;
    }
    for (pid, stage) in &orphans {
        tracing::warn!(pid, stage, "a stage process of an earlier run still uses this data dir; stopping it");
        if let Some(pid) = rustix::process::Pid::from_raw(*pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && orphans.iter().any(|(pid, _)| proc::alive(*pid)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for (pid, stage) in orphans.iter().filter(|(pid, _)| proc::alive(*pid)) {
        tracing::warn!(pid, stage, "orphaned stage did not stop in time; killing it");
        if let Some(pid) = rustix::process::Pid::from_raw(*pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// Writes a file and makes it and its directory entry durable: the unclean-shutdown marker must
/// survive the power loss it is there to detect.
fn write_durably(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(contents)?;
    file.sync_all()?;
    sync_parent(path)
}

/// fsyncs the directory holding `path` (makes a create, rename or unlink in it durable).
fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Moves a damaged queue aside (kept for inspection) and starts an empty one. Refuses while a
/// stage process of an earlier run still holds its lock (it could still be writing).
fn quarantine_and_reopen(queue_dir: &Path, options: &tailgate_ipc::QueueOptions) -> anyhow::Result<Queue> {
    let run_dir = tailgate_ipc::wake::socket_dir(queue_dir.parent().unwrap_or(queue_dir));
    let mut held = Vec::new();
    for stage in StageId::ALL {
        let path = run_dir.join(format!("{}.lock", stage.as_str()));
        if let Ok(file) = std::fs::File::options().read(true).write(true).open(&path) {
            match file.try_lock() {
                Ok(()) => held.push(file),
                Err(_) => {
                    anyhow::bail!("a {stage} process of an earlier run still uses the queue; not moving it aside")
                }
            }
        }
    }
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let aside = queue_dir.with_file_name(format!("queue.corrupt-{stamp}"));
    std::fs::rename(queue_dir, &aside)?;
    tracing::error!(moved_to = %aside.display(), "damaged queue moved aside; starting with an empty queue");
    let queue = Queue::open(queue_dir, options)?;
    drop(held);
    Ok(queue)
}

/// Removes the `RUNNING` marker durably (a clean shutdown).
pub(crate) fn clear_running_marker(data_dir: &Path) {
    let marker = data_dir.join(RUNNING_MARKER);
    if std::fs::remove_file(&marker).is_ok()
        && let Err(err) = sync_parent(&marker)
    {
        tracing::warn!(error = %err, "cannot make the removal of the RUNNING marker durable");
    }
}
