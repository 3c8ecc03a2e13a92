//! The audit trail at run time: events appended through the store's group committer (durable
//! before the call answers), signed checkpoints of the chain head on a timer and written outside
//! the database too, queries, verification and pruning.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ed25519_dalek::{SigningKey, VerifyingKey};
use uuid::Uuid;

use super::{
    AuditError, AuditEvent, Break, Checkpoint, CheckpointSource, Verifier, VerifyReport,
    append_to_file, link, read_file, signing_key_from_seed,
};
use crate::{
    crypto::SecretKey,
    store::{AuditFilter, AuditRecord, ChainLinker, Store, StoredAuditEvent},
};

/// Events read per page while verifying.
const VERIFY_PAGE: u32 = 5_000;

/// When checkpoints are taken and where their outside copy goes.
#[derive(Debug, Clone)]
pub struct CheckpointSettings {
    /// The append-only file outside the database; `None` keeps checkpoints in the database only.
    pub file: Option<PathBuf>,
    /// A checkpoint once this many events were appended since the last one…
    pub every_events: u64,
    /// …or once this much time passed with new events.
    pub every: Duration,
}

/// The chain's HMAC key as the store's linker.
struct KeyedLinker(SecretKey);

impl ChainLinker for KeyedLinker {
    fn link(&self, seq: i64, prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
        link(&self.0, seq, prev, body)
    }
}

/// The audit trail of one instance.
pub struct AuditTrail {
    store: Store,
    chain_key: SecretKey,
    signing: SigningKey,
    policy_version: String,
    settings: CheckpointSettings,
}

impl AuditTrail {
    /// Hands the chain key to the store's writer and returns the trail.
    pub fn new(
        store: Store,
        chain_key: SecretKey,
        checkpoint_seed: &SecretKey,
        policy_version: String,
        settings: CheckpointSettings,
    ) -> Arc<Self> {
        store.set_chain_linker(Arc::new(KeyedLinker(chain_key.clone())));
        Arc::new(Self {
            store,
            chain_key,
            signing: signing_key_from_seed(checkpoint_seed),
            policy_version,
            settings,
        })
    }

    /// The version of the policy file in force, cited by every event.
    pub fn policy_version(&self) -> &str {
        &self.policy_version
    }

    /// The public key that verifies checkpoints.
    pub fn public_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    pub fn checkpoint_file(&self) -> Option<&Path> {
        self.settings.file.as_deref()
    }

    /// The event as the store appends it: its exact bytes and the columns queries use.
    pub fn record_of(event: &AuditEvent) -> AuditRecord {
        AuditRecord {
            at_us: event.at_us,
            caller: event.caller.clone(),
            purpose: event.purpose.clone(),
            method: event.method.clone(),
            outcome: event.outcome.clone(),
            subjects: event
                .subjects
                .iter()
                .filter_map(|s| Uuid::parse_str(s).ok())
                .collect(),
            body: event.to_bytes(),
        }
    }

    /// Appends an event and waits until it is durable.
    pub async fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        self.store
            .record(Self::record_of(event))
            .await
            .map_err(|e| AuditError::Store(e.to_string()))
    }

    /// Signs the current chain head, stores the checkpoint and appends it to the checkpoint file.
    /// Returns `None` when the chain is empty or the head already has a checkpoint.
    pub async fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        let (seq, mac) = self.store.audit_head().await.map_err(store_error)?;
        if seq == 0 {
            return Ok(None);
        }
        let last = self
            .store
            .latest_audit_checkpoint()
            .await
            .map_err(store_error)?
            .map(|(s, _)| s);
        if last == Some(seq) {
            return Ok(None);
        }
        let mac: [u8; 32] = mac
            .try_into()
            .map_err(|_| AuditError::Decode("audit_head.mac is not 32 bytes".into()))?;
        let cp = Checkpoint::sign(&self.signing, seq, &mac, crate::clock::now_us());
        let json = serde_json::to_string(&cp).map_err(|e| AuditError::Decode(e.to_string()))?;
        // The outside copy first: a checkpoint the database has but the file lacks would protect
        // less than it seems.
        if let Some(file) = self.settings.file.clone() {
            let copy = cp.clone();
            // File I/O and fsync off the async workers.
            tokio::task::spawn_blocking(move || append_to_file(&file, &copy))
                .await
                .map_err(|e| AuditError::Store(format!("checkpoint file writer: {e}")))??;
        }
        self.store
            .insert_audit_checkpoint(seq, &json)
            .await
            .map_err(store_error)?;
        Ok(Some(cp))
    }

    /// The newest checkpoint in the database.
    pub async fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        match self
            .store
            .latest_audit_checkpoint()
            .await
            .map_err(store_error)?
        {
            Some((_, json)) => Ok(Some(
                serde_json::from_str(&json).map_err(|e| AuditError::Decode(e.to_string()))?,
            )),
            None => Ok(None),
        }
    }

    /// Takes checkpoints on the configured schedule until the process ends. A failed checkpoint
    /// is logged and tried again at the next tick.
    pub fn spawn_checkpointer(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let trail = self.clone();
        tokio::spawn(async move {
            let tick_every = trail
                .settings
                .every
                .min(Duration::from_secs(1))
                .max(Duration::from_millis(50));
            let mut tick = tokio::time::interval(tick_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_seq = 0i64;
            let mut last_at = tokio::time::Instant::now();
            loop {
                tick.tick().await;
                let head = match trail.store.audit_head().await {
                    Ok((seq, _)) => seq,
                    Err(e) => {
                        tracing::warn!(error = %e, "audit checkpoint: cannot read the chain head");
                        continue;
                    }
                };
                let due_by_count =
                    u64::try_from(head - last_seq).unwrap_or(0) >= trail.settings.every_events;
                let due_by_time = head > last_seq && last_at.elapsed() >= trail.settings.every;
                if !(due_by_count || due_by_time) {
                    continue;
                }
                match trail.checkpoint().await {
                    Ok(cp) => {
                        if let Some(cp) = cp {
                            tracing::debug!(seq = cp.seq, "audit checkpoint signed");
                        }
                        last_seq = head;
                        last_at = tokio::time::Instant::now();
                    }
                    Err(e) => tracing::error!(error = %e, "audit checkpoint failed"),
                }
            }
        })
    }

    /// Keeps the per-subject index of the trail close behind the head: every `every`, indexes
    /// what was appended since (queries by subject cover the rest by scanning it).
    pub fn spawn_indexer(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let trail = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = trail.store.index_audit_backlog().await {
                    tracing::warn!(error = %e, "audit subject index not updated");
                }
            }
        })
    }

    /// Events matching `filter` after `after`, decoded.
    pub async fn query(
        &self,
        filter: &AuditFilter,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(i64, AuditEvent)>, AuditError> {
        let rows = self
            .store
            .audit_query(filter, after, limit)
            .await
            .map_err(store_error)?;
        rows.into_iter()
            .map(|row| Ok((row.seq, AuditEvent::from_bytes(&row.body)?)))
            .collect()
    }

    /// Recomputes the whole chain and checks every checkpoint, in the database and in `files`
    /// (the configured checkpoint file when `files` is empty).
    pub async fn verify(
        &self,
        files: &[PathBuf],
    ) -> Result<Result<VerifyReport, Break>, AuditError> {
        verify_chain(&self.store, &self.chain_key, &self.public_key(), {
            if files.is_empty() {
                self.settings.file.iter().cloned().collect()
            } else {
                files.to_vec()
            }
        })
        .await
    }

    /// Deletes events older than `before_us`, up to the newest checkpoint that precedes them (so
    /// what remains still verifies from that checkpoint). Returns the number of events deleted.
    pub async fn prune(&self, before_us: i64) -> Result<u64, AuditError> {
        let Some(limit) = self
            .store
            .audit_last_seq_before(before_us)
            .await
            .map_err(store_error)?
        else {
            return Ok(0);
        };
        let anchor = self
            .store
            .audit_checkpoints()
            .await
            .map_err(store_error)?
            .into_iter()
            .map(|(seq, _)| seq)
            .filter(|seq| *seq <= limit)
            .max();
        match anchor {
            Some(seq) => self.store.prune_audit(seq).await.map_err(store_error),
            None => Ok(0),
        }
    }
}

/// Verification against a store, for the service and for `kluis audit verify` offline.
pub async fn verify_chain(
    store: &Store,
    chain_key: &SecretKey,
    public: &VerifyingKey,
    files: Vec<PathBuf>,
) -> Result<Result<VerifyReport, Break>, AuditError> {
    let mut checkpoints = Vec::new();
    for (seq, json) in store.audit_checkpoints().await.map_err(store_error)? {
        match serde_json::from_str::<Checkpoint>(&json) {
            Ok(cp) => checkpoints.push((cp, CheckpointSource::Database)),
            // A stored checkpoint that is not one was tampered with: that is a finding.
            Err(_) => {
                return Ok(Err(Break::BadCheckpointSignature {
                    seq,
                    source: CheckpointSource::Database,
                }));
            }
        }
    }
    for file in &files {
        let (found, torn) = read_file(file)?;
        if torn > 0 {
            tracing::warn!(file = %file.display(), torn, "checkpoint file ends in a torn line (ignored)");
        }
        checkpoints.extend(found.into_iter().map(|cp| (cp, CheckpointSource::File)));
    }
    let mut verifier = Verifier::new(chain_key, public, checkpoints);
    // The per-subject index is derived, but queries trust it: up to its mark it must say exactly
    // what the signed events say (their `subjects` column is checked against the body above).
    let indexed = store.audit_indexed_seq().await.map_err(store_error)?;
    let (seq, mac) = store.audit_head().await.map_err(store_error)?;
    if indexed > seq {
        return Ok(Err(Break::IndexMismatch { seq: seq + 1 }));
    }
    let mut after = 0i64;
    loop {
        let page = store
            .audit_page(after, VERIFY_PAGE)
            .await
            .map_err(store_error)?;
        let (Some(first), Some(last)) = (page.first(), page.last()) else {
            break;
        };
        after = last.seq;
        for row in &page {
            if let Err(b) = verifier.feed(&stored(row)) {
                return Ok(Err(b));
            }
        }
        if first.seq <= indexed {
            let hi = last.seq.min(indexed);
            let mut expected: Vec<(i64, String)> = page
                .iter()
                .filter(|row| row.seq <= hi)
                .flat_map(|row| row.subjects.iter().map(move |s| (row.seq, s.clone())))
                .collect();
            expected.sort();
            expected.dedup();
            let mut found = store
                .audit_index_rows(first.seq, hi)
                .await
                .map_err(store_error)?;
            found.sort();
            if found != expected {
                let seq = expected
                    .iter()
                    .zip(&found)
                    .find(|(a, b)| a != b)
                    .map(|(a, b)| a.0.min(b.0))
                    .or_else(|| expected.get(found.len()).map(|e| e.0))
                    .or_else(|| found.get(expected.len()).map(|f| f.0))
                    .unwrap_or(first.seq);
                return Ok(Err(Break::IndexMismatch { seq }));
            }
        }
    }
    let mac = <[u8; 32]>::try_from(mac.as_slice())
        .map_err(|_| AuditError::Decode("audit_head.mac is not 32 bytes".into()))?;
    Ok(verifier.finish(Some((seq, mac))))
}

fn stored(row: &StoredAuditEvent) -> super::StoredEvent {
    super::StoredEvent {
        seq: row.seq,
        at_us: row.at_us,
        caller: row.caller.clone(),
        purpose: row.purpose.clone(),
        method: row.method.clone(),
        outcome: row.outcome.clone(),
        subjects: row.subjects.clone(),
        body: row.body.clone(),
        mac: row.mac.clone(),
    }
}

fn store_error(e: crate::store::StoreError) -> AuditError {
    AuditError::Store(e.to_string())
}
