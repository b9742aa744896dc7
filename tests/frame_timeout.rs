//! A started frame must finish within the frame read timeout (issue 10, item 4, in part): a
//! peer that announces a frame and then sends its body a byte at a time is cut off, while one
//! that is idle between frames is not.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;
use towerpc::codec::{Message, DEFAULT_MAX_FRAME_LEN, PREFACE_LEN};
use towerpc::Server;

/// A server with a frame read timeout of `timeout` over an in-memory stream; returns the
/// client's end, past the preface exchange.
async fn serve(timeout: Duration) -> DuplexStream {
    serve_with(
        Server::builder().frame_read_timeout(timeout),
        support::echo(),
    )
    .await
}

/// `server` serving `svc` over an in-memory stream; returns the client's end, past the
/// preface exchange.
async fn serve_with(server: Server, svc: support::Svc) -> DuplexStream {
    let (mut client, server_end) = tokio::io::duplex(64 * 1024);
    let incoming = futures_util::stream::iter([Ok::<_, std::io::Error>(server_end)])
        .chain(futures_util::stream::pending());
    tokio::spawn(server.serve_with_incoming(incoming, svc));
    client
        .write_all(&support::client_preface(DEFAULT_MAX_FRAME_LEN as u32))
        .await
        .unwrap();
    let mut preface = [0u8; PREFACE_LEN];
    client.read_exact(&mut preface).await.unwrap();
    client
}

/// Reads until the server hangs up; returns when it did.
async fn until_closed(client: &mut (impl tokio::io::AsyncRead + Unpin)) -> Instant {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(120), client.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Instant::now(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the server never closed the connection"),
        }
    }
}

/// Reads the server's messages until `enough` says so; panics if the server hangs up, or sends
/// nothing for `quiet`.
async fn read_until(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
    quiet: Duration,
    mut enough: impl FnMut(&[Message]) -> bool,
) -> Vec<Message> {
    use tokio_util::codec::Decoder;
    let mut codec = towerpc::codec::FrameCodec::new();
    let mut buf = bytes::BytesMut::new();
    let mut got = Vec::new();
    while !enough(&got) {
        if let Some(frame) = codec.decode(&mut buf).unwrap() {
            got.extend(frame.into_messages());
            continue;
        }
        let n = tokio::time::timeout(quiet, reader.read_buf(&mut buf))
            .await
            .expect("nothing more from the server")
            .unwrap();
        assert!(n > 0, "the server hung up; got {got:?}");
    }
    got
}

/// Writes `first`, then `next(0)`, `next(1)` … a second apart until it returns `None`, and
/// asserts that the server (with a 5 s frame read timeout) hangs up 5 to 7 s after `first`.
async fn assert_drip_is_cut_off(
    mut client: DuplexStream,
    first: &[u8],
    mut next: impl FnMut(usize) -> Option<Vec<u8>>,
) {
    client.write_all(first).await.unwrap();
    let started = Instant::now();
    let (mut reader, mut writer) = tokio::io::split(client);
    let drip = async move {
        let mut i = 0;
        while let Some(bytes) = next(i) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if writer.write_all(&bytes).await.is_err() {
                return;
            }
            i += 1;
        }
    };
    let (_, closed) = tokio::join!(drip, until_closed(&mut reader));
    let took = closed - started;
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(7),
        "closed after {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_frame_dripped_a_byte_a_second_is_cut_off() {
    let client = serve(Duration::from_secs(5)).await;
    // A header announcing 100 bytes, then one byte a second.
    let mut header = [0u8; 8];
    header[..4].copy_from_slice(&100u32.to_be_bytes());
    header[6..8].copy_from_slice(&1u16.to_be_bytes());
    assert_drip_is_cut_off(client, &header, |i| (i < 100).then(|| vec![0])).await;
}

#[tokio::test(start_paused = true)]
async fn idle_between_frames_is_not_cut_off() {
    let mut client = serve(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    // Still open: a PING is answered.
    let frame = {
        use tokio_util::codec::Encoder;
        let mut out = bytes::BytesMut::new();
        towerpc::codec::FrameCodec::new()
            .encode(towerpc::codec::Message::Ping { data: 9 }, &mut out)
            .unwrap();
        out
    };
    client.write_all(&frame).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(1), client.read(&mut buf))
        .await
        .expect("no pong")
        .unwrap();
    assert!(n > 0);
}

/// A REQUEST (PROTOCOL.md §5.1) for `echo` with `body`, no timeout and no metadata.
fn echo_request(id: u32, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0x01];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0]);
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend_from_slice(b"echo");
    m.extend_from_slice(body);
    m
}

#[tokio::test(start_paused = true)]
async fn a_message_dripped_a_fragment_a_second_is_cut_off() {
    // Each piece comes in a whole frame, so only the rule for a message in fragments
    // (PROTOCOL.md §4.1: all pieces within the frame read timeout of the first) can stop this
    // drip.
    let client = serve(Duration::from_secs(5)).await;
    let whole = echo_request(1, &[7u8; 100]);
    // The first piece holds the fixed part (16 bytes, as §4.1 asks), then a byte a second.
    let n = whole.len();
    // Each frame also carries a PING, so frames (not only pieces) keep arriving.
    let piece = move |from: usize, to: usize| {
        let more = u8::from(to < n);
        let mut f = Vec::new();
        f.extend_from_slice(&((9 + 6 + to - from) as u32).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 2, 0x06, 0, 0, 0, 0, 0, 0, 0, 1, 0x09, more]);
        f.extend_from_slice(&((to - from) as u32).to_be_bytes());
        f.extend_from_slice(&whole[from..to]);
        f
    };
    assert_drip_is_cut_off(client, &piece(0, 16), move |i| {
        let at = 16 + i;
        (at < n).then(|| piece(at, at + 1))
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_frame_after_a_message_in_fragments_has_a_clock_of_its_own() {
    // A request in two pieces 4 s apart (within the 5 s bound), then a PING frame whose first
    // bytes come 0.5 s later and the rest 2 s after those: 6.5 s after the message's first
    // piece, 2 s after the frame's own first byte. The frame is not cut off.
    let client = serve(Duration::from_secs(5)).await;
    let whole = echo_request(1, b"abc");
    let piece = |data: &[u8], more: bool| {
        let mut f = Vec::new();
        f.extend_from_slice(&((6 + data.len()) as u32).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 1, 0x09, u8::from(more)]);
        f.extend_from_slice(&(data.len() as u32).to_be_bytes());
        f.extend_from_slice(data);
        f
    };
    let ping = [0, 0, 0, 9, 0, 0, 0, 1, 0x06, 0, 0, 0, 0, 0, 0, 0, 5];
    let (mut reader, mut writer) = tokio::io::split(client);
    writer.write_all(&piece(&whole[..16], true)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    writer.write_all(&piece(&whole[16..], false)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    writer.write_all(&ping[..4]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    writer.write_all(&ping[4..]).await.unwrap();
    // The reply to the request, then the PONG: the connection is still open.
    let got = read_until(&mut reader, Duration::from_secs(1), |got| got.len() == 2).await;
    assert_eq!(
        got,
        [
            Message::Response {
                id: 1,
                body: bytes::Bytes::from_static(b"abc")
            },
            Message::Pong { data: 5 }
        ]
    );
}

/// A REQUEST for `method` with `body`, no timeout and no metadata.
fn request(id: u32, method: &str, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0x01];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0, method.len() as u8, 0, 0]);
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend_from_slice(method.as_bytes());
    m.extend_from_slice(body);
    m
}

/// `msgs` as one frame.
fn frame(msgs: &[&[u8]]) -> Vec<u8> {
    let len: usize = msgs.iter().map(|m| m.len()).sum();
    let mut f = (len as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&(msgs.len() as u16).to_be_bytes());
    for m in msgs {
        f.extend_from_slice(m);
    }
    f
}

/// A FRAGMENT (PROTOCOL.md §5.7) carrying `data`.
fn fragment(data: &[u8], more: bool) -> Vec<u8> {
    let mut m = vec![0x09, u8::from(more)];
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

#[tokio::test(start_paused = true)]
async fn time_the_server_spends_not_reading_does_not_count_against_a_message() {
    // One handler at a time; `slow` holds it for 20 s. A request arrives in two pieces, and
    // between them a small request that waits for the handler: the server stops reading for
    // it (pushing back on the socket) with the message half in. The last piece comes 1 s after
    // the server reads again, 21 s after the first: the server was waiting for it 1 s, within
    // the 5 s frame read timeout, and serves all three.
    let svc = support::service(|req: towerpc::Request| async move {
        if req.method() == "slow" {
            tokio::time::sleep(Duration::from_secs(20)).await;
        }
        Ok(towerpc::Response::new(req.into_body()))
    });
    let server = Server::builder()
        .frame_read_timeout(Duration::from_secs(5))
        .max_concurrency(1);
    let client = serve_with(server, svc).await;

    let (mut reader, mut writer) = tokio::io::split(client);
    let step = Duration::from_millis(10);
    writer
        .write_all(&frame(&[&request(1, "slow", b"s")]))
        .await
        .unwrap();
    tokio::time::sleep(step).await;
    let big = request(2, "echo", &[7u8; 100]);
    writer
        .write_all(&frame(&[&fragment(&big[..50], true)]))
        .await
        .unwrap();
    tokio::time::sleep(step).await;
    writer
        .write_all(&frame(&[&request(3, "echo", b"small")]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(21)).await;
    writer
        .write_all(&frame(&[&fragment(&big[50..], false)]))
        .await
        .unwrap();

    let got = read_until(&mut reader, Duration::from_secs(10), |got| {
        got.iter()
            .filter(|m| matches!(m, Message::Response { .. }))
            .count()
            == 3
    })
    .await;
    let mut answered: Vec<u32> = got
        .iter()
        .filter_map(|m| match m {
            Message::Response { id, .. } => Some(*id),
            Message::Ping { .. } => None,
            other => panic!("unexpected {other:?} in {got:?}"),
        })
        .collect();
    answered.sort_unstable();
    assert_eq!(answered, [1, 2, 3]);
}
