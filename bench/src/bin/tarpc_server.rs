use futures::{future, StreamExt};
use harness::tarpc_svc::Echo;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tarpc::tokio_serde::formats::Bincode;

#[derive(Clone)]
struct Svc;

impl Echo for Svc {
    async fn echo_int(self, _: Context, v: i64) -> i64 {
        v
    }
    async fn echo_bytes(self, _: Context, v: Vec<u8>) -> Vec<u8> {
        v
    }
}

async fn spawn(fut: impl std::future::Future<Output = ()> + Send + 'static) {
    tokio::spawn(fut);
}

#[tokio::main]
async fn main() {
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or("127.0.0.1:7002".into())
        .parse()
        .unwrap();
    // The pattern from tarpc's own example server, with the bincode serde transport.
    let mut listener = tarpc::serde_transport::tcp::listen(&addr, Bincode::default)
        .await
        .unwrap();
    listener.config_mut().max_frame_length(usize::MAX);
    listener
        .filter_map(|r| future::ready(r.ok()))
        .map(BaseChannel::with_defaults)
        .map(|channel| channel.execute(Svc.serve()).for_each(spawn))
        .buffer_unordered(10)
        .for_each(|_| async {})
        .await;
}
