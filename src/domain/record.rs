//! Field values and the sealed record: how a subject's leaves become ciphertexts and back.
//!
//! Each leaf is encoded (prost), sealed on its own under the subject's DEK with associated data
//! `subject ‖ path ‖ DEK id`, and kept with its last-change time and source in one record blob.

use std::{collections::BTreeMap, net::IpAddr};

use prost::Message;
use uuid::Uuid;
use zeroize::{Zeroize, Zeroizing};

use super::paths::FieldPath;
use crate::crypto::{CryptoError, FieldCipher};

/// One IP address a customer used (category `network`).
#[derive(Clone, PartialEq, Eq)]
pub struct IpRecord {
    pub address: IpAddr,
    pub first_seen_us: Option<i64>,
    pub last_seen_us: Option<i64>,
}

/// One portal action kept as evidence (category `activity`).
#[derive(Clone, PartialEq, Eq)]
pub struct ActivityRecord {
    pub action: String,
    pub time_us: Option<i64>,
    pub ip: Option<IpAddr>,
}

/// The value of one leaf. Text is zeroized when dropped.
#[derive(Clone, PartialEq, Eq)]
pub enum FieldValue {
    Text(String),
    /// A proto enum number (`payment.method`, `profile.gender`); never 0 (unset).
    Enum(i32),
    IpAddresses(Vec<IpRecord>),
    Activity(Vec<ActivityRecord>),
}

impl Drop for FieldValue {
    fn drop(&mut self) {
        match self {
            FieldValue::Text(s) => s.zeroize(),
            FieldValue::Activity(list) => list.iter_mut().for_each(|a| a.action.zeroize()),
            FieldValue::Enum(_) | FieldValue::IpAddresses(_) => {}
        }
    }
}

impl std::fmt::Debug for FieldValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FieldValue(***)")
    }
}

impl FieldValue {
    pub fn as_text(&self) -> Option<&str> {
        match self {
            FieldValue::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// A stored leaf with its provenance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredField {
    pub value: FieldValue,
    pub updated_at_us: i64,
    pub source: String,
}

/// Leaves to write: `Some` sets, `None` clears.
pub type FieldChanges = BTreeMap<FieldPath, Option<FieldValue>>;

// ---- plaintext encoding of one leaf ---------------------------------------------------------

#[derive(Clone, PartialEq, Message)]
struct LeafPb {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(int32, tag = "2")]
    number: i32,
    #[prost(message, repeated, tag = "3")]
    ips: Vec<IpPb>,
    #[prost(message, repeated, tag = "4")]
    activity: Vec<ActivityPb>,
}

#[derive(Clone, PartialEq, Message)]
struct IpPb {
    #[prost(string, tag = "1")]
    address: String,
    #[prost(int64, optional, tag = "2")]
    first_seen_us: Option<i64>,
    #[prost(int64, optional, tag = "3")]
    last_seen_us: Option<i64>,
}

#[derive(Clone, PartialEq, Message)]
struct ActivityPb {
    #[prost(string, tag = "1")]
    action: String,
    #[prost(int64, optional, tag = "2")]
    time_us: Option<i64>,
    #[prost(string, tag = "3")]
    ip: String,
}

impl Drop for LeafPb {
    fn drop(&mut self) {
        self.text.zeroize();
        self.activity.iter_mut().for_each(|a| a.action.zeroize());
    }
}

fn encode_leaf(value: &FieldValue) -> Zeroizing<Vec<u8>> {
    let mut pb = LeafPb::default();
    match value {
        FieldValue::Text(s) => pb.text.clone_from(s),
        FieldValue::Enum(n) => pb.number = *n,
        FieldValue::IpAddresses(list) => {
            pb.ips = list
                .iter()
                .map(|r| IpPb {
                    address: r.address.to_string(),
                    first_seen_us: r.first_seen_us,
                    last_seen_us: r.last_seen_us,
                })
                .collect()
        }
        FieldValue::Activity(list) => {
            pb.activity = list
                .iter()
                .map(|a| ActivityPb {
                    action: a.action.clone(),
                    time_us: a.time_us,
                    ip: a.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                })
                .collect()
        }
    }
    Zeroizing::new(pb.encode_to_vec())
}

/// The shape of value each leaf holds.
fn leaf_kind(path: FieldPath) -> LeafKind {
    match path {
        FieldPath::PaymentMethod | FieldPath::ProfileGender => LeafKind::Enum,
        FieldPath::IpAddresses => LeafKind::Ips,
        FieldPath::ActivityLog => LeafKind::Activity,
        _ => LeafKind::Text,
    }
}

enum LeafKind {
    Text,
    Enum,
    Ips,
    Activity,
}

fn decode_leaf(path: FieldPath, bytes: &[u8]) -> Option<FieldValue> {
    let mut pb = LeafPb::decode(bytes).ok()?;
    Some(match leaf_kind(path) {
        LeafKind::Text => FieldValue::Text(std::mem::take(&mut pb.text)),
        LeafKind::Enum => FieldValue::Enum(pb.number),
        LeafKind::Ips => FieldValue::IpAddresses(
            pb.ips
                .iter()
                .map(|r| {
                    Some(IpRecord {
                        address: r.address.parse().ok()?,
                        first_seen_us: r.first_seen_us,
                        last_seen_us: r.last_seen_us,
                    })
                })
                .collect::<Option<Vec<_>>>()?,
        ),
        LeafKind::Activity => FieldValue::Activity(
            pb.activity
                .iter()
                .map(|a| {
                    let ip = if a.ip.is_empty() {
                        None
                    } else {
                        Some(a.ip.parse().ok()?)
                    };
                    Some(ActivityRecord {
                        action: a.action.clone(),
                        time_us: a.time_us,
                        ip,
                    })
                })
                .collect::<Option<Vec<_>>>()?,
        ),
    })
}

// ---- the sealed record ------------------------------------------------------------------------

/// The record blob stored in `subjects.record`: every leaf sealed on its own.
#[derive(Clone, PartialEq, Message)]
pub struct SealedRecord {
    #[prost(message, repeated, tag = "1")]
    pub fields: Vec<SealedField>,
}

/// One sealed leaf. Path, time and source are metadata, not personal data.
#[derive(Clone, PartialEq, Message)]
pub struct SealedField {
    #[prost(string, tag = "1")]
    pub path: String,
    #[prost(bytes = "vec", tag = "2")]
    pub nonce: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub ciphertext: Vec<u8>,
    #[prost(int64, tag = "4")]
    pub updated_at_us: i64,
    #[prost(string, tag = "5")]
    pub source: String,
}

/// Why a record could not be opened: the subject's data is damaged or was tampered with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record blob does not decode")]
    Undecodable,
    #[error("field {0} failed authentication")]
    Field(String),
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
}

impl SealedRecord {
    pub fn decode_blob(bytes: &[u8]) -> Result<Self, RecordError> {
        SealedRecord::decode(bytes).map_err(|_| RecordError::Undecodable)
    }

    pub fn to_blob(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Seals `value` at `path`, replacing any earlier leaf there.
    pub fn set(
        &mut self,
        cipher: &FieldCipher,
        path: FieldPath,
        value: &FieldValue,
        now_us: i64,
        source: &str,
    ) -> Result<(), CryptoError> {
        let plain = encode_leaf(value);
        let sealed = cipher.seal(path.as_str(), &plain)?;
        let field = SealedField {
            path: path.as_str().to_owned(),
            nonce: sealed.nonce.to_vec(),
            ciphertext: sealed.ciphertext,
            updated_at_us: now_us,
            source: source.to_owned(),
        };
        match self.fields.iter_mut().find(|f| f.path == path.as_str()) {
            Some(existing) => *existing = field,
            None => self.fields.push(field),
        }
        Ok(())
    }

    /// Removes the leaf at `path` (its ciphertext is gone with the next write).
    pub fn clear(&mut self, path: FieldPath) {
        self.fields.retain(|f| f.path != path.as_str());
    }

    pub fn has(&self, path: FieldPath) -> bool {
        self.fields.iter().any(|f| f.path == path.as_str())
    }

    /// The paths stored, known without opening anything.
    pub fn paths(&self) -> crate::policy::PathSet {
        crate::policy::PathSet::from_paths(
            self.fields
                .iter()
                .filter_map(|f| FieldPath::from_leaf(&f.path)),
        )
    }

    /// Opens the leaves in `paths` that are stored. A leaf that fails authentication is
    /// `RecordError::Field` naming the path; leaves of paths this version does not know are skipped.
    pub fn open(
        &self,
        cipher: &FieldCipher,
        paths: &[FieldPath],
    ) -> Result<BTreeMap<FieldPath, StoredField>, RecordError> {
        let mut out = BTreeMap::new();
        for field in &self.fields {
            // A leaf a newer kluis added (paths are only ever added): not ours to read.
            let Some(path) = FieldPath::from_leaf(&field.path) else {
                continue;
            };
            if !paths.contains(&path) {
                continue;
            }
            let nonce: [u8; 12] = field
                .nonce
                .as_slice()
                .try_into()
                .map_err(|_| RecordError::Field(field.path.clone()))?;
            let plain = cipher
                .open(&field.path, &nonce, &field.ciphertext)
                .map_err(|_| RecordError::Field(field.path.clone()))?;
            let value =
                decode_leaf(path, &plain).ok_or_else(|| RecordError::Field(field.path.clone()))?;
            out.insert(
                path,
                StoredField {
                    value,
                    updated_at_us: field.updated_at_us,
                    source: field.source.clone(),
                },
            );
        }
        Ok(out)
    }
}

impl SealedRecord {
    /// Like [`SealedRecord::open`], but leaves out the leaves that do not open, calling `damaged`
    /// with each one's path.
    pub fn open_readable(
        &self,
        cipher: &FieldCipher,
        paths: &[FieldPath],
        damaged: impl Fn(&str),
    ) -> BTreeMap<FieldPath, StoredField> {
        let mut out = BTreeMap::new();
        for path in paths {
            match self.open(cipher, &[*path]) {
                Ok(mut one) => out.append(&mut one),
                Err(_) => damaged(path.as_str()),
            }
        }
        out
    }
}

/// The normalised form a blind index is computed over (values are already parsed at the edge).
pub fn index_key(path: FieldPath, value: &str) -> String {
    match path {
        FieldPath::ContactEmail | FieldPath::AccountUsername => value.to_lowercase(),
        _ => value.to_owned(),
    }
}

/// A fresh subject id (random, so it says nothing about the subject).
pub fn new_subject_id() -> Uuid {
    Uuid::new_v4()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;

    fn cipher(subject: Uuid) -> FieldCipher {
        FieldCipher::new(
            &SecretKey::from_slice(&[7u8; 32]).unwrap(),
            subject,
            Uuid::nil(),
        )
        .unwrap()
    }

    #[test]
    fn every_kind_of_leaf_round_trips_through_a_sealed_record() {
        let id = Uuid::new_v4();
        let c = cipher(id);
        let mut rec = SealedRecord::default();
        let values = [
            (FieldPath::NameGiven, FieldValue::Text("Jan".into())),
            (FieldPath::ProfileGender, FieldValue::Enum(2)),
            (
                FieldPath::IpAddresses,
                FieldValue::IpAddresses(vec![IpRecord {
                    address: "2001:db8::1".parse().unwrap(),
                    first_seen_us: Some(1),
                    last_seen_us: None,
                }]),
            ),
            (
                FieldPath::ActivityLog,
                FieldValue::Activity(vec![ActivityRecord {
                    action: "login".into(),
                    time_us: Some(5),
                    ip: None,
                }]),
            ),
        ];
        for (p, v) in &values {
            rec.set(&c, *p, v, 10, "test").unwrap();
        }
        let blob = rec.to_blob();
        let opened = SealedRecord::decode_blob(&blob)
            .unwrap()
            .open(&c, FieldPath::ALL)
            .unwrap();
        for (p, v) in &values {
            assert_eq!(&opened[p].value, v);
        }
    }

    #[test]
    fn a_leaf_of_an_unknown_path_is_skipped_not_fatal() {
        let id = Uuid::new_v4();
        let c = cipher(id);
        let mut rec = SealedRecord::default();
        rec.set(
            &c,
            FieldPath::NameGiven,
            &FieldValue::Text("Jan".into()),
            1,
            "t",
        )
        .unwrap();
        rec.set(
            &c,
            FieldPath::NameFamily,
            &FieldValue::Text("Jansen".into()),
            1,
            "t",
        )
        .unwrap();
        rec.fields[1].path = "name.middle".into();
        let opened = rec.open(&c, FieldPath::ALL).unwrap();
        assert_eq!(opened.len(), 1);
        assert_eq!(
            opened[&FieldPath::NameGiven].value,
            FieldValue::Text("Jan".into())
        );
    }

    #[test]
    fn a_leaf_moved_to_another_path_fails_to_open() {
        let id = Uuid::new_v4();
        let c = cipher(id);
        let mut rec = SealedRecord::default();
        rec.set(
            &c,
            FieldPath::NameGiven,
            &FieldValue::Text("Jan".into()),
            1,
            "t",
        )
        .unwrap();
        rec.fields[0].path = "name.family".into();
        assert_eq!(
            rec.open(&c, FieldPath::ALL),
            Err(RecordError::Field("name.family".into()))
        );
    }
}
