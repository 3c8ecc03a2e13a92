//! AES-256-GCM sealing with fresh 96-bit nonces, and the per-subject field cipher.

use aes_gcm::{
    Aes256Gcm, KeyInit,
    aead::{Aead, AeadInOut, Payload},
};
use uuid::Uuid;
use zeroize::{Zeroize, Zeroizing};

use super::{CryptoError, SecretKey, random_bytes};

/// A nonce and the ciphertext (with its 16-byte tag) it was sealed under.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub nonce: [u8; 12],
    pub ciphertext: Vec<u8>,
}

impl Sealed {
    /// `nonce ‖ ciphertext`, the form wrapped keys are stored in.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.ciphertext.len());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Splits `nonce ‖ ciphertext`; too short reads as an authentication failure.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() < 12 + 16 {
            return Err(CryptoError::Authentication);
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| CryptoError::Authentication)?;
        Ok(Self {
            nonce,
            ciphertext: ciphertext.to_vec(),
        })
    }
}

fn cipher(key: &SecretKey) -> Result<Aes256Gcm, CryptoError> {
    Aes256Gcm::new_from_slice(key.expose()).map_err(|_| CryptoError::MalformedKey("AES-256 key"))
}

fn seal_with(cipher: &Aes256Gcm, aad: &[u8], plaintext: &[u8]) -> Result<Sealed, CryptoError> {
    let nonce = random_bytes::<12>()?;
    let ciphertext = cipher
        .encrypt(
            &nonce.into(),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Authentication)?;
    Ok(Sealed { nonce, ciphertext })
}

fn open_with(
    cipher: &Aes256Gcm,
    aad: &[u8],
    nonce: &[u8; 12],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    cipher
        .decrypt(
            &(*nonce).into(),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Authentication)
}

/// Seals `plaintext` under `key` with a fresh random nonce, binding `aad`.
pub fn seal(key: &SecretKey, aad: &[u8], plaintext: &[u8]) -> Result<Sealed, CryptoError> {
    seal_with(&cipher(key)?, aad, plaintext)
}

/// Opens what [`seal`] made; any change to key, aad, nonce or ciphertext is `Authentication`.
pub fn open(
    key: &SecretKey,
    aad: &[u8],
    sealed: &Sealed,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    open_with(&cipher(key)?, aad, &sealed.nonce, &sealed.ciphertext)
}

/// The longest associated data [`FieldCipher::open_into`] builds on the stack (paths are short).
const STACK_AAD: usize = 128;

/// Seals and opens the field leaves of one subject under its data key (DEK).
///
/// Associated data is `subject id ‖ field path ‖ DEK id`, so a ciphertext copied to another
/// subject, another path, or left over from another DEK fails to open. The KEK version is not part
/// of it: re-wrapping a DEK leaves every field ciphertext valid.
pub struct FieldCipher {
    cipher: Aes256Gcm,
    subject: Uuid,
    dek_id: Uuid,
}

impl FieldCipher {
    pub fn new(dek: &SecretKey, subject: Uuid, dek_id: Uuid) -> Result<Self, CryptoError> {
        Ok(Self {
            cipher: cipher(dek)?,
            subject,
            dek_id,
        })
    }

    fn aad(&self, path: &str) -> Vec<u8> {
        let mut aad = Vec::with_capacity(16 + path.len() + 1 + 16);
        aad.extend_from_slice(self.subject.as_bytes());
        aad.extend_from_slice(path.as_bytes());
        // Paths never contain NUL, so the separator keeps `path ‖ dek id` unambiguous.
        aad.push(0);
        aad.extend_from_slice(self.dek_id.as_bytes());
        aad
    }

    pub fn seal(&self, path: &str, plaintext: &[u8]) -> Result<Sealed, CryptoError> {
        seal_with(&self.cipher, &self.aad(path), plaintext)
    }

    pub fn open(
        &self,
        path: &str,
        nonce: &[u8; 12],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        open_with(&self.cipher, &self.aad(path), nonce, ciphertext)
    }

    /// Like [`FieldCipher::open`], into `plain` (replacing what it held) instead of a new buffer,
    /// and with the associated data on the stack: a record's leaves open one after another
    /// without an allocation each. On failure `plain` holds nothing of the ciphertext's plaintext.
    pub fn open_into(
        &self,
        path: &str,
        nonce: &[u8; 12],
        ciphertext: &[u8],
        plain: &mut Zeroizing<Vec<u8>>,
    ) -> Result<(), CryptoError> {
        plain.clear();
        plain.extend_from_slice(ciphertext);
        let len = 16 + path.len() + 1 + 16;
        let result = if len <= STACK_AAD {
            let mut aad = [0u8; STACK_AAD];
            aad[..16].copy_from_slice(self.subject.as_bytes());
            aad[16..16 + path.len()].copy_from_slice(path.as_bytes());
            // aad[16 + path.len()] stays 0: the separator of `aad()`.
            aad[len - 16..len].copy_from_slice(self.dek_id.as_bytes());
            self.cipher
                .decrypt_in_place(&(*nonce).into(), &aad[..len], &mut **plain)
        } else {
            self.cipher
                .decrypt_in_place(&(*nonce).into(), &self.aad(path), &mut **plain)
        };
        result.map_err(|_| {
            plain.zeroize();
            CryptoError::Authentication
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn field_ciphertext_opens_only_at_its_own_subject_path_and_dek() {
        let dek = SecretKey::random().unwrap();
        let (s1, s2, d1, d2) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let fc = FieldCipher::new(&dek, s1, d1).unwrap();
        let sealed = fc.seal("contact.email", b"a@b.nl").unwrap();
        assert_eq!(
            &fc.open("contact.email", &sealed.nonce, &sealed.ciphertext)
                .unwrap()[..],
            b"a@b.nl"
        );
        assert!(
            fc.open("contact.phone", &sealed.nonce, &sealed.ciphertext)
                .is_err()
        );
        let other_subject = FieldCipher::new(&dek, s2, d1).unwrap();
        assert!(
            other_subject
                .open("contact.email", &sealed.nonce, &sealed.ciphertext)
                .is_err()
        );
        let other_dek_id = FieldCipher::new(&dek, s1, d2).unwrap();
        assert!(
            other_dek_id
                .open("contact.email", &sealed.nonce, &sealed.ciphertext)
                .is_err()
        );
    }

    #[test]
    fn opening_into_a_reused_buffer_gives_what_open_gives() {
        let dek = SecretKey::random().unwrap();
        let fc = FieldCipher::new(&dek, Uuid::new_v4(), Uuid::new_v4()).unwrap();
        // The last path is too long for the stack: its associated data is built on the heap.
        let long = "x".repeat(STACK_AAD);
        let mut plain = Zeroizing::new(b"left over from an earlier leaf".to_vec());
        for (path, value) in [
            ("contact.email", &b"a@b.nl"[..]),
            ("name.given", b""),
            (&long, b"v"),
        ] {
            let sealed = fc.seal(path, value).unwrap();
            fc.open_into(path, &sealed.nonce, &sealed.ciphertext, &mut plain)
                .unwrap();
            assert_eq!(&plain[..], value);
            assert_eq!(
                plain[..],
                fc.open(path, &sealed.nonce, &sealed.ciphertext).unwrap()[..]
            );
            // At another path it fails and leaves nothing behind.
            assert_eq!(
                fc.open_into(
                    "contact.phone",
                    &sealed.nonce,
                    &sealed.ciphertext,
                    &mut plain
                ),
                Err(CryptoError::Authentication)
            );
            assert!(plain.is_empty());
        }
    }

    #[test]
    fn a_flipped_bit_fails_authentication() {
        let key = SecretKey::random().unwrap();
        let mut sealed = seal(&key, b"aad", b"secret").unwrap();
        sealed.ciphertext[0] ^= 1;
        assert_eq!(
            open(&key, b"aad", &sealed),
            Err(CryptoError::Authentication)
        );
    }

    #[test]
    fn two_seals_of_one_value_differ() {
        let key = SecretKey::random().unwrap();
        let a = seal(&key, b"", b"same").unwrap();
        let b = seal(&key, b"", b"same").unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }
}
