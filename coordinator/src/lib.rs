//! # fedpref-coordinator
//!
//! The server side of fedpref: the sans-IO round engine ([`engine`]), aggregation, the
//! SQLite store and hash-chained ledger, the durable driver ([`coordinator`]), the gRPC
//! services over TLS ([`service`], [`server`], configured by [`config`]) and the
//! `fedpref-coordinator` command line ([`cli`]), whose accountant answers "what does this
//! schedule spend?" with the same code the coordinator and the devices account with. For the
//! people who answer for a run: guardrail metrics from federated evaluation, with alerts
//! ([`guardrail`]), and the one-page impact report ([`report`]). See ARCHITECTURE.md for what
//! exists and what is planned.
//!
//! ```
//! use clap::Parser;
//! use fedpref_coordinator::cli::Cli;
//!
//! let cli = Cli::try_parse_from([
//!     "fedpref-coordinator", "accountant", "epsilon", "--noise-multiplier", "1.1",
//!     "--sampling-rate", "0.01", "--rounds", "1000", "--delta", "1e-5", "--json",
//! ]).unwrap();
//! let out = fedpref_coordinator::cli::run(&cli).unwrap();
//! let v: serde_json::Value = serde_json::from_str(&out).unwrap();
//! assert!(v["epsilon"].as_f64().unwrap() < 2.0);
//! ```

pub mod admin_client;
pub mod audit;
pub mod cli;
pub mod cli_error;
pub mod config;
pub mod coordinator;
pub mod enrolment;
pub mod metrics;
pub mod replica;
pub mod report;
pub mod server;
pub mod service;
pub mod store;

pub use fedpref_engine::hex;
// The pure core lives in `fedpref-engine`; its modules are re-exported under their old paths so
// `fedpref_coordinator::engine::Engine` and `crate::ledger::…` name the same items.
pub use fedpref_engine::{
    accounting, aggregation, checkpoint, distributed, engine, grants, guardrail, ledger, manifest,
    model, protocol, secure_round,
};
