//! SubjectService behaviour: round trips, update semantics, lookups, batches, erasure.

use kluis::api::pb;
use prost_types::FieldMask;
use tonic::Code;

use crate::helpers::{full_subject, spawn_kluis, tag};

fn data_only(mut s: pb::Subject) -> pb::Subject {
    s.id.clear();
    s.version = 0;
    s.create_time = None;
    s.update_time = None;
    s.field_metadata.clear();
    s
}

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_path_round_trips() {
    let app = spawn_kluis().await;
    let input = full_subject(&tag());
    let created = app.create(input.clone()).await;
    assert_eq!(created.version, 1);
    let fetched = app.get(&created.id).await.unwrap();
    assert!(
        data_only(fetched.clone()) == data_only(input.clone()),
        "stored subject differs from the one sent"
    );
    let paths: Vec<&str> = fetched
        .field_metadata
        .iter()
        .map(|m| m.path.as_str())
        .collect();
    assert_eq!(paths.len(), 26, "every leaf has metadata: {paths:?}");
    assert!(
        fetched
            .field_metadata
            .iter()
            .all(|m| m.source == "operator" && m.update_time.is_some())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_mask_returns_only_the_paths_asked_for() {
    let app = spawn_kluis().await;
    let created = app.create(full_subject(&tag())).await;
    let got = app
        .subjects()
        .get_subject(pb::GetSubjectRequest {
            id: created.id.clone(),
            read_mask: mask(&["name.given", "billing.address"]),
            view: pb::SubjectView::Full as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .subject
        .unwrap();
    let paths: Vec<&str> = got.field_metadata.iter().map(|m| m.path.as_str()).collect();
    assert_eq!(paths.len(), 7, "{paths:?}");
    assert!(got.name.as_ref().unwrap().family.is_empty());
    assert!(!got.name.as_ref().unwrap().given.is_empty());
    assert!(got.contact.is_none() && got.payment.is_none() && got.ip_addresses.is_empty());
    assert_eq!(got.billing.unwrap().address.unwrap().city, "Vriezenveen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_basic_view_returns_values_without_field_metadata() {
    let app = spawn_kluis().await;
    let created = app.create(full_subject(&tag())).await;
    assert_eq!(
        created.field_metadata.len(),
        26,
        "a create answers with the full view"
    );
    let read = |view: i32| {
        let mut client = app.subjects();
        let id = created.id.clone();
        async move {
            client
                .get_subject(pb::GetSubjectRequest {
                    id,
                    read_mask: None,
                    view,
                })
                .await
        }
    };
    let basic = read(pb::SubjectView::Unspecified as i32)
        .await
        .unwrap()
        .into_inner()
        .subject
        .unwrap();
    assert!(basic.field_metadata.is_empty());
    assert!(data_only(basic) == data_only(app.get(&created.id).await.unwrap()));
    let err = read(7).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_sets_masked_paths_clears_empty_ones_and_leaves_the_rest() {
    let app = spawn_kluis().await;
    let t = tag();
    let created = app.create(full_subject(&t)).await;
    let mut change = pb::Subject {
        id: created.id.clone(),
        name: Some(pb::Name {
            given: "Nieuw".into(),
            family: "IGNORED: outside the mask".into(),
        }),
        ip_addresses: vec![pb::IpAddressRecord {
            address: "198.51.100.7".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    // contact.phone is in the mask but empty: cleared.
    change.contact = Some(pb::Contact::default());
    let updated = app
        .subjects()
        .update_subject(pb::UpdateSubjectRequest {
            subject: Some(change),
            update_mask: mask(&["name.given", "contact.phone", "ip_addresses"]),
            expected_version: Some(1),
            source: "customer".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .subject
        .unwrap();
    assert_eq!(updated.version, 2);
    let got = app.get(&created.id).await.unwrap();
    assert_eq!(got.version, 2);
    let name = got.name.clone().unwrap();
    assert_eq!(name.given, "Nieuw");
    assert_eq!(
        name.family,
        format!("Family{t}"),
        "outside the mask: untouched"
    );
    let contact = got.contact.clone().unwrap();
    assert_eq!(contact.phone, "", "empty value in the mask clears the path");
    assert_eq!(contact.email, format!("Klant.{t}@Example.nl"));
    assert_eq!(
        got.ip_addresses.len(),
        1,
        "a repeated field is replaced whole"
    );
    assert_eq!(got.ip_addresses[0].address, "198.51.100.7");
    let source_of = |p: &str| {
        got.field_metadata
            .iter()
            .find(|m| m.path == p)
            .map(|m| m.source.clone())
    };
    assert_eq!(source_of("name.given").as_deref(), Some("customer"));
    assert_eq!(source_of("name.family").as_deref(), Some("operator"));
    assert_eq!(source_of("contact.phone"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_with_a_stale_version_is_aborted_and_changes_nothing() {
    let app = spawn_kluis().await;
    let created = app.create(full_subject(&tag())).await;
    let update = |version: Option<u64>, given: &str| pb::UpdateSubjectRequest {
        subject: Some(pb::Subject {
            id: created.id.clone(),
            name: Some(pb::Name {
                given: given.into(),
                family: String::new(),
            }),
            ..Default::default()
        }),
        update_mask: mask(&["name.given"]),
        expected_version: version,
        source: String::new(),
    };
    app.subjects()
        .update_subject(update(Some(1), "Eerste"))
        .await
        .unwrap();
    let err = app
        .subjects()
        .update_subject(update(Some(1), "Tweede"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    let got = app.get(&created.id).await.unwrap();
    assert_eq!(got.name.unwrap().given, "Eerste");
    assert_eq!(got.version, 2);
    // Without an expected version the update applies to whatever is current.
    app.subjects()
        .update_subject(update(None, "Derde"))
        .await
        .unwrap();
    assert_eq!(app.get(&created.id).await.unwrap().version, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_without_version_all_apply() {
    let app = spawn_kluis().await;
    let created = app.create(full_subject(&tag())).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let mut client = app.subjects();
        let id = created.id.clone();
        tasks.push(tokio::spawn(async move {
            client
                .update_subject(pb::UpdateSubjectRequest {
                    subject: Some(pb::Subject {
                        id,
                        billing: Some(pb::Billing {
                            company_name: format!("Bedrijf {i}"),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    update_mask: mask(&["billing.company_name"]),
                    expected_version: None,
                    source: String::new(),
                })
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        app.get(&created.id).await.unwrap().version,
        17,
        "no update lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_each_get_their_own_subjects() {
    // On PostgreSQL lookups arriving together are answered by one query per batch (padded to a
    // few sizes), on a SQLite file each reads inline: either way each must get exactly its own
    // subjects, none of another's and none of the padding.
    use pb::find_subjects_request::Key;
    let app = spawn_kluis().await;
    let tags: Vec<String> = (0..5).map(|_| tag()).collect();
    let mut ids = Vec::new();
    for t in &tags {
        ids.push(app.create(full_subject(t)).await.id);
    }
    let mut all = ids.clone();
    all.sort();
    let mut lookups = tokio::task::JoinSet::new();
    for n in 0..45 {
        let (key, expected) = match n % 7 {
            0..5 => (
                Key::Email(format!("klant.{}@example.nl", tags[n % 7])),
                vec![ids[n % 7].clone()],
            ),
            // Every full_subject has this phone number.
            5 => (Key::Phone("+31853033451".into()), all.clone()),
            _ => (Key::Email(format!("niemand.{n}@example.nl")), vec![]),
        };
        let mut client = app.subjects();
        lookups.spawn(async move {
            let found = client
                .find_subjects(pb::FindSubjectsRequest { key: Some(key) })
                .await
                .unwrap()
                .into_inner()
                .subject_ids;
            assert_eq!(found, expected, "lookup {n}");
        });
    }
    while let Some(done) = lookups.join_next().await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_matches_email_case_insensitively_iban_with_spaces_phone_and_username() {
    let app = spawn_kluis().await;
    let t = tag();
    let a = app.create(full_subject(&t)).await;
    let mut other = full_subject(&tag());
    other.payment.as_mut().unwrap().iban = "DE89370400440532013000".into();
    other.contact.as_mut().unwrap().phone = "+31612345678".into();
    let b = app.create(other).await;
    let find = |key: pb::find_subjects_request::Key| {
        let mut client = app.subjects();
        async move {
            client
                .find_subjects(pb::FindSubjectsRequest { key: Some(key) })
                .await
                .map(|r| r.into_inner().subject_ids)
        }
    };
    use pb::find_subjects_request::Key;
    assert_eq!(
        find(Key::Email(format!("KLANT.{t}@example.NL")))
            .await
            .unwrap(),
        vec![a.id.clone()]
    );
    assert_eq!(
        find(Key::Username(format!("USER{t}"))).await.unwrap(),
        vec![a.id.clone()]
    );
    assert_eq!(
        find(Key::Iban("nl91 abna 0417 1643 00".into()))
            .await
            .unwrap(),
        vec![a.id.clone()]
    );
    assert_eq!(
        find(Key::Iban("DE89 3704 0044 0532 0130 00".into()))
            .await
            .unwrap(),
        vec![b.id.clone()]
    );
    assert_eq!(
        find(Key::Phone("+31 6 1234 5678".into())).await.unwrap(),
        vec![b.id.clone()]
    );
    assert!(
        find(Key::Email("nobody@example.nl".into()))
            .await
            .unwrap()
            .is_empty()
    );
    let err = find(Key::Iban("NL91ABNA0417164301".into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = app
        .subjects()
        .find_subjects(pb::FindSubjectsRequest { key: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // After an update the old value no longer finds the subject, the new one does.
    app.subjects()
        .update_subject(pb::UpdateSubjectRequest {
            subject: Some(pb::Subject {
                id: a.id.clone(),
                contact: Some(pb::Contact {
                    email: "nieuw@example.nl".into(),
                    phone: String::new(),
                }),
                ..Default::default()
            }),
            update_mask: mask(&["contact.email"]),
            expected_version: None,
            source: String::new(),
        })
        .await
        .unwrap();
    assert!(
        find(Key::Email(format!("klant.{t}@example.nl")))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        find(Key::Email("Nieuw@Example.nl".into())).await.unwrap(),
        vec![a.id.clone()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_username_is_already_exists_on_create_and_update() {
    let app = spawn_kluis().await;
    let t = tag();
    let first = app.create(full_subject(&t)).await;
    let mut same = full_subject(&tag());
    same.account = Some(pb::Account {
        username: format!("USER{t}"),
    });
    let err = app
        .subjects()
        .create_subject(pb::CreateSubjectRequest {
            subject: Some(same),
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("account.username"));

    let second = app.create(full_subject(&tag())).await;
    let err = app
        .subjects()
        .update_subject(pb::UpdateSubjectRequest {
            subject: Some(pb::Subject {
                id: second.id.clone(),
                account: Some(pb::Account {
                    username: format!("user{t}"),
                }),
                ..Default::default()
            }),
            update_mask: mask(&["account.username"]),
            expected_version: None,
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(
        app.get(&second.id).await.unwrap().version,
        1,
        "refused update wrote nothing"
    );
    assert_eq!(
        app.get(&first.id).await.unwrap().account.unwrap().username,
        format!("user{t}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_in_a_batch_of_concurrent_creates_fails_alone() {
    let app = spawn_kluis().await;
    let shared = format!("shared{}", tag());
    let mut tasks = Vec::new();
    for i in 0..40 {
        let mut client = app.subjects();
        let mut subject = full_subject(&tag());
        if i % 4 == 0 {
            subject.account = Some(pb::Account {
                username: shared.clone(),
            });
        }
        tasks.push(tokio::spawn(async move {
            client
                .create_subject(pb::CreateSubjectRequest {
                    subject: Some(subject),
                    source: String::new(),
                })
                .await
        }));
    }
    let (mut ok, mut exists) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) if e.code() == Code::AlreadyExists => exists += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(
        (ok, exists),
        (31, 9),
        "one holder of the shared name, every other create succeeds"
    );
    let raw = app.db.raw().await;
    assert_eq!(raw.count_all("SELECT COUNT(*) FROM subjects").await, 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_get_answers_each_id_found_or_not_found() {
    let app = spawn_kluis().await;
    let a = app.create(full_subject(&tag())).await;
    let b = app.create(full_subject(&tag())).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let results = app
        .subjects()
        .batch_get_subjects(pb::BatchGetSubjectsRequest {
            ids: vec![a.id.clone(), unknown.clone(), b.id.clone(), a.id.clone()],
            read_mask: mask(&["contact.email"]),
            view: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    use pb::batch_get_subjects_result::Result as Item;
    let ids: Vec<&str> = results.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        vec![
            a.id.as_str(),
            unknown.as_str(),
            b.id.as_str(),
            a.id.as_str()
        ]
    );
    assert!(
        matches!(&results[0].result, Some(Item::Subject(s)) if s.contact.is_some() && s.name.is_none())
    );
    assert!(matches!(&results[1].result, Some(Item::Error(e)) if e.code == Code::NotFound as i32));
    assert!(matches!(&results[2].result, Some(Item::Subject(_))));

    let too_many = (0..101).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let err = app
        .subjects()
        .batch_get_subjects(pb::BatchGetSubjectsRequest {
            ids: too_many,
            read_mask: None,
            view: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_makes_every_read_not_found_and_destroys_key_and_index() {
    let app = spawn_kluis().await;
    let t = tag();
    let victim = app.create(full_subject(&t)).await;
    let bystander = app.create(full_subject(&tag())).await;
    let id = uuid::Uuid::parse_str(&victim.id).unwrap();
    let raw = app.db.raw().await;
    assert_eq!(
        raw.count(
            "SELECT COUNT(*) FROM blind_index WHERE subject_id = $1",
            id.as_bytes()
        )
        .await,
        4
    );

    let erased = app
        .subjects()
        .erase_subject(pb::EraseSubjectRequest {
            id: victim.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(erased.erase_time.is_some());

    assert_eq!(
        app.get(&victim.id).await.unwrap_err().code(),
        Code::NotFound
    );
    let found = app
        .subjects()
        .find_subjects(pb::FindSubjectsRequest {
            key: Some(pb::find_subjects_request::Key::Email(format!(
                "klant.{t}@example.nl"
            ))),
        })
        .await
        .unwrap()
        .into_inner()
        .subject_ids;
    assert!(found.is_empty());
    let batch = app
        .subjects()
        .batch_get_subjects(pb::BatchGetSubjectsRequest {
            ids: vec![victim.id.clone()],
            read_mask: None,
            view: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(
        matches!(&batch[0].result, Some(pb::batch_get_subjects_result::Result::Error(e)) if e.code == Code::NotFound as i32)
    );
    let err = app
        .subjects()
        .update_subject(pb::UpdateSubjectRequest {
            subject: Some(pb::Subject {
                id: victim.id.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["name.given"]),
            expected_version: None,
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let again = app
        .subjects()
        .erase_subject(pb::EraseSubjectRequest {
            id: victim.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);

    // The wrapped DEK, the ciphertexts and the index entries are gone; only the tombstone is left.
    assert_eq!(
        raw.count("SELECT COUNT(*) FROM subjects WHERE id = $1", id.as_bytes())
            .await,
        0
    );
    assert_eq!(
        raw.count(
            "SELECT COUNT(*) FROM data_keys WHERE subject_id = $1",
            id.as_bytes()
        )
        .await,
        0,
        "the wrapped data key is destroyed"
    );
    assert_eq!(
        raw.count(
            "SELECT COUNT(*) FROM blind_index WHERE subject_id = $1",
            id.as_bytes()
        )
        .await,
        0
    );
    assert_eq!(
        raw.count(
            "SELECT COUNT(*) FROM erased_subjects WHERE id = $1",
            id.as_bytes()
        )
        .await,
        1
    );
    assert!(
        app.get(&bystander.id).await.is_ok(),
        "other subjects untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_is_for_operators_only() {
    let app = spawn_kluis().await;
    let victim = app.create(full_subject(&tag())).await;
    let token = app.token_for("backend", "hosting-backend").await;
    let err = app
        .subjects_as(Some(&token))
        .erase_subject(pb::EraseSubjectRequest {
            id: victim.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(app.get(&victim.id).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_and_lookups_each_get_their_own_answer() {
    let app = spawn_kluis().await;
    let mut subjects = Vec::new();
    for _ in 0..12 {
        let t = tag();
        subjects.push((t.clone(), app.create(full_subject(&t)).await.id));
    }
    let mut tasks = Vec::new();
    for round in 0..3 {
        for (t, id) in subjects.clone() {
            let mut client = app.subjects();
            tasks.push(tokio::spawn(async move {
                let found = client
                    .find_subjects(pb::FindSubjectsRequest {
                        key: Some(pb::find_subjects_request::Key::Email(format!(
                            "klant.{t}@example.nl"
                        ))),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .subject_ids;
                assert_eq!(found, vec![id.clone()], "round {round}");
                let got = client
                    .get_subject(pb::GetSubjectRequest {
                        id: id.clone(),
                        read_mask: None,
                        view: 0,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .subject
                    .unwrap();
                assert_eq!(got.id, id);
                assert_eq!(got.account.unwrap().username, format!("user{t}"));
                let unknown = client
                    .get_subject(pb::GetSubjectRequest {
                        id: uuid::Uuid::new_v4().to_string(),
                        read_mask: None,
                        view: 0,
                    })
                    .await
                    .unwrap_err();
                assert_eq!(unknown.code(), Code::NotFound);
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
}
