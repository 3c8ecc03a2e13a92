//! Bad input at the edge: each case answered with the status of DESIGN.md §6, a BadRequest field
//! violation naming the field path, and nothing written.

use kluis::api::pb;
use prost_types::{FieldMask, Timestamp};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{Subjects, full_subject, spawn_kluis, tag};

fn create(subject: pb::Subject) -> Call {
    Call::Create(pb::CreateSubjectRequest {
        subject: Some(subject),
        source: String::new(),
    })
}

fn with(f: impl FnOnce(&mut pb::Subject)) -> pb::Subject {
    let mut s = full_subject(&tag());
    f(&mut s);
    s
}

enum Call {
    Create(pb::CreateSubjectRequest),
    Get(pb::GetSubjectRequest),
    Update(pb::UpdateSubjectRequest),
    Find(pb::FindSubjectsRequest),
    Batch(pb::BatchGetSubjectsRequest),
}

async fn run(client: &mut Subjects, call: Call) -> Result<(), tonic::Status> {
    match call {
        Call::Create(r) => client.create_subject(r).await.map(|_| ()),
        Call::Get(r) => client.get_subject(r).await.map(|_| ()),
        Call::Update(r) => client.update_subject(r).await.map(|_| ()),
        Call::Find(r) => client.find_subjects(r).await.map(|_| ()),
        Call::Batch(r) => client.batch_get_subjects(r).await.map(|_| ()),
    }
}

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_with_the_field_named_and_nothing_written() {
    let app = spawn_kluis().await;
    let existing = app.create(full_subject(&tag())).await;
    let id = existing.id.clone();
    let update = |subject: pb::Subject, paths: &[&str]| {
        Call::Update(pb::UpdateSubjectRequest {
            subject: Some(pb::Subject {
                id: id.clone(),
                ..subject
            }),
            update_mask: mask(paths),
            expected_version: None,
            source: String::new(),
        })
    };
    let get = |id: &str, paths: &[&str]| {
        Call::Get(pb::GetSubjectRequest {
            id: id.into(),
            read_mask: mask(paths),
            view: 0,
        })
    };
    let ts_bad_nanos = Timestamp {
        seconds: 1,
        nanos: 1_000_000_000,
    };
    let invalid = Code::InvalidArgument;

    let cases: Vec<(&str, Call, Code, Option<&str>)> = vec![
        (
            "malformed e-mail",
            create(with(|s| {
                s.contact.as_mut().unwrap().email = "jan.example.nl".into()
            })),
            invalid,
            Some("contact.email"),
        ),
        (
            "e-mail with two @",
            create(with(|s| {
                s.contact.as_mut().unwrap().email = "a@b@example.nl".into()
            })),
            invalid,
            Some("contact.email"),
        ),
        (
            "over-long e-mail",
            create(with(|s| {
                s.contact.as_mut().unwrap().email = format!("{}@example.nl", "a".repeat(300))
            })),
            invalid,
            Some("contact.email"),
        ),
        (
            "phone not E.164",
            create(with(|s| {
                s.contact.as_mut().unwrap().phone = "0612345678".into()
            })),
            invalid,
            Some("contact.phone"),
        ),
        (
            "IBAN checksum",
            create(with(|s| {
                s.payment.as_mut().unwrap().iban = "NL91ABNA0417164301".into()
            })),
            invalid,
            Some("payment.iban"),
        ),
        (
            "IBAN length for NL",
            create(with(|s| {
                s.payment.as_mut().unwrap().iban = "NL91ABNA04171643".into()
            })),
            invalid,
            Some("payment.iban"),
        ),
        (
            "1 MB name",
            create(with(|s| {
                s.name.as_mut().unwrap().given = "x".repeat(1_000_000)
            })),
            invalid,
            Some("name.given"),
        ),
        (
            "control character in a name",
            create(with(|s| {
                s.name.as_mut().unwrap().family = "Jan\u{7}".into()
            })),
            invalid,
            Some("name.family"),
        ),
        (
            "unknown gender",
            create(with(|s| s.profile.as_mut().unwrap().gender = 99)),
            invalid,
            Some("profile.gender"),
        ),
        (
            "unknown payment method",
            create(with(|s| s.payment.as_mut().unwrap().method = 42)),
            invalid,
            Some("payment.method"),
        ),
        (
            "country not ISO 3166",
            create(with(|s| {
                s.address.as_mut().unwrap().country = "Nederland".into()
            })),
            invalid,
            Some("address.country"),
        ),
        (
            "Dutch postcode of the wrong form",
            create(with(|s| {
                s.address.as_mut().unwrap().postal_code = "12345".into()
            })),
            invalid,
            Some("address.postal_code"),
        ),
        (
            "Dutch billing postcode starting with 0",
            create(with(|s| {
                s.billing
                    .as_mut()
                    .unwrap()
                    .address
                    .as_mut()
                    .unwrap()
                    .postal_code = "0123 AB".into()
            })),
            invalid,
            Some("billing.address.postal_code"),
        ),
        (
            "VAT number of the wrong form",
            create(with(|s| {
                s.billing.as_mut().unwrap().vat_number = "123".into()
            })),
            invalid,
            Some("billing.vat_number"),
        ),
        (
            "invalid IP address",
            create(with(|s| s.ip_addresses[0].address = "300.1.1.1".into())),
            invalid,
            Some("ip_addresses[0].address"),
        ),
        (
            "invalid timestamp",
            create(with(|s| s.ip_addresses[1].first_seen = Some(ts_bad_nanos))),
            invalid,
            Some("ip_addresses[1].first_seen"),
        ),
        (
            "invalid activity IP",
            create(with(|s| s.activity_log[0].ip_address = "::g".into())),
            invalid,
            Some("activity_log[0].ip_address"),
        ),
        (
            "too many IP addresses",
            create(with(|s| {
                s.ip_addresses = vec![s.ip_addresses[0].clone(); 1001]
            })),
            invalid,
            Some("ip_addresses"),
        ),
        (
            "username too short",
            create(with(|s| s.account.as_mut().unwrap().username = "ab".into())),
            invalid,
            Some("account.username"),
        ),
        (
            "over-long source",
            Call::Create(pb::CreateSubjectRequest {
                subject: Some(full_subject(&tag())),
                source: "s".repeat(65),
            }),
            invalid,
            Some("source"),
        ),
        ("invalid UUID", get("not-a-uuid", &[]), invalid, Some("id")),
        ("empty id", get("", &[]), invalid, Some("id")),
        (
            "unknown mask path",
            get(&existing.id, &["name.given", "password"]),
            invalid,
            Some("read_mask.paths[1]"),
        ),
        (
            "empty mask path",
            get(&existing.id, &[""]),
            invalid,
            Some("read_mask.paths[0]"),
        ),
        (
            "update without mask",
            update(full_subject(&tag()), &[]),
            invalid,
            Some("update_mask"),
        ),
        (
            "update with unknown mask path",
            update(full_subject(&tag()), &["name.middle"]),
            invalid,
            Some("update_mask.paths[0]"),
        ),
        (
            "update of a malformed value",
            update(
                with(|s| s.contact.as_mut().unwrap().email = "x".into()),
                &["contact"],
            ),
            invalid,
            Some("contact.email"),
        ),
        (
            "update of an invalid subject id",
            Call::Update(pb::UpdateSubjectRequest {
                subject: Some(pb::Subject {
                    id: "123".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["name"]),
                expected_version: None,
                source: String::new(),
            }),
            invalid,
            Some("subject.id"),
        ),
        (
            "find by malformed e-mail",
            Call::Find(pb::FindSubjectsRequest {
                key: Some(pb::find_subjects_request::Key::Email("nope".into())),
            }),
            invalid,
            Some("contact.email"),
        ),
        (
            "batch with an invalid id",
            Call::Batch(pb::BatchGetSubjectsRequest {
                ids: vec![existing.id.clone(), "zzz".into()],
                read_mask: None,
                view: 0,
            }),
            invalid,
            Some("ids[1]"),
        ),
        (
            "unknown subject",
            get(&uuid::Uuid::new_v4().to_string(), &[]),
            Code::NotFound,
            None,
        ),
    ];
    assert!(cases.len() >= 20);

    let raw = app.db.raw().await;
    let subjects_before = raw.count_all("SELECT COUNT(*) FROM subjects").await;
    let mut client = app.subjects();
    for (what, call, code, field) in cases {
        let err = run(&mut client, call).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        if let Some(field) = field {
            let details = err.get_error_details();
            let violations = details
                .bad_request()
                .map(|b| b.field_violations.clone())
                .unwrap_or_default();
            assert!(
                violations.iter().any(|v| v.field == field),
                "{what}: expected a violation for {field}, got {:?}",
                violations.iter().map(|v| &v.field).collect::<Vec<_>>()
            );
            assert!(violations.iter().all(|v| !v.description.is_empty()));
        }
    }
    assert_eq!(
        raw.count_all("SELECT COUNT(*) FROM subjects").await,
        subjects_before,
        "nothing created"
    );
    let after = app.get(&existing.id).await.unwrap();
    assert_eq!(after.version, 1, "nothing updated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_country_change_that_voids_the_stored_postcode_is_refused() {
    let app = spawn_kluis().await;
    let created = app
        .create(with(|s| {
            let a = s.address.as_mut().unwrap();
            a.country = "BE".into();
            a.postal_code = "1000".into();
        }))
        .await;
    let err = app
        .subjects()
        .update_subject(pb::UpdateSubjectRequest {
            subject: Some(pb::Subject {
                id: created.id.clone(),
                address: Some(pb::Address {
                    country: "NL".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: mask(&["address.country"]),
            expected_version: None,
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let fields: Vec<String> = err
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    assert_eq!(fields, vec!["address.postal_code".to_string()]);
    assert_eq!(app.get(&created.id).await.unwrap().version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_bad_fields_are_reported_together() {
    let app = spawn_kluis().await;
    let err = app
        .subjects()
        .create_subject(pb::CreateSubjectRequest {
            subject: Some(with(|s| {
                s.contact.as_mut().unwrap().email = "x".into();
                s.payment.as_mut().unwrap().iban = "NL00".into();
                s.address.as_mut().unwrap().postal_code = "12".into();
            })),
            source: String::new(),
        })
        .await
        .unwrap_err();
    let mut fields: Vec<String> = err
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    fields.sort();
    assert_eq!(
        fields,
        vec![
            "address.postal_code".to_string(),
            "contact.email".to_string(),
            "payment.iban".to_string()
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_size_limit_is_refused_by_the_transport() {
    let app = spawn_kluis().await;
    let err = app
        .subjects()
        .create_subject(pb::CreateSubjectRequest {
            subject: Some(with(|s| {
                s.name.as_mut().unwrap().given = "x".repeat(5 * 1024 * 1024)
            })),
            source: String::new(),
        })
        .await
        .unwrap_err();
    // tonic answers an over-limit message with OUT_OF_RANGE (documented in the README).
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    let raw = app.db.raw().await;
    assert_eq!(raw.count_all("SELECT COUNT(*) FROM subjects").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_value_is_no_value() {
    let app = spawn_kluis().await;
    let created = app
        .create(with(|s| s.name.as_mut().unwrap().given = "   ".into()))
        .await;
    let got = app.get(&created.id).await.unwrap();
    assert_eq!(got.name.unwrap().given, "");
    assert!(!got.field_metadata.iter().any(|m| m.path == "name.given"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_country_change_to_nl_rewrites_the_stored_postcode_in_dutch_form() {
    let app = spawn_kluis().await;
    let created = app
        .create(with(|s| {
            let a = s.address.as_mut().unwrap();
            a.country = "DE".into();
            a.postal_code = "7672gd".into();
        }))
        .await;
    assert_eq!(
        created.address.as_ref().unwrap().postal_code,
        "7672gd",
        "kept as given outside NL"
    );
    app.subjects()
        .update_subject(pb::UpdateSubjectRequest {
            subject: Some(pb::Subject {
                id: created.id.clone(),
                address: Some(pb::Address {
                    country: "NL".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: mask(&["address.country"]),
            expected_version: None,
            source: String::new(),
        })
        .await
        .unwrap();
    let got = app.get(&created.id).await.unwrap();
    assert_eq!(got.address.unwrap().postal_code, "7672 GD");
}
