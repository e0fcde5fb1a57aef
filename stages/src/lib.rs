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
pub mod events;
pub mod export;
pub mod grpc_raw;
pub mod log_mirror;
pub mod otlp_wire;
pub mod receive;
pub mod spanmetrics;
pub mod tail_sample;

pub use context::{StageContext, StageError, run_stage};
