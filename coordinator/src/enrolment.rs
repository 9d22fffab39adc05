//! Enrolment grants: the app backend's signed word that an enrolling device belongs to one
//! person, so that participation, its limits and every ε count per person rather than per
//! enrolment.
//!
//! Without grants a device is whoever holds an app key: a person with two devices, or one who
//! deletes everything and enrols again, is two enrolments, and the ledger and the report say
//! that the guarantees hold per enrolment. With `auth.enrolment_grant_keys` configured, `Enroll`
//! requires an [`pb::EnrolmentGrant`]: an encoded [`pb::GrantClaims`] (the backend's pseudonym
//! for the person and an expiry) with the backend's Ed25519 signature over exactly those bytes.
//! The coordinator checks the signature against its keys, derives the person's
//! [`Person::principal`] (a keyed hash of the pseudonym, the only form it stores) and uses that, not
//! the enrolment, as the device's identity everywhere after authentication: the round engine's
//! one update per round, the participation history behind the limits and DP-FTRL, and the
//! secure-aggregation participant. Enrolments per person are capped
//! (`limits.max_enrolments_per_person` per `limits.person_enrolment_window_seconds`).

use ed25519_dalek::{Signature, VerifyingKey};
use fedpref_proto::prost::Message;
use fedpref_proto::v1 as pb;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::checkpoint::{LedgerSigner, decode_hex};

/// Largest `EnrolmentGrant.claims` accepted, in bytes.
pub const MAX_CLAIMS_BYTES: usize = 1024;
/// Longest `GrantClaims.pseudonym`, in bytes.
pub const MAX_PSEUDONYM_BYTES: usize = 128;
/// The longest a grant may still be valid when it is presented: 7 days. A grant is meant to be
/// fetched when the device enrols; a longer one would be a standing credential.
pub const MAX_GRANT_LIFETIME_MS: i64 = 7 * 86_400_000;
/// What the backend signs: this tag, then the encoded claims (so that no other message signed
/// with the same kind of key can pass for a grant).
pub const GRANT_SIGNATURE_DOMAIN: &[u8] = b"fedpref enrolment grant v1\n";
/// Prefix of a person's principal (the identity a grant-enrolled device acts as).
pub const PRINCIPAL_PREFIX: &str = "person-";
const PRINCIPAL_DOMAIN: &[u8] = b"fedpref enrolment grant person v1\n";

/// Why a grant is refused. Each message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrantError {
    /// The coordinator needs a grant and none came.
    #[error(
        "grant: missing; this coordinator counts participation per person and enrols only devices with a grant signed by the app's backend"
    )]
    Missing,
    /// A field is malformed.
    #[error("grant.{field}: {message}")]
    Invalid {
        /// The field, below `grant`.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No configured key made the signature.
    #[error("grant.signature: not made by any of this coordinator's auth.enrolment_grant_keys")]
    BadSignature,
    /// The grant's time is up.
    #[error("grant.claims.expires_at: the grant expired at {expires_at_ms} ms since the epoch")]
    Expired {
        /// When it expired.
        expires_at_ms: i64,
    },
}

/// The person a valid grant names, as the coordinator keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// `person-` and the first 128 bits of HMAC-SHA-256, under the deployment's person key
    /// (`auth.person_key_file`), of a domain tag and the pseudonym, hex: the device's
    /// identity for everything after authentication. The pseudonym itself is not stored, and
    /// without the key a guessed pseudonym cannot be checked against a stored principal.
    pub principal: String,
}

impl Person {
    /// The person with backend pseudonym `pseudonym`, under the person key `key`.
    pub fn from_pseudonym(key: &[u8], pseudonym: &str) -> Self {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes a key of any length");
        mac.update(PRINCIPAL_DOMAIN);
        mac.update(pseudonym.as_bytes());
        Self {
            principal: format!(
                "{PRINCIPAL_PREFIX}{}",
                crate::hex(&mac.finalize().into_bytes()[..16])
            ),
        }
    }
}

/// The app backend's public keys a coordinator accepts grants from (more than one while a key
/// is being rotated). Empty: grants are neither needed nor accepted.
#[derive(Debug, Clone, Default)]
pub struct GrantKeys {
    keys: Vec<VerifyingKey>,
    /// The key of the principal's HMAC (`auth.person_key_file`).
    person_key: Vec<u8>,
}

impl GrantKeys {
    /// Keys from their hex form (64 hex digits each); the error names the bad entry.
    pub fn parse(hex_keys: &[String]) -> Result<Self, String> {
        hex_keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let bytes = decode_hex::<32>(k.trim())
                    .ok_or_else(|| format!("[{i}]: not 64 hex digits (an Ed25519 public key)"))?;
                VerifyingKey::from_bytes(&bytes)
                    .map_err(|_| format!("[{i}]: not an Ed25519 public key"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|keys| Self {
                keys,
                person_key: vec![],
            })
    }

    /// The keys, with `person_key` keying the principal of every person a grant names.
    pub fn with_person_key(mut self, person_key: &str) -> Self {
        self.person_key = person_key.as_bytes().to_vec();
        self
    }

    /// Whether grants are required (some key is configured).
    pub fn required(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks a grant at time `now_ms`: size, signature by one of the keys (strict Ed25519),
    /// then the claims (a 1 to 128 byte pseudonym, an expiry in the future).
    pub fn verify(&self, grant: &pb::EnrolmentGrant, now_ms: i64) -> Result<Person, GrantError> {
        let invalid = |field, message: String| GrantError::Invalid { field, message };
        if grant.claims.is_empty() || grant.claims.len() > MAX_CLAIMS_BYTES {
            return Err(invalid(
                "claims",
                format!(
                    "{} bytes; must be 1 to {MAX_CLAIMS_BYTES}",
                    grant.claims.len()
                ),
            ));
        }
        let signature: [u8; 64] = grant.signature.as_slice().try_into().map_err(|_| {
            invalid(
                "signature",
                format!(
                    "{} bytes; an Ed25519 signature is 64",
                    grant.signature.len()
                ),
            )
        })?;
        let signature = Signature::from_bytes(&signature);
        let signed = signed_bytes(&grant.claims);
        if !self
            .keys
            .iter()
            .any(|k| k.verify_strict(&signed, &signature).is_ok())
        {
            return Err(GrantError::BadSignature);
        }
        let claims = pb::GrantClaims::decode(grant.claims.as_slice())
            .map_err(|e| invalid("claims", format!("not an encoded GrantClaims: {e}")))?;
        if claims.pseudonym.is_empty() || claims.pseudonym.len() > MAX_PSEUDONYM_BYTES {
            return Err(invalid(
                "claims.pseudonym",
                format!(
                    "{} bytes; must be 1 to {MAX_PSEUDONYM_BYTES}",
                    claims.pseudonym.len()
                ),
            ));
        }
        let expires = claims
            .expires_at
            .ok_or_else(|| invalid("claims.expires_at", "must be set".into()))?;
        if !(0..1_000_000_000).contains(&expires.nanos) {
            return Err(invalid(
                "claims.expires_at",
                format!("nanos {} is not in 0..1000000000", expires.nanos),
            ));
        }
        let expires_at_ms = expires
            .seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(expires.nanos) / 1_000_000);
        if expires_at_ms <= now_ms {
            return Err(GrantError::Expired { expires_at_ms });
        }
        if expires_at_ms - now_ms > MAX_GRANT_LIFETIME_MS {
            return Err(invalid(
                "claims.expires_at",
                format!(
                    "{} s from now; a grant may be valid for at most {} s (7 days)",
                    (expires_at_ms - now_ms) / 1000,
                    MAX_GRANT_LIFETIME_MS / 1000
                ),
            ));
        }
        Ok(Person::from_pseudonym(&self.person_key, &claims.pseudonym))
    }
}

/// A grant for `pseudonym` expiring at `expires_at_ms`, signed with `key` (what an app backend
/// does; `fedpref-coordinator grant sign` does it from the command line).
pub fn sign(key: &LedgerSigner, pseudonym: &str, expires_at_ms: i64) -> pb::EnrolmentGrant {
    let claims = pb::GrantClaims {
        pseudonym: pseudonym.to_string(),
        expires_at: Some(fedpref_proto::prost_types::Timestamp {
            seconds: expires_at_ms.div_euclid(1000),
            nanos: (expires_at_ms.rem_euclid(1000) * 1_000_000) as i32,
        }),
    }
    .encode_to_vec();
    pb::EnrolmentGrant {
        signature: key.sign_message(&signed_bytes(&claims)).to_vec(),
        claims,
    }
}

/// The bytes a grant's signature covers: [`GRANT_SIGNATURE_DOMAIN`], then the claims.
pub fn signed_bytes(claims: &[u8]) -> Vec<u8> {
    [GRANT_SIGNATURE_DOMAIN, claims].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    const PERSON_KEY: &str = "a deployment's person key, 32 chars or more";

    fn keys(signer: &LedgerSigner) -> GrantKeys {
        GrantKeys::parse(&[signer.public_key_hex()])
            .unwrap()
            .with_person_key(PERSON_KEY)
    }

    #[test]
    fn a_signed_grant_names_one_person_whatever_device_presents_it() {
        let signer = LedgerSigner::from_seed([7; 32]);
        let keys = keys(&signer);
        assert!(keys.required());
        let a = keys
            .verify(&sign(&signer, "user-42", NOW + 60_000), NOW)
            .unwrap();
        let b = keys
            .verify(&sign(&signer, "user-42", NOW + 3_600_000), NOW)
            .unwrap();
        assert_eq!(a, b);
        assert!(a.principal.starts_with(PRINCIPAL_PREFIX));
        assert!(
            !a.principal.contains("user-42"),
            "the pseudonym is not kept"
        );
        let other = keys
            .verify(&sign(&signer, "user-43", NOW + 60_000), NOW)
            .unwrap();
        assert_ne!(a, other);
        // The principal is keyed: the same pseudonym is another principal under another
        // deployment's key, and no unkeyed hash of it matches.
        let elsewhere = GrantKeys::parse(&[signer.public_key_hex()])
            .unwrap()
            .with_person_key("another deployment's person key, also long")
            .verify(&sign(&signer, "user-42", NOW + 60_000), NOW)
            .unwrap();
        assert_ne!(a, elsewhere);
        assert_eq!(a, Person::from_pseudonym(PERSON_KEY.as_bytes(), "user-42"));
        use sha2::Digest;
        let unkeyed = sha2::Sha256::digest([PRINCIPAL_DOMAIN, b"user-42"].concat());
        assert!(!a.principal.contains(&crate::hex(&unkeyed[..16])));
    }

    #[test]
    fn forged_expired_and_malformed_grants_are_refused_naming_the_field() {
        let signer = LedgerSigner::from_seed([7; 32]);
        let keys = keys(&signer);
        let good = sign(&signer, "user-42", NOW + 60_000);
        // Another key, a flipped bit in the claims, a flipped bit in the signature.
        let stranger = LedgerSigner::from_seed([8; 32]);
        assert_eq!(
            keys.verify(&sign(&stranger, "user-42", NOW + 60_000), NOW),
            Err(GrantError::BadSignature)
        );
        let mut tampered = good.clone();
        tampered.claims[3] ^= 1;
        assert_eq!(keys.verify(&tampered, NOW), Err(GrantError::BadSignature));
        let mut tampered = good.clone();
        tampered.signature[10] ^= 1;
        assert_eq!(keys.verify(&tampered, NOW), Err(GrantError::BadSignature));
        assert_eq!(
            keys.verify(&sign(&signer, "user-42", NOW), NOW),
            Err(GrantError::Expired { expires_at_ms: NOW })
        );
        let message = |g: &pb::EnrolmentGrant| keys.verify(g, NOW).unwrap_err().to_string();
        assert!(message(&pb::EnrolmentGrant::default()).starts_with("grant.claims: 0 bytes"));
        let mut short = good.clone();
        short.signature.truncate(63);
        assert!(message(&short).starts_with("grant.signature: 63 bytes"));
        let mut huge = good.clone();
        huge.claims = vec![0; MAX_CLAIMS_BYTES + 1];
        assert!(message(&huge).starts_with("grant.claims: 1025 bytes"));
        assert!(
            message(&sign(&signer, "", NOW + 1)).starts_with("grant.claims.pseudonym: 0 bytes"),
        );
        assert!(
            message(&sign(&signer, &"u".repeat(129), NOW + 1))
                .starts_with("grant.claims.pseudonym: 129 bytes")
        );
        // Signed bytes that are not claims, and claims without an expiry.
        let garbage = b"\xff\xff\xff".to_vec();
        let forged = pb::EnrolmentGrant {
            signature: signer.sign_message(&signed_bytes(&garbage)).to_vec(),
            claims: garbage,
        };
        assert!(message(&forged).starts_with("grant.claims: not an encoded GrantClaims"));
        let no_expiry = pb::GrantClaims {
            pseudonym: "user-42".into(),
            expires_at: None,
        }
        .encode_to_vec();
        let forged = pb::EnrolmentGrant {
            signature: signer.sign_message(&signed_bytes(&no_expiry)).to_vec(),
            claims: no_expiry,
        };
        assert_eq!(message(&forged), "grant.claims.expires_at: must be set");
        // The claims alone, signed without the domain tag, are not a grant.
        let mut untagged = good.clone();
        untagged.signature = signer.sign_message(&good.claims).to_vec();
        assert_eq!(keys.verify(&untagged, NOW), Err(GrantError::BadSignature));
        // A grant valid for years is a standing credential: refused.
        assert!(
            message(&sign(&signer, "user-42", NOW + 8 * 86_400_000))
                .starts_with("grant.claims.expires_at: 691200 s from now")
        );
        assert!(
            keys.verify(&sign(&signer, "user-42", NOW + MAX_GRANT_LIFETIME_MS), NOW)
                .is_ok()
        );
        let far = pb::GrantClaims {
            pseudonym: "user-42".into(),
            expires_at: Some(fedpref_proto::prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: -5,
            }),
        }
        .encode_to_vec();
        let forged = pb::EnrolmentGrant {
            signature: signer.sign_message(&signed_bytes(&far)).to_vec(),
            claims: far,
        };
        assert!(message(&forged).starts_with("grant.claims.expires_at: nanos -5"));
    }

    #[test]
    fn keys_parse_from_hex_and_name_the_bad_entry() {
        let signer = LedgerSigner::from_seed([7; 32]);
        assert!(!GrantKeys::parse(&[]).unwrap().required());
        let e = GrantKeys::parse(&[signer.public_key_hex(), "zz".into()]).unwrap_err();
        assert!(e.starts_with("[1]: not 64 hex digits"), "{e}");
    }
}
