//! The keyed audit hash chain: each event's link is an HMAC over its position, the previous link
//! and its stored bytes; the streaming verifier finds where a stored chain was altered.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use ed25519_dalek::VerifyingKey;
use serde::Serialize;
use subtle::ConstantTimeEq;

use super::{AuditEvent, Checkpoint};
use crate::crypto::{SecretKey, hmac_sha256};

const DOMAIN: &[u8] = b"kluis.audit.chain.v1";

/// The link before the first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// The keyed link: HMAC-SHA256(chain key, "kluis.audit.chain.v1" ‖ seq (i64 BE) ‖ previous link ‖
/// body), each part length-prefixed by `crypto::hmac_sha256`.
pub fn link(key: &SecretKey, seq: i64, prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    hmac_sha256(key, &[DOMAIN, &seq.to_be_bytes(), prev, body])
}

/// An event as read back from the database: the indexed columns beside the stored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: i64,
    pub at_us: i64,
    pub caller: String,
    pub purpose: String,
    pub method: String,
    pub outcome: String,
    pub subjects: Vec<String>,
    /// The event's exact stored bytes ([`AuditEvent::to_bytes`]).
    pub body: Vec<u8>,
    /// The event's link.
    pub mac: Vec<u8>,
}

/// Where a checkpoint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckpointSource {
    /// The database's checkpoint table.
    Database,
    /// The checkpoint file outside the database.
    File,
}

impl fmt::Display for CheckpointSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Database => "database",
            Self::File => "file",
        })
    }
}

impl CheckpointSource {
    /// Order among checkpoints at the same seq: the file first, as the stronger evidence.
    fn rank(self) -> u8 {
        match self {
            Self::File => 0,
            Self::Database => 1,
        }
    }
}

/// Where and how the chain is broken. `seq` is the position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Break {
    /// An event missing (deleted) or inserted out of order.
    Gap { expected: i64, found: i64 },
    /// The MAC does not match: edited body, edited mac, or an inserted event.
    BadLink { seq: i64 },
    /// An indexed column differs from the body (edited to hide the event from queries).
    ColumnMismatch { seq: i64, column: &'static str },
    /// The MAC matches but the body is not an event.
    Undecodable { seq: i64 },
    /// The first retained event is after seq 1 and no checkpoint at the seq before anchors it.
    NoAnchor { first_seq: i64 },
    /// A checkpoint's signature does not verify.
    BadCheckpointSignature { seq: i64, source: CheckpointSource },
    /// A checkpoint's link differs from the event's.
    CheckpointMismatch { seq: i64, source: CheckpointSource },
    /// The chain ends before a checkpoint: its tail was cut off.
    Truncated {
        checkpoint_seq: i64,
        last_seq: i64,
        source: CheckpointSource,
    },
    /// The database's chain-head row does not name the last event and its link.
    HeadMismatch { head_seq: i64, last_seq: i64 },
    /// The per-subject index disagrees with the signed events (rows deleted, added or moved to
    /// hide or misattribute an event in queries by subject), or claims events past the head.
    IndexMismatch { seq: i64 },
}

impl Break {
    /// The position the break is reported at.
    pub fn seq(&self) -> i64 {
        match *self {
            Self::Gap { expected, .. } => expected,
            Self::BadLink { seq }
            | Self::ColumnMismatch { seq, .. }
            | Self::Undecodable { seq }
            | Self::BadCheckpointSignature { seq, .. }
            | Self::CheckpointMismatch { seq, .. } => seq,
            Self::NoAnchor { first_seq } => first_seq,
            // The first event that is missing.
            Self::Truncated { last_seq, .. } => last_seq.saturating_add(1),
            Self::HeadMismatch { last_seq, .. } => last_seq,
            Self::IndexMismatch { seq } => seq,
        }
    }
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Gap { expected, found } => write!(
                f,
                "audit chain broken at seq {expected}: expected event {expected}, found {found} \
                 (an event was deleted or inserted out of order)"
            ),
            Self::BadLink { seq } => write!(
                f,
                "audit chain broken at seq {seq}: the link does not match \
                 (event edited, link edited, or event inserted)"
            ),
            Self::ColumnMismatch { seq, column } => write!(
                f,
                "audit chain broken at seq {seq}: column `{column}` differs from the signed event"
            ),
            Self::Undecodable { seq } => write!(
                f,
                "audit chain broken at seq {seq}: the stored event cannot be decoded"
            ),
            Self::NoAnchor { first_seq } => write!(
                f,
                "audit chain starts at seq {first_seq} but no valid checkpoint at seq {} anchors it \
                 (earlier events were removed)",
                first_seq.saturating_sub(1)
            ),
            Self::BadCheckpointSignature { seq, source } => write!(
                f,
                "{source} checkpoint at seq {seq}: the signature does not verify"
            ),
            Self::CheckpointMismatch { seq, source } => write!(
                f,
                "{source} checkpoint at seq {seq}: its link differs from the chain's"
            ),
            Self::Truncated {
                checkpoint_seq,
                last_seq,
                source,
            } => write!(
                f,
                "audit chain ends at seq {last_seq} but a {source} checkpoint covers seq \
                 {checkpoint_seq}: the tail was cut off"
            ),
            Self::HeadMismatch { head_seq, last_seq } => write!(
                f,
                "audit chain head names seq {head_seq} but the chain ends at seq {last_seq} \
                 (or its link differs)"
            ),
            Self::IndexMismatch { seq } => write!(
                f,
                "audit chain broken at seq {seq}: the per-subject index disagrees with the \
                 signed event"
            ),
        }
    }
}

impl std::error::Error for Break {}

/// What a clean verification covered.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct VerifyReport {
    pub events: u64,
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
    /// Checkpoints (from either source) whose link was compared with an event's, the anchor
    /// included. Checkpoints older than the first retained event are not counted.
    pub checkpoints_checked: u64,
    pub last_checkpoint_seq: Option<i64>,
}

/// A checkpoint with a valid signature, waiting for the event at its seq.
struct Pending {
    link: [u8; 32],
    source: CheckpointSource,
}

/// Streaming verifier: feed events in seq order (the caller pages through the table), then
/// [`finish`](Verifier::finish).
///
/// Memory is bounded by the number of checkpoints, not events: only the checkpoints not yet
/// reached and the previous event's link are kept.
pub struct Verifier {
    key: SecretKey,
    /// Valid checkpoints by seq, not yet compared, each seq's entries file first.
    pending: BTreeMap<i64, Vec<Pending>>,
    /// Checkpoints whose signature failed, by seq; reported once the chain reaches their seq.
    bad_signatures: VecDeque<(i64, CheckpointSource)>,
    /// The last event fed: seq and link.
    last: Option<(i64, [u8; 32])>,
    first_seq: Option<i64>,
    events: u64,
    checkpoints_checked: u64,
    last_checkpoint_seq: Option<i64>,
    broken: Option<Break>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("events", &self.events)
            .field("last_seq", &self.last.map(|(seq, _)| seq))
            .field("pending_checkpoints", &self.pending.len())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Checks every checkpoint's signature against `public` now; failures are reported by
    /// [`feed`](Self::feed) or [`finish`](Self::finish) in chain order.
    pub fn new(
        key: &SecretKey,
        public: &VerifyingKey,
        checkpoints: Vec<(Checkpoint, CheckpointSource)>,
    ) -> Self {
        let mut pending: BTreeMap<i64, Vec<Pending>> = BTreeMap::new();
        let mut bad_signatures = Vec::new();
        for (cp, source) in checkpoints {
            match cp.link_bytes() {
                Some(link) if cp.verify(public) => {
                    pending
                        .entry(cp.seq)
                        .or_default()
                        .push(Pending { link, source });
                }
                _ => bad_signatures.push((cp.seq, source)),
            }
        }
        for entries in pending.values_mut() {
            entries.sort_by_key(|entry| entry.source.rank());
        }
        bad_signatures.sort_by_key(|&(seq, source)| (seq, source.rank()));
        Self {
            key: key.clone(),
            pending,
            bad_signatures: bad_signatures.into(),
            last: None,
            first_seq: None,
            events: 0,
            checkpoints_checked: 0,
            last_checkpoint_seq: None,
            broken: None,
        }
    }

    /// Checks the next event. Returns the first break found so far; stop feeding then (further
    /// calls, and `finish`, return the same break).
    pub fn feed(&mut self, event: &StoredEvent) -> Result<(), Break> {
        if let Some(found) = &self.broken {
            return Err(found.clone());
        }
        let result = self.check(event);
        if let Err(found) = &result {
            self.broken = Some(found.clone());
        }
        result
    }

    fn check(&mut self, event: &StoredEvent) -> Result<(), Break> {
        let seq = event.seq;
        let position = match self.last {
            None => seq,
            Some((last_seq, _)) => last_seq.saturating_add(1).min(seq),
        };
        self.bad_signature_up_to(position)?;

        let computed = match self.last {
            Some((last_seq, prev)) => {
                match last_seq.checked_add(1) {
                    Some(expected) if expected == seq => {}
                    expected => {
                        return Err(Break::Gap {
                            expected: expected.unwrap_or(last_seq),
                            found: seq,
                        });
                    }
                }
                let computed = link(&self.key, seq, &prev, &event.body);
                if !same_link(&computed, &event.mac) {
                    return Err(Break::BadLink { seq });
                }
                computed
            }
            None => self.anchor(event)?,
        };

        check_columns(event)?;

        if let Some(entries) = self.pending.remove(&seq) {
            self.compare(seq, &entries, &computed)?;
        }
        self.last = Some((seq, computed));
        self.first_seq.get_or_insert(seq);
        self.events += 1;
        Ok(())
    }

    /// The first event: seq 1 follows GENESIS; a later seq needs a valid checkpoint at the seq
    /// before it (a pruned chain). Returns the event's link.
    fn anchor(&mut self, event: &StoredEvent) -> Result<[u8; 32], Break> {
        let seq = event.seq;
        if seq < 1 {
            return Err(Break::Gap {
                expected: 1,
                found: seq,
            });
        }
        // Checkpoints before the anchor cover pruned events: nothing left to compare them with.
        let anchor_seq = seq - 1;
        let rest = self.pending.split_off(&anchor_seq);
        self.pending = rest;

        if seq == 1 {
            let computed = link(&self.key, seq, &GENESIS, &event.body);
            if !same_link(&computed, &event.mac) {
                return Err(Break::BadLink { seq });
            }
            // A checkpoint at seq 0 would name no event; drop it with the pruned ones.
            self.pending.remove(&0);
            return Ok(computed);
        }

        let Some(anchors) = self.pending.remove(&anchor_seq) else {
            return Err(Break::NoAnchor { first_seq: seq });
        };
        // The anchor whose link the event follows; if checkpoints at this seq disagree, the one
        // the chain does not follow is the mismatch.
        let mut chosen = None;
        for anchor in &anchors {
            let computed = link(&self.key, seq, &anchor.link, &event.body);
            if same_link(&computed, &event.mac) {
                chosen = Some((anchor.link, computed));
                break;
            }
        }
        let Some((anchor_link, computed)) = chosen else {
            return Err(Break::BadLink { seq });
        };
        self.compare(anchor_seq, &anchors, &anchor_link)?;
        Ok(computed)
    }

    /// Reports the first checkpoint with a bad signature at or before `position`.
    fn bad_signature_up_to(&self, position: i64) -> Result<(), Break> {
        match self.bad_signatures.front() {
            Some(&(seq, source)) if seq <= position => {
                Err(Break::BadCheckpointSignature { seq, source })
            }
            _ => Ok(()),
        }
    }

    /// Compares the checkpoints at `seq` with the event's link.
    fn compare(&mut self, seq: i64, entries: &[Pending], link: &[u8; 32]) -> Result<(), Break> {
        for entry in entries {
            if !bool::from(entry.link.ct_eq(link)) {
                return Err(Break::CheckpointMismatch {
                    seq,
                    source: entry.source,
                });
            }
            self.checkpoints_checked += 1;
            self.last_checkpoint_seq = Some(seq);
        }
        Ok(())
    }

    /// Ends verification. `head` is the database's chain-head row (seq, link), if any; `None`
    /// skips the head check.
    ///
    /// With no events fed the chain ends at seq 0 with link GENESIS, unless the head names a later
    /// seq: then every event was pruned and a valid checkpoint at the head's seq, with the head's
    /// link, must anchor it (else `NoAnchor` at the seq after the head).
    ///
    /// Reports, in this order: a checkpoint with a bad signature, a valid checkpoint beyond the
    /// chain's end (truncation), a head that does not name the last event and its link.
    pub fn finish(mut self, head: Option<(i64, [u8; 32])>) -> Result<VerifyReport, Break> {
        if let Some(found) = self.broken.take() {
            return Err(found);
        }
        self.bad_signature_up_to(i64::MAX)?;
        let (last_seq, last_link) = match (self.last, head) {
            (Some(last), _) => last,
            (None, Some((head_seq, head_link))) if head_seq > 0 => {
                let Some(anchors) = self.pending.remove(&head_seq) else {
                    return Err(Break::NoAnchor {
                        first_seq: head_seq.saturating_add(1),
                    });
                };
                self.compare(head_seq, &anchors, &head_link)?;
                // Older checkpoints covered pruned events.
                self.pending = self.pending.split_off(&head_seq);
                (head_seq, head_link)
            }
            (None, _) => (0, GENESIS),
        };
        if let Some((&checkpoint_seq, entries)) = self.pending.iter().find(|(seq, _)| **seq > 0)
            && let Some(entry) = entries.first()
        {
            return Err(Break::Truncated {
                checkpoint_seq,
                last_seq,
                source: entry.source,
            });
        }
        if let Some((head_seq, head_link)) = head
            && (head_seq != last_seq || !bool::from(head_link.ct_eq(&last_link)))
        {
            return Err(Break::HeadMismatch { head_seq, last_seq });
        }
        Ok(VerifyReport {
            events: self.events,
            first_seq: self.first_seq,
            last_seq: self.last.map(|(seq, _)| seq),
            checkpoints_checked: self.checkpoints_checked,
            last_checkpoint_seq: self.last_checkpoint_seq,
        })
    }
}

fn same_link(computed: &[u8; 32], stored: &[u8]) -> bool {
    // Slices of different lengths compare unequal.
    bool::from(computed.as_slice().ct_eq(stored))
}

/// Subject ids as a set: the index keeps each subject of an event once, in its own order.
fn subject_set(ids: &[String]) -> std::collections::BTreeSet<&str> {
    ids.iter().map(String::as_str).collect()
}

/// The indexed columns must say what the signed body says.
fn check_columns(event: &StoredEvent) -> Result<(), Break> {
    let seq = event.seq;
    let Ok(body) = AuditEvent::from_bytes(&event.body) else {
        return Err(Break::Undecodable { seq });
    };
    let column = if body.at_us != event.at_us {
        "at_us"
    } else if body.caller != event.caller {
        "caller"
    } else if body.purpose != event.purpose {
        "purpose"
    } else if body.method != event.method {
        "method"
    } else if body.outcome != event.outcome {
        "outcome"
    } else if subject_set(&body.subjects) != subject_set(&event.subjects) {
        "subjects"
    } else {
        return Ok(());
    };
    Err(Break::ColumnMismatch { seq, column })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::audit::signing_key_from_seed;

    use CheckpointSource::{Database, File};

    struct Fixture {
        key: SecretKey,
        signing: SigningKey,
        events: Vec<StoredEvent>,
    }

    fn event(seq: i64) -> AuditEvent {
        AuditEvent {
            at_us: 1_767_225_600_000_000 + seq * 1_000,
            method: "kluis.v1.SubjectService/GetSubject".into(),
            caller: format!("caller-{}", seq % 3),
            role: "service".into(),
            purpose: "customer-support".into(),
            policy_version: "2026-01".into(),
            subjects: vec![format!("0198c0de-0000-7000-8000-{seq:012}")],
            read: vec!["contact.email".into()],
            outcome: "OK".into(),
            request_id: format!("req-{seq}"),
            ..AuditEvent::default()
        }
    }

    fn stored(key: &SecretKey, seq: i64, prev: &[u8; 32], event: &AuditEvent) -> StoredEvent {
        let body = event.to_bytes();
        StoredEvent {
            seq,
            at_us: event.at_us,
            caller: event.caller.clone(),
            purpose: event.purpose.clone(),
            method: event.method.clone(),
            outcome: event.outcome.clone(),
            subjects: event.subjects.clone(),
            mac: link(key, seq, prev, &body).to_vec(),
            body,
        }
    }

    fn fixture() -> Fixture {
        let key = SecretKey::random().unwrap();
        let signing = signing_key_from_seed(&SecretKey::random().unwrap());
        let mut events = Vec::new();
        let mut prev = GENESIS;
        for seq in 1..=20 {
            let e = stored(&key, seq, &prev, &event(seq));
            prev = mac_of(&e);
            events.push(e);
        }
        Fixture {
            key,
            signing,
            events,
        }
    }

    fn mac_of(event: &StoredEvent) -> [u8; 32] {
        event.mac.as_slice().try_into().unwrap()
    }

    impl Fixture {
        fn at(&self, seq: i64) -> &StoredEvent {
            self.events.iter().find(|e| e.seq == seq).unwrap()
        }

        fn checkpoint(&self, seq: i64, source: CheckpointSource) -> (Checkpoint, CheckpointSource) {
            let link = mac_of(self.at(seq));
            (
                Checkpoint::sign(&self.signing, seq, &link, 9_000 + seq),
                source,
            )
        }

        /// Database checkpoints every 5 events, file checkpoints every 10.
        fn usual_checkpoints(&self) -> Vec<(Checkpoint, CheckpointSource)> {
            let mut checkpoints: Vec<_> = [5, 10, 15, 20]
                .into_iter()
                .map(|seq| self.checkpoint(seq, Database))
                .collect();
            checkpoints.extend([10, 20].into_iter().map(|seq| self.checkpoint(seq, File)));
            checkpoints
        }

        fn head(&self) -> Option<(i64, [u8; 32])> {
            self.events.last().map(|e| (e.seq, mac_of(e)))
        }

        fn verify_with(
            &self,
            events: &[StoredEvent],
            checkpoints: Vec<(Checkpoint, CheckpointSource)>,
            head: Option<(i64, [u8; 32])>,
        ) -> Result<VerifyReport, Break> {
            let mut verifier = Verifier::new(&self.key, &self.signing.verifying_key(), checkpoints);
            for event in events {
                verifier.feed(event)?;
            }
            verifier.finish(head)
        }

        /// Verifies the fixture's (possibly tampered) events with the usual checkpoints and the
        /// head of the current events.
        fn verify(&self) -> Result<VerifyReport, Break> {
            self.verify_with(&self.events, self.usual_checkpoints(), self.head())
        }

        fn remove(&mut self, seq: i64) -> StoredEvent {
            let index = self.events.iter().position(|e| e.seq == seq).unwrap();
            self.events.remove(index)
        }
    }

    #[test]
    fn intact_chain_verifies_with_all_checkpoints() {
        let fx = fixture();
        let report = fx.verify().unwrap();
        assert_eq!(
            report,
            VerifyReport {
                events: 20,
                first_seq: Some(1),
                last_seq: Some(20),
                checkpoints_checked: 6,
                last_checkpoint_seq: Some(20),
            }
        );
        // Without checkpoints or head too.
        assert_eq!(
            fx.verify_with(&fx.events, Vec::new(), None).unwrap().events,
            20
        );
    }

    #[test]
    fn edited_body_is_a_bad_link_at_its_seq() {
        let mut fx = fixture();
        let mut edited = event(7);
        edited.read.push("identity.bsn".into());
        fx.events[6].body = edited.to_bytes();
        assert_eq!(fx.verify(), Err(Break::BadLink { seq: 7 }));
    }

    #[test]
    fn edited_body_with_columns_to_match_is_still_a_bad_link() {
        let mut fx = fixture();
        let mut edited = event(7);
        edited.caller = "innocent".into();
        fx.events[6].body = edited.to_bytes();
        fx.events[6].caller = "innocent".into();
        assert_eq!(fx.verify(), Err(Break::BadLink { seq: 7 }));
    }

    #[test]
    fn edited_mac_is_a_bad_link_at_its_seq() {
        let mut fx = fixture();
        fx.events[11].mac[0] ^= 1;
        assert_eq!(fx.verify(), Err(Break::BadLink { seq: 12 }));
        let mut fx = fixture();
        fx.events[11].mac.truncate(31);
        assert_eq!(fx.verify(), Err(Break::BadLink { seq: 12 }));
    }

    #[test]
    fn chain_rebuilt_under_another_key_is_a_bad_link_where_it_starts() {
        let mut fx = fixture();
        let forger = SecretKey::random().unwrap();
        let mut prev = mac_of(&fx.events[8]);
        for index in 9..20 {
            let seq = index as i64 + 1;
            fx.events[index] = stored(&forger, seq, &prev, &event(seq));
            prev = mac_of(&fx.events[index]);
        }
        let head = fx.head();
        assert_eq!(
            fx.verify_with(&fx.events, Vec::new(), head),
            Err(Break::BadLink { seq: 10 })
        );
    }

    #[test]
    fn deleted_event_in_the_middle_is_a_gap() {
        let mut fx = fixture();
        fx.remove(9);
        assert_eq!(
            fx.verify(),
            Err(Break::Gap {
                expected: 9,
                found: 10
            })
        );
    }

    #[test]
    fn inserted_event_is_detected_at_its_position() {
        // Inserted before the event with the same seq: its link cannot be right.
        let mut fx = fixture();
        let forged = stored(
            &SecretKey::random().unwrap(),
            9,
            &mac_of(fx.at(8)),
            &event(9),
        );
        fx.events.insert(8, forged.clone());
        assert_eq!(fx.verify(), Err(Break::BadLink { seq: 9 }));

        // Inserted after it: a repeated seq.
        let mut fx = fixture();
        fx.events.insert(9, forged);
        assert_eq!(
            fx.verify(),
            Err(Break::Gap {
                expected: 10,
                found: 9
            })
        );

        // Inserted with the later events renumbered: the renumbered event's link fails.
        let mut fx = fixture();
        let forged = stored(
            &SecretKey::random().unwrap(),
            9,
            &mac_of(fx.at(8)),
            &event(9),
        );
        for e in &mut fx.events[8..] {
            e.seq += 1;
        }
        fx.events.insert(8, forged);
        assert_eq!(fx.verify(), Err(Break::BadLink { seq: 9 }));
    }

    #[test]
    fn swapped_events_are_detected_at_the_first() {
        // Contents swapped, seqs kept.
        let mut fx = fixture();
        let (a, b) = (fx.events[4].clone(), fx.events[5].clone());
        fx.events[4] = StoredEvent { seq: 5, ..b };
        fx.events[5] = StoredEvent { seq: 6, ..a };
        assert_eq!(fx.verify(), Err(Break::BadLink { seq: 5 }));

        // Rows swapped, seqs with them.
        let mut fx = fixture();
        fx.events.swap(4, 5);
        assert_eq!(
            fx.verify(),
            Err(Break::Gap {
                expected: 5,
                found: 6
            })
        );
    }

    #[test]
    fn edited_column_is_a_column_mismatch() {
        type Edit = fn(&mut StoredEvent);
        let cases: [(&str, Edit); 6] = [
            ("at_us", |e| e.at_us += 1),
            ("caller", |e| e.caller = "someone-else".into()),
            ("purpose", |e| e.purpose = "marketing".into()),
            ("method", |e| {
                e.method = "kluis.v1.SubjectService/ListSubjects".into()
            }),
            ("outcome", |e| e.outcome = "PERMISSION_DENIED".into()),
            ("subjects", |e| e.subjects.clear()),
        ];
        for (column, edit) in cases {
            let mut fx = fixture();
            edit(&mut fx.events[3]);
            assert_eq!(
                fx.verify(),
                Err(Break::ColumnMismatch { seq: 4, column }),
                "{column}"
            );
        }
    }

    #[test]
    fn undecodable_body_with_a_valid_link_is_reported() {
        let mut fx = fixture();
        let prev = mac_of(fx.at(2));
        fx.events[2].body = b"not json".to_vec();
        fx.events[2].mac = link(&fx.key, 3, &prev, b"not json").to_vec();
        // Re-link the rest so only the decoding fails.
        let mut prev = mac_of(&fx.events[2]);
        for e in &mut fx.events[3..] {
            e.mac = link(&fx.key, e.seq, &prev, &e.body).to_vec();
            prev = mac_of(e);
        }
        let head = fx.head();
        assert_eq!(
            fx.verify_with(&fx.events, Vec::new(), head),
            Err(Break::Undecodable { seq: 3 })
        );
    }

    #[test]
    fn tail_cut_beyond_a_file_checkpoint_is_truncated() {
        let mut fx = fixture();
        let checkpoints = vec![fx.checkpoint(10, File), fx.checkpoint(20, File)];
        fx.events.truncate(17);
        let head = fx.head(); // the attacker moved the head row too
        assert_eq!(
            fx.verify_with(&fx.events, checkpoints, head),
            Err(Break::Truncated {
                checkpoint_seq: 20,
                last_seq: 17,
                source: File
            })
        );
    }

    #[test]
    fn tail_cut_with_database_checkpoints_is_still_truncated_via_the_file() {
        let mut fx = fixture();
        let file = vec![fx.checkpoint(10, File), fx.checkpoint(20, File)];
        let database: Vec<_> = [5, 10].map(|seq| fx.checkpoint(seq, Database)).into();
        fx.events.truncate(12);
        let head = fx.head();

        // The database alone no longer shows it: its later checkpoints went with the tail.
        let report = fx.verify_with(&fx.events, database.clone(), head).unwrap();
        assert_eq!(report.last_seq, Some(12));

        let mut all = database;
        all.extend(file);
        assert_eq!(
            fx.verify_with(&fx.events, all, head),
            Err(Break::Truncated {
                checkpoint_seq: 20,
                last_seq: 12,
                source: File
            })
        );
    }

    #[test]
    fn tail_cut_without_moving_the_head_is_caught_by_the_head() {
        let mut fx = fixture();
        let head = fx.head();
        fx.events.truncate(17);
        assert_eq!(
            fx.verify_with(&fx.events, Vec::new(), head),
            Err(Break::HeadMismatch {
                head_seq: 20,
                last_seq: 17
            })
        );
    }

    #[test]
    fn forged_checkpoint_signature_is_reported_at_its_seq() {
        let fx = fixture();
        let forger = signing_key_from_seed(&SecretKey::random().unwrap());
        let mut forged = Checkpoint::sign(&forger, 10, &[7u8; 32], 1);
        forged.public_key = hex::encode(fx.signing.verifying_key().to_bytes());
        let mut checkpoints = fx.usual_checkpoints();
        checkpoints.push((forged, Database));
        assert_eq!(
            fx.verify_with(&fx.events, checkpoints, fx.head()),
            Err(Break::BadCheckpointSignature {
                seq: 10,
                source: Database
            })
        );

        // A genuine checkpoint with its link edited.
        let (mut edited, _) = fx.checkpoint(15, File);
        edited.link = hex::encode([1u8; 32]);
        let mut checkpoints = fx.usual_checkpoints();
        checkpoints.push((edited, File));
        assert_eq!(
            fx.verify_with(&fx.events, checkpoints, fx.head()),
            Err(Break::BadCheckpointSignature {
                seq: 15,
                source: File
            })
        );

        // Beyond the last event: reported at the end.
        let forged = Checkpoint::sign(&forger, 40, &[7u8; 32], 1);
        let mut checkpoints = fx.usual_checkpoints();
        checkpoints.push((forged, File));
        assert_eq!(
            fx.verify_with(&fx.events, checkpoints, fx.head()),
            Err(Break::BadCheckpointSignature {
                seq: 40,
                source: File
            })
        );
    }

    #[test]
    fn earlier_break_is_reported_before_a_later_bad_signature() {
        let mut fx = fixture();
        let forger = signing_key_from_seed(&SecretKey::random().unwrap());
        let mut checkpoints = fx.usual_checkpoints();
        checkpoints.push((Checkpoint::sign(&forger, 15, &[7u8; 32], 1), File));
        fx.events[2].mac[5] ^= 0x80;
        assert_eq!(
            fx.verify_with(&fx.events, checkpoints, fx.head()),
            Err(Break::BadLink { seq: 3 })
        );
    }

    #[test]
    fn validly_signed_checkpoint_with_another_link_is_a_mismatch() {
        let fx = fixture();
        let mut checkpoints = fx.usual_checkpoints();
        checkpoints.push((Checkpoint::sign(&fx.signing, 15, &[7u8; 32], 1), File));
        assert_eq!(
            fx.verify_with(&fx.events, checkpoints, fx.head()),
            Err(Break::CheckpointMismatch {
                seq: 15,
                source: File
            })
        );
    }

    #[test]
    fn pruned_prefix_verifies_when_anchored_by_a_checkpoint() {
        let mut fx = fixture();
        let checkpoints = fx.usual_checkpoints(); // 5, 10 (twice), 15, 20 (twice)
        fx.events.drain(..10); // events 11..=20 remain, anchored by the checkpoints at 10
        let report = fx.verify_with(&fx.events, checkpoints, fx.head()).unwrap();
        assert_eq!(
            report,
            VerifyReport {
                events: 10,
                first_seq: Some(11),
                last_seq: Some(20),
                checkpoints_checked: 5,
                last_checkpoint_seq: Some(20),
            }
        );
    }

    #[test]
    fn pruned_prefix_without_an_anchor_is_no_anchor() {
        let mut fx = fixture();
        let checkpoints = fx.usual_checkpoints();
        fx.events.drain(..8); // events 9..=20: no checkpoint at 8
        assert_eq!(
            fx.verify_with(&fx.events, checkpoints, fx.head()),
            Err(Break::NoAnchor { first_seq: 9 })
        );
    }

    #[test]
    fn pruned_prefix_with_a_wrong_anchor_is_a_bad_link() {
        let mut fx = fixture();
        let checkpoints = vec![(Checkpoint::sign(&fx.signing, 10, &[7u8; 32], 1), Database)];
        fx.events.drain(..10);
        assert_eq!(
            fx.verify_with(&fx.events, checkpoints, fx.head()),
            Err(Break::BadLink { seq: 11 })
        );
    }

    #[test]
    fn disagreeing_anchors_report_the_one_the_chain_does_not_follow() {
        let mut fx = fixture();
        let checkpoints = vec![
            fx.checkpoint(10, Database),
            (Checkpoint::sign(&fx.signing, 10, &[7u8; 32], 1), File),
        ];
        fx.events.drain(..10);
        assert_eq!(
            fx.verify_with(&fx.events, checkpoints, fx.head()),
            Err(Break::CheckpointMismatch {
                seq: 10,
                source: File
            })
        );
    }

    #[test]
    fn head_that_does_not_name_the_last_event_is_a_head_mismatch() {
        let fx = fixture();
        let previous = Some((19, mac_of(fx.at(19))));
        assert_eq!(
            fx.verify_with(&fx.events, Vec::new(), previous),
            Err(Break::HeadMismatch {
                head_seq: 19,
                last_seq: 20
            })
        );
        let wrong_link = Some((20, [3u8; 32]));
        assert_eq!(
            fx.verify_with(&fx.events, Vec::new(), wrong_link),
            Err(Break::HeadMismatch {
                head_seq: 20,
                last_seq: 20
            })
        );
    }

    #[test]
    fn empty_chain_verifies_unless_a_checkpoint_or_head_says_otherwise() {
        let fx = fixture();
        let report = fx.verify_with(&[], Vec::new(), None).unwrap();
        assert_eq!(report, VerifyReport::default());
        assert!(fx.verify_with(&[], Vec::new(), Some((0, GENESIS))).is_ok());
        assert_eq!(
            fx.verify_with(&[], Vec::new(), Some((0, [1u8; 32]))),
            Err(Break::HeadMismatch {
                head_seq: 0,
                last_seq: 0
            })
        );
        assert_eq!(
            fx.verify_with(&[], vec![fx.checkpoint(5, File)], None),
            Err(Break::Truncated {
                checkpoint_seq: 5,
                last_seq: 0,
                source: File
            })
        );
    }

    #[test]
    fn fully_pruned_chain_verifies_when_a_checkpoint_anchors_the_head() {
        let fx = fixture();
        let head = fx.head();
        let report = fx.verify_with(&[], fx.usual_checkpoints(), head).unwrap();
        assert_eq!(
            report,
            VerifyReport {
                events: 0,
                first_seq: None,
                last_seq: None,
                checkpoints_checked: 2,
                last_checkpoint_seq: Some(20),
            }
        );
    }

    #[test]
    fn fully_pruned_chain_without_a_checkpoint_at_the_head_is_no_anchor() {
        let fx = fixture();
        let checkpoints = vec![fx.checkpoint(15, Database)];
        assert_eq!(
            fx.verify_with(&[], checkpoints, fx.head()),
            Err(Break::NoAnchor { first_seq: 21 })
        );
        // A checkpoint at the head's seq with another link than the head row.
        let wrong_head = Some((20, [9u8; 32]));
        assert_eq!(
            fx.verify_with(&[], vec![fx.checkpoint(20, File)], wrong_head),
            Err(Break::CheckpointMismatch {
                seq: 20,
                source: File
            })
        );
        // A head moved back to an older checkpoint: the later checkpoint shows the cut.
        let older_head = Some((15, mac_of(fx.at(15))));
        assert_eq!(
            fx.verify_with(&[], fx.usual_checkpoints(), older_head),
            Err(Break::Truncated {
                checkpoint_seq: 20,
                last_seq: 15,
                source: File
            })
        );
    }

    #[test]
    fn first_event_before_seq_one_is_a_gap() {
        let fx = fixture();
        let zero = StoredEvent {
            seq: 0,
            ..fx.events[0].clone()
        };
        assert_eq!(
            fx.verify_with(&[zero], Vec::new(), None),
            Err(Break::Gap {
                expected: 1,
                found: 0
            })
        );
    }

    #[test]
    fn extreme_seqs_do_not_panic() {
        let fx = fixture();
        let mut events = fx.events[..2].to_vec();
        events[1].seq = i64::MAX;
        assert_eq!(
            fx.verify_with(&events, Vec::new(), None),
            Err(Break::Gap {
                expected: 2,
                found: i64::MAX
            })
        );
        let min = StoredEvent {
            seq: i64::MIN,
            ..fx.events[0].clone()
        };
        assert!(fx.verify_with(&[min], Vec::new(), None).is_err());
        let max = StoredEvent {
            seq: i64::MAX,
            ..fx.events[0].clone()
        };
        let cp = (Checkpoint::sign(&fx.signing, i64::MAX, &[0u8; 32], 0), File);
        assert!(fx.verify_with(&[max], vec![cp], None).is_err());
    }

    #[test]
    fn feeding_after_a_break_repeats_it_and_finish_returns_it() {
        let mut fx = fixture();
        fx.events[4].mac[0] ^= 1;
        let mut verifier = Verifier::new(&fx.key, &fx.signing.verifying_key(), Vec::new());
        let mut first = None;
        for e in &fx.events {
            if let Err(found) = verifier.feed(e) {
                first.get_or_insert(found.clone());
                assert_eq!(Some(&found), first.as_ref());
            }
        }
        assert_eq!(first, Some(Break::BadLink { seq: 5 }));
        assert_eq!(verifier.finish(fx.head()), Err(Break::BadLink { seq: 5 }));
    }

    #[test]
    fn break_text_names_the_position() {
        let text = Break::Truncated {
            checkpoint_seq: 20,
            last_seq: 12,
            source: File,
        }
        .to_string();
        assert!(text.contains("12") && text.contains("20") && text.contains("file"));
        assert!(Break::BadLink { seq: 7 }.to_string().contains("seq 7"));
        assert!(
            Break::NoAnchor { first_seq: 9 }
                .to_string()
                .contains("seq 8")
        );
    }

    #[test]
    fn link_depends_on_key_seq_previous_link_and_body() {
        let key = SecretKey::random().unwrap();
        let base = link(&key, 1, &GENESIS, b"body");
        assert_eq!(base, link(&key, 1, &GENESIS, b"body"));
        assert_ne!(
            base,
            link(&SecretKey::random().unwrap(), 1, &GENESIS, b"body")
        );
        assert_ne!(base, link(&key, 2, &GENESIS, b"body"));
        assert_ne!(base, link(&key, 1, &[1u8; 32], b"body"));
        assert_ne!(base, link(&key, 1, &GENESIS, b"body!"));
    }

    #[test]
    fn verifier_debug_shows_no_key() {
        let fx = fixture();
        let verifier = Verifier::new(&fx.key, &fx.signing.verifying_key(), Vec::new());
        let text = format!("{verifier:?}");
        assert!(!text.contains(&hex::encode(fx.key.expose())));
        assert!(!text.contains("key"));
    }
}
