//! Shamir secret sharing of 32-byte secrets over the prime field GF(p), p = 2⁶¹ − 1.
//!
//! # Why our own, over this field
//! The x-coordinate of a share is the holder's participant index (1, 2, …, n), as the wire
//! protocol fixes it, and cohorts reach thousands of devices. `blahaj` (and `sharks`, which it
//! forks) share byte-wise over GF(2⁸), which allows at most 255 distinct x-coordinates;
//! `vsss-rs` works over elliptic-curve scalar fields through generic traits and pulls in a
//! curve crate for what is a few lines of modular arithmetic. Over the Mersenne prime
//! p = 2⁶¹ − 1 every product fits in a `u128` and reduces with two shifts and adds, so the
//! whole scheme is small enough to read in one sitting.
//!
//! # Scheme
//! A 32-byte secret is cut into five chunks of at most 7 bytes (56 bits < 61 bits, so every
//! chunk is a field element). Each chunk is the constant term of its own polynomial of degree
//! t − 1 whose other coefficients are uniform in GF(p) from the caller's CSPRNG; the share for
//! x-coordinate x is the five polynomial values at x. Any t shares determine each polynomial
//! (Lagrange interpolation at 0); any t − 1 shares are jointly uniform and independent of the
//! secret (Shamir 1979), chunk by chunk, since the polynomials are independent.
//!
//! Reconstruction is not robust: a wrong share from a malicious holder yields a wrong secret.
//! The server detects that for masking keys (the reconstructed key must match the advertised
//! public key); see the crate docs for what that leaves open.

use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::SecAggError;

/// The field modulus, the Mersenne prime 2⁶¹ − 1.
pub const MODULUS: u64 = (1 << 61) - 1;
/// Field elements per 32-byte secret.
pub const CHUNKS: usize = 5;
/// Bytes of secret per field element.
const CHUNK_BYTES: usize = 7;
/// The encoded length of a share value ([`Share::to_bytes`]): 5 × 8 bytes.
pub const SHARE_BYTES: usize = CHUNKS * 8;

/// One holder's share of a 32-byte secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The x-coordinate: the holder's participant index, at least 1.
    pub x: u32,
    /// The five polynomial values at x, each below [`MODULUS`].
    pub values: [u64; CHUNKS],
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A share is secret material: never print its values.
        write!(f, "Share {{ x: {}, .. }}", self.x)
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.values.zeroize();
    }
}

impl Share {
    /// The value's wire form: the five elements as little-endian `u64`s (the x-coordinate
    /// travels separately, as the holder's index).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Parses [`Share::to_bytes`] for holder `x`, refusing a wrong length or an element
    /// outside the field.
    pub fn from_bytes(x: u32, bytes: &[u8]) -> Result<Self, SecAggError> {
        if x == 0 {
            return Err(SecAggError::Malformed(
                "a share's x-coordinate must be ≥ 1".into(),
            ));
        }
        if bytes.len() != SHARE_BYTES {
            return Err(SecAggError::Malformed(format!(
                "a share value is {SHARE_BYTES} bytes, got {}",
                bytes.len()
            )));
        }
        let mut values = [0u64; CHUNKS];
        for (v, chunk) in values.iter_mut().zip(bytes.chunks_exact(8)) {
            *v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            if *v >= MODULUS {
                return Err(SecAggError::Malformed(
                    "a share element is not below the field modulus".into(),
                ));
            }
        }
        Ok(Self { x, values })
    }
}

#[inline]
fn reduce(x: u128) -> u64 {
    // x < 2^122: fold the high bits twice (2^61 ≡ 1 mod p).
    let folded = (x & u128::from(MODULUS)) + (x >> 61);
    let folded = (folded & u128::from(MODULUS)) + (folded >> 61);
    let r = folded as u64;
    if r >= MODULUS { r - MODULUS } else { r }
}

#[inline]
fn add(a: u64, b: u64) -> u64 {
    let s = a + b; // < 2^62: no overflow
    if s >= MODULUS { s - MODULUS } else { s }
}

#[inline]
fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + MODULUS - b }
}

#[inline]
fn mul(a: u64, b: u64) -> u64 {
    reduce(u128::from(a) * u128::from(b))
}

fn pow(mut base: u64, mut exp: u64) -> u64 {
    let mut acc = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

/// The multiplicative inverse of a non-zero element (Fermat: a^(p−2)).
fn inverse(a: u64) -> u64 {
    debug_assert!(a != 0);
    pow(a, MODULUS - 2)
}

/// A uniform field element, by rejection on 61-bit words (no modulo bias).
fn random_element<R: CryptoRng + ?Sized>(rng: &mut R) -> u64 {
    loop {
        let v = rng.next_u64() >> 3;
        if v < MODULUS {
            return v;
        }
    }
}

fn chunks_of(secret: &[u8; 32]) -> [u64; CHUNKS] {
    let mut out = [0u64; CHUNKS];
    for (i, chunk) in secret.chunks(CHUNK_BYTES).enumerate() {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        out[i] = u64::from_le_bytes(word);
    }
    out
}

fn secret_of(chunks: &[u64; CHUNKS]) -> Result<[u8; 32], SecAggError> {
    let mut secret = [0u8; 32];
    for (i, &c) in chunks.iter().enumerate() {
        let start = i * CHUNK_BYTES;
        let len = (32 - start).min(CHUNK_BYTES);
        if c >> (8 * len) != 0 {
            // A chunk carries at most `len` bytes; anything above came from inconsistent
            // shares.
            return Err(SecAggError::Reconstruction(
                "the shares are inconsistent (a reconstructed chunk is out of range)".into(),
            ));
        }
        secret[start..start + len].copy_from_slice(&c.to_le_bytes()[..len]);
    }
    Ok(secret)
}

/// Splits `secret` into one share per x-coordinate in `holders`, any `threshold` of which
/// reconstruct it and fewer of which reveal nothing.
///
/// Refuses a threshold of 0, more holders needed than given, an x-coordinate of 0 (it would
/// be the secret itself) and duplicate x-coordinates.
pub fn split<R: CryptoRng + ?Sized>(
    secret: &[u8; 32],
    threshold: usize,
    holders: &[u32],
    rng: &mut R,
) -> Result<Vec<Share>, SecAggError> {
    if threshold == 0 {
        return Err(SecAggError::InvalidParameter(
            "the Shamir threshold must be at least 1".into(),
        ));
    }
    if holders.len() < threshold {
        return Err(SecAggError::InvalidParameter(format!(
            "{} share holders cannot meet a threshold of {threshold}",
            holders.len()
        )));
    }
    check_coordinates(holders.iter().copied())?;
    let mut coefficients = vec![[0u64; CHUNKS]; threshold];
    coefficients[0] = chunks_of(secret);
    for row in coefficients.iter_mut().skip(1) {
        for c in row.iter_mut() {
            *c = random_element(rng);
        }
    }
    let shares = holders
        .iter()
        .map(|&x| {
            let xf = u64::from(x);
            let mut values = [0u64; CHUNKS];
            // Horner, per chunk.
            for (chunk, v) in values.iter_mut().enumerate() {
                let mut acc = 0;
                for row in coefficients.iter().rev() {
                    acc = add(mul(acc, xf), row[chunk]);
                }
                *v = acc;
            }
            Share { x, values }
        })
        .collect();
    coefficients.zeroize();
    Ok(shares)
}

fn check_coordinates(xs: impl Iterator<Item = u32>) -> Result<(), SecAggError> {
    let mut seen = std::collections::BTreeSet::new();
    for x in xs {
        if x == 0 {
            return Err(SecAggError::InvalidParameter(
                "a share's x-coordinate (participant index) must be ≥ 1".into(),
            ));
        }
        if !seen.insert(x) {
            return Err(SecAggError::InvalidParameter(format!(
                "x-coordinate {x} appears twice"
            )));
        }
    }
    Ok(())
}

/// Reconstructs a secret from at least `threshold` shares (the first `threshold` are used).
///
/// With fewer shares it refuses, naming the shortfall: it never guesses.
pub fn combine(shares: &[Share], threshold: usize) -> Result<[u8; 32], SecAggError> {
    if threshold == 0 {
        return Err(SecAggError::InvalidParameter(
            "the Shamir threshold must be at least 1".into(),
        ));
    }
    if shares.len() < threshold {
        return Err(SecAggError::Reconstruction(format!(
            "{} shares cannot meet a threshold of {threshold}",
            shares.len()
        )));
    }
    let used = &shares[..threshold];
    check_coordinates(used.iter().map(|s| s.x))?;
    let mut chunks = [0u64; CHUNKS];
    for (i, share) in used.iter().enumerate() {
        // Lagrange basis at 0: Π_{j≠i} x_j / (x_j − x_i).
        let xi = u64::from(share.x);
        let (mut num, mut den) = (1u64, 1u64);
        for (j, other) in used.iter().enumerate() {
            if i != j {
                let xj = u64::from(other.x);
                num = mul(num, xj);
                den = mul(den, sub(xj, xi));
            }
        }
        let basis = mul(num, inverse(den));
        for (c, &v) in chunks.iter_mut().zip(&share.values) {
            *c = add(*c, mul(basis, v));
        }
    }
    let secret = secret_of(&chunks);
    chunks.zeroize();
    secret
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::ChaCha20Rng;

    #[test]
    fn field_arithmetic_agrees_with_u128_reference() {
        let p = u128::from(MODULUS);
        for &(a, b) in &[
            (0, 0),
            (1, MODULUS - 1),
            (MODULUS - 1, MODULUS - 1),
            (12345, 987654321),
        ] {
            assert_eq!(u128::from(mul(a, b)), u128::from(a) * u128::from(b) % p);
            assert_eq!(u128::from(add(a, b)), (u128::from(a) + u128::from(b)) % p);
            assert_eq!(mul(a.max(1), inverse(a.max(1))), 1);
        }
    }

    #[test]
    fn any_threshold_subset_reconstructs() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let secret = [0xABu8; 32];
        let shares = split(&secret, 3, &[5, 9, 1000, 70000], &mut rng).unwrap();
        for pick in [[0, 1, 2], [1, 2, 3], [3, 0, 2]] {
            let subset: Vec<Share> = pick.iter().map(|&i| shares[i].clone()).collect();
            assert_eq!(combine(&subset, 3).unwrap(), secret);
        }
    }

    #[test]
    fn bad_parameters_are_refused_by_name() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let e = split(&[0; 32], 3, &[1, 2], &mut rng).unwrap_err();
        assert!(e.to_string().contains("threshold of 3"), "{e}");
        let e = split(&[0; 32], 2, &[1, 0], &mut rng).unwrap_err();
        assert!(e.to_string().contains("≥ 1"), "{e}");
        let e = split(&[0; 32], 2, &[4, 4], &mut rng).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        assert!(Share::from_bytes(1, &[0; 39]).is_err());
        assert!(Share::from_bytes(1, &[0xFF; 40]).is_err());
    }

    #[test]
    fn share_bytes_round_trip() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let shares = split(&[7; 32], 2, &[3, 4], &mut rng).unwrap();
        let back = Share::from_bytes(3, &shares[0].to_bytes()).unwrap();
        assert_eq!(back, shares[0]);
        assert_eq!(shares[0].to_bytes().len(), SHARE_BYTES);
    }
}
