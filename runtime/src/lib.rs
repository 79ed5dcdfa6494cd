//! The saga runtime host. See `ARCHITECTURE.md` for the path of one event through these
//! modules: `kafka::consumer` → `worker` (with `storage::inbox`) → `wasm` → `effects` (with
//! `storage::{state, outbox, deadlines}`) → `relay` → Kafka; HTTP enters at `ingress`.

pub mod admin;
pub mod admission;
pub mod backoff;
pub mod clock;
pub mod commands;
pub mod config;
pub mod deadline;
pub mod dlt;
pub mod effects;
pub mod follow;
pub mod grouped;
pub mod health;
pub mod ingress;
pub mod kafka;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod ownership;
pub mod registry;
pub mod relay;
pub mod retention;
pub mod stats;
pub mod storage;
pub mod telemetry;
pub mod ui;
pub mod verify;
pub mod wasm;
pub mod watch;
pub mod worker;
