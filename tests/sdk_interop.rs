//! Interop with a real OpenTelemetry SDK: the official Python SDK's OTLP exporters (gRPC and
//! HTTP/protobuf, installed from tests/sdk/requirements.txt by tests/run.sh) send traces with known
//! outcomes; exactly the error and slow traces arrive at the backend, each span once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

fn hex_bytes<const N: usize>(hex: &str) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).unwrap();
    }
    out
}

fn send_with_sdk(protocol: &str, endpoint: &str, count: u32) -> Vec<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/send_traces.py");
    // tests/run.sh prepares a virtualenv with the SDK and points this at it.
    let python = std::env::var("TAILGATE_SDK_PYTHON").unwrap_or_else(|_| "python3".into());
    let output = std::process::Command::new(python)
        .args([script, protocol, endpoint, &count.to_string()])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "SDK sender failed (run the tests with tests/run.sh, which installs tests/sdk/requirements.txt): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn check(protocol: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let endpoint = match protocol {
        "grpc" => format!("http://{}", tailgate.grpc),
        _ => format!("http://{}/v1/traces", tailgate.http),
    };
    let sent = send_with_sdk(protocol, &endpoint, 30);
    let mut kept = HashSet::new();
    let mut dropped = HashSet::new();
    for trace in &sent {
        let trace_id: [u8; 16] = hex_bytes(trace["trace_id"].as_str().unwrap());
        for span in trace["span_ids"].as_array().unwrap() {
            let key = (trace_id, hex_bytes::<8>(span.as_str().unwrap()));
            if trace["keep"].as_bool().unwrap() {
                kept.insert(key)
            } else {
                dropped.insert(key)
            };
        }
    }
    assert_eq!(kept.len(), 20 * 3);
    assert!(
        wait_until(Duration::from_secs(30), || kept.iter().all(|k| backend.spans().contains_key(k))),
        "kept spans missing"
    );
    std::thread::sleep(Duration::from_secs(2));
    let got = backend.spans();
    assert!(got.keys().all(|k| kept.contains(k)), "spans of dropped traces delivered");
    assert!(got.values().all(|(_, times)| *times == 1), "duplicates delivered");
    assert!(dropped.iter().all(|k| !got.contains_key(k)));
}

#[test]
fn python_sdk_over_grpc() {
    check("grpc");
}

#[test]
fn python_sdk_over_http_protobuf() {
    check("http");
}
