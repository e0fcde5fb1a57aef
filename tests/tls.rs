//! TLS on the receivers: certificates made here (rcgen), tailgate serving OTLP/gRPC and OTLP/HTTP
//! over TLS; plain-text clients and, under mutual TLS, clients without a certificate are refused
//! in the handshake, while TLS clients are served and their spans delivered.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::path::Path;
use std::time::Duration;

use common::pki::{Pki, pki};
use common::*;
use prost::Message;

fn tls_settings(dir: &Path, mutual: bool) -> String {
    let ca = if mutual { format!(", client_ca_file: \"{}\"", dir.join("ca.pem").display()) } else { String::new() };
    format!(
        ", tls: {{ cert_file: \"{}\", key_file: \"{}\"{ca} }}",
        dir.join("server.pem").display(),
        dir.join("server.key").display()
    )
}

/// A client trusting only the test CA, with the client certificate when `identity` is given.
fn client(pki: &Pki, identity: bool, h2: bool) -> reqwest::Client {
    let mut builder = http_client()
        .tls_certs_only([reqwest::Certificate::from_pem(pki.ca.as_bytes()).unwrap()])
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10));
    if identity {
        builder = builder.identity(reqwest::Identity::from_pem(pki.client.as_bytes()).unwrap());
    }
    if h2 {
        builder = builder.http2_prior_knowledge();
    }
    builder.build().unwrap()
}

async fn post_http(client: &reqwest::Client, url: &str, n: u32) -> Result<u16, reqwest::Error> {
    let body = trace_request("checkout", TestTrace::new(n, Outcome::Error, 1).spans).encode_to_vec();
    let response = client.post(url).header("content-type", "application/x-protobuf").body(body).send().await?;
    Ok(response.status().as_u16())
}

/// One OTLP/gRPC export as a raw frame over HTTP/2: the grpc-status.
async fn post_grpc(client: &reqwest::Client, base: &str, n: u32) -> Result<String, reqwest::Error> {
    let payload = trace_request("checkout", TestTrace::new(n, Outcome::Error, 1).spans).encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    let response = client
        .post(format!("{base}/opentelemetry.proto.collector.trace.v1.TraceService/Export"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(frame)
        .send()
        .await?;
    let status = response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
    // A successful answer carries its status in the trailers.
    let _ = response.bytes().await?;
    Ok(status.unwrap_or_else(|| "0".into()))
}

fn start(dir: &Path, mutual: bool) -> (tokio::runtime::Runtime, Backend, Tailgate) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let settings = tls_settings(dir, mutual);
    let timing = Timing { grpc_extra: settings.clone(), http_extra: settings, ..Timing::default() };
    let tailgate = Tailgate::start(backend_addr, &timing);
    (runtime, backend, tailgate)
}

#[test]
fn receivers_over_tls_serve_tls_clients_and_refuse_plain_text() {
    let certs = tempfile::tempdir().unwrap();
    let pki = pki(certs.path());
    let (runtime, backend, tailgate) = start(certs.path(), false);
    let receive = tailgate.stage_pid("receive").unwrap();
    runtime.block_on(async {
        let http_url = format!("https://127.0.0.1:{}/v1/traces", tailgate.http.port());
        assert_eq!(post_http(&client(&pki, false, false), &http_url, 1).await.unwrap(), 200);
        let grpc_base = format!("https://127.0.0.1:{}", tailgate.grpc.port());
        assert_eq!(post_grpc(&client(&pki, false, true), &grpc_base, 2).await.unwrap(), "0");
        // Plain text to a TLS port gets no answer.
        let plain = http_client().timeout(Duration::from_secs(5)).build().unwrap();
        assert!(post_http(&plain, &format!("http://{}/v1/traces", tailgate.http), 3).await.is_err());
        let plain_h2 = http_client().http2_prior_knowledge().timeout(Duration::from_secs(5)).build().unwrap();
        assert!(post_grpc(&plain_h2, &format!("http://{}", tailgate.grpc), 4).await.is_err());
        // The listeners keep serving.
        assert_eq!(post_http(&client(&pki, false, false), &http_url, 5).await.unwrap(), 200);
    });
    assert_eq!(tailgate.stage_pid("receive"), Some(receive), "receive restarted");
    let delivered: Vec<TestTrace> = [1, 2, 5].iter().map(|n| TestTrace::new(*n, Outcome::Error, 1)).collect();
    assert_exact_delivery(&backend, &delivered, Duration::from_secs(1), false);
}

#[test]
fn mutual_tls_refuses_clients_without_a_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let pki = pki(certs.path());
    let (runtime, backend, tailgate) = start(certs.path(), true);
    // The start-up probes (plain TCP connects) already failed handshakes: count from after them.
    assert!(wait_until(Duration::from_secs(10), || handshake_failures(&tailgate) >= 1.0));
    std::thread::sleep(Duration::from_millis(1500));
    let before = handshake_failures(&tailgate);
    runtime.block_on(async {
        let http_url = format!("https://127.0.0.1:{}/v1/traces", tailgate.http.port());
        let grpc_base = format!("https://127.0.0.1:{}", tailgate.grpc.port());
        assert!(post_http(&client(&pki, false, false), &http_url, 10).await.is_err(), "HTTP without a certificate");
        assert!(post_grpc(&client(&pki, false, true), &grpc_base, 11).await.is_err(), "gRPC without a certificate");
        assert_eq!(post_http(&client(&pki, true, false), &http_url, 12).await.unwrap(), 200);
        assert_eq!(post_grpc(&client(&pki, true, true), &grpc_base, 13).await.unwrap(), "0");
    });
    let delivered: Vec<TestTrace> = [12, 13].iter().map(|n| TestTrace::new(*n, Outcome::Error, 1)).collect();
    assert_exact_delivery(&backend, &delivered, Duration::from_secs(1), false);
    let refused = wait_until(Duration::from_secs(10), || handshake_failures(&tailgate) >= before + 2.0);
    assert!(refused, "refused handshakes are counted: {before} -> {}", handshake_failures(&tailgate));
}

fn handshake_failures(tailgate: &Tailgate) -> f64 {
    let metrics = http_get(tailgate.telemetry, "/metrics").1;
    let series = "tailgate_errors_total{stage=\"receive\",kind=\"tls_handshake\"} ";
    metrics.lines().find_map(|line| line.strip_prefix(series)?.parse().ok()).unwrap_or(0.0)
}

/// The OTLP exporter to a backend that serves TLS and requires a client certificate: with the
/// configured CA and client certificate the kept traces arrive over TLS.
#[test]
fn the_otlp_exporter_delivers_to_a_mutual_tls_backend() {
    let certs = tempfile::tempdir().unwrap();
    let pki = pki(certs.path());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server_cert = std::fs::read_to_string(certs.path().join("server.pem")).unwrap();
    let server_key = std::fs::read_to_string(certs.path().join("server.key")).unwrap();
    let (backend, backend_addr) = Backend::serve_tls(&runtime, (&server_cert, &server_key), Some(&pki.ca));
    let tls = format!(
        r#", tls: {{ ca_file: "{}", cert_file: "{}", key_file: "{}" }}"#,
        certs.path().join("ca.pem").display(),
        certs.path().join("client.pem").display(),
        certs.path().join("client.key").display()
    );
    // The helper writes http://{backend}; the TLS destination needs https://.
    let endpoint = format!("https://127.0.0.1:{}", backend_addr.port());
    let destination = format!("{{ otlp: {{ endpoint: \"{endpoint}\", timeout: 10s{tls} }} }}");
    let timing = Timing {
        traces_destination: Some(destination.clone()),
        logs_destination: Some(destination.clone()),
        metrics_destination: Some(destination),
        ..Timing::default()
    };
    let tailgate = Tailgate::start(backend_addr, &timing);
    let traces = mixed_traces(20);
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::from_millis(100), |_| {}));
    assert_exact_delivery(&backend, &traces, Duration::from_secs(1), false);
}

/// Receivers with `auth: { bearer_token_file }`: a client without the token, or with another,
/// is refused (UNAUTHENTICATED / 401 with `WWW-Authenticate`) and counted; one with it is
/// served. Neither the receivers' token nor an exporter's appears in the log.
#[test]
fn receivers_with_a_bearer_token_refuse_other_clients_and_never_log_it() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    let secrets = tempfile::tempdir().unwrap();
    let token = "s3cr3t-receiver-token-7f1c";
    let loki_token = "s3cr3t-loki-token-91ab";
    std::fs::write(secrets.path().join("token"), format!("{token}\n")).unwrap();
    std::fs::write(secrets.path().join("loki-token"), loki_token).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let sink = common::loki::LokiSink::serve(&runtime);
    let auth = format!(", auth: {{ bearer_token_file: \"{}\" }}", secrets.path().join("token").display());
    let loki_auth = format!("auth: {{ bearer_token_file: \"{}\" }}", secrets.path().join("loki-token").display());
    let timing = Timing {
        grpc_extra: auth.clone(),
        http_extra: auth,
        logs_destination: Some(sink.destination(&loki_auth)),
        ..Timing::default()
    };
    let tailgate = Tailgate::start(backend_addr, &timing);
    runtime.block_on(async {
        let url = format!("http://{}/v1/traces", tailgate.http);
        let body = trace_request("checkout", TestTrace::new(20, Outcome::Error, 1).spans).encode_to_vec();
        let http = http_client().build().unwrap();
        for presented in [None, Some("Bearer wrong"), Some("Basic czNjcjN0")] {
            let mut request = http.post(&url).header("content-type", "application/x-protobuf").body(body.clone());
            if let Some(value) = presented {
                request = request.header("authorization", value);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{presented:?}");
            assert_eq!(response.headers().get("www-authenticate").unwrap(), "Bearer");
        }
        let response = http
            .post(&url)
            .header("content-type", "application/x-protobuf")
            .header("authorization", format!("Bearer {token}"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);

        let mut client = TraceServiceClient::connect(format!("http://{}", tailgate.grpc)).await.unwrap();
        let refused = client.export(trace_request("checkout", TestTrace::new(21, Outcome::Error, 1).spans)).await;
        assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
        let mut request = tonic::Request::new(trace_request("checkout", TestTrace::new(21, Outcome::Error, 1).spans));
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        client.export(request).await.unwrap();
    });
    let delivered: Vec<TestTrace> = [20, 21].iter().map(|n| TestTrace::new(*n, Outcome::Error, 1)).collect();
    assert_exact_delivery(&backend, &delivered, Duration::from_secs(1), false);
    let counted = wait_until(Duration::from_secs(10), || {
        http_get(tailgate.telemetry, "/metrics")
            .1
            .contains("tailgate_errors_total{stage=\"receive\",kind=\"unauthenticated\"} 4")
    });
    assert!(counted, "refusals counted:\n{}", http_get(tailgate.telemetry, "/metrics").1);
    let log = std::fs::read_to_string(tailgate.dir.path().join("tailgate.log")).unwrap();
    assert!(!log.is_empty());
    for secret in [token, loki_token] {
        assert!(!log.contains(secret), "a secret appears in the log");
    }
}
