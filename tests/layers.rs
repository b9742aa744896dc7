//! The client as a tower citizen: requests layers can work with, the retry policy and its
//! budget, one error type after a stack, `Service::call` on an owned client, cancel and close,
//! wait-for-ready and honest readiness, several connections, and deadlines that flow into
//! nested calls.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceBuilder, ServiceExt};
use towerpc::retry::Policy;
use towerpc::{
    BoxError, Client, Code, Error, IntoErrorLayer, Request, Response, Server, Status, Timeout,
};

use support::{eventually, service, within};

const BOUND: Duration = Duration::from_secs(10);

fn refused() -> BoxError {
    Status::new(Code::Refused, "draining").into()
}

// ===== requests =====

#[test]
fn request_setters_keep_default_and_never_apart() {
    let mut req = Request::new("M", "body");
    assert_eq!(req.timeout(), Timeout::Default);
    req.set_timeout(None);
    assert_eq!(req.timeout(), Timeout::Never);
    req.set_timeout(Duration::from_millis(5));
    assert_eq!(req.timeout(), Timeout::After(Duration::from_millis(5)));
    req.set_timeout(Timeout::Default);
    assert_eq!(req.timeout(), Timeout::Default);
    *req.metadata_mut() = bytes::Bytes::from_static(b"\x80");
    let copy = req.clone();
    assert_eq!(copy.method(), "M");
    assert_eq!(&copy.metadata()[..], b"\x80");
    assert_eq!(copy.body(), req.body());
    // Cloning shares the bytes.
    assert_eq!(copy.body().as_ptr(), req.body().as_ptr());
}

// ===== retry policy, with mocks and paused time =====

/// A server that refuses every call for 10 s gets at most 1.2 × calls + the floor's attempts.
#[tokio::test(start_paused = true)]
async fn retry_budget_bounds_attempts_against_a_failing_server() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let failing = tower::service_fn(move |_req: Request| {
        counted.fetch_add(1, Ordering::Relaxed);
        async { Err::<Response, Error>(Error::from(refused())) }
    });
    let policy = Policy::new();
    let svc = ServiceBuilder::new().retry(policy.clone()).service(failing);
    let start = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    // 100 calls a second for 10 s, each retried up to 3 times if the budget allows.
    while start.elapsed() < Duration::from_secs(10) {
        let svc = svc.clone();
        calls.spawn(async move { svc.oneshot(Request::new("Pay", "x")).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut n = 0usize;
    while let Some(res) = calls.join_next().await {
        let err = res.unwrap().unwrap_err();
        assert_eq!(err.code(), Some(Code::Refused));
        n += 1;
    }
    let attempts = attempts.load(Ordering::Relaxed);
    // The floor: 10 retries a second, for as long as calls were retried (the budget's window
    // is 10 s; the last calls' retries run a little past the 10 s of load).
    let secs = start.elapsed().as_secs_f64().ceil() as usize;
    let floor = 10 * secs;
    let bound = (n as f64 * 1.2) as usize + floor;
    println!(
        "{n} calls, {attempts} attempts ({:.2} per call), {} retries, bound {bound}",
        attempts as f64 / n as f64,
        policy.retries()
    );
    assert!(n >= 1000, "only {n} calls in 10 s");
    assert!(attempts <= bound, "{attempts} attempts for {n} calls");
    assert_eq!(attempts as u64, n as u64 + policy.retries());
    // The budget, not the per-call cap of 3 retries, is what bounded them.
    assert!(policy.retries() > 0 && attempts < 2 * n);
}

/// Only what cannot have run is retried, unless the method is idempotent.
#[tokio::test(start_paused = true)]
async fn retry_policy_retries_only_what_cannot_have_run() {
    let p = Policy::new().idempotent("Get");
    let remote = |code| Error::from(BoxError::from(Status::new(code, "")));
    assert!(p.should_retry("Pay", &remote(Code::Refused)));
    assert!(!p.should_retry("Pay", &remote(Code::Application)));
    assert!(!p.should_retry("Pay", &remote(Code::Unavailable)));
    assert!(p.should_retry("Get", &remote(Code::Unavailable)));
    assert!(!p.should_retry("Get", &remote(Code::InvalidArgument)));
    let elapsed = Error::from(BoxError::from(tower::timeout::error::Elapsed::new()));
    assert!(!p.should_retry("Pay", &elapsed));
    assert!(p.should_retry("Get", &elapsed));
    let shed = Error::from(BoxError::from(tower::load_shed::error::Overloaded::new()));
    assert!(p.should_retry("Pay", &shed));
}

/// A refused call is retried after a backoff, and one-way messages are not retried.
#[tokio::test(start_paused = true)]
async fn refused_call_is_retried_after_a_backoff() {
    let (mock, mut handle) = tower_test::mock::pair::<Request, Response>();
    let mut svc = ServiceBuilder::new().retry(Policy::new()).service(mock);
    handle.allow(10);
    let call = tokio::spawn(async move {
        svc.ready()
            .await
            .unwrap()
            .call(Request::new("Pay", "1"))
            .await
    });
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.method(), "Pay");
    send.send_error(refused());
    // The retry waits out a backoff (20–40 ms) first.
    let before = Instant::now();
    let (req, send) = handle.next_request().await.unwrap();
    let waited = before.elapsed();
    assert!(
        waited >= Duration::from_millis(20) && waited <= Duration::from_millis(40),
        "{waited:?}"
    );
    assert_eq!(&req.body()[..], b"1");
    send.send_response(Response::new("paid".into()));
    assert_eq!(&call.await.unwrap().unwrap().body()[..], b"paid");
}

// ===== one error type after a stack =====

#[tokio::test(flavor = "current_thread")]
async fn layer_errors_are_one_type_after_a_client_stack() {
    let server = support::serve(
        Server::builder(),
        service(|req: Request| async move {
            let ms: u64 = rmp_serde::from_slice(req.body())?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Response::new(req.into_body()))
        }),
    )
    .await;
    let client = Client::connect(server.addr).await.unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(IntoErrorLayer::new())
        .timeout(Duration::from_millis(200))
        .retry(Policy::new())
        .load_shed()
        .concurrency_limit(1)
        .service(client.clone());
    let call = |ms: u64| Request::new("Sleep", support::msgpack(&ms));

    // Fine.
    let resp = svc.ready().await.unwrap().call(call(1)).await.unwrap();
    assert_eq!(&resp.body()[..], &support::msgpack(&1u64)[..]);

    // Too slow: tower's Elapsed, seen as towerpc's timeout.
    let e: Error = svc
        .ready()
        .await
        .unwrap()
        .call(call(5_000))
        .await
        .unwrap_err();
    assert!(e.is_timeout(), "{e:?}");

    // Spawned on the multi-thread runtime's terms (Send), the error is still the one type.
    let e = tokio::spawn(svc.clone().oneshot(call(5_000)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.is_timeout(), "{e:?}");

    // The server's own answer keeps its code through the stack.
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new("Sleep", &b"\xc1"[..]))
        .await
        .unwrap_err();
    assert!(e.is_remote(), "{e:?}");
    assert_eq!(e.code(), Some(Code::Application));
}

/// `Service::call` works on an owned client with `tower::Service` in scope: the typed shortcut
/// is `invoke`, so nothing shadows it.
#[tokio::test(flavor = "current_thread")]
async fn service_call_on_an_owned_client() {
    let server = support::serve(Server::builder(), support::echo()).await;
    let mut client = Client::connect(server.addr).await.unwrap();
    let resp = client
        .ready()
        .await
        .unwrap()
        .call(Request::new("Echo", "hi"))
        .await
        .unwrap();
    assert_eq!(&resp.body()[..], b"hi");
    let mut stack = ServiceBuilder::new()
        .concurrency_limit(8)
        .service(client.clone());
    let resp = stack
        .ready()
        .await
        .unwrap()
        .call(Request::new("Echo", "again"))
        .await
        .unwrap();
    assert_eq!(&resp.body()[..], b"again");
    let n: u64 = client.invoke("Echo", &7u64).await.unwrap();
    assert_eq!(n, 7);
}

// ===== retries over sockets =====

/// A request refused once is retried once and runs exactly once.
#[tokio::test(flavor = "current_thread")]
async fn refused_request_is_retried_once_and_runs_once() {
    let runs = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(AtomicUsize::new(0));
    let (r, s) = (runs.clone(), seen.clone());
    let server = support::serve(
        Server::builder(),
        service(move |req: Request| {
            let (runs, seen) = (r.clone(), s.clone());
            async move {
                // The first arrival is refused unprocessed, as a draining server does.
                if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(refused());
                }
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(Response::new(req.into_body()))
            }
        }),
    )
    .await;
    let client = Client::connect(server.addr).await.unwrap();
    let policy = Policy::new();
    let svc = ServiceBuilder::new().retry(policy.clone()).service(client);
    let resp = within(BOUND, svc.oneshot(Request::new("Pay", "1")))
        .await
        .unwrap();
    assert_eq!(&resp.body()[..], b"1");
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(policy.retries(), 1);
}

/// A server that reads a request and then dies: the request may have run, so it is not
/// retried (unless the method is idempotent).
#[tokio::test(flavor = "current_thread")]
async fn request_lost_after_the_write_runs_at_most_once() {
    for idempotent in [false, true] {
        let received = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = received.clone();
        // Each connection: preface, read one frame, count its requests, close.
        let server = tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let count = count.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut stream = stream;
                    let mut preface = [0u8; towerpc::codec::PREFACE_LEN];
                    stream.read_exact(&mut preface).await.unwrap();
                    stream
                        .write_all(&support::server_preface(1 << 20))
                        .await
                        .unwrap();
                    let mut conn = support::RawConn::new(stream);
                    if let Some(msgs) = conn.read_frame().await {
                        count.fetch_add(msgs.len(), Ordering::SeqCst);
                    }
                });
            }
        });
        let client = Client::builder()
            .reconnect_backoff(Duration::from_millis(10), 1.0, Duration::from_millis(10))
            .wait_for_ready(true)
            .connect(addr)
            .await
            .unwrap();
        let mut policy = Policy::new().max_retries(1);
        if idempotent {
            policy = policy.idempotent("Pay");
        }
        let svc = ServiceBuilder::new().retry(policy.clone()).service(client);
        let err = within(
            BOUND,
            svc.oneshot(Request::new("Pay", "1").with_timeout(Duration::from_secs(5))),
        )
        .await
        .unwrap_err();
        assert!(err.is_closed() && !err.is_retry_safe(), "{err:?}");
        let expected = if idempotent { 2 } else { 1 };
        assert_eq!(
            received.load(Ordering::SeqCst),
            expected,
            "idempotent {idempotent}"
        );
        assert_eq!(policy.retries(), expected as u64 - 1);
        server.abort();
    }
}

// ===== cancel and close =====

#[tokio::test(flavor = "current_thread")]
async fn cancelled_call_resolves_cancelled_and_stops_the_handler() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let d = dropped.clone();
    let server = support::serve(
        Server::builder(),
        service(move |_req: Request| {
            let guard = DropCount(d.clone());
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Ok(Response::default())
            }
        }),
    )
    .await;
    let client = Client::connect(server.addr).await.unwrap();
    let token = CancellationToken::new();
    let call = tokio::spawn({
        let (client, token) = (client.clone(), token.clone());
        async move {
            client
                .request(Request::new("Forever", "").with_cancel(token))
                .await
        }
    });
    eventually("the handler runs", BOUND, || {
        server.stats().calls == 0 && client.pending() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    token.cancel();
    let err = within(BOUND, call).await.unwrap().unwrap_err();
    assert!(err.is_cancelled(), "{err:?}");
    eventually("the server stops the handler", BOUND, || {
        dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    // A token already cancelled stops the call before it is sent.
    let err = client
        .request(Request::new("Forever", "").with_cancel(token))
        .await
        .unwrap_err();
    assert!(err.is_cancelled());
}

struct DropCount(Arc<AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn close_flushes_one_way_messages_and_waits_for_calls() {
    let got = Arc::new(AtomicUsize::new(0));
    let g = got.clone();
    let server = support::serve(
        Server::builder(),
        service(move |req: Request| {
            let got = g.clone();
            async move {
                if req.method() == "Slow" {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                } else {
                    got.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Response::new(req.into_body()))
            }
        }),
    )
    .await;
    let client = Client::connect(server.addr).await.unwrap();
    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.invoke::<_, u64>("Slow", &1u64).await }
    });
    eventually("the slow call is sent", BOUND, || client.pending() == 1).await;
    for i in 0..100u64 {
        client.send("Note", &i).unwrap();
    }
    within(BOUND, client.close()).await;
    // The call made before close finished; the messages were all written.
    assert_eq!(within(BOUND, slow).await.unwrap().unwrap(), 1);
    eventually("all one-way messages arrive", BOUND, || {
        got.load(Ordering::SeqCst) == 100
    })
    .await;
    // New calls fail at once.
    let err = client.invoke::<_, u64>("Echo", &1u64).await.unwrap_err();
    assert!(err.is_closed(), "{err:?}");
    assert!(client.send("Note", &1u64).unwrap_err().is_closed());
    assert!(!client.is_connected());
}

// ===== readiness, load, wait-for-ready =====

#[tokio::test(flavor = "current_thread")]
async fn fail_fast_by_default_and_wait_for_ready_on_request() {
    use tower::load::Load;
    let addr = support::free_addr();
    let backoff = (Duration::from_millis(20), 1.0, Duration::from_millis(20));
    let fast = Client::builder()
        .reconnect_backoff(backoff.0, backoff.1, backoff.2)
        .connect_lazy(addr);
    let mut patient = Client::builder()
        .reconnect_backoff(backoff.0, backoff.1, backoff.2)
        .wait_for_ready(true)
        .connect_lazy(addr);
    eventually("the first dial fails", BOUND, || {
        fast.stats().dial_errors > 0
    })
    .await;
    eventually("the first dial fails", BOUND, || {
        patient.stats().dial_errors > 0
    })
    .await;

    // Fail-fast: at once, unavailable, safe to retry.
    let err = fast.invoke::<_, u64>("Echo", &1u64).await.unwrap_err();
    assert!(err.is_unavailable() && err.is_retry_safe(), "{err:?}");
    // A client without a connection is the worst endpoint there is.
    assert_eq!(fast.load(), usize::MAX);
    assert_eq!(patient.load(), usize::MAX);

    // Wait-for-ready: not ready, and a call waits up to its deadline.
    {
        let mut ready = tokio_test::task::spawn(patient.ready());
        tokio_test::assert_pending!(ready.poll());
    }
    let err = patient
        .request(Request::new("Echo", "x").with_timeout(Duration::from_millis(50)))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");

    // A call waiting when the server comes up goes through.
    let waiting = tokio::spawn({
        let patient = patient.clone();
        async move {
            patient
                .request(Request::new("Echo", "late").with_timeout(Duration::from_secs(5)))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let listener = support::rebind(addr).await;
    let _server = support::serve_on(listener, Server::builder(), support::echo());
    let resp = within(BOUND, waiting).await.unwrap().unwrap();
    assert_eq!(&resp.body()[..], b"late");
    within(BOUND, patient.ready()).await.unwrap();
    assert_eq!(patient.load(), 0);
}

// ===== several connections =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_spread_over_k_connections() {
    spread_over(2).await;
    // Above two, each call compares two connections chosen at random.
    spread_over(5).await;
}

async fn spread_over(k: usize) {
    let ports = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let p = ports.clone();
    let server = support::serve(
        Server::builder(),
        service(move |req: Request| {
            let port = req
                .connect_info()
                .and_then(|i| i.remote_addr())
                .map(|a| a.port());
            *p.lock().unwrap().entry(port).or_insert(0usize) += 1;
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok(Response::new(req.into_body()))
            }
        }),
    )
    .await;
    let client = Client::builder()
        .connections(k)
        .connect(server.addr)
        .await
        .unwrap();
    assert_eq!(server.stats().accepts, k as u64);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..400u64 {
        let c = client.clone();
        calls.spawn(async move { c.invoke::<_, u64>("Echo", &i).await });
    }
    while let Some(r) = calls.join_next().await {
        r.unwrap().unwrap();
    }
    let ports = ports.lock().unwrap();
    assert_eq!(ports.len(), k, "{ports:?}");
    for (port, n) in ports.iter() {
        assert!(
            *n >= 100 / k,
            "connection {port:?} got only {n} of 400 calls"
        );
    }
    assert_eq!(client.stats().calls, 400);
}

// ===== deadlines into nested calls =====

/// A → B → C with 100 ms: C sees at most what A and B left; cancelling at A stops C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_and_cancel_flow_down_a_chain() {
    let c_stopped = Arc::new(AtomicUsize::new(0));
    let stopped = c_stopped.clone();
    let c = support::serve(
        Server::builder(),
        service(move |req: Request| {
            let guard = DropCount(stopped.clone());
            async move {
                let _guard = guard;
                let left = match req.timeout() {
                    Timeout::After(d) => d.as_millis() as u64,
                    other => panic!("C got no deadline: {other:?}"),
                };
                if req.method() == "Hang" {
                    std::future::pending::<()>().await;
                }
                Ok(Response::new(support::msgpack(&left)))
            }
        }),
    )
    .await;
    // A hop that spends 20 ms and then calls the next server with the same method.
    let hop = |next: Client| {
        service(move |req: Request| {
            let next = next.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let method = req.method().to_string();
                Ok(next.request(Request::new(method, req.into_body())).await?)
            }
        })
    };
    let to_c = Client::connect(c.addr).await.unwrap();
    let b = support::serve(Server::builder(), hop(to_c)).await;
    let to_b = Client::connect(b.addr).await.unwrap();
    let a = support::serve(Server::builder(), hop(to_b)).await;
    let client = Client::connect(a.addr).await.unwrap();

    let started = Instant::now();
    let resp = client
        .request(Request::new("Left", "").with_timeout(Duration::from_millis(100)))
        .await
        .unwrap();
    let spent = started.elapsed();
    let left: u64 = rmp_serde::from_slice(resp.body()).unwrap();
    println!("C saw {left} ms of 100 left; the chain took {spent:?}");
    // A and B slept 20 ms each before calling on.
    assert!(left <= 60, "C saw {left} ms");

    // Cancel at A: its handler stops, which drops its call to B, which cancels B's, ...
    let token = CancellationToken::new();
    let call = tokio::spawn({
        let (client, token) = (client.clone(), token.clone());
        async move {
            let req = Request::new("Hang", "")
                .with_timeout(Duration::from_secs(30))
                .with_cancel(token);
            client.request(req).await
        }
    });
    eventually("C's handler runs", BOUND, || {
        c.stats().calls >= 1 && {
            // C's first call has finished; the hanging one is in flight on every hop.
            true
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = c_stopped.load(Ordering::SeqCst);
    token.cancel();
    assert!(within(BOUND, call)
        .await
        .unwrap()
        .unwrap_err()
        .is_cancelled());
    eventually("C's handler is stopped", BOUND, || {
        c_stopped.load(Ordering::SeqCst) > before
    })
    .await;
}

/// Closing a wait-for-ready client fails the calls waiting for a connection at once.
#[tokio::test(flavor = "current_thread")]
async fn close_fails_calls_waiting_for_a_connection() {
    let client = Client::builder()
        .reconnect_backoff(Duration::from_secs(60), 1.0, Duration::from_secs(60))
        .wait_for_ready(true)
        .connect_lazy(support::free_addr());
    eventually("the first dial fails", BOUND, || {
        client.stats().dial_errors > 0
    })
    .await;
    let waiting = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .request(Request::new("Echo", "x").with_timeout(Duration::from_secs(60)))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    within(BOUND, client.close()).await;
    let err = within(BOUND, waiting).await.unwrap().unwrap_err();
    assert!(err.is_closed(), "{err:?}");
    let mut svc = client.clone();
    let err = within(BOUND, svc.ready()).await.map(|_| ()).and(
        within(BOUND, client.invoke::<_, u64>("Echo", &1u64))
            .await
            .map(|_| ()),
    );
    assert!(err.unwrap_err().is_closed());
}
