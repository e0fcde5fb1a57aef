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
