//! Prometheus metrics on their own plain-HTTP port: calls counted by method and status code and
//! timed, group-commit and audit batch sizes, database pool use — and no personal data anywhere.

use std::net::SocketAddr;

use kluis::api::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::helpers::{TestDb, full_subject, spawn_with, tag};

/// `GET path` over HTTP/1.1: the status code, the content type and the body.
pub(crate) async fn http_get(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// The value of the sample whose line starts with `name{` and holds every label in `labels`
/// (0 when absent: the recorder is shared by the instances of this test process).
pub(crate) fn sample(body: &str, name: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_and_time_calls_by_method_and_code_and_show_no_personal_data() {
    let db = TestDb::new().await;
    let app = spawn_with(db, |args| {
        args.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let metrics = app.metrics_addr.expect("a metrics listener");
    assert_ne!(metrics.port(), app.addr.port());

    let get_ok = [
        r#"method="kluis.v1.SubjectService/GetSubject""#,
        r#"code="OK""#,
    ];
    let get_missing = [
        r#"method="kluis.v1.SubjectService/GetSubject""#,
        r#"code="NOT_FOUND""#,
    ];
    let unauthenticated = [
        r#"method="kluis.v1.SubjectService/GetSubject""#,
        r#"code="UNAUTHENTICATED""#,
    ];
    let (_, _, before) = http_get(metrics, "GET", "/metrics").await;

    let t = tag();
    let created = app.create(full_subject(&t)).await;
    for _ in 0..3 {
        app.get(&created.id).await.unwrap();
    }
    let missing = app
        .get(&uuid::Uuid::new_v4().to_string())
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let refused = app
        .subjects_as(Some("kluis_0000000000000000_not-a-real-token"))
        .get_subject(pb::GetSubjectRequest {
            id: created.id.clone(),
            read_mask: None,
            view: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    let (status, content_type, after) = http_get(metrics, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let grew = |labels: &[&str]| {
        sample(&after, "kluis_grpc_requests_total", labels)
            - sample(&before, "kluis_grpc_requests_total", labels)
    };
    assert!(grew(&get_ok) >= 3.0, "{after}");
    assert!(grew(&get_missing) >= 1.0, "{after}");
    assert!(grew(&unauthenticated) >= 1.0, "{after}");
    assert!(
        sample(
            &after,
            "kluis_grpc_request_duration_seconds_count",
            &[r#"method="kluis.v1.SubjectService/GetSubject""#]
        ) >= 5.0,
        "{after}"
    );
    assert!(after.contains("# TYPE kluis_grpc_request_duration_seconds histogram"));
    // The create's transaction and its audit event; reads' audit events are committed too.
    assert!(
        sample(&after, "kluis_commit_batch_size_count", &[]) >= 1.0,
        "{after}"
    );
    assert!(
        sample(&after, "kluis_audit_batch_size_sum", &[]) >= 1.0,
        "{after}"
    );
    assert!(after.contains("kluis_db_pool_connections{pool="), "{after}");
    assert!(after.contains("kluis_keys_active_kek_version "), "{after}");

    // No value, id, token or caller of this test in any label or line.
    let contact = created.contact.clone().unwrap();
    for secret in [
        t.as_str(),
        created.id.as_str(),
        contact.email.as_str(),
        contact.phone.as_str(),
        "not-a-real-token",
        app.operator_token.as_str(),
    ] {
        assert!(!secret.is_empty());
        assert!(!after.contains(secret), "metrics show {secret}");
    }

    // Anything but GET /metrics is refused.
    assert_eq!(http_get(metrics, "GET", "/").await.0, 404);
    assert_eq!(http_get(metrics, "POST", "/metrics").await.0, 405);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_no_method_of_kluis_is_counted_as_unknown_with_or_without_a_token() {
    let db = TestDb::new().await;
    let app = spawn_with(db, |args| {
        args.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let metrics = app.metrics_addr.unwrap();
    let invented = format!("/kluis.v1.SubjectService/Invented{}", tag());
    // A gRPC call to a path no service answers: a unary call with an empty message.
    let mut grpc = tonic::client::Grpc::new(app.channel());
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", app.operator_token).parse().unwrap(),
    );
    let err = grpc
        .unary::<(), (), _>(
            request,
            http::uri::PathAndQuery::from_maybe_shared(invented.clone()).unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    // Without a token, to a path that is no method at all (text of the client's choosing):
    // refused by authentication before any routing, and not a label either.
    let mut anonymous = tonic::client::Grpc::new(app.channel());
    anonymous.ready().await.unwrap();
    let made_up = "/jan.jansen@example.nl/Anything";
    let err = anonymous
        .unary::<(), (), _>(
            tonic::Request::new(()),
            http::uri::PathAndQuery::from_static(made_up),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let (_, _, body) = http_get(metrics, "GET", "/metrics").await;
    assert!(!body.contains(&invented[1..]), "{body}");
    assert!(!body.contains("jan.jansen"), "{body}");
    assert!(
        sample(
            &body,
            "kluis_grpc_requests_total",
            &[r#"method="unknown""#, r#"code="UNAUTHENTICATED""#]
        ) >= 1.0,
        "{body}"
    );
    assert!(
        sample(
            &body,
            "kluis_grpc_requests_total",
            &[r#"method="unknown""#, r#"code="UNIMPLEMENTED""#]
        ) >= 1.0,
        "{body}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_metrics_address_no_metrics_port_is_opened() {
    let app = crate::helpers::spawn_kluis().await;
    assert!(app.metrics_addr.is_none());
    app.stop().await;
}
