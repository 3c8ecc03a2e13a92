//! Customers' portal passwords: Argon2id hashes as PHC strings (`$argon2id$v=19$m=…,t=…,p=…$…`),
//! so every stored hash carries its own parameters and can be upgraded when they rise. CPU- and
//! memory-hard on purpose: callers run these in `spawn_blocking`.

use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash},
};

use super::{CryptoError, random_bytes};

/// Argon2id cost parameters. The default is the OWASP recommendation (19 MiB, 2 passes, 1 lane).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordParams {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

impl Default for PasswordParams {
    fn default() -> Self {
        Self {
            m_kib: Params::DEFAULT_M_COST,
            t: Params::DEFAULT_T_COST,
            p: Params::DEFAULT_P_COST,
        }
    }
}

impl PasswordParams {
    fn argon2(self) -> Result<Argon2<'static>, CryptoError> {
        let params = Params::new(self.m_kib, self.t, self.p, None)
            .map_err(|_| CryptoError::MalformedKey("argon2 parameters"))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }

    /// Whether these are at least OWASP's minimum for Argon2id (19 MiB with 2 passes, or more
    /// memory with fewer passes as its table allows: m·t ≥ 38 MiB·pass, t ≥ 1, m ≥ 7 MiB).
    pub fn meets_owasp(self) -> bool {
        self.m_kib >= 7 * 1024 && u64::from(self.m_kib) * u64::from(self.t) >= 38 * 1024
    }
}

/// Derives `out.len()` key bytes from a passphrase and salt with Argon2id under `params` (the
/// passphrase that seals the root key).
pub(crate) fn derive_key(
    params: PasswordParams,
    passphrase: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), CryptoError> {
    params
        .argon2()?
        .hash_password_into(passphrase, salt, out)
        .map_err(|_| CryptoError::MalformedKey("argon2 key derivation"))
}

/// The PHC string of `password` under `params` with a fresh random salt.
pub fn hash_password(params: PasswordParams, password: &[u8]) -> Result<String, CryptoError> {
    let salt = random_bytes::<16>()?;
    let hash: PasswordHash = params
        .argon2()?
        .hash_password_with_salt(password, &salt)
        .map_err(|_| CryptoError::MalformedKey("argon2 hashing"))?;
    Ok(hash.to_string())
}

/// Whether `password` matches the stored PHC string (under the parameters it names). A stored
/// string that does not parse never matches.
pub fn verify_password(stored: &str, password: &[u8]) -> bool {
    let Ok(parsed) = PasswordHash::new(stored) else {
        return false;
    };
    Argon2::default().verify_password(password, &parsed).is_ok()
}

/// Whether a stored hash was made with other parameters than `params` (it is rehashed on the
/// next successful verification).
pub fn needs_rehash(stored: &str, params: PasswordParams) -> bool {
    let Ok(parsed) = PasswordHash::new(stored) else {
        return true;
    };
    match Params::try_from(&parsed) {
        Ok(p) => {
            parsed.algorithm.as_str() != "argon2id"
                || (p.m_cost(), p.t_cost(), p.p_cost()) != (params.m_kib, params.t, params.p)
        }
        Err(_) => true,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Cheap parameters: the tests check behaviour, not cost.
    const CHEAP: PasswordParams = PasswordParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };

    #[test]
    fn a_hash_verifies_its_password_only_and_names_its_parameters() {
        let h = hash_password(CHEAP, b"correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{h}");
        assert!(verify_password(&h, b"correct horse battery"));
        assert!(!verify_password(&h, b"correct horse batterx"));
        assert!(!verify_password("not a hash", b"correct horse battery"));
        assert_ne!(h, hash_password(CHEAP, b"correct horse battery").unwrap());
    }

    #[test]
    fn a_hash_made_with_other_parameters_needs_a_rehash() {
        let h = hash_password(CHEAP, b"pw-pw-pw-pw-pw").unwrap();
        assert!(!needs_rehash(&h, CHEAP));
        assert!(needs_rehash(&h, PasswordParams { t: 2, ..CHEAP }));
        assert!(needs_rehash("garbage", CHEAP));
    }

    #[test]
    fn the_default_is_owasps_recommendation() {
        assert!(PasswordParams::default().meets_owasp());
        assert_eq!(PasswordParams::default().m_kib, 19 * 1024);
        assert!(!CHEAP.meets_owasp());
    }
}
