//! Decompression bombs against a server that accepts stream compression (docs/reliability.md L1–L3).
//!
//! A hostile raw client negotiates compression in its preface, then streams a compressed
//! stream that decompresses to far more than any limit (1 GiB of zeros, produced on the fly), a
//! zstd frame that declares a 2 GiB window, or a stream that decompresses into a frame header
//! above the limit. Each case checks that the server closes the connection quickly, that the
//! process's extra peak heap stays within the configured bound, and that an honest client on
//! its own connection keeps working during and after the attack.
//!
//! Heap is measured with a counting global allocator; zstd's C library allocates with `malloc`
//! behind Rust's back, so the peak resident set (`VmHWM`, reset through
//! `/proc/self/clear_refs`) is checked against the same bound where Linux provides it.
//!
//! The cases share the allocator's counters, so they run one at a time (a global mutex).

#![cfg(all(feature = "compression-zstd", feature = "compression-deflate"))]

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};
use towerpc::codec::{Compression, Frame, FrameCodec, Message, PREFACE_LEN};
use towerpc::{Client, Request, Response, Server};

#[global_allocator]
static ALLOC: peak_alloc::PeakAlloc = peak_alloc::PeakAlloc;

const MIB: usize = 1 << 20;
/// What the bombs decompress to.
const BOMB_PLAIN_LEN: u64 = 1 << 30;
/// Zeros fed to the compressor per step.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// One case at a time: they share the allocator's counters.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `field` of /proc/self/status in bytes (Linux only).
fn proc_status(field: &str) -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Extra peak memory since `start`: heap through the counting allocator, and resident set.
struct Meter {
    heap0: usize,
    rss0: Option<usize>,
}

impl Meter {
    fn start() -> Meter {
        // "5" resets the peak resident set size (VmHWM) to the current one.
        let rss_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        ALLOC.reset_peak_usage();
        Meter {
            heap0: ALLOC.current_usage(),
            rss0: if rss_reset {
                proc_status("VmRSS:")
            } else {
                None
            },
        }
    }

    fn extra_heap(&self) -> usize {
        ALLOC.peak_usage().saturating_sub(self.heap0)
    }

    fn extra_rss(&self) -> Option<usize> {
        Some(proc_status("VmHWM:")?.saturating_sub(self.rss0?))
    }
}

/// The compressed bytes a hostile client sends, a chunk at a time.
type Source = Box<dyn FnMut() -> Option<Vec<u8>> + Send>;

enum Enc {
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Deflate(flate2::write::DeflateEncoder<Vec<u8>>),
    /// The library's own lz4 encoder (async; into a `Vec`, it never waits: see [`at_once`]).
    #[cfg(feature = "compression-lz4")]
    Lz4(async_compression::tokio::write::Lz4Encoder<Vec<u8>>),
}

impl Enc {
    fn new(algo: Compression) -> Enc {
        match algo {
            Compression::Zstd => {
                Enc::Zstd(zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap())
            }
            Compression::Deflate => Enc::Deflate(flate2::write::DeflateEncoder::new(
                Vec::new(),
                flate2::Compression::best(),
            )),
            #[cfg(feature = "compression-lz4")]
            Compression::Lz4 => {
                Enc::Lz4(async_compression::tokio::write::Lz4Encoder::new(Vec::new()))
            }
            #[allow(unreachable_patterns)]
            _ => unreachable!("no other algorithm"),
        }
    }

    fn write(&mut self, b: &[u8]) {
        match self {
            Enc::Zstd(e) => e.write_all(b).unwrap(),
            Enc::Deflate(e) => e.write_all(b).unwrap(),
            #[cfg(feature = "compression-lz4")]
            Enc::Lz4(e) => at_once(tokio::io::AsyncWriteExt::write_all(e, b)).unwrap(),
        }
    }

    fn finish(&mut self) {
        match self {
            Enc::Zstd(e) => e.do_finish().unwrap(),
            Enc::Deflate(e) => e.try_finish().unwrap(),
            #[cfg(feature = "compression-lz4")]
            Enc::Lz4(e) => at_once(tokio::io::AsyncWriteExt::shutdown(e)).unwrap(),
        }
    }

    fn take(&mut self) -> Vec<u8> {
        match self {
            Enc::Zstd(e) => std::mem::take(e.get_mut()),
            Enc::Deflate(e) => std::mem::take(e.get_mut()),
            #[cfg(feature = "compression-lz4")]
            Enc::Lz4(e) => std::mem::take(e.get_mut()),
        }
    }
}

/// Plaintext a bomb compresses before it is handed over: enough for zstd's window (2 MiB at
/// level 3) and tables to be filled, so that filling them is not counted against the server.
const BOMB_WARM: u64 = 16 << 20;

/// A bomb compressed on the fly: `prefix`, then zeros up to 1 GiB in all, through `algo`.
/// The encoder is created and primed (the output of its first [`BOMB_WARM`] bytes made, a few
/// hundred bytes) before it is returned, so its own memory is not counted against the server:
/// primed with its first output only, the compressor went on filling its window while the
/// meter ran, and the test process's peak RSS rose by up to half a MiB more.
fn bomb(algo: Compression, prefix: &[u8]) -> Source {
    let mut enc = Enc::new(algo);
    enc.write(prefix);
    let mut left = BOMB_PLAIN_LEN - prefix.len() as u64;
    let mut done = false;
    let mut step = move || -> Option<(Vec<u8>, u64)> {
        if done {
            return None;
        }
        // Feed zeros until the compressor emits something (zstd emits ~4 bytes per 128 KiB
        // block of zeros), then hand that over, with the plaintext still to come.
        loop {
            if left == 0 {
                enc.finish();
                done = true;
                return Some((enc.take(), 0));
            }
            let n = left.min(ZEROS.len() as u64) as usize;
            enc.write(&ZEROS[..n]);
            left -= n as u64;
            let out = enc.take();
            if !out.is_empty() {
                return Some((out, left));
            }
        }
    };
    let mut primed = std::collections::VecDeque::new();
    while let Some((out, left)) = step() {
        primed.push_back(out);
        if left + BOMB_WARM <= BOMB_PLAIN_LEN {
            break;
        }
    }
    Box::new(move || primed.pop_front().or_else(|| step().map(|(out, _)| out)))
}

/// Runs `fut`, which never waits (async compression over in-memory buffers), to its end in one
/// poll: the bombs are made inside a runtime, where blocking on another is refused.
#[cfg(feature = "compression-lz4")]
fn at_once<F: std::future::Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("in-memory compression waited"),
    }
}

/// A frame header (length, flags 0, reserved 0, count 1).
fn frame_header(len: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&len.to_be_bytes());
    h[6..8].copy_from_slice(&1u16.to_be_bytes());
    h
}

/// A towerpc frame holding one REQUEST for `Probe`.
fn probe_frame() -> Vec<u8> {
    let mut out = BytesMut::new();
    FrameCodec::new()
        .encode(
            Frame::new(vec![Message::Request {
                id: 1,
                timeout_ms: 0,
                method: Bytes::from_static(b"Probe"),
                metadata: Bytes::new(),
                body: support::msgpack(&7u64),
            }]),
            &mut out,
        )
        .unwrap();
    out.to_vec()
}

/// A zstd frame written by hand (RFC 8878): magic, a frame header descriptor with no content
/// size and no checksum, then `window`, then one raw last block holding `content`.
/// `window` is either a window descriptor byte (exponent in the high 5 bits: log = 10 + e) or,
/// with `single_segment`, a 4-byte frame content size that is also the window size.
fn zstd_frame(window: WindowDecl, content: &[u8]) -> Vec<u8> {
    let mut f = vec![0x28, 0xB5, 0x2F, 0xFD];
    match window {
        WindowDecl::Log(log) => {
            assert!((10..=41).contains(&log));
            f.push(0x00);
            f.push(((log - 10) as u8) << 3);
        }
        WindowDecl::SingleSegment(size) => {
            // FCS_flag 2 (4-byte content size), Single_Segment 1.
            f.push(0b1010_0000);
            f.extend_from_slice(&size.to_le_bytes());
        }
    }
    assert!(content.len() < 128 << 10);
    // Block header, little-endian: last block, type raw (0), size.
    let header = ((content.len() as u32) << 3) | 1;
    f.extend_from_slice(&header.to_le_bytes()[..3]);
    f.extend_from_slice(content);
    f
}

#[derive(Debug, Clone, Copy)]
enum WindowDecl {
    Log(u32),
    SingleSegment(u32),
}

/// What the hostile client saw.
#[derive(Debug)]
struct Outcome {
    /// From the first bomb byte to the connection's end (EOF or reset), if it ended.
    closed_in: Option<Duration>,
    /// Compressed bytes written.
    sent: u64,
    /// Bytes the server sent after its preface (compressed).
    received: Vec<u8>,
}

/// The algorithm's bit in the preface's compression byte (PROTOCOL.md §3).
fn wire_bit(algo: Compression) -> u8 {
    match algo.to_string().as_str() {
        "zstd" => 0x01,
        "deflate" => 0x02,
        "lz4" => 0x04,
        other => panic!("no wire bit known for {other}"),
    }
}

/// The hostile client, on plain blocking sockets on its own threads (so that compressing a
/// gigabyte of zeros never holds up the server's runtime): offers `algo`, checks that the
/// server chose it, streams `source`, and waits at most `wait` for the server to hang up.
fn attack(addr: SocketAddr, algo: Compression, mut source: Source, wait: Duration) -> Outcome {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    let mut preface = support::client_preface(16 << 20);
    preface[6] = wire_bit(algo);
    stream.write_all(&preface).expect("write preface");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut theirs = [0u8; PREFACE_LEN];
    stream
        .read_exact(&mut theirs)
        .expect("read the server preface");
    assert_eq!(&theirs[..6], b"TRPC\x01S", "server preface");
    assert_eq!(
        theirs[6],
        wire_bit(algo),
        "the server did not choose {algo}"
    );

    let start = Instant::now();
    let closed = Arc::new(AtomicBool::new(false));
    let mut rd = stream.try_clone().unwrap();
    rd.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let reader = {
        let closed = closed.clone();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match rd.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if start.elapsed() > wait {
                            return (None, got);
                        }
                        continue;
                    }
                    Err(_) => break,
                }
            }
            closed.store(true, SeqCst);
            (Some(start.elapsed()), got)
        })
    };
    stream.set_write_timeout(Some(wait)).unwrap();
    let mut sent = 0u64;
    while !closed.load(SeqCst) && start.elapsed() < wait {
        let Some(chunk) = source() else { break };
        if stream.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len() as u64;
    }
    let (closed_in, received) = reader.join().unwrap();
    Outcome {
        closed_in,
        sent,
        received,
    }
}

/// Decompresses what the server sent before it hung up (possibly cut short) and returns the
/// messages in it, for the report.
fn server_messages(algo: Compression, received: &[u8]) -> Vec<Message> {
    let mut plain = Vec::new();
    let mut buf = [0u8; 4096];
    let mut read_all = |r: &mut dyn Read| loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => plain.extend_from_slice(&buf[..n]),
        }
    };
    match algo {
        Compression::Zstd => {
            if let Ok(mut d) = zstd::stream::read::Decoder::new(received) {
                read_all(&mut d);
            }
        }
        #[cfg(feature = "compression-lz4")]
        Compression::Lz4 => {
            // Up to where the stream ends or breaks off: what was read is kept.
            let mut d = async_compression::tokio::bufread::Lz4Decoder::new(received);
            let _ = at_once(tokio::io::AsyncReadExt::read_to_end(&mut d, &mut plain));
        }
        _ => read_all(&mut flate2::read::DeflateDecoder::new(received)),
    }
    let mut src = BytesMut::from(&plain[..]);
    let mut codec = FrameCodec::new();
    let mut out = Vec::new();
    while let Ok(Some(frame)) = codec.decode(&mut src) {
        out.extend(frame.into_messages());
    }
    out
}

/// Echoes, and counts `Probe` requests (the hand-made frames' method).
fn counting_echo(probes: Arc<AtomicUsize>) -> support::Svc {
    support::service(move |req: Request| {
        let probes = probes.clone();
        async move {
            match req.method() {
                "Probe" => {
                    probes.fetch_add(1, SeqCst);
                }
                // Holds its request (and so its body) for a while, like a slow handler.
                "Hold" => {
                    probes.fetch_add(1, SeqCst);
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                _ => {}
            }
            Ok(Response::new(req.into_body()))
        }
    })
}

/// What one case measured.
#[derive(Debug)]
struct Report {
    outcome: Outcome,
    extra_heap: usize,
    extra_rss: Option<usize>,
    probes: usize,
    protocol_errors: u64,
    read_errors: u64,
    honest_calls: usize,
}

/// Runs one attack: a server built by `server` (accepting `algo`), an honest client calling it
/// all along on its own connection, and the hostile client streaming `source` (made by `make`
/// before measuring starts). Checks the honest client; returns the rest for the case to judge.
fn run_case(
    name: &str,
    server: Server,
    algo: Compression,
    make: impl FnOnce() -> Source,
    wait: Duration,
) -> Report {
    let rt = runtime();
    let report = rt.block_on(async {
        let probes = Arc::new(AtomicUsize::new(0));
        let server = support::serve(
            server.accept_compression(algo),
            counting_echo(probes.clone()),
        )
        .await;
        let addr = server.addr;
        let honest = Client::builder()
            .compression(algo)
            .timeout(Duration::from_secs(5))
            .connect(addr)
            .await
            .unwrap();
        assert_eq!(honest.invoke::<_, u64>("Echo", &0u64).await.unwrap(), 0);

        let stop = Arc::new(AtomicBool::new(false));
        let honest_task = {
            let honest = honest.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut ok = 0usize;
                let mut n = 1u64;
                while !stop.load(SeqCst) {
                    match honest.invoke::<_, u64>("Echo", &n).await {
                        Ok(v) if v == n => ok += 1,
                        other => return Err(format!("honest call {n}: {other:?}")),
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok(ok)
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;

        let source = make();
        // The attack runs on a blocking thread: start that thread (its stack, its malloc arena)
        // before the meter, which is to see what the server holds, not the attacker's thread.
        tokio::task::spawn_blocking(|| drop(std::hint::black_box(vec![1u8; 64 << 10])))
            .await
            .unwrap();
        let before = server.stats();
        let meter = Meter::start();
        let outcome = tokio::task::spawn_blocking(move || attack(addr, algo, source, wait))
            .await
            .unwrap();
        let extra_heap = meter.extra_heap();
        let extra_rss = meter.extra_rss();

        // Let the honest client go on a little after the attack, then stop it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.store(true, SeqCst);
        let honest_calls = honest_task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: the honest client failed: {e}"));
        assert!(
            honest_calls > 0,
            "{name}: the honest client made no call during the attack"
        );
        for n in 0..10u64 {
            let v: u64 = honest
                .invoke("Echo", &n)
                .await
                .unwrap_or_else(|e| panic!("{name}: honest call after the attack: {e}"));
            assert_eq!(v, n);
        }
        assert_eq!(
            honest.stats().dials,
            1,
            "{name}: the honest client redialed"
        );
        let delta = server.stats().since(&before);
        drop(honest);
        server.shutdown(Duration::from_secs(5)).await;
        Report {
            outcome,
            extra_heap,
            extra_rss,
            probes: probes.load(SeqCst),
            protocol_errors: delta.protocol_errors,
            read_errors: delta.read_errors,
            honest_calls,
        }
    });
    let said: Vec<String> = server_messages(algo, &report.outcome.received)
        .iter()
        .map(|m| format!("{m:?}"))
        .collect();
    println!(
        "{name}: closed in {:?}, {} compressed bytes sent, extra peak heap {:.2} MiB, extra \
         peak RSS {}, protocol errors {}, read errors {}, probes run {}, honest calls during {}; \
         server said {said:?}",
        report.outcome.closed_in,
        report.outcome.sent,
        report.extra_heap as f64 / MIB as f64,
        report.extra_rss.map_or("n/a".to_string(), |r| format!(
            "{:.2} MiB",
            r as f64 / MIB as f64
        )),
        report.protocol_errors,
        report.read_errors,
        report.probes,
        report.honest_calls,
    );
    report
}

/// Asserts the connection closed within 5 s and extra peak memory within `bound`.
fn assert_closed_within(name: &str, r: &Report, bound: usize) {
    let closed_in = r
        .outcome
        .closed_in
        .unwrap_or_else(|| panic!("{name}: the server did not close the connection"));
    assert!(
        closed_in < Duration::from_secs(5),
        "{name}: closing took {closed_in:?}"
    );
    assert!(
        r.extra_heap <= bound,
        "{name}: extra peak heap {} bytes, bound {bound}",
        r.extra_heap
    );
    if let Some(rss) = r.extra_rss {
        assert!(
            rss <= bound,
            "{name}: extra peak RSS {rss} bytes, bound {bound}"
        );
    }
}

const WAIT: Duration = Duration::from_secs(10);

/// L1/L2: 1 GiB of zeros against `max_frame_len(1 MiB)`; the zeros read as an empty frame.
fn zeros_bomb(algo: Compression) {
    let _serial = serial();
    let name = format!("{algo} bomb, 1 GiB of zeros");
    let r = run_case(
        &name,
        Server::builder().max_frame_len(MIB),
        algo,
        || bomb(algo, &[]),
        WAIT,
    );
    assert_closed_within(&name, &r, MIB + 8 * MIB);
    assert_eq!(
        r.protocol_errors, 1,
        "{name}: not counted as a protocol error"
    );
}

/// L1/L2 at the limit: a valid header announcing exactly `max_frame_len` (1 MiB), then zeros
/// to 1 GiB: the server may buffer one whole frame, and no more.
fn max_frame_bomb(algo: Compression) {
    let _serial = serial();
    let name = format!("{algo} bomb, a 1 MiB frame header then zeros to 1 GiB");
    let r = run_case(
        &name,
        Server::builder().max_frame_len(MIB),
        algo,
        || bomb(algo, &frame_header(MIB as u32)),
        WAIT,
    );
    assert_closed_within(&name, &r, MIB + 8 * MIB);
    assert_eq!(
        r.protocol_errors, 1,
        "{name}: not counted as a protocol error"
    );
}

/// A stream that decompresses into a header announcing 16 MiB + 1 against the default 16 MiB
/// limit: refused from the header, before anything is reserved for the body.
fn oversized_header_bomb(algo: Compression) {
    let _serial = serial();
    let name = format!("{algo} bomb, a 16 MiB + 1 frame header then zeros");
    let r = run_case(
        &name,
        Server::builder(),
        algo,
        || bomb(algo, &frame_header((16 * MIB + 1) as u32)),
        WAIT,
    );
    assert_closed_within(&name, &r, 4 * MIB);
    assert_eq!(
        r.protocol_errors, 1,
        "{name}: not counted as a protocol error"
    );
    let said = server_messages(algo, &r.outcome.received);
    // Best effort: the GOAWAY may be lost to the reset caused by the unread bomb.
    if let Some(Message::GoAway { code, .. }) = said.last() {
        assert_eq!(*code, 12, "{name}: GOAWAY code is not FRAME_TOO_LARGE");
    }
}

#[test]
fn zstd_bomb_of_zeros_is_cut_off() {
    zeros_bomb(Compression::Zstd);
}

#[test]
fn deflate_bomb_of_zeros_is_cut_off() {
    zeros_bomb(Compression::Deflate);
}

#[test]
fn zstd_bomb_behind_a_max_size_frame_header_is_cut_off() {
    max_frame_bomb(Compression::Zstd);
}

#[test]
fn deflate_bomb_behind_a_max_size_frame_header_is_cut_off() {
    max_frame_bomb(Compression::Deflate);
}

#[test]
fn zstd_bomb_announcing_a_frame_above_the_limit_is_refused_from_the_header() {
    oversized_header_bomb(Compression::Zstd);
}

#[test]
fn deflate_bomb_announcing_a_frame_above_the_limit_is_refused_from_the_header() {
    oversized_header_bomb(Compression::Deflate);
}

/// Sends one hand-made zstd frame declaring `window` and holding a valid `Probe` request.
fn window_case(name: &str, window: WindowDecl) -> Report {
    let frame = zstd_frame(window, &probe_frame());
    run_case(
        name,
        Server::builder(),
        Compression::Zstd,
        move || {
            let mut frame = Some(frame);
            Box::new(move || frame.take())
        },
        // A refused frame closes at once; an accepted one leaves the connection open.
        Duration::from_secs(3),
    )
}

#[test]
fn zstd_frame_with_an_ordinary_window_is_decoded() {
    // The control: the same hand-made frame with a 1 MiB window runs its request, which shows
    // that the refusals below are about the window alone.
    let _serial = serial();
    let r = window_case("zstd window log 20 (control)", WindowDecl::Log(20));
    assert_eq!(r.probes, 1, "the hand-made zstd frame was not decoded");
    assert!(
        r.outcome.closed_in.is_none(),
        "the server closed a connection with a valid frame"
    );
    let said = server_messages(Compression::Zstd, &r.outcome.received);
    assert!(
        said.iter()
            .any(|m| matches!(m, Message::Response { id: 1, .. })),
        "no reply to the probe: {said:?}"
    );
}

#[test]
fn zstd_frame_with_the_largest_window_a_receiver_must_take_is_decoded() {
    // §3.3: a receiver MUST decode windows up to 8 MiB (window log 23); the cap refuses only
    // what is above it.
    let _serial = serial();
    let log = towerpc::codec::ZSTD_WINDOW_LOG_MAX;
    assert_eq!(log, 23, "the cap is the protocol's 8 MiB");
    let r = window_case("zstd window log 23", WindowDecl::Log(log));
    assert_eq!(
        r.probes, 1,
        "the frame with an 8 MiB window was not decoded"
    );
    assert!(
        r.outcome.closed_in.is_none(),
        "the server closed a connection with a valid 8 MiB window"
    );
}

#[test]
fn zstd_window_past_the_compression_budget_is_refused_with_resource_exhausted() {
    // `Server::max_compression_bytes`: room for two zstd connections at the 512 KiB window
    // towerpc's encoder uses (the honest client's and this one), not for an 8 MiB window.
    let _serial = serial();
    let name = "zstd window log 23 past the budget";
    // Through the decoder (a checksum keeps it off the reader's path for one raw block, which
    // takes no window), declaring an 8 MiB window.
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(23))
        .unwrap();
    enc.include_checksum(true).unwrap();
    enc.write_all(&probe_frame()).unwrap();
    let frame = enc.finish().unwrap();
    assert_eq!(frame[5] >> 3, 23 - 10, "the frame declares an 8 MiB window");
    let r = run_case(
        name,
        Server::builder().max_compression_bytes(6 << 20),
        Compression::Zstd,
        move || {
            let mut frame = Some(frame);
            Box::new(move || frame.take())
        },
        Duration::from_secs(3),
    );
    assert_eq!(r.probes, 0, "{name}: the request inside the frame ran");
    assert!(r.outcome.closed_in.is_some(), "{name}: not closed");
    let said = server_messages(Compression::Zstd, &r.outcome.received);
    assert!(
        said.iter()
            .any(|m| matches!(m, Message::GoAway { code: 7, .. })),
        "{name}: no GOAWAY RESOURCE_EXHAUSTED: {said:?}"
    );
}

#[test]
fn zstd_frame_declaring_a_2_gib_window_is_refused() {
    let _serial = serial();
    let name = "zstd window log 31";
    let r = window_case(name, WindowDecl::Log(31));
    assert_eq!(r.probes, 0, "{name}: the request inside the frame ran");
    assert_closed_within(name, &r, 4 * MIB);
}

#[test]
fn zstd_single_segment_frame_of_2_gib_is_refused() {
    let _serial = serial();
    let name = "zstd single segment, content size 2 GiB";
    let r = window_case(name, WindowDecl::SingleSegment(1 << 31));
    assert_eq!(r.probes, 0, "{name}: the request inside the frame ran");
    assert_closed_within(name, &r, 4 * MIB);
}

#[test]
fn zstd_frame_one_step_above_the_window_cap_is_refused() {
    let _serial = serial();
    let log = towerpc::codec::ZSTD_WINDOW_LOG_MAX + 1;
    let name = format!("zstd window log {log}");
    let r = window_case(&name, WindowDecl::Log(log));
    assert_eq!(r.probes, 0, "{name}: the request inside the frame ran");
    assert_closed_within(&name, &r, 4 * MIB);
}

#[test]
fn zstd_window_refusal_is_counted_and_reported() {
    let _serial = serial();
    let name = "zstd window log 31, reporting";
    let r = window_case(name, WindowDecl::Log(31));
    assert_eq!(r.probes, 0);
    assert!(
        r.protocol_errors + r.read_errors > 0,
        "{name}: the refusal shows in no server counter"
    );
    let said = server_messages(Compression::Zstd, &r.outcome.received);
    assert!(
        matches!(said.last(), Some(Message::GoAway { code: 11, .. })),
        "{name}: no GOAWAY PROTOCOL_ERROR before closing: {said:?}"
    );
}

/// PROTOCOL.md §12: a compressed stream that does not decode is a PROTOCOL_ERROR. `garbage`
/// is the whole stream after the preface.
fn corrupt_stream_case(algo: Compression, garbage: Vec<u8>) {
    let _serial = serial();
    let name = format!("{algo} stream that does not decode");
    let r = run_case(
        &name,
        Server::builder(),
        algo,
        move || {
            let mut garbage = Some(garbage);
            Box::new(move || garbage.take())
        },
        Duration::from_secs(3),
    );
    assert_closed_within(&name, &r, 4 * MIB);
    assert_eq!(r.probes, 0);
    assert!(r.protocol_errors > 0, "{name}: not counted: {r:?}");
    let said = server_messages(algo, &r.outcome.received);
    assert!(
        matches!(said.last(), Some(Message::GoAway { code: 11, .. })),
        "{name}: no GOAWAY PROTOCOL_ERROR before closing: {said:?}"
    );
}

#[test]
fn zstd_stream_that_does_not_decode_is_a_protocol_error() {
    // Not a zstd frame's magic, nor a skippable frame's.
    corrupt_stream_case(Compression::Zstd, vec![0x5A; 64]);
}

#[cfg(feature = "compression-lz4")]
#[test]
fn lz4_stream_that_does_not_decode_is_a_protocol_error() {
    // Not an LZ4 frame's magic (04 22 4D 18), nor a skippable frame's.
    corrupt_stream_case(Compression::Lz4, vec![0x5A; 64]);
}

#[cfg(feature = "compression-lz4")]
#[test]
fn lz4_bomb_of_zeros_is_cut_off() {
    zeros_bomb(Compression::Lz4);
}

#[cfg(feature = "compression-lz4")]
#[test]
fn lz4_bomb_behind_a_max_size_frame_header_is_cut_off() {
    max_frame_bomb(Compression::Lz4);
}

#[cfg(feature = "compression-lz4")]
#[test]
fn lz4_bomb_announcing_a_frame_above_the_limit_is_refused_from_the_header() {
    oversized_header_bomb(Compression::Lz4);
}

#[cfg(feature = "compression-lz4")]
#[test]
fn lz4_bomb_of_valid_requests_is_bounded() {
    request_bomb_case(Compression::Lz4);
}

#[test]
fn deflate_stream_that_does_not_decode_is_a_protocol_error() {
    // A final block of the reserved type 3.
    corrupt_stream_case(Compression::Deflate, vec![0xFF; 64]);
}

/// A compressed stream of `count` valid REQUESTs for `Hold`, each filling a frame of
/// `frame_len` with a body of zeros: a few bytes on the wire per mebibyte the server keeps.
fn request_bomb(algo: Compression, count: u32, frame_len: usize) -> Source {
    // Frame header, then the request's fixed part and method; the body is zeros.
    const METHOD: &[u8] = b"Hold";
    let body_len = frame_len - 16 - METHOD.len();
    let mut enc = Enc::new(algo);
    let mut next_id = 1u32;
    Box::new(move || loop {
        if next_id > count {
            if next_id == count + 1 {
                next_id += 1;
                enc.finish();
                return Some(enc.take());
            }
            return None;
        }
        let mut head = Vec::with_capacity(8 + 16 + METHOD.len());
        head.extend_from_slice(&frame_header(frame_len as u32));
        head.push(0x01);
        head.extend_from_slice(&next_id.to_be_bytes());
        head.extend_from_slice(&0u32.to_be_bytes());
        head.push(METHOD.len() as u8);
        head.extend_from_slice(&0u16.to_be_bytes());
        head.extend_from_slice(&(body_len as u32).to_be_bytes());
        head.extend_from_slice(METHOD);
        enc.write(&head);
        let mut left = body_len;
        while left > 0 {
            let n = left.min(ZEROS.len());
            enc.write(&ZEROS[..n]);
            left -= n;
        }
        next_id += 1;
        let out = enc.take();
        if !out.is_empty() {
            return Some(out);
        }
    })
}

/// Valid requests, not garbage: each decompresses to a whole 1 MiB frame the server accepts
/// and keeps while its (slow) handler runs, so a few KiB on the wire could pin hundreds of MiB.
/// `max_in_flight_bytes` bounds what one connection's handlers hold: the reader pauses at the
/// cap, so extra memory stays within the cap, one frame being decoded and 8 MiB of slack.
fn request_bomb_case(algo: Compression) {
    let _serial = serial();
    let name = format!("{algo} bomb of 512 valid 1 MiB requests to a slow handler");
    let r = run_case(
        &name,
        Server::builder()
            .max_frame_len(MIB)
            .max_in_flight_bytes(4 * MIB),
        algo,
        || request_bomb(algo, 512, MIB),
        Duration::from_secs(2),
    );
    println!(
        "{name}: {} compressed bytes on the wire held {} handlers",
        r.outcome.sent, r.probes
    );
    assert!(
        r.extra_heap <= 4 * MIB + MIB + 8 * MIB,
        "{name}: extra peak heap {:.1} MiB from {} compressed bytes ({} requests held)",
        r.extra_heap as f64 / MIB as f64,
        r.outcome.sent,
        r.probes
    );
}

#[test]
fn zstd_bomb_of_valid_requests_is_bounded() {
    request_bomb_case(Compression::Zstd);
}

#[test]
fn deflate_bomb_of_valid_requests_is_bounded() {
    request_bomb_case(Compression::Deflate);
}

/// Issue 10 item 1: memory follows bytes received, not bytes announced. Fifty connections each
/// send a preface and one frame header announcing 16 MiB, and nothing more: before, each made
/// the server reserve the whole body (800 MiB in all, an abort under a memory cap); now each
/// costs its read buffer.
#[test]
fn announced_bodies_reserve_nothing() {
    let _serial = serial();
    const CONNS: usize = 50;
    let rt = runtime();
    let server = Server::builder();
    let handle = server.handle();
    let (addr, _serving) = rt.block_on(async {
        let incoming = towerpc::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = incoming.local_addr().unwrap();
        let echo = tower::service_fn(|req: Request| async move {
            Ok::<_, towerpc::BoxError>(Response::new(req.into_body()))
        });
        (
            addr,
            tokio::spawn(server.serve_with_incoming(incoming, echo)),
        )
    });
    let meter = Meter::start();
    let mut socks = Vec::new();
    for _ in 0..CONNS {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.write_all(&support::client_preface(16 << 20)).unwrap();
        s.write_all(&frame_header(16 << 20)).unwrap();
        let mut theirs = [0u8; PREFACE_LEN];
        s.read_exact(&mut theirs).expect("server preface");
        socks.push(s);
    }
    // Every connection has been accepted and its header read.
    let deadline = Instant::now() + WAIT;
    while handle.stats().bytes_read < (CONNS * (PREFACE_LEN + 8)) as u64 {
        assert!(
            Instant::now() < deadline,
            "the server did not read the headers"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    let extra = meter.extra_heap();
    println!(
        "{CONNS} connections announcing 16 MiB each: extra peak heap {:.2} MiB",
        extra as f64 / MIB as f64
    );
    // A read buffer (64 KiB) and connection state each; far from 16 MiB each.
    assert!(
        extra <= CONNS * 256 * 1024,
        "extra peak heap {extra} bytes for {CONNS} connections"
    );
    // The server still serves.
    let client = rt.block_on(Client::connect(addr)).unwrap();
    let n: u64 = rt.block_on(client.invoke("Echo", &7u64)).unwrap();
    assert_eq!(n, 7);
    drop(socks);
    drop(client);
    rt.shutdown_background();
}

/// The bombs the other way (RELIABILITY.md promises both directions): a hostile server chooses
/// `algo` and streams `source` at a client whose frame limit is 1 MiB. Returns how long the
/// client took to drop the connection, its extra peak heap, and its extra peak RSS.
fn client_bombed(
    algo: Compression,
    make: impl FnOnce() -> Source,
) -> (Duration, usize, Option<usize>) {
    let rt = runtime();
    rt.block_on(async move {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut source = make();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut theirs = [0u8; PREFACE_LEN];
            stream.read_exact(&mut theirs).unwrap();
            assert_eq!(
                theirs[6] & wire_bit(algo),
                wire_bit(algo),
                "{algo} not offered"
            );
            let mut ours = support::server_preface(16 << 20);
            ours[6] = wire_bit(algo);
            stream.write_all(&ours).unwrap();
            let start = Instant::now();
            stream.set_write_timeout(Some(WAIT)).unwrap();
            while let Some(chunk) = source() {
                if stream.write_all(&chunk).is_err() || start.elapsed() > WAIT {
                    break;
                }
            }
        });
        let meter = Meter::start();
        let client = Client::builder()
            .compression(algo)
            .max_frame_len(MIB)
            .connect(addr)
            .await
            .unwrap();
        let start = Instant::now();
        while client.is_connected() || client.stats().protocol_errors == 0 {
            assert!(start.elapsed() < WAIT, "the client kept the connection");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let closed_in = start.elapsed();
        let (heap, rss) = (meter.extra_heap(), meter.extra_rss());
        drop(client);
        tokio::task::spawn_blocking(move || server.join().unwrap())
            .await
            .unwrap();
        (closed_in, heap, rss)
    })
}

#[test]
fn zstd_and_deflate_bombs_from_a_server_are_cut_off_by_the_client() {
    client_bombs_are_cut_off(&[Compression::Zstd, Compression::Deflate]);
}

#[cfg(feature = "compression-lz4")]
#[test]
fn lz4_bombs_from_a_server_are_cut_off_by_the_client() {
    client_bombs_are_cut_off(&[Compression::Lz4]);
}

fn client_bombs_are_cut_off(algos: &[Compression]) {
    let _serial = serial();
    for &algo in algos {
        for (what, prefix) in [
            ("zeros", Vec::new()),
            (
                "a 1 MiB frame header then zeros",
                frame_header(MIB as u32).to_vec(),
            ),
        ] {
            let (closed_in, heap, rss) = client_bombed(algo, || bomb(algo, &prefix));
            println!(
                "client, {algo} bomb of {what}: closed in {closed_in:?}, extra peak heap {heap}, \
                 RSS {rss:?}"
            );
            assert!(
                closed_in < Duration::from_secs(5),
                "{algo} {what}: {closed_in:?}"
            );
            let bound = MIB + 8 * MIB;
            assert!(heap <= bound, "{algo} {what}: extra peak heap {heap}");
            if let Some(rss) = rss {
                assert!(rss <= bound, "{algo} {what}: extra peak RSS {rss}");
            }
        }
    }
}
