//! Limits: a token-guessing client address is refused after its failed authentications while
//! other clients behind the same trusted proxy are served; `x-forwarded-for` is believed only
//! from a trusted proxy; successful calls never count; the refusal ends with the window; a call
//! without a deadline is cut off at the server's default; calls beyond the concurrency limit wait;
//! calls beyond what one connection carries wait at the client.

use std::time::Duration;

use kluis::{
    ServeArgs,
    api::pb::{self, subject_service_client::SubjectServiceClient},
};
use tonic::{Code, Status, transport::Channel};

use crate::helpers::{OPERATOR_PURPOSE, TestApp, TestDb, full_subject, spawn_with, tag};

const BAD: &str =
    "kluis_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000";

/// GetSubject of `id` with `token`, as if forwarded for `client` by a proxy.
async fn get_as(app: &TestApp, id: &str, token: &str, client: Option<&str>) -> Result<(), Status> {
    get_on(app.channel(), id, token, client).await.map(drop)
}

/// [`get_as`] on `channel`, with the answer.
async fn get_on(
    channel: Channel,
    id: &str,
    token: &str,
    client: Option<&str>,
) -> Result<pb::Subject, Status> {
    let mut request = tonic::Request::new(pb::GetSubjectRequest {
        id: id.to_owned(),
        read_mask: None,
        view: 0,
    });
    let md = request.metadata_mut();
    md.insert("authorization", format!("Bearer {token}").parse().unwrap());
    md.insert("x-kluis-purpose", OPERATOR_PURPOSE.parse().unwrap());
    md.insert("x-kluis-reason", "T-1".parse().unwrap());
    if let Some(client) = client {
        md.insert("x-forwarded-for", client.parse().unwrap());
    }
    SubjectServiceClient::new(channel)
        .get_subject(request)
        .await
        .map(|r| r.into_inner().subject.unwrap_or_default())
}

async fn spawn_limited(limit: u32, window_s: u64, proxies: &[&str]) -> (TestApp, String) {
    let proxies: Vec<String> = proxies.iter().map(|p| (*p).to_owned()).collect();
    let app = spawn_with(TestDb::new().await, move |args| {
        args.limits.auth_failure_limit = limit;
        args.limits.trusted_proxies = proxies;
        args.audit.auth_failure_window_seconds = window_s;
    })
    .await;
    let id = app.create(full_subject(&tag())).await.id;
    (app, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guessing_client_behind_a_trusted_proxy_is_refused_while_its_neighbours_are_served() {
    let (app, id) = spawn_limited(3, 60, &["127.0.0.1"]).await;
    let token = app.operator_token.clone();
    let guesser = Some("198.51.100.1, 203.0.113.9");
    for _ in 0..3 {
        let err = get_as(&app, &id, BAD, guesser).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    // The limit is used up: refused before the token is looked at, a valid one included.
    for token in [BAD, token.as_str()] {
        let err = get_as(&app, &id, token, guesser).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("too many failed authentications"));
    }
    // Another client of the same proxy: served, and its own failure is only that.
    let neighbour = Some("203.0.113.10");
    get_as(&app, &id, &token, neighbour).await.unwrap();
    let err = get_as(&app, &id, BAD, neighbour).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // The proxy's own calls (no header) are not the guesser's either.
    get_as(&app, &id, &token, None).await.unwrap();

    // The audit trail names the client behind the proxy, not the proxy (the first failure of an
    // address is recorded at once, in the background).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = app
            .audit_events(pb::QueryAuditLogRequest {
                method: "auth.failed".into(),
                page_size: 100,
                ..Default::default()
            })
            .await;
        assert!(events.iter().all(|e| e.peer != "127.0.0.1"), "{events:#?}");
        let peers: Vec<&str> = events.iter().map(|e| e.peer.as_str()).collect();
        if peers.contains(&"203.0.113.9") && peers.contains(&"203.0.113.10") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{events:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_from_a_peer_that_is_not_a_trusted_proxy_changes_nothing() {
    let (app, id) = spawn_limited(2, 60, &[]).await;
    for client in ["203.0.113.1", "203.0.113.2"] {
        let err = get_as(&app, &id, BAD, Some(client)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    // Both were 127.0.0.1's failures: a third made-up address does not get a fresh count.
    let err = get_as(&app, &id, BAD, Some("203.0.113.3"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successful_calls_never_count_and_the_refusal_ends_with_the_window() {
    let (app, id) = spawn_limited(2, 1, &[]).await;
    let token = app.operator_token.clone();
    for _ in 0..30 {
        get_as(&app, &id, &token, None).await.unwrap();
    }
    let err = get_as(&app, &id, BAD, None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "30 successes counted");
    get_as(&app, &id, &token, None).await.unwrap();
    let err = get_as(&app, &id, BAD, None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = get_as(&app, &id, &token, None).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // The window (1 s) ends: served again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match get_as(&app, &id, &token, None).await {
            Ok(()) => break,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(std::time::Instant::now() < deadline, "still refused");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    app.stop().await;
}

/// A server (further set up by `configure`) whose sweep at the background rate, 1 subject/s,
/// has `due` subjects to purge, so it takes `due - 1` seconds or more.
async fn slow_sweep(due: usize, configure: impl FnOnce(&mut ServeArgs)) -> TestApp {
    let app = spawn_with(TestDb::new().await, |args| {
        args.retention.sweep_seconds = 0;
        args.retention.sweep_rate = 1;
        args.retention.sweep_batch = 1;
        configure(args);
    })
    .await;
    let billing = app.token_for("facturatie", "billing").await;
    for i in 0..due {
        crate::retention::completed_order(&app, &billing, &format!("INV-S{i}")).await;
    }
    app.clock.advance_us(8 * 366 * 86_400 * 1_000_000);
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_a_deadline_is_cut_off_at_the_server_default() {
    // The sweep at the background rate (1 subject/s) over 5 due subjects needs 4 s or more; the
    // server gives a call 1 s.
    let app = slow_sweep(5, |args| {
        args.limits.request_timeout_seconds = 1;
        args.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let started = std::time::Instant::now();
    let err = app
        .retention()
        .sweep(pb::SweepRequest {
            at_background_rate: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{err:?}"
    );
    assert!(
        took < Duration::from_millis(3500),
        "answered after {took:?}"
    );
    // The call cut off is counted all the same.
    let (_, _, body) = crate::metrics::http_get(app.metrics_addr.unwrap(), "GET", "/metrics").await;
    assert!(
        crate::metrics::sample(
            &body,
            "kluis_grpc_requests_total",
            &[
                r#"method="kluis.v1.RetentionService/Sweep""#,
                r#"code="CANCELLED""#
            ]
        ) >= 1.0,
        "{body}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_the_concurrency_limit_wait_for_a_free_slot() {
    // One slot; a sweep at 1 subject/s over 3 due subjects holds it for 2 s or more.
    let app = slow_sweep(3, |args| args.limits.max_concurrent_requests = 1).await;
    let sweep = {
        let retention = app.retention();
        tokio::spawn(async move {
            retention
                .clone()
                .sweep(pb::SweepRequest {
                    at_background_rate: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        })
    };
    // The sweep holds the slot once its first subject is gone (the next comes a second later):
    // wait for that rather than for a fixed time, which a loaded machine can outlast.
    let purges = "SELECT count(*) FROM audit_events WHERE method LIKE 'kluis.retention/%'";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while app.raw_count(purges).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sweep purged nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A health check (milliseconds of work) arriving while the sweep holds the only slot is
    // served only once the sweep call has finished: all three purges and the Sweep call's own
    // audit event (written before its slot is freed) are in the trail by the time it answers.
    // (Which of the two answers reaches its client first is a race, so the test does not look.)
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    let sweep_calls =
        "SELECT count(*) FROM audit_events WHERE method = 'kluis.v1.RetentionService/Sweep'";
    assert_eq!(
        (
            app.raw_count(purges).await,
            app.raw_count(sweep_calls).await
        ),
        (3, 1),
        "health was answered while the sweep still held the only slot"
    );
    let swept = sweep.await.unwrap();
    assert_eq!(
        swept.subjects_purged + swept.subjects_shredded,
        3,
        "{swept:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_calls_at_once_than_one_connection_carries_are_all_answered_in_turn() {
    // The server lets one HTTP/2 connection carry MAX_STREAMS_PER_CONNECTION calls at once; a
    // client starting more on one connection has the rest wait at its end, none refused. (The
    // client learns the limit from the server's SETTINGS: one call first, so the burst does not
    // race them on a brand-new connection, where the client assumes 100.)
    let app = crate::helpers::spawn_kluis().await;
    let id = app.create(full_subject(&tag())).await.id;
    let channel = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect_lazy();
    let token = app.operator_token.clone();
    get_on(channel.clone(), &id, &token, None).await.unwrap();
    let calls = 3 * kluis::api::MAX_STREAMS_PER_CONNECTION as usize;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..calls {
        let (channel, id, token) = (channel.clone(), id.clone(), token.clone());
        tasks.spawn(async move { get_on(channel, &id, &token, None).await });
    }
    let mut answered = 0;
    while let Some(result) = tasks.join_next().await {
        let subject = result
            .unwrap()
            .unwrap_or_else(|e| panic!("a call failed: {e:?}"));
        assert_eq!(subject.id, id);
        answered += 1;
    }
    assert_eq!(answered, calls);
    app.stop().await;
}
