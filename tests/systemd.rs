//! The systemd appliance without a running systemd (it is not PID 1 on the build machines):
//! the unit is checked by `systemd-analyze verify`, the notification protocol by a datagram
//! socket this test owns as `NOTIFY_SOCKET`, and the install script by installing into a
//! temporary root.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Backend, Tailgate, Timing, signal, stage_pids, wait_until};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `systemd-analyze verify` on the unit (its binary path pointed at the built binary, which
/// verify requires to exist): no complaint at all, since verify reports problems on stderr and
/// still exits 0.
fn verify(unit_text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("tailgate.service");
    std::fs::write(&unit, unit_text.replace("/usr/bin/tailgate", env!("CARGO_BIN_EXE_tailgate"))).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().expect("systemd-analyze");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), said)
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(repo().join("systemd/tailgate.service")).unwrap();
    let (ok, said) = verify(&unit);
    assert!(ok && said.trim().is_empty(), "systemd-analyze verify: {said}");
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Delegate=",
        "KillMode=control-group",
        "MemoryMax=",
        "CPUQuota=",
        "StateDirectory=tailgate",
        "ConfigurationDirectory=tailgate",
        "RuntimeDirectory=tailgate",
        "User=tailgate",
        "ProtectSystem=strict",
        "ProtectHome=",
        "PrivateTmp=",
        "NoNewPrivileges=true",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=",
        "SystemCallFilter=@system-service",
        "LimitNOFILE=",
    ] {
        assert!(unit.contains(key), "the unit lacks {key:?}");
    }
    // The hardening as systemd rates it (0 best, 10 worst; 1.6 when this was written).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tailgate.service");
    std::fs::write(&path, unit.replace("/usr/bin/tailgate", env!("CARGO_BIN_EXE_tailgate"))).unwrap();
    let out = Command::new("systemd-analyze").args(["security", "--offline=true"]).arg(&path).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = said
        .lines()
        .find_map(|l| l.split("Overall exposure level for tailgate.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level: {said}"));
    assert!(exposure <= 2.0, "exposure {exposure}: {said}");
    // The check can fail: a misspelt value is reported.
    let (_, said) = verify(&unit.replace("ProtectSystem=strict", "ProtectSystem=stric"));
    assert!(said.contains("ProtectSystem") || said.contains("protect system"), "verify missed a bad value: {said}");
}

fn install(args: &[&str]) -> String {
    let out = Command::new(repo().join("systemd/install.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_tailgate")])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "install.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions()) & 0o7777
}

#[test]
fn install_into_a_temporary_root_is_complete_and_idempotent() {
    let root = tempfile::tempdir().unwrap();
    let dest = root.path().to_str().unwrap();
    // A dry run changes nothing.
    let said = install(&["--destdir", dest, "--dry-run"]);
    assert!(said.contains("would: install"), "{said}");
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0, "the dry run wrote files");

    install(&["--destdir", dest]);
    let at = |p: &str| root.path().join(p.trim_start_matches('/'));
    for (path, expected_mode) in [
        ("/usr/bin/tailgate", 0o755),
        ("/usr/lib/systemd/system/tailgate.service", 0o644),
        ("/usr/lib/sysusers.d/tailgate.conf", 0o644),
        ("/usr/lib/tmpfiles.d/tailgate.conf", 0o644),
        ("/usr/share/doc/tailgate/README.md", 0o644),
        ("/etc/tailgate/tailgate.yaml", 0o640),
    ] {
        assert!(at(path).is_file(), "{path} missing");
        assert_eq!(mode(&at(path)), expected_mode, "{path}");
    }
    assert_eq!(std::fs::read(at("/usr/bin/tailgate")).unwrap(), std::fs::read(env!("CARGO_BIN_EXE_tailgate")).unwrap());
    let config = std::fs::read_to_string(at("/etc/tailgate/tailgate.yaml")).unwrap();
    assert!(config.contains("data_dir: /var/lib/tailgate"), "the config keeps the service's data directory");
    let check = Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .arg("check-config")
        .arg(at("/etc/tailgate/tailgate.yaml"))
        .output()
        .unwrap();
    assert!(check.status.success(), "installed config invalid: {}", String::from_utf8_lossy(&check.stderr));
    assert!(std::fs::read_to_string(at("/usr/lib/sysusers.d/tailgate.conf")).unwrap().contains("u tailgate"));

    // A rerun changes nothing.
    let said = install(&["--destdir", dest]);
    assert!(!said.contains("installed:"), "a rerun reinstalled something: {said}");

    // An operator's configuration is kept; the shipped one goes next to it.
    std::fs::write(at("/etc/tailgate/tailgate.yaml"), format!("{config}\n# edited\n")).unwrap();
    let said = install(&["--destdir", dest]);
    assert!(said.contains("kept:"), "{said}");
    assert!(std::fs::read_to_string(at("/etc/tailgate/tailgate.yaml")).unwrap().ends_with("# edited\n"));
    assert_eq!(std::fs::read_to_string(at("/etc/tailgate/tailgate.yaml.dist")).unwrap(), config);

    // Another prefix is written into the unit.
    let other = tempfile::tempdir().unwrap();
    install(&["--destdir", other.path().to_str().unwrap(), "--prefix", "/opt/tailgate"]);
    let unit = std::fs::read_to_string(other.path().join("opt/tailgate/lib/systemd/system/tailgate.service")).unwrap();
    assert!(unit.contains("ExecStart=/opt/tailgate/bin/tailgate run"), "{unit}");

    // Uninstall keeps the configuration; --purge removes it.
    install(&["--destdir", dest, "--uninstall"]);
    assert!(!at("/usr/bin/tailgate").exists() && !at("/usr/lib/systemd/system/tailgate.service").exists());
    assert!(at("/etc/tailgate/tailgate.yaml").exists());
    install(&["--destdir", dest, "--uninstall", "--purge"]);
    assert!(!at("/etc/tailgate").exists());
}

/// What the service manager heard, in order.
struct Listener {
    heard: Arc<Mutex<Vec<(Instant, String)>>>,
    path: &'static str,
}

impl Listener {
    fn bind(dir: &Path) -> Listener {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let sink = heard.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        sink.lock().unwrap().push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()))
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
        });
        Listener { heard, path: Box::leak(path.to_str().unwrap().to_owned().into_boxed_str()) }
    }

    fn messages(&self) -> Vec<String> {
        self.heard.lock().unwrap().iter().map(|(_, m)| m.clone()).collect()
    }

    fn count(&self, prefix: &str) -> usize {
        self.messages().iter().filter(|m| m.lines().any(|l| l.starts_with(prefix))).count()
    }
}

#[test]
fn the_service_manager_hears_ready_watchdog_status_and_stopping_in_order() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::bind(dir.path());
    let timing =
        Timing { env: vec![("NOTIFY_SOCKET", listener.path), ("WATCHDOG_USEC", "1000000")], ..Timing::default() };
    let mut tailgate = Tailgate::start(backend_addr, &timing);
    assert!(
        wait_until(Duration::from_secs(20), || listener.count("READY=1") == 1),
        "no READY: {:?}",
        listener.messages()
    );
    // READY came once every stage was up.
    assert_eq!(stage_pids(tailgate.pid()).len(), 5);
    let ready = listener.messages().into_iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(ready.contains("STATUS=5/5 stages up; backlog"), "{ready}");
    // Pings every half watchdog timeout (0.5 s) while healthy.
    let pings = listener.count("WATCHDOG=1");
    assert!(wait_until(Duration::from_secs(10), || listener.count("WATCHDOG=1") >= pings + 4), "no watchdog pings");
    // The stages do not speak for the service.
    let stage = tailgate.stage_pid("receive").unwrap();
    let environ = std::fs::read(format!("/proc/{stage}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains("NOTIFY_SOCKET="), "a stage inherited NOTIFY_SOCKET");
    // A reload: RELOADING=1 (with the monotonic time), then READY=1.
    signal(tailgate.pid(), "HUP");
    assert!(wait_until(Duration::from_secs(10), || listener.count("READY=1") == 2), "{:?}", listener.messages());
    let messages = listener.messages();
    let reloading = messages.iter().position(|m| m.starts_with("RELOADING=1\nMONOTONIC_USEC=")).expect("RELOADING");
    let second_ready = messages.iter().rposition(|m| m.contains("READY=1")).unwrap();
    assert!(reloading < second_ready);
    // Stopping: STOPPING=1 first, nothing READY after it.
    assert!(tailgate.stop().success());
    let messages = listener.messages();
    let stopping = messages.iter().position(|m| m.starts_with("STOPPING=1")).expect("no STOPPING");
    assert!(messages[stopping..].iter().all(|m| !m.contains("READY=1")), "{messages:?}");
}

#[test]
fn no_ready_while_a_stage_is_down() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::bind(dir.path());
    // Start with receive unable to bind its gRPC port (held here), so it keeps failing.
    let grpc_port = common::free_port();
    let holder = std::net::TcpListener::bind(("127.0.0.1", grpc_port)).unwrap();
    let timing = Timing {
        env: vec![("NOTIFY_SOCKET", listener.path), ("WATCHDOG_USEC", "1000000")],
        otlp_grpc_port: Some(grpc_port),
        no_port_wait: true,
        // Receive fails at once and is restarted every second: no escalation meanwhile.
        supervisor_extra: "  max_restarts: 50",
        ..Timing::default()
    };
    let tailgate = Tailgate::start(backend_addr, &timing);
    assert!(
        wait_until(Duration::from_secs(10), || listener.messages().iter().any(|m| m.contains("STATUS=4/5 stages up"))),
        "{:?}\n{}",
        listener.messages(),
        tailgate.log()
    );
    std::thread::sleep(Duration::from_secs(2)); // a window in which READY must not come
    assert_eq!(listener.count("READY=1"), 0, "READY with receive down: {:?}", listener.messages());
    // The supervisor itself is healthy: it keeps pinging.
    assert!(listener.count("WATCHDOG=1") >= 2);
    drop(holder);
    assert!(wait_until(Duration::from_secs(20), || listener.count("READY=1") == 1), "{:?}", listener.messages());
    drop(tailgate);
}
