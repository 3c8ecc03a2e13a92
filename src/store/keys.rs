//! The keyring's rows beyond start-up: every key version with its state and dates, the root-key
//! versions, and the subjects' data keys the re-wrap job moves to the active KEK.

use uuid::Uuid;

use super::{Store, StoreError, on_pool, uuid_from};

/// A key version as `KeyStatus` shows it (no key material).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct KeyVersionRow {
    pub kind: String,
    pub version: i64,
    pub state: String,
    pub root_version: i64,
    pub created_at: i64,
    pub retired_at: Option<i64>,
}

/// A root-key version known to the database by its key-check value.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RootCheckRow {
    pub version: i64,
    pub created_at: i64,
    pub retired_at: Option<i64>,
}

/// A subject's data key as stored: what the re-wrap job reads.
#[derive(Debug, Clone)]
pub struct DekRow {
    pub id: Uuid,
    pub dek_id: Uuid,
    pub kek_version: u32,
    pub wrapped_dek: Vec<u8>,
}

/// A data key wrapped anew: applied only if the subject's key is still under `old_version`.
#[derive(Debug, Clone)]
pub struct Rewrapped {
    pub id: Uuid,
    pub old_version: u32,
    pub new_version: u32,
    pub wrapped: Vec<u8>,
}

/// A key in `keys` wrapped anew under a new root-key version: applied only if still wrapped
/// under `old_root`.
#[derive(Debug, Clone)]
pub struct RewrappedKey {
    pub kind: String,
    pub version: i64,
    pub old_root: i64,
    pub wrapped: Vec<u8>,
}

/// `(id, dek_id, kek_version, wrapped_dek)` as selected.
type DekTuple = (Vec<u8>, Vec<u8>, i64, Vec<u8>);

fn version(v: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(what.into()))
}

impl Store {
    /// Every key version of every kind, oldest first per kind.
    pub async fn key_versions(&self) -> Result<Vec<KeyVersionRow>, StoreError> {
        Ok(
            on_pool!(&self.backend, pool => sqlx::query_as::<_, KeyVersionRow>(
            "SELECT kind, version, state, root_version, created_at, retired_at FROM keys \
             ORDER BY kind, version")
            .fetch_all(pool).await)?,
        )
    }

    /// Every root-key version the database has a key-check value for, oldest first.
    pub async fn root_checks(&self) -> Result<Vec<RootCheckRow>, StoreError> {
        Ok(
            on_pool!(&self.backend, pool => sqlx::query_as::<_, RootCheckRow>(
            "SELECT version, created_at, retired_at FROM root_key_checks ORDER BY version")
            .fetch_all(pool).await)?,
        )
    }

    /// How many subjects' data keys each KEK version wraps.
    pub async fn dek_counts(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        let rows: Vec<(i64, i64)> = on_pool!(&self.backend, pool => sqlx::query_as(
            "SELECT kek_version, COUNT(*) FROM data_keys GROUP BY kek_version ORDER BY kek_version")
            .fetch_all(pool).await)?;
        rows.into_iter()
            .map(|(v, n)| Ok((version(v, "kek_version")?, u64::try_from(n).unwrap_or(0))))
            .collect()
    }

    /// Subjects whose blind index at `path` equals any of `digests` (one value under several
    /// index-key versions during a rotation), in id order, at most `limit`. One statement, so it
    /// sees a subject the re-index job moves meanwhile either before or after the move.
    pub async fn find_any(
        &self,
        path: &'static str,
        digests: &[[u8; 32]],
        limit: u32,
    ) -> Result<Vec<super::Found>, StoreError> {
        type Row = (Vec<u8>, Option<Vec<u8>>, Option<i64>);
        let rows: Vec<Row> = on_pool!(&self.backend, pool => {
            let mut q = sqlx::QueryBuilder::new(
                "SELECT DISTINCT b.subject_id, s.retention, s.restricted_at FROM blind_index b \
                 JOIN subjects s ON s.id = b.subject_id WHERE b.path = CAST(",
            );
            // CAST, not a bare parameter: see the module docs of `store`.
            q.push_bind(path);
            q.push(" AS TEXT) AND b.digest IN (");
            let mut list = q.separated(", ");
            for digest in digests {
                list.push_bind(digest.to_vec());
            }
            q.push(") ORDER BY b.subject_id LIMIT ");
            q.push_bind(i64::from(limit));
            q.build_query_as::<Row>().fetch_all(pool).await
        })?;
        rows.into_iter()
            .map(|(id, retention, restricted_at)| {
                super::Found::from_row(&id, retention, restricted_at)
            })
            .collect()
    }

    /// Up to `limit` subjects with blind-index entries under a version older than `below`.
    pub async fn index_stale(&self, below: u32, limit: u32) -> Result<Vec<Uuid>, StoreError> {
        let ids: Vec<Vec<u8>> = on_pool!(&self.backend, pool => sqlx::query_scalar(
            "SELECT id FROM subjects WHERE index_version < $1 ORDER BY index_version LIMIT $2")
            .bind(i64::from(below))
            .bind(i64::from(limit))
            .fetch_all(pool).await)?;
        ids.iter().map(|id| uuid_from(id)).collect()
    }

    /// How many subjects have blind-index entries under each version (their oldest one).
    pub async fn index_counts(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        let rows: Vec<(i64, i64)> = on_pool!(&self.backend, pool => sqlx::query_as(
            "SELECT index_version, COUNT(*) FROM subjects WHERE index_version IS NOT NULL \
             GROUP BY index_version ORDER BY index_version")
            .fetch_all(pool).await)?;
        rows.into_iter()
            .map(|(v, n)| Ok((version(v, "index_version")?, u64::try_from(n).unwrap_or(0))))
            .collect()
    }

    /// Up to `limit` data keys wrapped under a KEK version older than `below`.
    pub async fn deks_below(&self, below: u32, limit: u32) -> Result<Vec<DekRow>, StoreError> {
        let rows: Vec<DekTuple> = on_pool!(&self.backend, pool =>
            sqlx::query_as(
                "SELECT subject_id, dek_id, kek_version, wrapped_dek FROM data_keys WHERE kek_version < $1 \
                 ORDER BY kek_version LIMIT $2")
            .bind(i64::from(below))
            .bind(i64::from(limit))
            .fetch_all(pool).await)?;
        rows.into_iter()
            .map(|(id, dek_id, v, wrapped_dek)| {
                Ok(DekRow {
                    id: uuid_from(&id)?,
                    dek_id: uuid_from(&dek_id)?,
                    kek_version: version(v, "kek_version")?,
                    wrapped_dek,
                })
            })
            .collect()
    }
}
