use harness::echo_pb::echo_client::EchoClient;
use harness::echo_pb::{BytesMsg, IntMsg};
use harness::{drive, payload_bytes, Opts};
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::transport::Channel;

/// Print the first few RPC errors to stderr (so failures are visible, not just counted).
fn report<T>(r: Result<T, tonic::Status>, seen: &AtomicU64) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            if seen.fetch_add(1, Ordering::Relaxed) < 3 {
                eprintln!("tonic call error: {e:?}");
            }
            None
        }
    }
}

#[tokio::main]
async fn main() {
    let o = Opts::parse();
    // One Channel (one HTTP/2 connection) shared by all callers.
    let ch = Channel::from_shared(format!("http://{}", o.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = EchoClient::new(ch);
    let big = o.big();
    let data = payload_bytes(big);
    let seen: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    drive(&o, move |i| {
        // tonic's calls take `&mut self`: its users clone the client per call.
        let mut c = client.clone();
        let data = data.clone();
        async move {
            if big {
                matches!(report(c.echo_bytes(BytesMsg { data }).await, seen), Some(r) if r.get_ref().data.len() == 1024)
            } else {
                matches!(report(c.echo_int(IntMsg { v: i as i64 }).await, seen), Some(r) if r.get_ref().v == i as i64)
            }
        }
    })
    .await;
}
