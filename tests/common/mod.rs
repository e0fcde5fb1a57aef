//! Shared harness of the multi-process tests: a real `tailgate run` in its own data dir with its
//! own ports, an OTLP backend that records what it receives, and process helpers.
#![allow(dead_code)]
// Test support: a failed setup step must fail the test, so panicking is the intent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};

pub mod loki;
pub mod pki;
pub mod prometheus;

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

/// What the test backend received.
#[derive(Default)]
pub struct Received {
    pub traces: Vec<ExportTraceServiceRequest>,
    pub logs: Vec<ExportLogsServiceRequest>,
    pub metrics: Vec<ExportMetricsServiceRequest>,
    /// Answer the next this-many trace requests with UNAVAILABLE.
    pub fail_next_traces: u32,
    /// When each trace request in `traces` arrived.
    pub trace_arrivals: Vec<Instant>,
    /// When each trace request was answered, taken or not.
    pub trace_attempts: Vec<Instant>,
    /// Refuse every trace request holding a span of this name, with this code.
    pub poison: Option<(String, tonic::Code)>,
}

/// An OTLP/gRPC backend (standing in for Jaeger / a Collector) built from the official
/// generated service definitions, recording every request.
#[derive(Clone, Default)]
pub struct Backend {
    pub received: Arc<Mutex<Received>>,
}

#[tonic::async_trait]
impl TraceService for Backend {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.received.lock().unwrap();
        received.trace_attempts.push(Instant::now());
        if let Some((name, code)) = &received.poison {
            let request = request.get_ref();
            let spans = request.resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans);
            if spans.clone().any(|span| &span.name == name) {
                return Err(tonic::Status::new(*code, "poisoned request"));
            }
        }
        if received.fail_next_traces > 0 {
            received.fail_next_traces -= 1;
            return Err(tonic::Status::unavailable("backend restarting"));
        }
        received.traces.push(request.into_inner());
        received.trace_arrivals.push(Instant::now());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Backend {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().logs.push(request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Backend {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().metrics.push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Backend {
    /// Serves the backend on a free loopback port from the given runtime.
    pub fn serve(runtime: &tokio::runtime::Runtime) -> (Backend, SocketAddr) {
        Backend::serve_at(runtime, "127.0.0.1:0".parse().unwrap())
    }

    /// Serves the backend on `addr` (a port chosen earlier, e.g. for a backend that comes up late).
    pub fn serve_at(runtime: &tokio::runtime::Runtime, addr: SocketAddr) -> (Backend, SocketAddr) {
        Backend::serve_limited(runtime, addr, 64 << 20)
    }

    /// Serves the backend refusing trace requests over `max_message_bytes` (tonic answers
    /// OUT_OF_RANGE, as for any server's message size limit).
    pub fn serve_limited(
        runtime: &tokio::runtime::Runtime,
        addr: SocketAddr,
        max_message_bytes: usize,
    ) -> (Backend, SocketAddr) {
        Backend::serve_with(runtime, addr, max_message_bytes, None)
    }

    /// Serves the backend over TLS with this server identity (PEM certificate and key), asking
    /// for a client certificate from `client_ca` when given.
    pub fn serve_tls(
        runtime: &tokio::runtime::Runtime,
        identity: (&str, &str),
        client_ca: Option<&str>,
    ) -> (Backend, SocketAddr) {
        let mut tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(identity.0, identity.1));
        if let Some(ca) = client_ca {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        Backend::serve_with(runtime, "127.0.0.1:0".parse().unwrap(), 64 << 20, Some(tls))
    }

    fn serve_with(
        runtime: &tokio::runtime::Runtime,
        addr: SocketAddr,
        max_message_bytes: usize,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> (Backend, SocketAddr) {
        let backend = Backend::default();
        let listener = runtime.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
        let addr = listener.local_addr().unwrap();
        let service = backend.clone();
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls).unwrap();
        }
        runtime.spawn(async move {
            server
                .add_service(
                    TraceServiceServer::new(service.clone())
                        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                        .max_decoding_message_size(max_message_bytes),
                )
                .add_service(LogsServiceServer::new(service.clone()))
                .add_service(MetricsServiceServer::new(service))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        (backend, addr)
    }

    /// Every span received, keyed by (trace id, span id), with how often it arrived.
    /// Every span received, by (trace id, span id), as sent by the client: without the
    /// `tailgate.sampling.policy` attribute tailgate adds (see [`Backend::policies`]); with the
    /// number of times it arrived.
    pub fn spans(&self) -> HashMap<([u8; 16], [u8; 8]), (Span, usize)> {
        let mut out: HashMap<([u8; 16], [u8; 8]), (Span, usize)> = HashMap::new();
        for request in &self.received.lock().unwrap().traces {
            for resource in &request.resource_spans {
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        let key = (span.trace_id.clone().try_into().unwrap(), span.span_id.clone().try_into().unwrap());
                        let mut sent = span.clone();
                        sent.attributes.retain(|kv| kv.key != POLICY_ATTRIBUTE);
                        out.entry(key).or_insert_with(|| (sent, 0)).1 += 1;
                    }
                }
            }
        }
        out
    }

    /// The policy tailgate recorded as the reason each received span's trace was kept.
    pub fn policies(&self) -> HashMap<([u8; 16], [u8; 8]), String> {
        let mut out = HashMap::new();
        for request in &self.received.lock().unwrap().traces {
            for span in request.resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans) {
                let policy = span.attributes.iter().find(|kv| kv.key == POLICY_ATTRIBUTE).and_then(|kv| {
                    match kv.value.as_ref()?.value.as_ref()? {
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(name) => {
                            Some(name.clone())
                        }
                        _ => None,
                    }
                });
                if let Some(policy) = policy {
                    let key = (span.trace_id.clone().try_into().unwrap(), span.span_id.clone().try_into().unwrap());
                    out.insert(key, policy);
                }
            }
        }
        out
    }
}

/// The span attribute naming the sampling policy that kept a span's trace.
pub const POLICY_ATTRIBUTE: &str = "tailgate.sampling.policy";

/// How a synthetic trace should come out of sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A child span in ERROR status: kept.
    Error,
    /// The root lasts 350 ms: kept.
    Slow,
    /// Everything under 200 ms and OK: dropped.
    Fast,
}

/// A synthetic trace: a root and `children` child spans.
#[derive(Debug, Clone)]
pub struct TestTrace {
    pub trace_id: [u8; 16],
    pub outcome: Outcome,
    pub spans: Vec<Span>,
}

impl TestTrace {
    /// Builds trace number `n` with the given outcome and `children` child spans.
    pub fn new(n: u32, outcome: Outcome, children: u32) -> TestTrace {
        let mut trace_id = [0u8; 16];
        trace_id[..4].copy_from_slice(&n.to_be_bytes());
        trace_id[15] = 0x7a;
        let start = 1_700_000_000_000_000_000u64 + u64::from(n) * 1_000_000_000;
        let root_id = span_id(n, 0);
        let root_len = if outcome == Outcome::Slow { 350_000_000 } else { 120_000_000 };
        let mut spans = vec![Span {
            trace_id: trace_id.to_vec(),
            span_id: root_id.to_vec(),
            name: format!("GET /item/{}", n % 5),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: start + root_len,
            attributes: vec![string_kv("http.route", "/item/{id}")],
            status: Some(Status { code: status::StatusCode::Ok as i32, message: String::new() }),
            ..Default::default()
        }];
        for c in 1..=children {
            let failed = outcome == Outcome::Error && c == children;
            spans.push(Span {
                trace_id: trace_id.to_vec(),
                span_id: span_id(n, c).to_vec(),
                parent_span_id: root_id.to_vec(),
                name: format!("db.query {c}"),
                kind: span::SpanKind::Client as i32,
                start_time_unix_nano: start + u64::from(c) * 1_000_000,
                end_time_unix_nano: start + u64::from(c) * 1_000_000 + 20_000_000,
                status: failed.then(|| Status { code: status::StatusCode::Error as i32, message: "timeout".into() }),
                ..Default::default()
            });
        }
        TestTrace { trace_id, outcome, spans }
    }

    /// Whether sampling must keep it.
    pub fn kept(&self) -> bool {
        self.outcome != Outcome::Fast
    }
}

fn span_id(n: u32, c: u32) -> [u8; 8] {
    let mut id = [0u8; 8];
    id[..4].copy_from_slice(&n.to_be_bytes());
    id[4..].copy_from_slice(&(c + 1).to_be_bytes());
    id
}

pub fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        ..Default::default()
    }
}

/// An OTLP request holding `spans` for service `service`.
pub fn trace_request(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource { attributes: vec![string_kv("service.name", service)], ..Default::default() }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "tailgate-tests".into(),
                    version: "1".into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Sends the traces' spans in `waves` requests per trace spread over time: every span of a
/// trace goes out in a different wave than its neighbours (children first, root later, the
/// last child after the root), alternating gRPC and OTLP/HTTP protobuf clients. `between(w)`
/// runs after wave `w`.
pub async fn send_in_waves(
    grpc: SocketAddr,
    http: SocketAddr,
    traces: &[TestTrace],
    gap: Duration,
    mut between: impl FnMut(usize),
) {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use prost::Message;
    let http_client = http_client().build().unwrap();
    // Wave of each span: children 0..k-1 in wave i % 3, root one wave later, last child after it.
    let waves = 5;
    for wave in 0..waves {
        let mut grpc_spans = Vec::new();
        let mut http_spans = Vec::new();
        for (index, trace) in traces.iter().enumerate() {
            // Decoupled from the outcome (n % 3) so every wave mixes kept and dropped traces.
            let base = (index / 2) % 3;
            let count = trace.spans.len();
            for (position, span) in trace.spans.iter().enumerate() {
                let span_wave = match position {
                    0 => base + 1,
                    p if p == count - 1 && count > 2 => base + 2,
                    _ => base,
                };
                if span_wave == wave {
                    if index % 2 == 0 { grpc_spans.push(span.clone()) } else { http_spans.push(span.clone()) }
                }
            }
        }
        if !grpc_spans.is_empty() {
            let request = trace_request("checkout", grpc_spans);
            retry_send(|| {
                let request = request.clone();
                async move {
                    let mut client =
                        TraceServiceClient::connect(format!("http://{grpc}")).await.map_err(|e| e.to_string())?;
                    client.export(request).await.map(|_| ()).map_err(|e| e.to_string())
                }
            })
            .await;
        }
        if !http_spans.is_empty() {
            let body = trace_request("payments", http_spans).encode_to_vec();
            retry_send(|| {
                let request = http_client
                    .post(format!("http://{http}/v1/traces"))
                    .header("content-type", "application/x-protobuf")
                    .body(body.clone());
                async move {
                    let response = request.send().await.map_err(|e| e.to_string())?;
                    if response.status() == 200 { Ok(()) } else { Err(format!("status {}", response.status())) }
                }
            })
            .await;
        }
        between(wave);
        tokio::time::sleep(gap).await;
    }
}

/// Retries a send the way an OTLP exporter does while the receiver restarts (connection refused,
/// UNAVAILABLE): up to 100 times, 200 ms apart. Tests that require exactly-once delivery never
/// kill receive in the middle of a request, so a retry there cannot duplicate.
async fn retry_send<F, Fut>(mut send: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut last = String::new();
    for _ in 0..100 {
        match send().await {
            Ok(()) => return,
            Err(err) => last = err,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("send kept failing: {last}");
}

/// (trace id, span id) of every span of the traces sampling must keep.
pub fn expected_spans(traces: &[TestTrace]) -> HashMap<([u8; 16], [u8; 8]), Span> {
    traces
        .iter()
        .filter(|t| t.kept())
        .flat_map(|t| t.spans.iter())
        .map(|s| ((s.trace_id.clone().try_into().unwrap(), s.span_id.clone().try_into().unwrap()), s.clone()))
        .collect()
}

/// A mix of error, slow and fast traces with 2..=4 children each.
pub fn mixed_traces(count: u32) -> Vec<TestTrace> {
    (0..count)
        .map(|n| {
            let outcome = match n % 3 {
                0 => Outcome::Error,
                1 => Outcome::Slow,
                _ => Outcome::Fast,
            };
            TestTrace::new(n, outcome, 2 + n % 3)
        })
        .collect()
}

/// Waits for the backend to hold every expected span, then long enough for any extra or
/// duplicate delivery to show, and asserts the delivered set is exact.
pub fn assert_exact_delivery(backend: &Backend, traces: &[TestTrace], settle: Duration, allow_resend: bool) {
    let expected = expected_spans(traces);
    let arrived = wait_until(Duration::from_secs(60), || {
        let got = backend.spans();
        expected.keys().all(|k| got.contains_key(k))
    });
    std::thread::sleep(settle);
    let got = backend.spans();
    let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(
        arrived && missing.is_empty(),
        "{} of {} kept spans missing: {:?}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(extra.is_empty(), "{} spans of dropped traces delivered: {:?}", extra.len(), &extra[..extra.len().min(5)]);
    // Every kept span says why: errors for an error trace, slow for a slow one.
    let policies = backend.policies();
    for trace in traces.iter().filter(|t| t.kept()) {
        let reason = if trace.outcome == Outcome::Error { "errors" } else { "slow" };
        for span in &trace.spans {
            let key = (trace.trace_id, span.span_id.clone().try_into().unwrap());
            assert_eq!(
                policies.get(&key).map(String::as_str),
                Some(reason),
                "span {key:?}: wrong or no policy recorded"
            );
        }
    }
    for (key, (span, times)) in &got {
        assert_eq!(span, &expected[key], "span delivered altered");
        if !allow_resend {
            assert_eq!(*times, 1, "span {key:?} delivered {times} times");
        }
    }
}
