//! Signed ledger heads and checkpoints: what makes truncating or rewriting a run's ledger
//! evident to someone who kept a checkpoint outside the database.
//!
//! The hash chain ([`crate::ledger`]) finds an entry edited in place, but whoever can write the
//! database can also delete the tail of a chain, delete a run's rows, or rewrite a chain from
//! its first entry with recomputed hashes. Against that, the coordinator holds an Ed25519
//! **ledger signing key** (`[ledger] signing_key_file`, written by `init`, mode 0600) and, in
//! the same transaction as every entry it appends, stores a signature of the new head:
//!
//! ```text
//! message = "fedpref ledger head v1\n" ‖ run_id ‖ "\n" ‖ sequence ‖ "\n" ‖ head hash (hex) ‖ "\n" ‖ at_ms
//! ```
//!
//! A [`Checkpoint`] is one such signed head written out as JSON
//! (`fedpref-coordinator ledger checkpoint`) for an operator to keep elsewhere. `ledger verify
//! --checkpoint FILE` then fails unless the checkpoint's signature checks, the run is still in
//! the ledger, and the chain still holds the checkpoint's head at the checkpoint's position:
//! the chain *extends* the checkpoint. Nobody without the key can produce a checkpoint for a
//! rewritten chain.
//!
//! Everything here is pure but [`LedgerSigner::generate`] (the OS's random source) and
//! [`LedgerSigner::read_file`] / [`LedgerSigner::write_new_file`].

use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::ledger::{LedgerEntry, SealedEntry, VerifyFailure};

/// The domain separator at the start of every signed head.
pub const HEAD_DOMAIN: &str = "fedpref ledger head v1";

/// The `format` of a checkpoint file.
pub const CHECKPOINT_FORMAT: &str = "fedpref-ledger-checkpoint-v1";

/// A problem with a signing key file.
#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    /// The file could not be read or written.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file's contents or permissions are wrong.
    #[error("{file}: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// The random source failed.
    #[error("the operating system's random source failed: {0}")]
    Entropy(String),
}

/// The bytes a head signature signs.
pub fn head_message(run_id: &str, sequence: u64, hash: &str, at_ms: i64) -> Vec<u8> {
    format!("{HEAD_DOMAIN}\n{run_id}\n{sequence}\n{hash}\n{at_ms}").into_bytes()
}

/// The coordinator's ledger signing key.
#[derive(Clone)]
pub struct LedgerSigner {
    key: SigningKey,
}

impl std::fmt::Debug for LedgerSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret half.
        write!(f, "LedgerSigner({})", self.public_key_hex())
    }
}

impl LedgerSigner {
    /// A key from its 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// A new key from the operating system's random source.
    pub fn generate() -> Result<Self, SigningKeyError> {
        use rand_core::TryRng;
        let mut seed = [0u8; 32];
        rand::rngs::SysRng
            .try_fill_bytes(&mut seed)
            .map_err(|e| SigningKeyError::Entropy(e.to_string()))?;
        Ok(Self::from_seed(seed))
    }

    /// The public key, hex (64 characters).
    pub fn public_key_hex(&self) -> String {
        crate::hex(self.key.verifying_key().as_bytes())
    }

    /// The key file's text: the seed in hex and a newline.
    pub fn key_file_text(&self) -> String {
        format!("{}\n", crate::hex(self.key.as_bytes()))
    }

    /// Reads a key file (one line: the 32-byte seed in hex). On Unix, a file that its group or
    /// others may read is refused: whoever reads it can sign any ledger head.
    pub fn read_file(path: &Path) -> Result<Self, SigningKeyError> {
        let file = path.display().to_string();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|source| SigningKeyError::Io {
                file: file.clone(),
                source,
            })?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(SigningKeyError::Invalid {
                    file,
                    message: format!(
                        "mode {mode:o} lets others read the signing key; make it 0600 (chmod 600)"
                    ),
                });
            }
        }
        let text = std::fs::read_to_string(path).map_err(|source| SigningKeyError::Io {
            file: file.clone(),
            source,
        })?;
        let seed = decode_hex::<32>(text.trim()).ok_or_else(|| SigningKeyError::Invalid {
            file,
            message: "expected one line of 64 hex digits (an Ed25519 seed)".into(),
        })?;
        Ok(Self::from_seed(seed))
    }

    /// Writes a new random key to `path` with mode 0600, refusing to overwrite a file.
    pub fn write_new_file(path: &Path) -> Result<Self, SigningKeyError> {
        use std::io::Write;
        let signer = Self::generate()?;
        let io = |source| SigningKeyError::Io {
            file: path.display().to_string(),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(path).map_err(io)?;
        f.write_all(signer.key_file_text().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok(signer)
    }

    /// Signs any message with this key (an Ed25519 signature, 64 bytes). The same key file
    /// format serves the app backend's enrolment grant key (`fedpref-coordinator grant`).
    pub fn sign_message(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// Signs the head of `run_id`'s chain: entry `sequence` with hash `hash`, written at
    /// `at_ms`.
    pub fn sign_head(&self, run_id: &str, sequence: u64, hash: &str, at_ms: i64) -> HeadSignature {
        let signature = self.key.sign(&head_message(run_id, sequence, hash, at_ms));
        HeadSignature {
            sequence,
            at_ms,
            public_key: self.public_key_hex(),
            signature: crate::hex(&signature.to_bytes()),
        }
    }
}

/// A stored signature of a run's head after entry `sequence`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadSignature {
    /// The entry that was the head.
    pub sequence: u64,
    /// The entry's time (ms since the epoch), as signed.
    pub at_ms: i64,
    /// The signer's public key, hex.
    pub public_key: String,
    /// The Ed25519 signature of [`head_message`], hex.
    pub signature: String,
}

/// Checks an Ed25519 signature given in hex over `message` with a hex public key.
pub fn check_signature(public_key: &str, signature: &str, message: &[u8]) -> Result<(), String> {
    let key = decode_hex::<32>(public_key).ok_or("the public key is not 64 hex digits")?;
    let key = VerifyingKey::from_bytes(&key)
        .map_err(|_| "the public key is not an Ed25519 key".to_string())?;
    let sig = decode_hex::<64>(signature).ok_or("the signature is not 128 hex digits")?;
    key.verify_strict(message, &Signature::from_bytes(&sig))
        .map_err(|_| "the signature does not check".to_string())
}

/// `N` bytes from exactly `2N` hex digits, or `None`.
pub fn decode_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// What the head signatures of an intact chain say.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SignedHead {
    /// The key that signed the head, hex; `None` if the head is unsigned (a chain written by a
    /// coordinator without a signing key).
    pub public_key: Option<String>,
    /// The first entry with a signature (every later one has one too).
    pub first_signed: Option<u64>,
}

/// Checks a run's stored head signatures against its chain (already verified by
/// [`crate::ledger::verify`]): each must be for an existing entry, with that entry's hash and
/// time, and check; one key signs them all (and it is `expected_key` when one is given); and
/// once an entry is signed, every later one is, so a signature cannot be dropped to hide a
/// rewritten tail.
pub fn check_head_signatures(
    run_id: &str,
    entries: &[SealedEntry],
    signatures: &[HeadSignature],
    expected_key: Option<&str>,
) -> Result<SignedHead, VerifyFailure> {
    let fail = |sequence: u64, problem: String| VerifyFailure { sequence, problem };
    let mut key: Option<&str> = expected_key;
    let mut first_signed = None;
    let mut by_sequence = std::collections::BTreeMap::new();
    for s in signatures {
        by_sequence.insert(s.sequence, s);
    }
    for (sequence, s) in &by_sequence {
        let Some(entry) = entries.get((*sequence as usize).wrapping_sub(1)) else {
            return Err(fail(
                *sequence,
                "a head signature names this entry, which is not in the chain: entries were removed".into(),
            ));
        };
        let at_ms = serde_json::from_str::<LedgerEntry>(&entry.body)
            .map(|e| e.at_ms)
            .map_err(|e| fail(*sequence, format!("its body is not a ledger entry: {e}")))?;
        if s.at_ms != at_ms {
            return Err(fail(
                *sequence,
                "its head signature is for another time: the entry was rewritten".into(),
            ));
        }
        match key {
            Some(k) if k != s.public_key => {
                return Err(fail(
                    *sequence,
                    format!(
                        "its head is signed by key {}, not the run's ledger signing key {k}",
                        s.public_key
                    ),
                ));
            }
            _ => key = Some(&s.public_key),
        }
        check_signature(
            &s.public_key,
            &s.signature,
            &head_message(run_id, *sequence, &entry.hash, s.at_ms),
        )
        .map_err(|problem| {
            fail(
                *sequence,
                format!("its head signature does not check ({problem}): the entry or one before it was rewritten"),
            )
        })?;
        first_signed.get_or_insert(*sequence);
    }
    if let Some(first) = first_signed {
        for sequence in first..=entries.len() as u64 {
            if !by_sequence.contains_key(&sequence) {
                return Err(fail(
                    sequence,
                    format!(
                        "its head is not signed though entry {first} and later ones were: signatures were removed or the chain was rewritten"
                    ),
                ));
            }
        }
    }
    let head_signed = first_signed.is_some();
    Ok(SignedHead {
        public_key: head_signed.then(|| key.unwrap_or_default().to_string()),
        first_signed,
    })
}

/// A signed head written out for safekeeping outside the database.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// [`CHECKPOINT_FORMAT`].
    pub format: String,
    /// The run.
    pub run_id: String,
    /// Entries in the chain at the checkpoint (the head's sequence number).
    pub entry_count: u64,
    /// The head's hash, hex.
    pub head_hash: String,
    /// When the head entry was written (ms since the epoch; signed).
    pub head_at_ms: i64,
    /// The ledger signing key's public half, hex.
    pub public_key: String,
    /// The Ed25519 signature of [`head_message`], hex.
    pub signature: String,
    /// When the checkpoint was written out (ms since the epoch; not signed).
    pub written_at_ms: i64,
}

impl Checkpoint {
    /// The checkpoint of a run's current head, from its stored signature. Fails if the head is
    /// unsigned.
    pub fn of_head(
        run_id: &str,
        entries: &[SealedEntry],
        signatures: &[HeadSignature],
        written_at_ms: i64,
    ) -> Result<Self, String> {
        let head = entries
            .last()
            .ok_or_else(|| format!("run {run_id} has no ledger entries"))?;
        let signature = signatures
            .iter()
            .find(|s| s.sequence == head.sequence)
            .ok_or_else(|| {
                format!(
                    "the head of run {run_id} (entry {}) is not signed: the coordinator that wrote it had no ledger signing key ([ledger] signing_key_file)",
                    head.sequence
                )
            })?;
        let checkpoint = Self {
            format: CHECKPOINT_FORMAT.into(),
            run_id: run_id.to_string(),
            entry_count: head.sequence,
            head_hash: head.hash.clone(),
            head_at_ms: signature.at_ms,
            public_key: signature.public_key.clone(),
            signature: signature.signature.clone(),
            written_at_ms,
        };
        checkpoint.check_signature()?;
        Ok(checkpoint)
    }

    /// Parses a checkpoint file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, String> {
        let c: Self = serde_json::from_str(text)
            .map_err(|e| format!("{file}: not a ledger checkpoint: {e}"))?;
        if c.format != CHECKPOINT_FORMAT {
            return Err(format!(
                "{file}: format {:?} is not {CHECKPOINT_FORMAT:?}",
                c.format
            ));
        }
        Ok(c)
    }

    /// Pretty JSON with a final newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("checkpoints always serialise");
        s.push('\n');
        s
    }

    /// Checks the checkpoint's own signature.
    pub fn check_signature(&self) -> Result<(), String> {
        check_signature(
            &self.public_key,
            &self.signature,
            &head_message(
                &self.run_id,
                self.entry_count,
                &self.head_hash,
                self.head_at_ms,
            ),
        )
        .map_err(|p| format!("the checkpoint's signature: {p}"))
    }

    /// Checks that `entries` (the run's chain, already verified) extend this checkpoint: the
    /// signature checks and entry `entry_count` has `head_hash`.
    pub fn check_extended_by(&self, entries: &[SealedEntry]) -> Result<(), VerifyFailure> {
        let fail = |sequence: u64, problem: String| VerifyFailure { sequence, problem };
        self.check_signature().map_err(|p| {
            fail(
                self.entry_count,
                format!("checkpoint of run {}: {p}", self.run_id),
            )
        })?;
        if entries.is_empty() {
            return Err(fail(
                1,
                format!(
                    "run {} is missing from the ledger, but a checkpoint records {} entries of it: its rows were deleted",
                    self.run_id, self.entry_count
                ),
            ));
        }
        let Some(entry) = entries.get((self.entry_count as usize).wrapping_sub(1)) else {
            return Err(fail(
                entries.len() as u64 + 1,
                format!(
                    "the chain ends at entry {}, but a checkpoint records {} entries: entries were removed",
                    entries.len(),
                    self.entry_count
                ),
            ));
        };
        if entry.hash != self.head_hash {
            return Err(fail(
                self.entry_count,
                format!(
                    "its hash {} is not the checkpoint's head {}: the chain was rewritten",
                    entry.hash, self.head_hash
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{GENESIS_HASH, LedgerEvent, seal};

    fn chain(n: u64) -> Vec<SealedEntry> {
        let mut prev = GENESIS_HASH.to_string();
        (1..=n)
            .map(|sequence| {
                let e = seal(
                    &LedgerEntry {
                        run_id: "r".into(),
                        sequence,
                        at_ms: 1000 + sequence as i64,
                        event: LedgerEvent::Paused {
                            reason: format!("{sequence}"),
                        },
                    },
                    &prev,
                );
                prev = e.hash.clone();
                e
            })
            .collect()
    }

    fn sign_all(signer: &LedgerSigner, entries: &[SealedEntry]) -> Vec<HeadSignature> {
        entries
            .iter()
            .map(|e| signer.sign_head("r", e.sequence, &e.hash, 1000 + e.sequence as i64))
            .collect()
    }

    #[test]
    fn a_signed_chain_checks_and_names_its_key() {
        let signer = LedgerSigner::from_seed([7; 32]);
        let entries = chain(4);
        let sigs = sign_all(&signer, &entries);
        let head = check_head_signatures("r", &entries, &sigs, None).unwrap();
        assert_eq!(
            head.public_key.as_deref(),
            Some(signer.public_key_hex().as_str())
        );
        let cp = Checkpoint::of_head("r", &entries, &sigs, 5).unwrap();
        assert_eq!(
            (cp.entry_count, cp.head_hash.as_str()),
            (4, entries[3].hash.as_str())
        );
        let cp = Checkpoint::parse(&cp.to_json(), "cp.json").unwrap();
        cp.check_extended_by(&entries).unwrap();
        cp.check_extended_by(&chain(6)).unwrap();
    }

    #[test]
    fn a_truncated_or_rewritten_chain_does_not_extend_a_checkpoint() {
        let signer = LedgerSigner::from_seed([7; 32]);
        let entries = chain(4);
        let cp = Checkpoint::of_head("r", &entries, &sign_all(&signer, &entries), 5).unwrap();
        let e = cp.check_extended_by(&entries[..2]).unwrap_err();
        assert!(e.problem.contains("entries were removed"), "{e}");
        let e = cp.check_extended_by(&[]).unwrap_err();
        assert!(e.problem.contains("missing from the ledger"), "{e}");
        let mut other = chain(4);
        other[3] = seal(
            &LedgerEntry {
                run_id: "r".into(),
                sequence: 4,
                at_ms: 1004,
                event: LedgerEvent::Paused { reason: "x".into() },
            },
            &other[2].hash,
        );
        let e = cp.check_extended_by(&other).unwrap_err();
        assert_eq!(e.sequence, 4);
        assert!(e.problem.contains("rewritten"), "{e}");
    }

    #[test]
    fn a_forged_or_edited_checkpoint_is_refused() {
        let signer = LedgerSigner::from_seed([7; 32]);
        let entries = chain(3);
        let cp = Checkpoint::of_head("r", &entries, &sign_all(&signer, &entries), 5).unwrap();
        let mut edited = cp.clone();
        edited.entry_count = 2;
        edited.head_hash = entries[1].hash.clone();
        assert!(
            edited
                .check_extended_by(&entries)
                .unwrap_err()
                .problem
                .contains("does not check")
        );
        let mut forged = cp.clone();
        let mallory = LedgerSigner::from_seed([9; 32]);
        forged.public_key = mallory.public_key_hex();
        assert!(forged.check_signature().is_err());
        assert!(
            Checkpoint::parse("{}", "cp.json")
                .unwrap_err()
                .starts_with("cp.json")
        );
        let mut bad = cp;
        bad.signature = "zz".into();
        assert!(bad.check_signature().unwrap_err().contains("128 hex"));
    }

    #[test]
    fn signatures_by_another_key_missing_or_for_rewritten_entries_are_found() {
        let signer = LedgerSigner::from_seed([7; 32]);
        let mallory = LedgerSigner::from_seed([9; 32]);
        let entries = chain(4);
        let mut sigs = sign_all(&signer, &entries);
        // A chain whose first entries are unsigned (written before a key was configured) is
        // fine; a gap after the first signed one is not.
        check_head_signatures("r", &entries, &sigs[2..], None).unwrap();
        let mut gap = sigs.clone();
        gap.remove(2);
        assert_eq!(
            check_head_signatures("r", &entries, &gap, None)
                .unwrap_err()
                .sequence,
            3
        );
        let e = check_head_signatures("r", &entries, &sigs, Some(&mallory.public_key_hex()))
            .unwrap_err();
        assert!(
            e.problem.contains("not the run's ledger signing key"),
            "{e}"
        );
        sigs[3] = mallory.sign_head("r", 4, &entries[3].hash, 1004);
        assert_eq!(
            check_head_signatures("r", &entries, &sigs, None)
                .unwrap_err()
                .sequence,
            4
        );
        let mut sigs = sign_all(&signer, &entries);
        sigs[1].signature = sigs[0].signature.clone();
        let e = check_head_signatures("r", &entries, &sigs, None).unwrap_err();
        assert!(e.problem.contains("does not check"), "{e}");
        let e = check_head_signatures("r", &entries[..2], &sign_all(&signer, &entries), None)
            .unwrap_err();
        assert!(e.problem.contains("entries were removed"), "{e}");
    }

    #[test]
    fn key_files_round_trip_are_0600_and_refuse_bad_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.key");
        let signer = LedgerSigner::write_new_file(&path).unwrap();
        let read = LedgerSigner::read_file(&path).unwrap();
        assert_eq!(read.public_key_hex(), signer.public_key_hex());
        assert!(LedgerSigner::write_new_file(&path).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = LedgerSigner::read_file(&path).unwrap_err().to_string();
            assert!(e.contains("0600"), "{e}");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        std::fs::write(&path, "not hex\n").unwrap();
        let e = LedgerSigner::read_file(&path).unwrap_err().to_string();
        assert!(e.contains("64 hex digits"), "{e}");
    }
}
