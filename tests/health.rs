//! The built-in health method: per service, and NOT_SERVING from the moment a drain starts.

mod support;

use std::time::Duration;

use bytes::Bytes;
use towerpc::codec::Message;
use towerpc::server::health::{ServingStatus, HEALTH_METHOD};
use towerpc::{Client, Code, Server};

const BOUND: Duration = Duration::from_secs(10);

fn check(id: u32, service: &str) -> Message {
    Message::Request {
        id,
        timeout_ms: 0,
        method: Bytes::from_static(HEALTH_METHOD.as_bytes()),
        metadata: Bytes::new(),
        body: support::msgpack(&service),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn health_answers_per_service() {
    let server = Server::builder();
    let handle = server.handle();
    let running = support::serve(server, support::echo()).await;
    let client = Client::connect(running.addr).await.unwrap();

    let whole: ServingStatus = client.invoke(HEALTH_METHOD, "").await.unwrap();
    assert_eq!(whole, ServingStatus::Serving);
    let err = client
        .invoke::<_, ServingStatus>(HEALTH_METHOD, "Users")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err:?}");
    // A name a megabyte long is quoted by its start: the reply stays small.
    let long = "\u{7f}".repeat(1 << 20);
    let err = client
        .invoke::<_, ServingStatus>(HEALTH_METHOD, &long)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err:?}");
    let text = err.status().unwrap().message();
    assert!(
        text.len() < 1024 && text.ends_with("..."),
        "{} bytes",
        text.len()
    );

    handle.health().set_serving("Users");
    handle.health().set_not_serving("Reports");
    let users: ServingStatus = client.invoke(HEALTH_METHOD, "Users").await.unwrap();
    let reports: ServingStatus = client.invoke(HEALTH_METHOD, "Reports").await.unwrap();
    assert_eq!(
        (users, reports),
        (ServingStatus::Serving, ServingStatus::NotServing)
    );
    handle.health().clear("Users");
    assert!(client
        .invoke::<_, ServingStatus>(HEALTH_METHOD, "Users")
        .await
        .is_err());
    // The health method bypasses the service: the echo handler never saw these calls.
    assert_eq!(handle.stats().calls, 0);
    // A body that is not a name is a bad argument.
    let err = client
        .request(towerpc::Request::new(HEALTH_METHOD, &b"\xc1"[..]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
}

/// Once a graceful shutdown starts, health says NOT_SERVING while new requests are REFUSED.
#[tokio::test(flavor = "current_thread")]
async fn health_is_not_serving_from_the_start_of_a_drain() {
    let builder = Server::builder().grace_period(Duration::from_secs(5));
    let handle = builder.handle();
    handle.health().set_serving("Users");
    let mut running = support::serve(builder, support::sleepy(Duration::from_millis(500))).await;
    let mut raw = support::raw_client(running.addr).await;

    raw.write_frame(vec![check(1, "Users")]).await;
    let msgs = raw.read_frame_within(BOUND).await.unwrap();
    assert!(
        matches!(&msgs[..], [Message::Response { id: 1, body }] if body == &support::msgpack(&ServingStatus::Serving)),
        "{msgs:?}"
    );

    // A call in flight keeps the drain going for a while.
    raw.write_frame(vec![Message::Request {
        id: 2,
        timeout_ms: 0,
        method: Bytes::from_static(b"Sleep"),
        metadata: Bytes::new(),
        body: Bytes::from_static(b"x"),
    }])
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    running.trigger_shutdown();
    support::eventually("health flips", BOUND, || {
        handle.health().status("Users") == Some(ServingStatus::NotServing)
    })
    .await;
    assert_eq!(handle.health().status(""), Some(ServingStatus::NotServing));

    // The drain reaches the connection as a GOAWAY.
    let msgs = raw.read_frame_within(BOUND).await.unwrap();
    assert!(
        msgs.iter()
            .any(|m| matches!(m, Message::GoAway { code: 0, .. })),
        "{msgs:?}"
    );
    // Health still answers, NOT_SERVING; a request is refused.
    raw.write_frame(vec![
        check(3, "Users"),
        Message::Request {
            id: 4,
            timeout_ms: 0,
            method: Bytes::from_static(b"Sleep"),
            metadata: Bytes::new(),
            body: Bytes::from_static(b"y"),
        },
    ])
    .await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        for m in raw.read_frame_within(BOUND).await.unwrap() {
            match m {
                Message::Response { id: 3, body } => {
                    assert_eq!(body, support::msgpack(&ServingStatus::NotServing));
                    seen.push(3);
                }
                Message::Error { id: 4, code, .. } => {
                    assert_eq!(Code::from_u16(code), Code::Refused);
                    seen.push(4);
                }
                other => assert!(
                    matches!(other, Message::Response { id: 2, .. }),
                    "unexpected {other:?}"
                ),
            }
        }
    }
    running.join(BOUND).await;
}
