//! Customers' portal passwords ("inloggen met gebruikersnaam en een zelfgekozen wachtwoord"): kluis
//! keeps only an Argon2id hash per subject and answers "verify", so no other system keeps password
//! hashes. Hashing runs in `spawn_blocking` behind a bounded number of permits, so a burst of
//! logins cannot starve other calls; an unknown username costs what a known one costs (a dummy
//! hash); failed attempts are throttled per username and per peer; a hash made with older
//! parameters is replaced on the next successful verification.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::Semaphore;
use uuid::Uuid;

use super::{DomainError, FieldPath, Vault, access::Access, call::Draft, record::index_key};
use crate::{
    crypto::{PasswordParams, hash_password, needs_rehash, random_bytes, verify_password},
    policy::Role,
    store::{Redacted, StoreError, WriteOp},
};

/// The purpose portal logins run under (the statement puts login under "Uw account").
pub const LOGIN_PURPOSE: &str = "account";
/// Password length bounds, in characters.
pub const MIN_PASSWORD_CHARS: usize = 12;
pub const MAX_PASSWORD_CHARS: usize = 128;

/// How passwords are hashed and attempts throttled; from the configuration.
#[derive(Debug, Clone)]
pub struct PasswordSettings {
    pub params: PasswordParams,
    /// Hashes computed at once at most (each takes `m_kib` of memory).
    pub concurrency: usize,
    /// Failed attempts per username, and per peer address, within `window` before further
    /// attempts are refused until the window has passed.
    pub max_failures: u32,
    pub window: Duration,
}

impl Default for PasswordSettings {
    fn default() -> Self {
        Self {
            params: PasswordParams::default(),
            concurrency: 2,
            max_failures: 5,
            window: Duration::from_secs(300),
        }
    }
}

/// A password as received, zeroized when dropped; never printed.
pub struct Password(zeroize::Zeroizing<String>);

impl Password {
    /// Checks the password policy; `field` names it in the violation.
    pub fn parse(text: String, field: &str) -> Result<Self, DomainError> {
        let text = zeroize::Zeroizing::new(text);
        let chars = text.chars().count();
        if !(MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&chars) {
            return Err(DomainError::invalid(
                field,
                format!("a password has {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters"),
            ));
        }
        if text.trim().is_empty() || text.chars().any(char::is_control) {
            return Err(DomainError::invalid(
                field,
                "a password is not only spaces and has no control characters",
            ));
        }
        Ok(Self(text))
    }

    /// A password as given for verification: not checked against the policy (an old password
    /// may predate it), only bounded.
    pub fn given(text: String, field: &str) -> Result<Self, DomainError> {
        let text = zeroize::Zeroizing::new(text);
        if text.is_empty() || text.len() > 4 * MAX_PASSWORD_CHARS {
            return Err(DomainError::invalid(field, "give the password"));
        }
        Ok(Self(text))
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(***)")
    }
}

pub struct Credentials {
    vault: Arc<Vault>,
    settings: PasswordSettings,
    permits: Semaphore,
    /// Verified against when the username is unknown or has no password, so that costs the same.
    dummy: String,
    /// Failures per throttling key (`user:<digest>`, `peer:<ip>`): count and window start.
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl Credentials {
    pub fn new(vault: Arc<Vault>, settings: PasswordSettings) -> Result<Self, DomainError> {
        let filler = hex::encode(random_bytes::<16>()?);
        let dummy = hash_password(settings.params, filler.as_bytes())?;
        Ok(Self {
            vault,
            permits: Semaphore::new(settings.concurrency.max(1)),
            settings,
            dummy,
            failures: Mutex::new(HashMap::new()),
        })
    }

    /// Sets the subject's password (policy-checked). `hosting-backend` under `account`, or
    /// operators.
    pub async fn set(
        &self,
        access: &Access,
        id: Uuid,
        password: Password,
        draft: &mut Draft,
    ) -> Result<(), DomainError> {
        draft.subject(id);
        check_caller(access)?;
        draft.event.detail = "password-set".into();
        if self.vault.store.subject(id).await?.is_none() {
            return Err(DomainError::NotFound);
        }
        let hash = self.hash(password).await?;
        self.store_hash(id, hash, Some(draft)).await
    }

    /// Checks a login: the subject whose `account.username` is `username`, if the password
    /// matches. A wrong password, an unknown username and a subject without a password all
    /// answer None after the same work. Too many failures for the username or the peer within
    /// the window: `Throttled`.
    pub async fn verify(
        &self,
        access: &Access,
        username: &str,
        password: Password,
        client: Option<IpAddr>,
        draft: &mut Draft,
    ) -> Result<Option<Uuid>, DomainError> {
        check_caller(access)?;
        let path = FieldPath::AccountUsername;
        let (_, digest) = self
            .vault
            .keys
            .keyring()
            .blind_index(path.as_str(), &index_key(path, username));
        let user_key = format!("user:{}", hex::encode(&digest[..12]));
        let keys = throttle_keys(user_key.clone(), client);
        self.check_throttle(&keys)?;
        let found = self.vault.find_indexed(path, username, 1).await?;
        let subject = found.first().map(|f| f.id);
        let stored = match subject {
            Some(id) => {
                draft.subject(id);
                self.vault.store.credential(id).await?
            }
            None => None,
        };
        let matched = self
            .check(
                stored.clone().unwrap_or_else(|| self.dummy.clone()),
                password,
                true,
            )
            .await?;
        let (ok, upgraded) = match (subject, stored, matched) {
            (Some(id), Some(hash), Some(new_hash)) => {
                let upgraded = new_hash.is_some();
                if let Some(new_hash) = new_hash {
                    // Best effort: the login succeeded whether or not the upgrade is stored.
                    if let Err(e) = self.store_hash(id, new_hash, None).await {
                        tracing::warn!(subject = %id, error = %e, "password rehash not stored");
                    }
                }
                drop(hash);
                (Some(id), upgraded)
            }
            _ => (None, false),
        };
        match ok {
            Some(_) => {
                self.clear(&user_key);
                draft.event.detail = if upgraded {
                    "login=ok rehashed".into()
                } else {
                    "login=ok".into()
                };
            }
            None => {
                self.fail(&keys);
                draft.event.detail = "login=failed".into();
            }
        }
        Ok(ok)
    }

    /// Changes the subject's password after checking the current one (throttled like a login).
    /// Returns whether the current password matched (nothing changes when not).
    pub async fn change(
        &self,
        access: &Access,
        id: Uuid,
        current: Password,
        new: Password,
        client: Option<IpAddr>,
        draft: &mut Draft,
    ) -> Result<bool, DomainError> {
        draft.subject(id);
        check_caller(access)?;
        let user_key = format!("subject:{id}");
        let keys = throttle_keys(user_key.clone(), client);
        self.check_throttle(&keys)?;
        if self.vault.store.subject(id).await?.is_none() {
            return Err(DomainError::NotFound);
        }
        let stored = self.vault.store.credential(id).await?;
        let matched = self
            .check(
                stored.clone().unwrap_or_else(|| self.dummy.clone()),
                current,
                false,
            )
            .await?
            .is_some()
            && stored.is_some();
        if !matched {
            self.fail(&keys);
            draft.event.detail = "password-change=refused".into();
            return Ok(false);
        }
        self.clear(&user_key);
        draft.event.detail = "password-changed".into();
        let hash = self.hash(new).await?;
        self.store_hash(id, hash, Some(draft)).await?;
        Ok(true)
    }

    /// Verifies in the blocking pool. `Some(rehash)` when it matches, with a new hash when the
    /// stored one's parameters are outdated (and `rehash` is asked for).
    async fn check(
        &self,
        stored: String,
        password: Password,
        rehash: bool,
    ) -> Result<Option<Option<String>>, DomainError> {
        let params = self.settings.params;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| DomainError::Unavailable("password checks stopped".into()))?;
        tokio::task::spawn_blocking(move || {
            if !verify_password(&stored, password.0.as_bytes()) {
                return Ok(None);
            }
            if rehash && needs_rehash(&stored, params) {
                return Ok(Some(Some(hash_password(params, password.0.as_bytes())?)));
            }
            Ok(Some(None))
        })
        .await
        .map_err(|e| DomainError::Internal(format!("password check: {e}")))?
    }

    async fn hash(&self, password: Password) -> Result<String, DomainError> {
        let params = self.settings.params;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| DomainError::Unavailable("password checks stopped".into()))?;
        tokio::task::spawn_blocking(move || hash_password(params, password.0.as_bytes()))
            .await
            .map_err(|e| DomainError::Internal(format!("password hash: {e}")))?
            .map_err(DomainError::from)
    }

    async fn store_hash(
        &self,
        id: Uuid,
        hash: String,
        draft: Option<&mut Draft>,
    ) -> Result<(), DomainError> {
        let op = WriteOp::SetCredential {
            id,
            hash: Redacted(hash),
            at: self.vault.clock.now_us(),
        };
        let result = match draft {
            Some(draft) => {
                let r = self
                    .vault
                    .store
                    .write_audited(op, draft.committed_record())
                    .await;
                if r.is_ok() {
                    draft.committed = true;
                }
                r
            }
            None => self.vault.store.write(op).await,
        };
        result.map(|_| ()).map_err(|e| match e {
            StoreError::NotFound => DomainError::NotFound,
            other => other.into(),
        })
    }

    fn check_throttle(&self, keys: &[String]) -> Result<(), DomainError> {
        let now = Instant::now();
        let window = self.settings.window;
        let mut failures = self
            .failures
            .lock()
            .map_err(|_| DomainError::Internal("password throttle state poisoned".into()))?;
        failures.retain(|_, (_, since)| now.duration_since(*since) < window);
        for key in keys {
            if let Some((count, since)) = failures.get(key)
                && *count >= self.settings.max_failures
            {
                let wait = window.saturating_sub(now.duration_since(*since));
                return Err(DomainError::Throttled(format!(
                    "too many failed password attempts for this {}; try again in {} s",
                    if key.starts_with("addr:") {
                        "address"
                    } else {
                        "account"
                    },
                    wait.as_secs().max(1)
                )));
            }
        }
        Ok(())
    }

    fn fail(&self, keys: &[String]) {
        if let Ok(mut failures) = self.failures.lock() {
            let now = Instant::now();
            for key in keys {
                let entry = failures.entry(key.clone()).or_insert((0, now));
                entry.0 += 1;
            }
        }
    }

    fn clear(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }
}

/// Password calls are for the hosting backend under `account`, and for operators.
fn check_caller(access: &Access) -> Result<(), DomainError> {
    match access.caller.role {
        Role::Operator => Ok(()),
        Role::HostingBackend if access.purpose == LOGIN_PURPOSE => Ok(()),
        role => Err(DomainError::PermissionDenied(format!(
            "passwords are handled by the hosting backend under purpose {LOGIN_PURPOSE}, or by \
             operators; not by role {role} under purpose {}",
            access.purpose
        ))),
    }
}

/// The throttling keys of an attempt: the account, and the customer's address when the portal
/// gave it (the gRPC peer is the portal itself, shared by every customer).
fn throttle_keys(account: String, client: Option<IpAddr>) -> Vec<String> {
    let mut keys = vec![account];
    if let Some(ip) = client {
        keys.push(format!("addr:{ip}"));
    }
    keys
}
