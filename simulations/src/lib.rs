//! # fedpref-simulations
//!
//! `fedpref-sim`, the seeded simulator for ML engineers: synthetic and MovieLens data
//! ([`data`]), thousands of simulated devices driving **the coordinator's round engine** and
//! **the SDK's training code** in-process, with the privacy crate's seeded
//! [`fedpref_privacy::SimulationSampler`] for noise ([`sim`]), metrics per round ([`metrics`],
//! [`report`]), a user-feedback scenario with negative feedback and opt-outs ([`feedback`]),
//! distributed DP under real secure aggregation with simulated drop-out ([`distributed`]),
//! guardrail alerts on drifting metrics ([`guardrails`]), labelled plots ([`plot`]), grids of
//! runs ([`sweep`]), RMSE against ε per privacy mode ([`frontier`]), and the standard speed workload ([`bench`](mod@bench)).
//! Same seed, same bytes: every client's randomness is its own stream keyed by (seed, round,
//! client), and updates reach the engine in a fixed order whatever the number of threads.
//!
//! ```
//! use fedpref_simulations::data::{synthetic, SyntheticSpec};
//! use fedpref_simulations::metrics::global_mean_rmse;
//! use fedpref_simulations::sim::{Sampling, Settings, Simulation};
//!
//! let data = synthetic(&SyntheticSpec { users: 60, items: 40, ..SyntheticSpec::default() })?;
//! let settings = Settings { rounds: 3, sampling: Sampling::Cohort(20), ..Settings::default() };
//! let mut run = Simulation::new(&settings, &data)?;
//! let records = run.run(|_| {})?;
//! assert_eq!(records.len(), 3);
//! assert_eq!(run.client_updates, 60);
//! let rmse = records[2].evaluation.as_ref().unwrap().rmse;
//! assert!(rmse.is_finite() && global_mean_rmse(&data) > 0.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod baseline;
pub mod bench;
pub mod centralised;
pub mod cli;
pub mod command;
pub mod data;
pub mod distributed;
pub mod feedback;
pub mod frontier;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod guardrails;
pub mod metrics;
pub mod plot;
pub mod progress;
pub mod report;
pub mod sim;
pub mod sweep;

pub use fedpref_privacy;
