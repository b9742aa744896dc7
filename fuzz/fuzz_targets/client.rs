//! A client against a hostile server: after a valid server preface, the input's bytes are what
//! the server "replies", in chunks of the size the input picks (unknown ids, duplicates,
//! GOAWAYs, garbage). Calls must all end (a reply, a typed error, a timeout), nothing may
//! panic, and the client must close.
#![no_main]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use towerpc::{Client, Request};

fuzz_target!(|data: &[u8]| {
    let [chunk, stream @ ..] = data else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let (client_end, server_end) = tokio::io::duplex(64 * 1024);
        // One connection: redials find nothing and fail.
        let slot: Arc<Mutex<Option<DuplexStream>>> = Arc::new(Mutex::new(Some(client_end)));
        let connector = tower::service_fn(move |_: ()| {
            let io = slot.lock().unwrap().take();
            async move { io.ok_or_else(|| std::io::Error::other("no second connection")) }
        });
        let client = Client::builder()
            .timeout(Duration::from_secs(5))
            .max_frame_len(64 * 1024)
            .connect_lazy_with((), connector);
        let (mut r, mut w) = tokio::io::split(server_end);
        let server = async move {
            // A server preface: version 1, role 'S', no compression, 64 KiB frames.
            w.write_all(b"TRPC\x01S\x00\x00\x00\x01\x00\x00").await?;
            for piece in stream.chunks(*chunk as usize + 1) {
                w.write_all(piece).await?;
                tokio::task::yield_now().await;
            }
            // Then silence: calls end by their deadline or the stall rule.
            tokio::time::sleep(Duration::from_secs(60)).await;
            w.shutdown().await
        };
        let drain = async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        let calls = async {
            let calls = (0..4u8).map(|i| {
                let client = client.clone();
                async move {
                    let _ = client.request(Request::new("echo", vec![i; 3])).await;
                }
            });
            futures_util::future::join_all(calls).await;
            client.close().await;
        };
        let ended = tokio::time::timeout(Duration::from_secs(3600), async {
            let _ = tokio::join!(server, drain, calls);
        })
        .await;
        assert!(ended.is_ok(), "calls never ended");
    });
});
