//! Credentials: the app key (enrolment), device tokens and the admin token.
//!
//! - A device token is 256 random bits from the operating system, base64url. The store keeps
//!   only its SHA-256, so a copy of the database does not let anyone act as a device. A token
//!   is looked up by its hash; equality of hashes leaks nothing useful about the token.
//! - The app key and the admin token are compared as SHA-256 digests with
//!   [`subtle::ConstantTimeEq`], so neither their content nor their length shows in timing.
//! - Nothing here logs a secret: logs name the device id, never a token or key.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::metadata::MetadataMap;

use super::{Shared, store_status};

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Whether two digests are equal, in constant time.
pub fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// The bearer token of a request, or `UNAUTHENTICATED`.
pub fn bearer(metadata: &MetadataMap) -> Result<String, Status> {
    let value = metadata
        .get(fedpref_proto::metadata::AUTHORIZATION)
        .ok_or_else(|| {
            Status::unauthenticated(
                "missing `authorization` metadata: send `Bearer <token>` (devices: the token from Enroll)",
            )
        })?;
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("`authorization` metadata is not printable ASCII"))?;
    fedpref_proto::metadata::bearer_token(value)
        .map(str::to_string)
        .ok_or_else(|| Status::unauthenticated("`authorization` metadata must be `Bearer <token>`"))
}

/// Whether `key` is the deployment's app key.
pub fn app_key_matches(shared: &Shared, key: &str) -> bool {
    digest_eq(&sha256(key.as_bytes()), &shared.app_key_sha256)
}

/// Who a request's token acts as, or `UNAUTHENTICATED`: the person its enrolment grant named
/// ([`crate::enrolment::Person::principal`]), or the enrolment's own device id where it had
/// no grant. A coordinator that requires grants refuses enrolments made without one.
pub async fn device(shared: &Shared, metadata: &MetadataMap) -> Result<String, Status> {
    let token = bearer(metadata)?;
    let hash = crate::hex(&sha256(token.as_bytes()));
    if let Some(id) = shared.cached_device(&hash) {
        return Ok(id);
    }
    let key = hash.clone();
    let found = shared
        .blocking(move |c| {
            let found = c
                .store()
                .enrolment_by_token_hash(&key)
                .map_err(store_status)?;
            Ok(match found {
                Some((_, Some(principal))) => Some(principal),
                Some((_, None)) if c.grant_keys().required() => {
                    return Err(Status::unauthenticated(
                        "this device enrolled without an enrolment grant, which this coordinator now requires: enrol again with one",
                    ));
                }
                Some((id, None)) => Some(id),
                None => None,
            })
        })
        .await?;
    let id = found.ok_or_else(|| Status::unauthenticated("unknown device token: enrol again"))?;
    shared.remember_device(hash, id.clone());
    Ok(id)
}

/// Admits an admin call: one made over a connection that presented an admin client
/// certificate (`certified`, verified against `auth.admin_client_ca` during the TLS
/// handshake), or one carrying the admin token. Otherwise `UNAUTHENTICATED` when the token is
/// missing or unknown, `PERMISSION_DENIED` for a device token.
pub async fn admin(shared: &Shared, metadata: &MetadataMap, certified: bool) -> Result<(), Status> {
    if certified {
        return Ok(());
    }
    let token = bearer(metadata)?;
    let presented = sha256(token.as_bytes());
    if digest_eq(&presented, &shared.admin_token_sha256) {
        return Ok(());
    }
    let hash = crate::hex(&presented);
    if let Some(id) = shared.cached_device(&hash) {
        tracing::warn!(device = %id, "a device token was presented to the admin service");
        return Err(Status::permission_denied(
            "device tokens may not call the admin service",
        ));
    }
    let device = shared
        .blocking(move |c| c.store().device_by_token_hash(&hash).map_err(store_status))
        .await?;
    match device {
        Some(id) => {
            tracing::warn!(device = %id, "a device token was presented to the admin service");
            Err(Status::permission_denied(
                "device tokens may not call the admin service",
            ))
        }
        None => Err(Status::unauthenticated("unknown admin token")),
    }
}

/// A new device id (`dev-` and 128 random bits, hex) and token (256 random bits, base64url).
pub fn new_credentials() -> Result<(String, String), Status> {
    use rand_core::TryRng;
    let mut id = [0u8; 16];
    rand::rngs::SysRng
        .try_fill_bytes(&mut id)
        .map_err(|_| Status::unavailable("the operating system's random source failed"))?;
    let token = crate::config::random_secret()
        .map_err(|_| Status::unavailable("the operating system's random source failed"))?;
    Ok((format!("dev-{}", crate::hex(&id)), token))
}
