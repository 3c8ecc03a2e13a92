//! Cryptography: secret keys, AES-256-GCM envelopes, the keyring, blind indexes and caller tokens.
//!
//! Pure functions over key material; nothing here touches the database or the network.

mod aead;
mod handle;
mod keyring;
mod password;
mod token;

pub use aead::{FieldCipher, Sealed, open, seal};
pub use handle::{new_unsubscribe_handle, unsubscribe_handle_hash};
pub use keyring::{
    KeyCheck, Keyring, RootKey, RootKeys, SealedRootKey, WrappedKey, key_check_value,
};
pub use password::{PasswordParams, hash_password, needs_rehash, verify_password};
pub use token::{CallerToken, TokenError, hash_secret};

use std::fmt;
use zeroize::Zeroizing;

/// What can go wrong in the cryptographic layer. No variant carries key material or plaintext.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// A ciphertext or wrapped key failed authentication: altered, moved, or under another key.
    #[error("ciphertext failed authentication")]
    Authentication,
    /// The operating system's random source failed.
    #[error("the operating system's random source failed")]
    Random,
    /// Key material of the wrong form (length, encoding, file format).
    #[error("malformed key: {0}")]
    MalformedKey(&'static str),
    /// A ciphertext names a key version the keyring does not hold.
    #[error("unknown {kind} key version {version}")]
    UnknownKeyVersion { kind: &'static str, version: u32 },
}

/// A 256-bit secret key, zeroized on drop, printed as `***`.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<[u8; 32]>);

impl SecretKey {
    /// A fresh key from the operating system's random source.
    pub fn random() -> Result<Self, CryptoError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(bytes.as_mut()).map_err(|_| CryptoError::Random)?;
        Ok(Self(bytes))
    }

    /// Takes a key from exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| CryptoError::MalformedKey("a key is 32 bytes"))?;
        Ok(Self(Zeroizing::new(array)))
    }

    pub(crate) fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(***)")
    }
}

/// Fills a fresh array from the operating system's random source.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|_| CryptoError::Random)?;
    Ok(bytes)
}

/// HMAC-SHA256 of `parts`, each prefixed with its length so no two inputs collide.
pub(crate) fn hmac_sha256(key: &SecretKey, parts: &[&[u8]]) -> [u8; 32] {
    use hmac::{KeyInit, Mac};
    // A 32-byte key is always a valid HMAC key; new_from_slice cannot fail here, but a fallback
    // keeps the no-panic rule without an unwrap.
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.expose()) else {
        return [0u8; 32];
    };
    for part in parts {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}
