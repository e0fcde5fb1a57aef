//! Stages never outlive their supervisor, and a signal to the whole process group (Ctrl-C in a
//! terminal, `timeout`, `kill -- -PGID`) reaches the supervisor alone, which stops the stages in
//! order instead of watching them all die at once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Backend, Tailgate, Timing, signal, stage_pids, wait_until};

fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().next() != Some("Z")))
        .unwrap_or(false)
}

#[test]
fn a_signal_to_the_process_group_stops_the_stages_in_order() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    // Only for its config file: the process under test is started below in a group of its own.
    let mut template = Tailgate::start(backend_addr, &Timing::default());
    template.stop();
    let log_path = template.dir.path().join("group.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .arg("run")
        .arg("--config")
        .arg(&template.config_path)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let supervisor = child.id();
    // Not the harness's `Tailgate`: stop this one too should an assertion fail.
    struct StopOnDrop(u32);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            signal(self.0, "TERM");
        }
    }
    let _guard = StopOnDrop(supervisor);
    assert!(wait_until(Duration::from_secs(20), || stage_pids(supervisor).len() == 5), "stages did not start");
    let stages: Vec<u32> = stage_pids(supervisor).values().copied().collect();
    // Ctrl-C in a terminal: SIGINT to every process of the foreground group.
    let _ = Command::new("kill").args(["-INT", "--"]).arg(format!("-{supervisor}")).status();
    let mut status = None;
    assert!(wait_until(Duration::from_secs(40), || {
        status = child.try_wait().unwrap();
        status.is_some()
    }));
    assert!(status.unwrap().success(), "supervisor did not stop cleanly");
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(!text.contains("restarting"), "stages died on their own during the shutdown:\n{text}");
    assert!(text.contains("tailgate stopped cleanly"), "{text}");
    assert!(stages.iter().all(|pid| !process_alive(*pid)));
}

#[test]
fn stages_end_when_the_supervisor_is_killed() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    assert!(wait_until(Duration::from_secs(20), || stage_pids(tailgate.pid()).len() == 5));
    let stages: Vec<u32> = stage_pids(tailgate.pid()).values().copied().collect();
    signal(tailgate.pid(), "KILL");
    assert!(
        wait_until(Duration::from_secs(30), || stages.iter().all(|pid| !process_alive(*pid))),
        "stages outlived their supervisor"
    );
}

/// A stage process left on the data dir by an earlier run (here: one started by hand, the way a
/// stage outlives a supervisor that was killed while the stage was still draining) holds its
/// stage lock. The next supervisor finds it, ends it, and starts its own stages, instead of
/// counting their failed lock as crashes until it escalates.
#[test]
fn a_new_supervisor_ends_stages_left_by_a_dead_one() {
    use common::{Outcome, TestTrace, assert_exact_delivery, send_in_waves, spawn_tailgate};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let mut tailgate = Tailgate::start(backend_addr, &Timing::default());
    assert!(wait_until(Duration::from_secs(20), || stage_pids(tailgate.pid()).len() == 5));
    assert!(tailgate.stop().success());
    let data_dir = tailgate.data_dir();
    let mut stray = Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .args(["stage", "export", "--config"])
        .arg(&tailgate.config_path)
        .arg("--data-dir")
        .arg(&data_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = data_dir.join("run").join("export.lock");
    assert!(
        // The stray stage creates the lock file when it starts.
        wait_until(Duration::from_secs(10), || std::fs::File::open(&lock).is_ok_and(|file| file.try_lock().is_err())),
        "the stray stage did not take its lock"
    );

    tailgate.child = spawn_tailgate(&tailgate.config_path, tailgate.dir.path());
    assert!(wait_until(Duration::from_secs(20), || stage_pids(tailgate.pid()).len() == 5), "stages did not all start");
    assert!(
        wait_until(Duration::from_secs(10), || stray.try_wait().unwrap().is_some()),
        "the stray stage is still running"
    );
    let traces: Vec<TestTrace> = (0..6).map(|n| TestTrace::new(n, Outcome::Error, 2)).collect();
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::ZERO, |_| {}));
    assert_exact_delivery(&backend, &traces, Duration::from_secs(1), false);
    let log = std::fs::read_to_string(tailgate.dir.path().join("tailgate.log")).unwrap();
    assert!(log.contains("still uses this data dir"), "{log}");
    assert!(!log.contains("holds"), "a stage of the new run failed on a held lock:\n{log}");
}
