//! The messages of the four stages, as plain structs. They mirror `fedpref.v1`'s
//! `SecureAggregationService` messages field for field (public keys are fixed 32-byte arrays
//! here; the protocol layer checks lengths when converting), and [`wire_len`](AdvertiseKeys::wire_len)
//! gives the size of their protobuf encoding, which the benchmark reports.

use serde::{Deserialize, Serialize};

/// Stage 1, device → server: the device's two fresh X25519 public keys for the round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertiseKeys {
    /// Key for encrypting the shares sent to this device.
    pub encryption_public_key: [u8; 32],
    /// Key for agreeing pairwise masks.
    pub masking_public_key: [u8; 32],
}

/// One participant's public keys, as the server relays them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantKeys {
    /// Per-round participant index, ≥ 1; also the Shamir x-coordinate of its shares.
    pub participant_index: u32,
    /// As in [`AdvertiseKeys::encryption_public_key`].
    pub encryption_public_key: [u8; 32],
    /// As in [`AdvertiseKeys::masking_public_key`].
    pub masking_public_key: [u8; 32],
}

/// Stage 2 input, server → device: the device's index and its neighbours' keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDirectory {
    /// The device's own participant index.
    pub own_index: u32,
    /// The device's neighbours that advertised keys.
    pub neighbours: Vec<ParticipantKeys>,
    /// Shamir threshold t.
    pub threshold: u32,
}

/// An encrypted message from one participant to another, relayed by the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    /// The participant that made the shares.
    pub sender_index: u32,
    /// The participant the ciphertext is for.
    pub recipient_index: u32,
    /// ChaCha20-Poly1305 ciphertext of the sender's share of its self-mask seed and of its
    /// masking secret key, for the recipient's x-coordinate.
    pub ciphertext: Vec<u8>,
}

/// Stage 2, device → server: one ciphertext per neighbour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareKeys {
    /// The ciphertexts.
    pub shares: Vec<EncryptedShare>,
}

/// Stage 3 input, server → device: the ciphertexts addressed to the device, one from each
/// neighbour that completed stage 2.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareInbox {
    /// The ciphertexts.
    pub shares: Vec<EncryptedShare>,
}

/// Stage 3, device → server: the masked, encoded update (carried by `UploadUpdate` as a
/// `DTYPE_U32` tensor).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedInput {
    /// The masked values modulo 2³².
    pub values: Vec<u32>,
}

/// Stage 4 input, server → device: which of the device's neighbours survived and which
/// dropped. The two lists are disjoint; a device refuses a plan where they are not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskingPlan {
    /// Neighbours whose masked input arrived: reveal their self-mask seed share.
    pub survivor_indices: Vec<u32>,
    /// Neighbours whose masked input did not arrive: reveal their masking-key share.
    pub dropped_indices: Vec<u32>,
}

/// Which secret a revealed share belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ShareKind {
    /// A share of a survivor's self-mask seed.
    SelfMaskSeed,
    /// A share of a dropped participant's masking secret key.
    MaskingKey,
}

/// One revealed Shamir share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevealedShare {
    /// The participant whose secret the share belongs to.
    pub owner_index: u32,
    /// Which of its secrets.
    pub kind: ShareKind,
    /// The share's value ([`crate::shamir::Share::to_bytes`]; the x-coordinate is the sender's
    /// index).
    pub share: Vec<u8>,
}

/// Stage 4, device → server: one share per neighbour in the device's plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unmask {
    /// The revealed shares.
    pub shares: Vec<RevealedShare>,
}

/// A 32-byte public key from a protocol `bytes` field, refusing any other length.
pub fn public_key_from_slice(field: &str, bytes: &[u8]) -> Result<[u8; 32], crate::SecAggError> {
    bytes.try_into().map_err(|_| {
        crate::SecAggError::Malformed(format!(
            "{field} is {} bytes; an X25519 public key is 32",
            bytes.len()
        ))
    })
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}
/// A length-delimited field of `len` bytes.
fn bytes_field(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}
/// A `uint32` field (absent when 0, as proto3 encodes it).
fn u32_field(v: u32) -> usize {
    if v == 0 {
        0
    } else {
        1 + varint_len(u64::from(v))
    }
}

impl AdvertiseKeys {
    /// Size of the protobuf encoding of the message's own fields (the task reference, common
    /// to every upload, is not counted).
    pub fn wire_len(&self) -> usize {
        2 * bytes_field(32)
    }
}

impl EncryptedShare {
    fn wire_len(&self) -> usize {
        u32_field(self.sender_index)
            + u32_field(self.recipient_index)
            + bytes_field(self.ciphertext.len())
    }
}

impl ShareKeys {
    /// Size of the protobuf encoding (task reference not counted).
    pub fn wire_len(&self) -> usize {
        self.shares.iter().map(|s| bytes_field(s.wire_len())).sum()
    }
}

impl ShareInbox {
    /// Size of the protobuf encoding.
    pub fn wire_len(&self) -> usize {
        self.shares.iter().map(|s| bytes_field(s.wire_len())).sum()
    }
}

impl MaskedInput {
    /// Size of the values as one packed little-endian `u32` tensor field.
    pub fn wire_len(&self) -> usize {
        bytes_field(4 * self.values.len())
    }
}

impl Unmask {
    /// Size of the protobuf encoding (task reference not counted).
    pub fn wire_len(&self) -> usize {
        self.shares
            .iter()
            .map(|s| bytes_field(u32_field(s.owner_index) + 2 + bytes_field(s.share.len())))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_keys_of_the_wrong_length_are_refused_by_field_name() {
        assert!(public_key_from_slice("masking_public_key", &[1; 32]).is_ok());
        let e = public_key_from_slice("masking_public_key", &[1; 31]).unwrap_err();
        assert!(
            e.to_string().contains("masking_public_key is 31 bytes"),
            "{e}"
        );
    }

    #[test]
    fn varints_have_protobuf_lengths() {
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(127), 1);
        assert_eq!(varint_len(128), 2);
        assert_eq!(varint_len(65_536), 3);
        assert_eq!(
            MaskedInput {
                values: vec![0; 16_384]
            }
            .wire_len(),
            65_536 + 4
        );
    }
}
