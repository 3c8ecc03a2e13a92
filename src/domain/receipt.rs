//! Erasure receipts: what an erasure request erased and what it kept (paths, reasons, due dates;
//! never values), as JSON signed with Ed25519 so anyone holding the published public key can check
//! it offline (`openssl pkeyutl -verify -rawin`), without kluis.

use base64::{Engine, engine::general_purpose::STANDARD};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `format` every receipt carries, so a signed receipt cannot pass for another document.
pub const RECEIPT_FORMAT: &str = "kluis.erasure-receipt.v1";

/// Why a path was kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetainedReason {
    /// An open record of a contract purpose needs it.
    ContractInForce,
    /// An open record of a purpose based on a legal obligation needs it.
    LegalObligation,
    /// A closed record's legal retention keeps it until its due date.
    LegalRetention,
    /// A legal hold suspends its purge.
    LegalHold,
}

/// A path kept, why, for which purposes, and until when (None: open-ended for now).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainedEntry {
    pub path: String,
    pub reason: RetainedReason,
    pub purposes: Vec<String>,
    pub due_at_us: Option<i64>,
}

/// The receipt as signed. Field order is the serialised order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    pub format: String,
    pub receipt_id: String,
    pub subject_id: String,
    pub issued_at_us: i64,
    /// The id of the key that signed it ([`key_id`]).
    pub key_id: String,
    pub operator: String,
    pub verified_by: String,
    pub verification_method: String,
    pub policy_version: String,
    pub contracts_ended: Vec<String>,
    pub erased: Vec<String>,
    pub retained: Vec<RetainedEntry>,
    pub shredded: bool,
}

/// Why a receipt does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("the signature is not 64 bytes")]
    SignatureLength,
    #[error("the signature does not match the receipt and this kluis's receipt key")]
    BadSignature,
    #[error("the signed text is not a kluis erasure receipt: {0}")]
    NotAReceipt(String),
}

/// Signs `receipt` (its exact JSON is what the signature covers).
pub fn sign(receipt: &Receipt, key: &SigningKey) -> Result<(String, [u8; 64]), ReceiptError> {
    let json =
        serde_json::to_string(receipt).map_err(|e| ReceiptError::NotAReceipt(e.to_string()))?;
    let signature = key.sign(json.as_bytes()).to_bytes();
    Ok((json, signature))
}

/// Checks the signature over the exact bytes of `json`, then reads the receipt.
pub fn verify(json: &str, signature: &[u8], key: &VerifyingKey) -> Result<Receipt, ReceiptError> {
    let bytes: [u8; 64] = signature
        .try_into()
        .map_err(|_| ReceiptError::SignatureLength)?;
    key.verify(json.as_bytes(), &Signature::from_bytes(&bytes))
        .map_err(|_| ReceiptError::BadSignature)?;
    let receipt: Receipt =
        serde_json::from_str(json).map_err(|e| ReceiptError::NotAReceipt(e.to_string()))?;
    if receipt.format != RECEIPT_FORMAT {
        return Err(ReceiptError::NotAReceipt(format!(
            "format {} is not {RECEIPT_FORMAT}",
            receipt.format
        )));
    }
    Ok(receipt)
}

/// The first 8 bytes of SHA-256 over the raw public key, hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// The public key as PEM (SubjectPublicKeyInfo, RFC 8410), for OpenSSL.
pub fn public_key_pem(key: &VerifyingKey) -> String {
    // SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING (0 unused bits) key }
    const SPKI_PREFIX: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    let mut der = SPKI_PREFIX.to_vec();
    der.extend_from_slice(key.as_bytes());
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        STANDARD.encode(der)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn receipt() -> Receipt {
        Receipt {
            format: RECEIPT_FORMAT.into(),
            receipt_id: "r-1".into(),
            subject_id: "0190b5a4-0000-7000-8000-000000000001".into(),
            issued_at_us: 1_700_000_000_000_000,
            key_id: key_id(&key().verifying_key()),
            operator: "op-1".into(),
            verified_by: "support-7".into(),
            verification_method: "id-document".into(),
            policy_version: "2019-08.1".into(),
            contracts_ended: vec!["account/A-1".into()],
            erased: vec!["profile.gender".into()],
            retained: vec![RetainedEntry {
                path: "billing.company_name".into(),
                reason: RetainedReason::LegalRetention,
                purposes: vec!["order".into()],
                due_at_us: Some(1_900_000_000_000_000),
            }],
            shredded: false,
        }
    }

    #[test]
    fn a_signed_receipt_verifies_and_reads_back_unchanged() {
        let (json, sig) = sign(&receipt(), &key()).unwrap();
        assert_eq!(
            verify(&json, &sig, &key().verifying_key()).unwrap(),
            receipt()
        );
        assert!(json.contains("\"reason\":\"legal-retention\""));
    }

    #[test]
    fn any_change_to_the_text_or_signature_or_key_fails() {
        let (json, sig) = sign(&receipt(), &key()).unwrap();
        let vk = key().verifying_key();
        let tampered = json.replace("profile.gender", "profile.genden");
        assert_eq!(
            verify(&tampered, &sig, &vk),
            Err(ReceiptError::BadSignature)
        );
        let mut bad = sig;
        bad[0] ^= 1;
        assert_eq!(verify(&json, &bad, &vk), Err(ReceiptError::BadSignature));
        assert_eq!(
            verify(&json, &sig[..63], &vk),
            Err(ReceiptError::SignatureLength)
        );
        let other = SigningKey::from_bytes(&[8u8; 32]).verifying_key();
        assert_eq!(verify(&json, &sig, &other), Err(ReceiptError::BadSignature));
    }

    #[test]
    fn a_signed_document_of_another_format_is_not_a_receipt() {
        let mut r = receipt();
        r.format = "something-else".into();
        let (json, sig) = sign(&r, &key()).unwrap();
        assert!(matches!(
            verify(&json, &sig, &key().verifying_key()),
            Err(ReceiptError::NotAReceipt(_))
        ));
    }

    #[test]
    fn the_pem_is_the_rfc_8410_encoding_of_the_key() {
        let pem = public_key_pem(&key().verifying_key());
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = STANDARD.decode(body).unwrap();
        assert_eq!(der.len(), 44);
        assert_eq!(&der[12..], key().verifying_key().as_bytes());
        assert_eq!(key_id(&key().verifying_key()).len(), 16);
    }
}
