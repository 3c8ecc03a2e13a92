//! The shipped privacy policy, enforced: every role × purpose × path cell of `policy/default.toml`
//! as the server answers it, masking apart from the typed subject, the purpose and reason headers,
//! objections against an opt-out purpose, and creates limited to the write grant.

use std::collections::{BTreeMap, BTreeSet};

use kluis::{
    api::pb,
    policy::{FieldPath, Grant, PathSet, Policy, Role, mask_text},
};
use prost_types::FieldMask;
use tokio::task::JoinSet;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::helpers::{OPERATOR_REASON, Subjects, full_subject, spawn_kluis, tag};

// ---- helpers ----------------------------------------------------------------------------------

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

/// One leaf of a subject as the tests compare it: text as is, anything else in a printed form.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Leaf {
    Text(String),
    Other(String),
}

fn put_text(out: &mut BTreeMap<&'static str, Leaf>, path: &'static str, value: &str) {
    if !value.is_empty() {
        out.insert(path, Leaf::Text(value.to_owned()));
    }
}

fn put_address(
    out: &mut BTreeMap<&'static str, Leaf>,
    paths: [&'static str; 6],
    a: Option<&pb::Address>,
) {
    let Some(a) = a else { return };
    for (path, value) in paths.into_iter().zip([
        &a.street,
        &a.house_number,
        &a.house_number_addition,
        &a.postal_code,
        &a.city,
        &a.country,
    ]) {
        put_text(out, path, value);
    }
}

/// Every path present in `s` (non-empty text, non-zero enum, non-empty list), by the field-path
/// names of DESIGN.md §2, with its value.
fn leaves(s: &pb::Subject) -> BTreeMap<&'static str, Leaf> {
    let mut out = BTreeMap::new();
    if let Some(n) = &s.name {
        put_text(&mut out, "name.given", &n.given);
        put_text(&mut out, "name.family", &n.family);
    }
    put_address(
        &mut out,
        [
            "address.street",
            "address.house_number",
            "address.house_number_addition",
            "address.postal_code",
            "address.city",
            "address.country",
        ],
        s.address.as_ref(),
    );
    if let Some(c) = &s.contact {
        put_text(&mut out, "contact.email", &c.email);
        put_text(&mut out, "contact.phone", &c.phone);
    }
    if !s.ip_addresses.is_empty() {
        out.insert("ip_addresses", Leaf::Other(format!("{:?}", s.ip_addresses)));
    }
    if let Some(b) = &s.billing {
        put_text(&mut out, "billing.company_name", &b.company_name);
        put_text(&mut out, "billing.vat_number", &b.vat_number);
        put_address(
            &mut out,
            [
                "billing.address.street",
                "billing.address.house_number",
                "billing.address.house_number_addition",
                "billing.address.postal_code",
                "billing.address.city",
                "billing.address.country",
            ],
            b.address.as_ref(),
        );
    }
    if let Some(p) = &s.payment {
        put_text(&mut out, "payment.iban", &p.iban);
        put_text(&mut out, "payment.account_holder", &p.account_holder);
        put_text(&mut out, "payment.psp_token", &p.psp_token);
        if p.method != 0 {
            out.insert("payment.method", Leaf::Other(p.method.to_string()));
        }
    }
    if let Some(p) = &s.profile
        && p.gender != 0
    {
        out.insert("profile.gender", Leaf::Other(p.gender.to_string()));
    }
    if let Some(a) = &s.account {
        put_text(&mut out, "account.username", &a.username);
    }
    if !s.activity_log.is_empty() {
        out.insert("activity_log", Leaf::Other(format!("{:?}", s.activity_log)));
    }
    out
}

/// The set of paths present in `s`.
fn present(s: &pb::Subject) -> BTreeSet<String> {
    leaves(s).keys().map(|p| p.to_string()).collect()
}

fn path_names(set: PathSet) -> BTreeSet<String> {
    set.iter().map(|p| p.as_str().to_owned()).collect()
}

fn shipped() -> Policy {
    match Policy::shipped() {
        Ok(p) => p,
        Err(e) => panic!("the shipped policy is invalid:\n{e}"),
    }
}

/// Whether `message` names `word` as a whole token (a purpose, role or field path), not as part
/// of a longer one (`address.street` inside `billing.address.street`).
fn mentions(message: &str, word: &str) -> bool {
    let word_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    message.match_indices(word).any(|(i, _)| {
        let before = message[..i].chars().next_back();
        let after: Vec<char> = message[i + word.len()..].chars().take(2).collect();
        let clean_before = before.is_none_or(|c| !word_char(c) && c != '.');
        let clean_after = match after.as_slice() {
            [] => true,
            [c, ..] if word_char(*c) => false,
            ['.', next, ..] => !word_char(*next),
            _ => true,
        };
        clean_before && clean_after
    })
}

fn violation_fields(err: &Status) -> Vec<String> {
    err.get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

fn get_request(id: &str, read_mask: &[&str], view: pb::SubjectView) -> pb::GetSubjectRequest {
    pb::GetSubjectRequest {
        id: id.to_owned(),
        read_mask: if read_mask.is_empty() {
            None
        } else {
            mask(read_mask)
        },
        view: view as i32,
    }
}

async fn create_with(client: &mut Subjects, subject: pb::Subject) -> pb::Subject {
    client
        .create_subject(pb::CreateSubjectRequest {
            subject: Some(subject),
            source: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .subject
        .unwrap()
}

/// Every path of `id` as an operator reads it (under `subject-request`, with a reason).
async fn operator_leaves(operator: &mut Subjects, id: &str) -> BTreeMap<&'static str, Leaf> {
    let s = operator
        .get_subject(get_request(id, &[], pb::SubjectView::Basic))
        .await
        .unwrap()
        .into_inner()
        .subject
        .unwrap();
    leaves(&s)
}

fn find_by_email(email: &str) -> pb::FindSubjectsRequest {
    pb::FindSubjectsRequest {
        key: Some(pb::find_subjects_request::Key::Email(email.to_owned())),
    }
}

// ---- 1. the policy table ----------------------------------------------------------------------

/// One role × purpose cell: the clients it needs and what the policy says.
struct Cell {
    role: Role,
    purpose: String,
    grant: Option<Grant>,
    /// The role's client declaring the purpose (and a reason when the role must give one).
    client: Subjects,
    /// An operator under `subject-request` with a reason, to create subjects and look at them.
    operator: Subjects,
    /// A subject that exists, for the refused cells.
    existing: String,
}

async fn check_cell(mut cell: Cell) {
    let ctx = format!("{} under {}", cell.role, cell.purpose);
    let Some(grant) = cell.grant.clone() else {
        let err = cell
            .client
            .get_subject(get_request(&cell.existing, &[], pb::SubjectView::Basic))
            .await
            .expect_err(&ctx);
        assert_eq!(err.code(), Code::PermissionDenied, "{ctx}: {err:?}");
        assert!(
            mentions(err.message(), &cell.purpose),
            "{ctx}: the refusal names the purpose: {err:?}"
        );
        let err = cell
            .client
            .update_subject(pb::UpdateSubjectRequest {
                subject: Some(pb::Subject {
                    id: cell.existing.clone(),
                    ..full_subject(&tag())
                }),
                update_mask: mask(&["name.given"]),
                expected_version: None,
                source: String::new(),
            })
            .await
            .expect_err(&ctx);
        assert_eq!(err.code(), Code::PermissionDenied, "{ctx} update: {err:?}");
        return;
    };

    let created = create_with(&mut cell.operator, full_subject(&tag())).await;
    let id = created.id.clone();
    let original = leaves(&created);
    assert_eq!(
        original.len(),
        FieldPath::ALL.len(),
        "the fixture sets every path"
    );
    let read = path_names(grant.read);
    let masked = path_names(grant.masked);
    let all = path_names(PathSet::all());

    // The whole subject, no mask.
    let got = cell
        .client
        .get_subject(get_request(&id, &[], pb::SubjectView::Full))
        .await
        .unwrap_or_else(|e| panic!("{ctx}: full read: {e:?}"))
        .into_inner();
    let subject = got.subject.unwrap();
    assert_eq!(present(&subject), read, "{ctx}: paths in `subject`");
    for (path, value) in leaves(&subject) {
        assert_eq!(Some(&value), original.get(path), "{ctx}: value of {path}");
    }
    let metadata: BTreeSet<String> = subject
        .field_metadata
        .iter()
        .map(|m| m.path.clone())
        .collect();
    assert_eq!(metadata, read, "{ctx}: field_metadata paths");
    let got_masked: BTreeMap<String, String> = got
        .masked_values
        .iter()
        .map(|m| (m.path.clone(), m.masked.clone()))
        .collect();
    assert_eq!(
        got_masked.keys().cloned().collect::<BTreeSet<_>>(),
        masked,
        "{ctx}: masked_values paths"
    );
    for (path, shown) in &got_masked {
        let field = FieldPath::from_leaf(path).unwrap();
        match &original[field.as_str()] {
            Leaf::Text(text) => {
                assert_eq!(shown, &mask_text(field, text), "{ctx}: masked {path}");
                assert_ne!(shown, text, "{ctx}: {path} masked, not in clear");
            }
            Leaf::Other(value) => {
                assert!(!shown.is_empty(), "{ctx}: masked {path} shows a marker");
                assert!(!shown.contains(value.as_str()), "{ctx}: masked {path}");
            }
        }
    }
    // Withheld: what the purpose covers but the role may not see — never the rest of the subject.
    let purpose_paths = path_names(shipped().purpose(&cell.purpose).unwrap().paths);
    let withheld: BTreeSet<String> = got.withheld_paths.iter().cloned().collect();
    let expected_withheld: BTreeSet<String> = all
        .iter()
        .filter(|p| purpose_paths.contains(*p) && !read.contains(*p) && !masked.contains(*p))
        .cloned()
        .collect();
    assert_eq!(withheld, expected_withheld, "{ctx}: withheld_paths");
    assert_eq!(
        withheld.len(),
        got.withheld_paths.len(),
        "{ctx}: withheld once each"
    );

    // One path at a time: reads.
    for path in FieldPath::ALL {
        let p = path.as_str();
        let answer = cell
            .client
            .get_subject(get_request(&id, &[p], pb::SubjectView::Basic))
            .await;
        if grant.read.contains(*path) {
            let got = answer
                .unwrap_or_else(|e| panic!("{ctx}: read {p}: {e:?}"))
                .into_inner();
            let only: BTreeSet<String> = [p.to_owned()].into();
            assert_eq!(present(&got.subject.unwrap()), only, "{ctx}: read {p}");
            assert!(got.masked_values.is_empty(), "{ctx}: read {p}");
        } else if grant.masked.contains(*path) {
            let got = answer
                .unwrap_or_else(|e| panic!("{ctx}: masked read {p}: {e:?}"))
                .into_inner();
            assert!(present(&got.subject.unwrap()).is_empty(), "{ctx}: read {p}");
            let paths: Vec<&str> = got.masked_values.iter().map(|m| m.path.as_str()).collect();
            assert_eq!(paths, [p], "{ctx}: masked read {p}");
        } else {
            let err = answer.expect_err(&format!("{ctx}: read {p} is refused"));
            assert_eq!(
                err.code(),
                Code::PermissionDenied,
                "{ctx}: read {p}: {err:?}"
            );
            assert!(
                mentions(err.message(), p),
                "{ctx}: the refusal names {p}: {err:?}"
            );
        }
    }

    // One path at a time: writes, each with a valid value of a fresh fixture.
    let mut expected = original.clone();
    for path in FieldPath::ALL {
        let p = path.as_str();
        let fresh = full_subject(&tag());
        let fresh_value = leaves(&fresh)[p].clone();
        let answer = cell
            .client
            .update_subject(pb::UpdateSubjectRequest {
                subject: Some(pb::Subject {
                    id: id.clone(),
                    ..fresh
                }),
                update_mask: mask(&[p]),
                expected_version: None,
                source: String::new(),
            })
            .await;
        if grant.write.contains(*path) {
            let got = answer
                .unwrap_or_else(|e| panic!("{ctx}: write {p}: {e:?}"))
                .into_inner();
            let after = leaves(&got.subject.unwrap());
            if grant.read.contains(*path) {
                assert_eq!(after.get(p), Some(&fresh_value), "{ctx}: written {p}");
            }
            expected.insert(p, fresh_value);
        } else {
            let err = answer.expect_err(&format!("{ctx}: write {p} is refused"));
            assert_eq!(
                err.code(),
                Code::PermissionDenied,
                "{ctx}: write {p}: {err:?}"
            );
            assert!(
                mentions(err.message(), p),
                "{ctx}: the refusal names {p}: {err:?}"
            );
        }
    }
    // Refused writes changed nothing; allowed ones changed exactly their path.
    assert_eq!(
        operator_leaves(&mut cell.operator, &id).await,
        expected,
        "{ctx}: stored values after the writes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_purpose_path_cell_of_the_shipped_policy_is_enforced() {
    let app = spawn_kluis().await;
    let policy = shipped();
    let operator = app.subjects();
    let existing = app.create(full_subject(&tag())).await.id;
    assert_eq!(
        leaves(&full_subject(&tag()))
            .keys()
            .map(|p| p.to_string())
            .collect::<BTreeSet<_>>(),
        path_names(PathSet::all()),
        "the test's path names are the vocabulary's"
    );

    let mut cells = JoinSet::new();
    let mut granted = 0;
    let mut refused = 0;
    for role in Role::ALL {
        let token = app
            .token_for(&format!("{}-{}", role.as_str(), tag()), role.as_str())
            .await;
        let reason = policy.role(role).require_reason.then_some(OPERATOR_REASON);
        for purpose in policy.purposes() {
            let grant = policy.grant(role, &purpose.name).cloned();
            if grant.is_some() {
                granted += 1;
            } else {
                refused += 1;
            }
            cells.spawn(check_cell(Cell {
                role,
                purpose: purpose.name.clone(),
                grant,
                client: app.subjects_under(Some(&token), Some(&purpose.name), reason),
                operator: operator.clone(),
                existing: existing.clone(),
            }));
        }
    }
    assert_eq!(granted + refused, 4 * 7, "every role × purpose of the file");
    assert!(granted >= 9, "{granted} granted cells");
    while let Some(done) = cells.join_next().await {
        if let Err(e) = done {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

// ---- 2. masked values stay apart --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_payment_is_shown_apart_and_a_read_written_back_cannot_overwrite_it() {
    let app = spawn_kluis().await;
    let created = app.create(full_subject(&tag())).await;
    let token = app.token_for("portal-backend", "hosting-backend").await;
    let mut hosting = app.subjects_under(Some(&token), Some("account"), None);

    let got = hosting
        .get_subject(get_request(&created.id, &[], pb::SubjectView::Basic))
        .await
        .unwrap()
        .into_inner();
    let subject = got.subject.clone().unwrap();
    assert!(
        subject
            .payment
            .as_ref()
            .is_none_or(|p| *p == pb::Payment::default()),
        "no payment in the typed subject: {:?}",
        subject.payment
    );
    let printed = format!("{subject:?}");
    for fragment in ["NL91ABNA0417164300", "ABNA", "0417164300", "NL**"] {
        assert!(
            !printed.contains(fragment),
            "the typed subject carries no IBAN ({fragment})"
        );
    }
    let iban = got
        .masked_values
        .iter()
        .find(|m| m.path == "payment.iban")
        .map(|m| m.masked.as_str());
    assert_eq!(iban, Some("NL** **** **** **43 00"));
    assert!(
        !got.withheld_paths.iter().any(|p| p.starts_with("payment")),
        "masked paths are not withheld: {:?}",
        got.withheld_paths
    );

    // Writing the read back naming the masked path: refused, whole.
    let mut back = subject.clone();
    back.name.as_mut().unwrap().given = "Teruggeschreven".into();
    let err = hosting
        .update_subject(pb::UpdateSubjectRequest {
            subject: Some(back.clone()),
            update_mask: mask(&["payment.iban"]),
            expected_version: None,
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(mentions(err.message(), "payment.iban"), "{err:?}");
    let err = hosting
        .update_subject(pb::UpdateSubjectRequest {
            subject: Some(back.clone()),
            update_mask: mask(&["name.given", "payment"]),
            expected_version: None,
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let stored = leaves(&app.get(&created.id).await.unwrap());
    assert_eq!(
        stored["payment.iban"],
        Leaf::Text("NL91ABNA0417164300".into())
    );
    assert_eq!(
        stored["name.given"],
        leaves(&created)["name.given"],
        "a refused write changes nothing"
    );

    // Naming a path it may write: applied; the IBAN is untouched.
    let updated = hosting
        .update_subject(pb::UpdateSubjectRequest {
            subject: Some(back.clone()),
            update_mask: mask(&["name.given"]),
            expected_version: None,
            source: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        updated
            .masked_values
            .iter()
            .find(|m| m.path == "payment.iban")
            .map(|m| m.masked.as_str()),
        Some("NL** **** **** **43 00")
    );
    // The whole read written back over every path the grant writes: applied, IBAN untouched.
    hosting
        .update_subject(pb::UpdateSubjectRequest {
            subject: Some(back),
            update_mask: mask(&[
                "name",
                "address",
                "contact",
                "ip_addresses",
                "profile",
                "account",
            ]),
            expected_version: None,
            source: String::new(),
        })
        .await
        .unwrap();
    let stored = leaves(&app.get(&created.id).await.unwrap());
    assert_eq!(stored["name.given"], Leaf::Text("Teruggeschreven".into()));
    let before = leaves(&created);
    for p in [
        "payment.iban",
        "payment.account_holder",
        "payment.psp_token",
        "payment.method",
    ] {
        assert_eq!(stored[p], before[p], "{p} unchanged");
    }
    assert_eq!(stored.len(), 26, "nothing cleared: {:?}", stored.keys());
}

// ---- 3. the purpose header --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_unknown_or_foreign_purpose_is_refused_on_get_find_and_create() {
    let app = spawn_kluis().await;
    let t = tag();
    let created = app.create(full_subject(&t)).await;
    let email = format!("Klant.{t}@Example.nl");
    let token = app.token_for("facturatie", "billing").await;
    let raw = app.db.raw().await;
    let subjects_before = raw.count_all("SELECT COUNT(*) FROM subjects").await;

    for (what, purpose, code) in [
        ("missing purpose", None, Code::InvalidArgument),
        ("unknown purpose", Some("sales"), Code::InvalidArgument),
        ("blank purpose", Some("  "), Code::InvalidArgument),
        (
            "purpose of another role",
            Some("marketing"),
            Code::PermissionDenied,
        ),
    ] {
        let mut client = app.subjects_under(Some(&token), purpose, None);
        let errors = [
            (
                "GetSubject",
                client
                    .get_subject(get_request(&created.id, &[], pb::SubjectView::Basic))
                    .await
                    .map(|_| ()),
            ),
            (
                "FindSubjects",
                client
                    .find_subjects(find_by_email(&email))
                    .await
                    .map(|_| ()),
            ),
            (
                "CreateSubject",
                client
                    .create_subject(pb::CreateSubjectRequest {
                        subject: Some(pb::Subject {
                            billing: full_subject(&tag()).billing,
                            ..Default::default()
                        }),
                        source: String::new(),
                    })
                    .await
                    .map(|_| ()),
            ),
        ];
        for (method, answer) in errors {
            let ctx = format!("{method} with {what}");
            let err = answer.expect_err(&ctx);
            assert_eq!(err.code(), code, "{ctx}: {err:?}");
            if code == Code::InvalidArgument {
                assert_eq!(
                    violation_fields(&err),
                    ["x-kluis-purpose"],
                    "{ctx}: BadRequest names the header"
                );
            } else {
                assert!(mentions(err.message(), "marketing"), "{ctx}: {err:?}");
                assert!(mentions(err.message(), "billing"), "{ctx}: {err:?}");
            }
        }
    }
    assert_eq!(
        raw.count_all("SELECT COUNT(*) FROM subjects").await,
        subjects_before,
        "no refused create stored anything"
    );
    // The same billing token under one of its own purposes is served.
    let mut billing = app.subjects_under(Some(&token), Some("order"), None);
    billing
        .get_subject(get_request(&created.id, &[], pb::SubjectView::Basic))
        .await
        .unwrap();
    let found = billing
        .find_subjects(find_by_email(&email))
        .await
        .unwrap()
        .into_inner()
        .subject_ids;
    assert_eq!(found, std::slice::from_ref(&created.id));
    raw.close().await;
}

// ---- 4. the operator's reason -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_state_a_reason_to_read_values_but_not_to_look_up_ids() {
    let app = spawn_kluis().await;
    let t = tag();
    let created = app.create(full_subject(&t)).await;
    let token = app.operator_token.clone();
    let mut no_reason = app.subjects_under(Some(&token), Some("subject-request"), None);

    let err = no_reason
        .get_subject(get_request(&created.id, &[], pb::SubjectView::Basic))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(violation_fields(&err), ["x-kluis-reason"], "{err:?}");
    assert!(mentions(err.message(), "x-kluis-reason"), "{err:?}");

    let err = no_reason
        .update_subject(pb::UpdateSubjectRequest {
            subject: Some(pb::Subject {
                id: created.id.clone(),
                name: Some(pb::Name {
                    given: "Zonder reden".into(),
                    family: String::new(),
                }),
                ..Default::default()
            }),
            update_mask: mask(&["name.given"]),
            expected_version: None,
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "update without a reason: {err:?}"
    );
    assert_eq!(violation_fields(&err), ["x-kluis-reason"], "{err:?}");

    let found = no_reason
        .find_subjects(find_by_email(&format!("klant.{t}@example.nl")))
        .await
        .unwrap()
        .into_inner()
        .subject_ids;
    assert_eq!(
        found,
        std::slice::from_ref(&created.id),
        "a lookup returns ids only"
    );

    let mut with_reason =
        app.subjects_under(Some(&token), Some("subject-request"), Some(OPERATOR_REASON));
    let got = with_reason
        .get_subject(get_request(&created.id, &[], pb::SubjectView::Basic))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(leaves(&got.subject.unwrap()), leaves(&created));
    assert_eq!(
        leaves(&app.get(&created.id).await.unwrap())["name.given"],
        Leaf::Text(format!("Given{t}")),
        "the update without a reason changed nothing"
    );
}

// ---- 5. objection against marketing -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_objection_to_marketing_hides_the_subject_from_marketing_only_until_withdrawn() {
    let app = spawn_kluis().await;
    let t = tag();
    let email = format!("Klant.{t}@Example.nl");
    let objector = app.create(full_subject(&t)).await;
    let mut sibling = full_subject(&tag());
    sibling.contact.as_mut().unwrap().email = email.clone();
    let sibling = app.create(sibling).await;

    let mailer = app.token_for("mailer", "marketing-mailer").await;
    let billing = app.token_for("facturatie", "billing").await;
    let hosting = app.token_for("portal-backend", "hosting-backend").await;
    let mut marketing = app.subjects_under(Some(&mailer), Some("marketing"), None);
    let mut billing_account = app.subjects_under(Some(&billing), Some("account"), None);
    let mut unsubscribe = app.consent_under(&mailer, "marketing");

    let get = |client: &mut Subjects, id: &str| {
        let mut client = client.clone();
        let id = id.to_owned();
        async move {
            client
                .get_subject(get_request(&id, &[], pb::SubjectView::Basic))
                .await
                .map(|r| r.into_inner())
        }
    };
    let find = |client: &mut Subjects| {
        let mut client = client.clone();
        let email = email.clone();
        async move {
            let mut ids = client
                .find_subjects(find_by_email(&email.to_lowercase()))
                .await
                .map(|r| r.into_inner().subject_ids)?;
            ids.sort();
            Ok::<_, Status>(ids)
        }
    };
    let both = {
        let mut ids = vec![objector.id.clone(), sibling.id.clone()];
        ids.sort();
        ids
    };
    let object = |route: pb::ObjectionRoute| pb::ObjectToPurposeRequest {
        subject_id: objector.id.clone(),
        purpose: "marketing".into(),
        route: route as i32,
    };

    // Before: the mailer reads the e-mail address (only) and finds both by it.
    let got = get(&mut marketing, &objector.id).await.unwrap();
    let only_email: BTreeSet<String> = ["contact.email".to_owned()].into();
    assert_eq!(present(&got.subject.unwrap()), only_email);
    assert!(
        got.withheld_paths.is_empty(),
        "the mailer is not told which other data the subject has: {:?}",
        got.withheld_paths
    );
    assert_eq!(find(&mut marketing).await.unwrap(), both);

    // The unsubscribe link.
    let first = unsubscribe
        .object_to_purpose(object(pb::ObjectionRoute::UnsubscribeLink))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.already_objected);
    assert!(first.object_time.is_some());
    let second = unsubscribe
        .object_to_purpose(object(pb::ObjectionRoute::UnsubscribeLink))
        .await
        .unwrap()
        .into_inner();
    assert!(second.already_objected, "objecting twice is not an error");
    assert_eq!(
        second.object_time, first.object_time,
        "the objection stands from when it was first made"
    );

    let err = get(&mut marketing, &objector.id).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "read after the objection: {err:?}"
    );
    assert!(mentions(err.message(), "marketing"), "{err:?}");
    assert_eq!(
        find(&mut marketing).await.unwrap(),
        std::slice::from_ref(&sibling.id),
        "the lookup leaves the objector out, not the other holder of the address"
    );
    let batch = marketing
        .batch_get_subjects(pb::BatchGetSubjectsRequest {
            ids: vec![objector.id.clone(), sibling.id.clone()],
            read_mask: None,
            view: pb::SubjectView::Basic as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    use pb::batch_get_subjects_result::Result as Item;
    assert_eq!(batch.len(), 2);
    assert_eq!(batch[0].id, objector.id);
    match &batch[0].result {
        Some(Item::Error(e)) => {
            assert_eq!(e.code, Code::FailedPrecondition as i32, "batch item: {e:?}")
        }
        other => panic!("the objector's batch item is an error, got {other:?}"),
    }
    assert_eq!(batch[1].id, sibling.id);
    match &batch[1].result {
        Some(Item::Subject(s)) => assert_eq!(present(s), only_email),
        other => panic!("the other subject is read, got {other:?}"),
    }

    // Other purposes are not affected.
    let got = get(&mut billing_account, &objector.id).await.unwrap();
    assert!(present(&got.subject.unwrap()).contains("contact.email"));
    assert_eq!(find(&mut billing_account).await.unwrap(), both);

    // Withdrawn (by the subject, through the account): readable and findable under marketing again.
    let mut through_account = app.consent_under(&hosting, "account");
    let withdrawn = through_account
        .withdraw_objection(pb::WithdrawObjectionRequest {
            subject_id: objector.id.clone(),
            purpose: "marketing".into(),
            route: pb::ObjectionRoute::Account as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(withdrawn.withdrawn);
    get(&mut marketing, &objector.id).await.unwrap();
    assert_eq!(find(&mut marketing).await.unwrap(), both);
    let again = through_account
        .withdraw_objection(pb::WithdrawObjectionRequest {
            subject_id: objector.id.clone(),
            purpose: "marketing".into(),
            route: pb::ObjectionRoute::Account as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.withdrawn, "nothing left to withdraw");

    // Through the account: the hosting backend records it under `account`.
    let via_account = app
        .consent_under(&hosting, "account")
        .object_to_purpose(pb::ObjectToPurposeRequest {
            subject_id: sibling.id.clone(),
            purpose: "marketing".into(),
            route: pb::ObjectionRoute::Account as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!via_account.already_objected);
    let err = get(&mut marketing, &sibling.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        find(&mut marketing).await.unwrap(),
        std::slice::from_ref(&objector.id)
    );
    let mut hosting_account = app.subjects_under(Some(&hosting), Some("account"), None);
    get(&mut hosting_account, &sibling.id).await.unwrap();
}

// ---- 6. objections that are refused -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objection_against_a_legal_obligation_or_contract_is_refused_with_the_reason() {
    let app = spawn_kluis().await;
    let created = app.create(full_subject(&tag())).await;
    let hosting = app.token_for("portal-backend", "hosting-backend").await;
    let mailer = app.token_for("mailer", "marketing-mailer").await;
    let mut consent = app.consent_under(&hosting, "account");
    let request = |id: &str, purpose: &str, route: pb::ObjectionRoute| pb::ObjectToPurposeRequest {
        subject_id: id.to_owned(),
        purpose: purpose.to_owned(),
        route: route as i32,
    };

    for (purpose, basis) in [("order", "legal-obligation"), ("account", "contract")] {
        let err = consent
            .object_to_purpose(request(&created.id, purpose, pb::ObjectionRoute::Account))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{purpose}: {err:?}");
        assert!(
            mentions(err.message(), basis),
            "{purpose}: names {basis}: {err:?}"
        );
        assert!(mentions(err.message(), purpose), "{purpose}: {err:?}");
    }

    let err = consent
        .object_to_purpose(request(
            &uuid::Uuid::new_v4().to_string(),
            "marketing",
            pb::ObjectionRoute::Account,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "unknown subject: {err:?}");

    let err = consent
        .object_to_purpose(request(
            &created.id,
            "marketing",
            pb::ObjectionRoute::Unspecified,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "missing route: {err:?}");
    assert_eq!(violation_fields(&err), ["route"], "{err:?}");

    let err = consent
        .object_to_purpose(request(&created.id, "sales", pb::ObjectionRoute::Account))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "unknown purpose: {err:?}"
    );

    let err = app
        .consent_under(&mailer, "account")
        .object_to_purpose(request(
            &created.id,
            "marketing",
            pb::ObjectionRoute::UnsubscribeLink,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "mailer under account: {err:?}"
    );
    assert!(mentions(err.message(), "account"), "{err:?}");

    // None of those recorded an objection: the mailer still reads the subject.
    app.subjects_under(Some(&mailer), Some("marketing"), None)
        .get_subject(get_request(&created.id, &[], pb::SubjectView::Basic))
        .await
        .unwrap();
}

// ---- 7. creates inside the write grant --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_outside_the_write_grant_is_refused_and_stores_nothing() {
    let app = spawn_kluis().await;
    let t = tag();
    let hosting = app.token_for("portal-backend", "hosting-backend").await;
    let mut account = app.subjects_under(Some(&hosting), Some("account"), None);
    let raw = app.db.raw().await;
    let subjects_before = raw.count_all("SELECT COUNT(*) FROM subjects").await;
    let full = full_subject(&t);
    let naw_contact = pb::Subject {
        name: full.name.clone(),
        address: full.address.clone(),
        contact: full.contact.clone(),
        ..Default::default()
    };

    let err = account
        .create_subject(pb::CreateSubjectRequest {
            subject: Some(pb::Subject {
                payment: Some(pb::Payment {
                    iban: "NL91ABNA0417164300".into(),
                    ..Default::default()
                }),
                ..naw_contact.clone()
            }),
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(mentions(err.message(), "payment.iban"), "{err:?}");
    assert_eq!(
        raw.count_all("SELECT COUNT(*) FROM subjects").await,
        subjects_before,
        "nothing stored"
    );
    let found = app
        .subjects()
        .find_subjects(find_by_email(&format!("klant.{t}@example.nl")))
        .await
        .unwrap()
        .into_inner()
        .subject_ids;
    assert!(found.is_empty(), "no index entry either: {found:?}");

    let created = account
        .create_subject(pb::CreateSubjectRequest {
            subject: Some(naw_contact.clone()),
            source: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let subject = created.subject.unwrap();
    assert_eq!(subject.version, 1);
    assert_eq!(
        leaves(&subject),
        leaves(&naw_contact),
        "the answer shows what was stored"
    );
    assert!(created.masked_values.is_empty());
    assert!(created.withheld_paths.is_empty());
    assert_eq!(
        raw.count_all("SELECT COUNT(*) FROM subjects").await,
        subjects_before + 1
    );
    assert_eq!(
        leaves(&app.get(&subject.id).await.unwrap()),
        leaves(&naw_contact)
    );
    raw.close().await;
}

// ---- review follow-ups ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mailer_can_unsubscribe_a_subject_but_never_withdraw_an_objection() {
    let app = spawn_kluis().await;
    let subject = app.create(full_subject(&tag())).await;
    let mailer = app.token_for("mailer", "marketing-mailer").await;
    let backend = app.token_for("backend", "hosting-backend").await;
    let object = |route: pb::ObjectionRoute| pb::ObjectToPurposeRequest {
        subject_id: subject.id.clone(),
        purpose: "marketing".into(),
        route: route as i32,
    };
    let mut as_mailer = app.consent_under(&mailer, "marketing");
    // Only operators use the operator route.
    let err = as_mailer
        .object_to_purpose(object(pb::ObjectionRoute::Operator))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    as_mailer
        .object_to_purpose(object(pb::ObjectionRoute::UnsubscribeLink))
        .await
        .unwrap();
    let withdraw = pb::WithdrawObjectionRequest {
        subject_id: subject.id.clone(),
        purpose: "marketing".into(),
        route: pb::ObjectionRoute::UnsubscribeLink as i32,
    };
    let err = as_mailer
        .withdraw_objection(withdraw.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        mentions(err.message(), "marketing-mailer"),
        "{}",
        err.message()
    );
    // Still objected: the mailer cannot read the subject.
    let read = app
        .subjects_under(Some(&mailer), Some("marketing"), None)
        .get_subject(get_request(&subject.id, &[], pb::SubjectView::Basic))
        .await
        .unwrap_err();
    assert_eq!(read.code(), Code::FailedPrecondition);
    // The subject, through the account, can.
    let done = app
        .consent_under(&backend, "account")
        .withdraw_objection(pb::WithdrawObjectionRequest {
            route: pb::ObjectionRoute::Account as i32,
            ..withdraw
        })
        .await
        .unwrap()
        .into_inner();
    assert!(done.withdrawn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_seen_only_masked_cannot_be_used_to_look_subjects_up() {
    let app = spawn_kluis().await;
    let subject = app.create(full_subject(&tag())).await;
    let backend = app.token_for("backend", "hosting-backend").await;
    let mut client = app.subjects_under(Some(&backend), Some("account"), None);
    let err = client
        .find_subjects(pb::FindSubjectsRequest {
            key: Some(pb::find_subjects_request::Key::Iban(
                "NL91ABNA0417164300".into(),
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(mentions(err.message(), "payment.iban"), "{}", err.message());
    let email = subject.contact.unwrap().email;
    let found = client
        .find_subjects(find_by_email(&email))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.subject_ids, vec![subject.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reason_is_a_ticket_reference_not_a_note() {
    let app = spawn_kluis().await;
    let subject = app.create(full_subject(&tag())).await;
    for bad in ["Klant J. de Vries belde", "-1", "a\u{7f}b", &"x".repeat(65)] {
        let reason = tonic::metadata::MetadataValue::try_from(bad);
        let Ok(_) = reason else { continue };
        let err = app
            .subjects_under(
                Some(&app.operator_token),
                Some("subject-request"),
                Some(bad),
            )
            .get_subject(get_request(&subject.id, &[], pb::SubjectView::Basic))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
        assert_eq!(violation_fields(&err), vec!["x-kluis-reason"], "{bad:?}");
    }
    for good in ["TICKET-1234", "jira:PRIV-7", "4411", "zendesk/12_3.a#b"] {
        app.subjects_under(
            Some(&app.operator_token),
            Some("subject-request"),
            Some(good),
        )
        .get_subject(get_request(&subject.id, &[], pb::SubjectView::Basic))
        .await
        .unwrap_or_else(|e| panic!("{good}: {e:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_needs_a_purpose_that_may_write_every_path() {
    let app = spawn_kluis().await;
    let subject = app.create(full_subject(&tag())).await;
    let err = app
        .subjects_under(
            Some(&app.operator_token),
            Some("legal-demand"),
            Some(OPERATOR_REASON),
        )
        .erase_subject(pb::EraseSubjectRequest {
            id: subject.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    app.subjects()
        .erase_subject(pb::EraseSubjectRequest { id: subject.id })
        .await
        .unwrap();
}
