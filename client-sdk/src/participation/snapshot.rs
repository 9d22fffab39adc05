//! The coordinator's `ModelSnapshot` as the SDK's [`MatrixFactorization`], and what the
//! store keeps for participation: the enrolment, the installed snapshot's identity and a
//! download in progress.
//!
//! # Item keys
//! Row `r` of every per-item tensor belongs to one catalogue item. The protocol says which
//! in `ModelSnapshot.item_keys`; when a snapshot carries them (the same count as rows) they
//! are used as they are. The current coordinator does not send them — its manifest knows
//! only the number of items — so then row `r` is the catalogue key
//! `{item_key_prefix}{r}` (default prefix `i`: rows 0, 1, 2 … are items `i0`, `i1`,
//! `i2` …, the keys the JSON Lines examples in docs/app-developers.md use). An app whose catalogue uses other keys
//! either sets the prefix or has its coordinator publish `item_keys`. Catalogue items
//! without a row are simply not in the model (they rank by popularity); rows without a
//! catalogue item are trained by no one on this device.

use fedpref_proto::v1::{ModelSnapshot, ModelVersionRef, NamedTensor, model_spec};
use rusqlite::{OptionalExtension, params};

use super::ParticipationError;
use crate::SdkError;
use crate::device::Device;
use crate::model::{MatrixFactorization, PreferenceModel};

/// The device's credentials at one coordinator. `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Enrolment {
    /// The coordinator's URL the device enrolled at.
    pub endpoint: String,
    /// The opaque id the coordinator assigned.
    pub device_id: String,
    pub(crate) device_token: String,
}

impl std::fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolment")
            .field("endpoint", &self.endpoint)
            .field("device_id", &self.device_id)
            .field("device_token", &"<redacted>")
            .finish()
    }
}

/// A download in progress, as the store holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartialDownload {
    /// The run.
    pub run_id: String,
    /// The version.
    pub model_version: u64,
    /// The SHA-256 the whole snapshot must have.
    pub sha256: Vec<u8>,
    /// The snapshot's size.
    pub size_bytes: u64,
    /// Bytes held so far (from offset 0, without gaps).
    pub held_bytes: u64,
}

fn tensor<'a>(
    snapshot: &'a ModelSnapshot,
    name: &str,
    shape: &[u64],
) -> Result<&'a NamedTensor, ParticipationError> {
    let t = snapshot
        .tensors
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| {
            ParticipationError::Download(format!(
                "model version {}: tensor `{name}` is missing",
                snapshot.model_version
            ))
        })?;
    if t.shape != shape {
        return Err(ParticipationError::Download(format!(
            "model version {}: tensor `{name}` has shape {:?}, expected {shape:?}",
            snapshot.model_version, t.shape
        )));
    }
    Ok(t)
}

/// Maps a snapshot to the SDK's model (see the module docs for item keys).
pub fn model_from_snapshot(
    snapshot: &ModelSnapshot,
    item_key_prefix: &str,
) -> Result<MatrixFactorization, ParticipationError> {
    let bad = |m: String| {
        ParticipationError::Download(format!("model version {}: {m}", snapshot.model_version))
    };
    let factors = snapshot
        .tensors
        .iter()
        .find(|t| t.name == "item_factors")
        .ok_or_else(|| bad("tensor `item_factors` is missing".into()))?;
    let [items, k] = factors.shape[..] else {
        return Err(bad(format!(
            "tensor `item_factors` has shape {:?}, expected [items, k]",
            factors.shape
        )));
    };
    if let Some(model_spec::Model::MatrixFactorization(spec)) =
        snapshot.spec.as_ref().and_then(|s| s.model.as_ref())
        && (spec.item_count != items || u64::from(spec.factor_dimension) != k)
    {
        return Err(bad(format!(
            "the spec says {} items × k = {}, `item_factors` is [{items}, {k}]",
            spec.item_count, spec.factor_dimension
        )));
    }
    let values = |t: &NamedTensor| t.to_f64_vec().map_err(|e| bad(e.to_string()));
    let factors = values(factors)?;
    let biases = values(tensor(snapshot, "item_biases", &[items])?)?;
    let offset = values(tensor(snapshot, "global_offset", &[])?)?[0];
    let keys: Vec<String> = if snapshot.item_keys.is_empty() {
        (0..items)
            .map(|r| format!("{item_key_prefix}{r}"))
            .collect()
    } else if snapshot.item_keys.len() as u64 == items {
        snapshot.item_keys.clone()
    } else {
        return Err(bad(format!(
            "{} item keys for {items} rows",
            snapshot.item_keys.len()
        )));
    };
    MatrixFactorization::from_flat(
        snapshot.model_version,
        keys,
        k as usize,
        factors,
        biases,
        offset,
    )
    .map_err(|e| bad(e.to_string()))
}

impl Device {
    /// The enrolment held in the store, if any.
    pub fn enrolment(&self) -> Result<Option<Enrolment>, SdkError> {
        Ok(self
            .conn
            .query_row(
                "SELECT endpoint, device_id, device_token FROM enrolment WHERE id = 1",
                [],
                |r| {
                    Ok(Enrolment {
                        endpoint: r.get(0)?,
                        device_id: r.get(1)?,
                        device_token: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    pub(crate) fn store_enrolment(&mut self, e: &Enrolment, now_ms: i64) -> Result<(), SdkError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO enrolment (id, endpoint, device_id, device_token, enrolled_ms)
             VALUES (1, ?1, ?2, ?3, ?4)",
            params![e.endpoint, e.device_id, e.device_token, now_ms],
        )?;
        Ok(())
    }

    /// Forgets the enrolment (the next participation enrols again).
    pub fn forget_enrolment(&mut self) -> Result<(), SdkError> {
        self.conn.execute("DELETE FROM enrolment", [])?;
        Ok(())
    }

    /// The snapshot the installed model came from, if it was downloaded and is still the
    /// installed one.
    pub fn held_snapshot(&self) -> Result<Option<ModelVersionRef>, SdkError> {
        let held = self
            .conn
            .query_row(
                "SELECT run_id, model_version, sha256, size_bytes FROM installed_snapshot WHERE id = 1",
                [],
                |r| {
                    Ok(ModelVersionRef {
                        run_id: r.get(0)?,
                        model_version: r.get::<_, i64>(1)? as u64,
                        sha256: r.get(2)?,
                        size_bytes: r.get::<_, i64>(3)? as u64,
                    })
                },
            )
            .optional()?;
        let installed = self.model.as_ref().map(PreferenceModel::version);
        Ok(held.filter(|h| Some(h.model_version) == installed))
    }

    /// The download in progress, if any.
    pub fn partial_download(&self) -> Result<Option<PartialDownload>, SdkError> {
        let held: i64 = self.conn.query_row(
            "SELECT coalesce(sum(length(content)), 0) FROM model_download_chunks",
            [],
            |r| r.get(0),
        )?;
        Ok(self
            .conn
            .query_row(
                "SELECT run_id, model_version, sha256, size_bytes FROM model_download WHERE id = 1",
                [],
                |r| {
                    Ok(PartialDownload {
                        run_id: r.get(0)?,
                        model_version: r.get::<_, i64>(1)? as u64,
                        sha256: r.get(2)?,
                        size_bytes: r.get::<_, i64>(3)? as u64,
                        held_bytes: held as u64,
                    })
                },
            )
            .optional()?)
    }

    /// Starts a download of `model` from byte 0, discarding any other one in progress.
    pub(crate) fn begin_download(&mut self, model: &ModelVersionRef) -> Result<(), SdkError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM model_download_chunks", [])?;
        tx.execute(
            "INSERT OR REPLACE INTO model_download (id, run_id, model_version, sha256, size_bytes)
             VALUES (1, ?1, ?2, ?3, ?4)",
            params![
                model.run_id,
                model.model_version as i64,
                model.sha256,
                model.size_bytes as i64
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Keeps one received chunk (durably, before the next is asked for).
    pub(crate) fn append_download_chunk(
        &mut self,
        start_byte: u64,
        content: &[u8],
    ) -> Result<(), SdkError> {
        self.conn.execute(
            "INSERT INTO model_download_chunks (start_byte, content) VALUES (?1, ?2)",
            params![start_byte as i64, content],
        )?;
        Ok(())
    }

    /// The bytes of the download in progress, in order.
    pub(crate) fn download_bytes(&self) -> Result<Vec<u8>, SdkError> {
        let mut stmt = self
            .conn
            .prepare("SELECT content FROM model_download_chunks ORDER BY start_byte")?;
        let mut bytes = Vec::new();
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            bytes.extend_from_slice(row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?);
        }
        Ok(bytes)
    }

    /// Drops the download in progress.
    pub fn discard_download(&mut self) -> Result<(), SdkError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM model_download_chunks", [])?;
        tx.execute("DELETE FROM model_download", [])?;
        tx.commit()?;
        Ok(())
    }

    /// Installs a downloaded model and records which snapshot it came from; the download's
    /// chunks are dropped.
    pub(crate) fn install_snapshot(
        &mut self,
        model: MatrixFactorization,
        from: &ModelVersionRef,
    ) -> Result<(), SdkError> {
        self.install_model(model)?;
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO installed_snapshot (id, run_id, model_version, sha256, size_bytes)
             VALUES (1, ?1, ?2, ?3, ?4)",
            params![
                from.run_id,
                from.model_version as i64,
                from.sha256,
                from.size_bytes as i64
            ],
        )?;
        tx.execute("DELETE FROM model_download_chunks", [])?;
        tx.execute("DELETE FROM model_download", [])?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedpref_proto::v1::{MatrixFactorizationSpec, ModelSpec};

    fn snapshot(keys: Vec<String>) -> ModelSnapshot {
        ModelSnapshot {
            run_id: "r".into(),
            model_version: 3,
            spec: Some(ModelSpec {
                model: Some(model_spec::Model::MatrixFactorization(
                    MatrixFactorizationSpec {
                        item_count: 2,
                        factor_dimension: 2,
                        ..Default::default()
                    },
                )),
            }),
            tensors: vec![
                NamedTensor::from_f32("item_factors", vec![2, 2], &[0.5, -0.5, 0.25, 1.0]).unwrap(),
                NamedTensor::from_f32("item_biases", vec![2], &[0.1, -0.1]).unwrap(),
                NamedTensor::from_f32("global_offset", vec![], &[3.0]).unwrap(),
            ],
            item_keys: keys,
            ..Default::default()
        }
    }

    #[test]
    fn rows_become_prefixed_keys_unless_the_snapshot_names_its_items() {
        let m = model_from_snapshot(&snapshot(vec![]), "i").unwrap();
        assert_eq!(m.item_ids(), ["i0", "i1"]);
        assert_eq!(m.version(), 3);
        assert_eq!(
            m.item_factors().iter().copied().collect::<Vec<_>>(),
            [0.5, -0.5, 0.25, 1.0]
        );
        assert_eq!(m.item_biases()[1], f64::from(-0.1f32));
        assert_eq!(m.global_offset(), 3.0);
        let m = model_from_snapshot(&snapshot(vec!["a".into(), "b".into()]), "i").unwrap();
        assert_eq!(m.item_ids(), ["a", "b"]);
    }

    #[test]
    fn a_snapshot_that_does_not_fit_is_refused_naming_the_tensor() {
        let e = model_from_snapshot(&snapshot(vec!["a".into()]), "i").unwrap_err();
        assert!(e.to_string().contains("1 item keys for 2 rows"), "{e}");
        let mut s = snapshot(vec![]);
        s.tensors.remove(1);
        let e = model_from_snapshot(&s, "i").unwrap_err().to_string();
        assert!(e.contains("`item_biases` is missing"), "{e}");
    }

    #[test]
    fn the_token_is_never_in_debug_output() {
        let e = Enrolment {
            endpoint: "https://c".into(),
            device_id: "dev-1".into(),
            device_token: "s3cret-token".into(),
        };
        assert!(!format!("{e:?}").contains("s3cret"));
    }
}
