//! Caller tokens `kluis_<id>_<secret>`: 64-bit id, 256-bit secret, stored as SHA-256 only.

use std::fmt;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{CryptoError, random_bytes};

const PREFIX: &str = "kluis_";

/// Why a presented token could not even be parsed. Never carries the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is not of the form kluis_<id>_<secret>")]
    Malformed,
}

/// A parsed caller token; the secret is zeroized on drop and never printed.
pub struct CallerToken {
    pub id: String,
    secret: Zeroizing<[u8; 32]>,
}

impl CallerToken {
    /// A new token with a random id and secret.
    pub fn generate() -> Result<Self, CryptoError> {
        Ok(Self {
            id: hex::encode(random_bytes::<8>()?),
            secret: Zeroizing::new(random_bytes::<32>()?),
        })
    }

    /// Parses `kluis_<16 hex>_<64 hex>`.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let rest = text.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let (id, secret_hex) = rest.split_once('_').ok_or(TokenError::Malformed)?;
        let id_ok = id.len() == 16
            && id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if !id_ok || secret_hex.len() != 64 {
            return Err(TokenError::Malformed);
        }
        let mut secret = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(secret_hex, secret.as_mut()).map_err(|_| TokenError::Malformed)?;
        Ok(Self {
            id: id.to_owned(),
            secret,
        })
    }

    /// The SHA-256 of the secret: what the database keeps.
    pub fn secret_hash(&self) -> [u8; 32] {
        hash_secret(self.secret.as_ref())
    }

    /// The token text, to show once to whoever created it.
    pub fn reveal(&self) -> Zeroizing<String> {
        let secret = Zeroizing::new(hex::encode(self.secret.as_ref()));
        Zeroizing::new(format!("{PREFIX}{}_{}", self.id, secret.as_str()))
    }
}

impl fmt::Debug for CallerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CallerToken({}, ***)", self.id)
    }
}

/// SHA-256 of a high-entropy secret (a slow hash adds nothing at 256 bits of entropy).
pub fn hash_secret(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn generated_token_parses_back_to_the_same_hash() {
        let token = CallerToken::generate().unwrap();
        let parsed = CallerToken::parse(&token.reveal()).unwrap();
        assert_eq!(parsed.id, token.id);
        assert_eq!(parsed.secret_hash(), token.secret_hash());
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = CallerToken::generate().unwrap().reveal().to_string();
        let cases = [
            String::new(),
            "kluis_".into(),
            good.replacen("kluis_", "vault_", 1),
            good[..good.len() - 1].to_string(),
            format!("{good}0"),
            good.to_uppercase(),
            good.replace('_', "-"),
        ];
        for case in cases {
            assert!(CallerToken::parse(&case).is_err());
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let token = CallerToken::generate().unwrap();
        let secret_hex = token.reveal().rsplit('_').next().unwrap().to_string();
        assert!(!format!("{token:?}").contains(&secret_hex));
    }
}
