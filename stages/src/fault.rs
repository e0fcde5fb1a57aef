//! Test-only fault points. A stage process started with `TAILGATE_TEST_FAULT=<point>` in its
//! environment checks, at that point, whether the file `<data_dir>/run/fault-<point>` exists;
//! if so it removes the file (one shot) and performs the fault. Without the variable a point
//! costs one relaxed atomic load. Nothing in a deployment sets the variable.
//!
//! Points:
//! - `stop_in_write_txn`: tail_sample stops itself (SIGSTOP) while holding the queue's writer
//!   lock, as a frozen cgroup or a debugger would: every other writer waits behind it.
//! - `hang_in_write_txn`: tail_sample's thread blocks for ever while holding the writer lock (a
//!   deadlock or an I/O stall): the process keeps running, only it never commits.
//! - `hang_in_step`: tail_sample's loop awaits something that never completes, outside any
//!   transaction (a lost wake-up, an async deadlock): the runtime stays responsive, the stage
//!   does nothing.
//! - `bloat`: tail_sample allocates the MiB written in the trigger file (`"<MiB>"` or
//!   `"<MiB> pinned"`) and holds them. Unpinned ballast stands for caches and buffers: it is
//!   released when the stage sheds; pinned ballast stands for state it cannot give up.
//! - `bloat_at_start`: every tail_sample process holds the MiB written in the trigger file
//!   from its start (the file is not removed): a rebuilt state that alone exceeds the budget.
//! - `clock_step`: every stage process shifts its wall clock by the signed seconds written in
//!   the trigger file, re-read every 20 ms while it exists (the file is not removed): NTP
//!   stepping the clock of a box that booted without a real-time clock.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The environment variable that arms a fault point.
pub const FAULT_ENV: &str = "TAILGATE_TEST_FAULT";

static ARMED: OnceLock<Option<String>> = OnceLock::new();

fn armed() -> Option<&'static str> {
    ARMED.get_or_init(|| std::env::var(FAULT_ENV).ok()).as_deref()
}

fn trigger(run_dir: &Path, point: &str) -> PathBuf {
    run_dir.join(format!("fault-{point}"))
}

/// Inside a write transaction: the `stop_in_write_txn` and `hang_in_write_txn` points.
pub fn in_write_txn(run_dir: &Path) {
    let Some(point) = armed().filter(|p| *p == "stop_in_write_txn" || *p == "hang_in_write_txn") else {
        return;
    };
    if std::fs::remove_file(trigger(run_dir, point)).is_err() {
        return;
    }
    tracing::warn!(point, "test fault point hit");
    if point == "stop_in_write_txn" {
        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP);
    } else {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// At the head of a step, outside any transaction: the `hang_in_step` point.
pub async fn hang_in_step(run_dir: &Path) {
    let Some(point) = armed().filter(|p| *p == "hang_in_step") else { return };
    if std::fs::remove_file(trigger(run_dir, point)).is_err() {
        return;
    }
    tracing::warn!(point, "test fault point hit");
    std::future::pending::<()>().await;
}

static BALLAST: std::sync::Mutex<Vec<(Vec<u8>, bool)>> = std::sync::Mutex::new(Vec::new());

fn hold(mib: usize, pinned: bool) {
    // Written, so the pages are resident (a zeroed allocation would not be).
    let ballast = vec![0xa5u8; mib << 20];
    BALLAST.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((ballast, pinned));
}

fn parse_bloat(text: &str) -> Option<(usize, bool)> {
    let mut words = text.split_whitespace();
    let mib = words.next()?.parse().ok()?;
    Some((mib, words.next() == Some("pinned")))
}

/// At the head of a step: the `bloat` point.
pub fn bloat(run_dir: &Path) {
    if armed() != Some("bloat") {
        return;
    }
    let path = trigger(run_dir, "bloat");
    let Ok(text) = std::fs::read_to_string(&path) else { return };
    if std::fs::remove_file(&path).is_err() {
        return;
    }
    if let Some((mib, pinned)) = parse_bloat(&text) {
        tracing::warn!(point = "bloat", mib, pinned, "test fault point hit");
        hold(mib, pinned);
    }
}

/// At the start of the stage: the `bloat_at_start` point.
pub fn bloat_at_start(run_dir: &Path) {
    if armed() != Some("bloat_at_start") {
        return;
    }
    let Ok(text) = std::fs::read_to_string(trigger(run_dir, "bloat_at_start")) else { return };
    if let Some((mib, _)) = parse_bloat(&text) {
        tracing::warn!(point = "bloat_at_start", mib, "test fault point hit");
        hold(mib, true);
    }
}

/// Releases the unpinned ballast (a shed).
pub fn release_ballast() {
    if armed().is_none() {
        return;
    }
    BALLAST.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|(_, pinned)| *pinned);
}

/// At the start of a stage process: the `clock_step` point (a thread that applies the offset).
pub fn watch_clock_step(run_dir: &Path) {
    if armed() != Some("clock_step") {
        return;
    }
    let path = trigger(run_dir, "clock_step");
    std::thread::spawn(move || {
        let mut applied = 0i64;
        loop {
            let seconds: i64 = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
            if seconds != applied {
                tracing::warn!(point = "clock_step", seconds, "test fault point hit: wall clock stepped");
                tailgate_ipc::clock::set_test_wall_offset(seconds.saturating_mul(1_000_000_000));
                applied = seconds;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });
}
