//! Test-only fault points. A stage process started with `TAILGATE_TEST_FAULT=<point>` in its
//! environment checks, at that point, whether the file `<data_dir>/run/fault-<point>` exists;
//! if so it removes the file (one shot) and performs the fault. Without the variable a point
//! costs one relaxed atomic load. Nothing in a deployment sets the variable.
//!
//! Points:
//! - `stop_in_write_txn`: tail_sample stops itself (SIGSTOP) while holding the queue's writer
//!   lock, as a frozen cgroup or a debugger would: every other writer waits behind it.

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

/// At `point`: if armed and triggered, consume the trigger and stop this process.
pub fn stop_here(run_dir: &Path, point: &str) {
    if armed() != Some(point) {
        return;
    }
    if std::fs::remove_file(trigger(run_dir, point)).is_ok() {
        tracing::warn!(point, "test fault point hit: stopping this process");
        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP);
    }
}
