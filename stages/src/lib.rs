//! tailgate's pipeline stages. Each stage runs as its own OS process (`tailgate stage <name>`),
//! reads its input edges from the shared queue and writes its output edges in the same
//! transaction that advances its cursor.
//!
//! | stage | reads | writes | module |
//! |---|---|---|---|
//! | receive | OTLP gRPC/HTTP | `spans`, `logs`, `metrics` | [`receive`] |
//! | tail_sample | `spans` | `kept_spans`, decisions | [`tail_sample`] |
//! | log_mirror | `logs`, decisions | `kept_logs` | [`log_mirror`] |
//! | spanmetrics | `kept_spans` | `metrics` | [`spanmetrics`] |
//! | export | `kept_spans`, `kept_logs`, `metrics` | backends | [`export`] |
#![forbid(unsafe_code)]

pub mod context;
pub mod credentials;
pub mod events;
pub mod export;
pub mod fast_map;
pub mod fault;
pub mod grpc_raw;
pub mod limits;
pub mod log_mirror;
pub mod otlp_wire;
pub mod receive;
pub mod spanmetrics;
pub mod tail_sample;
pub mod tls_files;

pub use context::{StageContext, StageError};

use tailgate_ipc::StageId;

/// Runs the stage named in `ctx` until it is told to stop or fails. The dispatch lives here,
/// above the stages, so that every stage depends on [`context`] and never the other way round.
pub async fn run_stage(ctx: StageContext) -> Result<(), StageError> {
    match ctx.stage {
        StageId::Receive => receive::run(ctx).await,
        StageId::TailSample => tail_sample::run(ctx).await,
        StageId::LogMirror => log_mirror::run(ctx).await,
        StageId::Spanmetrics => spanmetrics::run(ctx).await,
        StageId::Export => export::run(ctx).await,
    }
}
