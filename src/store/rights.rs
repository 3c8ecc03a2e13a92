//! Consent history, unsubscribe tokens, restrictions, the disclosure register and erasure
//! receipts: the reads the rights and consent services answer from (writes go through the group
//! committer).

use std::collections::HashSet;

use uuid::Uuid;

use super::{RawSubjectRow, Store, StoreError, SubjectRow, on_pool, uuid_from};

/// One entry of a subject's consent history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentEventRow {
    pub purpose: String,
    /// `object`, `withdraw-objection`, `grant` or `withdraw-consent`.
    pub action: String,
    pub route: String,
    pub at: i64,
    pub caller: String,
}

/// A restriction of processing (GDPR art. 18), in force while `lifted_at` is None.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestrictionRow {
    pub id: String,
    pub subject: Uuid,
    /// A case reference.
    pub reason: String,
    pub placed_at: i64,
    pub placed_by: String,
    pub lifted_at: Option<i64>,
    pub lifted_by: Option<String>,
}

/// An entry of the disclosure register: field paths, never values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisclosureRow {
    pub id: String,
    pub subject: Uuid,
    pub recipient: String,
    pub purpose: String,
    pub legal_basis: String,
    pub paths: Vec<String>,
    pub reference: String,
    pub disclosed_at: i64,
    pub recorded_at: i64,
    pub recorded_by: String,
}

/// A signed erasure receipt as issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRow {
    pub id: String,
    pub subject: Uuid,
    pub issued_at: i64,
    /// The exact signed JSON.
    pub receipt: String,
    pub signature: Vec<u8>,
}

type RawDisclosure = (
    String,
    Vec<u8>,
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    String,
);

impl Store {
    /// A subject's consent history, oldest first.
    pub async fn consent_events(&self, subject: Uuid) -> Result<Vec<ConsentEventRow>, StoreError> {
        let idb = subject.as_bytes().to_vec();
        let rows: Vec<(String, String, String, i64, String)> = on_pool!(&self.backend, pool => sqlx::query_as(
            "SELECT purpose, action, route, at_us, caller FROM consent_events WHERE subject_id = $1 ORDER BY id")
            .bind(idb).fetch_all(pool).await)?;
        Ok(rows
            .into_iter()
            .map(|(purpose, action, route, at, caller)| ConsentEventRow {
                purpose,
                action,
                route,
                at,
                caller,
            })
            .collect())
    }

    /// The purposes a subject objected to, and those it consented to, now.
    pub async fn consent_state(
        &self,
        subject: Uuid,
    ) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let idb = subject.as_bytes().to_vec();
        let objected: Vec<String> = on_pool!(&self.backend, pool => sqlx::query_scalar(
            "SELECT purpose FROM objections WHERE subject_id = $1 ORDER BY purpose")
            .bind(idb.clone()).fetch_all(pool).await)?;
        let consented: Vec<String> = on_pool!(&self.backend, pool => sqlx::query_scalar(
            "SELECT purpose FROM consents WHERE subject_id = $1 ORDER BY purpose")
            .bind(idb.clone()).fetch_all(pool).await)?;
        Ok((objected, consented))
    }

    /// Whether consent for `purpose` is in force for the subject.
    pub async fn consented(&self, subject: Uuid, purpose: &str) -> Result<bool, StoreError> {
        Ok(!self.consented_among(purpose, &[subject]).await?.is_empty())
    }

    /// Those of `ids` with consent for `purpose` in force.
    pub async fn consented_among(
        &self,
        purpose: &str,
        ids: &[Uuid],
    ) -> Result<HashSet<Uuid>, StoreError> {
        let mut out = HashSet::new();
        for chunk in ids.chunks(500) {
            let rows: Vec<Vec<u8>> = on_pool!(&self.backend, pool => {
                let mut q = sqlx::QueryBuilder::new("SELECT subject_id FROM consents WHERE purpose = ");
                q.push_bind(purpose.to_owned());
                q.push(" AND subject_id IN (");
                let mut sep = q.separated(", ");
                for id in chunk {
                    sep.push_bind(id.as_bytes().to_vec());
                }
                q.push(")");
                q.build_query_scalar().fetch_all(pool).await
            })?;
            for id in rows {
                out.insert(uuid_from(&id)?);
            }
        }
        Ok(out)
    }

    /// Subjects after `after` (by id) that may be mailed under `purpose`: not restricted, and not
    /// objected (`consent_based`: with consent in force). At most `limit`, by id.
    pub async fn audience_page(
        &self,
        purpose: &str,
        consent_based: bool,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<SubjectRow>, StoreError> {
        let filter = if consent_based {
            "EXISTS (SELECT 1 FROM consents c WHERE c.subject_id = s.id AND c.purpose = $1)"
        } else {
            "NOT EXISTS (SELECT 1 FROM objections o WHERE o.subject_id = s.id AND o.purpose = $1)"
        };
        let sql = format!(
            "SELECT s.id, k.dek_id, k.kek_version, k.wrapped_dek, s.record, s.version, s.created_at, \
             s.updated_at, s.retention, s.retention_version, s.restricted_at FROM subjects s \
             JOIN data_keys k ON k.subject_id = s.id WHERE s.id > $2 AND s.restricted_at IS NULL AND {filter} ORDER BY s.id LIMIT $3"
        );
        let after = after.map_or_else(Vec::new, |id| id.as_bytes().to_vec());
        let raws: Vec<RawSubjectRow> = on_pool!(&self.backend, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
            .bind(purpose.to_owned()).bind(after.clone()).bind(i64::from(limit)).fetch_all(pool).await)?;
        raws.into_iter().map(SubjectRow::try_from).collect()
    }

    /// A subject's restrictions, oldest first.
    pub async fn restrictions(&self, subject: Uuid) -> Result<Vec<RestrictionRow>, StoreError> {
        let idb = subject.as_bytes().to_vec();
        type Raw = (
            String,
            Vec<u8>,
            String,
            i64,
            String,
            Option<i64>,
            Option<String>,
        );
        let rows: Vec<Raw> = on_pool!(&self.backend, pool => sqlx::query_as(
            "SELECT id, subject_id, reason, placed_at, placed_by, lifted_at, lifted_by FROM restrictions \
             WHERE subject_id = $1 ORDER BY placed_at, id")
            .bind(idb).fetch_all(pool).await)?;
        rows.into_iter()
            .map(
                |(id, subject, reason, placed_at, placed_by, lifted_at, lifted_by)| {
                    Ok(RestrictionRow {
                        id,
                        subject: uuid_from(&subject)?,
                        reason,
                        placed_at,
                        placed_by,
                        lifted_at,
                        lifted_by,
                    })
                },
            )
            .collect()
    }

    /// A subject's disclosures, oldest first.
    pub async fn disclosures(&self, subject: Uuid) -> Result<Vec<DisclosureRow>, StoreError> {
        let idb = subject.as_bytes().to_vec();
        let rows: Vec<RawDisclosure> = on_pool!(&self.backend, pool => sqlx::query_as(
            "SELECT id, subject_id, recipient, purpose, legal_basis, paths, reference, disclosed_at, \
             recorded_at, recorded_by FROM disclosures WHERE subject_id = $1 ORDER BY disclosed_at, id")
            .bind(idb).fetch_all(pool).await)?;
        rows.into_iter()
            .map(
                |(
                    id,
                    subject,
                    recipient,
                    purpose,
                    legal_basis,
                    paths,
                    reference,
                    disclosed_at,
                    recorded_at,
                    recorded_by,
                )| {
                    Ok(DisclosureRow {
                        id,
                        subject: uuid_from(&subject)?,
                        recipient,
                        purpose,
                        legal_basis,
                        paths: paths
                            .split(',')
                            .filter(|p| !p.is_empty())
                            .map(str::to_owned)
                            .collect(),
                        reference,
                        disclosed_at,
                        recorded_at,
                        recorded_by,
                    })
                },
            )
            .collect()
    }

    /// The subject an unsubscribe token (by its keyed hash) was issued for, if it was issued at or
    /// after `issued_after`.
    pub async fn unsubscribe_token_subject(
        &self,
        hash: &[u8],
        issued_after: i64,
    ) -> Result<Option<Uuid>, StoreError> {
        let found: Option<Vec<u8>> = on_pool!(&self.backend, pool => sqlx::query_scalar(
            "SELECT subject_id FROM unsubscribe_tokens WHERE token_hash = $1 AND issued_at >= $2")
            .bind(hash.to_vec()).bind(issued_after).fetch_optional(pool).await)?;
        found.map(|id| uuid_from(&id)).transpose()
    }

    /// A subject's password hash, if one is set.
    pub async fn credential(&self, subject: Uuid) -> Result<Option<String>, StoreError> {
        Ok(on_pool!(&self.backend, pool => sqlx::query_scalar(
            "SELECT hash FROM credentials WHERE subject_id = $1")
            .bind(subject.as_bytes().to_vec()).fetch_optional(pool).await)?)
    }

    /// Deletes unsubscribe tokens issued before `cutoff`; how many.
    pub async fn prune_unsubscribe_tokens(&self, cutoff: i64) -> Result<u64, StoreError> {
        let done: u64 = on_pool!(&self.backend, pool => sqlx::query(
            "DELETE FROM unsubscribe_tokens WHERE issued_at < $1")
            .bind(cutoff).execute(pool).await.map(|d| d.rows_affected()))?;
        Ok(done)
    }

    /// The erasure receipts issued for a subject, oldest first.
    pub async fn receipts(&self, subject: Uuid) -> Result<Vec<ReceiptRow>, StoreError> {
        let idb = subject.as_bytes().to_vec();
        type Raw = (String, Vec<u8>, i64, String, Vec<u8>);
        let rows: Vec<Raw> = on_pool!(&self.backend, pool => sqlx::query_as(
            "SELECT id, subject_id, issued_at, receipt, signature FROM erasure_receipts \
             WHERE subject_id = $1 ORDER BY issued_at, id")
            .bind(idb).fetch_all(pool).await)?;
        rows.into_iter()
            .map(|(id, subject, issued_at, receipt, signature)| {
                Ok(ReceiptRow {
                    id,
                    subject: uuid_from(&subject)?,
                    issued_at,
                    receipt,
                    signature,
                })
            })
            .collect()
    }
}
