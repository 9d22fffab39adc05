//! # fedpref-privacy
//!
//! The part of fedpref that auditors read: clipping, floating-point-safe Gaussian noise,
//! a Rényi-DP accountant and enforced budgets. It does no IO and depends on no runtime,
//! network or database crate; both the device SDK and the coordinator use it, so a device's
//! spend and a training run's spend are computed by the same code.
//!
//! - [`clip_l2`]: clip a whole update (all shared tensors together) to L2 norm C, in f64,
//!   refusing NaN and ±∞.
//! - [`GaussianMechanism`] with a [`SecureSampler`] (exact discrete Gaussian on a fine
//!   lattice, from a CSPRNG seeded by the OS) or a [`SimulationSampler`] (seeded ziggurat,
//!   for simulations); the types keep the second out of anything released.
//! - [`RdpAccountant`]: the Gaussian and Poisson-subsampled Gaussian mechanisms at integer
//!   and fractional orders, exact; composition; conversion to (ε, δ) with the improved
//!   bound; [`calibrate_noise_multiplier`].
//! - [`PldAccountant`] ([`pld`]): privacy loss distributions with pessimistic
//!   (connect-the-dots) discretisation, composed by FFT: the tight (ε, δ) accountant and the
//!   default [`Accountant`]; RDP remains for what PLD does not cover.
//! - [`PrivacyMode`]: local, central and distributed DP with their neighbouring relations
//!   and sensitivities; every [`PrivacyStatement`] says which [`Audience`] it holds against.
//! - [`Budget`]: spent, remaining, and `would_exceed` before every round.
//! - [`tree`]: DP-FTRL's binary-tree aggregation of per-round sums and its accountant, whose
//!   ε rests on participation limits instead of amplification by sampling.
//! - [`adaptive_clip`]: quantile-based adaptive clipping and its share of the privacy cost.
//! - [`signal`]: whether a configuration's noise would swamp any signal, before training.
//! - [`distributed`]: the distributed discrete Gaussian (each device's share of the noise under
//!   secure aggregation) and its RDP accountant.
//!
//! ```
//! use fedpref_privacy::{
//!     clip_l2, epsilon_after, GaussianMechanism, OrderGrid, PrivacyMode, RoundRelease,
//!     SecureSampler,
//! };
//!
//! // A device clips and noises its update (local mode, σ = 4, C = 1)…
//! let clipped = clip_l2(vec![0.5, -2.0, 1.0], 1.0)?;
//! let mechanism = GaussianMechanism::new(4.0, 1.0)?;
//! let upload = mechanism.release_update(clipped, &mut SecureSampler::from_os()?)?;
//! assert_eq!(upload.values().len(), 3);
//!
//! // …and after 10 such uploads this is what it has spent, and against whom.
//! let round = RoundRelease { mode: PrivacyMode::Local, noise_multiplier: 4.0, sampling_rate: 1.0 };
//! let spent = epsilon_after(&round, 10, 1e-6, &OrderGrid::default())?;
//! assert!(spent.epsilon > 1.0 && spent.epsilon < 10.0);
//! println!("ε = {:.3} ({})", spent.epsilon, spent.audience.describe());
//! # Ok::<(), fedpref_privacy::PrivacyError>(())
//! ```

mod accountant;
pub mod adaptive_clip;
mod budget;
mod clip;
pub mod distributed;
mod error;
pub mod evaluation;
mod mode;
pub mod noise;
pub mod pld;
pub mod rdp;
pub mod signal;
mod special;
pub mod tree;

pub use accountant::{
    Calibration, DeltaAtOrder, EpsilonAtOrder, RdpAccountant, calibrate_noise_multiplier,
};
pub use budget::Budget;
pub use clip::{Clipped, clip_l2, clip_l2_tensors, l2_norm, sum_of_squares_f32};
pub use error::PrivacyError;
pub use mode::{
    Audience, Neighbouring, PrivacyMode, PrivacyStatement, RoundRelease, calibrate, calibrate_with,
    delta_after, delta_after_with, epsilon_after, epsilon_after_with,
};
pub use noise::{
    ClippedSum, GaussianMechanism, GaussianSampler, Lattice, Provenance, Released, Secure,
    SecureSampler, Simulated, SimulationSampler,
};
pub use pld::{Accountant, PldAccountant};
pub use rdp::OrderGrid;
