//! Spans per call on both sides: method, id, peer or server, code and latency.

mod support;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use towerpc::{Client, Code, Server, Status};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// A span's name and its fields as recorded.
type SpanRecord = (String, HashMap<String, String>);

/// Every span's name and fields, as recorded, once it closes.
#[derive(Clone, Default)]
struct Capture {
    open: Arc<Mutex<HashMap<u64, SpanRecord>>>,
    closed: Arc<Mutex<Vec<SpanRecord>>>,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        self.0
            .insert(field.name().to_string(), s.trim_matches('"').to_string());
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.open
            .lock()
            .unwrap()
            .insert(id.into_u64(), (attrs.metadata().name().to_string(), fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some((_, fields)) = self.open.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }

    fn on_close(&self, id: Id, _: Context<'_, S>) {
        if let Some(span) = self.open.lock().unwrap().remove(&id.into_u64()) {
            self.closed.lock().unwrap().push(span);
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn calls_are_spans_on_both_sides() {
    // Global, not a thread's default: with scoped dispatchers, tracing caches each callsite's
    // interest process-wide, so a span first hit on another test's thread (cargo test runs
    // the tests of a binary side by side) would stay disabled here. Spans of other tests land
    // in the capture too; the checks below look only at this test's methods.
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    tracing::subscriber::set_global_default(subscriber)
        .expect("only this test installs a subscriber");

    let d = towerpc::dispatch::Dispatcher::new()
        .route("Calc.Double", |n: u64| async move { n * 2 })
        .route("Calc.Fail", |_: u64| async move {
            Err::<u64, Status>(Status::new(Code::NotFound, "nothing"))
        });
    let server = support::serve(Server::builder(), support::dispatcher(d)).await;
    let client = Client::connect(server.addr).await.unwrap();
    assert_eq!(
        client
            .invoke::<_, u64>("Calc.Double", &21u64)
            .await
            .unwrap(),
        42
    );
    assert!(client.invoke::<_, u64>("Calc.Fail", &1u64).await.is_err());
    support::eventually(
        "the server spans close",
        std::time::Duration::from_secs(5),
        || {
            capture
                .closed
                .lock()
                .unwrap()
                .iter()
                .filter(|(name, fields)| {
                    name == "towerpc.server"
                        && fields.get("method").is_some_and(|m| m.starts_with("Calc."))
                })
                .count()
                == 2
        },
    )
    .await;

    let closed = capture.closed.lock().unwrap().clone();
    let find = |name: &str, method: &str| {
        closed
            .iter()
            .find(|(n, f)| n == name && f.get("method").map(String::as_str) == Some(method))
            .unwrap_or_else(|| panic!("no {name} span for {method}: {closed:?}"))
            .1
            .clone()
    };
    let client_ok = find("towerpc.client", "Calc.Double");
    assert_eq!(client_ok["code"], "ok");
    assert!(client_ok["server"].contains(&server.addr.to_string()));
    assert!(client_ok["latency_us"].parse::<u64>().is_ok());
    let server_ok = find("towerpc.server", "Calc.Double");
    assert_eq!(server_ok["code"], "ok");
    // The same call on both sides: the wire id matches.
    assert_eq!(server_ok["id"], client_ok["id"]);
    assert!(server_ok.contains_key("peer"));
    assert_eq!(find("towerpc.client", "Calc.Fail")["code"], "not found");
    assert_eq!(find("towerpc.server", "Calc.Fail")["code"], "not found");
}

/// A trace continues across two hops: the trace id is kept, each hop gets a new parent id.
#[tokio::test(flavor = "current_thread")]
async fn trace_context_continues_across_hops() {
    use towerpc::trace::TraceContext;
    use towerpc::{BoxError, Request, Response};

    fn seen(req: &Request) -> String {
        req.extensions()
            .get::<TraceContext>()
            .map(|t| t.to_string())
            .unwrap_or_default()
    }
    let b = support::serve(
        Server::builder(),
        support::service(|req: Request| async move {
            Ok::<_, BoxError>(Response::new(seen(&req).into()))
        }),
    )
    .await;
    let to_b = Client::connect(b.addr).await.unwrap();
    let a = support::serve(
        Server::builder(),
        support::service(move |req: Request| {
            let to_b = to_b.clone();
            async move {
                let at_b = to_b.request(Request::new("B", "")).await?;
                let both = format!("{} {}", seen(&req), String::from_utf8_lossy(at_b.body()));
                Ok::<_, BoxError>(Response::new(both.into()))
            }
        }),
    )
    .await;
    let client = Client::connect(a.addr).await.unwrap();

    let root = TraceContext::new_root();
    let resp = towerpc::trace::scope(Some(root), client.request(Request::new("A", "")))
        .await
        .unwrap();
    let text = String::from_utf8(resp.body().to_vec()).unwrap();
    let (at_a, at_b) = text.split_once(' ').unwrap();
    let at_a: TraceContext = at_a.parse().unwrap();
    let at_b: TraceContext = at_b.parse().unwrap();
    assert_eq!(at_a.trace_id(), root.trace_id());
    assert_eq!(at_b.trace_id(), root.trace_id());
    assert_ne!(at_a.parent_id(), root.parent_id());
    assert_ne!(at_b.parent_id(), at_a.parent_id());

    // Without a scope nothing is sent.
    let resp = client.request(Request::new("A", "")).await.unwrap();
    assert_eq!(&resp.body()[..], b" ");
}
