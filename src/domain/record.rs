//! Field values and the sealed record: how a subject's leaves become ciphertexts and back.
//!
//! Each leaf is encoded (prost), sealed on its own under the subject's DEK with associated data
//! `subject ‖ path ‖ DEK id`, and kept with its last-change time and source in one record blob.
//!
//! Reads decode the blob in place ([`RecordRef`]): each leaf's path, nonce, ciphertext and source
//! are borrowed from the stored bytes, and the leaves asked for are opened into one reused buffer.
//! Decoding into [`SealedRecord`] copied every leaf of a ~2 KB record into four allocations of its
//! own on every `GetSubject`; writes still use [`SealedRecord`], which they change.

use std::{collections::BTreeMap, net::IpAddr};

use prost::{
    Message,
    encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field},
};
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
        paths_of(self.fields.iter().map(LeafRef::from))
    }

    /// Opens the leaves in `paths` that are stored. A leaf that fails authentication is
    /// `RecordError::Field` naming the path; leaves of paths this version does not know are skipped.
    pub fn open(
        &self,
        cipher: &FieldCipher,
        paths: &[FieldPath],
    ) -> Result<BTreeMap<FieldPath, StoredField>, RecordError> {
        open_leaves(self.fields.iter().map(LeafRef::from), cipher, paths)
    }
}

/// One sealed leaf as stored, borrowed from the record blob (or from a [`SealedField`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LeafRef<'a> {
    path: &'a str,
    nonce: &'a [u8],
    ciphertext: &'a [u8],
    updated_at_us: i64,
    source: &'a str,
}

impl<'a> From<&'a SealedField> for LeafRef<'a> {
    fn from(f: &'a SealedField) -> Self {
        Self {
            path: &f.path,
            nonce: &f.nonce,
            ciphertext: &f.ciphertext,
            updated_at_us: f.updated_at_us,
            source: &f.source,
        }
    }
}

/// A record blob read in place, for reading only: it decodes exactly what
/// [`SealedRecord::decode_blob`] decodes (the same leaves, the same blobs refused) without copying
/// a leaf.
pub struct RecordRef<'a> {
    leaves: Vec<LeafRef<'a>>,
}

impl<'a> RecordRef<'a> {
    pub fn decode(blob: &'a [u8]) -> Result<Self, RecordError> {
        let mut buf = blob;
        let mut leaves = Vec::with_capacity(32);
        while !buf.is_empty() {
            let (tag, wire) = decode_key(&mut buf).map_err(|_| RecordError::Undecodable)?;
            if tag == 1 {
                if wire != WireType::LengthDelimited {
                    return Err(RecordError::Undecodable);
                }
                leaves.push(decode_leaf_ref(delimited(&mut buf)?)?);
            } else {
                skip_field(wire, tag, &mut buf, DecodeContext::default())
                    .map_err(|_| RecordError::Undecodable)?;
            }
        }
        Ok(Self { leaves })
    }

    /// The paths stored, known without opening anything.
    pub fn paths(&self) -> crate::policy::PathSet {
        paths_of(self.leaves.iter().copied())
    }

    /// Opens the leaves in `paths` that are stored, as [`SealedRecord::open`] does.
    pub fn open(
        &self,
        cipher: &FieldCipher,
        paths: &[FieldPath],
    ) -> Result<BTreeMap<FieldPath, StoredField>, RecordError> {
        open_leaves(self.leaves.iter().copied(), cipher, paths)
    }
}

/// The next length-delimited value of `buf`, which moves past it.
fn delimited<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], RecordError> {
    let len = decode_varint(buf).map_err(|_| RecordError::Undecodable)?;
    let len = usize::try_from(len).map_err(|_| RecordError::Undecodable)?;
    if len > buf.len() {
        return Err(RecordError::Undecodable);
    }
    let (value, rest) = buf.split_at(len);
    *buf = rest;
    Ok(value)
}

/// One `SealedField` message, as prost decodes it: a field seen twice keeps its last value, a
/// known field of the wrong wire type or a string that is not UTF-8 is refused, and unknown
/// fields are skipped.
fn decode_leaf_ref(mut buf: &[u8]) -> Result<LeafRef<'_>, RecordError> {
    let text = |bytes| std::str::from_utf8(bytes).map_err(|_| RecordError::Undecodable);
    let mut leaf = LeafRef::default();
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).map_err(|_| RecordError::Undecodable)?;
        match (tag, wire) {
            (1, WireType::LengthDelimited) => leaf.path = text(delimited(&mut buf)?)?,
            (2, WireType::LengthDelimited) => leaf.nonce = delimited(&mut buf)?,
            (3, WireType::LengthDelimited) => leaf.ciphertext = delimited(&mut buf)?,
            // prost reads an int64 as the varint's bits.
            (4, WireType::Varint) => {
                leaf.updated_at_us =
                    decode_varint(&mut buf).map_err(|_| RecordError::Undecodable)? as i64;
            }
            (5, WireType::LengthDelimited) => leaf.source = text(delimited(&mut buf)?)?,
            (1..=5, _) => return Err(RecordError::Undecodable),
            (tag, wire) => skip_field(wire, tag, &mut buf, DecodeContext::default())
                .map_err(|_| RecordError::Undecodable)?,
        }
    }
    Ok(leaf)
}

fn paths_of<'a>(leaves: impl Iterator<Item = LeafRef<'a>>) -> crate::policy::PathSet {
    crate::policy::PathSet::from_paths(leaves.filter_map(|l| FieldPath::from_leaf(l.path)))
}

/// Opens the leaves in `paths` among `leaves` into one reused plaintext buffer (zeroized when
/// done). A leaf that fails authentication is `RecordError::Field` naming the path; leaves of paths
/// this version does not know are skipped.
fn open_leaves<'a>(
    leaves: impl Iterator<Item = LeafRef<'a>>,
    cipher: &FieldCipher,
    paths: &[FieldPath],
) -> Result<BTreeMap<FieldPath, StoredField>, RecordError> {
    let mut out = BTreeMap::new();
    let mut plain = Zeroizing::new(Vec::with_capacity(512));
    for leaf in leaves {
        // A leaf a newer kluis added (paths are only ever added): not ours to read.
        let Some(path) = FieldPath::from_leaf(leaf.path) else {
            continue;
        };
        if !paths.contains(&path) {
            continue;
        }
        let damaged = || RecordError::Field(leaf.path.to_owned());
        let nonce: [u8; 12] = leaf.nonce.try_into().map_err(|_| damaged())?;
        cipher
            .open_into(leaf.path, &nonce, leaf.ciphertext, &mut plain)
            .map_err(|_| damaged())?;
        let value = decode_leaf(path, &plain).ok_or_else(damaged)?;
        out.insert(
            path,
            StoredField {
                value,
                updated_at_us: leaf.updated_at_us,
                source: leaf.source.to_owned(),
            },
        );
    }
    Ok(out)
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

    /// A record with every kind of leaf, a leaf of a path this version does not know, an unknown
    /// field inside a leaf and an unknown field of the record itself.
    fn rich_blob(c: &FieldCipher) -> Vec<u8> {
        let mut rec = SealedRecord::default();
        rec.set(
            c,
            FieldPath::NameGiven,
            &FieldValue::Text("Jan".into()),
            11,
            "portal",
        )
        .unwrap();
        rec.set(c, FieldPath::ProfileGender, &FieldValue::Enum(2), -5, "")
            .unwrap();
        rec.set(
            c,
            FieldPath::ActivityLog,
            &FieldValue::Activity(vec![ActivityRecord {
                action: "login".into(),
                time_us: Some(5),
                ip: Some("192.0.2.1".parse().unwrap()),
            }]),
            i64::MAX,
            "backend",
        )
        .unwrap();
        rec.set(
            c,
            FieldPath::ContactEmail,
            &FieldValue::Text("j@example.nl".into()),
            3,
            "b",
        )
        .unwrap();
        rec.fields[3].path = "contact.pager".into();
        let mut blob = rec.to_blob();
        // An unknown varint field 9 inside the first leaf (its length grows by 2) …
        assert_eq!(blob[0], 0x0a);
        let first_len = usize::from(blob[1]);
        assert!(first_len + 2 < 0x80);
        blob[1] += 2;
        blob.splice(2 + first_len..2 + first_len, [0x48, 0x07]);
        // … and an unknown length-delimited field 7 of the record.
        blob.extend_from_slice(&[0x3a, 0x02, 0xaa, 0xbb]);
        blob
    }

    fn leaves_by_prost(blob: &[u8]) -> Result<Vec<SealedField>, RecordError> {
        SealedRecord::decode_blob(blob).map(|r| r.fields)
    }

    fn same_reading(blob: &[u8]) -> bool {
        match (leaves_by_prost(blob), RecordRef::decode(blob)) {
            (Ok(fields), Ok(view)) => {
                let by_prost: Vec<LeafRef<'_>> = fields.iter().map(LeafRef::from).collect();
                by_prost == view.leaves
            }
            (Err(_), Err(_)) => true,
            _ => false,
        }
    }

    #[test]
    fn reading_a_blob_in_place_gives_the_leaves_prost_decodes() {
        let c = cipher(Uuid::new_v4());
        let blob = rich_blob(&c);
        let view = RecordRef::decode(&blob).unwrap();
        assert_eq!(view.leaves.len(), 4);
        assert!(same_reading(&blob));
        assert_eq!(view.leaves[2].updated_at_us, i64::MAX);
        assert_eq!(view.leaves[1].updated_at_us, -5);
        assert_eq!(
            view.paths(),
            SealedRecord::decode_blob(&blob).unwrap().paths()
        );
    }

    #[test]
    fn every_cut_or_damaged_blob_is_refused_or_read_alike_in_place_and_by_prost() {
        let c = cipher(Uuid::new_v4());
        let blob = rich_blob(&c);
        let mut refused = 0;
        for len in 0..blob.len() {
            assert!(same_reading(&blob[..len]), "cut at {len}");
            refused += usize::from(RecordRef::decode(&blob[..len]).is_err());
        }
        for at in 0..blob.len() {
            // Tags of known fields with their own and other wire types, invalid tags, varint bytes.
            for byte in [
                0x00, 0x01, 0x08, 0x0a, 0x10, 0x12, 0x20, 0x21, 0x28, 0x2a, 0x7f, 0x80, 0xc3, 0xff,
            ] {
                let mut damaged = blob.clone();
                damaged[at] = byte;
                assert!(same_reading(&damaged), "byte {at} set to {byte:#x}");
            }
        }
        // The cuts inside a leaf are refused, not read as shorter leaves.
        assert!(
            refused > blob.len() / 2,
            "{refused} of {} cuts refused",
            blob.len()
        );
    }

    #[test]
    fn opening_in_place_gives_what_opening_the_decoded_record_gives() {
        let c = cipher(Uuid::new_v4());
        let blob = rich_blob(&c);
        let decoded = SealedRecord::decode_blob(&blob).unwrap();
        let view = RecordRef::decode(&blob).unwrap();
        let opened = view.open(&c, FieldPath::ALL).unwrap();
        assert_eq!(opened, decoded.open(&c, FieldPath::ALL).unwrap());
        assert_eq!(opened.len(), 3);
        assert_eq!(opened[&FieldPath::NameGiven].source, "portal");
        let some = [FieldPath::ProfileGender];
        assert_eq!(
            view.open(&c, &some).unwrap(),
            decoded.open(&c, &some).unwrap()
        );
        // A damaged ciphertext fails the same way, naming its path.
        let mut tampered = decoded.clone();
        tampered.fields[2].ciphertext[0] ^= 1;
        let tampered_blob = tampered.to_blob();
        assert_eq!(
            RecordRef::decode(&tampered_blob)
                .unwrap()
                .open(&c, FieldPath::ALL),
            Err(RecordError::Field("activity_log".into()))
        );
        assert_eq!(
            tampered.open(&c, FieldPath::ALL),
            Err(RecordError::Field("activity_log".into()))
        );
    }
}
