//! `FrameCodec` encode and decode throughput: one frame holding a batch of 1,000 REQUEST
//! messages, at payload sizes of 16 B, 1 KiB and 64 KiB.
//!
//! ```text
//! cargo bench --bench codec [-- --quick]
//! ```
//!
//! Throughput is the encoded frame's size in bytes. Building the batch (encode) and copying the
//! encoded bytes into a fresh buffer (decode) happen outside the timed routine; the encoder
//! writes into one reused buffer, as a connection's writer does.
//!
//! Inputs are made one per iteration (`BatchSize::PerIteration`): an iteration takes tens of
//! microseconds or more, so the per-iteration timer costs nothing visible, whereas batching
//! inputs keeps hundreds of ~100 KiB message vectors alive at once and made the 16 B decode
//! look 2-3× slower than the 1 KiB one through page faults on fresh heap memory.

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_main, BatchSize, Criterion, Throughput};
use tokio_util::codec::{Decoder, Encoder};
use towerpc::codec::{Frame, FrameCodec, Message};

const BATCH: u32 = 1_000;

const SIZES: [(usize, &str); 3] = [(16, "16B"), (1024, "1KiB"), (64 * 1024, "64KiB")];

fn codec() -> FrameCodec {
    // 1,000 × 64 KiB is ~64 MiB, above the 16 MiB default frame limit.
    FrameCodec::builder()
        .max_frame_len(256 << 20)
        .max_send_len(256 << 20)
        .new_codec()
}

fn requests(payload: usize) -> Vec<Message> {
    let body = Bytes::from(vec![0xa5u8; payload]);
    (1..=BATCH)
        .map(|id| Message::Request {
            id,
            timeout_ms: 0,
            method: Bytes::from_static(b"echo"),
            metadata: Bytes::new(),
            body: body.clone(),
        })
        .collect()
}

fn bench_codec(c: &mut Criterion) {
    for (payload, name) in SIZES {
        let messages = requests(payload);
        let mut encoded = BytesMut::new();
        codec()
            .encode(Frame::new(messages.clone()), &mut encoded)
            .expect("encode");
        let decoded = codec()
            .decode(&mut encoded.clone())
            .expect("decode")
            .expect("a whole frame");
        assert_eq!(decoded.messages(), &messages[..]);

        let mut group = c.benchmark_group(format!("codec_1000_requests_{name}"));
        group.throughput(Throughput::Bytes(encoded.len() as u64));
        if payload >= 64 * 1024 {
            // Each iteration moves ~64 MiB: fewer, longer samples keep the run short.
            group.sample_size(10);
            group.measurement_time(Duration::from_secs(8));
        }

        let mut enc = codec();
        let mut dst = BytesMut::with_capacity(encoded.len());
        group.bench_function("encode", |b| {
            b.iter_batched(
                || Frame::new(messages.clone()),
                |frame| {
                    dst.clear();
                    enc.encode(frame, &mut dst).expect("encode");
                    black_box(dst.len())
                },
                BatchSize::PerIteration,
            )
        });

        let mut dec = codec();
        group.bench_function("decode", |b| {
            b.iter_batched(
                || BytesMut::from(&encoded[..]),
                |mut src| black_box(dec.decode(&mut src).expect("decode")),
                BatchSize::PerIteration,
            )
        });
        group.finish();
    }
}

// `criterion_group!` defines an undocumented `pub fn benches`; a private module keeps it out of
// the crate-level `missing_docs` lint without allowing it everywhere.
mod group {
    criterion::criterion_group!(benches, super::bench_codec);
}
use group::benches;

criterion_main!(benches);
