//! A server connection driven by a scripted client: a preface offering the compression the
//! input picks, then the input's bytes in chunks of the size it picks, then EOF. Whatever
//! arrives (garbage, truncated frames, corrupt compressed streams, floods, duplicate ids), the
//! server must not panic and must end the connection. Paused time: timeouts fire at once.
#![no_main]

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use towerpc::codec::Compression;
use towerpc::{BoxError, Request, Response, Server, Status};

async fn handler(req: Request) -> Result<Response, BoxError> {
    match req.method() {
        "sleep" => {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(Response::new(req.into_body()))
        }
        "fail" => Err(Status::new(towerpc::Code::NotFound, "no such thing").into()),
        "big" => Ok(Response::new(Bytes::from(vec![1u8; 70 * 1024]))),
        _ => Ok(Response::new(req.into_body())),
    }
}

fuzz_target!(|data: &[u8]| {
    let [offer, chunk, stream @ ..] = data else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let (client, server_end) = tokio::io::duplex(64 * 1024);
        let incoming = futures_util::stream::iter([Ok::<_, std::io::Error>(server_end)])
            .chain(futures_util::stream::pending());
        let mut server = Server::builder().max_frame_len(64 * 1024);
        for c in Compression::ALL {
            server = server.accept_compression(*c);
        }
        tokio::spawn(server.serve_with_incoming(incoming, tower::service_fn(handler)));
        let (mut r, mut w) = tokio::io::split(client);
        // A client preface: version 1, role 'C', the offered algorithms, 64 KiB frames.
        let mut preface = *b"TRPC\x01C\x00\x00\x00\x01\x00\x00";
        preface[6] = offer & 0x07;
        let write = async move {
            w.write_all(&preface).await?;
            for piece in stream.chunks(*chunk as usize + 1) {
                w.write_all(piece).await?;
                tokio::task::yield_now().await;
            }
            w.shutdown().await
        };
        let read = async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        let ended = tokio::time::timeout(Duration::from_secs(3600), async {
            let (_, ()) = tokio::join!(write, read);
        })
        .await;
        assert!(ended.is_ok(), "the server never closed the connection");
    });
});
