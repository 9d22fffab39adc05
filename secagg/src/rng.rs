//! Where the protocol's randomness comes from. Every stage takes a `&mut impl CryptoRng`
//! from the caller (the state machines never draw entropy themselves); these are the two
//! sources, kept apart by name.

use rand::SeedableRng;
use rand::rngs::{ChaCha20Rng, SysRng};

use crate::SecAggError;

/// **Production.** ChaCha20 seeded with 256 bits from the operating system's random source.
pub fn os_rng() -> Result<ChaCha20Rng, SecAggError> {
    ChaCha20Rng::try_from_rng(&mut SysRng)
        .map_err(|_| SecAggError::Randomness("the operating system's random source failed".into()))
}

/// **Tests and simulations only.** ChaCha20 from a 64-bit seed and a stream path (e.g.
/// `[round, participant]`), so a simulated round is reproducible. Keys made from it are
/// predictable to anyone who knows the seed: never use it for a real device or server.
pub fn simulation_rng(seed: u64, stream: &[u64]) -> ChaCha20Rng {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(b"fedpref secagg simulation rng");
    hasher.update(seed.to_le_bytes());
    for id in stream {
        hasher.update(id.to_le_bytes());
    }
    ChaCha20Rng::from_seed(hasher.finalize().into())
}
