//! The dispatcher end to end: handler shapes, payload types, rolling upgrades, errors, typed
//! method handles, one-way messages and batches, over real sockets on 127.0.0.1.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tower::{Service, ServiceExt};
use towerpc::dispatch::{CallContext, Dispatcher, MethodInfo, Receiver, METHODS};
use towerpc::{BoxError, Client, Code, Request, Server, Status};

use support::{eventually, within, TestServer};

const BOUND: Duration = Duration::from_secs(10);

async fn start(d: Dispatcher) -> (TestServer, Client) {
    let server = support::serve(Server::builder(), support::dispatcher(d)).await;
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(server.addr)
        .await
        .expect("connect");
    (server, client)
}

// ===== request and response types =====

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct AddReq {
    a: i64,
    b: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum CalcError {
    Overflow { a: i64, b: i64 },
    DivisionByZero,
}

impl fmt::Display for CalcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CalcError::Overflow { a, b } => write!(f, "{a} + {b} overflows"),
            CalcError::DivisionByZero => f.write_str("division by zero"),
        }
    }
}

impl From<CalcError> for Status {
    fn from(e: CalcError) -> Status {
        Status::typed(Code::InvalidArgument, &e)
    }
}

async fn add(req: AddReq) -> Result<i64, Status> {
    Ok(req
        .a
        .checked_add(req.b)
        .ok_or(CalcError::Overflow { a: req.a, b: req.b })?)
}

fn calc() -> Dispatcher {
    Dispatcher::new()
        .route("Calc.Add", add)
        .route("Calc.Div", |(a, b): (i64, i64)| async move {
            a.checked_div(b)
                .ok_or(Status::from(CalcError::DivisionByZero))
        })
}

// ===== handler shapes =====

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CtxInfo {
    method: String,
    remote_port: Option<u16>,
    remaining_ms: Option<u64>,
    metadata: serde_bytes::ByteBuf,
    one_way: bool,
}

fn describe(ctx: &CallContext) -> CtxInfo {
    CtxInfo {
        method: ctx.method().to_owned(),
        remote_port: ctx.remote_addr().map(|a| a.port()),
        remaining_ms: ctx.remaining().map(|d| d.as_millis() as u64),
        metadata: serde_bytes::ByteBuf::from(ctx.metadata().to_vec()),
        one_way: ctx.is_one_way(),
    }
}

#[tokio::test]
async fn every_handler_shape_serves() {
    let pings = Arc::new(AtomicU64::new(0));
    let p = pings.clone();
    let d = Dispatcher::new()
        // No argument, nothing returned.
        .route("Ping", move || {
            let p = p.clone();
            async move {
                p.fetch_add(1, SeqCst);
            }
        })
        // No argument, a value.
        .route("Version", || async { "1.2.3" })
        // The request, a value.
        .route("Double", |n: u64| async move { n * 2 })
        // The request, a Result with a std error.
        .route("Parse", |s: String| async move { s.parse::<i64>() })
        // The request, a Result with a BoxError.
        .route("Sqrt", |x: f64| async move {
            if x < 0.0 {
                return Err(BoxError::from("negative"));
            }
            Ok(x.sqrt())
        })
        // Context and request.
        .route(
            "Ctx",
            |ctx: CallContext, (): ()| async move { describe(&ctx) },
        )
        // Context and request, a Result.
        .route("CtxEcho", |ctx: CallContext, s: String| async move {
            Ok::<_, Status>(format!("{}:{s}", ctx.method()))
        })
        .route("Add", add);

    let (_server, client) = start(d).await;
    within(BOUND, async {
        client.invoke::<_, ()>("Ping", &()).await.unwrap();
        assert_eq!(pings.load(SeqCst), 1);
        assert_eq!(
            client.invoke::<_, String>("Version", &()).await.unwrap(),
            "1.2.3"
        );
        assert_eq!(client.invoke::<_, u64>("Double", &21u64).await.unwrap(), 42);
        assert_eq!(client.invoke::<_, i64>("Parse", "-7").await.unwrap(), -7);
        let e = client.invoke::<_, i64>("Parse", "x").await.unwrap_err();
        assert_eq!(e.code(), Some(Code::Application));
        assert_eq!(
            e.status().unwrap().message(),
            "invalid digit found in string"
        );
        assert_eq!(client.invoke::<_, f64>("Sqrt", &9.0).await.unwrap(), 3.0);
        let e = client.invoke::<_, f64>("Sqrt", &-1.0).await.unwrap_err();
        assert_eq!(e.status().unwrap().message(), "negative");

        let info: CtxInfo = client.invoke("Ctx", &()).await.unwrap();
        assert_eq!(info.method, "Ctx");
        assert!(info.remote_port.is_some_and(|p| p != 0));
        // The client's 5 s default timeout reaches the handler as its deadline.
        let ms = info.remaining_ms.expect("a deadline");
        assert!(ms > 3_000 && ms <= 5_000, "remaining {ms} ms");
        assert!(!info.one_way);
        assert_eq!(
            client.invoke::<_, String>("CtxEcho", "x").await.unwrap(),
            "CtxEcho:x"
        );
        assert_eq!(
            client
                .invoke::<_, i64>("Add", &AddReq { a: 2, b: 3 })
                .await
                .unwrap(),
            5
        );
    })
    .await;
}

#[tokio::test]
async fn context_carries_metadata_deadline_and_address() {
    let d = Dispatcher::new().route(
        "Ctx",
        |ctx: CallContext, (): ()| async move { describe(&ctx) },
    );
    let (_server, client) = start(d).await;
    within(BOUND, async {
        let body = towerpc::payload::to_msgpack(&()).unwrap();
        let req = Request::new("Ctx", body)
            .with_metadata(Bytes::from_static(b"\x81\xa2id\x07"))
            .with_timeout(Duration::from_millis(1500));
        let resp = client.request(req).await.unwrap();
        let info: CtxInfo = towerpc::payload::from_msgpack(resp.body()).unwrap();
        assert_eq!(&info.metadata[..], b"\x81\xa2id\x07");
        let ms = info.remaining_ms.expect("a deadline");
        assert!(ms > 0 && ms <= 1500, "remaining {ms} ms");
        assert!(info.remote_port.is_some_and(|p| p != 0));

        // Without a timeout there is no deadline.
        let req =
            Request::new("Ctx", towerpc::payload::to_msgpack(&()).unwrap()).with_timeout(None);
        let resp = client.request(req).await.unwrap();
        let info: CtxInfo = towerpc::payload::from_msgpack(resp.body()).unwrap();
        assert_eq!(info.remaining_ms, None);
    })
    .await;
}

// ===== receivers with shared state =====

#[derive(Default)]
struct Cache {
    entries: Mutex<HashMap<String, String>>,
    hits: AtomicU64,
}

impl Cache {
    async fn get(self: Arc<Self>, key: String) -> Option<String> {
        self.hits.fetch_add(1, SeqCst);
        self.entries.lock().unwrap().get(&key).cloned()
    }

    async fn set(self: Arc<Self>, (key, value): (String, String)) {
        self.entries.lock().unwrap().insert(key, value);
    }

    async fn len(self: Arc<Self>) -> usize {
        self.entries.lock().unwrap().len()
    }

    async fn who(self: Arc<Self>, ctx: CallContext, key: String) -> String {
        format!("{} {key} {}", ctx.method(), self.hits.load(SeqCst))
    }
}

impl Cache {
    /// The remote methods of any `Cache`.
    fn methods(r: Receiver<Self>) -> Receiver<Self> {
        r.method("Get", Cache::get)
            .method("Set", Cache::set)
            .method("Len", Cache::len)
            .method("Who", Cache::who)
    }
}

/// Two instances of one type: one registered method by method with `route_with`, the other
/// as a whole receiver.
fn caches(users: &Arc<Cache>, posts: &Arc<Cache>) -> Dispatcher {
    Dispatcher::new()
        .route_with("UsersCache.Get", users.clone(), Cache::get)
        .route_with("UsersCache.Set", users.clone(), Cache::set)
        .route_with("UsersCache.Len", users.clone(), Cache::len)
        .route_with("UsersCache.Who", users.clone(), Cache::who)
        .receiver("PostsCache", posts.clone(), Cache::methods)
}

#[tokio::test]
async fn two_receivers_of_one_type_keep_their_own_state() {
    let users = Arc::new(Cache::default());
    let posts = Arc::new(Cache::default());
    let (_server, client) = start(caches(&users, &posts)).await;
    within(BOUND, async {
        let set = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        client
            .invoke::<_, ()>("UsersCache.Set", &set("alice", "admin"))
            .await
            .unwrap();
        client
            .invoke::<_, ()>("PostsCache.Set", &set("1", "hello"))
            .await
            .unwrap();
        client
            .invoke::<_, ()>("PostsCache.Set", &set("2", "world"))
            .await
            .unwrap();

        let get = |m: &'static str, k: &str| {
            let client = client.clone();
            let k = k.to_owned();
            async move { client.invoke::<_, Option<String>>(m, &k).await.unwrap() }
        };
        assert_eq!(
            get("UsersCache.Get", "alice").await.as_deref(),
            Some("admin")
        );
        assert_eq!(get("PostsCache.Get", "alice").await, None);
        assert_eq!(get("PostsCache.Get", "2").await.as_deref(), Some("world"));
        assert_eq!(
            client
                .invoke::<_, usize>("UsersCache.Len", &())
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            client
                .invoke::<_, usize>("PostsCache.Len", &())
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            client
                .invoke::<_, String>("PostsCache.Who", "k")
                .await
                .unwrap(),
            "PostsCache.Who k 2"
        );
    })
    .await;
    // The server's state is the program's own: the same Arcs.
    assert_eq!(users.entries.lock().unwrap().len(), 1);
    assert_eq!(users.hits.load(SeqCst), 1);
    assert_eq!(posts.hits.load(SeqCst), 2);
}

// ===== payload types =====

/// Serves an echo of `T` and checks that `value` comes back equal.
async fn round_trip<T>(value: T)
where
    T: Serialize + DeserializeOwned + PartialEq + fmt::Debug + Send + 'static,
{
    let d = Dispatcher::new().route("Echo", |v: T| async move { v });
    let (_server, client) = start(d).await;
    let back: T = within(BOUND, client.invoke("Echo", &value)).await.unwrap();
    assert_eq!(back, value);
}

#[tokio::test]
async fn unit_round_trips() {
    round_trip(()).await;
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct UnitStruct;

#[tokio::test]
async fn unit_struct_round_trips() {
    round_trip(UnitStruct).await;
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct EmptyStruct {}

#[tokio::test]
async fn empty_struct_round_trips() {
    round_trip(EmptyStruct {}).await;
}

#[tokio::test]
async fn set_as_map_of_unit_round_trips() {
    let set: HashMap<String, ()> = ["a", "b", "c"]
        .iter()
        .map(|k| (k.to_string(), ()))
        .collect();
    round_trip(set).await;
    let ids: BTreeMap<u64, ()> = (0..100).map(|k| (k, ())).collect();
    round_trip(ids).await;
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Shape {
    Empty,
    Circle(f64),
    Rect { w: u32, h: u32 },
    Pair(i8, String),
}

#[tokio::test]
async fn enums_round_trip() {
    round_trip(Shape::Empty).await;
    round_trip(Shape::Circle(1.5)).await;
    round_trip(Shape::Rect { w: 3, h: 4 }).await;
    round_trip(vec![Shape::Pair(-1, "x".into()), Shape::Empty]).await;
}

#[tokio::test]
async fn options_round_trip() {
    round_trip(Some(7u8)).await;
    round_trip(None::<String>).await;
    round_trip(vec![Some(1u8), None, Some(3)]).await;
    // msgpack has one nil: `Some(x)` is written as `x`, so an `Option` of something that is
    // itself nil (`()`, `None`) reads back as `None`. Documented in the dispatch module.
    let d = Dispatcher::new().route("Echo", |v: Option<Option<u8>>| async move { v });
    let (_server, client) = start(d).await;
    let back: Option<Option<u8>> = within(BOUND, client.invoke("Echo", &Some(None::<u8>)))
        .await
        .unwrap();
    assert_eq!(back, None);
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Blob {
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    raw: serde_bytes::ByteBuf,
}

#[tokio::test]
async fn byte_strings_round_trip() {
    let blob = Blob {
        data: (0..=255).collect(),
        raw: serde_bytes::ByteBuf::from(vec![0u8; 100_000]),
    };
    round_trip(blob).await;
    // serde_bytes makes them msgpack bin, not arrays of integers.
    let bytes = towerpc::payload::to_msgpack(&serde_bytes::ByteBuf::from(vec![1u8, 2])).unwrap();
    assert_eq!(&bytes[..], &[0xc4, 2, 1, 2]);
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Event {
    at: chrono::DateTime<chrono::Utc>,
    local: chrono::NaiveDateTime,
    #[serde(with = "time::serde::rfc3339")]
    logged: time::OffsetDateTime,
    took: time::Duration,
}

#[tokio::test]
async fn timestamps_round_trip() {
    use chrono::TimeZone;
    let at = chrono::Utc
        .with_ymd_and_hms(2024, 2, 29, 23, 59, 58)
        .unwrap()
        + chrono::Duration::nanoseconds(123_456_789);
    round_trip(at).await;
    round_trip(Event {
        at,
        local: at.naive_utc(),
        logged: time::macros::datetime!(2024-02-29 23:59:58.5 +01:00),
        took: time::Duration::milliseconds(1500),
    })
    .await;
    // `time`'s default (non-human-readable) form, a tuple, works as well.
    round_trip(time::macros::datetime!(1999-12-31 23:59:59.999 UTC)).await;
}

// ===== rolling upgrades =====

#[allow(unreachable_pub)]
mod v1 {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct User {
        pub name: String,
        pub age: u32,
    }
}

#[allow(unreachable_pub)]
mod v2 {
    use serde::{Deserialize, Serialize};

    /// v1 plus an optional field.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct User {
        pub name: String,
        pub age: u32,
        #[serde(default)]
        pub email: Option<String>,
        #[serde(default)]
        pub tags: Vec<String>,
    }
}

#[tokio::test]
async fn new_server_talks_to_old_client() {
    // The new server fills in the fields an old client does not send, and its replies carry
    // fields the old client skips.
    let d = Dispatcher::new().route("Users.Touch", |mut u: v2::User| async move {
        assert_eq!(u.email, None);
        u.age += 1;
        u.email = Some(format!("{}@example.com", u.name));
        u.tags.push("touched".into());
        u
    });
    let (_server, client) = start(d).await;
    let old = v1::User {
        name: "ann".into(),
        age: 40,
    };
    let back: v1::User = within(BOUND, client.invoke("Users.Touch", &old))
        .await
        .unwrap();
    assert_eq!(
        back,
        v1::User {
            name: "ann".into(),
            age: 41
        }
    );
}

#[tokio::test]
async fn old_server_talks_to_new_client() {
    let d = Dispatcher::new().route("Users.Touch", |mut u: v1::User| async move {
        u.age += 1;
        u
    });
    let (_server, client) = start(d).await;
    let new = v2::User {
        name: "bob".into(),
        age: 30,
        email: Some("bob@example.com".into()),
        tags: vec!["x".into()],
    };
    let back: v2::User = within(BOUND, client.invoke("Users.Touch", &new))
        .await
        .unwrap();
    // The old server dropped what it did not know; the new client defaults it.
    assert_eq!(
        back,
        v2::User {
            name: "bob".into(),
            age: 31,
            email: None,
            tags: vec![],
        }
    );
}

// ===== the built-in method list =====

#[tokio::test]
async fn methods_lists_names_and_types() {
    let d = calc().route("Ping", || async {});
    let (_server, client) = start(d).await;
    let list: Vec<MethodInfo> = within(BOUND, client.invoke(METHODS, &())).await.unwrap();
    let names: Vec<&str> = list.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["Calc.Add", "Calc.Div", "Ping", "towerpc.methods"]);
    assert!(list[0].request.ends_with("AddReq"), "{:?}", list[0]);
    assert_eq!(list[0].response, "i64");
    assert_eq!(list[1].request, "(i64, i64)");
    assert_eq!(
        (list[2].request.as_str(), list[2].response.as_str()),
        ("()", "()")
    );
    assert!(list[3].response.contains("MethodInfo"));
}

// ===== errors =====

#[tokio::test]
async fn unknown_method_names_it_and_keeps_the_connection() {
    let (server, client) = start(calc()).await;
    within(BOUND, async {
        let e = client
            .invoke::<_, i64>("Calc.Ad", &(1, 2))
            .await
            .unwrap_err();
        assert!(e.is_remote());
        assert_eq!(e.code(), Some(Code::NotFound));
        assert_eq!(e.status().unwrap().message(), "unknown method \"Calc.Ad\"");
        let sum: i64 = client
            .invoke("Calc.Add", &AddReq { a: 1, b: 2 })
            .await
            .unwrap();
        assert_eq!(sum, 3);
    })
    .await;
    assert_eq!(client.stats().dials, 1);
    assert_eq!(server.stats().accepts, 1);
}

#[tokio::test]
async fn wrong_request_type_names_method_and_type() {
    let (server, client) = start(calc()).await;
    within(BOUND, async {
        let e = client
            .invoke::<_, i64>("Calc.Add", "not an AddReq")
            .await
            .unwrap_err();
        assert!(e.is_remote());
        assert_eq!(e.code(), Some(Code::InvalidArgument));
        let msg = e.status().unwrap().message();
        assert!(
            msg.starts_with("method \"Calc.Add\": request does not decode as ")
                && msg.contains("AddReq"),
            "{msg}"
        );
        // Bytes that are not msgpack at all.
        let resp = client
            .request(Request::new("Calc.Div", Bytes::from_static(b"\xc1garbage")))
            .await
            .unwrap_err();
        assert_eq!(resp.code(), Some(Code::InvalidArgument));
        assert!(resp.status().unwrap().message().contains("(i64, i64)"));
        // Still the same connection.
        assert_eq!(
            client.invoke::<_, i64>("Calc.Div", &(9, 3)).await.unwrap(),
            3
        );
    })
    .await;
    assert_eq!(client.stats().dials, 1);
    assert_eq!(server.stats().accepts, 1);
}

#[tokio::test]
async fn typed_handler_errors_reach_the_client() {
    let (_server, client) = start(calc()).await;
    within(BOUND, async {
        let e = client
            .invoke::<_, i64>("Calc.Add", &AddReq { a: i64::MAX, b: 1 })
            .await
            .unwrap_err();
        assert!(e.is_remote());
        assert_eq!(e.code(), Some(Code::InvalidArgument));
        assert_eq!(
            e.status().unwrap().message(),
            format!("{} + 1 overflows", i64::MAX)
        );
        assert_eq!(
            e.details::<CalcError>(),
            Some(CalcError::Overflow { a: i64::MAX, b: 1 })
        );
        let e = client
            .invoke::<_, i64>("Calc.Div", &(1, 0))
            .await
            .unwrap_err();
        assert_eq!(e.details::<CalcError>(), Some(CalcError::DivisionByZero));
        // Details of another type do not decode.
        assert_eq!(e.details::<Vec<u64>>(), None);
    })
    .await;
}

#[tokio::test]
async fn panicking_handler_is_internal_and_isolated() {
    let d = Dispatcher::new()
        .route("Boom", |n: u64| async move {
            if n > 0 {
                panic!("secret {n}");
            }
            n
        })
        .route("Ok", || async { 1u8 });
    let (_server, client) = start(d).await;
    within(BOUND, async {
        let e = client.invoke::<_, u64>("Boom", &1u64).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::Internal));
        assert!(!format!("{e:#}").contains("secret"));
        assert_eq!(client.invoke::<_, u8>("Ok", &()).await.unwrap(), 1);
    })
    .await;
}

// ===== typed method handles =====

#[tokio::test]
async fn typed_method_is_a_service_that_layers_stack_on() {
    let d = calc().route("Slow", |ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    });
    let (_server, client) = start(d).await;
    within(BOUND, async {
        let mut add = client.method::<AddReq, i64>("Calc.Add");
        assert_eq!(add.name(), "Calc.Add");
        let sum = add
            .ready()
            .await
            .unwrap()
            .call(AddReq { a: 40, b: 2 })
            .await
            .unwrap();
        assert_eq!(sum, 42);
        // Many calls through clones of one handle.
        let calls = (0..100).map(|i| add.clone().oneshot(AddReq { a: i, b: i }));
        let sums = futures_util::future::join_all(calls).await;
        for (i, s) in sums.into_iter().enumerate() {
            assert_eq!(s.unwrap(), 2 * i as i64);
        }

        // A tower timeout on one method.
        let mut slow = tower::ServiceBuilder::new()
            .timeout(Duration::from_millis(50))
            .service(client.method::<u64, u64>("Slow"));
        let e = slow.ready().await.unwrap().call(2_000).await.unwrap_err();
        assert!(e.is::<tower::timeout::error::Elapsed>(), "{e}");
        assert_eq!(slow.ready().await.unwrap().call(1).await.unwrap(), 1);

        // The handle's own timeout is sent to the server.
        let mut slow = client
            .method::<u64, u64>("Slow")
            .timeout(Duration::from_millis(50));
        let e = slow.ready().await.unwrap().call(2_000).await.unwrap_err();
        assert!(e.is_timeout(), "{e}");

        // A runtime name, and a remote error through the handle.
        let name = String::from("Calc.Div");
        let mut div = client.method::<(i64, i64), i64>(name);
        let e = div.ready().await.unwrap().call((1, 0)).await.unwrap_err();
        assert_eq!(e.details::<CalcError>(), Some(CalcError::DivisionByZero));
    })
    .await;
}

// ===== one-way messages =====

#[tokio::test]
async fn one_way_messages_run_without_replies() {
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let d = Dispatcher::new().route("Log.Add", move |n: u64| {
        let s = s.clone();
        async move {
            s.fetch_add(n, SeqCst);
        }
    });
    let (server, client) = start(d).await;
    for n in 1..=10u64 {
        client.send("Log.Add", &n).unwrap();
    }
    // A runtime name works too.
    client.send(String::from("Log.Add"), &45u64).unwrap();
    eventually("one-way handlers ran", BOUND, || seen.load(SeqCst) == 100).await;
    assert_eq!(client.stats().one_way, 11);
    eventually("server counted them", BOUND, || {
        server.stats().one_way == 11
    })
    .await;
    // Nothing came back: the client has no calls awaiting replies and read no frames for them.
    assert_eq!(client.pending(), 0);
    assert_eq!(client.stats().frames_read, 0);
    // An unknown one-way method fails silently on the server, and the connection stays up.
    client.send("Nope", &1u8).unwrap();
    client.send("Log.Add", &1u64).unwrap();
    eventually("later one-way ran", BOUND, || seen.load(SeqCst) == 101).await;
    assert_eq!(client.stats().dials, 1);
}

// ===== batches =====

#[tokio::test]
async fn batch_of_one() {
    let (_server, client) = start(calc()).await;
    within(BOUND, async {
        let mut batch = client.batch();
        let slot = batch
            .call::<_, i64>("Calc.Add", &AddReq { a: 1, b: 1 })
            .unwrap();
        assert_eq!(batch.len(), 1);
        let mut replies = batch.run().await.unwrap();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies.take(slot).unwrap(), 2);
    })
    .await;
}

#[tokio::test]
async fn batch_of_a_thousand_goes_out_in_one_write() {
    let users = Arc::new(Cache::default());
    let d = calc()
        .route("Double", |n: u64| async move { n * 2 })
        .route_with("UsersCache.Set", users.clone(), Cache::set);
    let (server, client) = start(d).await;
    within(BOUND, async {
        let mut batch = client.batch();
        let mut doubles = Vec::new();
        let mut sums = Vec::new();
        for i in 0..1000u64 {
            match i % 4 {
                0 => sums.push((
                    i,
                    batch
                        .call::<_, i64>("Calc.Add", &AddReq { a: i as i64, b: 1 })
                        .unwrap(),
                )),
                1 => doubles.push((i, batch.call::<_, u64>("Double", &i).unwrap())),
                2 => batch
                    .send("UsersCache.Set", &(i.to_string(), "x".to_string()))
                    .unwrap(),
                _ => doubles.push((i, batch.call::<_, u64>("Double", &i).unwrap())),
            }
        }
        assert_eq!(batch.len(), 1000);
        let before = client.stats();
        let server_before = server.stats();
        let mut replies = batch.run().await.unwrap();
        let after = client.stats().since(&before);
        assert_eq!(replies.len(), 1000);
        for (i, slot) in sums {
            assert_eq!(replies.take(slot).unwrap(), i as i64 + 1);
        }
        for (i, slot) in doubles {
            assert_eq!(replies.take(slot).unwrap(), 2 * i);
        }
        assert!(
            after.write_calls <= 3,
            "a batch of 1000 took {} client writes",
            after.write_calls
        );
        assert_eq!(after.calls, 750);
        assert_eq!(after.one_way, 250);
        let frames = server.stats().since(&server_before).frames_read;
        assert!(frames <= 3, "server read {frames} frames for one batch");
        // The one-way entries ran too.
        eventually("one-way entries ran", BOUND, || {
            users.entries.lock().unwrap().len() == 250
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn batch_results_are_independent_and_in_order() {
    let (_server, client) = start(calc()).await;
    within(BOUND, async {
        let mut batch = client.batch();
        let a = batch
            .call::<_, i64>("Calc.Add", &AddReq { a: 1, b: 2 })
            .unwrap();
        let b = batch.call::<_, i64>("Calc.Nope", &()).unwrap();
        let c = batch.call::<_, i64>("Calc.Div", &(1, 0)).unwrap();
        let d = batch.call::<_, i64>("Calc.Add", "wrong type").unwrap();
        let raw = batch.request(Request::new(
            "Calc.Div",
            towerpc::payload::to_msgpack(&(8, 2)).unwrap(),
        ));
        assert_eq!((a.index(), raw.index()), (0, 4));
        let mut replies = batch.run().await.unwrap();
        assert_eq!(replies.take(a).unwrap(), 3);
        assert_eq!(replies.take(b).unwrap_err().code(), Some(Code::NotFound));
        assert_eq!(
            replies.take(c).unwrap_err().details::<CalcError>(),
            Some(CalcError::DivisionByZero)
        );
        assert_eq!(
            replies.take(d).unwrap_err().code(),
            Some(Code::InvalidArgument)
        );
        let raw = replies.take(raw).unwrap();
        assert_eq!(
            towerpc::payload::from_msgpack::<i64>(raw.body()).unwrap(),
            4
        );

        // The same batch read as raw responses, in order.
        let mut batch = client.batch();
        for i in 0..5i64 {
            let _ = batch
                .call::<_, i64>("Calc.Add", &AddReq { a: i, b: 0 })
                .unwrap();
        }
        let all: Vec<i64> = batch
            .run()
            .await
            .unwrap()
            .into_iter()
            .map(|r| towerpc::payload::from_msgpack(r.unwrap().body()).unwrap())
            .collect();
        assert_eq!(all, [0, 1, 2, 3, 4]);
    })
    .await;
}

#[tokio::test]
async fn batch_of_one_way_messages() {
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let d = Dispatcher::new().route("Log.Add", move |n: u64| {
        let s = s.clone();
        async move {
            s.fetch_add(n, SeqCst);
        }
    });
    let (_server, client) = start(d).await;
    within(BOUND, async {
        let mut batch = client.batch();
        for n in 1..=100u64 {
            batch.send("Log.Add", &n).unwrap();
        }
        let before = client.stats();
        let replies = batch.run().await.unwrap();
        assert_eq!(replies.len(), 100);
        assert!(replies
            .into_iter()
            .all(|r| r.is_ok_and(|r| r.body().is_empty())));
        eventually("one-way batch ran", BOUND, || seen.load(SeqCst) == 5050).await;
        let after = client.stats().since(&before);
        assert_eq!(after.one_way, 100);
        assert!(after.write_calls <= 2, "{} writes", after.write_calls);
        assert_eq!(client.pending(), 0);
    })
    .await;
}

#[tokio::test]
async fn batch_larger_than_max_pending_fails_whole() {
    let server = support::serve(Server::builder(), support::dispatcher(calc())).await;
    let client = Client::builder()
        .max_pending(10)
        .connect(server.addr)
        .await
        .unwrap();
    within(BOUND, async {
        let mut batch = client.batch();
        for i in 0..11i64 {
            let _ = batch
                .call::<_, i64>("Calc.Add", &AddReq { a: i, b: 0 })
                .unwrap();
        }
        let before = client.stats();
        let e = batch.run().await.unwrap_err();
        assert!(e.is_overloaded(), "{e}");
        assert!(format!("{e:#}").contains("max_pending"), "{e:#}");
        assert_eq!(client.stats().since(&before).write_calls, 0);

        // Exactly max_pending calls, twice at once: each waits for all its slots, no deadlock.
        let run = |client: Client| async move {
            let mut batch = client.batch();
            let slots: Vec<_> = (0..10i64)
                .map(|i| {
                    batch
                        .call::<_, i64>("Calc.Add", &AddReq { a: i, b: 1 })
                        .unwrap()
                })
                .collect();
            let mut replies = batch.run().await.unwrap();
            for (i, s) in slots.into_iter().enumerate() {
                assert_eq!(replies.take(s).unwrap(), i as i64 + 1);
            }
        };
        tokio::join!(run(client.clone()), run(client.clone()));
        assert_eq!(client.pending(), 0);
    })
    .await;
}

#[tokio::test]
async fn empty_batch_completes() {
    let (_server, client) = start(calc()).await;
    let replies = within(BOUND, client.batch().run()).await.unwrap();
    assert!(replies.is_empty());
}

#[tokio::test]
async fn batch_after_close_fails_whole() {
    let (server, client) = start(calc()).await;
    server.shutdown(BOUND).await;
    eventually("client saw the server go", BOUND, || !client.is_connected()).await;
    let mut batch = client.batch();
    let _ = batch
        .call::<_, i64>("Calc.Add", &AddReq { a: 1, b: 1 })
        .unwrap();
    let e = within(BOUND, batch.run()).await.unwrap_err();
    assert!(e.is_unavailable() || e.is_closed(), "{e}");
}

#[tokio::test]
async fn dispatcher_runs_under_tower_layers() {
    let d = calc().route("Slow", |ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    });
    let svc = tower::ServiceBuilder::new()
        .concurrency_limit(64)
        .timeout(Duration::from_millis(100))
        .service(d);
    let server = support::serve(Server::builder(), tower::util::BoxCloneService::new(svc)).await;
    let client = Client::connect(server.addr).await.unwrap();
    within(BOUND, async {
        let e = client
            .invoke::<_, u64>("Slow", &5_000u64)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::DeadlineExceeded), "{e}");
        assert_eq!(client.invoke::<_, u64>("Slow", &1u64).await.unwrap(), 1);
        // Errors of the dispatcher itself pass through the layers unchanged.
        let e = client.invoke::<_, u64>("Nope", &()).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::NotFound));
    })
    .await;
}

#[tokio::test]
async fn batch_is_one_frame_on_the_wire() {
    use towerpc::codec::Message;

    // A hand-driven server: it reads one frame, checks it holds the whole batch, and answers
    // the calls in reverse order.
    let (addr, script) = support::raw_server(|mut conn| async move {
        let msgs = conn.read_frame_within(BOUND).await.expect("a frame");
        let replies = msgs
            .iter()
            .rev()
            .filter_map(|m| match m {
                Message::Request { id, body, .. } => Some(Message::Response {
                    id: *id,
                    body: body.clone(),
                }),
                _ => None,
            })
            .collect();
        conn.write_frame(replies).await;
        msgs
    })
    .await;
    let client = Client::connect(addr).await.unwrap();
    let mut batch = client.batch();
    batch.timeout(Duration::from_millis(2_500));
    let a = batch.call::<_, u64>("A", &1u64).unwrap();
    batch.send("B", &2u64).unwrap();
    let c = batch.call::<_, String>("C", "three").unwrap();
    let mut replies = within(BOUND, batch.run()).await.unwrap();
    assert_eq!(replies.take(a).unwrap(), 1);
    assert_eq!(replies.take(c).unwrap(), "three");

    let msgs = within(BOUND, script).await.unwrap();
    let [Message::Request {
        id: id_a,
        timeout_ms: t_a,
        method: m_a,
        body: b_a,
        ..
    }, Message::OneWay {
        method: m_b,
        body: b_b,
        ..
    }, Message::Request {
        id: id_c,
        method: m_c,
        body: b_c,
        ..
    }] = &msgs[..]
    else {
        panic!("expected request, one-way, request in one frame; got {msgs:?}");
    };
    assert_ne!(id_a, id_c);
    assert_eq!(*t_a, 2_500);
    assert_eq!(
        (&m_a[..], &m_b[..], &m_c[..]),
        (&b"A"[..], &b"B"[..], &b"C"[..])
    );
    // msgpack: positive fixint 1 and 2, fixstr "three".
    assert_eq!((&b_a[..], &b_b[..]), (&[0x01][..], &[0x02][..]));
    assert_eq!(&b_c[..], b"\xa5three");
}

#[derive(Default)]
struct Nothing;

impl Nothing {
    async fn get(self: Arc<Self>) -> u8 {
        1
    }
}

/// Issue 10, item 7: registration mistakes are loud.
#[test]
#[should_panic(expected = "receiver prefix is empty")]
fn receiver_with_an_empty_prefix_is_refused() {
    let _ = Dispatcher::new().receiver("", Arc::new(Nothing), |r| r.method("Get", Nothing::get));
}

#[test]
#[should_panic(expected = "registered no methods")]
fn receiver_without_methods_is_refused() {
    let _ = Dispatcher::new().receiver("Nothing", Arc::new(Nothing), |r| r);
}

#[test]
#[should_panic(expected = "whose error type is not an error")]
fn result_with_a_serializable_non_error_is_refused() {
    #[derive(serde::Serialize)]
    struct NotAnError {
        why: String,
    }
    let _ = Dispatcher::new().route("Bad", |n: u64| async move {
        if n == 0 {
            Err(NotAnError { why: "zero".into() })
        } else {
            Ok(n)
        }
    });
}

/// A request type with a recursive enum: a hostile body nests it two bytes a level. The
/// server answers INVALID_ARGUMENT instead of recursing until its stack overflows (an abort).
#[tokio::test]
async fn a_recursive_request_nested_past_the_limit_is_refused() {
    #[derive(Debug, Serialize, Deserialize)]
    enum Expr {
        N(i64),
        Neg(Box<Expr>),
    }
    fn eval(e: &Expr) -> i64 {
        match e {
            Expr::N(n) => *n,
            Expr::Neg(e) => -eval(e),
        }
    }
    let d = Dispatcher::new().route("Eval", |e: Expr| async move { eval(&e) });
    let (_server, client) = start(d).await;
    within(BOUND, async {
        let mut body = [0x81, 0x01].repeat(100_000);
        body.extend_from_slice(&[0x81, 0x00, 0x05]);
        let e = client
            .request(Request::new("Eval", body))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{e:?}");
        assert!(e
            .status()
            .unwrap()
            .message()
            .contains("nested past the depth limit"));
        let mut ok = [0x81, 0x01].repeat(3);
        ok.extend_from_slice(&[0x81, 0x00, 0x05]);
        let resp = client.request(Request::new("Eval", ok)).await.unwrap();
        assert_eq!(
            towerpc::payload::from_msgpack::<i64>(resp.body()).unwrap(),
            -5
        );
    })
    .await;
}
