//! Key agreement, key derivation, share encryption and mask expansion.
//!
//! - Key agreement: X25519 (RFC 7748) with fresh keys every round. Non-contributory results
//!   (a low-order public key) are refused.
//! - Key derivation: HKDF-SHA-256 (RFC 5869) over the X25519 output, with the round context
//!   as salt and an info string naming the purpose and both participant indices, so a key is
//!   bound to its round, its use and its ordered (or, for masks, unordered) pair.
//! - Share encryption: ChaCha20-Poly1305 (RFC 8439). Every key encrypts exactly one message
//!   (one key per ordered pair per round), so the all-zero nonce is safe; the associated data
//!   binds the round context and both indices.
//! - Mask expansion: the ChaCha20 keystream (via `rand`'s `ChaCha20Rng`, a fixed, portable
//!   construction) keyed by a 32-byte seed, read as little-endian `u32`s.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;
use rand_core::{CryptoRng, Rng};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

use crate::SecAggError;

/// A 32-byte value that names one secure-aggregation round (e.g. a hash of the run and round
/// ids). Every derived key is bound to it, so nothing from one round is valid in another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct RoundContext(pub [u8; 32]);

/// A per-round X25519 key pair.
pub(crate) struct KeyPair {
    pub(crate) secret: StaticSecret,
    pub(crate) public: [u8; 32],
}

impl KeyPair {
    pub(crate) fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let secret = StaticSecret::random_from_rng(rng);
        let public = PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }

    pub(crate) fn from_secret_bytes(bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }
}

fn agree(
    secret: &StaticSecret,
    their_public: &[u8; 32],
) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    let shared = secret.diffie_hellman(&PublicKey::from(*their_public));
    if !shared.was_contributory() {
        return Err(SecAggError::Malformed(
            "a public key is of low order (non-contributory key agreement)".into(),
        ));
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

/// Whether key agreement with `public` is contributory, i.e. the point is not of low order.
/// The server checks advertised keys with this, so that one device with a degenerate key
/// cannot make every neighbour fail its key agreement. A clamped scalar is a multiple of the
/// cofactor 8, so it sends every point of small order, and (but with negligible probability
/// for a fixed scalar) only those, to zero.
pub(crate) fn is_contributory_public_key(public: &[u8; 32]) -> bool {
    StaticSecret::from([0x5a; 32])
        .diffie_hellman(&PublicKey::from(*public))
        .was_contributory()
}

fn derive(ikm: &[u8; 32], context: &RoundContext, label: &[u8], a: u32, b: u32) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(&context.0), ikm);
    let mut info = Vec::with_capacity(label.len() + 8);
    info.extend_from_slice(label);
    info.extend_from_slice(&a.to_be_bytes());
    info.extend_from_slice(&b.to_be_bytes());
    let mut okm = [0u8; 32];
    hk.expand(&info, &mut okm)
        .expect("32 bytes is a valid HKDF-SHA-256 length");
    okm
}

/// The seed of the pairwise mask between participants `i` and `j` (symmetric in i, j).
pub(crate) fn pairwise_seed(
    secret: &StaticSecret,
    their_public: &[u8; 32],
    context: &RoundContext,
    i: u32,
    j: u32,
) -> Result<[u8; 32], SecAggError> {
    let shared = agree(secret, their_public)?;
    Ok(derive(
        &shared,
        context,
        b"fedpref secagg v1 pairwise mask",
        i.min(j),
        i.max(j),
    ))
}

/// The keys of the two share messages between `own` and `other`: (own → other, other → own),
/// from one key agreement.
pub(crate) fn share_keys(
    secret: &StaticSecret,
    their_public: &[u8; 32],
    context: &RoundContext,
    own: u32,
    other: u32,
) -> Result<([u8; 32], [u8; 32]), SecAggError> {
    let shared = agree(secret, their_public)?;
    let label = b"fedpref secagg v1 share encryption";
    Ok((
        derive(&shared, context, label, own, other),
        derive(&shared, context, label, other, own),
    ))
}

fn associated_data(context: &RoundContext, sender: u32, recipient: u32) -> Vec<u8> {
    let mut aad = context.0.to_vec();
    aad.extend_from_slice(&sender.to_be_bytes());
    aad.extend_from_slice(&recipient.to_be_bytes());
    aad
}

pub(crate) fn seal(
    key: &[u8; 32],
    context: &RoundContext,
    sender: u32,
    recipient: u32,
    plaintext: &[u8],
) -> Vec<u8> {
    let cipher = ChaCha20Poly1305::new(&Key::from(*key));
    let aad = associated_data(context, sender, recipient);
    cipher
        .encrypt(
            &Nonce::from([0u8; 12]),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .expect("ChaCha20-Poly1305 encryption of a short message cannot fail")
}

pub(crate) fn open(
    key: &[u8; 32],
    context: &RoundContext,
    sender: u32,
    recipient: u32,
    ciphertext: &[u8],
) -> Result<Vec<u8>, SecAggError> {
    let cipher = ChaCha20Poly1305::new(&Key::from(*key));
    let aad = associated_data(context, sender, recipient);
    cipher
        .decrypt(
            &Nonce::from([0u8; 12]),
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| {
            SecAggError::Malformed(format!(
                "the share ciphertext from participant {sender} to {recipient} does not \
                 authenticate"
            ))
        })
}

/// Whether a mask is added or subtracted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sign {
    Add,
    Subtract,
}

/// `acc ± PRG(seed)` element-wise modulo 2³².
pub(crate) fn apply_mask(acc: &mut [u32], seed: &[u8; 32], sign: Sign) {
    let mut prg = ChaCha20Rng::from_seed(*seed);
    let mut block = [0u8; 4096];
    for chunk in acc.chunks_mut(1024) {
        let bytes = &mut block[..chunk.len() * 4];
        prg.fill_bytes(bytes);
        for (a, w) in chunk.iter_mut().zip(bytes.chunks_exact(4)) {
            let m = u32::from_le_bytes(w.try_into().expect("4 bytes"));
            *a = match sign {
                Sign::Add => a.wrapping_add(m),
                Sign::Subtract => a.wrapping_sub(m),
            };
        }
    }
    // The keystream is the mask itself.
    block.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_seeds_agree_from_both_sides_and_differ_by_round() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (a, b) = (KeyPair::generate(&mut rng), KeyPair::generate(&mut rng));
        let ctx = RoundContext([1; 32]);
        let s_ab = pairwise_seed(&a.secret, &b.public, &ctx, 1, 2).unwrap();
        let s_ba = pairwise_seed(&b.secret, &a.public, &ctx, 2, 1).unwrap();
        assert_eq!(s_ab, s_ba);
        let other = pairwise_seed(&a.secret, &b.public, &RoundContext([2; 32]), 1, 2).unwrap();
        assert_ne!(s_ab, other);
    }

    #[test]
    fn a_low_order_public_key_is_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let a = KeyPair::generate(&mut rng);
        let e = pairwise_seed(&a.secret, &[0u8; 32], &RoundContext([0; 32]), 1, 2).unwrap_err();
        assert!(e.to_string().contains("low order"), "{e}");
    }

    #[test]
    fn ciphertexts_are_bound_to_their_indices() {
        let ctx = RoundContext([9; 32]);
        let key = [5u8; 32];
        let ct = seal(&key, &ctx, 1, 2, b"share");
        assert_eq!(open(&key, &ctx, 1, 2, &ct).unwrap(), b"share");
        assert!(open(&key, &ctx, 1, 3, &ct).is_err());
        assert!(open(&key, &RoundContext([8; 32]), 1, 2, &ct).is_err());
    }

    #[test]
    fn masks_cancel() {
        let mut v = vec![7u32; 3000];
        apply_mask(&mut v, &[1; 32], Sign::Add);
        assert_ne!(v[0], 7);
        apply_mask(&mut v, &[1; 32], Sign::Subtract);
        assert!(v.iter().all(|&x| x == 7));
    }
}
