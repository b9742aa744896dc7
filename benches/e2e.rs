//! Loopback load generator: calls per second under C concurrent callers sharing one client and
//! one connection, towerpc against a hand-written tokio floor (see `floor/mod.rs`).
//!
//! ```text
//! cargo bench --bench e2e -- [--callers 1000] [--secs 3] [--rounds 2] [--payload small|1k]
//!     [--only floor,towerpc,towerpc-typed,towerpc-dispatch,towerpc-k2,towerpc-stack,towerpc-balanced,towerpc-stats,towerpc-upgrade]
//! ```
//!
//! The same settings can come from `E2E_CALLERS`, `E2E_SECS`, `E2E_ROUNDS` and `E2E_PAYLOAD`;
//! arguments win. Each round runs `floor`, `towerpc` (raw `Client::request`) and, with the small
//! payload, `towerpc-typed` (`Client::call::<u64, u64>` against a raw echo `Service`) and
//! `towerpc-dispatch` (the same call, served by a `Dispatcher` route `|n: u64| async move { n }`,
//! so the difference is the cost of dispatch by name), `towerpc-k2` (raw, over
//! `Builder::connections(2)`), `towerpc-stack` (raw, through tower's `timeout` and `retry` with
//! `towerpc::retry::Policy`) and `towerpc-balanced` (raw, through `balance::Balanced` over the
//! one server), `towerpc-stats` (raw, with `stats::RpcStatsLayer` on both ends; built with
//! `--features metrics` it also records through the `metrics` facade into an installed
//! Prometheus exporter) and, built with
//! `--features http-upgrade`, `towerpc-upgrade` (raw, over an HTTP/1.1 upgrade on an axum
//! port: `server::Upgrade` and `transport::UpgradeConnector`), back to back (A B A B), each
//! against
//! a fresh server on `127.0.0.1:0` in this process, on one multi-thread runtime with tokio's
//! default worker count. Every run warms up for 1 s and then measures for `--secs`. A call
//! counts only if its reply equals its request. Machines here are noisy, so the summary quotes
//! medians and same-round ratios rather than any single figure (see `docs/benchmarks.md`).
//!
//! Output, one line per run, then a summary:
//!
//! ```text
//! RESULT label=floor callers=1000 calls=.. secs=.. cps=.. p50_us=.. p99_us=.. client_writes_per_call=.. server_writes_per_call=..
//! ```
//!
//! towerpc's write counts come from `Client::stats` / `Server::stats` deltas over the window;
//! the floor's from a counting `AsyncWrite` around its sockets' write halves.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::net::TcpListener;
use tower::ServiceExt;
use towerpc::dispatch::Dispatcher;
use towerpc::{BoxError, Client, Request, Response, Server};

mod floor;

const WARM_UP: Duration = Duration::from_secs(1);

const PHASE_WARM_UP: u8 = 0;
const PHASE_MEASURE: u8 = 1;
const PHASE_STOP: u8 = 2;

// ===== Arguments =====

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    /// An 8-byte value (the i64 of `docs/benchmarks.md`).
    Small,
    /// 1 KiB.
    OneK,
}

impl Payload {
    fn len(self) -> usize {
        match self {
            Payload::Small => 8,
            Payload::OneK => 1024,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Payload::Small => "small",
            Payload::OneK => "1k",
        }
    }

    /// A payload unique to call `n`, so a reply routed to the wrong caller fails the check.
    fn make(self, n: u64) -> Bytes {
        let len = self.len();
        let mut b = BytesMut::with_capacity(len);
        b.put_u64_le(n);
        b.put_bytes(0x5a, len - 8);
        b.freeze()
    }
}

#[derive(Debug)]
struct Args {
    callers: usize,
    secs: f64,
    rounds: usize,
    payload: Payload,
    /// `--only a,b`: run just these contenders (e.g. under `perf`); the summary then skips
    /// the ratios it cannot form.
    only: Option<Vec<String>>,
}

fn usage(msg: &str) -> ! {
    eprintln!("e2e: {msg}");
    eprintln!(
        "usage: cargo bench --bench e2e -- [--callers N] [--secs S] [--rounds R] \
         [--payload small|1k] [--only floor,towerpc,towerpc-typed,towerpc-dispatch,towerpc-k2,towerpc-stack,towerpc-balanced,towerpc-stats,towerpc-upgrade]"
    );
    std::process::exit(2)
}

fn bad(key: &str, value: &str) -> ! {
    usage(&format!("bad value {value:?} for --{key}"))
}

fn parse<T: std::str::FromStr>(key: &str, value: &str) -> T {
    value.parse().unwrap_or_else(|_| bad(key, value))
}

fn set(args: &mut Args, key: &str, value: &str) {
    match key {
        "callers" => args.callers = parse(key, value),
        "secs" => args.secs = parse(key, value),
        "rounds" => args.rounds = parse(key, value),
        "only" => args.only = Some(value.split(',').map(str::to_owned).collect()),
        "payload" => {
            args.payload = match value {
                "small" => Payload::Small,
                "1k" | "1K" | "1024" => Payload::OneK,
                _ => bad(key, value),
            }
        }
        _ => usage(&format!("unknown option --{key}")),
    }
}

fn parse_args() -> Args {
    let mut args = Args {
        callers: 1000,
        secs: 3.0,
        rounds: 2,
        payload: Payload::Small,
        only: None,
    };
    for key in ["callers", "secs", "rounds", "payload"] {
        if let Ok(v) = std::env::var(format!("E2E_{}", key.to_uppercase())) {
            set(&mut args, key, &v);
        }
    }
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        // `cargo bench` passes `--bench` (and libtest-style flags) to every bench target.
        if arg.starts_with("--bench") {
            continue;
        }
        let Some(flag) = arg.strip_prefix("--") else {
            usage(&format!("unexpected argument {arg:?}"))
        };
        match flag.split_once('=') {
            Some((key, value)) => set(&mut args, key, value),
            None => {
                let value = it
                    .next()
                    .unwrap_or_else(|| usage(&format!("--{flag} needs a value")));
                set(&mut args, flag, &value);
            }
        }
    }
    if args.callers == 0 || args.rounds == 0 || !args.secs.is_finite() || args.secs <= 0.0 {
        usage("--callers, --rounds and --secs must be positive");
    }
    args
}

// ===== Load =====

/// What one run measured.
#[derive(Debug)]
struct Outcome {
    label: &'static str,
    calls: u64,
    errors: u64,
    secs: f64,
    p50_us: u32,
    p99_us: u32,
    client_writes: u64,
    server_writes: u64,
}

impl Outcome {
    fn cps(&self) -> f64 {
        self.calls as f64 / self.secs
    }

    fn print(&self, callers: usize) {
        let per_call = |w: u64| w as f64 / self.calls.max(1) as f64;
        println!(
            "RESULT label={} callers={callers} calls={} secs={:.3} cps={:.0} p50_us={} p99_us={} \
             client_writes_per_call={:.4} server_writes_per_call={:.4}",
            self.label,
            self.calls,
            self.secs,
            self.cps(),
            self.p50_us,
            self.p99_us,
            per_call(self.client_writes),
            per_call(self.server_writes),
        );
        if self.errors > 0 {
            eprintln!(
                "e2e: WARNING {}: {} calls failed or returned a wrong reply",
                self.label, self.errors
            );
        }
    }
}

/// Write-syscall counters of one contender, read at the window's edges.
trait Writes {
    /// (client writes, server writes) so far.
    fn writes(&self) -> (u64, u64);
}

/// Runs `callers` closed-loop callers of `call` (which returns whether the reply was right):
/// warm-up, then the measured window, then stop and wait for every caller to finish its call.
async fn drive<F, Fut>(label: &'static str, args: &Args, counters: &dyn Writes, call: F) -> Outcome
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let call = Arc::new(call);
    let phase = Arc::new(AtomicU8::new(PHASE_WARM_UP));
    let tasks: Vec<_> = (0..args.callers as u64)
        .map(|caller| {
            let call = call.clone();
            let phase = phase.clone();
            tokio::spawn(async move {
                // Latencies in µs of the calls that ended inside the window.
                let mut lat = Vec::with_capacity(16 * 1024);
                let mut errors = 0u64;
                let mut seq = 0u64;
                loop {
                    let n = caller << 40 | seq;
                    seq += 1;
                    let start = Instant::now();
                    let ok = call(n).await;
                    let us = start.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    match phase.load(Relaxed) {
                        PHASE_WARM_UP => {}
                        PHASE_MEASURE if ok => lat.push(us),
                        PHASE_MEASURE => errors += 1,
                        _ => break,
                    }
                }
                (lat, errors)
            })
        })
        .collect();

    tokio::time::sleep(WARM_UP).await;
    let before = counters.writes();
    phase.store(PHASE_MEASURE, Relaxed);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.secs)).await;
    phase.store(PHASE_STOP, Relaxed);
    let secs = start.elapsed().as_secs_f64();
    let after = counters.writes();

    let mut lat = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await.expect("caller panicked");
        lat.extend_from_slice(&l);
        errors += e;
    }
    let calls = lat.len() as u64;
    let (p50_us, p99_us) = (percentile(&mut lat, 0.50), percentile(&mut lat, 0.99));
    Outcome {
        label,
        calls,
        errors,
        secs,
        p50_us,
        p99_us,
        client_writes: after.0 - before.0,
        server_writes: after.1 - before.1,
    }
}

fn percentile(v: &mut [u32], q: f64) -> u32 {
    if v.is_empty() {
        return 0;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    *v.select_nth_unstable(i).1
}

// ===== Contenders =====

struct FloorWrites<'a>(&'a floor::Client, &'a floor::Server);

impl Writes for FloorWrites<'_> {
    fn writes(&self) -> (u64, u64) {
        (self.0.writes(), self.1.writes())
    }
}

async fn run_floor(args: &Args) -> Result<Outcome, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server = floor::Server::start(listener)?;
    let client = Arc::new(floor::Client::connect(server.addr()).await?);
    let payload = args.payload;
    let c = client.clone();
    let outcome = drive("floor", args, &FloorWrites(&client, &server), move |n| {
        let client = c.clone();
        async move {
            let req = payload.make(n);
            matches!(client.call(&req).await, Ok(reply) if reply == req)
        }
    })
    .await;
    Ok(outcome)
}

struct TowerpcWrites<'a>(&'a Client, &'a Server);

impl Writes for TowerpcWrites<'_> {
    fn writes(&self) -> (u64, u64) {
        (self.0.stats().write_calls, self.1.stats().write_calls)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// `Client::request` with a raw body.
    Raw,
    /// `Client::call::<u64, u64>` (msgpack).
    Typed,
    /// `Client::call::<u64, u64>` to a `Dispatcher` route that decodes and re-encodes the value.
    Dispatch,
    /// As `Raw`, over a client with two connections.
    K2,
    /// As `Raw`, through tower's `timeout` and `retry` (towerpc's policy) layers.
    Stack,
    /// As `Raw`, through the balanced client over this one server.
    Balanced,
    /// As `Raw`, through `stats::RpcStatsLayer` on the client and on the server.
    Stats,
    /// As `Raw`, over an HTTP/1.1 upgrade on an axum port (feature `http-upgrade`).
    Upgrade,
}

fn label_of(api: Api) -> &'static str {
    match api {
        Api::Raw => "towerpc",
        Api::Typed => "towerpc-typed",
        Api::Dispatch => "towerpc-dispatch",
        Api::K2 => "towerpc-k2",
        Api::Stack => "towerpc-stack",
        Api::Balanced => "towerpc-balanced",
        Api::Stats => "towerpc-stats",
        Api::Upgrade => "towerpc-upgrade",
    }
}

async fn run_towerpc(args: &Args, api: Api) -> Result<Outcome, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = Server::builder();
    let server_stats = server.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let echo = tower::service_fn(|req: Request| async move {
        Ok::<_, BoxError>(Response::new(req.into_body()))
    });
    let stop = async move {
        let _ = stop_rx.await;
    };
    let incoming = towerpc::server::TcpIncoming::from;
    let serving: tokio::task::JoinHandle<Result<(), BoxError>> = match api {
        Api::Dispatch => {
            let dispatcher = Dispatcher::new().route("echo", |n: u64| async move { n });
            let serve = server.serve_with_incoming_shutdown(incoming(listener), dispatcher, stop);
            tokio::spawn(async move { Ok(serve.await?) })
        }
        Api::Stats => {
            let serve = server
                .clone()
                .layer(towerpc::stats::RpcStatsLayer::new())
                .serve_with_incoming_shutdown(incoming(listener), echo, stop);
            tokio::spawn(async move { Ok(serve.await?) })
        }
        #[cfg(feature = "http-upgrade")]
        Api::Upgrade => {
            let rpc = server.clone().into_upgrade(echo);
            let app = axum::Router::new()
                .route_service(towerpc::transport::upgrade::DEFAULT_PATH, rpc.clone());
            tokio::spawn(async move {
                // As towerpc's own listener does: batching makes writes large already, and
                // Nagle's algorithm would only delay the last batch of a burst.
                use axum::serve::ListenerExt;
                let listener = listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await?;
                rpc.shutdown().await;
                Ok(())
            })
        }
        _ => {
            let serve = server.serve_with_incoming_shutdown(incoming(listener), echo, stop);
            tokio::spawn(async move { Ok(serve.await?) })
        }
    };
    let connections = if api == Api::K2 { 2 } else { 1 };
    let client = match api {
        #[cfg(feature = "http-upgrade")]
        Api::Upgrade => {
            let url = format!("http://{addr}{}", towerpc::transport::upgrade::DEFAULT_PATH);
            Client::builder()
                .connect_with(
                    url.parse::<http::Uri>()?,
                    towerpc::transport::UpgradeConnector::new(),
                )
                .await?
        }
        _ => {
            Client::builder()
                .connections(connections)
                .connect(addr)
                .await?
        }
    };
    let counters = TowerpcWrites(&client, &server_stats);
    let payload = args.payload;
    let c = client.clone();
    let outcome = match api {
        Api::Stack => {
            let svc = tower::ServiceBuilder::new()
                .timeout(Duration::from_secs(20))
                .retry(towerpc::retry::Policy::new())
                .service(client.clone());
            drive_service(label_of(api), args, &counters, svc).await
        }
        Api::Stats => {
            let svc = tower::ServiceBuilder::new()
                .layer(towerpc::stats::RpcStatsLayer::new())
                .service(client.clone());
            drive_service(label_of(api), args, &counters, svc).await
        }
        Api::Balanced => {
            let balanced = towerpc::balance::Balanced::fixed(Client::builder(), [addr]);
            drive_service(label_of(api), args, &counters, balanced).await
        }
        Api::Raw | Api::K2 | Api::Upgrade => {
            drive(label_of(api), args, &counters, move |n| {
                let client = c.clone();
                async move {
                    let req = payload.make(n);
                    match client.request(Request::new("echo", req.clone())).await {
                        Ok(resp) => *resp.body() == req,
                        Err(_) => false,
                    }
                }
            })
            .await
        }
        Api::Typed | Api::Dispatch => drive(label_of(api), args, &counters, move |n| {
            let client = c.clone();
            async move { matches!(client.invoke::<u64, u64>("echo", &n).await, Ok(r) if r == n) }
        })
        .await,
    };
    drop(client);
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(10), serving).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => eprintln!("e2e: towerpc server ended with an error: {e}"),
        Ok(Err(e)) => eprintln!("e2e: towerpc server task failed: {e}"),
        Err(_) => eprintln!("e2e: towerpc server did not shut down within 10 s"),
    }
    Ok(outcome)
}

/// Drives raw echo calls through `svc`, cloned for each call as tower stacks usually are.
async fn drive_service<S>(
    label: &'static str,
    args: &Args,
    counters: &dyn Writes,
    svc: S,
) -> Outcome
where
    S: tower::Service<Request, Response = Response> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Send,
{
    let payload = args.payload;
    drive(label, args, counters, move |n| {
        let svc = svc.clone();
        async move {
            let req = payload.make(n);
            match svc.oneshot(Request::new("echo", req.clone())).await {
                Ok(resp) => *resp.body() == req,
                Err(_) => false,
            }
        }
    })
    .await
}

// ===== Summary =====

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn main() -> Result<(), BoxError> {
    let args = parse_args();
    // Built with the `metrics` feature, `RpcStatsLayer` records through the facade: install a
    // real exporter, so that `towerpc-stats` pays what an app with Prometheus pays.
    #[cfg(feature = "metrics")]
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut labels = vec!["floor", "towerpc"];
    if args.payload == Payload::Small {
        labels.push("towerpc-typed");
        labels.push("towerpc-dispatch");
    }
    labels.extend([
        "towerpc-k2",
        "towerpc-stack",
        "towerpc-balanced",
        "towerpc-stats",
    ]);
    if cfg!(feature = "http-upgrade") {
        labels.push("towerpc-upgrade");
    }
    if let Some(only) = &args.only {
        labels.retain(|l| only.iter().any(|o| o == l));
        if labels.is_empty() {
            usage(
                "--only names none of floor, towerpc, towerpc-typed, towerpc-dispatch, \
                 towerpc-k2, towerpc-stack, towerpc-balanced, towerpc-stats, towerpc-upgrade (typed and dispatch: small payload; upgrade: feature http-upgrade)",
            );
        }
    }
    println!(
        "e2e: callers={} secs={} rounds={} payload={} workers={} metrics={} contenders={}",
        args.callers,
        args.secs,
        args.rounds,
        args.payload.name(),
        rt.metrics().num_workers(),
        if cfg!(feature = "metrics") {
            "prometheus"
        } else {
            "off"
        },
        labels.join(","),
    );

    // rounds[r][i] is the outcome of labels[i] in round r.
    let mut rounds: Vec<Vec<Outcome>> = Vec::new();
    for _ in 0..args.rounds {
        let mut round = Vec::new();
        for &label in &labels {
            let outcome = rt.block_on(async {
                match label {
                    "floor" => run_floor(&args).await,
                    "towerpc" => run_towerpc(&args, Api::Raw).await,
                    "towerpc-dispatch" => run_towerpc(&args, Api::Dispatch).await,
                    "towerpc-k2" => run_towerpc(&args, Api::K2).await,
                    "towerpc-stack" => run_towerpc(&args, Api::Stack).await,
                    "towerpc-balanced" => run_towerpc(&args, Api::Balanced).await,
                    "towerpc-stats" => run_towerpc(&args, Api::Stats).await,
                    "towerpc-upgrade" => run_towerpc(&args, Api::Upgrade).await,
                    _ => run_towerpc(&args, Api::Typed).await,
                }
            })?;
            outcome.print(args.callers);
            round.push(outcome);
        }
        rounds.push(round);
    }

    println!(
        "SUMMARY callers={} payload={}",
        args.callers,
        args.payload.name()
    );
    for (i, label) in labels.iter().enumerate() {
        let cps: Vec<f64> = rounds.iter().map(|r| r[i].cps()).collect();
        let p99: Vec<f64> = rounds.iter().map(|r| r[i].p99_us as f64).collect();
        println!(
            "  {label:<16} median_cps={:.0} median_p99_us={:.0} per_round_cps=[{}]",
            median(cps.clone()),
            median(p99),
            cps.iter()
                .map(|c| format!("{c:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    #[cfg(feature = "metrics")]
    println!(
        "  prometheus exporter: {} bytes of text",
        prometheus.render().len()
    );
    // Dispatch by name against the raw service path, compared within each round.
    let pos = |l: &str| labels.iter().position(|x| *x == l);
    if let (Some(t), Some(d)) = (pos("towerpc-typed"), pos("towerpc-dispatch")) {
        let ratios: Vec<f64> = rounds.iter().map(|r| r[d].cps() / r[t].cps()).collect();
        println!(
            "  ratio towerpc-dispatch/towerpc-typed median={:.3} per_round=[{}]",
            median(ratios.clone()),
            ratios
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    // Layers, balancing and more connections against the bare client, within each round.
    if let Some(bare) = pos("towerpc") {
        for label in [
            "towerpc-k2",
            "towerpc-stack",
            "towerpc-balanced",
            "towerpc-stats",
            "towerpc-upgrade",
        ] {
            let Some(i) = pos(label) else { continue };
            let ratios: Vec<f64> = rounds.iter().map(|r| r[i].cps() / r[bare].cps()).collect();
            println!(
                "  ratio {label}/towerpc median={:.3} per_round=[{}]",
                median(ratios.clone()),
                ratios
                    .iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        }
    }
    if labels[0] != "floor" {
        return Ok(());
    }
    for (i, label) in labels.iter().enumerate().skip(1) {
        let ratios: Vec<f64> = rounds.iter().map(|r| r[i].cps() / r[0].cps()).collect();
        println!(
            "  ratio {label}/floor median={:.3} per_round=[{}]",
            median(ratios.clone()),
            ratios
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    Ok(())
}
