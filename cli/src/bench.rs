//! `towerpc bench`: load against one method, closed loop (N callers, each calls again as soon
//! as its reply arrives) or open loop (`--rate`: calls start on a fixed schedule, and latency
//! counts from the time each call was due, so a stalled server shows in the figures instead of
//! just slowing the load down — no coordinated omission).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value as Json};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use towerpc::stats::ErrorCode;
use towerpc::{Client, Request};

use crate::json;
use crate::target::{connect, parse_duration, ConnectOpts};

/// `towerpc bench ADDR METHOD [JSON]`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// HOST:PORT, unix:PATH, or an http(s):// upgrade URL.
    pub addr: String,
    /// The method to call.
    pub method: String,
    /// The request as JSON (default: --payload-size bytes as a msgpack byte string, or null).
    #[arg(value_name = "JSON")]
    pub request: Option<String>,
    /// Concurrent callers (closed loop), or the most calls in flight at once (with --rate).
    #[arg(long, default_value_t = 100)]
    pub callers: usize,
    /// How long to run.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Connections the callers share (one client, calls spread over them).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Open loop: start this many calls per second, whatever the replies do.
    #[arg(long, value_name = "CALLS_PER_SEC")]
    pub rate: Option<f64>,
    /// Without a JSON request, send a msgpack byte string of this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub payload_size: Option<usize>,
    /// Timeout of each call.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Write the summary as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnectOpts,
}

const SHARDS: usize = 16;
/// Latencies are kept in nanoseconds, 1 µs to 1 h, three significant digits.
const LOWEST_NS: u64 = 1_000;
const HIGHEST_NS: u64 = 3_600_000_000_000;

/// Latencies and errors, in shards so callers rarely meet on a lock.
struct Recorder {
    shards: Vec<Mutex<Shard>>,
    ok: AtomicU64,
    failed: AtomicU64,
}

struct Shard {
    latency: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        latency: histogram(),
                        errors: BTreeMap::new(),
                    })
                })
                .collect(),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    fn record(&self, key: usize, latency: Duration, result: &towerpc::Result<towerpc::Response>) {
        let mut shard = self.shards[key % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(_) => {
                shard.latency.saturating_record(latency.as_nanos() as u64);
                self.ok.fetch_add(1, Relaxed);
            }
            Err(_) => {
                // The server's code, or what went wrong here: as `RpcStatsLayer` counts it.
                let code = result.error_code().unwrap_or_default();
                *shard.errors.entry(code.replace(' ', "_")).or_default() += 1;
                self.failed.fetch_add(1, Relaxed);
            }
        }
    }

    fn merged(&self) -> (Histogram<u64>, BTreeMap<String, u64>) {
        let mut all = histogram();
        let mut errors = BTreeMap::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let _ = all.add(&shard.latency);
            for (k, n) in &shard.errors {
                *errors.entry(k.clone()).or_default() += n;
            }
        }
        (all, errors)
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(LOWEST_NS, HIGHEST_NS, 3).expect("valid histogram bounds")
}

pub async fn bench(args: BenchArgs) -> Result<()> {
    if args.callers == 0 {
        bail!("--callers must be at least 1");
    }
    if let Some(rate) = args.rate {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("--rate must be a positive number of calls per second");
        }
    }
    let body: Bytes = match (&args.request, args.payload_size) {
        (Some(text), _) => json::to_msgpack(text, "the request")?,
        (None, Some(n)) => {
            let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let mut buf = Vec::with_capacity(n + 5);
            rmp::encode::write_bin(&mut buf, &payload)?;
            buf.into()
        }
        (None, None) => json::encode(&Json::Null)?,
    };
    let builder = Client::builder()
        .connections(args.connections)
        .max_pending(args.callers.max(1024))
        .timeout(args.timeout);
    let client = connect(&args.addr, &args.conn, builder).await?;
    let req = Request::new(args.method.clone(), body);

    // One call first, so that a wrong method or request fails with its own error at once.
    if let Err(e) = client.request(req.clone()).await {
        return Err(crate::call::explain(&client, &args.addr, &args.method, e).await);
    }

    let recorder = Arc::new(Recorder::new());
    let before = client.stats();
    let start = Instant::now();
    let end = start + args.duration;
    let progress = progress(args.duration, Arc::clone(&recorder), start, args.json);
    match args.rate {
        None => closed_loop(&client, &req, args.callers, end, &recorder).await,
        Some(rate) => {
            open_loop(
                &client,
                &req,
                args.callers,
                rate,
                start,
                end,
                args.timeout,
                &recorder,
            )
            .await
        }
    }
    let elapsed = start.elapsed();
    progress.abort();
    let stats = client.stats().since(&before);
    client.close().await;

    let summary = Summary::new(&args, &recorder, elapsed, stats);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary.to_json())?);
    } else {
        print!("{}", summary.to_text());
    }
    Ok(())
}

async fn closed_loop(
    client: &Client,
    req: &Request,
    callers: usize,
    end: Instant,
    rec: &Arc<Recorder>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..callers {
        let (client, req, rec) = (client.clone(), req.clone(), Arc::clone(rec));
        tasks.spawn(async move {
            while Instant::now() < end {
                let t0 = Instant::now();
                let result = client.request(req.clone()).await;
                rec.record(i, t0.elapsed(), &result);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

#[allow(clippy::too_many_arguments)]
async fn open_loop(
    client: &Client,
    req: &Request,
    callers: usize,
    rate: f64,
    start: Instant,
    end: Instant,
    timeout: Duration,
    rec: &Arc<Recorder>,
) {
    let slots = Arc::new(Semaphore::new(callers));
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut issued: u64 = 0;
    'run: loop {
        tick.tick().await;
        let now = Instant::now();
        if now >= end {
            break;
        }
        let due = ((now - start).as_secs_f64() * rate) as u64;
        while issued < due {
            // Latency counts from when the call was due, not from when a slot freed up.
            let intended = start + Duration::from_secs_f64(issued as f64 / rate);
            let key = issued as usize;
            issued += 1;
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                break 'run;
            };
            if Instant::now() >= end {
                break 'run;
            }
            let (client, req, rec) = (client.clone(), req.clone(), Arc::clone(rec));
            tokio::spawn(async move {
                let result = client.request(req).await;
                rec.record(key, intended.elapsed(), &result);
                drop(slot);
            });
        }
    }
    // Wait for the calls in flight (each ends by its own timeout at the latest).
    let all = u32::try_from(callers).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(timeout + Duration::from_secs(1), slots.acquire_many(all)).await;
}

/// The live progress bar (on standard error, only when it is a terminal).
fn progress(
    duration: Duration,
    rec: Arc<Recorder>,
    start: Instant,
    quiet: bool,
) -> tokio::task::JoinHandle<()> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(duration.as_millis() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{bar:30}} {{elapsed:>3}}/{}s {{msg}}",
            duration.as_secs()
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last = (start, 0u64);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let calls = rec.ok.load(Relaxed) + rec.failed.load(Relaxed);
            let per_sec = (calls - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-9);
            last = (now, calls);
            let (hist, _) = rec.merged();
            bar.set_position((now - start).as_millis() as u64);
            bar.set_message(format!(
                "{:>9.0} calls/s  {} errors  p99 {}",
                per_sec,
                rec.failed.load(Relaxed),
                fmt_ns(hist.value_at_quantile(0.99))
            ));
            if now - start >= duration {
                bar.finish_and_clear();
                break;
            }
        }
    })
}

/// What a run measured.
struct Summary {
    addr: String,
    method: String,
    callers: usize,
    connections: usize,
    rate: Option<f64>,
    elapsed: Duration,
    ok: u64,
    failed: u64,
    latency: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    bytes: u64,
    writes: u64,
}

impl Summary {
    fn new(args: &BenchArgs, rec: &Recorder, elapsed: Duration, stats: towerpc::Stats) -> Summary {
        let (latency, errors) = rec.merged();
        Summary {
            addr: args.addr.clone(),
            method: args.method.clone(),
            callers: args.callers,
            connections: args.connections,
            rate: args.rate,
            elapsed,
            ok: rec.ok.load(Relaxed),
            failed: rec.failed.load(Relaxed),
            latency,
            errors,
            bytes: stats.bytes_written + stats.bytes_read,
            writes: stats.write_calls,
        }
    }

    fn calls(&self) -> u64 {
        self.ok + self.failed
    }

    fn per_call(&self, n: u64) -> f64 {
        n as f64 / self.calls().max(1) as f64
    }

    fn quantiles(&self) -> [(&'static str, u64); 5] {
        let q = |x| self.latency.value_at_quantile(x);
        [
            ("p50", q(0.5)),
            ("p90", q(0.9)),
            ("p99", q(0.99)),
            ("p99.9", q(0.999)),
            ("max", self.latency.max()),
        ]
    }

    /// Latency buckets, growing by a constant ratio from the fastest call to the slowest:
    /// (upper bound in ns, calls).
    fn buckets(&self) -> Vec<(u64, u64)> {
        if self.latency.is_empty() {
            return Vec::new();
        }
        let (lo, hi) = (self.latency.min().max(1), self.latency.max());
        // At most 16 rows: a ratio per row that spans lo..=hi.
        let rows = 16f64;
        let ratio = ((hi as f64 / lo as f64).ln() / rows).exp().max(1.25);
        let mut bounds: Vec<u64> = Vec::new();
        let mut upper = lo as f64 * ratio;
        loop {
            // The last row ends at the slowest call, not a hair before it.
            let to = if upper * 1.05 >= hi as f64 {
                hi
            } else {
                upper as u64
            };
            if bounds.last() != Some(&to) {
                bounds.push(to);
            }
            if to >= hi {
                break;
            }
            upper *= ratio;
        }
        let mut counts = vec![0u64; bounds.len()];
        for v in self.latency.iter_recorded() {
            let i = bounds.partition_point(|&b| b < v.value_iterated_to());
            counts[i.min(bounds.len() - 1)] += v.count_at_value();
        }
        bounds.into_iter().zip(counts).collect()
    }

    fn to_text(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        let mode = match self.rate {
            Some(r) => format!(
                "open loop at {r} calls/s, at most {} in flight",
                self.callers
            ),
            None => format!("closed loop, {} callers", self.callers),
        };
        let mut s = format!(
            "towerpc bench {} {}: {mode}, {} connection{}, {secs:.1} s\n\n",
            self.addr,
            self.method,
            self.connections,
            if self.connections == 1 { "" } else { "s" }
        );
        s += &format!(
            "  calls     {} ({:.0} calls/s), {} ok, {} failed\n",
            self.calls(),
            self.calls() as f64 / secs,
            self.ok,
            self.failed
        );
        let lat: Vec<String> = self
            .quantiles()
            .iter()
            .map(|(name, ns)| format!("{name} {}", fmt_ns(*ns)))
            .collect();
        s += &format!("  latency   {} (calls that succeeded)\n", lat.join("  "));
        s += &format!(
            "  wire      {:.1} bytes/call, {:.4} write syscalls/call\n",
            self.per_call(self.bytes),
            self.per_call(self.writes)
        );
        if !self.errors.is_empty() {
            let errs: Vec<String> = self
                .errors
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            s += &format!("  errors    {}\n", errs.join(", "));
        }
        let buckets = self.buckets();
        if !buckets.is_empty() {
            s += "\n  latency histogram\n";
            let most = buckets.iter().map(|b| b.1).max().unwrap_or(1).max(1);
            let total = self.ok.max(1) as f64;
            for (upper, count) in buckets {
                let bar = "#".repeat(((count as f64 / most as f64) * 40.0).round() as usize);
                s += &format!(
                    "  <= {:>9}  {:<40}  {:>5.1}%  {}\n",
                    fmt_ns(upper),
                    bar,
                    count as f64 * 100.0 / total,
                    count
                );
            }
        }
        s
    }

    fn to_json(&self) -> Json {
        let us = |ns: u64| ns as f64 / 1e3;
        let latency: serde_json::Map<String, Json> = self
            .quantiles()
            .iter()
            .map(|(name, ns)| (name.replace('.', "_"), json!(us(*ns))))
            .chain([("mean".to_string(), json!(self.latency.mean() / 1e3))])
            .collect();
        json!({
            "addr": self.addr,
            "method": self.method,
            "mode": if self.rate.is_some() { "open" } else { "closed" },
            "rate": self.rate,
            "callers": self.callers,
            "connections": self.connections,
            "duration_s": self.elapsed.as_secs_f64(),
            "calls": self.calls(),
            "ok": self.ok,
            "failed": self.failed,
            "calls_per_s": self.calls() as f64 / self.elapsed.as_secs_f64(),
            "latency_us": latency,
            "errors": self.errors,
            "wire_bytes_per_call": self.per_call(self.bytes),
            "write_syscalls_per_call": self.per_call(self.writes),
            "histogram": self.buckets().iter().map(|(le, n)| json!({"le_us": us(*le), "count": n})).collect::<Vec<_>>(),
        })
    }
}

/// `85 µs`, `1.25 ms`, `2.50 s`.
pub fn fmt_ns(ns: u64) -> String {
    match ns {
        0..=999 => format!("{ns} ns"),
        1_000..=999_999 => format!("{:.0} µs", ns as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.2} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_in_a_fitting_unit() {
        assert_eq!(fmt_ns(850), "850 ns");
        assert_eq!(fmt_ns(85_400), "85 µs");
        assert_eq!(fmt_ns(1_250_000), "1.25 ms");
        assert_eq!(fmt_ns(2_500_000_000), "2.50 s");
    }

    #[test]
    fn buckets_cover_every_call_once() {
        let rec = Recorder::new();
        for (i, us) in [10u64, 11, 12, 50, 100, 1000, 5000].into_iter().enumerate() {
            rec.record(
                i,
                Duration::from_micros(us),
                &Ok(towerpc::Response::new(Bytes::new())),
            );
        }
        let (latency, errors) = rec.merged();
        assert!(errors.is_empty());
        let s = Summary {
            addr: "a".into(),
            method: "m".into(),
            callers: 1,
            connections: 1,
            rate: None,
            elapsed: Duration::from_secs(1),
            ok: 7,
            failed: 0,
            latency,
            errors,
            bytes: 700,
            writes: 7,
        };
        let buckets = s.buckets();
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 7);
        assert!(buckets.len() <= 17, "{buckets:?}");
        assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0));
        let text = s.to_text();
        assert!(text.contains("7 (7 calls/s), 7 ok, 0 failed"), "{text}");
        assert_eq!(s.to_json()["write_syscalls_per_call"], 1.0);
    }
}
