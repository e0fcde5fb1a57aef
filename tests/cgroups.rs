//! One cgroup per stage with the configured caps: each stage process (and its replacement after
//! a restart) sits in its own group with the limits from `supervisor.cgroups.stages`; the groups
//! go away with the supervisor. Skipped, saying why, where the host has no writable cgroup.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Backend, Tailgate, Timing, signal, wait_until};

/// The directory of `pid`'s group in the hierarchy that has `controller` (v1), or its v2 group.
fn group_dir(pid: u32, controller: &str) -> Option<PathBuf> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
        let v2 = names.is_empty();
        if !v2 && !names.split(',').any(|n| n == controller) {
            continue;
        }
        let mount = mounts.lines().find_map(|m| {
            let (left, right) = m.split_once(" - ")?;
            let mut right = right.split_whitespace();
            let fstype = right.next()?;
            let options = right.nth(1).unwrap_or("");
            let ok = if v2 {
                fstype == "cgroup2"
            } else {
                fstype == "cgroup" && options.split(',').any(|o| o == controller)
            };
            ok.then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
        })?;
        let dir = mount.join(path.trim_start_matches('/'));
        if v2 && !dir.join("memory.max").exists() {
            continue;
        }
        return Some(dir);
    }
    None
}

#[test]
fn each_stage_runs_in_its_own_cgroup_with_its_caps() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let timing = Timing {
        supervisor_extra: "  cgroups:\n    stages:\n      tail_sample: {memory_max_mib: 300, memory_high_mib: 200, cpu_max_percent: 50}",
        ..Timing::default()
    };
    let mut tailgate = Tailgate::start(backend_addr, &timing);
    assert!(wait_until(Duration::from_secs(10), || tailgate.log().contains("cgroup")));
    if tailgate.log().contains("no writable cgroup") {
        eprintln!("SKIPPED: this host has no writable cgroup (the supervisor said so):\n{}", tailgate.log());
        return;
    }
    let check = |pid: u32| {
        let memory = group_dir(pid, "memory").expect("no memory group");
        assert!(memory.ends_with("tail_sample"), "{}", memory.display());
        let (max, high) = if memory.join("memory.limit_in_bytes").exists() {
            ("memory.limit_in_bytes", "memory.soft_limit_in_bytes")
        } else {
            ("memory.max", "memory.high")
        };
        assert_eq!(std::fs::read_to_string(memory.join(max)).unwrap().trim(), (300u64 << 20).to_string());
        assert_eq!(std::fs::read_to_string(memory.join(high)).unwrap().trim(), (200u64 << 20).to_string());
        let cpu = group_dir(pid, "cpu").expect("no cpu group");
        let quota = if cpu.join("cpu.cfs_quota_us").exists() {
            std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).unwrap().trim().to_string()
        } else {
            std::fs::read_to_string(cpu.join("cpu.max")).unwrap().split_whitespace().next().unwrap().to_string()
        };
        assert_eq!(quota, "50000");
        memory
    };
    // The ports answer once receive is up; the other stages may still be starting.
    assert!(wait_until(Duration::from_secs(10), || tailgate.stage_pid("tail_sample").is_some()));
    let first = tailgate.stage_pid("tail_sample").unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || group_dir(first, "memory").is_some_and(|d| d.ends_with("tail_sample")))
    );
    let group = check(first);
    // Another stage has its own group, without caps.
    let receive = tailgate.stage_pid("receive").unwrap();
    assert!(group_dir(receive, "memory").unwrap().ends_with("receive"));
    // The replacement of a killed stage is placed too.
    signal(first, "KILL");
    let second = tailgate.wait_for_restart("tail_sample", first);
    assert!(
        wait_until(Duration::from_secs(5), || group_dir(second, "memory").is_some_and(|d| d.ends_with("tail_sample")))
    );
    check(second);
    tailgate.stop();
    assert!(!group.exists(), "the stage's group outlived the supervisor: {}", group.display());
}
