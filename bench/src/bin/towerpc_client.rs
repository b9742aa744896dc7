//! towerpc echo client: one `towerpc::Client` (one connection, every default) shared by all
//! callers, each calling `client.invoke("echo", &v)`: an i64 (small), a 1024-byte byte string
//! (1k, serde_bytes), or one of 4,096 incompressible 1 KiB byte strings (1k-random). Works
//! against every `towerpc_server` mode.
//!
//! `--compression zstd|lz4` offers stream compression. `--big N --big-size B` adds the mixed
//! workload: N more callers sending B-byte requests on the same connection; their calls/s and
//! throughput print on a second line (`BIG ...`), and the RESULT line is the small calls' alone.
//! `--big-dir up|down` sends the B bytes one way only (a one-byte reply; an 8-byte request for
//! a B-byte reply) instead of echoing them; `TAILS=1` prints the small calls' quantiles.
//! `SPIN_US=N` sets `Builder::reply_spin` to N µs (0: off) instead of the default.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{drive_with, payload_bytes, random_payload, Hist, Opts, SocketWrites};
use serde_bytes::{ByteBuf, Bytes};
use towerpc::codec::Compression;
use towerpc::{Client, Request};

#[tokio::main]
async fn main() {
    let o = Opts::parse();
    let mut builder = Client::builder();
    if o.conns > 1 {
        builder = builder.connections(o.conns);
    }
    #[cfg(not(feature = "before-spin"))]
    if let Some(us) = harness::spin_us() {
        builder = builder.reply_spin(Duration::from_micros(us));
    }
    match o.compression.as_deref() {
        None | Some("none") => {}
        Some("zstd") => builder = builder.compression(Compression::Zstd),
        Some("lz4") => builder = builder.compression(Compression::Lz4),
        Some(other) => panic!("unknown compression {other}"),
    }
    let client = builder.connect(o.addr.as_str()).await.unwrap();
    let big_report = (o.big > 0).then(|| spawn_big(&client, &o));
    let big = o.big();
    // Borrowed for the process's life by every call: no shared handle cloned per call.
    let fixed: &'static [u8] = payload_bytes(big).leak();
    let random = o.payload == "1k-random";
    let probe = client.clone();
    let socket_writes: SocketWrites = Arc::new(move || {
        let c = probe.clone();
        Box::pin(async move {
            let server: u64 = c.invoke("stats", &()).await.ok()?;
            Some(server + c.stats().write_calls)
        })
    });
    let c: &'static Client = Box::leak(Box::new(client.clone()));
    drive_with(
        &o,
        move |i| {
            async move {
                if random {
                    // Fresh noise every call: a stream compressor's window never finds a repeat.
                    let data = random_payload(i);
                    matches!(c.invoke::<Bytes, ByteBuf>("echo", Bytes::new(&data)).await, Ok(r) if r.len() == 1024)
                } else if big {
                    matches!(c.invoke::<Bytes, ByteBuf>("echo", Bytes::new(fixed)).await, Ok(r) if r.len() == 1024)
                } else {
                    let v = i as i64;
                    matches!(c.invoke::<i64, i64>("echo", &v).await, Ok(r) if r == v)
                }
            }
        },
        socket_writes,
    )
    .await;
    if let Some(report) = big_report {
        let _ = report.await;
    }
}

/// The mixed workload's big callers: raw byte bodies (the server echoes them in every mode but
/// `small`; run it with `raw`), measured over the same window as the small callers.
fn spawn_big(client: &Client, o: &Opts) -> tokio::task::JoinHandle<()> {
    let body = bytes::Bytes::from(vec![7u8; o.big_size]);
    let hist = Arc::new(Hist::new());
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_secs_f64(o.warmup);
    let end = start + Duration::from_secs_f64(o.dur);
    for _ in 0..o.big {
        let (c, body, hist, done) = (client.clone(), body.clone(), hist.clone(), done.clone());
        let dir = o.big_dir.clone();
        tokio::spawn(async move {
            loop {
                let t0 = Instant::now();
                let (req, want) = match dir.as_str() {
                    "up" => (Request::new("bigup", body.clone()), 1),
                    "down" => (
                        Request::new("bigdown", (body.len() as u64).to_be_bytes().to_vec()),
                        body.len(),
                    ),
                    _ => (Request::new("echo", body.clone()), body.len()),
                };
                let ok = matches!(c.request(req).await, Ok(r) if r.body().len() == want);
                if ok && t0 >= start && t0 < end {
                    hist.record(t0.elapsed().as_nanos() as u64);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let (big, size, secs, dir) = (o.big, o.big_size, o.dur, o.big_dir.clone());
    tokio::spawn(async move {
        tokio::time::sleep_until(end.into()).await;
        let n = done.load(Ordering::Relaxed);
        println!(
            "BIG callers={big} size={size} dir={dir} calls={n} cps={:.1} mb_per_s={:.1} p50_us={:.1} p99_us={:.1}",
            n as f64 / secs,
            n as f64 * size as f64 / secs / 1e6,
            hist.quantile(0.5) as f64 / 1e3,
            hist.quantile(0.99) as f64 / 1e3
        );
    })
}
