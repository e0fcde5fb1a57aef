//! Shared harness of the multi-process tests: a real `tailgate run` in its own data dir with its
//! own ports, an OTLP backend that records what it receives, and process helpers.
#![allow(dead_code)]
// Test support: a failed setup step must fail the test, so panicking is the intent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod backend;
pub mod loki;
pub mod pki;
pub mod prometheus;
mod traces;

pub use backend::*;
pub use traces::*;

/// A port nobody listens on right now.
/// Ports are drawn from 20000-31999, below Linux's ephemeral range (32768+), so no outgoing
/// connection of a test running in parallel can take one between this check and the bind.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        ^ (u64::from(std::process::id()) << 32);
    let _ = STATE.compare_exchange(0, seed | 1, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        // xorshift64
        let mut x = STATE.load(Ordering::SeqCst);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        STATE.store(x, Ordering::SeqCst);
        let port = 20_000 + (x % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `check` every 50 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

/// Test-speed timing knobs written into the config.
#[derive(Debug, Clone)]
pub struct Timing {
    pub decision_wait: &'static str,
    pub root_grace: &'static str,
    pub batch_timeout: &'static str,
    pub log_max_wait: &'static str,
    pub flush_interval: &'static str,
    /// Extra lines under `supervisor:` (indented by two spaces).
    pub supervisor_extra: &'static str,
    /// A `filelog:` receiver block (YAML flow mapping), e.g. `{ include: ["/tmp/x/*.log"] }`.
    pub filelog: Option<String>,
    /// The `exporters.logs` destination (YAML flow mapping); default: OTLP to the test backend.
    pub logs_destination: Option<String>,
    /// The `exporters.metrics` destination (YAML flow mapping); default: OTLP to the test backend.
    pub metrics_destination: Option<String>,
    /// Extra lines under `spanmetrics:` (indented by two spaces).
    pub spanmetrics_extra: &'static str,
    /// `queue.max_size_mib`, the disk budget.
    pub queue_max_size_mib: u32,
    /// Put the data directory on a tmpfs of this many MiB (needs root; unmounted on drop).
    pub data_tmpfs_mib: Option<u32>,
    /// Run tailgate inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// Extra keys of every OTLP exporter (YAML flow-mapping entries, each led by a comma).
    pub otlp_extra: &'static str,
    /// Extra lines under `exporters:` (indented by two spaces).
    pub exporters_extra: &'static str,
    /// Environment variables for the first start (e.g. a test fault point).
    pub env: Vec<(&'static str, &'static str)>,
    /// The OTLP gRPC port (default: a free one).
    pub otlp_grpc_port: Option<u16>,
    /// Return without waiting for the OTLP ports (a test that keeps receive from binding).
    pub no_port_wait: bool,
    /// `exporters.traces` instead of OTLP to the backend over plain gRPC.
    pub traces_destination: Option<String>,
    /// Added to the gRPC and HTTP receivers' settings (e.g. `, tls: {...}`).
    pub grpc_extra: String,
    pub http_extra: String,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            decision_wait: "6s",
            root_grace: "3s",
            batch_timeout: "200ms",
            log_max_wait: "30s",
            flush_interval: "1s",
            supervisor_extra: "",
            filelog: None,
            logs_destination: None,
            metrics_destination: None,
            spanmetrics_extra: "",
            queue_max_size_mib: 256,
            data_tmpfs_mib: None,
            netns: None,
            otlp_extra: ", timeout: 10s",
            exporters_extra: "",
            env: Vec::new(),
            otlp_grpc_port: None,
            no_port_wait: false,
            grpc_extra: String::new(),
            http_extra: String::new(),
            traces_destination: None,
        }
    }
}

/// A running `tailgate run`, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Tailgate {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// The supervisor's self-metrics endpoint.
    pub telemetry: SocketAddr,
    pub config_path: PathBuf,
}

impl Tailgate {
    /// Writes a config pointing every exporter at `backend` and starts the binary.
    pub fn start(backend: SocketAddr, timing: &Timing) -> Tailgate {
        let dir = tempfile::tempdir().unwrap();
        let grpc: SocketAddr =
            format!("127.0.0.1:{}", timing.otlp_grpc_port.unwrap_or_else(free_port)).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let telemetry: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = format!(
            r#"
data_dir: {data}
log_level: info
receivers:
  otlp:
    protocols:
      grpc: {{ endpoint: "{grpc}"{grpc_extra} }}
      http: {{ endpoint: "{http}"{http_extra} }}
{filelog}
queue:
  max_size_mib: {queue_mib}
tail_sample:
  decision_wait: {dw}
  root_grace: {rg}
  decision_cache_ttl: 2m
log_mirror:
  max_wait: {lw}
spanmetrics:
  metrics_flush_interval: {fi}
{spanmetrics_extra}
exporters:
  traces: {traces}
  logs: {logs}
  metrics: {metrics}
  batch: {{ send_batch_size: 512, timeout: {bt} }}
  retry_on_failure: {{ initial_interval: 200ms, max_interval: 1s }}
{exporters_extra}
supervisor:
  restart_backoff_initial: 50ms
  restart_backoff_max: 1s
  shutdown_timeout: 5s
  telemetry: {{ endpoint: "{telemetry}" }}
{extra}
"#,
            extra = timing.supervisor_extra,
            grpc_extra = timing.grpc_extra,
            http_extra = timing.http_extra,
            filelog = timing.filelog.as_ref().map(|f| format!("  filelog: {f}")).unwrap_or_default(),
            traces = timing
                .traces_destination
                .clone()
                .unwrap_or_else(|| format!("{{ otlp: {{ endpoint: \"http://{backend}\"{} }} }}", timing.otlp_extra)),
            logs = timing
                .logs_destination
                .clone()
                .unwrap_or_else(|| format!("{{ otlp: {{ endpoint: \"http://{backend}\"{} }} }}", timing.otlp_extra)),
            metrics = timing
                .metrics_destination
                .clone()
                .unwrap_or_else(|| format!("{{ otlp: {{ endpoint: \"http://{backend}\"{} }} }}", timing.otlp_extra)),
            exporters_extra = timing.exporters_extra,
            spanmetrics_extra = timing.spanmetrics_extra,
            queue_mib = timing.queue_max_size_mib,
            data = dir.path().join("data").display(),
            dw = timing.decision_wait,
            rg = timing.root_grace,
            lw = timing.log_max_wait,
            fi = timing.flush_interval,
            bt = timing.batch_timeout,
        );
        let config_path = dir.path().join("tailgate.yaml");
        std::fs::write(&config_path, config).unwrap();
        if let Some(mib) = timing.data_tmpfs_mib {
            mount_tmpfs(&dir.path().join("data"), mib);
        }
        let child = spawn_tailgate_with(&config_path, dir.path(), timing.netns.as_deref(), &timing.env);
        let tailgate = Tailgate { child, dir, grpc, http, telemetry, config_path };
        if timing.no_port_wait {
            return tailgate;
        }
        let listening = || TcpStream::connect(grpc).is_ok() && TcpStream::connect(http).is_ok();
        let up = match timing.netns.as_deref() {
            Some(ns) => in_netns(ns, || wait_until(Duration::from_secs(20), listening)),
            None => wait_until(Duration::from_secs(20), listening),
        };
        assert!(up, "tailgate did not open its OTLP ports");
        // Receive listening says nothing about the stages forked after it: tests that compare
        // stage pids before and after need all five. (Best effort: a test may keep one down.)
        wait_until(Duration::from_secs(10), || stage_pids(tailgate.pid()).len() == 5);
        tailgate
    }

    /// Pid of the supervisor.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Pid of the running process of `stage` (a child of the supervisor).
    pub fn stage_pid(&self, stage: &str) -> Option<u32> {
        stage_pids(self.pid()).get(stage).copied()
    }

    /// Waits until `stage` runs under a pid other than `old`.
    pub fn wait_for_restart(&self, stage: &str, old: u32) -> u32 {
        let mut new = None;
        assert!(
            wait_until(Duration::from_secs(10), || {
                new = self.stage_pid(stage).filter(|pid| *pid != old);
                new.is_some()
            }),
            "{stage} was not restarted"
        );
        new.unwrap()
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        signal(self.pid(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Path of the data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs `tailgate <args> --config <this config>`, asserts it succeeds, returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new(env!("CARGO_BIN_EXE_tailgate"))
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    }

    /// What `tailgate status` prints for this instance.
    pub fn status(&self) -> String {
        self.cli(&["status"])
    }

    /// The supervisor's and stages' log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tailgate.log")).unwrap_or_default()
    }
}

impl Drop for Tailgate {
    fn drop(&mut self) {
        // A failing test keeps the run's log (the assertion shows only an excerpt).
        if std::thread::panicking() {
            let kept = std::env::temp_dir().join(format!("tailgate-failed-{}.log", self.pid()));
            if std::fs::copy(self.dir.path().join("tailgate.log"), &kept).is_ok() {
                eprintln!("the run's log: {}", kept.display());
            }
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let children: Vec<u32> = stage_pids(self.pid()).values().copied().collect();
            self.stop();
            for pid in children {
                signal(pid, "KILL");
            }
        }
        let data = self.data_dir();
        if is_mount_point(&data) {
            let _ = Command::new("umount").arg("-l").arg(&data).status();
        }
    }
}

/// Mounts a tmpfs of `mib` MiB at `dir` (created if missing). Needs root, as CI has.
pub fn mount_tmpfs(dir: &Path, mib: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
        .arg(dir)
        .status()
        .expect("mount(8) runs");
    assert!(status.success(), "mounting a tmpfs needs root (CI runs the tests as root)");
}

fn is_mount_point(dir: &Path) -> bool {
    let target = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mounts")
        .map(|mounts| mounts.lines().any(|line| line.split_whitespace().nth(1) == Some(target.as_str())))
        .unwrap_or(false)
}

/// Starts `tailgate run --config <file>` with its output in `<dir>/tailgate.log`.
pub fn spawn_tailgate(config: &Path, dir: &Path) -> Child {
    spawn_tailgate_in(config, dir, None)
}

/// Like [`spawn_tailgate`], inside network namespace `netns` when given (`ip netns exec`
/// execs, so the child's pid is tailgate's).
pub fn spawn_tailgate_in(config: &Path, dir: &Path, netns: Option<&str>) -> Child {
    spawn_tailgate_with(config, dir, netns, &[])
}

/// Like [`spawn_tailgate_in`], with extra environment variables.
pub fn spawn_tailgate_with(config: &Path, dir: &Path, netns: Option<&str>, env: &[(&str, &str)]) -> Child {
    let log = std::fs::File::create(dir.join("tailgate.log")).unwrap();
    let mut command = match netns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_tailgate")]);
            command
        }
        None => Command::new(env!("CARGO_BIN_EXE_tailgate")),
    };
    command.envs(env.iter().copied());
    command
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Runs `f` on a thread that has joined network namespace `ns` (`/run/netns/<ns>`): every
/// socket `f` creates lives there, and keeps living there after `f` returns.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_netns(ns);
                f()
            })
            .join()
            .unwrap()
    })
}

/// Moves the calling thread into network namespace `ns`.
pub fn enter_netns(ns: &str) {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&file),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap();
}

/// Sends a signal by name with kill(1).
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status();
}

/// An HTTP client builder. The build's reqwest has rustls without a built-in crypto provider
/// (tailgate picks ring explicitly), so a test's own clients need ring installed as the
/// process default first.
pub fn http_client() -> reqwest::ClientBuilder {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// A plain HTTP/1.1 GET (blocking: usable between waves, inside a client's runtime): status
/// and body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: tailgate\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// SIGSTOPs a process and waits until the kernel shows it stopped: kill(2) returns before the
/// target is scheduled to take the signal, and on a busy machine that can be a while.
pub fn stop_and_wait(pid: u32) {
    signal(pid, "STOP");
    let stopped = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|stat| {
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s == "T" || s == "t"))
        }) == Some(true)
    });
    assert!(stopped, "process {pid} did not stop within 10 s of SIGSTOP");
}

/// Stage name -> pid of the supervisor's children, read from /proc.
pub fn stage_pids(supervisor: u32) -> HashMap<String, u32> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the parenthesized comm: state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else { continue };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid: u32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid != supervisor || state == "Z" {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.get(1).map(String::as_str) == Some("stage")
            && let Some(name) = args.get(2)
        {
            out.insert(name.clone(), pid);
        }
    }
    out
}
