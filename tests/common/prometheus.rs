//! A real Prometheus server (the Debian package's `/usr/bin/prometheus`, 2.42) for the
//! multi-process tests of the remote-write exporter.
//!
//! It runs on a free loopback port with its own data directory and:
//! - `--web.enable-remote-write-receiver`: `POST /api/v1/write` takes snappy-compressed
//!   `prometheus.WriteRequest`s, and answers 400 to a request with an out-of-order, out-of-bounds
//!   or conflicting sample (storing nothing of that request);
//! - `--enable-feature=exemplar-storage`: exemplars of written series are kept and served by
//!   `/api/v1/query_exemplars`;
//! - `storage.tsdb.out_of_order_time_window: 10m` (a config-file key in 2.42, not a flag):
//!   samples up to 10 minutes older than the newest sample in the head are accepted. Anything
//!   older is refused with the whole request; 2.42 answers that one ("too old sample") with 500,
//!   which a sender following the remote-write spec would retry for ever.
//!
//! No scrape jobs: everything in the TSDB came through remote write. The server's own
//! counters (e.g. `prometheus_http_requests_total{handler="/api/v1/write"}`, the write requests
//! it answered, by status code) are read from its `/metrics` page.
//!
//! The helpers block (they run their own single-threaded tokio runtime): call them from the test
//! thread, not from inside another runtime's `block_on`.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{free_port, wait_until};

/// A label set, as Prometheus returns it.
pub type Labels = BTreeMap<String, String>;

/// One element of an instant vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub metric: Labels,
    /// Unix seconds of the evaluation.
    pub timestamp: f64,
    pub value: f64,
}

/// One exemplar as `/api/v1/query_exemplars` returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredExemplar {
    /// The series it is attached to (with `__name__` and, on buckets, `le`).
    pub series: Labels,
    /// The exemplar's own labels (`trace_id`, `span_id`).
    pub labels: Labels,
    pub value: f64,
    /// Unix seconds.
    pub timestamp: f64,
}

/// A running Prometheus, killed on drop.
pub struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
    /// `http`, or `https` when it serves TLS.
    scheme: &'static str,
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

/// Now in Unix seconds (fractional).
pub fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Now in Unix nanoseconds.
pub fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

impl Prometheus {
    /// Starts Prometheus and waits until `/-/ready` answers 200.
    pub fn start() -> Prometheus {
        Prometheus::start_with(None)
    }

    /// Starts Prometheus serving TLS only, with mutual TLS: its web config (`--web.config.file`,
    /// `tls_server_config`) takes `server.pem` / `server.key` from `certs` (see
    /// [`super::pki::pki`]) and requires a client certificate signed by `ca.pem`. The helpers
    /// query it with `client.pem` / `client.key`.
    pub fn start_tls(certs: &std::path::Path) -> Prometheus {
        Prometheus::start_with(Some(certs))
    }

    fn start_with(certs: Option<&std::path::Path>) -> Prometheus {
        // The port may be taken between free_port() and the bind: retry with another one.
        for _attempt in 0..5 {
            let prometheus = Prometheus::spawn(certs);
            let ready = wait_until(Duration::from_secs(60), || {
                TcpStream::connect(prometheus.addr).is_ok() && prometheus.get_status("/-/ready") == Some(200)
                    || prometheus.exited()
            });
            if !prometheus.exited() {
                assert!(ready, "Prometheus not ready after 60 s:\n{}", prometheus.log_tail(40));
                return prometheus;
            }
            let log = prometheus.log_tail(20);
            assert!(log.contains("address already in use"), "Prometheus exited at start:\n{log}");
        }
        panic!("Prometheus could not bind a port in 5 attempts");
    }

    fn spawn(certs: Option<&std::path::Path>) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            "global:\n  evaluation_interval: 1m\nstorage:\n  tsdb:\n    out_of_order_time_window: 10m\n",
        )
        .unwrap();
        // Always a web config file: empty means plain HTTP.
        let mut web = String::new();
        let mut client = super::http_client().timeout(Duration::from_secs(20));
        if let Some(certs) = certs {
            web = format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_ca_file: {}\n  client_auth_type: RequireAndVerifyClientCert\n",
                certs.join("server.pem").display(),
                certs.join("server.key").display(),
                certs.join("ca.pem").display()
            );
            let ca = std::fs::read(certs.join("ca.pem")).unwrap();
            let mut identity = std::fs::read(certs.join("client.pem")).unwrap();
            identity.extend(std::fs::read(certs.join("client.key")).unwrap());
            client = client
                .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
                .identity(reqwest::Identity::from_pem(&identity).unwrap());
        }
        std::fs::write(dir.path().join("web.yml"), web).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = spawn_child(dir.path(), addr);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let scheme = if certs.is_some() { "https" } else { "http" };
        Prometheus { child, dir, addr, scheme, runtime, client: client.build().unwrap() }
    }

    /// Kills the server (SIGKILL: an outage, not a clean stop); the data directory stays.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port and data directory; waits until it is ready.
    pub fn restart(&mut self) {
        self.stop();
        let mut ready = false;
        // The port may linger in TIME_WAIT for a moment; Prometheus sets SO_REUSEADDR, so a
        // failed bind is someone else's: retry a few times.
        for _attempt in 0..10 {
            self.child = spawn_child(self.dir.path(), self.addr);
            ready = wait_until(Duration::from_secs(60), || {
                self.exited() || TcpStream::connect(self.addr).is_ok() && self.get_status("/-/ready") == Some(200)
            }) && !self.exited();
            if ready {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        assert!(ready, "Prometheus did not come back:\n{}", self.log_tail(30));
    }

    fn exited(&self) -> bool {
        // try_wait needs &mut; /proc tells whether the child is gone or a zombie.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')).unwrap_or(true)
    }

    /// The remote-write URL.
    pub fn write_url(&self) -> String {
        format!("{}://{}/api/v1/write", self.scheme, self.addr)
    }

    /// The `exporters.metrics` destination (YAML flow mapping) pointing at this server, with
    /// extra `prometheusremotewrite:` keys (e.g. `max_sample_age: 1h`), comma-separated.
    pub fn destination(&self, extra: &str) -> String {
        if extra.is_empty() {
            format!("{{ prometheusremotewrite: {{ endpoint: \"{}\" }} }}", self.write_url())
        } else {
            format!("{{ prometheusremotewrite: {{ endpoint: \"{}\", {extra} }} }}", self.write_url())
        }
    }

    /// Path of the server's log (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("prometheus.log")
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn get_status(&self, path: &str) -> Option<u16> {
        let url = format!("{}://{}{path}", self.scheme, self.addr);
        self.runtime.block_on(async { self.client.get(url).send().await.ok().map(|r| r.status().as_u16()) })
    }

    /// GET `path_and_query`; the status and body text.
    pub fn get(&self, path_and_query: &str) -> (u16, String) {
        let url = format!("{}://{}{path_and_query}", self.scheme, self.addr);
        self.runtime.block_on(async {
            let response = self.client.get(&url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        })
    }

    /// GET an API path with query parameters; the `data` member of a `success` answer.
    fn api(&self, path: &str, params: &[(&str, String)]) -> serde_json::Value {
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
        let path_and_query = format!("{path}?{}", query.join("&"));
        let (status, body) = self.get(&path_and_query);
        let json: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path_and_query}: {status} {e}: {body}"));
        assert!(status == 200 && json["status"] == "success", "{path_and_query}: {status} {body}");
        json["data"].clone()
    }

    /// Instant query evaluated now: the result vector (`[]` when nothing matches).
    pub fn query(&self, promql: &str) -> Vec<Sample> {
        self.query_at(promql, now_secs())
    }

    /// Instant query evaluated at `time` (Unix seconds).
    pub fn query_at(&self, promql: &str, time: f64) -> Vec<Sample> {
        let data = self.api("/api/v1/query", &[("query", promql.to_owned()), ("time", format!("{time:.3}"))]);
        match data["resultType"].as_str() {
            Some("vector") => data["result"].as_array().unwrap().iter().map(parse_sample).collect(),
            Some("scalar") => {
                vec![Sample {
                    metric: Labels::new(),
                    timestamp: value_time(&data["result"]),
                    value: value_of(&data["result"]),
                }]
            }
            other => panic!("{promql}: unexpected result type {other:?}: {data}"),
        }
    }

    /// The value of an instant query with a single result (`sum(...)` and the like), or None
    /// when nothing matches; panics on more than one element.
    pub fn value(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql);
        assert!(result.len() <= 1, "{promql}: {} elements, expected one: {result:?}", result.len());
        result.first().map(|s| s.value)
    }

    /// Instant query whose elements are told apart by `label`: label value -> sample value.
    pub fn by_label(&self, promql: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for sample in self.query(promql) {
            let key = sample.metric.get(label).cloned().unwrap_or_default();
            assert!(out.insert(key.clone(), sample.value).is_none(), "{promql}: two elements with {label}={key:?}");
        }
        out
    }

    /// `/api/v1/query_exemplars` between `start` and `end` (Unix seconds), flattened.
    pub fn exemplars(&self, query: &str, start: f64, end: f64) -> Vec<StoredExemplar> {
        let data = self.api(
            "/api/v1/query_exemplars",
            &[("query", query.to_owned()), ("start", format!("{start:.3}")), ("end", format!("{end:.3}"))],
        );
        let mut out = Vec::new();
        for series in data.as_array().unwrap_or(&Vec::new()) {
            let series_labels = labels_of(&series["seriesLabels"]);
            for exemplar in series["exemplars"].as_array().unwrap_or(&Vec::new()) {
                out.push(StoredExemplar {
                    series: series_labels.clone(),
                    labels: labels_of(&exemplar["labels"]),
                    value: parse_float(exemplar["value"].as_str().unwrap_or_default()),
                    timestamp: exemplar["timestamp"].as_f64().unwrap_or_default(),
                });
            }
        }
        out
    }

    /// The server's own metric `name` from `/metrics`, summed over the lines whose labels
    /// include every pair of `labels` (0 when none matches).
    pub fn self_metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        let mut total = 0.0;
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                continue;
            }
            let pairs: Vec<String> = label_text.split(',').map(str::to_owned).collect();
            if labels.iter().all(|(k, v)| pairs.contains(&format!("{k}=\"{v}\""))) {
                total += parse_float(value);
            }
        }
        total
    }

    /// Write requests answered so far with `code` (e.g. "204", "400", "500").
    pub fn write_requests(&self, code: &str) -> u64 {
        self.self_metric("prometheus_http_requests_total", &[("handler", "/api/v1/write"), ("code", code)]) as u64
    }

    /// Write requests answered so far, by status code.
    pub fn write_requests_by_code(&self) -> BTreeMap<String, u64> {
        let (_, body) = self.get("/metrics");
        let mut out = BTreeMap::new();
        for line in body.lines().filter(|l| l.starts_with("prometheus_http_requests_total{")) {
            if !line.contains("handler=\"/api/v1/write\"") {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let code = series.split("code=\"").nth(1).and_then(|rest| rest.split('"').next()).unwrap_or("?");
            *out.entry(code.to_owned()).or_default() += parse_float(value) as u64;
        }
        out
    }

    /// Every write request answered so far, whatever the status.
    pub fn write_requests_total(&self) -> u64 {
        self.write_requests_by_code().values().sum()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `prometheus` with its data and config in `dir`, appending to `dir/prometheus.log`.
fn spawn_child(dir: &std::path::Path, addr: SocketAddr) -> Child {
    let binary = std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into());
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("prometheus.log")).unwrap();
    Command::new(&binary)
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={addr}"))
        .arg(format!("--web.config.file={}", dir.join("web.yml").display()))
        .arg("--web.enable-remote-write-receiver")
        .arg("--enable-feature=exemplar-storage")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary} (apt-get install prometheus): {e}"))
}

fn labels_of(value: &serde_json::Value) -> Labels {
    value
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect())
        .unwrap_or_default()
}

/// Prometheus's float text: decimal, `+Inf`, `-Inf`, `NaN`.
pub fn parse_float(text: &str) -> f64 {
    match text {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        other => other.parse().unwrap_or_else(|e| panic!("not a float {other:?}: {e}")),
    }
}

fn value_of(pair: &serde_json::Value) -> f64 {
    parse_float(pair[1].as_str().unwrap_or_default())
}

fn value_time(pair: &serde_json::Value) -> f64 {
    pair[0].as_f64().unwrap_or_default()
}

fn parse_sample(element: &serde_json::Value) -> Sample {
    Sample {
        metric: labels_of(&element["metric"]),
        timestamp: value_time(&element["value"]),
        value: value_of(&element["value"]),
    }
}

/// Percent-encodes a query parameter value.
fn encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
