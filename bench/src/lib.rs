//! Shared load-generation harness: argument parsing, a lock-free latency
//! histogram, /proc sampling (CPU, RSS, loopback bytes, write syscalls) and the
//! closed-loop caller driver used by every client binary.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod tarpc_svc;

pub mod echo_pb {
    tonic::include_proto!("echo");
}

/// Command-line options common to all clients.
#[derive(Clone, Debug)]
pub struct Opts {
    pub addr: String,
    pub conc: usize,
    pub payload: String, // "small" (i64) or "1k" (1024-byte string)
    pub warmup: f64,
    pub dur: f64,
    pub server_pid: Option<u32>,
    pub label: String,
    /// towerpc only: `zstd` or `lz4` stream compression (the server accepts both).
    pub compression: Option<String>,
    /// towerpc only: callers sending `big_size`-byte requests beside the `conc` small ones
    /// (the mixed workload); their figures print on a second line, `BIG ...`.
    pub big: usize,
    pub big_size: usize,
    /// Which way the big calls' `big_size` bytes go: `echo` (both: the request, echoed back),
    /// `up` (the request; a one-byte reply) or `down` (an 8-byte request; the reply).
    pub big_dir: String,
    /// Connections the callers share (default 1): towerpc's `Builder::connections`, the
    /// floor's callers spread over that many connections. For the multi-core runs
    /// (`pinned.sh`); the RESULT line names it when it is not 1.
    pub conns: usize,
    /// At most this many calls a second from all the small callers together (0: as fast as
    /// they go). Each call takes the next slot of a shared schedule and waits for it when it is
    /// early (a caller behind the schedule starts at once); its latency is timed from its
    /// start. For comparing builds at equal work (the mixed cell: the big calls' throughput at
    /// the small calls' rate of another build).
    pub rate: f64,
}

impl Opts {
    pub fn parse() -> Opts {
        let mut o = Opts {
            addr: "127.0.0.1:7000".into(),
            conc: 1,
            payload: "small".into(),
            warmup: 2.0,
            dur: 10.0,
            server_pid: None,
            label: "?".into(),
            compression: None,
            big: 0,
            big_size: 200 * 1024,
            big_dir: "echo".into(),
            conns: 1,
            rate: 0.0,
        };
        let a: Vec<String> = std::env::args().skip(1).collect();
        let mut i = 0;
        while i + 1 < a.len() {
            let v = a[i + 1].clone();
            match a[i].as_str() {
                "--addr" => o.addr = v,
                "--conc" => o.conc = v.parse().unwrap(),
                "--payload" => o.payload = v,
                "--warmup" => o.warmup = v.parse().unwrap(),
                "--dur" => o.dur = v.parse().unwrap(),
                "--server-pid" => o.server_pid = Some(v.parse().unwrap()),
                "--label" => o.label = v,
                "--compression" => o.compression = Some(v),
                "--big" => o.big = v.parse().unwrap(),
                "--big-size" => o.big_size = v.parse().unwrap(),
                "--big-dir" => {
                    assert!(
                        ["echo", "up", "down"].contains(&v.as_str()),
                        "--big-dir echo|up|down"
                    );
                    o.big_dir = v.clone();
                }
                "--conns" => o.conns = v.parse::<usize>().unwrap().max(1),
                "--rate" => o.rate = v.parse().unwrap(),
                x => panic!("unknown arg {x}"),
            }
            i += 2;
        }
        o
    }
    /// `1k` or `1k-random`: 1 KiB payloads instead of an integer.
    pub fn big(&self) -> bool {
        self.payload != "small"
    }
}

/// `SPIN_US`, when set: the towerpc reader spin (client `reply_spin`, server `read_spin`) in
/// µs, 0 for none, instead of the library's default.
pub fn spin_us() -> Option<u64> {
    let v = std::env::var("SPIN_US").ok().filter(|v| !v.is_empty())?;
    Some(v.parse().expect("SPIN_US: microseconds"))
}

/// Log-linear histogram (32 sub-buckets per power of two, ~3% resolution), ns.
///
/// Sharded: each thread records into a shard of its own (cache lines of its own), so callers
/// on different runtime workers never write the same line. One shared array (and a shared
/// count of good calls beside it) had the workers contend for the same few lines at every
/// call: at a million calls a second on two cores that was cache-line traffic the client paid
/// for in CPU, and took from the server (see [`drive`]).
pub struct Hist {
    shards: Vec<Shard>,
}

/// One thread's buckets.
#[repr(align(128))]
struct Shard {
    b: Vec<AtomicU64>,
}

const SUB: u32 = 5;
const SHARDS: usize = 16;

thread_local! {
    /// This thread's shard.
    static SHARD: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS
    };
}

impl Hist {
    pub fn new() -> Hist {
        Hist {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    b: (0..(64 << SUB)).map(|_| AtomicU64::new(0)).collect(),
                })
                .collect(),
        }
    }
    fn idx(v: u64) -> usize {
        if v < (1 << SUB) {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= SUB
        let m = (v >> (e - SUB)) & ((1 << SUB) - 1);
        (((e - SUB + 1) << SUB) | m as u32) as usize
    }
    fn lower(i: usize) -> u64 {
        let i = i as u64;
        if i < (1 << SUB) {
            return i;
        }
        let e = (i >> SUB) + SUB as u64 - 1;
        let m = i & ((1 << SUB) - 1);
        (1u64 << e) | (m << (e - SUB as u64))
    }
    pub fn record(&self, ns: u64) {
        let shard = SHARD.with(|s| *s);
        self.shards[shard].b[Self::idx(ns)].fetch_add(1, Ordering::Relaxed);
    }
    /// Each bucket's count, summed over the shards.
    fn counts(&self) -> Vec<u64> {
        let mut counts = vec![0u64; 64 << SUB];
        for shard in &self.shards {
            for (c, b) in counts.iter_mut().zip(&shard.b) {
                *c += b.load(Ordering::Relaxed);
            }
        }
        counts
    }
    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.counts().iter().sum()
    }
    pub fn quantile(&self, q: f64) -> u64 {
        let counts = self.counts();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let target = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, c) in counts.iter().enumerate() {
            acc += c;
            if acc >= target {
                // midpoint of bucket
                let lo = Self::lower(i);
                let hi = Self::lower(i + 1);
                return (lo + hi) / 2;
            }
        }
        0
    }
}

impl Default for Hist {
    fn default() -> Self {
        Self::new()
    }
}

/// utime+stime of a process in seconds (from /proc/PID/stat, CLK_TCK=100).
pub fn cpu_secs(pid: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = match s.rfind(')') {
        Some(p) => &s[p + 2..],
        None => return f64::NAN,
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // fields after ")": state=0 ... utime is field 14 overall => index 11 here
    let ut: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(f64::NAN);
    let st: f64 = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(f64::NAN);
    (ut + st) / 100.0
}

/// VmHWM (peak RSS) in KiB.
pub fn peak_rss_kb(pid: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    for l in s.lines() {
        if let Some(r) = l.strip_prefix("VmHWM:") {
            return r.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        }
    }
    0
}

/// (bytes, packets) transmitted on `lo` (every loopback byte is counted once in tx).
pub fn lo_tx() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    for l in s.lines() {
        let l = l.trim();
        if let Some(r) = l.strip_prefix("lo:") {
            let f: Vec<u64> = r
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            return (f[8], f[9]);
        }
    }
    (0, 0)
}

/// `write`-family syscalls of a process so far (`syscw` in /proc/PID/io). Sockets are written
/// with `send`/`sendmsg`, which it does not count, so for tokio programs this is the eventfd
/// writes that wake a parked runtime thread: the wake-up syscalls.
pub fn write_syscalls(pid: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The 1 KiB payload: `a`..`z` repeating (compresses well).
pub fn payload_bytes(big: bool) -> Vec<u8> {
    if big {
        (0..1024u32).map(|i| b'a' + (i % 26) as u8).collect()
    } else {
        Vec::new()
    }
}

/// An incompressible 1 KiB payload (xorshift noise seeded by `seed`), for `1k-random`. Eight
/// bytes per step: the generator must cost far less than the call it feeds.
pub fn random_payload(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(1024);
    for _ in 0..1024 / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out
}

/// Socket writes so far, client and server together, where the system can count them
/// (towerpc: its own counters); `None` elsewhere.
pub type SocketWrites =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = Option<u64>> + Send>> + Send + Sync>;

/// Closed-loop driver: `conc` tasks each loop `call(i)`; measures during
/// [warmup, warmup+dur). Prints one result line.
///
/// What the driver does per call writes no memory another caller writes (the histogram is
/// sharded per thread), and the clients' `call`s clone no shared handle per call (each binary
/// leaks its client and payload for `&'static` borrows; tonic's client, whose calls take
/// `&mut self`, is cloned per call as its users do). A shared counter and two shared `Arc`s
/// touched at every call were about half of the driver's own samples in a profile of 1,000
/// callers on two cores, CPU every system's client then took from its server: without them
/// towerpc and the floor made 6 % more calls a second (docs/benchmarks.md, session 24).
pub async fn drive<F, Fut>(o: &Opts, call: F)
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    drive_with(o, call, Arc::new(|| Box::pin(async { None }))).await
}

/// `--rate`: a schedule of call slots shared by all the callers.
struct Schedule {
    origin: Instant,
    /// Seconds between two slots (0: no schedule).
    step: f64,
    taken: AtomicU64,
}

impl Schedule {
    fn new(rate: f64) -> Schedule {
        let step = if rate > 0.0 { 1.0 / rate } else { 0.0 };
        Schedule {
            origin: Instant::now(),
            step,
            taken: AtomicU64::new(0),
        }
    }

    /// Waits for the next free slot if it is still ahead; returns when the call starts.
    async fn next(&self) -> Instant {
        if self.step == 0.0 {
            return Instant::now();
        }
        let n = self.taken.fetch_add(1, Ordering::Relaxed);
        let slot = self.origin + Duration::from_secs_f64(n as f64 * self.step);
        if slot > Instant::now() {
            tokio::time::sleep_until(slot.into()).await;
        }
        Instant::now()
    }
}

/// [`drive`], also reporting socket writes per call from `socket_writes`.
pub async fn drive_with<F, Fut>(o: &Opts, call: F, socket_writes: SocketWrites)
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let hist = Arc::new(Hist::new());
    let recording = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let errs = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::with_capacity(o.conc);
    let schedule = Arc::new(Schedule::new(o.rate));
    for t in 0..o.conc {
        let (hist, recording, stop, errs, call, schedule) = (
            hist.clone(),
            recording.clone(),
            stop.clone(),
            errs.clone(),
            call.clone(),
            schedule.clone(),
        );
        handles.push(tokio::spawn(async move {
            let mut i: u64 = (t as u64) << 32;
            while !stop.load(Ordering::Relaxed) {
                let t0 = schedule.next().await;
                let good = call(i).await;
                let ns = t0.elapsed().as_nanos() as u64;
                if recording.load(Ordering::Relaxed) {
                    if good {
                        // The good calls' count is the histogram's.
                        hist.record(ns);
                    } else {
                        errs.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(o.warmup)).await;
    let spid = o.server_pid.map(|p| p.to_string());
    let c0 = cpu_secs("self");
    let s0 = spid.as_deref().map(cpu_secs).unwrap_or(f64::NAN);
    let w0 = socket_writes().await;
    let sw0 = write_syscalls("self") + spid.as_deref().map(write_syscalls).unwrap_or(0);
    let (b0, p0) = lo_tx();
    let t0 = Instant::now();
    recording.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs_f64(o.dur)).await;
    recording.store(false, Ordering::SeqCst);
    let el = t0.elapsed().as_secs_f64();
    let (b1, p1) = lo_tx();
    let sw1 = write_syscalls("self") + spid.as_deref().map(write_syscalls).unwrap_or(0);
    let w1 = socket_writes().await;
    let c1 = cpu_secs("self");
    let s1 = spid.as_deref().map(cpu_secs).unwrap_or(f64::NAN);
    stop.store(true, Ordering::SeqCst);
    let n = hist.count();
    let nf = n.max(1) as f64;
    let srss = spid.as_deref().map(peak_rss_kb).unwrap_or(0);
    if std::env::var_os("TAILS").is_some() {
        // The shape of the tail, for telling a broad shift from rare stalls.
        let q = |q: f64| hist.quantile(q) as f64 / 1000.0;
        println!(
            "TAILS p50_us={:.1} p90_us={:.1} p95_us={:.1} p99_us={:.1} p999_us={:.1} p9999_us={:.1}",
            q(0.5), q(0.9), q(0.95), q(0.99), q(0.999), q(0.9999)
        );
    }
    println!(
        "RESULT label={}{} payload={} conc={} calls={} errs={} secs={:.2} cps={:.0} p50_us={:.1} p99_us={:.1} cli_cpu_s={:.2} srv_cpu_s={:.2} cpu_s_per_M={:.2} lo_bytes_per_call={:.1} lo_pkts_per_call={:.3} cli_rss_kb={} srv_rss_kb={} wake_writes_per_call={:.4} sock_writes_per_call={}",
        o.label,
        if o.conns > 1 { format!(" conns={}", o.conns) } else { String::new() },
        o.payload, o.conc, n, errs.load(Ordering::Relaxed), el, n as f64 / el,
        hist.quantile(0.50) as f64 / 1000.0, hist.quantile(0.99) as f64 / 1000.0,
        c1 - c0, s1 - s0, ((c1 - c0) + (s1 - s0)) / nf * 1e6,
        (b1 - b0) as f64 / nf, (p1 - p0) as f64 / nf,
        peak_rss_kb("self"), srss,
        sw1.saturating_sub(sw0) as f64 / nf,
        match (w0, w1) {
            (Some(a), Some(b)) => format!("{:.4}", b.saturating_sub(a) as f64 / nf),
            _ => "-".into(),
        }
    );
    // Give callers a moment to stop; don't wait on stuck ones.
    let _ = tokio::time::timeout(Duration::from_secs(2), futures::future::join_all(handles)).await;
}
