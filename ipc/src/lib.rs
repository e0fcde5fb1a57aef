//! tailgate's channels between stage processes.
//!
//! Every edge of the pipeline is a table in one LMDB environment that all stage processes open
//! ([`queue`]). A batch is an rkyv archive ([`batch`]) that consumers read in place from the
//! memory map: the map *is* the zero-copy shared-memory channel. Each stage step is one write
//! transaction that reads input, writes output and advances the stage's cursor, so a stage
//! killed at any instant loses nothing and emits nothing twice. Stages wake each other over Unix
//! datagram sockets ([`wake`]); nothing polls.
//!
//! Design constraints and invariants are stated at the top of each module.

pub mod batch;
pub mod clock;
pub mod decisions;
pub mod heartbeat;
pub mod memory;
pub mod queue;
pub mod repair;
pub mod topology;
pub mod wake;

pub use queue::{EdgeDepth, Queue, QueueError, QueueOpenError, QueueOptions, ReadTxn, WriteTxn};
pub use repair::{LossRecord, RepairReport};
pub use topology::{Consumer, Edge, StageId};
