//! # fedpref-secagg
//!
//! Secure aggregation for fedpref's `distributed` privacy mode: the coordinator learns the sum
//! of at least m devices' updates and nothing else about any one of them, as long as it
//! follows the protocol (see "What this does not defend against").
//!
//! The protocol is SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova 2020, "Secure
//! Single-Server Aggregation with (Poly)Logarithmic Overhead"), with the complete graph as the
//! special case SecAgg (Bonawitz et al. 2017, "Practical Secure Aggregation for
//! Privacy-Preserving Machine Learning") for small cohorts. It is **sans-IO**: [`Client`]
//! and [`Server`] are state machines whose stages take the previous stage's messages and
//! return the next ones, as plain structs ([`messages`]) that the `fedpref.v1`
//! `SecureAggregationService` carries. Time and randomness are the caller's: deadlines decide
//! when the caller closes a stage, and every stage that draws randomness takes a CSPRNG
//! ([`rng::os_rng`] in production, [`rng::simulation_rng`] only in tests and simulations).
//!
//! ## One round
//! 1. *Advertise keys.* Each device makes two fresh X25519 key pairs (one to encrypt shares,
//!    one to agree masks) and sends the public keys.
//! 2. *Share keys.* The server sends each device its neighbours' keys (neighbours in the
//!    round's [`Graph`], chosen from a public seed). The device draws a self-mask seed b,
//!    Shamir-shares b and its masking secret key with threshold t among its neighbours
//!    ([`shamir`], over GF(2⁶¹ − 1)), and sends each neighbour its two shares encrypted
//!    with ChaCha20-Poly1305 under an HKDF-derived X25519 key ([`crypto`]).
//! 3. *Masked input.* Each device receives the shares addressed to it and uploads
//!    `y = x + PRG(b) + Σ ± PRG(s_ij)` modulo 2³², where s_ij is agreed with each neighbour
//!    that shared keys and the PRG is ChaCha20. x is the update in fixed point
//!    ([`FixedPoint`]), whose overflow bound is checked when the round is configured.
//! 4. *Unmasking.* For each neighbour, a surviving device reveals the share of b (if the
//!    neighbour's masked input arrived) or of its masking key (if it did not) — never both.
//!    The server rebuilds every survivor's b and every dropped device's masking key from t
//!    shares and removes all the masks, so devices that drop after uploading are recovered.
//!
//! ## Example: a round of five devices, one dropping after key sharing
//! ```
//! use fedpref_secagg::{
//!     Client, EncodingParams, Graph, RoundConfig, RoundContext, SecAggParams, Server,
//!     rng::simulation_rng,
//! };
//!
//! let params = SecAggParams::choose(5, 0.2, 0.0)?; // complete graph, t = 3
//! let encoding = EncodingParams {
//!     clip_norm: 1.0, scale: 1024.0, cohort_size: 5, dimension: 3, device_noise_std: 0.0,
//! };
//! let config = RoundConfig::new(RoundContext([7; 32]), &params, [0; 32], encoding, 3)?;
//! let mut server = Server::new(config.clone())?;
//! let mut rng = simulation_rng(1, &[]); // a test; a device uses rng::os_rng()
//!
//! let mut waiting = Vec::new();
//! for i in 1..=5 {
//!     let (state, keys) = Client::advertise(config.clone(), &mut rng)?;
//!     server.receive_keys(i, keys)?;
//!     waiting.push(state);
//! }
//! let mut sharing = Vec::new();
//! for ((i, directory), state) in server.close_advertise_keys()?.into_iter().zip(waiting) {
//!     let (state, shares) = state.share_keys(&directory, &mut rng)?;
//!     server.receive_shares(i, shares)?;
//!     sharing.push(state);
//! }
//! let mut masked = Vec::new();
//! for ((i, inbox), state) in server.close_share_keys()?.into_iter().zip(sharing) {
//!     if i == 5 { continue; } // device 5 drops before uploading
//!     let x = config.encoding.encode_f64(&[0.5, -0.25, f64::from(i) / 10.0])?;
//!     let (state, input) = state.masked_input(&inbox, &x)?;
//!     server.receive_masked_input(i, input)?;
//!     masked.push(state);
//! }
//! for ((i, plan), state) in server.close_masked_input()?.into_iter().zip(masked) {
//!     server.receive_unmask(i, state.unmask(&plan)?)?;
//! }
//! let output = server.finish()?;
//! assert_eq!(output.contributors, vec![1, 2, 3, 4]);
//! assert_eq!(config.encoding.decode_integers(&output.sum), vec![2048, -1024, 1024]);
//! # Ok::<(), fedpref_secagg::SecAggError>(())
//! ```
//!
//! ## What this does not defend against
//! - **A server that lies.** There is no consistency-check round and no signatures: a server
//!   that tells different devices different survivor sets, or adds sybil devices, can learn an
//!   individual input (Bonawitz et al.'s actively secure variant needs a PKI). The protection
//!   holds against an honest-but-curious server colluding with a fraction γ of devices.
//! - **A ground graph seed.** The Harary graph's order comes from a public seed in the
//!   [`RoundConfig`]; a server that may choose it freely could search for a graph that suits
//!   the devices it colludes with. Derive it from values fixed before the cohort is known.
//! - **Malformed inputs.** Masked values are not range-checked (no zero-knowledge proofs): a
//!   malicious device can add anything to the sum, and can break reconstruction with bad
//!   shares (detected for masking keys and when more than t shares arrive, then the round is
//!   abandoned, not corrected).
//! - **Timing.** Nothing here is constant-time beyond the primitives themselves.

pub mod client;
pub mod config;
pub mod crypto;
pub mod encoding;
pub mod graph;
pub mod inprocess;
pub mod messages;
pub mod rng;
pub mod server;
pub mod shamir;

pub use client::{AwaitingKeyDirectory, AwaitingShareInbox, AwaitingUnmaskingPlan, Client};
pub use config::RoundConfig;
pub use crypto::RoundContext;
pub use encoding::{EncodedInput, EncodingParams, FixedPoint};
pub use graph::{Graph, SecAggParams};
pub use messages::{
    AdvertiseKeys, EncryptedShare, KeyDirectory, MaskedInput, ParticipantKeys, RevealedShare,
    ShareInbox, ShareKeys, ShareKind, Unmask, UnmaskingPlan,
};
pub use server::{AggregateOutput, Server, ServerStage};

/// Everything that can go wrong in a round. Each message names the participant, the stage or
/// the number at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecAggError {
    /// A parameter is outside its domain.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// The encoded sum could overflow the modulus.
    #[error("overflow: {0}")]
    Overflow(String),
    /// An update cannot be encoded.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Bytes that do not parse or authenticate.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A message that breaks the protocol (wrong participant, repeated, unexpected).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A message arrived for a stage that is closed.
    #[error("stage closed: {0}")]
    StageClosed(String),
    /// A request that would reveal both secrets of one participant; refused.
    #[error("refused to break the unmasking safety rule: {0}")]
    SafetyViolation(String),
    /// Shamir reconstruction failed.
    #[error("reconstruction failed: {0}")]
    Reconstruction(String),
    /// The round cannot go on (too few participants left); nothing was unmasked.
    #[error("round abandoned: {0}")]
    Abandoned(String),
    /// The random source failed.
    #[error("randomness: {0}")]
    Randomness(String),
}
