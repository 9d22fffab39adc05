//! # fedpref-simulations (not built yet)
//!
//! `fedpref-sim`, the seeded simulator for ML engineers, will live here: synthetic and
//! MovieLens data, thousands of simulated devices driving the coordinator's round engine and
//! the SDK's training code in-process, metrics, sweeps and plots. **None of it exists yet.**
//! The noise it will use is ready: [`fedpref_privacy::SimulationSampler`], seeded and cheap,
//! whose releases are typed `Released<Simulated>` so they can never be uploaded or published.
//!
//! ```
//! use fedpref_privacy::{clip_l2, GaussianMechanism, SimulationSampler};
//! let mechanism = GaussianMechanism::new(1.0, 1.0).unwrap();
//! let a = mechanism.release_update(clip_l2(vec![0.5; 4], 1.0).unwrap(), &mut SimulationSampler::for_stream(42, &[0, 7])).unwrap();
//! let b = mechanism.release_update(clip_l2(vec![0.5; 4], 1.0).unwrap(), &mut SimulationSampler::for_stream(42, &[0, 7])).unwrap();
//! assert_eq!(a, b); // same seed, same bytes
//! ```

pub use fedpref_privacy;
