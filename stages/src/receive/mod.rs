//! receive: OTLP over gRPC (tonic) and HTTP (axum) into the `spans`, `logs` and `metrics`
//! edges. A client is answered only after its data is committed to the queue; when the queue is
//! at its budget the answer is a retryable refusal (RESOURCE_EXHAUSTED with RetryInfo / HTTP 503
//! with Retry-After), never a silent drop.

pub mod filelog;
pub mod grpc;
pub mod http;
pub mod intake;
pub mod tls;

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use crate::context::{StageContext, StageError};
use intake::Intake;

const MIB: usize = 1024 * 1024;
/// The largest HTTP/2 frame the gRPC server accepts (SETTINGS_MAX_FRAME_SIZE; HTTP/2 default
/// 16 KiB): clients send a request body in fewer, larger DATA frames.
const MAX_FRAME_BYTES: u32 = 256 * 1024;

/// Runs the receive stage until shutdown: stops accepting and finishes in-flight requests (each
/// answered after its commit).
pub async fn run(ctx: StageContext) -> Result<(), StageError> {
    // OTLP log records are judged on the same duration fields as file lines.
    let durations = match &ctx.config.receivers.filelog {
        Some(filelog) => filelog.fields.duration.clone(),
        None => tailgate_config::FieldAliases::default().duration,
    };
    let durations = durations.iter().map(|field| (field.name.clone(), field.unit.nanos())).collect();
    let (mut intake, mut failures) = Intake::new(
        ctx.queue.clone(),
        ctx.waker.clone(),
        ctx.events.clone(),
        durations,
        ctx.config.queue.write_timeout,
    )?;
    intake.pause_with(ctx.heartbeat.clone());
    let limits = ctx.config.receivers.otlp.as_ref().map(|otlp| otlp.limits.clone()).unwrap_or_default();
    let intake = intake.with_limits(crate::otlp_wire::Limits::from_config(&limits));
    let protocols = ctx.config.receivers.otlp.as_ref().map(|otlp| otlp.protocols.clone());
    let (grpc, http) = protocols.map(|p| (p.grpc, p.http)).unwrap_or_default();
    let mut servers = tokio::task::JoinSet::new();
    if let Some(grpc) = grpc {
        let listener = bind(&grpc.endpoint).await?;
        let max = grpc.max_recv_msg_size_mib as usize * MIB;
        let mut shutdown = ctx.shutdown.clone();
        let expected = expected_authorization(grpc.auth.as_ref())?;
        let router = tonic::transport::Server::builder()
            .max_frame_size(Some(MAX_FRAME_BYTES))
            .add_service(
                grpc::OtlpGrpcService::<grpc::Traces>::new(intake.clone(), max).with_authorization(expected.clone()),
            )
            .add_service(
                grpc::OtlpGrpcService::<grpc::Logs>::new(intake.clone(), max).with_authorization(expected.clone()),
            )
            .add_service(grpc::OtlpGrpcService::<grpc::Metrics>::new(intake.clone(), max).with_authorization(expected));
        let tls = grpc.tls.as_ref().map(|tls| tls::server_config(tls, &[b"h2"])).transpose()?;
        tracing::info!(endpoint = %grpc.endpoint, tls = tls.is_some(), "otlp grpc receiver listening");
        let stop = async move {
            let _closed = shutdown.wait_for(|stop| *stop).await;
        };
        match tls {
            Some(config) => {
                let connections = tls::accept(listener, config, ctx.events.clone());
                let incoming = tokio_stream::wrappers::ReceiverStream::new(connections)
                    .map(|(connection, _)| Ok::<_, std::io::Error>(connection));
                servers.spawn(async move {
                    router
                        .serve_with_incoming_shutdown(incoming, stop)
                        .await
                        .map_err(|err| StageError::Other(format!("grpc server: {err}")))
                });
            }
            None => {
                servers.spawn(async move {
                    // Without TCP_NODELAY, small response frames wait on the client's delayed ACK.
                    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                    router
                        .serve_with_incoming_shutdown(incoming, stop)
                        .await
                        .map_err(|err| StageError::Other(format!("grpc server: {err}")))
                });
            }
        }
    }
    if let Some(http) = http {
        let listener = bind(&http.endpoint).await?;
        let expected = expected_authorization(http.auth.as_ref())?;
        let app = http::router(intake.clone(), http.max_request_body_size_mib as usize * MIB, expected);
        let mut shutdown = ctx.shutdown.clone();
        let stop = async move {
            let _closed = shutdown.wait_for(|stop| *stop).await;
        };
        let tls = http.tls.as_ref().map(|tls| tls::server_config(tls, &[b"h2", b"http/1.1"])).transpose()?;
        tracing::info!(endpoint = %http.endpoint, tls = tls.is_some(), "otlp http receiver listening");
        match tls {
            Some(config) => {
                let local = listener.local_addr()?;
                let listener = tls::TlsListener::new(tls::accept(listener, config, ctx.events.clone()), local);
                servers.spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stop)
                        .await
                        .map_err(|err| StageError::Other(format!("http server: {err}")))
                });
            }
            None => {
                let listener = axum::serve::ListenerExt::tap_io(listener, |stream: &mut tokio::net::TcpStream| {
                    if let Err(err) = stream.set_nodelay(true) {
                        tracing::debug!(error = %err, "cannot set TCP_NODELAY");
                    }
                });
                servers.spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stop)
                        .await
                        .map_err(|err| StageError::Other(format!("http server: {err}")))
                });
            }
        }
    }
    if let Some(filelog) = ctx.config.receivers.filelog.clone() {
        let tailer = filelog::Tailer::open(filelog, ctx.queue.clone(), ctx.waker.clone(), ctx.events.clone())?;
        let shutdown = ctx.shutdown.clone();
        let slot = ctx.heartbeat.clone();
        // A thread of its own: reading files blocks, and receive's runtime has one thread.
        servers.spawn_blocking(move || tailer.run(shutdown, &slot));
    }
    // The first heartbeat says "ready": only once every listener is bound (a receive that
    // cannot bind its port must never look up, not even for a moment; the supervisor's READY
    // waits for all five stages' first stamps).
    let _heartbeat = ctx.beat_while_runtime_runs();
    drop(intake);
    // Any server ending (shutdown or failure) or a queue failure ends the stage; a failure
    // exits non-zero and the supervisor restarts the process.
    let mut outcome = Ok(());
    loop {
        tokio::select! {
            joined = servers.join_next() => {
                let Some(joined) = joined else { break };
                let result = joined.map_err(|err| StageError::Other(format!("server task: {err}"))).and_then(|r| r);
                if let Err(err) = result {
                    outcome = Err(err);
                    break;
                }
            }
            Some(err) = failures.recv() => {
                outcome = Err(StageError::Queue(err));
                break;
            }
        }
    }
    servers.abort_all();
    while servers.join_next().await.is_some() {}
    ctx.events.log_summary();
    outcome
}

/// The `Authorization` value a receiver with `auth` requires (its secret read now, once).
fn expected_authorization(auth: Option<&tailgate_config::HttpAuth>) -> Result<Option<std::sync::Arc<str>>, StageError> {
    auth.map(|auth| crate::credentials::authorization(auth).map(std::sync::Arc::from).map_err(StageError::Other))
        .transpose()
}

async fn bind(endpoint: &str) -> Result<TcpListener, StageError> {
    let addr: SocketAddr =
        endpoint.parse().map_err(|err| StageError::Other(format!("bad listen address {endpoint}: {err}")))?;
    TcpListener::bind(addr).await.map_err(|err| StageError::Other(format!("cannot listen on {endpoint}: {err}")))
}
