//! The field report's chaos drill, time-compressed: tailgate and the backend in two network
//! namespaces joined by a veth pair; the uplink is cut with `iptables` DROP on the backend's port
//! plus a conntrack flush, held, and restored, while traces keep coming in.
//!
//! Asserted: nothing accepted is lost and nothing is delivered twice (a retry must never queue
//! behind its own earlier copy on the dead connection), export resumes within seconds of the
//! restore, the queue's depth rises through the outage and stays within what is undelivered,
//! export's private memory stays flat, and the backlog drains.
//!
//! Needs root (namespaces, iptables), as CI runs it; only addresses inside the namespaces this
//! test creates are used.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;

/// Two namespaces and the veth pair between them; removed on drop.
struct Link {
    tailgate_ns: String,
    backend_ns: String,
    backend_ip: String,
    /// tailgate's end of the veth pair.
    tailgate_dev: String,
}

fn run(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(status.success(), "{args:?} failed (the drill needs root, iproute2, iptables and conntrack)");
}

impl Link {
    fn create() -> Link {
        let id = std::process::id();
        let (a, b) = (format!("tg-drill-a-{id}"), format!("tg-drill-b-{id}"));
        let (va, vb) = (format!("tgva{}", id % 100_000), format!("tgvb{}", id % 100_000));
        let net = format!("10.{}.{}", 200 + id % 50, (id / 50) % 250);
        let link = Link {
            tailgate_ns: a.clone(),
            backend_ns: b.clone(),
            backend_ip: format!("{net}.2"),
            tailgate_dev: va.clone(),
        };
        run(&["ip", "netns", "add", &a]);
        run(&["ip", "netns", "add", &b]);
        run(&["ip", "link", "add", &va, "type", "veth", "peer", "name", &vb]);
        run(&["ip", "link", "set", &va, "netns", &a]);
        run(&["ip", "link", "set", &vb, "netns", &b]);
        for (ns, dev, ip) in [(&a, &va, format!("{net}.1/30")), (&b, &vb, format!("{net}.2/30"))] {
            run(&["ip", "-n", ns, "addr", "add", &ip, "dev", dev]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        link
    }

    /// Cuts the uplink the way the field report did: DROP on the backend's port (both ways) and
    /// a conntrack flush on both sides.
    fn cut(&self, port: u16) {
        self.drop_rules("-I", port);
        for ns in [&self.tailgate_ns, &self.backend_ns] {
            let _ = Command::new("ip").args(["netns", "exec", ns, "conntrack", "-F"]).output();
        }
    }

    /// Inserts (`-I`) or deletes (`-D`) the DROP rules of the backend's port.
    fn drop_rules(&self, action: &str, port: u16) {
        let port = port.to_string();
        for (chain, side) in [("INPUT", "--dport"), ("OUTPUT", "--sport")] {
            let rule = ["-p", "tcp", side, port.as_str(), "-j", "DROP"];
            let mut args = vec!["ip", "netns", "exec", self.backend_ns.as_str(), "iptables", action, chain];
            args.extend(rule);
            run(&args);
        }
    }

    /// Serves the test backend inside the backend's namespace (its listener lives there).
    fn serve_backend(&self, runtime: &tokio::runtime::Runtime) -> (Backend, std::net::SocketAddr) {
        let at: std::net::SocketAddr = format!("{}:0", self.backend_ip).parse().unwrap();
        in_netns(&self.backend_ns, || Backend::serve_at(runtime, at))
    }

    /// Limits tailgate's uplink to `rate` (tc token bucket, e.g. `1mbit`).
    fn throttle(&self, rate: &str) {
        run(&[
            "ip",
            "netns",
            "exec",
            &self.tailgate_ns,
            "tc",
            "qdisc",
            "add",
            "dev",
            &self.tailgate_dev,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "32kbit",
            "latency",
            "400ms",
        ]);
    }

    fn restore(&self, port: u16) {
        self.drop_rules("-D", port);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and with it the peer.
        for ns in [&self.tailgate_ns, &self.backend_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Depth (items) of an edge as `tailgate status` prints it.
fn edge_items(status: &str, edge: &str) -> u64 {
    status
        .lines()
        .find(|line| line.split_whitespace().next() == Some(edge))
        .and_then(|line| line.split_whitespace().nth(2))
        .and_then(|items| items.parse().ok())
        .unwrap_or_else(|| panic!("no {edge} line in status:\n{status}"))
}

/// Private (anonymous resident) memory of a process, KiB.
fn rss_anon_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

const SPANS_PER_TRACE: u64 = 5;
const TRACES_PER_SECOND: u64 = 100;

#[test]
fn uplink_cut_and_restored_loses_and_duplicates_nothing() {
    let link = Link::create();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = link.serve_backend(&runtime);
    let timing = Timing {
        decision_wait: "2s",
        root_grace: "1s",
        log_max_wait: "4s",
        netns: Some(link.tailgate_ns.clone()),
        otlp_extra: ", timeout: 3s, keepalive: { time: 2s, timeout: 2s }",
        ..Timing::default()
    };
    let tailgate = Tailgate::start(backend_addr, &timing);
    let export_pid = tailgate.stage_pid("export").expect("export runs");

    // Error traces (all kept) at a steady rate from a client inside tailgate's namespace.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (ns, grpc, stop) = (link.tailgate_ns.clone(), tailgate.grpc, stop.clone());
        std::thread::spawn(move || {
            enter_netns(&ns);
            let client_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            client_rt.block_on(async move {
                let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
                let mut accepted = Vec::new();
                let start = Instant::now();
                // Bounded: at most 60 s of load, whatever the main thread does.
                for n in 0..(60 * TRACES_PER_SECOND as u32) {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let trace = TestTrace::new(n, Outcome::Error, SPANS_PER_TRACE as u32 - 1);
                    if client.export(trace_request("drill", trace.spans.clone())).await.is_ok() {
                        accepted.push(trace);
                    }
                    let due = start + Duration::from_millis(u64::from(n + 1) * 1000 / TRACES_PER_SECOND);
                    tokio::time::sleep_until(due.into()).await;
                }
                accepted
            })
        })
    };
    let sent_since = Instant::now();
    let spans_sent = |at: Instant| (at - sent_since).as_secs_f64() * (TRACES_PER_SECOND * SPANS_PER_TRACE) as f64;

    // Healthy for a while, then the cut.
    assert!(wait_until(Duration::from_secs(15), || backend.spans().len() > 500), "no delivery before the cut");
    std::thread::sleep(Duration::from_secs(2));
    link.cut(backend_addr.port());
    let cut_at = Instant::now();
    let delivered_at_cut = backend.spans().len() as u64;

    // Hold the outage; sample depth and memory each second.
    let mut samples = Vec::new();
    let mut memory = Vec::new();
    while cut_at.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_secs(1));
        let status = tailgate.status();
        let kept = edge_items(&status, "kept_spans");
        let delivered = backend.spans().len() as u64;
        let undelivered = (spans_sent(Instant::now()) as u64).saturating_sub(delivered);
        samples.push((kept, undelivered, delivered));
        memory.push(rss_anon_kib(export_pid));
    }
    link.restore(backend_addr.port());
    let restored_at = Instant::now();

    // Load for a few more seconds, then stop it and wait for the drain.
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::SeqCst);
    let accepted = load.join().unwrap();
    let expected: HashSet<([u8; 16], [u8; 8])> = accepted
        .iter()
        .flat_map(|t| t.spans.iter())
        .map(|s| (s.trace_id.as_slice().try_into().unwrap(), s.span_id.as_slice().try_into().unwrap()))
        .collect();
    let drained = wait_until(Duration::from_secs(60), || {
        let got = backend.spans();
        expected.iter().all(|key| got.contains_key(key))
    });
    memory.push(rss_anon_kib(export_pid));
    // Long enough for a stale copy still queued on a dead connection to show up.
    std::thread::sleep(Duration::from_secs(3));

    let got = backend.spans();
    let missing = expected.iter().filter(|key| !got.contains_key(*key)).count();
    let duplicated: Vec<_> =
        got.iter().filter(|(_, (_, times))| *times > 1).map(|(key, (_, times))| (*key, *times)).collect();
    let log = std::fs::read_to_string(tailgate.dir.path().join("tailgate.log")).unwrap_or_default();
    assert!(drained && missing == 0, "{missing} of {} accepted spans not delivered\n{log}", expected.len());
    assert!(
        duplicated.is_empty(),
        "{} spans delivered more than once, e.g. {:?}",
        duplicated.len(),
        &duplicated[..duplicated.len().min(3)]
    );
    assert_eq!(got.len(), expected.len(), "spans delivered that were never accepted");

    // Nothing got through during the outage; export resumed within seconds of the restore.
    let arrivals = backend.received.lock().unwrap().trace_arrivals.clone();
    let first_after = arrivals.iter().find(|at| **at > restored_at).expect("deliveries after the restore");
    let resumed_in = *first_after - restored_at;
    assert!(resumed_in < Duration::from_secs(8), "export resumed {resumed_in:?} after the link returned");
    let during: Vec<_> =
        arrivals.iter().filter(|at| **at > cut_at + Duration::from_secs(1) && **at < restored_at).collect();
    assert!(during.is_empty(), "{} requests arrived through a cut link", during.len());

    // Depth rose through the outage and never claimed more than what was undelivered.
    let depths: Vec<u64> = samples.iter().map(|(kept, _, _)| *kept).collect();
    assert!(depths.windows(2).all(|w| w[1] >= w[0]), "kept_spans depth fell during the outage: {depths:?}");
    assert!(depths.last().unwrap() > &(depths[0] + 3_000), "depth did not rise with the backlog: {depths:?}");
    for (kept, undelivered, delivered) in &samples {
        assert!(*delivered <= delivered_at_cut + 1_000, "deliveries continued through the cut: {samples:?}");
        // What is not in kept_spans yet is still in tail_sample's decision window (2 s + grace).
        let window = 4 * TRACES_PER_SECOND * SPANS_PER_TRACE;
        assert!(
            kept <= &(undelivered + 500) && undelivered - kept.min(undelivered) <= window,
            "depth {kept} vs undelivered {undelivered}: {samples:?}"
        );
    }
    // Private memory of export stayed flat through the outage and the drain.
    let baseline = memory[0].max(1);
    let peak = *memory.iter().max().unwrap();
    assert!(peak <= 2 * baseline + 4096, "export's private memory grew from {baseline} KiB to {peak} KiB: {memory:?}");
    let status = tailgate.status();
    assert_eq!(edge_items(&status, "kept_spans"), 0, "backlog left after the drain:\n{status}");
}

/// A 1 Mbit/s uplink and requests of about 1.5 MiB (12 s on the wire each): the deadline grows
/// with the request (`timeout: 3s` + `timeout_per_mib`), so every request finishes on its first
/// attempt instead of timing out and going out again for ever.
#[test]
fn a_slow_uplink_delivers_large_requests_once() {
    let link = Link::create();
    link.throttle("1mbit");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = link.serve_backend(&runtime);
    let timing = Timing {
        decision_wait: "2s",
        root_grace: "1s",
        batch_timeout: "1s",
        netns: Some(link.tailgate_ns.clone()),
        otlp_extra: ", timeout: 3s, timeout_per_mib: 10s",
        ..Timing::default()
    };
    let tailgate = Tailgate::start(backend_addr, &timing);
    // 100 error traces of 5 spans with 3 KiB of attributes: about 1.5 MiB of spans.
    let traces: Vec<TestTrace> = (0..100)
        .map(|n| {
            let mut trace = TestTrace::new(n, Outcome::Error, 4);
            for span in &mut trace.spans {
                span.attributes.push(string_kv("payload", &format!("{n:04}").repeat(768)));
            }
            trace
        })
        .collect();
    let grpc = tailgate.grpc;
    in_netns(&link.tailgate_ns, || {
        let client_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        client_rt.block_on(async {
            let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
            for chunk in traces.chunks(10) {
                let spans = chunk.iter().flat_map(|t| t.spans.clone()).collect();
                client.export(trace_request("slow", spans)).await.unwrap();
            }
        })
    });
    let expected: HashSet<([u8; 16], [u8; 8])> = traces
        .iter()
        .flat_map(|t| t.spans.iter())
        .map(|s| (s.trace_id.as_slice().try_into().unwrap(), s.span_id.as_slice().try_into().unwrap()))
        .collect();
    let log_path = tailgate.dir.path().join("tailgate.log");
    let delivered = wait_until(Duration::from_secs(90), || {
        let got = backend.spans();
        expected.iter().all(|key| got.contains_key(key))
    });
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(delivered, "not delivered over the slow link\n{log}");
    assert!(!log.contains("DeadlineExceeded"), "a request timed out on the slow link\n{log}");
    let got = backend.spans();
    assert!(got.values().all(|(_, times)| *times == 1), "a span was delivered twice");
    let largest = backend.received.lock().unwrap().traces.iter().map(prost::Message::encoded_len).max().unwrap();
    assert!(largest > 1 << 20, "requests were small ({largest} bytes): the test did not test a slow request");
}
