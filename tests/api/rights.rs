//! Data-subject rights through the real server: erasure with its legal carve-outs and a signed
//! receipt anyone can verify, EraseSubject refusing what the law keeps, restriction of
//! processing, the disclosure register, and the explanation and export.

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use kluis::api::pb::{
    self, disclosure_service_client::DisclosureServiceClient,
    rights_service_client::RightsServiceClient,
};
use tonic::{Code, codegen::InterceptedService, transport::Channel};

use crate::helpers::{
    Bearer, OPERATOR_PURPOSE, OPERATOR_REASON, TestApp, TestDb, full_subject, spawn_with, tag,
};

type Rights = RightsServiceClient<InterceptedService<Channel, Bearer>>;
type Disclosures = DisclosureServiceClient<InterceptedService<Channel, Bearer>>;

const YEAR_US: i64 = 365 * 86_400 * 1_000_000;

async fn spawn_quiet() -> TestApp {
    spawn_with(TestDb::new().await, |args| args.retention.sweep_seconds = 0).await
}

fn rights(app: &TestApp) -> Rights {
    RightsServiceClient::with_interceptor(
        app.channel(),
        TestApp::bearer(
            Some(&app.operator_token),
            Some(OPERATOR_PURPOSE),
            Some(OPERATOR_REASON),
        ),
    )
}

fn disclosures_under(app: &TestApp, token: &str, purpose: &str) -> Disclosures {
    DisclosureServiceClient::with_interceptor(
        app.channel(),
        TestApp::bearer(Some(token), Some(purpose), Some(OPERATOR_REASON)),
    )
}

fn verified() -> Option<pb::IdentityVerification> {
    Some(pb::IdentityVerification {
        verified_by: "support-7".into(),
        method: pb::VerificationMethod::IdDocument as i32,
    })
}

/// A customer with an open account and an order completed now.
async fn customer(app: &TestApp) -> (String, String, String) {
    let billing = app.token_for("facturatie", "billing").await;
    let hosting = app.token_for("backend", "hosting-backend").await;
    let id = app.create(full_subject(&tag())).await.id;
    app.retention_under(&hosting, "account")
        .open_processing(pb::OpenProcessingRequest {
            subject_id: id.clone(),
            purpose: "account".into(),
            reference: format!("ACC-{}", &id[..8]),
        })
        .await
        .unwrap();
    let mut order = app.retention_under(&billing, "order");
    order
        .open_processing(pb::OpenProcessingRequest {
            subject_id: id.clone(),
            purpose: "order".into(),
            reference: format!("INV-{}", &id[..8]),
        })
        .await
        .unwrap();
    order
        .close_processing(pb::CloseProcessingRequest {
            purpose: "order".into(),
            reference: format!("INV-{}", &id[..8]),
            event: "order_completed".into(),
            at: None,
        })
        .await
        .unwrap();
    (id, billing, hosting)
}

async fn erase(
    app: &TestApp,
    id: &str,
    end_contracts: bool,
) -> Result<pb::RequestErasureResponse, tonic::Status> {
    rights(app)
        .request_erasure(pb::RequestErasureRequest {
            subject_id: id.into(),
            verification: verified(),
            end_contracts,
        })
        .await
        .map(|r| r.into_inner())
}

fn retained(r: &pb::ErasureReceipt, reason: pb::RetainedReason) -> Vec<String> {
    r.retained
        .iter()
        .filter(|k| k.reason == reason as i32)
        .map(|k| k.path.clone())
        .collect()
}

#[tokio::test]
async fn erasure_keeps_what_the_law_or_a_contract_keeps_and_signs_a_receipt_anyone_can_verify() {
    let app = spawn_quiet().await;
    let (id, billing, hosting) = customer(&app).await;

    // The core's EraseSubject refuses: the order's seven years keep its paths.
    let refused = app
        .subjects()
        .erase_subject(pb::EraseSubjectRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("billing.address.city"),
        "{}",
        refused.message()
    );
    assert!(app.get(&id).await.is_ok(), "nothing erased");

    // Without a verification of identity nothing happens.
    let unverified = rights(&app)
        .request_erasure(pb::RequestErasureRequest {
            subject_id: id.clone(),
            verification: None,
            end_contracts: true,
        })
        .await
        .unwrap_err();
    assert_eq!(unverified.code(), Code::InvalidArgument);
    let before = app.get(&id).await.unwrap();
    assert!(before.profile.is_some() && before.payment.is_some());

    // The customer keeps the account: only what nothing keeps goes (the activity log: no
    // portal record), the account's paths stay "contract in force".
    let kept = erase(&app, &id, false).await.unwrap();
    let r = kept.receipt.clone().unwrap();
    assert_eq!(r.erased_paths, ["activity_log"]);
    assert!(!r.shredded);
    let contract = retained(&r, pb::RetainedReason::ContractInForce);
    assert!(
        contract.contains(&"profile.gender".to_owned()),
        "{contract:?}"
    );
    assert!(contract.contains(&"payment.iban".to_owned()));
    assert_eq!(r.verified_by, "support-7");
    assert_eq!(
        r.verification_method,
        pb::VerificationMethod::IdDocument as i32
    );

    // The customer leaves: the account record is closed, its own paths go, the order's stay
    // retention-restricted until completion + 7 years.
    let left = erase(&app, &id, true).await.unwrap();
    let r = left.receipt.clone().unwrap();
    assert_eq!(r.contracts_ended.len(), 1);
    assert!(r.contracts_ended[0].starts_with("account/"));
    for path in [
        "profile.gender",
        "payment.iban",
        "account.username",
        "contact.phone",
    ] {
        assert!(
            r.erased_paths.contains(&path.to_owned()),
            "{path} erased: {r:?}"
        );
    }
    let legal = retained(&r, pb::RetainedReason::LegalRetention);
    assert!(
        legal.contains(&"billing.address.city".to_owned()),
        "{legal:?}"
    );
    assert!(legal.contains(&"contact.email".to_owned()), "{legal:?}");
    for k in r.retained.iter() {
        assert_eq!(k.reason, pb::RetainedReason::LegalRetention as i32, "{k:?}");
        assert_eq!(k.purposes, ["order"]);
        let due = k.due_time.as_ref().unwrap();
        let due_us = due.seconds * 1_000_000;
        let issued = r.issued_time.as_ref().unwrap().seconds * 1_000_000;
        assert!(
            (due_us - issued - 7 * YEAR_US).abs() < 3 * 86_400 * 1_000_000,
            "{k:?}"
        );
    }

    // Anyone can verify it offline with the published key; a tampered copy fails.
    let key = rights(&app)
        .get_receipt_public_key(pb::GetReceiptPublicKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(key.public_key_pem.starts_with("-----BEGIN PUBLIC KEY-----"));
    let vk = VerifyingKey::from_bytes(&key.public_key.clone().try_into().unwrap()).unwrap();
    let sig = Signature::from_slice(&left.signature).unwrap();
    assert!(vk.verify(left.receipt_json.as_bytes(), &sig).is_ok());
    let json: serde_json::Value = serde_json::from_str(&left.receipt_json).unwrap();
    assert_eq!(json["key_id"], key.key_id);
    assert_eq!(json["subject_id"], id);
    let tampered = left
        .receipt_json
        .replace("\"shredded\":false", "\"shredded\":true");
    assert_ne!(tampered, left.receipt_json);
    assert!(vk.verify(tampered.as_bytes(), &sig).is_err());
    let mut check = rights(&app);
    let ok = check
        .verify_erasure_receipt(pb::VerifyErasureReceiptRequest {
            receipt_json: left.receipt_json.clone(),
            signature: left.signature.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.valid, "{}", ok.problem);
    let bad = check
        .verify_erasure_receipt(pb::VerifyErasureReceiptRequest {
            receipt_json: tampered,
            signature: left.signature.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!bad.valid && !bad.problem.is_empty());

    // To the hosting backend the customer is gone; billing still reads the order's paths.
    let gone = app
        .subjects_under(Some(&hosting), Some("account"), None)
        .get_subject(pb::GetSubjectRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let kept = app
        .subjects_under(Some(&billing), Some("order"), None)
        .get_subject(pb::GetSubjectRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .subject
        .unwrap();
    assert!(kept.billing.is_some());
    assert!(kept.payment.is_none() && kept.profile.is_none());
}

#[tokio::test]
async fn a_subject_nothing_keeps_is_shredded_by_an_erasure_request() {
    let app = spawn_quiet().await;
    let id = app.create(full_subject(&tag())).await.id;
    let done = erase(&app, &id, false).await.unwrap();
    let r = done.receipt.unwrap();
    assert!(r.shredded);
    assert!(r.retained.is_empty());
    assert!(r.erased_paths.contains(&"name.given".to_owned()));
    assert_eq!(app.get(&id).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn a_restriction_stops_every_purpose_but_the_subjects_own_request_until_lifted() {
    let app = spawn_quiet().await;
    let (id, _billing, hosting) = customer(&app).await;
    let mut r = rights(&app);
    let placed = r
        .restrict_processing(pb::RestrictProcessingRequest {
            subject_id: id.clone(),
            verification: verified(),
            reason: "CASE-18".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!placed.already_restricted);
    let mut account = app.subjects_under(Some(&hosting), Some("account"), None);
    let refused = account
        .get_subject(pb::GetSubjectRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("restricted"));
    assert!(
        app.get(&id).await.is_ok(),
        "the operator handling the request still reads"
    );
    let again = r
        .restrict_processing(pb::RestrictProcessingRequest {
            subject_id: id.clone(),
            verification: verified(),
            reason: "CASE-18".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_restricted);
    assert_eq!(again.restriction_id, placed.restriction_id);
    let lifted = r
        .lift_restriction(pb::LiftRestrictionRequest {
            subject_id: id.clone(),
            verification: verified(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(lifted.lifted);
    assert!(
        account
            .get_subject(pb::GetSubjectRequest {
                id: id.clone(),
                ..Default::default()
            })
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn disclosures_go_only_to_named_recipients_and_show_in_the_explanation_and_export() {
    let app = spawn_quiet().await;
    let (id, billing, _hosting) = customer(&app).await;
    let mut order = disclosures_under(&app, &billing, "order");
    let unnamed = order
        .record_disclosure(pb::RecordDisclosureRequest {
            subject_id: id.clone(),
            recipient: "Acme Data Brokers".into(),
            paths: vec!["address.street".into()],
            reference: "INV-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unnamed.code(), Code::InvalidArgument);
    assert!(
        unnamed.message().contains("bezorgdienst") || format!("{unnamed:?}").contains("recipient")
    );
    let recorded = order
        .record_disclosure(pb::RecordDisclosureRequest {
            subject_id: id.clone(),
            recipient: "bezorgdienst".into(),
            paths: vec!["address.street".into(), "address.city".into()],
            reference: "INV-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .disclosure
        .unwrap();
    assert_eq!(recorded.legal_basis, "legal-obligation");
    let list = disclosures_under(&app, &app.operator_token, OPERATOR_PURPOSE)
        .list_disclosures(pb::ListDisclosuresRequest {
            subject_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .disclosures;
    assert_eq!(list.len(), 1, "the refused one left nothing");

    let explained = rights(&app)
        .explain_processing(pb::ExplainProcessingRequest {
            subject_id: id.clone(),
            verification: verified(),
            language: pb::Language::Nl as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        explained.text.contains("bezorgdienst"),
        "{}",
        explained.text
    );
    assert!(explained.text.contains("Afhandelen bestelling"));
    assert!(
        !explained.text.contains("Keizersgracht"),
        "no values in the explanation"
    );

    let mut stream = rights(&app)
        .export_subject_data(pb::ExportSubjectDataRequest {
            subject_id: id.clone(),
            verification: verified(),
            format: pb::ExportFormat::Json as i32,
            language: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        bytes.extend(chunk.chunk);
    }
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(doc["format"], "kluis.export.v1");
    assert_eq!(doc["subject"]["id"], id);
    assert_eq!(doc["disclosures"][0]["recipient"], "bezorgdienst");
    let fields = doc["fields"].as_array().unwrap();
    let email = fields
        .iter()
        .find(|f| f["path"] == "contact.email")
        .unwrap();
    assert!(email["value"].as_str().unwrap().contains('@'));
    assert!(!doc["access_history"].as_array().unwrap().is_empty());
}
