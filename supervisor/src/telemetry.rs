//! Self-metrics over HTTP, served by the supervisor on `supervisor.telemetry.endpoint`
//! (loopback by default):
//!
//! - `/metrics`: OpenMetrics text (prometheus-client). Per stage: items received, sent,
//!   dropped by reason and errors by kind (published by each stage to its shared slot and
//!   summed over its processes, so they never go back at a restart), restarts by reason, up,
//!   private memory and budgets, heartbeat lateness, shed requests. Per queue edge: batches,
//!   items, bytes and the oldest batch's age; per consumer its backlog in batches; the queue's
//!   use, budget and intake state, and the free space of its filesystem. Log schema drift, by
//!   kind, summed over the tailed files.
//! - `/healthz`: 200 while the supervisor answers.
//! - `/readyz`: 200 when every stage has a running process whose heartbeat is on time and the
//!   queue admits intake; 503 with the reasons otherwise.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tailgate_ipc::{Edge, Queue};

use crate::report::StageStatus;

/// How long a scrape waits for the supervisor.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Takes a snapshot (the supervisor actor, in the running process).
pub type Source =
    std::sync::Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<Snapshot, String>> + Send>> + Send + Sync>;

/// One queue edge's depth.
#[derive(Debug, Clone, Default)]
pub struct EdgeSnapshot {
    edge: &'static str,
    batches: u64,
    items: u64,
    bytes: u64,
    oldest_age_seconds: f64,
}

/// What a scrape shows, taken by the supervisor actor.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    stages: Vec<StageStatus>,
    edges: Vec<EdgeSnapshot>,
    /// (consumer, batches it has not passed yet)
    consumers: Vec<(&'static str, u64)>,
    used_bytes: u64,
    capacity_bytes: u64,
    intake_open: bool,
    filesystem_free_bytes: Option<u64>,
    /// Why the pipeline is not ready (empty when it is).
    not_ready: Vec<String>,
    /// Latency thresholds an adaptive policy lifted, per route.
    route_thresholds: tailgate_ipc::decisions::RouteThresholds,
    /// Log lines that deviated from the expected schema, by kind, summed over the files.
    drift: std::collections::BTreeMap<String, u64>,
}

impl Snapshot {
    /// Reads the queue (one read transaction) and takes the stages' statuses.
    pub fn take(queue: &Queue, stages: Vec<StageStatus>) -> Snapshot {
        let mut snapshot = Snapshot { stages, ..Snapshot::default() };
        for stage in &snapshot.stages {
            if stage.state != "running" {
                snapshot.not_ready.push(format!("{} is {}", stage.stage, stage.state));
            } else if stage.heartbeat_overdue_ms.is_none_or(|ms| ms > 0) {
                snapshot.not_ready.push(format!("{} has not stamped its heartbeat in time", stage.stage));
            } else if !stage.started {
                snapshot.not_ready.push(format!("{} is starting", stage.stage));
            }
        }
        let mut read = || -> Result<(), tailgate_ipc::QueueError> {
            let txn = queue.read()?;
            let now = tailgate_ipc::clock::pipeline_now();
            for edge in Edge::ALL {
                let depth = queue.depth(&txn, edge)?;
                let oldest = queue.oldest_age_seconds(&txn, edge, now)?.unwrap_or(0.0);
                snapshot.edges.push(EdgeSnapshot {
                    edge: edge.as_str(),
                    batches: depth.batches,
                    items: depth.items,
                    bytes: depth.bytes,
                    oldest_age_seconds: oldest,
                });
                for consumer in queue.active_consumers(edge) {
                    let cursor = queue.cursor(&txn, consumer)?;
                    snapshot
                        .consumers
                        .push((consumer.as_str(), depth.next_seq.saturating_sub(1).saturating_sub(cursor)));
                }
            }
            snapshot.used_bytes = queue.used_bytes(&txn)?;
            snapshot.intake_open = queue.admits(&txn)?;
            snapshot.route_thresholds = queue.route_thresholds(&txn)?;
            for (_file, drift) in tailgate_stages::receive::filelog::stored_drift(queue, &txn)? {
                for (kind, values) in drift.counts {
                    *snapshot.drift.entry(kind).or_default() += values.values().sum::<u64>();
                }
            }
            Ok(())
        };
        if let Err(err) = read() {
            snapshot.not_ready.push(format!("queue unreadable: {err}"));
        }

        snapshot.capacity_bytes = queue.capacity_bytes();
        if !snapshot.intake_open {
            snapshot.not_ready.push("the queue is at its disk budget (intake refused)".to_string());
        }
        snapshot.filesystem_free_bytes = std::fs::File::open(queue.path().join("data.mdb"))
            .ok()
            .and_then(|file| rustix::fs::fstatvfs(&file).ok())
            .map(|st| st.f_bavail * st.f_frsize);
        snapshot
    }

    /// Whether every stage runs, is past its startup (it stamped from its work, not only the
    /// startup promise) and stamped its heartbeat in time.
    pub fn stages_ready(&self) -> bool {
        self.stages.len() == tailgate_ipc::StageId::ALL.len()
            && self
                .stages
                .iter()
                .all(|s| s.state == "running" && s.started && s.heartbeat_overdue_ms.is_some_and(|ms| ms == 0))
    }

    /// (stages running, stages).
    pub fn stages_up(&self) -> (usize, usize) {
        (self.stages.iter().filter(|s| s.state == "running").count(), self.stages.len())
    }

    /// (batches, bytes, age of the oldest batch in seconds) over every edge.
    pub fn backlog(&self) -> (u64, u64, f64) {
        self.edges.iter().fold((0, 0, 0.0), |(batches, bytes, oldest), edge| {
            (batches + edge.batches, bytes + edge.bytes, f64::max(oldest, edge.oldest_age_seconds))
        })
    }

    /// Whether receive admits data (the queue below its budget).
    pub fn intake_open(&self) -> bool {
        self.intake_open
    }

    /// Whether the queue could be read for this snapshot.
    pub fn queue_readable(&self) -> bool {
        !self.not_ready.iter().any(|reason| reason.starts_with("queue unreadable"))
    }

    /// The OpenMetrics text of the snapshot.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct StageLabel {
            stage: String,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct StageReason {
            stage: String,
            reason: String,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct StageKind {
            stage: String,
            kind: String,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Response {
            destination: String,
            code: String,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct EdgeLabel {
            edge: String,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct ConsumerLabel {
            consumer: String,
        }
        let mut registry = Registry::with_prefix("tailgate");
        let received = Family::<StageLabel, Counter>::default();
        let sent = Family::<StageLabel, Counter>::default();
        let dropped = Family::<StageReason, Counter>::default();
        let errors = Family::<StageKind, Counter>::default();
        let restarts = Family::<StageReason, Counter>::default();
        let responses = Family::<Response, Counter>::default();
        let shed = Family::<StageLabel, Counter>::default();
        let up = Family::<StageLabel, Gauge>::default();
        let private = Family::<StageLabel, Gauge>::default();
        let soft = Family::<StageLabel, Gauge>::default();
        let hard = Family::<StageLabel, Gauge>::default();
        let overdue = Family::<StageLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register("items_received", "Items a stage took in (from clients or its input edge)", received.clone());
        registry.register(
            "items_sent",
            "Items a stage handed on (output edge or acknowledged by a backend)",
            sent.clone(),
        );
        registry.register("items_dropped", "Items a stage deliberately did not hand on, by reason", dropped.clone());
        registry.register("errors", "Errors of a stage, by kind", errors.clone());
        registry.register("stage_restarts", "Stage restarts by reason", restarts.clone());
        registry.register(
            "exporter_responses",
            "Backend responses by destination and code (ok or a gRPC code, http_<status>, transport, connect)",
            responses.clone(),
        );
        registry.register("stage_shed_requests", "Times a stage was asked to shed memory", shed.clone());
        registry.register("stage_up", "Whether the stage has a running process", up.clone());
        registry.register("stage_private_memory_bytes", "Private (anonymous resident) memory", private.clone());
        registry.register("stage_memory_soft_budget_bytes", "Over this the stage is asked to shed", soft.clone());
        registry.register("stage_memory_hard_budget_bytes", "Over this the stage is restarted", hard.clone());
        registry.register("stage_heartbeat_overdue_seconds", "How late the stage's heartbeat is", overdue.clone());
        for stage in &self.stages {
            let label = StageLabel { stage: stage.stage.clone() };
            for (name, value) in &stage.counters {
                match name.split_once('/') {
                    None if name == "received" => {
                        received.get_or_create(&label).inc_by(*value);
                    }
                    None if name == "sent" => {
                        sent.get_or_create(&label).inc_by(*value);
                    }
                    Some(("dropped", reason)) => {
                        let key = StageReason { stage: stage.stage.clone(), reason: reason.to_string() };
                        dropped.get_or_create(&key).inc_by(*value);
                    }
                    Some(("response", rest)) => {
                        if let Some((destination, code)) = rest.split_once('/') {
                            let key = Response { destination: destination.to_string(), code: code.to_string() };
                            responses.get_or_create(&key).inc_by(*value);
                        }
                    }
                    Some(("error", kind)) => {
                        let key = StageKind { stage: stage.stage.clone(), kind: kind.to_string() };
                        errors.get_or_create(&key).inc_by(*value);
                    }
                    _ => {}
                }
            }
            for (reason, n) in &stage.restarts {
                restarts.get_or_create(&StageReason { stage: stage.stage.clone(), reason: reason.clone() }).inc_by(*n);
            }
            shed.get_or_create(&label).inc_by(stage.shed_requests);
            up.get_or_create(&label).set(i64::from(stage.state == "running"));
            private.get_or_create(&label).set(stage.private_bytes.unwrap_or(0) as i64);
            soft.get_or_create(&label).set(stage.memory_soft_budget_bytes as i64);
            hard.get_or_create(&label).set(stage.memory_hard_budget_bytes as i64);
            overdue.get_or_create(&label).set(stage.heartbeat_overdue_ms.unwrap_or(0) as f64 / 1000.0);
        }
        let batches = Family::<EdgeLabel, Gauge>::default();
        let items = Family::<EdgeLabel, Gauge>::default();
        let bytes = Family::<EdgeLabel, Gauge>::default();
        let oldest = Family::<EdgeLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let backlog = Family::<ConsumerLabel, Gauge>::default();
        registry.register("queue_batches", "Batches stored on a queue edge", batches.clone());
        registry.register("queue_items", "Items stored on a queue edge", items.clone());
        registry.register("queue_bytes", "Bytes of values stored on a queue edge", bytes.clone());
        registry.register("queue_oldest_age_seconds", "Age of the oldest batch on a queue edge", oldest.clone());
        registry.register("queue_consumer_backlog_batches", "Batches a consumer has not passed yet", backlog.clone());
        for edge in &self.edges {
            let label = EdgeLabel { edge: edge.edge.to_string() };
            batches.get_or_create(&label).set(edge.batches as i64);
            items.get_or_create(&label).set(edge.items as i64);
            bytes.get_or_create(&label).set(edge.bytes as i64);
            oldest.get_or_create(&label).set(edge.oldest_age_seconds);
        }
        for (consumer, behind) in &self.consumers {
            backlog.get_or_create(&ConsumerLabel { consumer: consumer.to_string() }).set(*behind as i64);
        }
        let used: Gauge = Gauge::default();
        used.set(self.used_bytes as i64);
        registry.register("queue_used_bytes", "Bytes of pages the queue's tables use", used);
        let capacity: Gauge = Gauge::default();
        capacity.set(self.capacity_bytes as i64);
        registry.register("queue_capacity_bytes", "The queue's disk budget", capacity);
        let intake: Gauge = Gauge::default();
        intake.set(i64::from(self.intake_open));
        registry.register("queue_intake_open", "Whether receive admits new data (below the budget)", intake);
        if let Some(free) = self.filesystem_free_bytes {
            let gauge: Gauge = Gauge::default();
            gauge.set(free as i64);
            registry.register("filesystem_free_bytes", "Free space of the queue's filesystem", gauge);
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct KindLabel {
            kind: String,
        }
        let drift = Family::<KindLabel, Counter>::default();
        registry.register(
            "log_schema_drift_lines",
            "Log lines that deviated from the expected schema (unknown level, missing or malformed field, not JSON...), by kind",
            drift.clone(),
        );
        for (kind, lines) in &self.drift {
            drift.get_or_create(&KindLabel { kind: kind.clone() }).inc_by(*lines);
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct RouteLabel {
            route: String,
        }
        let thresholds = Family::<RouteLabel, Gauge>::default();
        registry.register(
            "sampling_latency_threshold_ms",
            "Latency threshold an adaptive latency policy has lifted for a route (routes at the configured threshold are absent)",
            thresholds.clone(),
        );
        for (route, ms) in &self.route_thresholds.routes {
            thresholds.get_or_create(&RouteLabel { route: route.clone() }).set(*ms as i64);
        }
        let changes: Counter = Counter::default();
        changes.inc_by(self.route_thresholds.changes);
        registry.register(
            "sampling_latency_threshold_changes",
            "Adaptive latency threshold changes (lifts and steps back)",
            changes,
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

/// Binds `endpoint` now (a failure is reported to the caller) and serves it from a task.
pub fn serve(endpoint: SocketAddr, source: Source) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(endpoint)?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let metrics_source = source.clone();
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(move || metrics(metrics_source.clone())))
        .route("/readyz", axum::routing::get(move || ready(source.clone())))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }));
    tracing::info!(%endpoint, "self-metrics on /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(error = %err, "self-metrics endpoint stopped");
        }
    });
    Ok(())
}

async fn metrics(source: Source) -> axum::response::Response {
    let encoded = source().await.and_then(|s| s.encode().map_err(|err| err.to_string()));
    match encoded {
        Ok(text) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
            .into_response(),
        Err(message) => (StatusCode::SERVICE_UNAVAILABLE, message).into_response(),
    }
}

async fn ready(source: Source) -> axum::response::Response {
    match source().await {
        Ok(snapshot) if snapshot.not_ready.is_empty() => (StatusCode::OK, "ready\n".to_string()).into_response(),
        Ok(snapshot) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", snapshot.not_ready.join("\n"))).into_response()
        }
        Err(message) => (StatusCode::SERVICE_UNAVAILABLE, message).into_response(),
    }
}
