//! Callers, their roles and their tokens: authentication with a short, bounded cache.
//!
//! A token is checked against the SHA-256 stored for its id in constant time; an unknown id is
//! checked against a dummy hash so timing does not tell whether the id exists. Lookups are cached
//! for [`CACHE_TTL`]: a revocation takes effect at once on the instance that revoked and within
//! that window (plus a database round trip) everywhere else.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::{DomainError, call::Draft, now_us};
use crate::{
    crypto::CallerToken,
    store::{CallerRow, Store, StoreError, WriteOp, WriteOutcome},
};

/// How long a caller row is trusted before it is read again (the revocation window elsewhere).
pub const CACHE_TTL: Duration = Duration::from_secs(1);
const CACHE_MAX: usize = 10_000;

pub use crate::policy::Role;

impl From<crate::policy::UnknownRole> for DomainError {
    fn from(e: crate::policy::UnknownRole) -> Self {
        DomainError::invalid("role", e)
    }
}

/// The id prefix of callers authenticated by a client certificate.
pub const CERTIFICATE_CALLER_PREFIX: &str = "tls:";

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub id: String,
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// A caller authenticated by a verified client certificate whose DNS name the configuration
    /// maps to `role`; its id is `tls:<name>` (token callers have 16 hex digits).
    pub fn from_certificate(name: &str, role: Role) -> Self {
        Self {
            id: format!("{CERTIFICATE_CALLER_PREFIX}{name}"),
            name: name.to_owned(),
            role,
        }
    }

    /// Whether `id` has the form of a caller id: a token's 16 hex digits, or `tls:<dns name>`.
    pub fn is_valid_id(id: &str) -> bool {
        match id.strip_prefix(CERTIFICATE_CALLER_PREFIX) {
            Some(name) => {
                !name.is_empty()
                    && name.len() <= 253
                    && name.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
                    })
            }
            None => id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        }
    }
    /// Refuses the call unless the caller is an operator.
    pub fn require_operator(&self, what: &str) -> Result<(), DomainError> {
        if self.role == Role::Operator {
            Ok(())
        } else {
            Err(DomainError::PermissionDenied(format!(
                "{what} is for the operator role; caller has role {}",
                self.role
            )))
        }
    }
}

/// A caller as listed to operators: never the token or its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerInfo {
    pub id: String,
    pub name: String,
    pub role: String,
    pub created_at_us: i64,
    pub revoked_at_us: Option<i64>,
}

impl From<&CallerRow> for CallerInfo {
    fn from(r: &CallerRow) -> Self {
        Self {
            id: r.id.clone(),
            name: r.name.clone(),
            role: r.role.clone(),
            created_at_us: r.created_at,
            revoked_at_us: r.revoked_at,
        }
    }
}

struct Cached {
    row: Arc<CallerRow>,
    fetched: Instant,
}

/// Authenticates tokens and manages callers.
pub struct Callers {
    store: Store,
    cache: Mutex<HashMap<String, Cached>>,
    /// Bumped by every revocation here: a lookup that read the database before a revocation must
    /// not put the old row back into the cache after it.
    revocations: std::sync::atomic::AtomicU64,
    dummy_hash: [u8; 32],
}

impl Callers {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            cache: Mutex::new(HashMap::new()),
            revocations: std::sync::atomic::AtomicU64::new(0),
            dummy_hash: [0x5a; 32],
        }
    }

    /// Checks an `authorization` header value (`Bearer kluis_<id>_<secret>`).
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Caller, DomainError> {
        let header = header.ok_or(DomainError::Unauthenticated(
            "missing authorization: Bearer <token>",
        ))?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or(DomainError::Unauthenticated(
                "authorization is not `Bearer <token>`",
            ))?;
        let token = CallerToken::parse(token.trim()).map_err(|_| {
            DomainError::Unauthenticated("malformed token: expected kluis_<id>_<secret>")
        })?;
        let row = self.lookup(&token.id).await?;
        let presented = token.secret_hash();
        let stored: &[u8] = row
            .as_ref()
            .map_or(&self.dummy_hash[..], |r| &r.secret_hash[..]);
        let matches: bool = presented.ct_eq(stored).into();
        match row {
            Some(row) if matches && row.revoked_at.is_none() => Ok(Caller {
                id: row.id.clone(),
                name: row.name.clone(),
                role: row.role.parse().map_err(|_| {
                    DomainError::Internal(format!("caller {} has an unknown role", row.id))
                })?,
            }),
            Some(row) if matches => {
                tracing::info!(caller_id = %row.id, "revoked token presented");
                Err(DomainError::Unauthenticated("token revoked"))
            }
            _ => Err(DomainError::Unauthenticated("unknown token")),
        }
    }

    async fn lookup(&self, id: &str) -> Result<Option<Arc<CallerRow>>, DomainError> {
        if let Ok(cache) = self.cache.lock()
            && let Some(hit) = cache.get(id)
            && hit.fetched.elapsed() < CACHE_TTL
        {
            return Ok(Some(hit.row.clone()));
        }
        let generation = self.revocations.load(std::sync::atomic::Ordering::SeqCst);
        let Some(row) = self.store.caller(id).await? else {
            return Ok(None);
        };
        let row = Arc::new(row);
        if let Ok(mut cache) = self.cache.lock()
            && self.revocations.load(std::sync::atomic::Ordering::SeqCst) == generation
        {
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(
                id.to_owned(),
                Cached {
                    row: row.clone(),
                    fetched: Instant::now(),
                },
            );
        }
        Ok(Some(row))
    }

    /// Creates a caller; returns it with its token, which is not stored anywhere.
    pub async fn create(
        &self,
        name: &str,
        role: Role,
    ) -> Result<(CallerInfo, Zeroizing<String>), DomainError> {
        let token = CallerToken::generate()?;
        let info = self.insert(name, role, &token).await?;
        Ok((info, token.reveal()))
    }

    /// [`Callers::create`] with the call's audit event committed in the same transaction.
    pub async fn create_audited(
        &self,
        name: &str,
        role: Role,
        draft: &mut Draft,
    ) -> Result<(CallerInfo, Zeroizing<String>), DomainError> {
        let token = CallerToken::generate()?;
        let row = self.new_row(name, role, &token)?;
        draft.event.detail = format!("caller={} role={}", row.id, row.role);
        self.store
            .write_audited(WriteOp::InsertCaller(row.clone()), draft.committed_record())
            .await?;
        draft.committed = true;
        tracing::info!(caller_id = %row.id, caller = %row.name, role = %row.role, "caller created");
        Ok((CallerInfo::from(&row), token.reveal()))
    }

    /// [`Callers::revoke`] with the call's audit event committed in the same transaction.
    pub async fn revoke_audited(
        &self,
        id: &str,
        draft: &mut Draft,
    ) -> Result<CallerInfo, DomainError> {
        // Only a well-formed id goes into the audit trail.
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DomainError::NotFoundNamed { what: "caller" });
        }
        draft.event.detail = format!("caller={id}");
        let op = WriteOp::RevokeCaller {
            id: id.to_owned(),
            at: now_us(),
        };
        match self.store.write_audited(op, draft.committed_record()).await {
            Ok(WriteOutcome::CallerRevoked { found: true }) => {}
            Ok(other) => return Err(DomainError::Internal(format!("revoke answered {other:?}"))),
            Err(StoreError::NotFound) => return Err(DomainError::NotFoundNamed { what: "caller" }),
            Err(e) => return Err(e.into()),
        }
        draft.committed = true;
        let row = self
            .store
            .caller(id)
            .await?
            .ok_or(DomainError::NotFoundNamed { what: "caller" })?;
        self.forget(id);
        tracing::info!(caller_id = %row.id, "caller revoked");
        Ok(CallerInfo::from(&row))
    }

    fn forget(&self, id: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            self.revocations
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            cache.remove(id);
        }
    }

    fn new_row(
        &self,
        name: &str,
        role: Role,
        token: &CallerToken,
    ) -> Result<CallerRow, DomainError> {
        Ok(CallerRow {
            id: token.id.clone(),
            name: caller_name(name)?,
            role: role.as_str().to_owned(),
            secret_hash: token.secret_hash().to_vec(),
            created_at: now_us(),
            revoked_at: None,
        })
    }

    async fn insert(
        &self,
        name: &str,
        role: Role,
        token: &CallerToken,
    ) -> Result<CallerInfo, DomainError> {
        let row = self.new_row(name, role, token)?;
        self.store.insert_caller(&row).await?;
        tracing::info!(caller_id = %row.id, caller = %row.name, role = %row.role, "caller created");
        Ok(CallerInfo::from(&row))
    }

    /// Revokes a caller's token; effective at once here (the cache entry is dropped).
    pub async fn revoke(&self, id: &str) -> Result<CallerInfo, DomainError> {
        let row = self
            .store
            .revoke_caller(id, now_us())
            .await?
            .ok_or(DomainError::NotFoundNamed { what: "caller" })?;
        self.forget(id);
        tracing::info!(caller_id = %row.id, "caller revoked");
        Ok(CallerInfo::from(&row))
    }

    pub async fn list(&self) -> Result<Vec<CallerInfo>, DomainError> {
        Ok(self
            .store
            .callers()
            .await?
            .iter()
            .map(CallerInfo::from)
            .collect())
    }

    /// On a database without callers, creates the first operator. `keep` stores its token (a
    /// file) *before* the caller is inserted, so a failure or a crash in between leaves no caller
    /// whose token nobody has; the next start simply tries again.
    pub async fn bootstrap_operator(
        &self,
        keep: impl FnOnce(&str) -> std::io::Result<()>,
    ) -> Result<bool, DomainError> {
        if self.store.count_callers().await? > 0 {
            return Ok(false);
        }
        let token = CallerToken::generate()?;
        keep(&token.reveal())
            .map_err(|e| DomainError::Internal(format!("storing the first operator token: {e}")))?;
        self.insert("operator", Role::Operator, &token).await?;
        Ok(true)
    }
}

/// A caller's name: 1 to 64 of `A-Z a-z 0-9 . _ @ -`.
fn caller_name(name: &str) -> Result<String, DomainError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(DomainError::invalid(
            "name",
            "1 to 64 of A-Z a-z 0-9 . _ @ -",
        ))
    }
}
