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

/// Reads a streamed export whole.
async fn export(
    app: &TestApp,
    id: &str,
    format: pb::ExportFormat,
    language: pb::Language,
) -> (String, Vec<u8>) {
    let mut stream = rights(app)
        .export_subject_data(pb::ExportSubjectDataRequest {
            subject_id: id.into(),
            verification: verified(),
            format: format as i32,
            language: language as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let (mut content_type, mut bytes) = (String::new(), Vec::new());
    while let Some(chunk) = stream.message().await.unwrap() {
        if content_type.is_empty() {
            content_type = chunk.content_type;
        }
        bytes.extend(chunk.chunk);
    }
    (content_type, bytes)
}

fn export_schema() -> jsonschema::Validator {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schema/export-v1.schema.json");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

fn schema_errors(validator: &jsonschema::Validator, doc: &serde_json::Value) -> Vec<String> {
    validator
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

async fn explain(app: &TestApp, id: &str, language: pb::Language) -> String {
    rights(app)
        .explain_processing(pb::ExplainProcessingRequest {
            subject_id: id.into(),
            verification: verified(),
            language: language as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .text
}

async fn sweep(app: &TestApp) -> pb::SweepResponse {
    app.retention()
        .sweep(pb::SweepRequest {
            dry_run: false,
            limit: 0,
            at_background_rate: false,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn a_customer_walks_the_privacy_statement_from_explanation_to_erasure_and_the_sweeper_honours_the_receipt()
 {
    let app = spawn_quiet().await;
    let (id, billing, hosting) = customer(&app).await;
    let mut subscription = app.retention_under(&billing, "subscription");
    subscription
        .open_processing(pb::OpenProcessingRequest {
            subject_id: id.clone(),
            purpose: "subscription".into(),
            reference: "SUB-7".into(),
        })
        .await
        .unwrap();
    subscription
        .close_processing(pb::CloseProcessingRequest {
            purpose: "subscription".into(),
            reference: "SUB-7".into(),
            event: "subscription_cancelled".into(),
            at: None,
        })
        .await
        .unwrap();

    // "Inzage": the explanation in both languages, from the policy and the subject's own state.
    let nl = explain(&app, &id, pb::Language::Nl).await;
    for words in [
        "TwenteNET",
        "Afhandelen bestelling",
        "Een abonnement afsluiten",
        "Uw account",
        "wettelijke verplichting",
        "bewaard tot",
        "Autoriteit Persoonsgegevens",
        "2019-08",
    ] {
        assert!(nl.contains(words), "{words:?} missing from:\n{nl}");
    }
    let en = explain(&app, &id, pb::Language::En).await;
    for words in [
        "legal obligation",
        "kept until",
        "complain to the Autoriteit Persoonsgegevens",
    ] {
        assert!(en.contains(words), "{words:?} missing from:\n{en}");
    }
    let subject = app.get(&id).await.unwrap();
    let street = subject.address.as_ref().unwrap().street.clone();
    let email = subject.contact.as_ref().unwrap().email.clone();
    assert!(
        !nl.contains(&street) && !nl.contains(&email),
        "no values in an explanation"
    );

    // The export: complete, and valid against the published schema; the text form too.
    let validator = export_schema();
    let (content_type, bytes) = export(&app, &id, pb::ExportFormat::Json, pb::Language::Nl).await;
    assert_eq!(content_type, "application/json");
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(schema_errors(&validator, &doc), Vec::<String>::new());
    let paths: Vec<&str> = doc["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        paths.contains(&"payment.iban") && paths.contains(&"activity_log"),
        "{paths:?}"
    );
    assert_eq!(doc["processing_records"].as_array().unwrap().len(), 3);
    let mut broken = doc.clone();
    broken["fields"][0]["state"] = "forgotten".into();
    assert!(
        !schema_errors(&validator, &broken).is_empty(),
        "the schema can fail"
    );
    let (content_type, text) = export(&app, &id, pb::ExportFormat::Text, pb::Language::En).await;
    assert_eq!(content_type, "text/plain; charset=utf-8");
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains(&street) && text.contains("Who accessed your data"),
        "{text}"
    );

    // Rectification of the address: validated like any write, then stored.
    let mut rectify = pb::RectifySubjectRequest {
        verification: verified(),
        subject: Some(pb::Subject {
            id: id.clone(),
            address: Some(pb::Address {
                street: "Koningsweg".into(),
                postal_code: "not a postcode".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["address.street".into(), "address.postal_code".into()],
        }),
        expected_version: None,
    };
    let refused = rights(&app)
        .rectify_subject(rectify.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(
        app.get(&id).await.unwrap().address.unwrap().street,
        street,
        "nothing changed"
    );
    rectify
        .subject
        .as_mut()
        .unwrap()
        .address
        .as_mut()
        .unwrap()
        .postal_code = "7672gd".into();
    let done = rights(&app)
        .rectify_subject(rectify)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        done.rectified_paths,
        ["address.street", "address.postal_code"]
    );
    let address = app.get(&id).await.unwrap().address.unwrap();
    assert_eq!(
        (address.street.as_str(), address.postal_code.as_str()),
        ("Koningsweg", "7672 GD")
    );

    // "Reclame": unsubscribing through the link in a mail.
    let mailer = app.token_for("mailer", "marketing-mailer").await;
    let mailing = app.consent_under(&mailer, "marketing");
    let mut listing = mailing
        .clone()
        .list_marketing_audience(pb::ListMarketingAudienceRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut token = None;
    while let Some(page) = listing.message().await.unwrap() {
        for r in page.recipients {
            if r.subject_id == id {
                token = Some(r.unsubscribe_token);
            }
        }
    }
    let token = token.expect("the customer is mailed before unsubscribing");
    mailing
        .clone()
        .redeem_unsubscribe_token(pb::RedeemUnsubscribeTokenRequest { token })
        .await
        .unwrap();
    let mut listing = mailing
        .clone()
        .list_marketing_audience(pb::ListMarketingAudienceRequest {})
        .await
        .unwrap()
        .into_inner();
    while let Some(page) = listing.message().await.unwrap() {
        assert!(
            page.recipients.iter().all(|r| r.subject_id != id),
            "unsubscribed, not mailed"
        );
    }
    let direct = app
        .subjects_under(Some(&mailer), Some("marketing"), None)
        .get_subject(pb::GetSubjectRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(direct.code(), Code::FailedPrecondition);

    // "Verwijderen": the customer leaves. Account paths go; order and subscription paths stay,
    // with the due date of the subscription's seven years.
    let receipt = erase(&app, &id, true).await.unwrap().receipt.unwrap();
    for path in [
        "profile.gender",
        "payment.iban",
        "payment.account_holder",
        "account.username",
        "activity_log",
    ] {
        assert!(
            receipt.erased_paths.contains(&path.to_owned()),
            "{path}: {receipt:?}"
        );
    }
    assert!(!receipt.shredded);
    let due: Vec<i64> = receipt
        .retained
        .iter()
        .map(|k| {
            assert_eq!(k.reason, pb::RetainedReason::LegalRetention as i32, "{k:?}");
            k.due_time.as_ref().unwrap().seconds
        })
        .collect();
    let last_due = *due.iter().max().unwrap();
    assert!(
        receipt
            .retained
            .iter()
            .any(|k| k.path == "contact.phone" && k.purposes == ["subscription"])
    );
    let mut hosting_account = app.subjects_under(Some(&hosting), Some("account"), None);
    let get = pb::GetSubjectRequest {
        id: id.clone(),
        ..Default::default()
    };
    assert_eq!(
        hosting_account
            .get_subject(get.clone())
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let mut billing_sub = app.subjects_under(Some(&billing), Some("subscription"), None);
    assert!(
        billing_sub
            .get_subject(get.clone())
            .await
            .unwrap()
            .into_inner()
            .subject
            .unwrap()
            .billing
            .is_some()
    );

    // The sweeper honours the receipt: nothing goes a day before the due date, everything at it.
    let now_s = receipt.issued_time.as_ref().unwrap().seconds;
    app.clock
        .advance_us((last_due - now_s - 86_400) * 1_000_000);
    let early = sweep(&app).await;
    assert_eq!((early.subjects_purged, early.subjects_shredded), (0, 0));
    assert!(billing_sub.get_subject(get.clone()).await.is_ok());
    app.clock.advance_us(86_400 * 1_000_000 + 1_000_000);
    let due_sweep = sweep(&app).await;
    assert_eq!(due_sweep.subjects_shredded, 1);
    assert_eq!(
        billing_sub
            .get_subject(get.clone())
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(app.get(&id).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn an_authoritys_demand_is_recorded_with_its_legal_basis_and_refused_without_one() {
    let app = spawn_quiet().await;
    let (id, _billing, _hosting) = customer(&app).await;
    let mut demand = disclosures_under(&app, &app.operator_token, "legal-demand");
    let request = pb::RecordDisclosureRequest {
        subject_id: id.clone(),
        recipient: "Politie Oost-Nederland".into(),
        paths: vec!["name.family".into(), "ip_addresses".into()],
        reference: "PV-2026-118".into(),
        ..Default::default()
    };
    let refused = demand.record_disclosure(request.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(format!("{refused:?}").contains("legal_basis"));
    let recorded = demand
        .record_disclosure(pb::RecordDisclosureRequest {
            legal_basis: "Sv art. 126nd".into(),
            ..request
        })
        .await
        .unwrap()
        .into_inner()
        .disclosure
        .unwrap();
    assert_eq!(recorded.purpose, "legal-demand");
    assert_eq!(recorded.paths, ["ip_addresses", "name.family"]);
    let listed = disclosures_under(&app, &app.operator_token, OPERATOR_PURPOSE)
        .list_disclosures(pb::ListDisclosuresRequest {
            subject_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .disclosures;
    assert_eq!(listed.len(), 1, "the refused one left nothing");
    // Billing may not read the register.
    let billing = app.token_for("billing2", "billing").await;
    let denied = disclosures_under(&app, &billing, "order")
        .list_disclosures(pb::ListDisclosuresRequest { subject_id: id })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn rights_calls_leave_no_personal_value_in_the_audit_trail_receipts_or_logs() {
    let app = spawn_quiet().await;
    let (id, billing, _hosting) = customer(&app).await;
    let subject = app.get(&id).await.unwrap();
    let canaries: Vec<String> = vec![
        subject.name.as_ref().unwrap().given.clone(),
        subject.address.as_ref().unwrap().street.clone(),
        subject.contact.as_ref().unwrap().email.clone(),
        subject.payment.as_ref().unwrap().iban.clone(),
        subject.payment.as_ref().unwrap().account_holder.clone(),
        subject.account.as_ref().unwrap().username.clone(),
        "Rectified Street 9".into(),
    ];
    let _ = explain(&app, &id, pb::Language::Nl).await;
    let (_, exported) = export(&app, &id, pb::ExportFormat::Json, pb::Language::Nl).await;
    assert!(
        String::from_utf8_lossy(&exported).contains(&canaries[1]),
        "the export, the subject's own copy, holds the values"
    );
    rights(&app)
        .rectify_subject(pb::RectifySubjectRequest {
            verification: verified(),
            subject: Some(pb::Subject {
                id: id.clone(),
                address: Some(pb::Address {
                    street: canaries[6].clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["address.street".into()],
            }),
            expected_version: None,
        })
        .await
        .unwrap();
    disclosures_under(&app, &billing, "order")
        .record_disclosure(pb::RecordDisclosureRequest {
            subject_id: id.clone(),
            recipient: "bezorgdienst".into(),
            paths: vec!["address.street".into()],
            reference: "INV-9".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut r = rights(&app);
    r.restrict_processing(pb::RestrictProcessingRequest {
        subject_id: id.clone(),
        verification: verified(),
        reason: "CASE-9".into(),
    })
    .await
    .unwrap();
    r.lift_restriction(pb::LiftRestrictionRequest {
        subject_id: id.clone(),
        verification: verified(),
    })
    .await
    .unwrap();
    let erased = erase(&app, &id, true).await.unwrap();

    let stored = app.audit_bodies().await;
    assert!(
        stored.contains("verified-by=support-7"),
        "the verification is recorded"
    );
    let queried = format!("{:?}", app.audit_events(Default::default()).await);
    let logs = crate::helpers::captured_logs();
    assert!(logs.contains(&id), "this server's logs are captured");
    for (what, text) in [
        ("stored audit bodies", &stored),
        ("queried audit events", &queried),
        ("the receipt", &erased.receipt_json),
        ("logs", &logs),
    ] {
        let lower = text.to_lowercase();
        for value in &canaries {
            assert!(
                !lower.contains(&value.to_lowercase()),
                "{what} hold a personal value ({} characters)",
                value.len()
            );
        }
    }
}

#[tokio::test]
async fn an_erasure_that_erases_nothing_says_so_and_answers_for_the_state_it_saw() {
    let app = spawn_quiet().await;
    let hosting = app.token_for("backend", "hosting-backend").await;
    let id = app
        .create(pb::Subject {
            name: Some(pb::Name {
                given: "Els".into(),
                family: "de Vries".into(),
            }),
            ..Default::default()
        })
        .await
        .id;
    app.retention_under(&hosting, "account")
        .open_processing(pb::OpenProcessingRequest {
            subject_id: id.clone(),
            purpose: "account".into(),
            reference: "ACC-77".into(),
        })
        .await
        .unwrap();
    let r = erase(&app, &id, false).await.unwrap().receipt.unwrap();
    assert!(r.erased_paths.is_empty() && !r.shredded);
    assert_eq!(
        retained(&r, pb::RetainedReason::ContractInForce),
        ["name.given", "name.family"]
    );
    let before = app.get(&id).await.unwrap();
    assert_eq!(before.version, 1, "nothing written");
    // The check such an erasure commits with refuses a state that moved on.
    let uuid = id.parse().unwrap();
    let stale = app
        .store
        .write(kluis::store::WriteOp::Expect {
            id: uuid,
            version: 0,
            retention_version: 1,
        })
        .await;
    assert!(
        matches!(stale, Err(kluis::store::StoreError::VersionMismatch { .. })),
        "{stale:?}"
    );
    assert!(
        app.store
            .write(kluis::store::WriteOp::Expect {
                id: uuid,
                version: 1,
                retention_version: 1,
            })
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn every_rights_call_needs_an_operator_and_a_named_verification_and_refusals_change_nothing()
{
    let app = spawn_quiet().await;
    let (id, billing, _hosting) = customer(&app).await;
    let missing = || None;
    let half = || {
        Some(pb::IdentityVerification {
            verified_by: "support-7".into(),
            method: pb::VerificationMethod::Unspecified as i32,
        })
    };
    let named_person = || {
        Some(pb::IdentityVerification {
            verified_by: "Jan Jansen".into(),
            method: pb::VerificationMethod::PortalSession as i32,
        })
    };
    for (what, verification) in [
        ("missing", missing()),
        ("no method", half()),
        ("a name", named_person()),
    ] {
        let mut r = rights(&app);
        let mut codes = Vec::new();
        codes.push(
            r.explain_processing(pb::ExplainProcessingRequest {
                subject_id: id.clone(),
                verification: verification.clone(),
                language: 0,
            })
            .await
            .map(|_| ())
            .unwrap_err(),
        );
        codes.push(
            r.export_subject_data(pb::ExportSubjectDataRequest {
                subject_id: id.clone(),
                verification: verification.clone(),
                format: 0,
                language: 0,
            })
            .await
            .map(|_| ())
            .unwrap_err(),
        );
        codes.push(
            r.request_erasure(pb::RequestErasureRequest {
                subject_id: id.clone(),
                verification: verification.clone(),
                end_contracts: true,
            })
            .await
            .map(|_| ())
            .unwrap_err(),
        );
        codes.push(
            r.restrict_processing(pb::RestrictProcessingRequest {
                subject_id: id.clone(),
                verification: verification.clone(),
                reason: "CASE-1".into(),
            })
            .await
            .map(|_| ())
            .unwrap_err(),
        );
        codes.push(
            r.lift_restriction(pb::LiftRestrictionRequest {
                subject_id: id.clone(),
                verification: verification.clone(),
            })
            .await
            .map(|_| ())
            .unwrap_err(),
        );
        codes.push(
            r.rectify_subject(pb::RectifySubjectRequest {
                verification: verification.clone(),
                subject: Some(pb::Subject {
                    id: id.clone(),
                    name: Some(pb::Name {
                        given: "Other".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["name.given".into()],
                }),
                expected_version: None,
            })
            .await
            .map(|_| ())
            .unwrap_err(),
        );
        for status in codes {
            assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
            assert!(
                format!("{status:?}").contains("verification"),
                "{what}: names the field: {status:?}"
            );
        }
    }
    // Not an operator: PERMISSION_DENIED, even with a verification.
    let billing_rights = RightsServiceClient::with_interceptor(
        app.channel(),
        TestApp::bearer(Some(&billing), Some("order"), None),
    )
    .request_erasure(pb::RequestErasureRequest {
        subject_id: id.clone(),
        verification: verified(),
        end_contracts: true,
    })
    .await
    .unwrap_err();
    assert_eq!(billing_rights.code(), Code::PermissionDenied);
    // Nothing changed: every path and record still there, no restriction, no receipt.
    let after = app.get(&id).await.unwrap();
    assert_eq!(after.version, 1);
    assert!(after.profile.is_some() && after.activity_log.len() == 1);
    assert_eq!(
        app.raw_count("SELECT COUNT(*) FROM erasure_receipts").await,
        0
    );
    assert_eq!(app.raw_count("SELECT COUNT(*) FROM restrictions").await, 0);
}
