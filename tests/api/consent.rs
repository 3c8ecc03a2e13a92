//! ConsentService and RecordActivity: the marketing audience with its unsubscribe tokens, redeeming
//! a token from a mail's link, objections and consent by route with their history, consent-based
//! purposes, and the portal's activity evidence — and none of it leaving a personal value in the
//! audit trail or the logs.

use std::collections::{BTreeMap, BTreeSet};

use kluis::api::pb::{self, consent_service_client::ConsentServiceClient};
use tokio::task::JoinSet;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::helpers::{
    Consent, OPERATOR_PURPOSE, OPERATOR_REASON, Subjects, TestApp, TestDb, captured_logs,
    full_subject, spawn_kluis, spawn_with, tag,
};

const LIST: &str = "kluis.v1.ConsentService/ListMarketingAudience";
const URL_SAFE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

// ---- helpers ------------------------------------------------------------------------------------

/// The id part of a caller token `kluis_<id>_<secret>` (what consent history and audit name).
fn caller_id(token: &str) -> String {
    token.split('_').nth(1).unwrap().to_owned()
}

/// ConsentService as the first operator, under `subject-request` with a reason.
fn operator_consent(app: &TestApp) -> Consent {
    ConsentServiceClient::with_interceptor(
        app.channel(),
        TestApp::bearer(
            Some(&app.operator_token),
            Some(OPERATOR_PURPOSE),
            Some(OPERATOR_REASON),
        ),
    )
}

/// Every message of one ListMarketingAudience stream, in order.
async fn listing(client: &Consent) -> Result<Vec<Vec<pb::MarketingRecipient>>, Status> {
    let mut stream = client
        .clone()
        .list_marketing_audience(pb::ListMarketingAudienceRequest {})
        .await?
        .into_inner();
    let mut pages = Vec::new();
    while let Some(page) = stream.message().await? {
        pages.push(page.recipients);
    }
    Ok(pages)
}

/// One listing as subject id -> recipient, checking that no subject is listed twice.
async fn audience(client: &Consent) -> BTreeMap<String, pb::MarketingRecipient> {
    let mut out = BTreeMap::new();
    for recipient in listing(client).await.unwrap().into_iter().flatten() {
        let id = recipient.subject_id.clone();
        assert!(
            out.insert(id.clone(), recipient).is_none(),
            "subject {id} listed twice in one listing"
        );
    }
    out
}

fn ids(audience: &BTreeMap<String, pb::MarketingRecipient>) -> BTreeSet<String> {
    audience.keys().cloned().collect()
}

fn is_unsubscribe_token(token: &str) -> bool {
    token.strip_prefix("ku1_").is_some_and(|body| {
        body.len() == 32
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// `ku1_` and 32 random URL-safe characters: a token of the right form that was never issued.
fn forged_token() -> String {
    let random: Vec<u8> = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()]
        .iter()
        .flat_map(|u| u.as_bytes().to_vec())
        .collect();
    let body: String = random
        .iter()
        .map(|b| URL_SAFE[usize::from(*b) % 64] as char)
        .collect();
    format!("ku1_{body}")
}

/// `token` with the character at `at` replaced by another URL-safe one.
fn with_one_character_changed(token: &str, at: usize) -> String {
    let mut bytes = token.as_bytes().to_vec();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap()
}

async fn history(app: &TestApp, id: &str) -> pb::GetConsentHistoryResponse {
    operator_consent(app)
        .get_consent_history(pb::GetConsentHistoryRequest {
            subject_id: id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// (purpose, action, route, caller) of every history entry, oldest first.
fn entries(history: &pb::GetConsentHistoryResponse) -> Vec<(String, i32, i32, String)> {
    history
        .events
        .iter()
        .map(|e| (e.purpose.clone(), e.action, e.route, e.caller.clone()))
        .collect()
}

fn entry(
    purpose: &str,
    action: pb::ConsentAction,
    route: pb::ObjectionRoute,
    caller: &str,
) -> (String, i32, i32, String) {
    (
        purpose.to_owned(),
        action as i32,
        route as i32,
        caller.to_owned(),
    )
}

fn object(id: &str, purpose: &str, route: pb::ObjectionRoute) -> pb::ObjectToPurposeRequest {
    pb::ObjectToPurposeRequest {
        subject_id: id.to_owned(),
        purpose: purpose.to_owned(),
        route: route as i32,
    }
}

fn withdraw(id: &str, purpose: &str, route: pb::ObjectionRoute) -> pb::WithdrawObjectionRequest {
    pb::WithdrawObjectionRequest {
        subject_id: id.to_owned(),
        purpose: purpose.to_owned(),
        route: route as i32,
    }
}

fn grant(id: &str, purpose: &str, route: pb::ObjectionRoute) -> pb::GrantConsentRequest {
    pb::GrantConsentRequest {
        subject_id: id.to_owned(),
        purpose: purpose.to_owned(),
        route: route as i32,
    }
}

fn withdraw_consent(
    id: &str,
    purpose: &str,
    route: pb::ObjectionRoute,
) -> pb::WithdrawConsentRequest {
    pb::WithdrawConsentRequest {
        subject_id: id.to_owned(),
        purpose: purpose.to_owned(),
        route: route as i32,
    }
}

/// GetSubject (every path the caller may read) with `client`.
async fn read(client: &Subjects, id: &str) -> Result<pb::Subject, Status> {
    client
        .clone()
        .get_subject(pb::GetSubjectRequest {
            id: id.to_owned(),
            read_mask: None,
            view: pb::SubjectView::Basic as i32,
        })
        .await
        .map(|r| r.into_inner().subject.unwrap())
}

fn email_of(subject: &pb::Subject) -> String {
    subject.contact.as_ref().unwrap().email.clone()
}

/// A subject with a name and an e-mail address only.
fn mailable(tag: &str) -> pb::Subject {
    let full = full_subject(tag);
    pb::Subject {
        name: full.name,
        contact: Some(pb::Contact {
            email: format!("Klant.{tag}@Example.nl"),
            phone: String::new(),
        }),
        ..Default::default()
    }
}

/// Creates `n` subjects with an e-mail address (eight at a time); returns id -> e-mail address.
async fn create_mailable(app: &TestApp, n: usize) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pending = JoinSet::new();
    for i in 0..n {
        let mut client = app.subjects();
        pending.spawn(async move {
            client
                .create_subject(pb::CreateSubjectRequest {
                    subject: Some(mailable(&format!("{i}x{}", tag()))),
                    source: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .subject
                .unwrap()
        });
        if pending.len() >= 8 {
            let s = pending.join_next().await.unwrap().unwrap();
            out.insert(s.id.clone(), email_of(&s));
        }
    }
    while let Some(s) = pending.join_next().await {
        let s = s.unwrap();
        out.insert(s.id.clone(), email_of(&s));
    }
    out
}

fn mentions(message: &str, word: &str) -> bool {
    message.to_lowercase().contains(&word.to_lowercase())
}

fn violation_fields(err: &Status) -> Vec<String> {
    err.get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

fn ts(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

// ---- 1. the marketing audience ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_marketing_audience_lists_every_subject_with_an_email_once_with_fresh_tokens_in_pages()
{
    let app = spawn_kluis().await;
    let mailer = app.token_for("mailer", "marketing-mailer").await;
    let hosting = app.token_for("portal-backend", "hosting-backend").await;
    let mut expected = create_mailable(&app, 230).await;
    let objector = app.create(full_subject(&tag())).await;
    let no_email = app
        .create(pb::Subject {
            contact: None,
            ..mailable(&tag())
        })
        .await;
    assert!(no_email.contact.is_none());
    let mut account = app.consent_under(&hosting, "account");
    account
        .object_to_purpose(object(
            &objector.id,
            "marketing",
            pb::ObjectionRoute::Account,
        ))
        .await
        .unwrap();
    let mailing = app.consent_under(&mailer, "marketing");

    let pages = listing(&mailing).await.unwrap();
    assert!(
        pages.len() >= 3,
        "230 subjects come in several messages, got {}",
        pages.len()
    );
    assert!(
        pages.iter().all(|p| p.len() <= 100),
        "at most 100 per message: {:?}",
        pages.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let first = audience(&mailing).await;
    let second = audience(&mailing).await;
    let mut listed_once = BTreeMap::new();
    for r in pages.iter().flatten() {
        assert!(
            listed_once
                .insert(r.subject_id.clone(), r.clone())
                .is_none(),
            "{} listed twice",
            r.subject_id
        );
    }
    for listed in [&listed_once, &first, &second] {
        assert_eq!(
            ids(listed),
            expected.keys().cloned().collect::<BTreeSet<_>>(),
            "every subject with an e-mail address, except the objector and the one without"
        );
        for (id, r) in listed.iter() {
            assert_eq!(&r.email, &expected[id], "{id}: its own e-mail address");
            assert!(
                is_unsubscribe_token(&r.unsubscribe_token),
                "{id}: token of the form ku1_ + 32 URL-safe characters: {:?}",
                r.unsubscribe_token
            );
        }
    }
    assert!(!listed_once.contains_key(&objector.id));
    assert!(!listed_once.contains_key(&no_email.id));

    // Fresh tokens on every listing: none repeats, within or across listings.
    let tokens: Vec<&String> = [&listed_once, &first, &second]
        .iter()
        .flat_map(|l| l.values().map(|r| &r.unsubscribe_token))
        .collect();
    let distinct: BTreeSet<&String> = tokens.iter().copied().collect();
    assert_eq!(distinct.len(), 3 * 230, "every token is new");
    assert_eq!(
        app.raw_count("SELECT COUNT(*) FROM unsubscribe_tokens")
            .await,
        3 * 230,
        "each issued token is stored (as a hash) so it can be redeemed"
    );

    // The audit trail: the listing's events name the listed subjects and the path read.
    let events: Vec<pb::AuditEvent> = app
        .audit_events(pb::QueryAuditLogRequest {
            method: LIST.into(),
            ..Default::default()
        })
        .await;
    assert!(
        events.len() >= 3 * 3,
        "one event per message of each listing, got {}",
        events.len()
    );
    let mut named = BTreeMap::<String, usize>::new();
    for e in &events {
        assert_eq!(e.outcome, "OK", "{e:?}");
        assert_eq!(e.purpose, "marketing");
        assert_eq!(e.role, "marketing-mailer");
        assert_eq!(e.caller, caller_id(&mailer));
        assert_eq!(e.read_paths, ["contact.email"], "{e:?}");
        for id in &e.subject_ids {
            *named.entry(id.clone()).or_default() += 1;
        }
    }
    assert_eq!(
        named.keys().cloned().collect::<BTreeSet<_>>(),
        ids(&first),
        "the events name exactly the listed subjects"
    );
    assert!(
        named.values().all(|n| *n == 3),
        "each listed subject named once per listing"
    );

    // The objector comes back once the objection is withdrawn.
    app.consent_under(&hosting, "portal")
        .withdraw_objection(withdraw(
            &objector.id,
            "marketing",
            pb::ObjectionRoute::Portal,
        ))
        .await
        .unwrap();
    expected.insert(objector.id.clone(), email_of(&objector));
    assert_eq!(
        ids(&audience(&mailing).await),
        expected.keys().cloned().collect::<BTreeSet<_>>()
    );

    // Only the mailer's role lists the audience (others do not act under marketing).
    let err = listing(&app.consent_under(&hosting, "account"))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "account is no opt-out purpose: {err:?}"
    );
    let err = listing(&app.consent_under(&hosting, "marketing"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

// ---- 2. redeeming an unsubscribe token ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeeming_an_unsubscribe_token_objects_once_and_forged_or_altered_tokens_change_nothing() {
    let app = spawn_kluis().await;
    let mailer = app.token_for("mailer", "marketing-mailer").await;
    let a = app.create(full_subject(&tag())).await;
    let b = app.create(full_subject(&tag())).await;
    let mailing = app.consent_under(&mailer, "marketing");
    let marketing = app.subjects_under(Some(&mailer), Some("marketing"), None);
    // The mailer's web front redeems the token of the link that was clicked.
    let mut front = app.consent_under(&mailer, "marketing");

    let earlier = audience(&mailing).await;
    let later = audience(&mailing).await;
    let both: BTreeSet<String> = [a.id.clone(), b.id.clone()].into();
    assert_eq!(ids(&earlier), both);
    let token = earlier[&a.id].unsubscribe_token.clone();
    assert_ne!(token, later[&a.id].unsubscribe_token);

    // Tokens that were never issued: NOT_FOUND, and nothing changes.
    let bad = [
        ("forged", forged_token()),
        ("truncated", token[..token.len() - 1].to_owned()),
        ("empty", String::new()),
        (
            "one character changed",
            with_one_character_changed(&token, 10),
        ),
        (
            "last character changed",
            with_one_character_changed(&token, token.len() - 1),
        ),
        ("without its prefix", token["ku1_".len()..].to_owned()),
    ];
    for (what, text) in &bad {
        assert_ne!(text, &token);
        let err = front
            .redeem_unsubscribe_token(pb::RedeemUnsubscribeTokenRequest {
                token: text.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{what}: {err:?}");
    }
    let before = history(&app, &a.id).await;
    assert!(
        before.events.is_empty(),
        "no entry from a bad token: {before:?}"
    );
    assert!(before.objected_purposes.is_empty());
    assert_eq!(ids(&audience(&mailing).await), both, "still listed");
    read(&marketing, &a.id).await.unwrap();

    // The real token (from an earlier mail) unsubscribes its subject, and only that subject.
    let redeemed = front
        .redeem_unsubscribe_token(pb::RedeemUnsubscribeTokenRequest {
            token: token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!redeemed.already_redeemed);
    assert_eq!(redeemed.purpose, "marketing");
    let now = audience(&mailing).await;
    assert_eq!(
        ids(&now),
        [b.id.clone()].into(),
        "the unsubscribed subject is no longer listed"
    );
    let err = read(&marketing, &a.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(mentions(err.message(), "marketing"), "{err:?}");
    read(&marketing, &b.id).await.unwrap();

    // Redeemed again (the link clicked twice): success, nothing new.
    let again = front
        .redeem_unsubscribe_token(pb::RedeemUnsubscribeTokenRequest {
            token: token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_redeemed);
    assert_eq!(again.purpose, "marketing");
    // Another mail's token of the same subject: no second objection either.
    let other = front
        .redeem_unsubscribe_token(pb::RedeemUnsubscribeTokenRequest {
            token: later[&a.id].unsubscribe_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.purpose, "marketing");

    let after = history(&app, &a.id).await;
    assert_eq!(
        entries(&after),
        [entry(
            "marketing",
            pb::ConsentAction::Object,
            pb::ObjectionRoute::UnsubscribeLink,
            &caller_id(&mailer),
        )],
        "exactly one objection, by the unsubscribe link"
    );
    assert_eq!(after.objected_purposes, ["marketing"]);
    assert!(after.events[0].time.is_some());
    assert!(history(&app, &b.id).await.events.is_empty());

    // Bad tokens after the redemption still change nothing.
    for (what, text) in &bad {
        let err = front
            .redeem_unsubscribe_token(pb::RedeemUnsubscribeTokenRequest {
                token: text.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{what}: {err:?}");
    }
    assert_eq!(entries(&history(&app, &a.id).await), entries(&after));
    assert_eq!(ids(&audience(&mailing).await), [b.id.clone()].into());
}

// ---- 3. objections and their history ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_history_records_objections_and_withdrawals_by_route_in_order_with_the_caller() {
    let app = spawn_kluis().await;
    let mailer = app.token_for("mailer", "marketing-mailer").await;
    let hosting = app.token_for("portal-backend", "hosting-backend").await;
    let subject = app.create(full_subject(&tag())).await;
    let id = subject.id.clone();
    let mailing = app.consent_under(&mailer, "marketing");
    let mut account = app.consent_under(&hosting, "account");
    let mut portal = app.consent_under(&hosting, "portal");
    let mut as_mailer = app.consent_under(&mailer, "marketing");
    let mut operator = operator_consent(&app);
    let listed =
        |mailing: Consent, id: String| async move { audience(&mailing).await.contains_key(&id) };
    let second = || app.clock.advance_us(1_000_000);

    assert!(listed(mailing.clone(), id.clone()).await);
    assert!(history(&app, &id).await.events.is_empty());

    // Through the account.
    let objected = account
        .object_to_purpose(object(&id, "marketing", pb::ObjectionRoute::Account))
        .await
        .unwrap()
        .into_inner();
    assert!(!objected.already_objected);
    assert!(!listed(mailing.clone(), id.clone()).await);
    second();

    // Withdrawn through the portal: listed again.
    let withdrawn = portal
        .withdraw_objection(withdraw(&id, "marketing", pb::ObjectionRoute::Portal))
        .await
        .unwrap()
        .into_inner();
    assert!(withdrawn.withdrawn);
    assert!(listed(mailing.clone(), id.clone()).await);
    let nothing = portal
        .withdraw_objection(withdraw(&id, "marketing", pb::ObjectionRoute::Portal))
        .await
        .unwrap()
        .into_inner();
    assert!(!nothing.withdrawn, "nothing left to withdraw, no entry");
    second();

    // The unsubscribe link (the mailer), which the mailer cannot take back.
    as_mailer
        .object_to_purpose(object(
            &id,
            "marketing",
            pb::ObjectionRoute::UnsubscribeLink,
        ))
        .await
        .unwrap();
    for route in [
        pb::ObjectionRoute::UnsubscribeLink,
        pb::ObjectionRoute::Account,
    ] {
        let err = as_mailer
            .withdraw_objection(withdraw(&id, "marketing", route))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{route:?}: {err:?}");
    }
    assert!(!listed(mailing.clone(), id.clone()).await, "still objected");
    second();

    // Refused: an objection against a legal obligation, and consent for an opt-out purpose.
    let err = account
        .object_to_purpose(object(&id, "order", pb::ObjectionRoute::Account))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(mentions(err.message(), "legal-obligation"), "{err:?}");
    let err = account
        .grant_consent(grant(&id, "marketing", pb::ObjectionRoute::Account))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "marketing is opt-out in the shipped policy: {err:?}"
    );

    // An operator withdraws it on the subject's request.
    let withdrawn = operator
        .withdraw_objection(withdraw(&id, "marketing", pb::ObjectionRoute::Operator))
        .await
        .unwrap()
        .into_inner();
    assert!(withdrawn.withdrawn);
    assert!(listed(mailing.clone(), id.clone()).await);

    let got = history(&app, &id).await;
    let backend = caller_id(&hosting);
    assert_eq!(
        entries(&got),
        [
            entry(
                "marketing",
                pb::ConsentAction::Object,
                pb::ObjectionRoute::Account,
                &backend
            ),
            entry(
                "marketing",
                pb::ConsentAction::WithdrawObjection,
                pb::ObjectionRoute::Portal,
                &backend
            ),
            entry(
                "marketing",
                pb::ConsentAction::Object,
                pb::ObjectionRoute::UnsubscribeLink,
                &caller_id(&mailer)
            ),
            entry(
                "marketing",
                pb::ConsentAction::WithdrawObjection,
                pb::ObjectionRoute::Operator,
                &caller_id(&app.operator_token)
            ),
        ],
        "every change, in order, with route and caller; refusals and no-ops add nothing"
    );
    let times: Vec<i64> = got
        .events
        .iter()
        .map(|e| e.time.as_ref().unwrap().seconds)
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "each entry at the time it was made: {times:?}"
    );
    assert!(got.objected_purposes.is_empty());
    assert!(got.consented_purposes.is_empty());

    // The subject's own routes show the same history; the mailer sees none of it.
    let via_portal = portal
        .get_consent_history(pb::GetConsentHistoryRequest {
            subject_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(entries(&via_portal), entries(&got));
    let err = as_mailer
        .get_consent_history(pb::GetConsentHistoryRequest {
            subject_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

// ---- 4. consent-based purposes ------------------------------------------------------------------

/// A server whose policy makes `marketing` consent-based (the shipped policy, edited as an
/// operator would: a copy with legal basis and objection changed).
async fn spawn_with_consent_based_marketing() -> TestApp {
    let opt_out = "legal_basis = \"legitimate-interest\"\nobjection = \"opt-out\"";
    assert_eq!(
        kluis::policy::DEFAULT_TOML.matches(opt_out).count(),
        1,
        "the shipped policy has one opt-out purpose, marketing"
    );
    let text = kluis::policy::DEFAULT_TOML
        .replace(
            opt_out,
            "legal_basis = \"consent\"\nobjection = \"consent\"",
        )
        .replace("version = \"2019-08.1\"", "version = \"2019-08.1-consent\"");
    let db = TestDb::new().await;
    let path = db.data_dir().join("consent-policy.toml");
    std::fs::write(&path, text).unwrap();
    spawn_with(db, |args| args.policy = Some(path)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consent_based_purpose_reads_and_lists_only_subjects_whose_consent_is_in_force() {
    let app = spawn_with_consent_based_marketing().await;
    let mailer = app.token_for("mailer", "marketing-mailer").await;
    let hosting = app.token_for("portal-backend", "hosting-backend").await;
    let a = app.create(full_subject(&tag())).await;
    let b = app.create(full_subject(&tag())).await;
    let c = app.create(full_subject(&tag())).await;
    let marketing = app.subjects_under(Some(&mailer), Some("marketing"), None);
    let mailing = app.consent_under(&mailer, "marketing");
    let mut account = app.consent_under(&hosting, "account");
    let mut portal = app.consent_under(&hosting, "portal");
    let mut as_mailer = app.consent_under(&mailer, "marketing");

    // No consent yet: no read, nobody listed.
    for s in [&a, &b, &c] {
        let err = read(&marketing, &s.id).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(mentions(err.message(), "consent"), "{err:?}");
    }
    assert!(audience(&mailing).await.is_empty());

    // Consent through the account (a) and the portal (b).
    let granted = account
        .grant_consent(grant(&a.id, "marketing", pb::ObjectionRoute::Account))
        .await
        .unwrap()
        .into_inner();
    assert!(!granted.already_granted);
    assert!(granted.grant_time.is_some());
    let twice = account
        .grant_consent(grant(&a.id, "marketing", pb::ObjectionRoute::Account))
        .await
        .unwrap()
        .into_inner();
    assert!(twice.already_granted, "granting twice is not an error");
    assert_eq!(twice.grant_time, granted.grant_time);
    portal
        .grant_consent(grant(&b.id, "marketing", pb::ObjectionRoute::Portal))
        .await
        .unwrap();

    let got = read(&marketing, &a.id).await.unwrap();
    assert_eq!(email_of(&got), email_of(&a));
    assert!(got.name.is_none(), "still only the e-mail address");
    read(&marketing, &b.id).await.unwrap();
    let err = read(&marketing, &c.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let listed = audience(&mailing).await;
    assert_eq!(ids(&listed), [a.id.clone(), b.id.clone()].into());
    assert_eq!(listed[&a.id].email, email_of(&a));

    // The mailer cannot grant consent; consent for a purpose that is not consent-based is refused.
    let err = as_mailer
        .grant_consent(grant(&c.id, "marketing", pb::ObjectionRoute::Account))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    for purpose in ["order", "account"] {
        let err = account
            .grant_consent(grant(&c.id, purpose, pb::ObjectionRoute::Account))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{purpose}: {err:?}");
    }
    assert!(history(&app, &c.id).await.events.is_empty());
    assert!(!audience(&mailing).await.contains_key(&c.id));

    // Withdrawn: reads stop at once, and a is no longer listed.
    let withdrawn = account
        .withdraw_consent(withdraw_consent(
            &a.id,
            "marketing",
            pb::ObjectionRoute::Account,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(withdrawn.withdrawn);
    let err = read(&marketing, &a.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(mentions(err.message(), "consent"), "{err:?}");
    assert_eq!(ids(&audience(&mailing).await), [b.id.clone()].into());
    let nothing = account
        .withdraw_consent(withdraw_consent(
            &a.id,
            "marketing",
            pb::ObjectionRoute::Account,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!nothing.withdrawn);

    let backend = caller_id(&hosting);
    let of_a = history(&app, &a.id).await;
    assert_eq!(
        entries(&of_a),
        [
            entry(
                "marketing",
                pb::ConsentAction::Grant,
                pb::ObjectionRoute::Account,
                &backend
            ),
            entry(
                "marketing",
                pb::ConsentAction::WithdrawConsent,
                pb::ObjectionRoute::Account,
                &backend
            ),
        ]
    );
    assert!(of_a.consented_purposes.is_empty());
    assert_eq!(history(&app, &b.id).await.consented_purposes, ["marketing"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_consent_based_purpose_the_unsubscribe_link_and_an_objection_end_the_consent() {
    let app = spawn_with_consent_based_marketing().await;
    let mailer = app.token_for("mailer", "marketing-mailer").await;
    let hosting = app.token_for("portal-backend", "hosting-backend").await;
    let a = app.create(full_subject(&tag())).await;
    let b = app.create(full_subject(&tag())).await;
    let c = app.create(full_subject(&tag())).await;
    let marketing = app.subjects_under(Some(&mailer), Some("marketing"), None);
    let mailing = app.consent_under(&mailer, "marketing");
    let mut front = app.consent_under(&mailer, "marketing");
    let mut account = app.consent_under(&hosting, "account");
    let mut portal = app.consent_under(&hosting, "portal");
    for s in [&a, &b, &c] {
        account
            .grant_consent(grant(&s.id, "marketing", pb::ObjectionRoute::Account))
            .await
            .unwrap();
    }
    let listed = audience(&mailing).await;
    assert_eq!(
        ids(&listed),
        [a.id.clone(), b.id.clone(), c.id.clone()].into()
    );

    // The link in a mail: a is no longer mailed or read under marketing.
    let redeemed = front
        .redeem_unsubscribe_token(pb::RedeemUnsubscribeTokenRequest {
            token: listed[&a.id].unsubscribe_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!redeemed.already_redeemed);
    assert_eq!(redeemed.purpose, "marketing");
    assert_eq!(
        ids(&audience(&mailing).await),
        [b.id.clone(), c.id.clone()].into(),
        "the unsubscribed subject is no longer mailed"
    );
    let err = read(&marketing, &a.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    read(&marketing, &b.id).await.unwrap();
    let backend = caller_id(&hosting);
    let link = caller_id(&mailer);
    let got = history(&app, &a.id).await;
    assert!(
        got.consented_purposes.is_empty(),
        "no consent in force after the link: {got:?}"
    );
    assert_eq!(
        entries(&got),
        [
            entry(
                "marketing",
                pb::ConsentAction::Grant,
                pb::ObjectionRoute::Account,
                &backend
            ),
            entry(
                "marketing",
                pb::ConsentAction::Object,
                pb::ObjectionRoute::UnsubscribeLink,
                &link
            ),
            entry(
                "marketing",
                pb::ConsentAction::WithdrawConsent,
                pb::ObjectionRoute::UnsubscribeLink,
                &link
            ),
        ]
    );
    // The same link again changes nothing.
    let again = front
        .redeem_unsubscribe_token(pb::RedeemUnsubscribeTokenRequest {
            token: listed[&a.id].unsubscribe_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_redeemed);
    assert_eq!(history(&app, &a.id).await.events.len(), 3);

    // Consent given again through the portal, then the link of a later mail: ended again.
    portal
        .grant_consent(grant(&a.id, "marketing", pb::ObjectionRoute::Portal))
        .await
        .unwrap();
    let later = audience(&mailing).await;
    assert!(later.contains_key(&a.id), "mailed again after new consent");
    let regranted = history(&app, &a.id).await;
    assert!(
        regranted.objected_purposes.is_empty(),
        "the new consent supersedes the objection: {regranted:?}"
    );
    assert_eq!(
        entries(&regranted)[3..],
        [
            entry(
                "marketing",
                pb::ConsentAction::Grant,
                pb::ObjectionRoute::Portal,
                &backend
            ),
            entry(
                "marketing",
                pb::ConsentAction::WithdrawObjection,
                pb::ObjectionRoute::Portal,
                &backend
            ),
        ]
    );
    front
        .redeem_unsubscribe_token(pb::RedeemUnsubscribeTokenRequest {
            token: later[&a.id].unsubscribe_token.clone(),
        })
        .await
        .unwrap();
    assert!(!audience(&mailing).await.contains_key(&a.id));
    read(&marketing, &a.id).await.unwrap_err();
    assert!(history(&app, &a.id).await.consented_purposes.is_empty());

    // An objection through the account ends b's consent the same way.
    account
        .object_to_purpose(object(&b.id, "marketing", pb::ObjectionRoute::Account))
        .await
        .unwrap();
    let err = read(&marketing, &b.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(ids(&audience(&mailing).await), [c.id.clone()].into());
    let of_b = history(&app, &b.id).await;
    assert!(of_b.consented_purposes.is_empty(), "{of_b:?}");
    assert_eq!(of_b.objected_purposes, ["marketing"]);
    assert_eq!(
        entries(&of_b)[1..],
        [
            entry(
                "marketing",
                pb::ConsentAction::Object,
                pb::ObjectionRoute::Account,
                &backend
            ),
            entry(
                "marketing",
                pb::ConsentAction::WithdrawConsent,
                pb::ObjectionRoute::Account,
                &backend
            ),
        ]
    );
    read(&marketing, &c.id).await.unwrap();
}

// ---- 5. portal activity -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_activity_appends_portal_evidence_in_order_and_refuses_bad_input_and_other_roles() {
    let app = spawn_kluis().await;
    let hosting = app.token_for("portal-backend", "hosting-backend").await;
    let billing = app.token_for("facturatie", "billing").await;
    let mailer = app.token_for("mailer", "marketing-mailer").await;
    let subject = app.create(mailable(&tag())).await;
    let id = subject.id.clone();
    let portal_read = app.subjects_under(Some(&hosting), Some("portal"), None);
    let mut portal = app.subjects_under(Some(&hosting), Some("portal"), None);
    let record = |id: &str, action: &str, seconds: i64, ip: &str| pb::RecordActivityRequest {
        subject_id: id.to_owned(),
        entry: Some(pb::ActivityEntry {
            action: action.to_owned(),
            time: Some(ts(seconds)),
            ip_address: ip.to_owned(),
        }),
    };
    let expected = vec![
        pb::ActivityEntry {
            action: "login".into(),
            time: Some(ts(1_700_000_100)),
            ip_address: "198.51.100.23".into(),
        },
        pb::ActivityEntry {
            action: "dns-record-changed".into(),
            time: Some(ts(1_700_000_200)),
            ip_address: "2001:db8:1::23".into(),
        },
        pb::ActivityEntry {
            action: "logout".into(),
            time: Some(ts(1_700_000_300)),
            ip_address: "198.51.100.23".into(),
        },
    ];

    let mut version = subject.version;
    for (n, e) in expected.iter().enumerate() {
        let done = portal
            .record_activity(pb::RecordActivityRequest {
                subject_id: id.clone(),
                entry: Some(e.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(done.entries as usize, n + 1);
        assert!(done.version > version, "each append is a new version");
        version = done.version;
    }
    let got = read(&portal_read, &id).await.unwrap();
    assert_eq!(got.activity_log, expected, "every entry, in order");
    assert_eq!(got.version, version);
    assert_eq!(
        app.get(&id).await.unwrap().activity_log,
        expected,
        "the operator reads the same evidence"
    );

    // A bad IP address: INVALID_ARGUMENT naming the field, nothing appended.
    let err = portal
        .record_activity(record(&id, "login", 1_700_000_400, "198.51.100.300"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        violation_fields(&err),
        ["activity_log[0].ip_address"],
        "{err:?}"
    );
    let err = portal
        .record_activity(pb::RecordActivityRequest {
            subject_id: id.clone(),
            entry: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "no entry: {err:?}");

    // Roles or purposes that may not write activity_log.
    for (token, purpose) in [
        (&billing, "order"),
        (&mailer, "marketing"),
        (&hosting, "account"),
    ] {
        let err = app
            .subjects_under(Some(token), Some(purpose), None)
            .record_activity(record(&id, "login", 1_700_000_500, "198.51.100.24"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{purpose}: {err:?}");
    }

    // An unknown subject.
    let err = portal
        .record_activity(record(
            &uuid::Uuid::new_v4().to_string(),
            "login",
            1_700_000_600,
            "198.51.100.25",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    let after = read(&portal_read, &id).await.unwrap();
    assert_eq!(
        after.activity_log, expected,
        "the refused calls changed nothing"
    );
    assert_eq!(after.version, version);

    let events = app
        .audit_events(pb::QueryAuditLogRequest {
            subject_id: id.clone(),
            method: "kluis.v1.SubjectService/RecordActivity".into(),
            outcome: "OK".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(events.len(), 3, "{events:#?}");
    assert!(
        events
            .iter()
            .all(|e| e.written_paths == ["activity_log"] && e.purpose == "portal"),
        "{events:#?}"
    );
}

// ---- 6. no personal value in the audit trail or the logs ----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_calls_leave_no_email_ip_address_or_token_in_the_audit_trail_or_the_logs() {
    let app = spawn_kluis().await;
    let mailer = app.token_for("mailer", "marketing-mailer").await;
    let hosting = app.token_for("portal-backend", "hosting-backend").await;
    let canary = format!("Canary{}", tag());
    let a = app.create(mailable(&canary)).await;
    let b = app.create(mailable(&format!("{canary}b"))).await;
    let mailing = app.consent_under(&mailer, "marketing");
    let mut front = app.consent_under(&mailer, "marketing");
    let mut portal = app.subjects_under(Some(&hosting), Some("portal"), None);

    let listed = audience(&mailing).await;
    assert_eq!(ids(&listed), [a.id.clone(), b.id.clone()].into());
    let tokens: Vec<String> = listed
        .values()
        .map(|r| r.unsubscribe_token.clone())
        .collect();
    let forged = forged_token();
    let of_a = &listed[&a.id].unsubscribe_token;
    for token in [of_a, of_a, &forged] {
        let _ = front
            .redeem_unsubscribe_token(pb::RedeemUnsubscribeTokenRequest {
                token: token.clone(),
            })
            .await;
    }
    let mut account = app.consent_under(&hosting, "account");
    account
        .object_to_purpose(object(&b.id, "marketing", pb::ObjectionRoute::Account))
        .await
        .unwrap();
    account
        .withdraw_objection(withdraw(&b.id, "marketing", pb::ObjectionRoute::Account))
        .await
        .unwrap();
    let ips = ["203.0.113.177", "2001:db8:c0ff:ee::177"];
    for ip in ips {
        portal
            .record_activity(pb::RecordActivityRequest {
                subject_id: a.id.clone(),
                entry: Some(pb::ActivityEntry {
                    action: "login".into(),
                    time: Some(ts(1_700_000_000)),
                    ip_address: ip.into(),
                }),
            })
            .await
            .unwrap();
    }
    let bad_ip = "203.0.113.1777";
    let err = portal
        .record_activity(pb::RecordActivityRequest {
            subject_id: a.id.clone(),
            entry: Some(pb::ActivityEntry {
                action: "login".into(),
                time: Some(ts(1_700_000_000)),
                ip_address: bad_ip.into(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let _ = read(&portal, &a.id).await.unwrap();
    let _ = history(&app, &a.id).await;

    let stored = app.audit_bodies().await;
    let queried = format!("{:?}", app.audit_events(Default::default()).await);
    assert!(
        stored.contains("contact.email") && stored.contains("activity_log"),
        "the trail names the paths"
    );
    assert!(stored.contains(&a.id) || queried.contains(&a.id));
    let logs = captured_logs();
    assert!(
        logs.contains(&a.id),
        "the logs of this server are captured (they name subject ids)"
    );
    let mut canaries: Vec<String> = vec![
        canary.to_lowercase(),
        email_of(&a).to_lowercase(),
        email_of(&b).to_lowercase(),
        ips[0].into(),
        ips[1].into(),
        bad_ip.into(),
        forged.to_lowercase(),
        forged["ku1_".len()..].to_lowercase(),
    ];
    for t in &tokens {
        canaries.push(t.to_lowercase());
        canaries.push(t["ku1_".len()..].to_lowercase());
    }
    for (what, text) in [
        ("stored audit bodies", &stored),
        ("queried audit events", &queried),
        ("logs", &logs),
    ] {
        let lower = text.to_lowercase();
        for value in &canaries {
            assert!(
                !lower.contains(value.as_str()),
                "{what} hold a personal value or token ({} characters)",
                value.len()
            );
        }
    }
}

#[tokio::test]
async fn an_unsubscribe_token_past_its_validity_is_refused_and_pruned() {
    let app = spawn_kluis().await;
    let mailer = app.token_for("mailer", "marketing-mailer").await;
    let a = app.create(full_subject(&tag())).await;
    let mailing = app.consent_under(&mailer, "marketing");
    let old = audience(&mailing).await[&a.id].unsubscribe_token.clone();
    // 400 days by default: a token of 399 days ago still works (redeemed below), one of 401
    // days ago does not.
    app.clock.advance_us(2 * 86_400_000_000);
    let fresh = audience(&mailing).await[&a.id].unsubscribe_token.clone();
    app.clock.advance_us(399 * 86_400_000_000);
    let mut front = app.consent_under(&mailer, "marketing");
    let expired = front
        .redeem_unsubscribe_token(pb::RedeemUnsubscribeTokenRequest { token: old })
        .await
        .unwrap_err();
    assert_eq!(expired.code(), Code::NotFound);
    assert!(
        history(&app, &a.id).await.events.is_empty(),
        "nothing changed"
    );
    assert_eq!(
        app.raw_count("SELECT COUNT(*) FROM unsubscribe_tokens")
            .await,
        2
    );
    assert_eq!(
        app.consent.prune_tokens().await.unwrap(),
        1,
        "only the expired one"
    );
    assert_eq!(
        app.raw_count("SELECT COUNT(*) FROM unsubscribe_tokens")
            .await,
        1
    );
    front
        .redeem_unsubscribe_token(pb::RedeemUnsubscribeTokenRequest { token: fresh })
        .await
        .unwrap();
    assert_eq!(history(&app, &a.id).await.objected_purposes, ["marketing"]);
    // The trail names the subject of a redemption (the caller is never told it); the expired
    // token's refusal could not, and does not, name anyone.
    let redeemed = app
        .audit_events(pb::QueryAuditLogRequest {
            subject_id: a.id.clone(),
            method: "kluis.v1.ConsentService/RedeemUnsubscribeToken".into(),
            ..Default::default()
        })
        .await;
    let outcomes: Vec<&str> = redeemed.iter().map(|e| e.outcome.as_str()).collect();
    assert_eq!(outcomes, ["OK"], "{redeemed:?}");
}
