//! # fedpref-engine
//!
//! The pure core of fedpref, with no sockets, no database and no async runtime: what a run
//! is ([`manifest`], [`distributed`]), what a round does ([`engine`], the sans-IO round
//! engine, with [`secure_round`] for distributed mode; [`protocol`] holds the events, actions,
//! tasks and rejections it speaks, and [`accounting`] what a run spends), how updates become a model
//! ([`aggregation`], [`model`]), what the privacy ledger records and how it is verified
//! ([`ledger`], [`checkpoint`]), what a task entitles a device to ([`grants`]) and the
//! guardrail metrics of federated evaluation ([`guardrail`]).
//!
//! The coordinator (`fedpref-coordinator`) drives the engine with real time, a database and
//! gRPC; the simulator (`fedpref-simulations`) drives it in-process. Both re-use everything
//! here, so a simulated run computes exactly what a served run computes.
//!
//! Architecture invariant (ARCHITECTURE.md): this crate's normal dependencies contain no
//! tokio, tonic, hyper, axum, h2, rustls, rusqlite, postgres, rcgen, indicatif or plotters
//! (`doc-check/tests/dependencies.rs`). No module imports itself through others
//! (`doc-check/tests/import_cycles.rs`).

pub mod accounting;
pub mod aggregation;
pub mod checkpoint;
pub mod distributed;
pub mod engine;
pub mod grants;
pub mod guardrail;
pub mod ledger;
pub mod manifest;
pub mod model;
pub mod protocol;
pub mod secure_round;

/// Lower-case hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
