//! Unsubscribe handles: opaque random tokens for the link in a marketing mail. Only their keyed
//! hash is stored, so neither a handle nor a database copy tells anything about the subject.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use super::{CryptoError, SecretKey, hmac_sha256, random_bytes};

/// Random bytes per handle: 192 bits, well above the 128 the design asks for.
const HANDLE_BYTES: usize = 24;
/// Every handle starts with this, so one pasted into the wrong field is recognisable.
const PREFIX: &str = "ku1_";

/// A fresh handle (its text, to hand out) and the keyed hash to store for it.
pub fn new_unsubscribe_handle(key: &SecretKey) -> Result<(String, [u8; 32]), CryptoError> {
    let raw = random_bytes::<HANDLE_BYTES>()?;
    let text = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(raw));
    Ok((text, handle_hash(key, &raw)))
}

/// The stored hash of a handle as given back, or None when it is not a handle's form at all
/// (truncated, padded, another alphabet): such a text cannot have been issued.
pub fn unsubscribe_handle_hash(key: &SecretKey, text: &str) -> Option<[u8; 32]> {
    let body = text.strip_prefix(PREFIX)?;
    let raw = URL_SAFE_NO_PAD.decode(body).ok()?;
    (raw.len() == HANDLE_BYTES).then(|| handle_hash(key, &raw))
}

fn handle_hash(key: &SecretKey, raw: &[u8]) -> [u8; 32] {
    hmac_sha256(key, &[b"kluis.unsubscribe.v1", raw])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_is_url_safe_random_and_hashes_back_to_what_was_stored() {
        let key = SecretKey::random().unwrap();
        let (a, hash_a) = new_unsubscribe_handle(&key).unwrap();
        let (b, _) = new_unsubscribe_handle(&key).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), PREFIX.len() + 32);
        assert!(
            a[PREFIX.len()..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_eq!(unsubscribe_handle_hash(&key, &a), Some(hash_a));
        let other = SecretKey::random().unwrap();
        assert_ne!(unsubscribe_handle_hash(&other, &a), Some(hash_a));
    }

    #[test]
    fn truncated_padded_or_foreign_handles_have_no_hash() {
        let key = SecretKey::random().unwrap();
        let (a, _) = new_unsubscribe_handle(&key).unwrap();
        assert_eq!(unsubscribe_handle_hash(&key, &a[..a.len() - 1]), None);
        assert_eq!(unsubscribe_handle_hash(&key, &format!("{a}=")), None);
        assert_eq!(unsubscribe_handle_hash(&key, &a[PREFIX.len()..]), None);
        assert_eq!(unsubscribe_handle_hash(&key, ""), None);
        assert_eq!(unsubscribe_handle_hash(&key, &format!("{a}AAAA")), None);
    }
}
