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
