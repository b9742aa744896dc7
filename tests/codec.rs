//! Codec tests: scripted reads with `tokio_test::io::Builder`, exact wire bytes from `PROTOCOL.md`,
//! limits from the header alone, a seeded round-trip property test, seeded garbage, and msgpack
//! (rmp-serde) regression tests for lying lengths and deep nesting.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio_test::io::Builder;
use tokio_util::codec::{Decoder, Encoder, FramedRead, FramedWrite};
use towerpc::codec::{
    CodecError, Frame, FrameCodec, Message, Preface, Role, DEFAULT_MAX_FRAME_LEN, FRAME_HEADER_LEN,
    PREFACE_LEN,
};

// ===== helpers =====

/// An 8-byte frame header, written by hand (big-endian), so tests do not trust the encoder.
fn header(len: u32, flags: u8, reserved: u8, count: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(FRAME_HEADER_LEN);
    h.extend_from_slice(&len.to_be_bytes());
    h.push(flags);
    h.push(reserved);
    h.extend_from_slice(&count.to_be_bytes());
    h
}

fn encode_msg(msg: Message) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::new().encode(msg, &mut buf).expect("encode");
    buf
}

fn decode_all(bytes: &[u8]) -> Vec<Frame> {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    for _ in 0..bytes.len() + 1 {
        match codec.decode(&mut buf).expect("decode") {
            Some(f) => out.push(f),
            None => break,
        }
    }
    assert!(buf.is_empty(), "{} bytes left undecoded", buf.len());
    out
}

fn ping(data: u64) -> Message {
    Message::Ping { data }
}

fn response(id: u32, body: Vec<u8>) -> Message {
    Message::Response {
        id,
        body: Bytes::from(body),
    }
}

/// The worked example of PROTOCOL.md §14.
const EXAMPLE_REQUEST_FRAME: [u8; 29] = [
    0x00, 0x00, 0x00, 0x15, // len = 21
    0x00, 0x00, // flags, reserved
    0x00, 0x01, // count = 1
    0x01, // REQUEST
    0x00, 0x00, 0x00, 0x01, // id = 1
    0x00, 0x00, 0x4E, 0x20, // timeout_ms = 20000
    0x04, // method_len
    0x00, 0x00, // meta_len
    0x00, 0x00, 0x00, 0x01, // body_len
    0x65, 0x63, 0x68, 0x6F, // "echo"
    0x07, // body
];

const EXAMPLE_RESPONSE_FRAME: [u8; 18] = [
    0x00, 0x00, 0x00, 0x0A, // len = 10
    0x00, 0x00, 0x00, 0x01, // flags, reserved, count = 1
    0x03, // RESPONSE
    0x00, 0x00, 0x00, 0x01, // id = 1
    0x00, 0x00, 0x00, 0x01, // body_len
    0x07, // body
];

fn example_request() -> Message {
    Message::Request {
        id: 1,
        timeout_ms: 20_000,
        method: Bytes::from_static(b"echo"),
        metadata: Bytes::new(),
        body: Bytes::from_static(&[0x07]),
    }
}

// ===== exact bytes (PROTOCOL.md §3, §4, §5, §14) =====

/// Encodes `msg` and compares with `expected`, then decodes `expected` back to `msg`.
fn assert_wire(msg: Message, expected: &[u8]) {
    let got = encode_msg(msg.clone());
    assert_eq!(&got[..], expected, "encoding of {msg:?}");
    let frames = decode_all(expected);
    assert_eq!(frames, vec![Frame::new(vec![msg])]);
}

#[test]
fn preface_bytes_match_the_spec() {
    let client: [u8; PREFACE_LEN] = [
        0x54, 0x52, 0x50, 0x43, 0x01, 0x43, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
    ];
    let server: [u8; PREFACE_LEN] = [
        0x54, 0x52, 0x50, 0x43, 0x01, 0x53, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
    ];
    let c = Preface::new(Role::Client, DEFAULT_MAX_FRAME_LEN);
    let s = Preface::new(Role::Server, DEFAULT_MAX_FRAME_LEN);
    assert_eq!(c.to_bytes(), client);
    assert_eq!(s.to_bytes(), server);
    assert_eq!(Preface::parse(&client).unwrap(), c);
    assert_eq!(Preface::parse(&server).unwrap(), s);

    // 4096 is the smallest legal limit; 4095 is refused.
    let min = [
        0x54, 0x52, 0x50, 0x43, 0x01, 0x43, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00,
    ];
    assert_eq!(Preface::parse(&min).unwrap().max_frame_len(), 4096);
    let too_small = [
        0x54, 0x52, 0x50, 0x43, 0x01, 0x43, 0x00, 0x00, 0x00, 0x00, 0x0F, 0xFF,
    ];
    assert!(Preface::parse(&too_small).is_err());
}

#[test]
fn request_bytes_match_the_worked_example() {
    assert_wire(example_request(), &EXAMPLE_REQUEST_FRAME);
}

#[test]
fn oneway_bytes_match_the_spec() {
    let msg = Message::OneWay {
        timeout_ms: 0x0102_0304,
        method: Bytes::from_static(b"log"),
        metadata: Bytes::from_static(&[0x80]),
        body: Bytes::from_static(&[0xC0]),
    };
    #[rustfmt::skip]
    let expected = [
        0x00, 0x00, 0x00, 0x15, 0x00, 0x00, 0x00, 0x01, // len 21, count 1
        0x02, // ONEWAY
        0x00, 0x00, 0x00, 0x00, // id = 0
        0x01, 0x02, 0x03, 0x04, // timeout_ms
        0x03, // method_len
        0x00, 0x01, // meta_len
        0x00, 0x00, 0x00, 0x01, // body_len
        b'l', b'o', b'g', // method
        0x80, // meta: empty msgpack map
        0xC0, // body: msgpack nil
    ];
    assert_wire(msg, &expected);
}

#[test]
fn response_bytes_match_the_worked_example() {
    assert_wire(response(1, vec![0x07]), &EXAMPLE_RESPONSE_FRAME);
}

#[test]
fn error_bytes_match_the_spec() {
    let msg = Message::Error {
        id: 0xDEAD_BEEF,
        code: 5,
        message: Bytes::from_static(b"no"),
        details: Bytes::from_static(&[0x90]),
    };
    #[rustfmt::skip]
    let expected = [
        0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x01, // len 16, count 1
        0x04, // ERROR
        0xDE, 0xAD, 0xBE, 0xEF, // id
        0x00, 0x05, // code NOT_FOUND
        0x00, 0x02, // msg_len
        0x00, 0x00, 0x00, 0x01, // details_len
        b'n', b'o', // msg
        0x90, // details: empty msgpack array
    ];
    assert_wire(msg, &expected);
}

#[test]
fn cancel_bytes_match_the_spec() {
    #[rustfmt::skip]
    let expected = [
        0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x01,
        0x05, 0x00, 0x00, 0x00, 0x03,
    ];
    assert_wire(Message::Cancel { id: 3 }, &expected);
}

#[test]
fn ping_and_pong_bytes_match_the_spec() {
    #[rustfmt::skip]
    let ping_bytes = [
        0x00, 0x00, 0x00, 0x09, 0x00, 0x00, 0x00, 0x01,
        0x06, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
    ];
    assert_wire(ping(0x0102_0304_0506_0708), &ping_bytes);
    #[rustfmt::skip]
    let pong_bytes = [
        0x00, 0x00, 0x00, 0x09, 0x00, 0x00, 0x00, 0x01,
        0x07, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE,
    ];
    assert_wire(Message::Pong { data: u64::MAX - 1 }, &pong_bytes);
}

#[test]
fn goaway_bytes_match_the_spec() {
    let msg = Message::GoAway {
        code: 11,
        reason: Bytes::from_static(b"bad"),
    };
    #[rustfmt::skip]
    let expected = [
        0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x01,
        0x08, // GOAWAY
        0x00, 0x0B, // code PROTOCOL_ERROR
        0x00, 0x03, // reason_len
        b'b', b'a', b'd',
    ];
    assert_wire(msg, &expected);
}

#[test]
fn batch_bytes_match_the_spec() {
    // One frame may mix kinds: a CANCEL and a PING behind one header (count 2, len 5 + 9).
    let frame = Frame::new(vec![Message::Cancel { id: 7 }, ping(9)]);
    #[rustfmt::skip]
    let expected = [
        0x00, 0x00, 0x00, 0x0E, 0x00, 0x00, 0x00, 0x02,
        0x05, 0x00, 0x00, 0x00, 0x07,
        0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x09,
    ];
    let mut buf = BytesMut::new();
    FrameCodec::new().encode(frame.clone(), &mut buf).unwrap();
    assert_eq!(&buf[..], &expected);
    assert_eq!(decode_all(&expected), vec![frame]);
}

// ===== scripted reads =====

#[tokio::test]
async fn frame_split_byte_by_byte_is_decoded() {
    let mut wire = EXAMPLE_REQUEST_FRAME.to_vec();
    wire.extend_from_slice(&EXAMPLE_RESPONSE_FRAME);
    let mut b = Builder::new();
    for byte in &wire {
        b.read(std::slice::from_ref(byte));
    }
    let mut framed = FramedRead::new(b.build(), FrameCodec::new());
    let f1 = framed.next().await.expect("frame 1").expect("ok 1");
    assert_eq!(f1.messages(), &[example_request()]);
    let f2 = framed.next().await.expect("frame 2").expect("ok 2");
    assert_eq!(f2.messages(), &[response(1, vec![7])]);
    assert!(framed.next().await.is_none(), "clean EOF between frames");
}

#[tokio::test]
async fn many_frames_in_one_read_are_all_decoded() {
    let mut wire = BytesMut::new();
    let mut codec = FrameCodec::new();
    for i in 0..100u64 {
        codec.encode(ping(i), &mut wire).unwrap();
    }
    let io = Builder::new().read(&wire).build();
    let mut framed = FramedRead::new(io, FrameCodec::new());
    for i in 0..100u64 {
        let f = framed.next().await.expect("frame").expect("ok");
        assert_eq!(f.messages(), &[ping(i)]);
    }
    assert!(framed.next().await.is_none());
}

#[tokio::test]
async fn header_and_body_in_separate_reads_with_a_pause() {
    let io = Builder::new()
        .read(&EXAMPLE_REQUEST_FRAME[..FRAME_HEADER_LEN])
        .wait(Duration::from_millis(10))
        .read(&EXAMPLE_REQUEST_FRAME[FRAME_HEADER_LEN..20])
        .read(&EXAMPLE_REQUEST_FRAME[20..])
        .build();
    let mut framed = FramedRead::new(io, FrameCodec::new());
    let f = framed.next().await.expect("frame").expect("ok");
    assert_eq!(f.messages(), &[example_request()]);
    assert!(framed.next().await.is_none());
}

/// Polls the decoder once over a stream that delivers only `head` and then stays open (pending,
/// not EOF). The verdict must come from the header alone.
fn oversize_verdict(codec: FrameCodec, head: &[u8]) -> (CodecError, usize) {
    let (io, handle) = Builder::new().read(head).build_with_handle();
    let mut framed = FramedRead::new(io, codec);
    let started = Instant::now();
    let res = {
        let mut next = tokio_test::task::spawn(framed.next());
        match next.poll() {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => {
                panic!("decoder waited for the body of an oversize frame")
            }
        }
    };
    let elapsed = started.elapsed();
    // docs/reliability.md (L4) asks for a prompt refusal, < 10 ms; the first poll being ready is the real proof, and the margin
    // keeps a loaded machine from failing it.
    assert!(elapsed < Duration::from_millis(50), "took {elapsed:?}");
    let cap = framed.read_buffer().capacity();
    drop(handle);
    let err = res.expect("an item").expect_err("oversize frame accepted");
    (err, cap)
}

#[test]
fn oversize_frame_is_rejected_from_the_header() {
    // max + 1 with a 4 KiB limit.
    let codec = FrameCodec::builder().max_frame_len(4096).new_codec();
    let (err, cap) = oversize_verdict(codec, &header(4097, 0, 0, 1));
    assert!(
        matches!(
            err,
            CodecError::FrameTooLarge {
                len: 4097,
                max: 4096
            }
        ),
        "{err:?}"
    );
    assert!(cap < 1 << 20, "reserved {cap} bytes for a refused frame");

    // max + 1 with the default 16 MiB limit.
    let (err, cap) = oversize_verdict(
        FrameCodec::new(),
        &header(DEFAULT_MAX_FRAME_LEN as u32 + 1, 0, 0, 1),
    );
    assert!(
        matches!(err, CodecError::FrameTooLarge { len, max }
            if len == DEFAULT_MAX_FRAME_LEN + 1 && max == DEFAULT_MAX_FRAME_LEN),
        "{err:?}"
    );
    assert!(cap < 1 << 20, "reserved {cap} bytes for a refused frame");

    // u32::MAX.
    let (err, cap) = oversize_verdict(FrameCodec::new(), &header(u32::MAX, 0, 0, 1));
    assert!(
        matches!(err, CodecError::FrameTooLarge { len, .. } if len == u32::MAX as usize),
        "{err:?}"
    );
    assert!(cap < 1 << 20, "reserved {cap} bytes for a refused frame");
}

#[tokio::test]
async fn frame_of_exactly_max_len_is_accepted() {
    let max = 4096usize;
    // A RESPONSE is 9 bytes plus its body: a body of max - 9 makes a frame body of exactly max.
    let mut wire = header(max as u32, 0, 0, 1);
    wire.push(0x03);
    wire.extend_from_slice(&42u32.to_be_bytes());
    wire.extend_from_slice(&((max - 9) as u32).to_be_bytes());
    wire.extend(std::iter::repeat_n(0xAB, max - 9));
    assert_eq!(wire.len(), FRAME_HEADER_LEN + max);

    // Delivered in two reads, so the decoder has to wait for the body too.
    let io = Builder::new().read(&wire[..100]).read(&wire[100..]).build();
    let codec = FrameCodec::builder().max_frame_len(max).new_codec();
    let mut framed = FramedRead::new(io, codec);
    let f = framed.next().await.expect("frame").expect("max accepted");
    assert_eq!(f.messages(), &[response(42, vec![0xAB; max - 9])]);
    assert!(framed.next().await.is_none());
}

#[tokio::test]
async fn truncated_frame_then_eof_is_an_error() {
    // Body cut short.
    let io = Builder::new().read(&EXAMPLE_REQUEST_FRAME[..20]).build();
    let mut framed = FramedRead::new(io, FrameCodec::new());
    let res = framed.next().await.expect("an item at EOF");
    assert!(res.is_err(), "truncated body decoded as {res:?}");

    // Header cut short.
    let io = Builder::new().read(&EXAMPLE_REQUEST_FRAME[..3]).build();
    let mut framed = FramedRead::new(io, FrameCodec::new());
    let res = framed.next().await.expect("an item at EOF");
    assert!(res.is_err(), "truncated header decoded as {res:?}");

    // A whole frame, then a partial one.
    let mut wire = EXAMPLE_RESPONSE_FRAME.to_vec();
    wire.extend_from_slice(&EXAMPLE_RESPONSE_FRAME[..12]);
    let io = Builder::new().read(&wire).build();
    let mut framed = FramedRead::new(io, FrameCodec::new());
    assert!(framed.next().await.expect("frame").is_ok());
    assert!(framed.next().await.expect("an item at EOF").is_err());
}

#[tokio::test]
async fn encoder_refuses_max_plus_one_and_writes_nothing() {
    let max = 4096usize;
    let too_big = response(1, vec![0; max - 9 + 1]);
    let fits = response(2, vec![0; max - 9]);
    let mut expected = header(max as u32, 0, 0, 1);
    expected.push(0x03);
    expected.extend_from_slice(&2u32.to_be_bytes());
    expected.extend_from_slice(&((max - 9) as u32).to_be_bytes());
    expected.extend(std::iter::repeat_n(0, max - 9));

    // Directly: the buffer is left exactly as it was.
    let mut codec = FrameCodec::builder().max_send_len(max).new_codec();
    let mut dst = BytesMut::from(&b"prior"[..]);
    let err = codec.encode(too_big.clone(), &mut dst).unwrap_err();
    assert!(
        matches!(err, CodecError::FrameTooLarge { len, max: m } if len == max + 1 && m == max),
        "{err:?}"
    );
    assert_eq!(&dst[..], b"prior");

    // Through a FramedWrite: the refused message writes nothing and the stream stays in sync,
    // so the next message goes out alone and intact (the mock panics on any other write).
    let io = Builder::new().write(&expected).build();
    let codec = FrameCodec::builder().max_send_len(max).new_codec();
    let mut framed = FramedWrite::new(io, codec);
    let err = framed.send(too_big).await.unwrap_err();
    assert!(matches!(err, CodecError::FrameTooLarge { .. }), "{err:?}");
    assert!(framed.write_buffer().is_empty());
    framed.send(fits).await.expect("max fits");
}

#[test]
fn encoder_refuses_invalid_frames_and_writes_nothing() {
    let mut codec = FrameCodec::new();
    let bad = [
        Frame::new(vec![]),
        Frame::new(vec![Message::Request {
            id: 0,
            timeout_ms: 0,
            method: Bytes::from_static(b"m"),
            metadata: Bytes::new(),
            body: Bytes::new(),
        }]),
        Frame::new(vec![Message::OneWay {
            timeout_ms: 0,
            method: Bytes::new(),
            metadata: Bytes::new(),
            body: Bytes::new(),
        }]),
        Frame::new(vec![Message::OneWay {
            timeout_ms: 0,
            method: Bytes::from(vec![b'm'; 256]),
            metadata: Bytes::new(),
            body: Bytes::new(),
        }]),
        Frame::new(vec![Message::OneWay {
            timeout_ms: 0,
            method: Bytes::from_static(b"m"),
            metadata: Bytes::from(vec![0; 16 * 1024 + 1]),
            body: Bytes::new(),
        }]),
        Frame::new(vec![Message::GoAway {
            code: 1,
            reason: Bytes::from_static(&[0xFF]),
        }]),
        Frame::new(vec![Message::Cancel { id: 1 }; 65_536]),
    ];
    for frame in bad {
        let mut dst = BytesMut::new();
        let n = frame.messages().len();
        assert!(codec.encode(frame, &mut dst).is_err(), "{n} messages");
        assert!(dst.is_empty());
    }
}

#[test]
fn frame_of_65535_messages_round_trips() {
    let frame = Frame::new(vec![Message::Cancel { id: 9 }; 65_535]);
    let mut buf = BytesMut::new();
    FrameCodec::new().encode(frame.clone(), &mut buf).unwrap();
    assert_eq!(&buf[..8], &header(65_535 * 5, 0, 0, 0xFFFF)[..]);
    assert_eq!(decode_all(&buf), vec![frame]);
}

#[test]
fn malformed_frames_are_refused() {
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("flags", [header(5, 1, 0, 1), vec![5, 0, 0, 0, 1]].concat()),
        ("reserved", [header(5, 0, 1, 1), vec![5, 0, 0, 0, 1]].concat()),
        ("count 0", [header(5, 0, 0, 0), vec![5, 0, 0, 0, 1]].concat()),
        ("len 0", header(0, 0, 0, 1)),
        ("unknown kind", [header(5, 0, 0, 1), vec![0x7F, 0, 0, 0, 1]].concat()),
        ("kind 0", [header(5, 0, 0, 1), vec![0x00, 0, 0, 0, 1]].concat()),
        ("overrun", [header(5, 0, 0, 1), vec![6, 0, 0, 0, 1]].concat()),
        ("left over", [header(7, 0, 0, 1), vec![5, 0, 0, 0, 1, 0, 0]].concat()),
        ("count too high", [header(9, 0, 0, 2), vec![5, 0, 0, 0, 1, 5, 0, 0, 0]].concat()),
        ("empty method", [header(16, 0, 0, 1), vec![1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]].concat()),
        ("method not utf-8", [header(17, 0, 0, 1), vec![1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xFF]].concat()),
        ("meta above 16 KiB", [header(16, 0, 0, 1), vec![1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0x40, 0x01, 0, 0, 0, 0]].concat()),
        ("request id 0", [header(17, 0, 0, 1), vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, b'm']].concat()),
        ("oneway id 1", [header(17, 0, 0, 1), vec![2, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, b'm']].concat()),
        ("error msg not utf-8", [header(14, 0, 0, 1), vec![4, 0, 0, 0, 1, 0, 2, 0, 1, 0, 0, 0, 0, 0xC3]].concat()),
        ("goaway reason not utf-8", [header(6, 0, 0, 1), vec![8, 0, 0, 0, 1, 0x80]].concat()),
        ("body_len past frame", [header(10, 0, 0, 1), vec![3, 0, 0, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF, 0]].concat()),
    ];
    for (why, bytes) in cases {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&bytes[..]);
        let res = codec.decode(&mut buf);
        assert!(
            matches!(res, Err(CodecError::InvalidFrame(_))),
            "{why}: {res:?}"
        );
    }
}

// ===== round trip of every kind =====

fn one_of_each() -> Vec<Message> {
    vec![
        example_request(),
        Message::OneWay {
            timeout_ms: 0,
            method: Bytes::from_static("méthode".as_bytes()),
            metadata: Bytes::from_static(&[0x81, 0xA1, b'k', 0x01]),
            body: Bytes::from_static(b"payload"),
        },
        response(u32::MAX, vec![]),
        Message::Error {
            id: 1,
            code: 10,
            message: Bytes::from_static("échec ✗".as_bytes()),
            details: Bytes::new(),
        },
        Message::Cancel { id: 17 },
        ping(0),
        Message::Pong { data: u64::MAX },
        Message::GoAway {
            code: 0,
            reason: Bytes::new(),
        },
    ]
}

#[tokio::test]
async fn every_message_kind_round_trips_through_framed() {
    let msgs = one_of_each();
    let (client, server) = tokio::io::duplex(64);
    let mut writer = FramedWrite::new(client, FrameCodec::new());
    let mut reader = FramedRead::new(server, FrameCodec::new());
    let expected = msgs.clone();
    let send = tokio::spawn(async move {
        for m in msgs.clone() {
            writer.send(m).await.unwrap();
        }
        // And all of them again, batched in one frame.
        writer.send(Frame::new(msgs)).await.unwrap();
    });
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        let mut got = Vec::new();
        while let Some(f) = reader.next().await {
            got.push(f.unwrap());
        }
        got
    })
    .await
    .expect("round trip timed out");
    send.await.unwrap();
    let mut want: Vec<Frame> = expected
        .iter()
        .map(|m| Frame::new(vec![m.clone()]))
        .collect();
    want.push(Frame::new(expected));
    assert_eq!(got, want);
}

#[tokio::test]
async fn new_framed_round_trips() {
    let (a, b) = tokio::io::duplex(1024);
    let mut a = FrameCodec::builder().new_framed(a);
    let mut b = FrameCodec::builder().new_framed(b);
    a.send(example_request()).await.unwrap();
    let f = tokio::time::timeout(Duration::from_secs(5), b.next())
        .await
        .expect("timed out")
        .expect("frame")
        .unwrap();
    assert_eq!(f.messages(), &[example_request()]);
}

// ===== seeded property test =====

fn gen_bytes(rng: &mut fastrand::Rng, max: usize) -> Bytes {
    let mut v = vec![0u8; rng.usize(0..=max)];
    rng.fill(&mut v);
    Bytes::from(v)
}

/// Random UTF-8 of at most `max` bytes, mixing 1- to 4-byte characters.
fn gen_utf8(rng: &mut fastrand::Rng, max: usize) -> Bytes {
    let target = rng.usize(0..=max);
    let mut s = String::new();
    for _ in 0..max {
        let c = match rng.u8(0..4) {
            0 => rng.char('\u{0}'..='\u{7F}'),
            1 => rng.char('\u{80}'..='\u{7FF}'),
            2 => rng.char('\u{800}'..='\u{FFFF}'),
            _ => rng.char('\u{10000}'..='\u{10FFFF}'),
        };
        if s.len() + c.len_utf8() > target {
            break;
        }
        s.push(c);
    }
    Bytes::from(s)
}

fn gen_method(rng: &mut fastrand::Rng) -> Bytes {
    if rng.u8(0..10) == 0 {
        return Bytes::from(vec![b'm'; 255]);
    }
    let m = gen_utf8(rng, 255);
    if m.is_empty() {
        Bytes::from_static(b"m")
    } else {
        m
    }
}

fn gen_u32(rng: &mut fastrand::Rng) -> u32 {
    match rng.u8(0..8) {
        0 => 0,
        1 => 1,
        2 => u32::MAX,
        _ => rng.u32(..),
    }
}

fn gen_message(rng: &mut fastrand::Rng) -> Message {
    match rng.u8(0..8) {
        0 => Message::Request {
            id: gen_u32(rng).max(1),
            timeout_ms: gen_u32(rng),
            method: gen_method(rng),
            metadata: if rng.u8(0..20) == 0 {
                Bytes::from(vec![0x80; 16 * 1024])
            } else {
                gen_bytes(rng, 64)
            },
            body: gen_bytes(rng, 512),
        },
        1 => Message::OneWay {
            timeout_ms: gen_u32(rng),
            method: gen_method(rng),
            metadata: gen_bytes(rng, 64),
            body: gen_bytes(rng, 512),
        },
        2 => Message::Response {
            id: gen_u32(rng),
            body: gen_bytes(rng, 512),
        },
        3 => Message::Error {
            id: gen_u32(rng),
            code: rng.u16(..),
            message: gen_utf8(rng, 128),
            details: gen_bytes(rng, 64),
        },
        4 => Message::Cancel { id: gen_u32(rng) },
        5 => ping(rng.u64(..)),
        6 => Message::Pong { data: rng.u64(..) },
        _ => Message::GoAway {
            code: rng.u16(..),
            reason: gen_utf8(rng, 128),
        },
    }
}

#[tokio::test]
async fn random_frames_round_trip() {
    const SEED: u64 = 0x7077_6572_7063;
    let mut rng = fastrand::Rng::with_seed(SEED);
    for case in 0..1_000 {
        let frames: Vec<Frame> = (0..rng.usize(1..=4))
            .map(|_| {
                Frame::new(
                    (0..rng.usize(1..=6))
                        .map(|_| gen_message(&mut rng))
                        .collect(),
                )
            })
            .collect();
        let mut wire = BytesMut::new();
        let mut codec = FrameCodec::new();
        for f in &frames {
            let before = wire.len();
            codec.encode(f.clone(), &mut wire).expect("encode");
            let len = u32::from_be_bytes(wire[before..before + 4].try_into().unwrap()) as usize;
            let want: usize = f.messages().iter().map(Message::encoded_len).sum();
            assert_eq!(len, want, "case {case}: header len");
            assert_eq!(wire.len() - before, FRAME_HEADER_LEN + len, "case {case}");
        }

        // Fed through FramedRead in random chunks (often 1 byte, sometimes all at once).
        let mut b = Builder::new();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            let n = match rng.u8(0..4) {
                0 => 1,
                1 => rest.len(),
                _ => rng.usize(1..=rest.len().min(64)),
            };
            b.read(&rest[..n]);
            rest = &rest[n..];
        }
        let mut framed = FramedRead::new(b.build(), FrameCodec::new());
        let mut got = Vec::new();
        for _ in 0..=frames.len() {
            match framed.next().await {
                Some(f) => got.push(f.unwrap_or_else(|e| panic!("case {case}: {e}"))),
                None => break,
            }
        }
        assert_eq!(got, frames, "case {case} (seed {SEED:#x})");
    }
}

// ===== seeded garbage =====

#[test]
fn random_garbage_never_panics() {
    const SEED: u64 = 0x6761_7262_6167;
    let mut rng = fastrand::Rng::with_seed(SEED);
    let mut frames = 0usize;
    for case in 0..10_000 {
        let len = rng.usize(0..=256);
        let mut buf = vec![0u8; len];
        rng.fill(&mut buf);
        // Half the cases get a plausible header (len = the rest, flags 0, a small count) and a
        // known kind first, so the message parsers see garbage too, not just the header checks.
        if len > FRAME_HEADER_LEN && rng.bool() {
            let body = (len - FRAME_HEADER_LEN) as u32;
            let body = if rng.bool() { body } else { rng.u32(1..=body) };
            buf[..4].copy_from_slice(&body.to_be_bytes());
            buf[4] = 0;
            buf[5] = 0;
            buf[6..8].copy_from_slice(&rng.u16(1..=4).to_be_bytes());
            buf[8] = rng.u8(0..=9);
        }
        let input = buf.clone();
        let outcome = std::panic::catch_unwind(move || {
            let mut codec = FrameCodec::builder().max_frame_len(4096).new_codec();
            let mut src = BytesMut::from(&buf[..]);
            let mut n = 0usize;
            // Every decoded frame consumes at least 13 bytes, so this ends well before 300.
            for _ in 0..300 {
                match codec.decode(&mut src) {
                    Ok(Some(_)) => n += 1,
                    Ok(None) | Err(_) => return n,
                }
            }
            panic!("decoder looped without consuming input");
        });
        match outcome {
            Ok(n) => frames += n,
            Err(_) => panic!("case {case} (seed {SEED:#x}) panicked on {input:02x?}"),
        }
    }
    // Sanity: the biased half does reach the message parsers and sometimes decodes.
    assert!(frames > 0);
}

// ===== msgpack (rmp-serde) regressions: docs/reliability.md, "msgpack regressions" =====

/// Peak virtual memory of this process in KiB (Linux).
fn vm_peak_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmPeak:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Decodes `bytes` as `T`, asserting an error that comes fast and without reserving anything
/// near the declared size.
fn assert_refused<T: serde::de::DeserializeOwned + std::fmt::Debug>(what: &str, bytes: &[u8]) {
    let peak = vm_peak_kib();
    let started = Instant::now();
    let res = rmp_serde::from_slice::<T>(bytes);
    let elapsed = started.elapsed();
    assert!(res.is_err(), "{what}: decoded as {res:?}");
    // Measured at < 40 µs in release; the margin covers debug builds and a busy machine, while
    // touching gigabytes would take seconds.
    assert!(
        elapsed < Duration::from_millis(50),
        "{what}: took {elapsed:?}"
    );
    if let (Some(before), Some(after)) = (peak, vm_peak_kib()) {
        let grew = after.saturating_sub(before);
        assert!(
            grew < 256 * 1024,
            "{what}: peak virtual memory grew {grew} KiB"
        );
    }
}

#[test]
fn msgpack_str32_lying_length_is_refused() {
    // str32 declaring 0xd5fbd5c3 (about 3.5 GB) with one byte behind it.
    let bytes = [0xDB, 0xD5, 0xFB, 0xD5, 0xC3];
    assert_refused::<String>("str32 as String", &bytes);
    assert_refused::<Vec<u8>>("str32 as Vec<u8>", &bytes);
    assert_refused::<serde_bytes::ByteBuf>("str32 as ByteBuf", &bytes);
    assert_refused::<serde::de::IgnoredAny>("str32 as IgnoredAny", &bytes);
}

#[test]
fn msgpack_array32_lying_length_is_refused() {
    let bytes = [0xDD, 0xFF, 0xFF, 0xFF, 0xFF];
    assert_refused::<Vec<u64>>("array32 as Vec<u64>", &bytes);
    assert_refused::<Vec<u8>>("array32 as Vec<u8>", &bytes);
    assert_refused::<Vec<String>>("array32 as Vec<String>", &bytes);
    assert_refused::<serde::de::IgnoredAny>("array32 as IgnoredAny", &bytes);
    // With a few real elements behind the lie.
    let mut more = bytes.to_vec();
    more.extend_from_slice(&[0x01; 64]);
    assert_refused::<Vec<u64>>("array32 with 64 elements", &more);
}

#[test]
fn msgpack_bin32_lying_length_is_refused() {
    let bytes = [0xC6, 0xFF, 0xFF, 0xFF, 0xFF, 0x00];
    assert_refused::<serde_bytes::ByteBuf>("bin32 as ByteBuf", &bytes);
    assert_refused::<Vec<u8>>("bin32 as Vec<u8>", &bytes);
    assert_refused::<String>("bin32 as String", &bytes);
    assert_refused::<serde::de::IgnoredAny>("bin32 as IgnoredAny", &bytes);
}

#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct Nested(Vec<Nested>);

/// Runs `f` on a thread with a `stack`-byte stack: without a working depth limit, deep input
/// overflows it and aborts the process.
fn on_stack<T: Send + 'static>(stack: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .name("decoder".into())
        .stack_size(stack)
        .spawn(f)
        .expect("spawn")
        .join()
        .expect("decoder thread panicked")
}

/// Decodes 200,000 nested one-element arrays (`0x91` each) as `T` on a `stack`-byte stack and
/// asserts rmp-serde's depth limit stops it.
fn assert_depth_limited<T>(what: &'static str, stack: usize)
where
    T: serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let (res, elapsed) = on_stack(stack, move || {
        let bytes = vec![0x91u8; 200_000];
        let started = Instant::now();
        let res = rmp_serde::from_slice::<T>(&bytes).map(|_| ());
        (res, started.elapsed())
    });
    let err = res.expect_err(what);
    assert!(
        matches!(err, rmp_serde::decode::Error::DepthLimitExceeded),
        "{what}: {err}"
    );
    assert!(elapsed < Duration::from_secs(1), "{what}: took {elapsed:?}");
}

const SMALL_STACK: usize = 256 * 1024;

/// The depth limit exists at all: with 200,000 levels and no limit even 16 MiB would overflow.
#[test]
fn msgpack_deep_nesting_hits_the_depth_limit() {
    assert_depth_limited::<serde::de::IgnoredAny>("IgnoredAny", 16 << 20);
    assert_depth_limited::<Nested>("Nested", 16 << 20);
}

/// docs/reliability.md: the depth case must run on a 256 KiB stack. rmp-serde's default limit (1,024
/// levels) does not fit there in debug builds, so towerpc's decoder (what `Client::call` uses)
/// sets its own, lower limit.
#[test]
fn towerpc_decoder_rejects_deep_nesting_on_a_256_kib_stack() {
    fn check<T>(what: &'static str)
    where
        T: serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let (res, elapsed) = on_stack(SMALL_STACK, move || {
            let bytes = vec![0x91u8; 200_000];
            let started = Instant::now();
            let res = towerpc::payload::from_msgpack::<T>(&bytes).map(|_| ());
            (res, started.elapsed())
        });
        let err = res.expect_err(what);
        assert!(err.is_decode(), "{what}: {err}");
        assert!(
            format!("{err:#}").contains("depth"),
            "{what}: not the depth limit: {err}"
        );
        assert!(elapsed < Duration::from_secs(1), "{what}: took {elapsed:?}");
    }
    check::<serde::de::IgnoredAny>("IgnoredAny");
    check::<Nested>("Nested");
}

#[test]
fn towerpc_decoder_accepts_ordinary_nesting() {
    // Half the limit: a newtype around a Vec may count as two levels.
    let depth = towerpc::payload::MAX_DECODE_DEPTH / 2;
    let mut ok = vec![0x91u8; depth - 1];
    ok.push(0x90);
    on_stack(SMALL_STACK, move || {
        towerpc::payload::from_msgpack::<Nested>(&ok).expect("nesting within the limit decodes");
    });
}

#[test]
fn msgpack_reasonable_nesting_still_decodes() {
    // The limit must not reject ordinary data: 100 levels decode fine.
    let mut bytes = vec![0x91u8; 100];
    bytes.push(0x90);
    assert!(rmp_serde::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok());
    let mut buf = BytesMut::new();
    buf.put_u8(0x92);
    buf.put_u8(0x01);
    buf.put_u8(0x02);
    assert_eq!(rmp_serde::from_slice::<Vec<u64>>(&buf).unwrap(), vec![1, 2]);
}

// ===== fragments (PROTOCOL.md §4.1, §5.7) =====

/// A FRAGMENT message, by hand: kind 09, more, len u32, data.
fn fragment(more: u8, data: &[u8]) -> Vec<u8> {
    let mut m = vec![0x09, more];
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// A frame around `msgs`, by hand.
fn frame_of(msgs: &[Vec<u8>]) -> Vec<u8> {
    let len: usize = msgs.iter().map(Vec::len).sum();
    let mut f = header(len as u32, 0, 0, msgs.len() as u16);
    for m in msgs {
        f.extend_from_slice(m);
    }
    f
}

/// The bytes of a RESPONSE for `id` with `body`, by hand.
fn response_bytes(id: u32, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0x03];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

#[test]
fn fragment_example_matches_the_spec() {
    // §5.7: a RESPONSE for id 9 with a 100,000-byte body, as pieces of 65,536 and 34,473.
    let body: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    let whole = response_bytes(9, &body);
    assert_eq!(whole.len(), 100_009);
    let (a, b) = whole.split_at(65_536);
    let first = fragment(1, a);
    assert_eq!(
        &first[..15],
        &[
            0x09, 0x01, 0x00, 0x01, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x09, 0x00, 0x01, 0x86,
            0xA0
        ]
    );
    let second = fragment(0, b);
    assert_eq!(&second[..6], &[0x09, 0x00, 0x00, 0x00, 0x86, 0xA9]);
    let bytes = [frame_of(&[first]), frame_of(&[second])].concat();
    let frames = decode_all(&bytes);
    assert_eq!(
        frames.len(),
        2,
        "a frame of only a non-final piece is a frame with no messages"
    );
    assert!(frames[0].messages().is_empty());
    assert_eq!(frames[1].messages(), &[response(9, body)]);
}

#[test]
fn messages_between_fragments_come_first_and_the_message_takes_the_last_piece_s_place() {
    let body = vec![0xAB; 5000];
    let whole = response_bytes(1, &body);
    let (a, rest) = whole.split_at(3000);
    let (b, c) = rest.split_at(1000);
    let ping7 = vec![0x06, 0, 0, 0, 0, 0, 0, 0, 7];
    let ping8 = vec![0x06, 0, 0, 0, 0, 0, 0, 0, 8];
    let bytes = [
        frame_of(&[fragment(1, a), ping7]),
        frame_of(&[fragment(1, b)]),
        frame_of(&[ping8, fragment(0, c), vec![0x05, 0, 0, 0, 2]]),
    ]
    .concat();
    let got: Vec<Message> = decode_all(&bytes)
        .into_iter()
        .flat_map(Frame::into_messages)
        .collect();
    assert_eq!(
        got,
        vec![
            ping(7),
            ping(8),
            response(1, body),
            Message::Cancel { id: 2 }
        ]
    );
}

#[test]
fn a_message_in_a_single_fragment_is_decoded() {
    let whole = response_bytes(3, b"hi");
    let frames = decode_all(&frame_of(&[fragment(0, &whole)]));
    assert_eq!(frames[0].messages(), &[response(3, b"hi".to_vec())]);
}

#[test]
fn fragments_arriving_a_byte_at_a_time_are_reassembled() {
    let body = vec![1u8; 300];
    let whole = response_bytes(4, &body);
    let bytes = [
        frame_of(&[fragment(1, &whole[..100])]),
        frame_of(&[fragment(1, &whole[100..200])]),
        frame_of(&[fragment(0, &whole[200..])]),
    ]
    .concat();
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in bytes {
        buf.put_u8(b);
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            got.extend(f.into_messages());
        }
    }
    assert_eq!(got, vec![response(4, body)]);
}

#[test]
fn malformed_fragments_are_refused() {
    let whole = response_bytes(1, &[7u8; 100]);
    let cancel = vec![0x05, 0, 0, 0, 1];
    let ping = vec![0x06, 0, 0, 0, 0, 0, 0, 0, 1];
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("more is 2", frame_of(&[fragment(2, &whole)])),
        ("empty fragment", frame_of(&[fragment(1, &[])])),
        ("empty last fragment", [frame_of(&[fragment(1, &whole[..50])]), frame_of(&[fragment(0, &[])])].concat()),
        ("first piece short of the fixed part", frame_of(&[fragment(1, &whole[..8])])),
        ("a cancel in fragments", frame_of(&[fragment(0, &cancel)])),
        ("a ping in fragments", frame_of(&[fragment(1, &ping[..5]), fragment(0, &ping[5..])])),
        ("a fragment in fragments", frame_of(&[fragment(0, &fragment(0, &whole))])),
        ("first piece past the end", frame_of(&[fragment(1, &[&whole[..], &[0]].concat())])),
        ("later piece past the end", frame_of(&[fragment(1, &whole[..50]), fragment(0, &whole[50..].repeat(2))])),
        ("more on the completing piece", frame_of(&[fragment(1, &whole[..50]), fragment(1, &whole[50..])])),
        ("more on a whole single piece", frame_of(&[fragment(1, &whole)])),
        ("last piece leaves it short", frame_of(&[fragment(1, &whole[..50]), fragment(0, &whole[50..60])])),
        ("single piece short", frame_of(&[fragment(0, &whole[..50])])),
        ("fragment header past the frame", [header(5, 0, 0, 1), vec![0x09, 1, 0, 0, 0]].concat()),
        ("fragment data past the frame", [header(8, 0, 0, 1), vec![0x09, 1, 0, 0, 0, 9, 3, 0]].concat()),
        ("reassembled message is bad", frame_of(&[fragment(1, &[4, 0, 0, 0, 1, 0, 2, 0, 1, 0, 0, 0, 0]), fragment(0, &[0xC3])])),
    ];
    for (why, bytes) in cases {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&bytes[..]);
        let res = loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        assert!(
            matches!(res, Err(CodecError::InvalidFrame(_))),
            "{why}: {res:?}"
        );
    }
}

#[test]
fn a_fragmented_message_over_the_limit_is_refused_from_its_first_piece() {
    // The first piece announces a body that makes the message one byte over 4096.
    let mut codec = FrameCodec::builder().max_frame_len(4096).new_codec();
    let mut first = vec![0x03, 0, 0, 0, 1];
    first.extend_from_slice(&(4096u32 - 9 + 1).to_be_bytes());
    first.extend_from_slice(&[0u8; 100]);
    let mut buf = BytesMut::from(&frame_of(&[fragment(1, &first)])[..]);
    let res = codec.decode(&mut buf);
    assert!(
        matches!(
            res,
            Err(CodecError::FrameTooLarge {
                len: 4097,
                max: 4096
            })
        ),
        "{res:?}"
    );
    // One byte less is fine, whole or in pieces.
    let whole = response_bytes(1, &vec![5u8; 4096 - 9]);
    let bytes = [
        frame_of(&[fragment(1, &whole[..2000])]),
        frame_of(&[fragment(0, &whole[2000..])]),
    ]
    .concat();
    let mut codec = FrameCodec::builder().max_frame_len(4096).new_codec();
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(codec
        .decode(&mut buf)
        .unwrap()
        .unwrap()
        .messages()
        .is_empty());
    let f = codec.decode(&mut buf).unwrap().unwrap();
    assert_eq!(f.messages(), &[response(1, vec![5u8; 4096 - 9])]);
}

#[test]
fn ack_bytes_match_the_spec() {
    // §5.8: kind 0A, bytes u32.
    let bytes = encode_msg(Message::Ack { bytes: 0x0004_0000 });
    assert_eq!(&bytes[..], &[0, 0, 0, 5, 0, 0, 0, 1, 0x0A, 0, 4, 0, 0]);
    let frames = decode_all(&bytes);
    assert_eq!(frames[0].messages(), &[Message::Ack { bytes: 0x0004_0000 }]);
    let mut codec = FrameCodec::new();
    let mut zero = BytesMut::from(&frame_of(&[vec![0x0A, 0, 0, 0, 0]])[..]);
    assert!(matches!(
        codec.decode(&mut zero),
        Err(CodecError::InvalidFrame(_))
    ));
    let mut out = BytesMut::new();
    assert!(FrameCodec::new()
        .encode(Message::Ack { bytes: 0 }, &mut out)
        .is_err());
}
