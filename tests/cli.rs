//! The command line as a user meets it: `--version`, `--help`, `check-config`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

use std::process::Command;

fn tailgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tailgate"))
}

#[test]
fn version_and_help() {
    let version = tailgate().arg("--version").output().unwrap();
    assert!(version.status.success());
    assert_eq!(String::from_utf8(version.stdout).unwrap().trim(), format!("tailgate {}", env!("CARGO_PKG_VERSION")));
    let help = tailgate().arg("--help").output().unwrap();
    let text = String::from_utf8(help.stdout).unwrap();
    assert!(help.status.success());
    for command in ["run", "check-config"] {
        assert!(text.contains(command), "--help lacks {command}: {text}");
    }
    assert!(
        !text.lines().any(|l| l.trim_start().starts_with("stage ")),
        "the internal stage command is hidden: {text}"
    );
}

#[test]
fn check_config_accepts_the_example() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tailgate.example.yaml");
    let output = tailgate().args(["check-config", path]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn check_config_lists_every_problem_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/tailgate.example.yaml")).unwrap();
    let bad = example
        .replace("endpoint: 127.0.0.1:4317", "endpoint: not-an-address")
        .replace("decision_wait: 10s", "decision_wait: 0s")
        .replace("memory_soft_limit_mib: 320", "memory_soft_limit_mib: 900");
    std::fs::write(&path, bad).unwrap();
    let output = tailgate().arg("check-config").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    for key in
        ["receivers.otlp.protocols.grpc.endpoint", "tail_sample.decision_wait", "supervisor.memory_soft_limit_mib"]
    {
        assert!(stderr.contains(key), "missing {key} in: {stderr}");
    }
}

/// `${env:NAME}` in the file takes the value from the environment; unset, `check-config`
/// names the variable; a value that does not parse is reported by its reference, not its value.
#[test]
fn check_config_expands_environment_references_and_never_prints_their_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("env.yaml");
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/tailgate.example.yaml")).unwrap();
    let text = example.replacen("endpoint: 127.0.0.1:4317", "endpoint: ${env:TG_TEST_GRPC}", 1).replacen(
        "timeout: 10s",
        "timeout: \"${env:TG_TEST_TIMEOUT:-10s}\"",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let check = |vars: &[(&str, &str)]| {
        let mut command = tailgate();
        command.arg("check-config").arg(&path).env_remove("TG_TEST_GRPC").env_remove("TG_TEST_TIMEOUT");
        command.envs(vars.iter().copied());
        let output = command.output().unwrap();
        (output.status.code(), String::from_utf8(output.stderr).unwrap())
    };
    assert_eq!(check(&[("TG_TEST_GRPC", "127.0.0.1:4317")]).0, Some(0));
    let (code, stderr) = check(&[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("the environment variable TG_TEST_GRPC is not set"), "{stderr}");
    let (code, stderr) = check(&[("TG_TEST_GRPC", "127.0.0.1:4317"), ("TG_TEST_TIMEOUT", "s3cret-value")]);
    assert_eq!(code, Some(1));
    assert!(!stderr.contains("s3cret-value") && stderr.contains("${env:TG_TEST_TIMEOUT"), "{stderr}");
}

#[test]
fn check_config_names_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.yaml");
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/tailgate.example.yaml")).unwrap();
    std::fs::write(&path, example.replace("  latency_threshold: 200ms", "  latency_treshold: 200ms")).unwrap();
    let output = tailgate().arg("check-config").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8(output.stderr).unwrap().contains("latency_treshold"));
}

#[test]
fn status_reads_the_queue_without_writing_or_waiting_behind_a_writer() {
    use tailgate_ipc::{Queue, QueueOptions};
    let dir = tempfile::tempdir().unwrap();
    let queue_dir = dir.path().join("queue");
    let options = QueueOptions { max_size_bytes: 16 << 20, ..QueueOptions::default() };
    let queue = Queue::open(&queue_dir, &options).unwrap();
    let size_before = std::fs::metadata(queue_dir.join("data.mdb")).unwrap().len();
    // A writer that holds the queue's single writer lock and does not let go (a stuck stage).
    let held = queue.write().unwrap();
    // No --config: the embedded default would say 1024 MiB; status must report what the queue
    // was created with, and must not grow the file to the default budget.
    let mut child = tailgate()
        .arg("status")
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "status waited behind the stuck writer");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    drop(held);
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("of 16 MiB"), "{stdout}");
    // The stuck writer is named: here this test process, which is no stage.
    assert!(
        stdout.contains(&format!("writer lock: held by pid {} (not a tailgate stage)", std::process::id())),
        "{stdout}"
    );
    assert_eq!(std::fs::metadata(queue_dir.join("data.mdb")).unwrap().len(), size_before);
}
