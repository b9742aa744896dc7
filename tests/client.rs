//! Client behaviour end to end, over real sockets on 127.0.0.1.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::{Service, ServiceExt};
use towerpc::client::Overflow;
use towerpc::codec::Message;
use towerpc::{Client, Request, Response, Server};

use support::{eventually, DropCounter};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Ask {
    caller: u64,
    nonce: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Answer {
    caller: u64,
    nonce: u64,
    slept_ms: u64,
}

/// A handler that parks until the test adds permits to `gate`; counts handlers that started.
fn gated(gate: Arc<Semaphore>, started: Arc<AtomicUsize>) -> support::Svc {
    support::typed(move |n: u64| {
        let gate = gate.clone();
        let started = started.clone();
        async move {
            started.fetch_add(1, SeqCst);
            gate.acquire().await?.forget();
            Ok(n)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_out_of_order_reach_their_callers() {
    // Each request sleeps a different time derived from its own contents, so replies leave
    // the server in an order unrelated to the requests'.
    let svc = support::typed(|ask: Ask| async move {
        let slept_ms = ask.caller.wrapping_mul(7919).wrapping_add(ask.nonce) % 50;
        tokio::time::sleep(Duration::from_millis(slept_ms)).await;
        Ok(Answer {
            caller: ask.caller,
            nonce: ask.nonce,
            slept_ms,
        })
    });
    let server = support::serve(Server::builder(), svc).await;
    let client = Client::builder().connect(server.addr).await.unwrap();

    let finished = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut calls = JoinSet::new();
    for caller in 0..1000u64 {
        let client = client.clone();
        let finished = finished.clone();
        calls.spawn(async move {
            let ask = Ask {
                caller,
                nonce: caller.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40,
            };
            let answer: Answer = client.invoke("Sleep", &ask).await.unwrap();
            assert_eq!(
                (answer.caller, answer.nonce),
                (ask.caller, ask.nonce),
                "caller {caller} got someone else's reply"
            );
            finished.lock().unwrap().push(answer.slept_ms);
        });
    }
    let all = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(res) = calls.join_next().await {
            res.unwrap();
        }
    })
    .await;
    assert!(all.is_ok(), "1,000 calls did not finish within 30 s");

    let finished = finished.lock().unwrap();
    assert_eq!(finished.len(), 1000);
    // Replies really did come back out of order: short sleeps tend to finish first, so the
    // completion order is far from the order the calls were made in.
    let first_half: u64 = finished[..500].iter().sum();
    let second_half: u64 = finished[500..].iter().sum();
    assert!(
        first_half < second_half,
        "completion order does not follow the handlers' sleeps ({first_half} vs {second_half})"
    );
    assert_eq!(client.pending(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_times_out_and_its_id_is_released_by_the_late_reply() {
    let server = support::serve(Server::builder(), support::sleepy(Duration::from_secs(10))).await;
    let client = Client::builder()
        .timeout(Duration::from_millis(100))
        .connect(server.addr)
        .await
        .unwrap();

    let start = Instant::now();
    let err = client.invoke::<_, u64>("Sleep", &1u64).await.unwrap_err();
    let took = start.elapsed();
    assert!(err.is_timeout(), "{err:?}");
    assert!(
        took >= Duration::from_millis(100),
        "timed out early: {took:?}"
    );
    assert!(took < Duration::from_secs(2), "timed out late: {took:?}");
    if err.is_remote() {
        // On a starved machine the server's DEADLINE_EXCEEDED can reach the call before its
        // own timer is polled; both are timeouts.
        assert_eq!(err.code(), Some(towerpc::Code::DeadlineExceeded), "{err:?}");
    } else {
        assert_eq!(client.stats().timeouts, 1);
    }

    // The server knows the same deadline, stops the handler and answers DEADLINE_EXCEEDED;
    // that reply frees the reserved id.
    eventually(
        "the abandoned id to be released",
        Duration::from_secs(3),
        || client.pending() == 0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_call_cancels_the_handler_on_the_server() {
    let started = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let svc = {
        let (started, dropped) = (started.clone(), dropped.clone());
        support::service(move |_req: Request| {
            let guard = DropCounter(dropped.clone());
            let started = started.clone();
            async move {
                let _guard = guard;
                started.fetch_add(1, SeqCst);
                std::future::pending::<()>().await;
                Ok(Response::default())
            }
        })
    };
    let server = support::serve(Server::builder(), svc).await;
    // A long client timeout: only a CANCEL can stop the handler within this test.
    let client = Client::builder()
        .timeout(Duration::from_secs(60))
        .connect(server.addr)
        .await
        .unwrap();

    let mut call = Box::pin(client.invoke::<_, ()>("Forever", &()));
    tokio::select! {
        res = &mut call => panic!("the call ended on its own: {res:?}"),
        () = eventually("the handler to start", Duration::from_secs(5), || started.load(SeqCst) == 1) => {}
    }
    assert_eq!(dropped.load(SeqCst), 0);
    assert_eq!(client.pending(), 1);
    drop(call);

    eventually(
        "the handler to be cancelled",
        Duration::from_secs(3),
        || dropped.load(SeqCst) == 1,
    )
    .await;
    eventually(
        "the cancelled id to be released",
        Duration::from_secs(3),
        || client.pending() == 0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_the_server_restarts_on_the_same_port() {
    let mut server = support::serve(Server::builder(), support::echo()).await;
    let addr = server.addr;
    let client = Client::builder()
        .reconnect_backoff(Duration::from_millis(50), 1.6, Duration::from_millis(200))
        .connect(addr)
        .await
        .unwrap();
    assert_eq!(client.invoke::<_, u64>("Echo", &1u64).await.unwrap(), 1);

    server.trigger_shutdown();
    server.join(Duration::from_secs(5)).await;

    // With the server gone, calls fail at once with a typed error instead of waiting out
    // their 20 s timeout.
    let start = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        client.invoke::<_, u64>("Echo", &2u64),
    )
    .await
    .expect("a call to a stopped server hung");
    let err = res.expect_err("a call to a stopped server succeeded");
    assert!(err.is_unavailable() || err.is_closed(), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "failing took {:?}",
        start.elapsed()
    );

    let listener = support::rebind(addr).await;
    let _server = support::serve_on(listener, Server::builder(), support::echo());

    let start = Instant::now();
    let mut last_err = None;
    let mut recovered = false;
    for i in 0..500u64 {
        match tokio::time::timeout(Duration::from_secs(5), client.invoke::<_, u64>("Echo", &i))
            .await
        {
            Ok(Ok(n)) => {
                assert_eq!(n, i);
                recovered = true;
                break;
            }
            Ok(Err(e)) => last_err = Some(e),
            Err(_) => panic!("a call hung while the client reconnected"),
        }
        if start.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        recovered,
        "no successful call within 5 s of the restart; last error: {last_err:?}"
    );
    assert!(client.stats().dials >= 2);
}

#[tokio::test]
async fn call_fails_fast_with_no_server_listening() {
    let addr = support::free_addr();
    let client = Client::builder().connect_lazy(addr);

    let start = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        client.invoke::<_, u64>("Echo", &1u64),
    )
    .await
    .expect("the call hung");
    let took = start.elapsed();
    let err = res.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(!err.is_timeout(), "{err:?}");
    assert!(err.is_retry_safe(), "{err:?}");
    assert!(took < Duration::from_secs(1), "failing took {took:?}");
    assert_eq!(err.server_addr(), Some(addr));
    let text = format!("{err:#}");
    assert!(text.contains(&addr.to_string()), "{text}");
}

#[tokio::test]
async fn connect_returns_err_with_no_server_listening() {
    let addr = support::free_addr();
    let res = tokio::time::timeout(Duration::from_secs(5), Client::builder().connect(addr))
        .await
        .expect("connect hung");
    let err = res.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[tokio::test]
async fn dialing_an_unspecified_address_fails_at_once() {
    // gorpc #18: dialing ":port" must fail at once, never look like a call timeout.
    let port = support::free_addr().port();
    let addr: std::net::SocketAddr = ([0, 0, 0, 0], port).into();

    let res = tokio::time::timeout(Duration::from_secs(5), Client::builder().connect(addr))
        .await
        .expect("connect to 0.0.0.0 hung");
    let err = res.unwrap_err();
    assert!(!err.is_timeout(), "{err:?}");

    let client = Client::builder().connect_lazy(addr);
    let start = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        client.invoke::<_, u64>("Echo", &1u64),
    )
    .await
    .expect("a call to 0.0.0.0 hung");
    let err = res.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(!err.is_timeout(), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "failing took {:?}",
        start.elapsed()
    );
    assert!(format!("{err:#}").contains("unspecified"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_is_detected_as_stalled() {
    // Completes the preface, reads everything, never replies and never answers a ping.
    let (addr, script) = support::raw_server(|mut conn| async move {
        conn.read_to_end_within(Duration::from_secs(10)).await
    })
    .await;
    let client = Client::builder()
        .stall_timeout(Duration::from_millis(400))
        .timeout(Duration::from_secs(20))
        .connect(addr)
        .await
        .unwrap();

    let start = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        client.invoke::<_, u64>("Echo", &1u64),
    )
    .await
    .expect("the call to a silent server hung");
    let took = start.elapsed();
    let err = res.unwrap_err();
    assert!(err.is_stalled(), "{err:?}");
    assert!(
        took < Duration::from_secs(2),
        "stall detected after {took:?}"
    );

    // On the wire: the request, then a ping, then GOAWAY STALLED before the close.
    let seen = tokio::time::timeout(Duration::from_secs(5), script)
        .await
        .expect("the client did not close the stalled connection")
        .unwrap();
    assert!(
        matches!(seen.first(), Some(Message::Request { .. })),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|m| matches!(m, Message::Ping { .. })),
        "no PING before giving up: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|m| matches!(m, Message::GoAway { code: 14, .. })),
        "no GOAWAY STALLED: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_unknown_id_is_a_protocol_error() {
    let (addr, script) = support::raw_server(|mut conn| async move {
        let id = conn.read_request_id().await;
        conn.write_frame(vec![Message::Response {
            id: id.wrapping_add(1000),
            body: support::msgpack(&7u64),
        }])
        .await;
        conn.read_to_end_within(Duration::from_secs(5)).await
    })
    .await;
    let client = Client::builder().connect(addr).await.unwrap();

    let res = tokio::time::timeout(
        Duration::from_secs(5),
        client.invoke::<_, u64>("Echo", &1u64),
    )
    .await
    .expect("the call hung");
    let err = res.unwrap_err();
    assert!(err.is_protocol(), "{err:?}");
    assert_eq!(client.stats().protocol_errors, 1);

    // The client told the server why it hung up, and is still alive (a panicked background
    // task would have dropped the reply channel instead of reporting a protocol error).
    let seen = tokio::time::timeout(Duration::from_secs(5), script)
        .await
        .expect("the client did not close the connection")
        .unwrap();
    assert!(
        seen.iter()
            .any(|m| matches!(m, Message::GoAway { code: 11, .. })),
        "no GOAWAY PROTOCOL_ERROR: {seen:?}"
    );
    assert_eq!(client.pending(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_reply_is_a_protocol_error_not_a_second_answer() {
    let (addr, script) = support::raw_server(|mut conn| async move {
        let mut ids = Vec::new();
        while ids.len() < 2 {
            let msgs = conn
                .read_frame_within(Duration::from_secs(5))
                .await
                .expect("requests");
            for m in msgs {
                if let Message::Request { id, body, .. } = m {
                    ids.push((id, body));
                }
            }
        }
        let (first, body) = ids[0].clone();
        // Answer the first call twice and the second not at all.
        conn.write_frame(vec![
            Message::Response {
                id: first,
                body: body.clone(),
            },
            Message::Response { id: first, body },
        ])
        .await;
        conn.read_to_end_within(Duration::from_secs(5)).await
    })
    .await;
    let client = Client::builder().connect(addr).await.unwrap();

    let a = tokio::spawn({
        let client = client.clone();
        async move { client.invoke::<_, u64>("Echo", &1u64).await }
    });
    eventually("the first call to be sent", Duration::from_secs(5), || {
        client.pending() == 1
    })
    .await;
    let b = tokio::spawn({
        let client = client.clone();
        async move { client.invoke::<_, u64>("Echo", &2u64).await }
    });
    let (a, b) = tokio::time::timeout(Duration::from_secs(5), async {
        (a.await.unwrap(), b.await.unwrap())
    })
    .await
    .expect("the calls hung");
    assert_eq!(a.unwrap(), 1);
    let err = b.unwrap_err();
    assert!(err.is_protocol(), "{err:?}");
    let seen = tokio::time::timeout(Duration::from_secs(5), script)
        .await
        .expect("the client did not close the connection")
        .unwrap();
    assert!(
        seen.iter()
            .any(|m| matches!(m, Message::GoAway { code: 11, .. })),
        "no GOAWAY PROTOCOL_ERROR: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_oldest_overflow_fails_the_first_call() {
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let server = support::serve(Server::builder(), gated(gate.clone(), started.clone())).await;
    let client = Client::builder()
        .max_pending(4)
        .overflow(Overflow::FailOldest)
        .connect(server.addr)
        .await
        .unwrap();

    // Start the calls one at a time so their order (and so "the oldest") is known.
    let mut calls = Vec::new();
    for n in 1..=4u64 {
        let c = client.clone();
        calls.push(tokio::spawn(
            async move { c.invoke::<_, u64>("Gate", &n).await },
        ));
        eventually("the call to be pending", Duration::from_secs(5), || {
            client.pending() == n as usize
        })
        .await;
    }
    eventually("4 handlers to start", Duration::from_secs(5), || {
        started.load(SeqCst) == 4
    })
    .await;
    assert!(calls.iter().all(|c| !c.is_finished()));

    let c = client.clone();
    calls.push(tokio::spawn(async move {
        c.invoke::<_, u64>("Gate", &5u64).await
    }));
    let first = tokio::time::timeout(Duration::from_secs(5), &mut calls[0])
        .await
        .expect("the oldest call was not failed")
        .unwrap();
    let err = first.unwrap_err();
    assert!(err.is_overloaded(), "{err:?}");
    for c in &calls[1..4] {
        assert!(!c.is_finished(), "a call other than the oldest ended");
    }

    gate.add_permits(100);
    for (i, c) in calls.into_iter().enumerate().skip(1) {
        let n = tokio::time::timeout(Duration::from_secs(5), c)
            .await
            .expect("call hung")
            .unwrap()
            .unwrap();
        assert_eq!(n, i as u64 + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_makes_poll_ready_wait_for_a_free_slot() {
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let server = support::serve(Server::builder(), gated(gate.clone(), started.clone())).await;
    let client = Client::builder()
        .max_pending(2)
        .connect(server.addr)
        .await
        .unwrap();

    let mut calls = JoinSet::new();
    for n in 1..=2u64 {
        let c = client.clone();
        calls.spawn(async move { c.invoke::<_, u64>("Gate", &n).await });
    }
    eventually("2 handlers to start", Duration::from_secs(5), || {
        started.load(SeqCst) == 2
    })
    .await;
    assert_eq!(client.pending(), 2);

    let mut svc = client.clone();
    assert!(
        tokio::time::timeout(Duration::from_millis(100), svc.ready())
            .await
            .is_err(),
        "poll_ready was Ready with max_pending calls pending"
    );

    gate.add_permits(1);
    let done = tokio::time::timeout(Duration::from_secs(5), calls.join_next())
        .await
        .expect("released call hung")
        .unwrap()
        .unwrap();
    assert!(done.is_ok(), "{done:?}");
    tokio::time::timeout(Duration::from_secs(2), svc.ready())
        .await
        .expect("poll_ready stayed Pending after a slot was freed")
        .unwrap();

    let third = Service::call(&mut svc, Request::new("Gate", support::msgpack(&3u64)));
    gate.add_permits(10);
    let resp = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("third call hung")
        .unwrap();
    assert_eq!(resp.body(), &support::msgpack(&3u64));
    let rest = tokio::time::timeout(Duration::from_secs(5), calls.join_next())
        .await
        .expect("second call hung")
        .unwrap()
        .unwrap();
    assert!(rest.is_ok(), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_message_runs_the_handler_and_gets_no_reply() {
    let ran = Arc::new(AtomicUsize::new(0));
    let svc = {
        let ran = ran.clone();
        support::typed(move |n: u64| {
            let ran = ran.clone();
            async move {
                ran.fetch_add(1, SeqCst);
                // A reply the server must not send for a one-way message.
                Ok(n + 1)
            }
        })
    };
    let server = support::serve(Server::builder(), svc).await;
    let client = Client::builder().connect(server.addr).await.unwrap();

    client.send("Note", &41u64).unwrap();
    assert_eq!(client.pending(), 0);
    eventually("the one-way handler to run", Duration::from_secs(5), || {
        ran.load(SeqCst) == 1
    })
    .await;
    eventually("the server to count it", Duration::from_secs(2), || {
        server.stats().one_way == 1
    })
    .await;
    // Give a reply, were one wrongly sent, time to arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(client.pending(), 0);
    assert_eq!(client.stats().one_way, 1);
    assert_eq!(
        client.stats().frames_read,
        0,
        "the server sent something back"
    );
    assert_eq!(
        server.stats().frames_written,
        0,
        "the server sent something back"
    );
}

/// `callers` tasks each make `per_caller` echo calls one after another, checking each reply;
/// returns once all are done (at most 30 s).
async fn echo_from_callers(client: &Client, callers: u64, per_caller: u64) {
    let mut tasks = JoinSet::new();
    for c in 0..callers {
        let client = client.clone();
        tasks.spawn(async move {
            for i in 0..per_caller {
                let n = c * 1000 + i;
                assert_eq!(client.invoke::<_, u64>("Echo", &n).await.unwrap(), n);
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    })
    .await
    .expect("calls did not finish in 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_calls_and_batch_writes() {
    let server = support::serve(Server::builder(), support::echo()).await;
    let client = Client::builder().connect(server.addr).await.unwrap();
    let before = client.stats();

    const CALLERS: u64 = 100;
    const PER_CALLER: u64 = 10;
    echo_from_callers(&client, CALLERS, PER_CALLER).await;

    let n = CALLERS * PER_CALLER;
    let s = client.stats().since(&before);
    assert_eq!(s.calls, n);
    assert_eq!(s.errors, 0);
    assert!(s.write_calls > 0, "{s:?}");
    assert!(
        s.write_calls < n,
        "no batching: {} writes for {n} calls",
        s.write_calls
    );
    assert!(s.bytes_written > 0 && s.bytes_read > 0, "{s:?}");
    assert_eq!(client.stats().dials, 1);
    assert_eq!(server.stats().accepts, 1);
    assert_eq!(server.stats().calls, n);
}

#[tokio::test]
async fn raw_request_round_trips_bytes_unchanged() {
    let server = support::serve(Server::builder(), support::echo()).await;
    let client = Client::builder().connect(server.addr).await.unwrap();
    let body = Bytes::from_static(b"\x00\x01not msgpack\xff");
    let resp = client
        .request(Request::new("Echo", body.clone()))
        .await
        .unwrap();
    assert_eq!(resp.body(), &body);
}

#[tokio::test(start_paused = true)]
async fn reconnect_backoff_spaces_dials_on_paused_time() {
    // Nothing listens: every dial is refused at once, and the real backoff (1 s, x1.6, capped
    // at 120 s, +-20 %) spaces the next one. 14 dials on the nominal schedule in 10 minutes.
    let addr = support::free_addr();
    let client = Client::builder().connect_lazy(addr);
    tokio::time::sleep(Duration::from_secs(600)).await;
    let dials = client.stats().dials;
    assert!((12..=15).contains(&dials), "{dials} dials in 10 minutes");
}

/// A reply that arrives in fragments (PROTOCOL.md §4.1) with a PING and another call's reply
/// between its pieces: the client answers the PING and completes the other call at once, and
/// the large reply arrives whole.
#[tokio::test]
async fn a_reply_in_fragments_lets_other_replies_and_pings_pass() {
    use bytes::{BufMut, BytesMut};
    use tokio::io::AsyncWriteExt;

    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    let expected = body.clone();
    let (addr, script) = support::raw_server(move |mut conn| async move {
        let mut ids = std::collections::HashMap::new();
        while ids.len() < 2 {
            for m in conn.read_frame().await.expect("two requests") {
                if let Message::Request { id, method, .. } = m {
                    ids.insert(method, id);
                }
            }
        }
        let big = ids[&bytes::Bytes::from_static(b"big")];
        let small = ids[&bytes::Bytes::from_static(b"small")];
        // The big RESPONSE's bytes, cut in three pieces, by hand.
        let mut whole = BytesMut::new();
        whole.put_u8(0x03);
        whole.put_u32(big);
        whole.put_u32(body.len() as u32);
        whole.put_slice(&body);
        let piece = |more: u8, data: &[u8], before: &[u8]| {
            let mut f = BytesMut::new();
            let len = before.len() + 6 + data.len();
            f.put_u32(len as u32);
            f.put_u16(0);
            f.put_u16(if before.is_empty() { 1 } else { 2 });
            f.put_slice(before);
            f.put_u8(0x09);
            f.put_u8(more);
            f.put_u32(data.len() as u32);
            f.put_slice(data);
            f
        };
        let (a, rest) = whole.split_at(100_000);
        let (b, c) = rest.split_at(100_000);
        let mut ping = vec![0x06];
        ping.extend_from_slice(&42u64.to_be_bytes());
        conn.stream.write_all(&piece(1, a, &[])).await.unwrap();
        conn.stream.write_all(&piece(1, b, &ping)).await.unwrap();
        conn.write_frame(vec![Message::Response {
            id: small,
            body: bytes::Bytes::from_static(b"\xa2ok"),
        }])
        .await;
        // The PONG arrives before the big reply is finished, with ACKs for the 200,000 bytes
        // of pieces read (the client acknowledges every 64 KiB) in front of it or beside it.
        let (mut pong, mut acked) = (false, 0);
        while !pong || acked < 200_000 {
            for m in conn.read_frame().await.expect("a pong and acks") {
                match m {
                    Message::Pong { data: 42 } => pong = true,
                    Message::Ack { bytes } => acked += bytes,
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(acked, 200_000);
        conn.stream.write_all(&piece(0, c, &[])).await.unwrap();
        conn.read_to_end_within(Duration::from_secs(10)).await
    })
    .await;
    let client = Client::connect(addr).await.unwrap();
    let big = client.request(Request::new("big", vec![0u8]));
    let small = client.request(Request::new("small", vec![0u8]));
    tokio::pin!(big);
    let small = tokio::select! {
        r = small => r.unwrap(),
        _ = &mut big => panic!("the big reply finished before the small one"),
    };
    assert_eq!(&small.body()[..], b"\xa2ok");
    let big = tokio::time::timeout(Duration::from_secs(10), big)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&big.body()[..], &expected[..]);
    client.close().await;
    tokio::time::timeout(Duration::from_secs(10), script)
        .await
        .unwrap()
        .unwrap();
}

/// A client whose dial never finishes (and whose dial timeout is far off).
fn never_connected(builder: towerpc::client::Builder) -> Client {
    let connector = tower::service_fn(|_: ()| {
        std::future::pending::<std::io::Result<tokio::io::DuplexStream>>()
    });
    builder
        .connect_timeout(Duration::from_secs(60))
        .connect_lazy_with((), connector)
}

/// A call made while the connection is still being dialed has its deadline all the same: the
/// connection's deadline queue times it out, not the dial's own (longer) timeout.
#[tokio::test(start_paused = true)]
async fn default_timeout_holds_while_dialing() {
    let client = never_connected(Client::builder().timeout(Duration::from_millis(200)));
    let start = tokio::time::Instant::now();
    let err = client.invoke::<_, u64>("Echo", &1u64).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(start.elapsed(), Duration::from_millis(200));
    assert_eq!(client.stats().timeouts, 1);
}

/// Fails to encode: nothing may go out for it.
struct Unencodable;

impl serde::Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("cannot encode this"))
    }
}

#[tokio::test(start_paused = true)]
async fn invoke_starts_its_call_in_the_deadline_scope_of_its_first_poll() {
    // The call waits until a deadline ends it.
    let client = never_connected(Client::builder());
    let fut = client.invoke::<_, u8>("m", &1u8);
    let start = tokio::time::Instant::now();
    // Made outside any scope, polled inside one: the scope's 1 s deadline applies, not the
    // client's default timeout (20 s).
    let err = towerpc::deadline::scope(Some(start + Duration::from_secs(1)), fut)
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    // A request that cannot be encoded fails at its first poll, and the future says what it is.
    let fut = client.invoke::<_, u8>("m", &Unencodable);
    assert!(format!("{fut:?}").contains("unstarted"));
    let err = fut.await.unwrap_err();
    assert!(err.to_string().contains("encode"), "{err}");
}

/// On a runtime of one worker (a container of one CPU), the callers a frame of replies wakes
/// beyond the worker's local queue land in the runtime's global queue: they must get their
/// turn before the others call again and again. Counts, not times: each of 1,000 callers
/// must make a fair share of 40,000 calls.
#[test]
fn on_one_worker_every_caller_gets_its_turn() {
    const CALLERS: usize = 1000;
    const CALLS: usize = 40_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let addr = support::free_addr();
        let server = support::ServerProcess::start(addr, Server::builder(), support::echo()).await;
        let client = Client::builder().connect(addr).await.expect("connect");
        let started = Arc::new(AtomicUsize::new(0));
        let counts: Arc<Vec<AtomicUsize>> =
            Arc::new((0..CALLERS).map(|_| AtomicUsize::new(0)).collect());
        let mut callers = JoinSet::new();
        for i in 0..CALLERS {
            let (client, started, counts) = (client.clone(), started.clone(), counts.clone());
            callers.spawn(async move {
                while started.fetch_add(1, SeqCst) < CALLS {
                    client
                        .request(Request::new("echo", "x"))
                        .await
                        .expect("echo");
                    counts[i].fetch_add(1, SeqCst);
                }
            });
        }
        while callers.join_next().await.is_some() {}
        let mut made: Vec<usize> = counts.iter().map(|c| c.load(SeqCst)).collect();
        made.sort_unstable();
        let fair = CALLS / CALLERS;
        // The slowest 1 % of callers made 39 calls each, and 8-14 without the yield (the
        // fastest 73).
        assert!(
            made[CALLERS / 100] >= fair * 2 / 3,
            "the slowest callers made {:?} calls, the fastest {:?}, a fair share is {fair}",
            &made[..10],
            &made[CALLERS - 3..]
        );
        drop(server);
    });
}

/// Parks of the client's runtime (one thread; the server runs on a runtime of its own) over
/// `rounds` rounds of `per_round` echoes made together, with the client's reply spin at `spin`.
fn client_parks(spin: Duration, per_round: usize, rounds: u64) -> u64 {
    let rt = support::current_thread();
    rt.block_on(async {
        let addr = support::free_addr();
        let server = support::ServerProcess::start(addr, Server::builder(), support::echo()).await;
        let client = Client::builder()
            .reply_spin(spin)
            .connect(addr)
            .await
            .expect("connect");
        let round = || async {
            let calls = (0..per_round).map(|_| client.request(Request::new("echo", "x")));
            for reply in futures_util::future::join_all(calls).await {
                reply.expect("echo");
            }
        };
        for _ in 0..10 {
            round().await;
        }
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.worker_park_count(0);
        for _ in 0..rounds {
            round().await;
        }
        let parked = metrics.worker_park_count(0) - before;
        drop(server);
        parked
    })
}

/// With one call out, the connection's reader looks for the reply instead of letting its
/// thread sleep (`Builder::reply_spin`). Counts, not times: the client's runtime parks about
/// once per call with the spin off, and hardly at all with a window far longer than a
/// loopback round trip.
#[test]
fn one_call_out_is_awaited_awake() {
    const CALLS: u64 = 200;
    let asleep = client_parks(Duration::ZERO, 1, CALLS);
    let awake = client_parks(Duration::from_millis(20), 1, CALLS);
    support::assert_spin_parks(asleep, awake, CALLS);
}

/// So is a round of many calls out at once: the reader spins however many calls it waits for.
#[test]
fn many_calls_out_are_awaited_awake() {
    const ROUNDS: u64 = 100;
    let asleep = client_parks(Duration::ZERO, 10, ROUNDS);
    let awake = client_parks(Duration::from_millis(20), 10, ROUNDS);
    support::assert_spin_parks(asleep, awake, ROUNDS);
}

#[tokio::test]
async fn calls_made_while_dialling_keep_to_the_limit_the_server_announces() {
    // §3: no frame over the limit the peer announced, and calls made before the server's
    // preface could not know it. 4096 is the least a server may announce.
    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::{Decoder, Encoder};
    use towerpc::codec::{Frame, FrameCodec, PREFACE_LEN};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = Client::builder().connect_lazy(addr);
    let mut calls = JoinSet::new();
    for (i, len) in [2048usize, 2048, 2048, 10 * 1024].into_iter().enumerate() {
        let client = client.clone();
        calls.spawn(async move {
            let res = client
                .request(Request::new("echo", vec![i as u8; len]))
                .await;
            (len, res)
        });
    }
    let (mut stream, _) = listener.accept().await.unwrap();
    let mut preface = [0u8; PREFACE_LEN];
    stream.read_exact(&mut preface).await.unwrap();
    eventually("the calls queued", Duration::from_secs(5), || {
        client.pending() == 4
    })
    .await;
    stream
        .write_all(&support::server_preface(4096))
        .await
        .unwrap();

    // Every frame and every message in fragments within 4096, or the decoder refuses it.
    let mut codec = FrameCodec::builder().max_frame_len(4096).new_codec();
    let mut buf = BytesMut::new();
    let mut ids = Vec::new();
    loop {
        while let Some(frame) = codec.decode(&mut buf).expect("a frame over 4096") {
            for msg in frame.into_messages() {
                let Message::Request { id, body, .. } = msg else {
                    panic!("unexpected {msg:?}")
                };
                assert_eq!(body.len(), 2048);
                ids.push(id);
                let mut out = BytesMut::new();
                codec
                    .encode(Frame::new(vec![Message::Response { id, body }]), &mut out)
                    .unwrap();
                stream.write_all(&out).await.unwrap();
            }
        }
        if ids.len() == 3 {
            break;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read_buf(&mut buf))
            .await
            .expect("the client sent its calls")
            .unwrap();
        assert!(n > 0, "the client closed");
    }
    let mut results = Vec::new();
    while let Some(done) = calls.join_next().await {
        results.push(done.unwrap());
    }
    results.sort_by_key(|(len, _)| *len);
    for (len, res) in &results[..3] {
        assert_eq!(res.as_ref().expect("a 2 KiB call").body().len(), *len);
    }
    let (_, too_big) = &results[3];
    let err = too_big.as_ref().unwrap_err();
    assert!(err.is_encode(), "{err:?}");
    assert!(format!("{err:#}").contains("4096"), "{err:#}");
    // Nothing else came: the 10 KiB request was never sent.
    let mut rest = [0u8; 1];
    let quiet = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut rest)).await;
    assert!(
        quiet.is_err() && buf.is_empty(),
        "more from the client: {buf:?}"
    );
}

#[tokio::test]
async fn a_server_of_another_version_is_reported_as_unsupported_version() {
    // §3.2: the client closes and reports "unsupported version" (UNSUPPORTED_VERSION).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use towerpc::codec::PREFACE_LEN;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut preface = [0u8; PREFACE_LEN];
        stream.read_exact(&mut preface).await.unwrap();
        let mut ours = support::server_preface(16 << 20);
        ours[4] = 2;
        stream.write_all(&ours).await.unwrap();
        // The client sends nothing more, and closes.
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        rest
    });
    let err = Client::builder().connect(addr).await.unwrap_err();
    assert!(err.is_handshake(), "{err:?}");
    assert!(
        format!("{err:#}").contains("unsupported version"),
        "{err:#}"
    );
    let status = std::error::Error::source(&err)
        .and_then(|s| s.downcast_ref::<towerpc::Status>())
        .expect("a status in the source chain");
    assert_eq!(status.code(), towerpc::Code::UnsupportedVersion);
    let rest = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    assert!(
        rest.is_empty(),
        "the client sent {rest:?} after the prefaces"
    );
}

/// A server that answers the client's preface with `preface` and then sends `after`; returns
/// every byte the client sent after its own preface, once it closed.
async fn scripted_server(
    preface: [u8; towerpc::codec::PREFACE_LEN],
    after: Vec<u8>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut theirs = [0u8; towerpc::codec::PREFACE_LEN];
        stream.read_exact(&mut theirs).await.unwrap();
        stream.write_all(&preface).await.unwrap();
        stream.write_all(&after).await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest));
        read.await
            .expect("the client did not close")
            .expect("read what the client sent");
        rest
    });
    (addr, task)
}

#[tokio::test]
async fn a_bad_server_preface_fails_the_handshake_and_nothing_follows() {
    // §3.2 and §3.3, from the client's side.
    let good = support::server_preface(16 << 20);
    let bad = |what: &'static str, edit: fn(&mut [u8; 12])| {
        let mut p = good;
        edit(&mut p);
        (what, p)
    };
    let cases = [
        bad("bad magic", |p| p[0] = b'X'),
        bad("role 'C'", |p| p[5] = b'C'),
        bad("flags 1", |p| p[7] = 1),
        bad("max_frame_len 4095", |p| {
            p[8..].copy_from_slice(&4095u32.to_be_bytes())
        }),
        bad("zstd, not offered", |p| p[6] = 0x01),
        bad("two algorithms", |p| p[6] = 0x03),
        bad("a reserved bit", |p| p[6] = 0x08),
    ];
    for (what, preface) in cases {
        let (addr, server) = scripted_server(preface, Vec::new()).await;
        let err = Client::builder().connect(addr).await.unwrap_err();
        assert!(err.is_handshake(), "{what}: {err:?}");
        let rest = server.await.unwrap();
        assert!(rest.is_empty(), "{what}: the client sent {rest:?}");
    }
}

#[tokio::test]
async fn a_server_breaking_the_protocol_gets_a_goaway_and_a_close() {
    // §5 directions, §5.8 ACKs, §4 frame limit, §12: what the client answers with.
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};
    use towerpc::codec::{Frame, FrameCodec};

    let encode = |msgs: Vec<Message>| {
        let mut out = BytesMut::new();
        FrameCodec::new()
            .encode(Frame::new(msgs), &mut out)
            .unwrap();
        out.to_vec()
    };
    let request = Message::Request {
        id: 1,
        timeout_ms: 0,
        method: Bytes::from_static(b"m"),
        metadata: Bytes::new(),
        body: Bytes::new(),
    };
    let mut over_limit = 5000u32.to_be_bytes().to_vec();
    over_limit.extend_from_slice(&[0, 0, 0, 1]);
    let cases = [
        ("a REQUEST", encode(vec![request]), 11),
        ("a CANCEL", encode(vec![Message::Cancel { id: 1 }]), 11),
        (
            "an ACK with nothing outstanding",
            encode(vec![Message::Ack { bytes: 1 }]),
            11,
        ),
        (
            "a reply to no call",
            encode(vec![Message::Response {
                id: 7,
                body: Bytes::new(),
            }]),
            11,
        ),
        ("a frame over the client's limit", over_limit, 12),
    ];
    for (what, after, code) in cases {
        let (addr, server) = scripted_server(support::server_preface(16 << 20), after).await;
        let client = Client::builder()
            .max_frame_len(4096)
            .connect(addr)
            .await
            .unwrap();
        let rest = server.await.unwrap();
        let mut buf = BytesMut::from(&rest[..]);
        let mut said = Vec::new();
        while let Some(frame) = FrameCodec::new().decode(&mut buf).unwrap() {
            said.extend(frame.into_messages());
        }
        assert!(
            matches!(said.last(), Some(Message::GoAway { code: c, .. }) if *c == code),
            "{what}: the client said {said:?}"
        );
        assert!(buf.is_empty(), "{what}: bytes after the GOAWAY");
        drop(client);
    }
}

#[tokio::test]
async fn the_client_keeps_its_fragments_to_the_window_until_the_server_acknowledges() {
    // §4.1: at most 1 MiB of FRAGMENT data unacknowledged.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const WINDOW: usize = 1 << 20;
    let len = 3 << 20;
    let (addr, script) = support::raw_server(|mut conn| async move {
        let (mut unacked, mut total, mut waits, mut quiet_for) = (0usize, 0usize, 0, 0);
        let mut id = None;
        loop {
            let mut head = [0u8; 8];
            let quiet = Duration::from_millis(300);
            match tokio::time::timeout(quiet, conn.stream.read_exact(&mut head)).await {
                Ok(res) => {
                    res.unwrap();
                }
                Err(_) if unacked < WINDOW => {
                    // Quiet with window to spare: a slow machine, not the window.
                    assert!(quiet_for < 30, "the client stopped short of its window");
                    quiet_for += 1;
                    continue;
                }
                Err(_) => {
                    // Nothing more without an ACK: the window is full.
                    quiet_for = 0;
                    waits += 1;
                    let mut ack = vec![0, 0, 0, 5, 0, 0, 0, 1, 0x0A];
                    ack.extend_from_slice(&(unacked as u32).to_be_bytes());
                    conn.stream.write_all(&ack).await.unwrap();
                    unacked = 0;
                    continue;
                }
            }
            let n = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
            let mut body = vec![0u8; n];
            conn.stream.read_exact(&mut body).await.unwrap();
            assert_eq!(body[0], 0x09, "only the request's pieces");
            let data = u32::from_be_bytes(body[2..6].try_into().unwrap()) as usize;
            id.get_or_insert(u32::from_be_bytes(body[7..11].try_into().unwrap()));
            unacked += data;
            total += data;
            assert!(unacked <= WINDOW, "{unacked} bytes unacknowledged");
            if body[1] == 0 {
                break;
            }
        }
        let reply = Message::Response {
            id: id.unwrap(),
            body: Bytes::from_static(b"ok"),
        };
        conn.write_frame(vec![reply]).await;
        let _ = conn.read_to_end_within(Duration::from_secs(5)).await;
        (waits, total)
    })
    .await;
    let client = Client::builder().connect(addr).await.unwrap();
    let reply = client
        .request(Request::new("put", vec![1u8; len]))
        .await
        .unwrap();
    assert_eq!(&reply.body()[..], b"ok");
    drop(client);
    let (waits, total) = script.await.unwrap();
    assert_eq!(total, len + 16 + 3, "the whole request");
    // Three full windows, the last 19 bytes after the third ACK.
    assert_eq!(waits, 3, "the client waited for each ACK");
}

/// PROTOCOL-independent (RELIABILITY.md P1): a call's deadline and token hold from the moment
/// it is made, also while it waits for a slot with every `max_pending` slot taken.
#[tokio::test(start_paused = true)]
async fn a_call_waiting_for_a_slot_keeps_its_deadline_and_its_token() {
    let client = never_connected(
        Client::builder()
            .max_pending(1)
            .timeout(Duration::from_secs(30)),
    );
    // Takes the one slot until its own (default) timeout, 30 s.
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.request(Request::new("m", "a")).await }
    });
    eventually("the first call pending", Duration::from_secs(1), || {
        client.pending() == 1
    })
    .await;

    let start = tokio::time::Instant::now();
    let err = client
        .request(Request::new("m", "b").with_timeout(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(start.elapsed(), Duration::from_millis(100));

    let token = tokio_util::sync::CancellationToken::new();
    let cancel = {
        let token = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            token.cancel();
        })
    };
    let start = tokio::time::Instant::now();
    let err = client
        .request(Request::new("m", "c").with_cancel(token))
        .await
        .unwrap_err();
    assert!(err.is_cancelled(), "{err:?}");
    assert_eq!(start.elapsed(), Duration::from_millis(50));
    cancel.await.unwrap();

    // A batch waits for its slots no longer than its calls' deadlines.
    let start = tokio::time::Instant::now();
    let mut batch = client.batch();
    let _slot = batch.request(Request::new("m", "d"));
    batch.timeout(Duration::from_millis(200));
    let err = batch.run().await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(start.elapsed(), Duration::from_millis(200));

    // The first call was never held up by the others, and ends at its own deadline.
    let err = first.await.unwrap().unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
}

/// A slot taken for a call that then does not start (its token already cancelled, its
/// deadline already passed) goes back: with one slot, every later call still gets it.
#[tokio::test]
async fn calls_that_never_start_give_their_slot_back() {
    let server = support::serve(Server::builder(), support::echo()).await;
    let client = Client::builder()
        .max_pending(1)
        .connect(server.addr)
        .await
        .unwrap();
    for _ in 0..3 {
        let token = tokio_util::sync::CancellationToken::new();
        token.cancel();
        let err = client
            .request(Request::new("Echo", "a").with_cancel(token))
            .await
            .unwrap_err();
        assert!(err.is_cancelled(), "{err:?}");
        let err = client
            .request(Request::new("Echo", "b").with_timeout(Duration::ZERO))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
    }
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(Request::new("Echo", "c")),
    )
    .await
    .expect("no slot left for the call")
    .unwrap();
    assert_eq!(&reply.body()[..], b"c");
}

/// A wait-for-ready call holds its slot while it waits for a connection, and gives it back
/// when it is dropped there.
#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_waiting_for_a_connection_gives_its_slot_back() {
    let parked = never_connected(Client::builder().max_pending(1).wait_for_ready(true));
    for _ in 0..3 {
        let mut call = tokio_test::task::spawn(parked.request(Request::new("m", "x")));
        assert!(call.poll().is_pending());
        assert_eq!(parked.pending(), 0, "a parked call is not in the table");
    }
    // Each of those held the one slot while it waited; this call gets it and waits for a
    // connection (not for a slot) until its deadline.
    let err = parked
        .request(Request::new("m", "y").with_timeout(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(
        format!("{err:?}").contains("no connection came up"),
        "{err:?}"
    );
}

/// RELIABILITY.md P5, gorpc's counter-example: a server that completes the handshake and drops
/// every connection at once is a failed dial, and the waits between dials keep growing (the
/// gRPC schedule: at most 15 dials in 10 minutes) instead of starting over at each handshake.
#[tokio::test(start_paused = true)]
async fn a_server_dropping_every_connection_at_once_is_dialled_ever_less_often() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connector = tower::service_fn(|_: ()| {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            let mut preface = [0u8; towerpc::codec::PREFACE_LEN];
            theirs.read_exact(&mut preface).await.unwrap();
            theirs
                .write_all(&support::server_preface(16 << 20))
                .await
                .unwrap();
            // Dropped: the client reads EOF at once.
        });
        async move { Ok::<_, std::io::Error>(ours) }
    });
    let client = Client::builder().connect_lazy_with((), connector);
    tokio::time::sleep(Duration::from_secs(600)).await;
    let dials = client.stats().dials;
    assert!((5..=15).contains(&dials), "{dials} dials in 10 minutes");
}

/// RELIABILITY.md P9 (A3): replies that never come for abandoned calls keep their ids
/// reserved, but no more than `max_pending` of them: past that, new calls fail at once.
#[tokio::test(start_paused = true)]
async fn abandoned_calls_are_capped_at_max_pending() {
    let client = never_connected(
        Client::builder()
            .max_pending(100)
            .timeout(Duration::from_millis(10)),
    );
    let mut calls = JoinSet::new();
    for i in 0..100u64 {
        let client = client.clone();
        calls.spawn(async move { client.invoke::<_, u64>("m", &i).await });
    }
    while let Some(res) = calls.join_next().await {
        assert!(res.unwrap().unwrap_err().is_timeout());
    }
    // Each timed-out id waits for a reply that may still come.
    assert_eq!(client.pending(), 100);
    let start = tokio::time::Instant::now();
    let err = client.invoke::<_, u64>("m", &0u64).await.unwrap_err();
    assert!(err.is_overloaded(), "{err:?}");
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(client.pending(), 100);
}

/// gorpc's TestBatchCallTimeout: a batch's timeout ends each of its calls, whatever the handler.
#[tokio::test]
async fn a_batch_timeout_ends_every_call_of_the_batch() {
    let server = support::serve(Server::builder(), support::sleepy(Duration::from_secs(2))).await;
    let client = Client::builder().connect(server.addr).await.unwrap();
    let mut batch = client.batch();
    let slots: Vec<_> = (0..100u64)
        .map(|i| batch.call::<_, u64>("Sleep", &i).unwrap())
        .collect();
    batch.timeout(Duration::from_millis(50));
    let start = Instant::now();
    let mut replies = batch.run().await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    for slot in slots {
        let err = replies.take(slot).unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
    }
    assert_eq!(client.stats().timeouts, 100);
}

/// gorpc's FlushDelay: the writer waits that long before each write, so concurrent calls share
/// writes; every call still gets its reply. On paused time over an in-memory pipe, so that no
/// caller is ever late for its round.
#[tokio::test(start_paused = true)]
async fn flush_delay_batches_concurrent_calls_into_fewer_writes() {
    let (client_end, server_end) = tokio::io::duplex(64 * 1024);
    let incoming = futures_util::StreamExt::chain(
        futures_util::stream::iter([Ok::<_, std::io::Error>(server_end)]),
        futures_util::stream::pending(),
    );
    tokio::spawn(Server::builder().serve_with_incoming(incoming, support::echo()));
    let connector = support::one_connection(client_end);
    let client = Client::builder()
        .flush_delay(Duration::from_millis(10))
        .connect_with((), connector)
        .await
        .unwrap();
    let before = client.stats();
    // Ten callers, caller c calling c ms after its last reply: calls 1 ms apart, each alone in
    // its write without the delay (100 writes); with it, the round's calls share one.
    let mut callers = JoinSet::new();
    for c in 0..10u64 {
        let client = client.clone();
        callers.spawn(async move {
            for i in 0..10u64 {
                tokio::time::sleep(Duration::from_millis(c)).await;
                let n = c * 100 + i;
                assert_eq!(client.invoke::<_, u64>("Echo", &n).await.unwrap(), n);
            }
        });
    }
    while let Some(done) = callers.join_next().await {
        done.unwrap();
    }
    let s = client.stats().since(&before);
    assert_eq!(s.calls, 100);
    assert!(s.frames_written <= 20, "{s:?}");
}

/// gorpc's TestBadServer: random bytes from the server after its preface fail the pending
/// calls (never a hang, never a panic), and the client redials.
#[tokio::test]
async fn random_bytes_from_the_server_fail_the_calls_and_nothing_hangs() {
    let mut rng = fastrand::Rng::with_seed(42);
    let noise: Vec<u8> = (0..64 * 1024).map(|_| rng.u8(..)).collect();
    let (addr, server) = scripted_server(support::server_preface(16 << 20), noise).await;
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(addr)
        .await
        .unwrap();
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        client.invoke::<_, u64>("Echo", &1u64),
    )
    .await
    .expect("the call hung");
    let err = res.unwrap_err();
    assert!(
        err.is_protocol() || err.is_unavailable() || err.is_closed(),
        "{err:?}"
    );
    drop(client);
    let _ = server.await;
}

/// `Duration::MAX` as "never", wherever a duration is set: nothing overflows an instant.
#[tokio::test]
async fn duration_max_means_never_everywhere() {
    let never = Duration::MAX;
    let server = Server::builder()
        .handshake_timeout(never)
        .grace_period(never)
        .write_timeout(never)
        .frame_read_timeout(never)
        .idle_timeout(never)
        .keepalive_interval(never)
        .keepalive_timeout(never);
    let server = support::serve(server, support::echo()).await;
    let client = Client::builder()
        .timeout(never)
        .connect_timeout(never)
        .stall_timeout(never)
        .keepalive(never)
        .connect(server.addr)
        .await
        .unwrap();
    let reply = client
        .request(Request::new("Echo", "x").with_timeout(never))
        .await
        .unwrap();
    assert_eq!(&reply.body()[..], b"x");
    let mut batch = client.batch();
    let slot = batch.request(Request::new("Echo", "y"));
    batch.timeout(never);
    assert_eq!(
        &batch.run().await.unwrap().take(slot).unwrap().body()[..],
        b"y"
    );
    let n: u64 = client.invoke("Echo", &7u64).await.unwrap();
    assert_eq!(n, 7);
}

/// What a hand-driven server saw of a client's stream: the kind and id of each message it
/// began (a message in fragments once, at its first piece), and the fragment data to ACK.
#[derive(Debug, Default)]
struct Seen {
    starts: Vec<(u8, u32)>,
    /// FRAGMENT data bytes read and not acknowledged yet.
    unacked: u32,
    /// Whether a message is partly read from its fragments.
    in_message: bool,
    /// Messages in fragments read to their end.
    ended: usize,
}

/// Reads one frame off `stream` by hand, noting what it holds in `seen`; `false` at end of
/// stream.
async fn read_noting(stream: &mut tokio::net::TcpStream, seen: &mut Seen) -> bool {
    use tokio::io::AsyncReadExt;

    let mut head = [0u8; 8];
    if stream.read_exact(&mut head).await.is_err() {
        return false;
    }
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.expect("a whole frame");
    if body[0] == 0x09 {
        // A lone FRAGMENT (all this client sends): a first piece starts with its message's
        // kind and id.
        if !seen.in_message {
            let id = u32::from_be_bytes([body[7], body[8], body[9], body[10]]);
            seen.starts.push((body[6], id));
        }
        seen.in_message = body[1] == 1;
        seen.ended += usize::from(body[1] == 0);
        seen.unacked += u32::from_be_bytes([body[2], body[3], body[4], body[5]]);
        return true;
    }
    let mut buf = bytes::BytesMut::from(&head[..]);
    buf.extend_from_slice(&body);
    let mut codec = towerpc::codec::FrameCodec::new();
    let frame = tokio_util::codec::Decoder::decode(&mut codec, &mut buf)
        .expect("a good frame")
        .expect("a whole frame");
    for m in frame.into_messages() {
        match m {
            Message::Request { id, .. } => seen.starts.push((0x01, id)),
            Message::Cancel { id } => seen.starts.push((0x05, id)),
            _ => {}
        }
    }
    true
}

/// Reads frames off `stream` with [`read_noting`] until `done` says so.
async fn read_noting_until(
    stream: &mut tokio::net::TcpStream,
    seen: &mut Seen,
    done: impl Fn(&Seen) -> bool,
) {
    while !done(seen) {
        assert!(read_noting(stream, seen).await, "closed early: {seen:?}");
    }
}

/// How the caller of a large request gives up on it.
#[derive(Debug, Clone, Copy)]
enum GiveUp {
    /// Drops its future.
    Drop,
    /// Its own timeout passes (`Request::with_timeout`).
    OwnTimeout,
    /// The client's default timeout passes (the connection's deadline queue).
    ClientTimeout,
    /// It is the oldest call when `max_pending` is reached with `Overflow::FailOldest`.
    FailedAsOldest,
}

/// A large request whose caller gives up before any of it has left (it waits for its
/// fragments' turn behind another large one, which waits for the server's window) is taken
/// back out of the queue: the server sees neither it nor a CANCEL for it, and its id is free
/// at once instead of reserved until a reply that would never have been needed.
async fn a_large_request_given_up_before_any_of_it_left_is_never_sent(how: GiveUp) {
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, script) = support::raw_server(move |mut conn| async move {
        let mut seen = Seen::default();
        // The first request's pieces up to the window (1 MiB), unacknowledged: the client can
        // send no more fragments until the test has given up on the second request.
        read_noting_until(&mut conn.stream, &mut seen, |s| s.unacked >= 1024 * 1024).await;
        go_rx.await.unwrap();
        while seen.ended < 1 {
            if seen.unacked > 0 {
                let bytes = std::mem::take(&mut seen.unacked);
                conn.write_frame(vec![Message::Ack { bytes }]).await;
            }
            assert!(
                read_noting(&mut conn.stream, &mut seen).await,
                "closed early"
            );
        }
        // Whatever was queued behind the first request would follow it now.
        let bytes = std::mem::take(&mut seen.unacked);
        conn.write_frame(vec![Message::Ack { bytes }]).await;
        let more = tokio::time::timeout(
            Duration::from_millis(300),
            read_noting(&mut conn.stream, &mut seen),
        )
        .await;
        assert!(more.is_err(), "more came after the first request: {seen:?}");
        let calls = seen.starts.iter().filter(|(kind, _)| *kind == 0x01);
        let replies = calls
            .map(|&(_, id)| Message::Response {
                id,
                body: support::msgpack(&1u64),
            })
            .collect();
        conn.write_frame(replies).await;
        while read_noting(&mut conn.stream, &mut seen).await {}
        seen.starts
    })
    .await;
    let builder = match how {
        GiveUp::ClientTimeout => Client::builder().timeout(Duration::from_millis(200)),
        GiveUp::FailedAsOldest => Client::builder()
            .max_pending(1)
            .overflow(Overflow::FailOldest),
        _ => Client::builder(),
    };
    let client = builder.connect(addr).await.unwrap();
    // What holds the window: a large call, or (where the second must be the oldest call) a
    // large one-way message.
    let first = match how {
        GiveUp::FailedAsOldest => {
            let big = serde_bytes::ByteBuf::from(vec![1u8; 3 << 20]);
            client.send("first", &big).unwrap();
            None
        }
        _ => {
            let caller = client.clone();
            let req =
                Request::new("first", vec![1u8; 3 << 20]).with_timeout(Duration::from_secs(20));
            let task = tokio::spawn(async move { caller.request(req).await });
            support::eventually("the first request is out", Duration::from_secs(5), || {
                client.pending() == 1
            })
            .await;
            Some(task)
        }
    };
    let second = Request::new("second", vec![2u8; 200 << 10]);
    let mut third = None;
    match how {
        GiveUp::Drop => {
            let second = client.request(second);
            let gave_up = tokio::time::timeout(Duration::from_millis(50), second).await;
            assert!(
                gave_up.is_err(),
                "the second call cannot have been answered"
            );
        }
        GiveUp::OwnTimeout => {
            let second = second.with_timeout(Duration::from_millis(50));
            let err = support::within(Duration::from_secs(5), client.request(second))
                .await
                .unwrap_err();
            assert!(err.is_timeout(), "{err:?}");
        }
        GiveUp::ClientTimeout => {
            let err = support::within(Duration::from_secs(5), client.request(second))
                .await
                .unwrap_err();
            assert!(err.is_timeout(), "{err:?}");
        }
        GiveUp::FailedAsOldest => {
            let second = tokio::spawn({
                let client = client.clone();
                async move { client.request(second).await }
            });
            support::eventually("the second call is waiting", Duration::from_secs(5), || {
                client.pending() == 1
            })
            .await;
            third = Some(tokio::spawn({
                let client = client.clone();
                async move { client.invoke::<_, u64>("third", &3u64).await }
            }));
            let err = support::within(Duration::from_secs(5), second)
                .await
                .unwrap()
                .unwrap_err();
            assert!(err.is_overloaded(), "{err:?}");
        }
    }
    assert_eq!(
        client.pending(),
        1,
        "the second call's id is still reserved"
    );
    go_tx.send(()).unwrap();
    if let Some(first) = first {
        let reply = support::within(Duration::from_secs(10), first)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&reply.body()[..], &support::msgpack(&1u64)[..]);
    }
    if let Some(third) = third {
        let reply = support::within(Duration::from_secs(10), third)
            .await
            .unwrap();
        assert_eq!(reply.unwrap(), 1);
    }
    client.close().await;
    let starts = support::within(Duration::from_secs(10), script)
        .await
        .unwrap();
    let calls = starts.iter().filter(|(kind, _)| *kind == 0x01).count();
    assert_eq!(calls, 1, "the server saw more than one call: {starts:?}");
    assert!(
        starts.iter().all(|(kind, _)| *kind != 0x05),
        "a CANCEL: {starts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_dropped_before_any_of_it_left_is_never_sent() {
    a_large_request_given_up_before_any_of_it_left_is_never_sent(GiveUp::Drop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_timed_out_before_any_of_it_left_is_never_sent() {
    a_large_request_given_up_before_any_of_it_left_is_never_sent(GiveUp::OwnTimeout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_past_the_clients_timeout_before_any_of_it_left_is_never_sent() {
    a_large_request_given_up_before_any_of_it_left_is_never_sent(GiveUp::ClientTimeout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_failed_as_the_oldest_before_any_of_it_left_is_never_sent() {
    a_large_request_given_up_before_any_of_it_left_is_never_sent(GiveUp::FailedAsOldest).await;
}

/// A connection lost while a large request waits whole behind another's fragments: the one
/// partly sent may have reached a handler and fails as lost; the one none of which left fails
/// as unavailable, safe to send again (a retry layer resends only that one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_none_of_which_left_is_safe_to_retry_when_the_connection_is_lost() {
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, script) = support::raw_server(move |mut conn| async move {
        let mut seen = Seen::default();
        // The first request's pieces up to the window, unacknowledged; then the server dies.
        read_noting_until(&mut conn.stream, &mut seen, |s| s.unacked >= 1024 * 1024).await;
        // A small call queued after the second goes out ahead of it (whole messages are
        // never paced): the client has written since the second was queued.
        read_noting_until(&mut conn.stream, &mut seen, |s| {
            s.starts.contains(&(0x01, 3))
        })
        .await;
        // Then the server dies.
        go_rx.await.unwrap();
        seen.starts
    })
    .await;
    let client = Client::builder().connect(addr).await.unwrap();
    let call = |method: &'static str, size: usize| {
        let client = client.clone();
        let req = Request::new(method, vec![1u8; size]);
        tokio::spawn(async move { client.request(req).await })
    };
    let first = call("first", 3 << 20);
    support::eventually("the first request is out", Duration::from_secs(5), || {
        client.pending() == 1
    })
    .await;
    let second = call("second", 200 << 10);
    support::eventually("the second request waits", Duration::from_secs(5), || {
        client.pending() == 2
    })
    .await;
    let third = call("third", 8);
    go_tx.send(()).unwrap();
    let starts = support::within(Duration::from_secs(10), script)
        .await
        .unwrap();
    assert_eq!(starts, vec![(0x01, 1), (0x01, 3)], "the second never began");
    let third = support::within(Duration::from_secs(10), third)
        .await
        .unwrap()
        .unwrap_err();
    assert!(third.is_closed() && !third.is_retry_safe(), "{third:?}");
    let first = support::within(Duration::from_secs(10), first)
        .await
        .unwrap()
        .unwrap_err();
    assert!(first.is_closed() && !first.is_retry_safe(), "{first:?}");
    let second = support::within(Duration::from_secs(10), second)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        second.is_unavailable() && second.is_retry_safe(),
        "{second:?}"
    );
}

// ===== hostile servers: what §5, §6, §9, §10 and §12 ask of the client =====

/// A RESPONSE for `id` announcing a 40-byte body and holding `body_len` bytes, sent as two
/// FRAGMENTs of one frame, the second with `last_more` as its `more` flag.
fn response_in_two_pieces(id: u32, body_len: usize, last_more: u8) -> Vec<u8> {
    let m = raw_response(id, 40, &vec![7; body_len]);
    let (a, b) = m.split_at(20);
    raw_frame(
        0,
        0,
        2,
        &[raw_fragment(1, a), raw_fragment(last_more, b)].concat(),
    )
}

/// A frame around `body` with the given header fields, by hand.
fn raw_frame(flags: u8, reserved: u8, count: u16, body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&[flags, reserved]);
    f.extend_from_slice(&count.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// A FRAGMENT message by hand: kind 09, more, len u32, data.
fn raw_fragment(more: u8, data: &[u8]) -> Vec<u8> {
    let mut m = vec![0x09, more];
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// A RESPONSE by hand, with `body_len` as announced (which may lie).
fn raw_response(id: u32, body_len: u32, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0x03];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&body_len.to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// An ERROR by hand: `msg` need not be UTF-8.
fn raw_error(id: u32, code: u16, msg: &[u8]) -> Vec<u8> {
    let mut m = vec![0x04];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes());
    m.extend_from_slice(msg);
    m
}

#[tokio::test]
async fn malformed_input_from_a_server_gets_goaway_and_fails_the_pending_call() {
    // §12 from the client's side: every row a server can break, while a call is pending on
    // the id the bad bytes name (so nothing of them may reach it as a reply).
    use tokio::io::AsyncWriteExt;

    let pong = {
        let mut m = vec![0x07];
        m.extend_from_slice(&9u64.to_be_bytes());
        m
    };
    type Case = (&'static str, fn(u32, &[u8]) -> Vec<u8>, u16);
    let cases: [Case; 20] = [
        ("frame flags 1", |_, p| raw_frame(1, 0, 1, p), 11),
        ("frame reserved 1", |_, p| raw_frame(0, 1, 1, p), 11),
        ("frame count 0", |_, p| raw_frame(0, 0, 0, p), 11),
        ("frame len 0", |_, _| raw_frame(0, 0, 1, &[]), 11),
        (
            "frame len u32::MAX",
            |_, _| vec![0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 1],
            12,
        ),
        ("unknown kind", |_, _| raw_frame(0, 0, 1, &[0x7F; 9]), 11),
        (
            "a PING running past its frame",
            |_, _| raw_frame(0, 0, 1, &[0x06, 0, 0, 0, 1]),
            11,
        ),
        (
            "bytes left over",
            |_, p| raw_frame(0, 0, 1, &[p, &[0, 0][..]].concat()),
            11,
        ),
        (
            "an ERROR whose message is not UTF-8",
            |id, _| raw_frame(0, 0, 1, &raw_error(id, 2, &[0xFF, 0xFE])),
            11,
        ),
        (
            "a GOAWAY whose reason is not UTF-8",
            |_, _| raw_frame(0, 0, 1, &[0x08, 0, 2, 0, 2, 0xC3, 0x28]),
            11,
        ),
        (
            "a ONEWAY",
            |_, _| {
                let mut m = vec![0x02, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
                m.push(b'm');
                raw_frame(0, 0, 1, &m)
            },
            11,
        ),
        (
            "a FRAGMENT with more = 2",
            |id, _| raw_frame(0, 0, 1, &raw_fragment(2, &raw_response(id, 1, &[7]))),
            11,
        ),
        (
            "an empty FRAGMENT",
            |_, _| raw_frame(0, 0, 1, &raw_fragment(1, &[])),
            11,
        ),
        (
            "a first FRAGMENT short of the RESPONSE's fixed part",
            |id, _| raw_frame(0, 0, 1, &raw_fragment(1, &raw_response(id, 100, &[])[..5])),
            11,
        ),
        (
            "a REQUEST in fragments",
            |_, _| {
                let mut m = vec![0x01, 0, 0, 0, 9, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 40];
                m.push(b'm');
                m.extend_from_slice(&[0; 40]);
                let (a, b) = m.split_at(20);
                raw_frame(0, 0, 2, &[raw_fragment(1, a), raw_fragment(0, b)].concat())
            },
            11,
        ),
        (
            "a first FRAGMENT announcing a 4 GiB RESPONSE",
            |id, _| raw_frame(0, 0, 1, &raw_fragment(1, &raw_response(id, u32::MAX, &[7]))),
            12,
        ),
        (
            "a FRAGMENT running past its RESPONSE",
            |id, _| response_in_two_pieces(id, 41, 0),
            11,
        ),
        (
            "a last FRAGMENT leaving its RESPONSE short",
            |id, _| response_in_two_pieces(id, 39, 0),
            11,
        ),
        (
            "a FRAGMENT saying more after its RESPONSE is whole",
            |id, _| response_in_two_pieces(id, 40, 1),
            11,
        ),
        (
            "an ACK of 0 bytes",
            |_, _| raw_frame(0, 0, 1, &[0x0A, 0, 0, 0, 0]),
            11,
        ),
    ];
    for (what, bad, code) in cases {
        let pong = pong.clone();
        let (addr, script) = support::raw_server(move |mut conn| async move {
            let id = conn.read_request_id().await;
            conn.stream.write_all(&bad(id, &pong)).await.unwrap();
            conn.read_to_end_within(Duration::from_secs(5)).await
        })
        .await;
        let client = Client::builder().connect(addr).await.unwrap();
        let res = tokio::time::timeout(
            Duration::from_secs(5),
            client.invoke::<_, u64>("Echo", &1u64),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: the call hung"));
        let err = res.expect_err(what);
        assert!(!err.is_remote(), "{what}: a reply got through: {err:?}");
        assert!(err.is_protocol(), "{what}: {err:?}");
        let seen = tokio::time::timeout(Duration::from_secs(5), script)
            .await
            .unwrap_or_else(|_| panic!("{what}: the client did not close"))
            .unwrap();
        assert!(
            matches!(seen.last(), Some(Message::GoAway { code: c, .. }) if *c == code),
            "{what}: the client said {seen:?}"
        );
        assert_eq!(client.pending(), 0, "{what}");
    }
}

#[tokio::test]
async fn a_ping_to_an_idle_client_is_answered_with_its_data() {
    // §9: a client answers PINGs promptly, also with no call in flight.
    let (addr, script) = support::raw_server(|mut conn| async move {
        for data in [0, 7, u64::MAX] {
            conn.write_frame(vec![Message::Ping { data }]).await;
            let got = conn
                .read_frame_within(Duration::from_secs(2))
                .await
                .expect("the client closed");
            assert_eq!(got, vec![Message::Pong { data }]);
        }
    })
    .await;
    let client = Client::builder().connect(addr).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), script)
        .await
        .expect("no PONG in time")
        .unwrap();
    drop(client);
}

/// A server that sends `pings` PINGs in one frame after the client's request, then reads what
/// the client sends until it closes (or, when the client keeps the connection, until the
/// client's PONGs have all come).
async fn ping_flood(pings: u64) -> (Client, tokio::task::JoinHandle<Vec<Message>>) {
    let (addr, script) = support::raw_server(move |mut conn| async move {
        conn.read_request_id().await;
        conn.write_frame((0..pings).map(|data| Message::Ping { data }).collect())
            .await;
        let mut seen = Vec::new();
        while seen.len() < pings as usize {
            match conn.read_frame_within(Duration::from_secs(5)).await {
                Some(msgs) => seen.extend(msgs),
                None => break,
            }
            if matches!(seen.last(), Some(Message::GoAway { .. })) {
                break;
            }
        }
        seen
    })
    .await;
    (Client::builder().connect(addr).await.unwrap(), script)
}

#[tokio::test]
async fn a_server_pinging_past_its_budget_gets_goaway_resource_exhausted() {
    // §11: a client budgets its server's PINGs as a server budgets a client's (each costs a
    // PONG, queued even while the server reads nothing).
    let (client, script) = ping_flood(101).await;
    let call = client.invoke::<_, u64>("echo", &1u64);
    let err = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the call hung")
        .unwrap_err();
    assert!(err.is_protocol(), "{err:?}");
    let seen = script.await.unwrap();
    let pongs = seen
        .iter()
        .filter(|m| matches!(m, Message::Pong { .. }))
        .count();
    assert!(pongs <= 100, "{pongs} PONGs");
    assert!(
        matches!(seen.last(), Some(Message::GoAway { code: 7, reason }) if reason.as_ref() == b"too many pings"),
        "no GOAWAY RESOURCE_EXHAUSTED: {:?}",
        seen.last()
    );
    assert_eq!(client.stats().protocol_errors, 1);
}

#[tokio::test]
async fn a_server_pinging_within_its_budget_gets_every_pong() {
    let (client, script) = ping_flood(100).await;
    let c = client.clone();
    let call = tokio::spawn(async move { c.invoke::<_, u64>("echo", &1u64).await });
    let seen = tokio::time::timeout(Duration::from_secs(10), script)
        .await
        .expect("the PONGs did not come")
        .unwrap();
    let pongs: Vec<u64> = seen
        .iter()
        .filter_map(|m| match m {
            Message::Pong { data } => Some(*data),
            _ => None,
        })
        .collect();
    assert_eq!(pongs, (0..100).collect::<Vec<_>>(), "{seen:?}");
    assert_eq!(client.stats().protocol_errors, 0);
    assert!(!call.is_finished(), "the call, unanswered, waits on");
    call.abort();
}

#[tokio::test]
async fn error_codes_the_client_does_not_know_are_unknown() {
    // §10: a receiver treats a code it does not know as UNKNOWN (2); 0 is never sent in an
    // ERROR, and is no success.
    use tokio::io::AsyncWriteExt;
    let codes = [0u16, 15, 999, u16::MAX];
    let (addr, script) = support::raw_server(move |mut conn| async move {
        let mut ids = Vec::new();
        while ids.len() < codes.len() {
            for m in conn.read_frame().await.expect("requests") {
                if let Message::Request { id, body, .. } = m {
                    ids.push((id, body));
                }
            }
        }
        let mut out = Vec::new();
        for (id, body) in ids {
            let n: usize = rmp_serde::from_slice(&body).unwrap();
            out.extend(raw_frame(0, 0, 1, &raw_error(id, codes[n], b"odd")));
        }
        conn.stream.write_all(&out).await.unwrap();
        conn.read_to_end_within(Duration::from_secs(5)).await
    })
    .await;
    let client = Client::builder().connect(addr).await.unwrap();
    let calls = (0..codes.len()).map(|n| {
        let client = client.clone();
        async move { client.invoke::<_, u64>("Echo", &n).await }
    });
    let results = tokio::time::timeout(
        Duration::from_secs(5),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("the calls hung");
    for (n, res) in results.into_iter().enumerate() {
        let err = res.unwrap_err();
        assert!(err.is_remote(), "code {}: {err:?}", codes[n]);
        assert_eq!(
            err.code(),
            Some(towerpc::Code::Unknown),
            "code {}",
            codes[n]
        );
    }
    assert!(client.is_connected());
    client.close().await;
    let seen = script.await.unwrap();
    assert!(
        !seen
            .iter()
            .any(|m| matches!(m, Message::GoAway { code: 11, .. })),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_reply_to_a_timed_out_call_is_a_protocol_error_and_reaches_no_caller() {
    // §6: the late reply to a call that timed out is dropped and frees its id; one more for
    // that id is awaited by nobody, and must not reach the call in flight beside it.
    use tokio::io::AsyncWriteExt;
    let (addr, script) = support::raw_server(|mut conn| async move {
        let mut ids = Vec::new();
        while ids.len() < 2 {
            for m in conn.read_frame().await.expect("requests") {
                if let Message::Request { id, .. } = m {
                    ids.push(id);
                }
            }
        }
        let (late, live) = (ids[0], ids[1]);
        assert_ne!(late, live, "an id reused before its reply");
        let body = support::msgpack(&99u64);
        let mut out = raw_frame(0, 0, 1, &raw_response(late, body.len() as u32, &body));
        out.extend(raw_frame(
            0,
            0,
            1,
            &raw_response(late, body.len() as u32, &body),
        ));
        conn.stream.write_all(&out).await.unwrap();
        conn.read_to_end_within(Duration::from_secs(5)).await
    })
    .await;
    let client = Client::builder().connect(addr).await.unwrap();
    let first = client.request(
        Request::new("Echo", support::msgpack(&1u64)).with_timeout(Duration::from_millis(100)),
    );
    let err = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("the first call hung")
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    let second = client.invoke::<_, u64>("Echo", &2u64);
    let res = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the second call hung");
    let err = res.expect_err("the second call got the first one's reply");
    assert!(err.is_protocol(), "{err:?}");
    let seen = tokio::time::timeout(Duration::from_secs(5), script)
        .await
        .expect("the client did not close")
        .unwrap();
    assert!(
        matches!(seen.last(), Some(Message::GoAway { code: 11, .. })),
        "{seen:?}"
    );
}

#[tokio::test]
async fn an_ack_for_more_than_the_client_sent_is_a_protocol_error() {
    // §4.1, §12: the client's request goes in fragments; an ACK for exactly its pieces is
    // fine, one byte more is not.
    let (addr, script) = support::raw_server(|mut conn| async move {
        // Frames holding pieces decode to nothing until the last piece is in.
        let (method, metadata, body) = loop {
            let msgs = conn
                .read_frame_within(Duration::from_secs(5))
                .await
                .expect("a request");
            match msgs.first().cloned() {
                None => continue,
                Some(Message::Request {
                    method,
                    metadata,
                    body,
                    ..
                }) => break (method, metadata, body),
                Some(m) => panic!("expected a request, got {m:?}"),
            }
        };
        let sent = (16 + method.len() + metadata.len() + body.len()) as u32;
        // Exactly what was sent: accepted, and the client answers the PING behind it.
        conn.write_frame(vec![
            Message::Ack { bytes: sent },
            Message::Ping { data: 5 },
        ])
        .await;
        let pong = conn.read_frame_within(Duration::from_secs(5)).await;
        assert_eq!(pong, Some(vec![Message::Pong { data: 5 }]));
        conn.write_frame(vec![Message::Ack { bytes: 1 }]).await;
        conn.read_to_end_within(Duration::from_secs(5)).await
    })
    .await;
    let client = Client::builder().connect(addr).await.unwrap();
    let big = Request::new("Echo", vec![0x33u8; 300_000]);
    let res = tokio::time::timeout(Duration::from_secs(5), client.request(big))
        .await
        .expect("the call hung");
    let err = res.unwrap_err();
    assert!(err.is_protocol(), "{err:?}");
    let seen = tokio::time::timeout(Duration::from_secs(5), script)
        .await
        .expect("the client did not close")
        .unwrap();
    assert!(
        matches!(seen.last(), Some(Message::GoAway { code: 11, .. })),
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_reply_to_a_request_not_yet_sent_is_a_protocol_error_not_its_answer() {
    // §6, §12: a reply is awaited only for a request that was sent. Call A goes out in
    // fragments until the window is full (the server never acknowledges); call B, as large,
    // waits behind it with not one byte sent. A "reply" to B, its id guessed (ids are
    // sequential), must not reach B's caller as the server's answer.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (addr, script) = support::raw_server(|mut conn| async move {
        let mut head = [0u8; 8];
        conn.stream.read_exact(&mut head).await.unwrap();
        let n = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
        let mut body = vec![0u8; n];
        conn.stream.read_exact(&mut body).await.unwrap();
        assert_eq!(&body[..1], &[0x09], "A in fragments");
        let a = u32::from_be_bytes(body[7..11].try_into().unwrap());
        // B is queued meanwhile.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reply = support::msgpack(&"forged");
        let forged = raw_response(a + 1, reply.len() as u32, &reply);
        conn.stream
            .write_all(&raw_frame(0, 0, 1, &forged))
            .await
            .unwrap();
        // Frame by frame to the end (by hand: A's pieces stop mid-message); the last one's body.
        let mut last = Vec::new();
        let read_all = async {
            loop {
                let mut head = [0u8; 8];
                if conn.stream.read_exact(&mut head).await.is_err() {
                    return;
                }
                let n = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
                last = vec![0u8; n];
                if conn.stream.read_exact(&mut last).await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read_all)
            .await
            .expect("the client did not close");
        last
    })
    .await;
    let client = Client::builder().connect(addr).await.unwrap();
    let a = client.request(Request::new("A", vec![1u8; 3 << 20]));
    let b = {
        let client = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.request(Request::new("B", vec![2u8; 3 << 20])).await
        })
    };
    let b = tokio::time::timeout(Duration::from_secs(5), b)
        .await
        .expect("call B hung")
        .unwrap();
    let err = b.expect_err("B got an answer to a request the server never saw");
    assert!(!err.is_remote(), "{err:?}");
    let a = tokio::time::timeout(Duration::from_secs(5), a)
        .await
        .expect("call A hung");
    assert!(a.is_err(), "{a:?}");
    let last = script.await.unwrap();
    assert_eq!(
        last.get(..3),
        Some(&[0x08, 0, 11][..]),
        "not a GOAWAY 11 last"
    );
}

#[tokio::test]
async fn calls_pending_at_a_server_goaway_are_not_retry_safe_whatever_its_code() {
    // §6: when the connection closes with calls pending, the client cannot tell whether they
    // ran; a GOAWAY (§5.6) says why the server goes, not what became of each call. Only an
    // ERROR REFUSED for the call itself says it never ran (§10).
    use tokio::io::AsyncWriteExt;
    for code in [2u16, 6, 7, 11, 14, 999] {
        let (addr, script) = support::raw_server(move |mut conn| async move {
            conn.read_request_id().await;
            let mut m = vec![0x08];
            m.extend_from_slice(&code.to_be_bytes());
            m.extend_from_slice(&3u16.to_be_bytes());
            m.extend_from_slice(b"bye");
            conn.stream
                .write_all(&raw_frame(0, 0, 1, &m))
                .await
                .unwrap();
            conn.stream.shutdown().await.unwrap();
            conn.read_to_end_within(Duration::from_secs(5)).await
        })
        .await;
        let client = Client::builder().connect(addr).await.unwrap();
        let res = tokio::time::timeout(
            Duration::from_secs(5),
            client.invoke::<_, u64>("Echo", &1u64),
        )
        .await
        .unwrap_or_else(|_| panic!("GOAWAY {code}: the call hung"));
        let err = res.expect_err("a reply from nowhere");
        assert!(!err.is_retry_safe(), "GOAWAY {code}: {err:?}");
        script.await.unwrap();
    }
}

#[cfg(all(
    feature = "compression-zstd",
    feature = "compression-deflate",
    feature = "compression-lz4"
))]
#[tokio::test]
async fn the_client_offers_no_reserved_bit_and_sends_nothing_before_the_server_preface() {
    // §3.3: a v1 client offers no reserved compression bit. §3.1: it sends no frame before it
    // has read the server's preface, even with calls waiting to go.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use towerpc::codec::{Compression, PREFACE_LEN};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = Client::builder()
        .compression(Compression::Zstd)
        .compression(Compression::Deflate)
        .compression(Compression::Lz4)
        .connect_lazy(addr);
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.invoke::<_, u64>("Echo", &1u64).await })
    };
    let (mut stream, _) = listener.accept().await.unwrap();
    let mut preface = [0u8; PREFACE_LEN];
    stream.read_exact(&mut preface).await.unwrap();
    assert_eq!(preface[6], 0x07, "the offer: {:#04x}", preface[6]);
    eventually("the call queued", Duration::from_secs(5), || {
        client.pending() == 1
    })
    .await;
    let mut early = [0u8; 1];
    let quiet = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut early)).await;
    assert!(
        quiet.is_err(),
        "the client sent {quiet:?} before the server's preface"
    );
    // With the preface (no compression chosen), the request comes.
    stream
        .write_all(&support::server_preface(16 << 20))
        .await
        .unwrap();
    let mut conn = support::RawConn::new(stream);
    let msgs = conn
        .read_frame_within(Duration::from_secs(5))
        .await
        .expect("the request");
    assert!(
        matches!(msgs.first(), Some(Message::Request { .. })),
        "{msgs:?}"
    );
    drop(conn);
    let _ = call.await;
}

#[tokio::test]
async fn a_server_vanishing_mid_frame_or_mid_message_fails_the_call_and_nothing_hangs() {
    // §12: EOF inside a frame is a truncated connection, and EOF with a message partly
    // reassembled drops it (§4.1); the call fails as lost (it may have run), never with the
    // partial bytes as its reply.
    use tokio::io::AsyncWriteExt;
    type Cut = fn(u32) -> Vec<u8>;
    let cuts: [(&str, Cut); 2] = [
        ("half a RESPONSE frame", |id| {
            let body = support::msgpack(&7u64);
            let f = raw_frame(0, 0, 1, &raw_response(id, body.len() as u32, &body));
            f[..f.len() / 2].to_vec()
        }),
        ("the first FRAGMENT of a RESPONSE", |id| {
            let m = raw_response(id, 100, &[0xC0; 50]);
            raw_frame(0, 0, 1, &raw_fragment(1, &m))
        }),
    ];
    for (what, cut) in cuts {
        let (addr, script) = support::raw_server(move |mut conn| async move {
            let id = conn.read_request_id().await;
            conn.stream.write_all(&cut(id)).await.unwrap();
            // Gone: both directions closed.
        })
        .await;
        let client = Client::builder().connect(addr).await.unwrap();
        let res = tokio::time::timeout(
            Duration::from_secs(5),
            client.invoke::<_, u64>("Echo", &1u64),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: the call hung"));
        let err = res.expect_err(what);
        assert!(!err.is_remote(), "{what}: {err:?}");
        assert!(!err.is_retry_safe(), "{what}: {err:?}");
        script.await.unwrap();
        assert_eq!(client.pending(), 0, "{what}");
    }
}
