//! # fedpref-client-sdk (not built yet)
//!
//! What an app will embed: the on-device event store, the preference model (federated
//! matrix factorisation with a private user factor), private local training, the gRPC client
//! and the user controls. **None of it exists yet**; this crate only reserves its place in the
//! workspace. What it will build on is ready: [`fedpref_privacy`] for clipping, noise and the
//! on-device accountant, and [`fedpref_proto`] for the wire protocol.
//!
//! ```
//! // The device-side privacy path the SDK will wrap, available today:
//! use fedpref_privacy::{clip_l2, GaussianMechanism, SecureSampler};
//! let clipped = clip_l2(vec![0.2, -0.1], 1.0).unwrap();
//! let upload = GaussianMechanism::new(2.0, 1.0).unwrap()
//!     .release_update(clipped, &mut SecureSampler::from_os().unwrap()).unwrap();
//! assert_eq!(upload.values().len(), 2);
//! ```

pub use fedpref_privacy;
pub use fedpref_proto;
