//! The subject vault: create, read, update, find, batch-read and erase subjects, sealing every leaf
//! under the subject's own data key.

use std::{collections::BTreeMap, sync::Arc};

use uuid::Uuid;

use super::{
    Caller, DomainError, FieldChanges, FieldPath, FieldValue, StoredField, Violation, now_us,
    paths::IndexKind,
    record::{RecordError, SealedRecord, index_key, new_subject_id},
    values,
};
use crate::{
    crypto::{CryptoError, FieldCipher, Keyring, SecretKey, WrappedKey},
    store::{IndexEntry, Store, StoreError, SubjectRow, WriteOp, WriteOutcome},
};

/// Most ids one BatchGetSubjects call may ask for.
pub const MAX_BATCH_GET: usize = 100;
/// Most ids one FindSubjects call returns.
pub const MAX_FIND_RESULTS: u32 = 1000;
/// How long an update without `expected_version` keeps retrying when other writes to the same
/// subject get there first (each round one of the competing writers wins).
const UPDATE_RETRY_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

/// A subject as read: the leaves asked for that are stored, with their provenance.
#[derive(Debug, Clone)]
pub struct SubjectView {
    pub id: Uuid,
    pub version: u64,
    pub created_at_us: i64,
    pub updated_at_us: i64,
    pub fields: BTreeMap<FieldPath, StoredField>,
}

/// An equality lookup: a blind-indexed path and its value, parsed and normalised at the edge.
#[derive(Clone)]
pub struct LookupKey {
    pub path: FieldPath,
    pub value: String,
}

/// The vault service of one instance.
pub struct Vault {
    store: Store,
    keyring: Arc<Keyring>,
}

impl Vault {
    pub fn new(store: Store, keyring: Arc<Keyring>) -> Self {
        Self { store, keyring }
    }

    /// Creates a subject holding `fields`; returns it as stored (version 1).
    pub async fn create(
        &self,
        caller: &Caller,
        mut fields: BTreeMap<FieldPath, FieldValue>,
        source: Option<String>,
    ) -> Result<SubjectView, DomainError> {
        let mut changes: FieldChanges = fields.iter().map(|(p, v)| (*p, Some(v.clone()))).collect();
        normalise_postal_codes(&mut changes, &BTreeMap::new())?;
        for (path, change) in changes {
            if let Some(value) = change {
                fields.insert(path, value);
            }
        }
        let source = source.unwrap_or_else(|| caller.name.clone());
        let now = now_us();
        let id = new_subject_id();
        let dek_id = Uuid::new_v4();
        let dek = SecretKey::random()?;
        let wrapped = self.keyring.wrap_dek(id, dek_id, &dek)?;
        let cipher = FieldCipher::new(&dek, id, dek_id)?;
        let mut record = SealedRecord::default();
        let mut index = Vec::new();
        for (path, value) in &fields {
            record.set(&cipher, *path, value, now, &source)?;
            if let Some(entry) = self.index_entry(*path, value) {
                index.push(entry);
            }
        }
        let row = SubjectRow {
            id,
            dek_id,
            kek_version: wrapped.wrapping_version,
            wrapped_dek: wrapped.bytes,
            record: record.to_blob(),
            version: 1,
            created_at: now,
            updated_at: now,
        };
        self.store.write(WriteOp::Create { row, index }).await?;
        let fields = fields
            .into_iter()
            .map(|(p, value)| {
                let stored = StoredField {
                    value,
                    updated_at_us: now,
                    source: source.clone(),
                };
                (p, stored)
            })
            .collect();
        Ok(SubjectView {
            id,
            version: 1,
            created_at_us: now,
            updated_at_us: now,
            fields,
        })
    }

    /// Reads the stored leaves among `paths`.
    pub async fn get(&self, id: Uuid, paths: &[FieldPath]) -> Result<SubjectView, DomainError> {
        let row = self.store.subject(id).await?.ok_or(DomainError::NotFound)?;
        self.open_row(&row, paths)
    }

    /// Reads several subjects; one result per id, in the order asked, each found or not.
    pub async fn batch_get(
        &self,
        ids: &[Uuid],
        paths: &[FieldPath],
    ) -> Result<Vec<(Uuid, Result<SubjectView, DomainError>)>, DomainError> {
        if ids.len() > MAX_BATCH_GET {
            return Err(DomainError::invalid(
                "ids",
                format!("at most {MAX_BATCH_GET} ids per call"),
            ));
        }
        let rows = self.store.subjects(ids).await?;
        Ok(ids
            .iter()
            .map(|id| {
                let result = match rows.get(id) {
                    None => Err(DomainError::NotFound),
                    Some(Err(e)) => Err(DomainError::from(e.clone())),
                    Some(Ok(row)) => self.open_row(row, paths),
                };
                (*id, result)
            })
            .collect())
    }

    /// Subjects whose indexed value at `key.path` equals `key.value` (at most [`MAX_FIND_RESULTS`]).
    pub async fn find(&self, key: &LookupKey) -> Result<Vec<Uuid>, DomainError> {
        let (_, digest) = self
            .keyring
            .blind_index(key.path.as_str(), &index_key(key.path, &key.value));
        Ok(self
            .store
            .find(key.path.as_str(), &digest, MAX_FIND_RESULTS)
            .await?)
    }

    /// Applies `changes` (set or clear per leaf) and returns the whole subject afterwards.
    pub async fn update(
        &self,
        caller: &Caller,
        id: Uuid,
        changes: FieldChanges,
        expected_version: Option<u64>,
        source: Option<String>,
    ) -> Result<SubjectView, DomainError> {
        let source = source.unwrap_or_else(|| caller.name.clone());
        let deadline = std::time::Instant::now() + UPDATE_RETRY_WINDOW;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let row = self.store.subject(id).await?.ok_or(DomainError::NotFound)?;
            if let Some(expected) = expected_version
                && expected != row.version
            {
                return Err(DomainError::Aborted {
                    expected,
                    actual: row.version,
                });
            }
            let cipher = self.cipher(&row)?;
            let mut record =
                SealedRecord::decode_blob(&row.record).map_err(|e| data_loss(id, e))?;
            let mut changes = changes.clone();
            let stored = record
                .open(&cipher, POSTAL_DEPENDENCIES)
                .map_err(|e| data_loss(id, e))?;
            normalise_postal_codes(&mut changes, &stored)?;

            let now = now_us();
            let mut replace_index_paths = Vec::new();
            let mut add_index = Vec::new();
            for (path, change) in &changes {
                match change {
                    Some(value) => record.set(&cipher, *path, value, now, &source)?,
                    None => record.clear(*path),
                }
                if path.index().is_some() {
                    replace_index_paths.push(path.as_str());
                    if let Some(entry) = change.as_ref().and_then(|v| self.index_entry(*path, v)) {
                        add_index.push(entry);
                    }
                }
            }
            let op = WriteOp::Update {
                id,
                read_version: row.version,
                record: record.to_blob(),
                updated_at: now,
                replace_index_paths,
                add_index,
            };
            match self.store.write(op).await {
                Ok(WriteOutcome::Updated { version }) => {
                    // The write is committed: a damaged leaf elsewhere in the record must not make
                    // it look failed. Leaves that do not open are left out of the answer (and
                    // logged); a read reports them as DATA_LOSS.
                    let fields = record.open_readable(&cipher, FieldPath::ALL, |path| {
                        tracing::error!(subject = %id, path, "stored data failed authentication");
                    });
                    return Ok(SubjectView {
                        id,
                        version,
                        created_at_us: row.created_at,
                        updated_at_us: now,
                        fields,
                    });
                }
                Ok(other) => {
                    return Err(DomainError::Internal(format!("update answered {other:?}")));
                }
                Err(StoreError::VersionMismatch { actual }) => {
                    if let Some(expected) = expected_version {
                        return Err(DomainError::Aborted { expected, actual });
                    }
                    if std::time::Instant::now() > deadline {
                        return Err(DomainError::Unavailable(format!(
                            "subject {id} changed concurrently during {attempts} attempts; retry"
                        )));
                    }
                    // Jitter, so the competing writers do not line up again in the next batch.
                    let jitter_us =
                        crate::crypto::random_bytes::<1>().map_or(0, |b| u64::from(b[0]) * 4);
                    tokio::time::sleep(std::time::Duration::from_micros(jitter_us)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Erases a subject at once: DEK, ciphertexts and index entries in one transaction.
    pub async fn erase(&self, id: Uuid) -> Result<i64, DomainError> {
        let at = now_us();
        self.store.write(WriteOp::Erase { id, at }).await?;
        tracing::info!(subject = %id, "subject erased");
        Ok(at)
    }

    fn cipher(&self, row: &SubjectRow) -> Result<FieldCipher, DomainError> {
        let wrapped = WrappedKey {
            wrapping_version: row.kek_version,
            bytes: row.wrapped_dek.clone(),
        };
        let dek = self
            .keyring
            .unwrap_dek(row.id, row.dek_id, &wrapped)
            .map_err(|e| match e {
                // A KEK this instance does not hold is a keyring problem, not tampering.
                CryptoError::UnknownKeyVersion { .. } => DomainError::Internal(format!(
                    "subject {}: data key wrapped under a KEK this instance does not hold: {e}",
                    row.id
                )),
                _ => data_loss(row.id, RecordError::Crypto(e)),
            })?;
        Ok(FieldCipher::new(&dek, row.id, row.dek_id)?)
    }

    fn open_row(&self, row: &SubjectRow, paths: &[FieldPath]) -> Result<SubjectView, DomainError> {
        let cipher = self.cipher(row)?;
        let fields = SealedRecord::decode_blob(&row.record)
            .and_then(|record| record.open(&cipher, paths))
            .map_err(|e| data_loss(row.id, e))?;
        Ok(SubjectView {
            id: row.id,
            version: row.version,
            created_at_us: row.created_at,
            updated_at_us: row.updated_at,
            fields,
        })
    }

    fn index_entry(&self, path: FieldPath, value: &FieldValue) -> Option<IndexEntry> {
        let _kind: IndexKind = path.index()?;
        let text = value.as_text()?;
        let (key_version, digest) = self
            .keyring
            .blind_index(path.as_str(), &index_key(path, text));
        Some(IndexEntry {
            path: path.as_str(),
            key_version,
            digest,
        })
    }
}

/// Logs and maps a record that failed to open. Ids and paths only.
fn data_loss(subject: Uuid, e: RecordError) -> DomainError {
    let path = match &e {
        RecordError::Field(p) => Some(p.clone()),
        _ => None,
    };
    tracing::error!(subject = %subject, path = path.as_deref().unwrap_or("-"), error = %e, "stored data failed authentication");
    DomainError::DataLoss { subject, path }
}

const POSTAL_DEPENDENCIES: &[FieldPath] = &[
    FieldPath::AddressPostalCode,
    FieldPath::AddressCountry,
    FieldPath::BillingAddressPostalCode,
    FieldPath::BillingAddressCountry,
];

/// Checks each postal code against its address's country (Dutch form when NL) after the change,
/// normalising the written value. A country change that makes the stored postal code invalid is
/// refused naming the postal-code path.
fn normalise_postal_codes(
    changes: &mut FieldChanges,
    stored: &BTreeMap<FieldPath, StoredField>,
) -> Result<(), DomainError> {
    let mut violations = Vec::new();
    for (postal, country) in [
        (FieldPath::AddressPostalCode, FieldPath::AddressCountry),
        (
            FieldPath::BillingAddressPostalCode,
            FieldPath::BillingAddressCountry,
        ),
    ] {
        if !changes.contains_key(&postal) && !changes.contains_key(&country) {
            continue;
        }
        let country_now: Option<String> = match changes.get(&country) {
            Some(change) => change.as_ref().and_then(|v| v.as_text()).map(str::to_owned),
            None => stored
                .get(&country)
                .and_then(|f| f.value.as_text())
                .map(str::to_owned),
        };
        let postal_now: Option<String> = match changes.get(&postal) {
            Some(change) => change.as_ref().and_then(|v| v.as_text()).map(str::to_owned),
            None => stored
                .get(&postal)
                .and_then(|f| f.value.as_text())
                .map(str::to_owned),
        };
        let Some(code) = postal_now else { continue };
        match values::postal_code(&code, country_now.as_deref()) {
            // Written in its normal form, also when only the country changed.
            Ok(normalised) => {
                if changes.contains_key(&postal) || normalised != code {
                    changes.insert(postal, Some(FieldValue::Text(normalised)));
                }
            }
            Err(e) => violations.push(Violation::new(postal.as_str(), e)),
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(DomainError::InvalidArgument(violations))
    }
}
