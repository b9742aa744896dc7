use harness::tarpc_svc::EchoClient;
use harness::{drive, payload_bytes, Opts};
use tarpc::tokio_serde::formats::Bincode;
use tarpc::{client, context};

#[tokio::main]
async fn main() {
    let o = Opts::parse();
    let mut transport = tarpc::serde_transport::tcp::connect(&o.addr, Bincode::default);
    transport.config_mut().max_frame_length(usize::MAX);
    // One client (one TCP connection) shared by all callers; default Config.
    let client = EchoClient::new(client::Config::default(), transport.await.unwrap()).spawn();
    // Borrowed for the process's life by every call: no shared handle cloned per call.
    let c: &'static EchoClient = Box::leak(Box::new(client));
    let big = o.big();
    let data = payload_bytes(big);
    drive(&o, move |i| {
        // tarpc's call takes its argument by value.
        let data = data.clone();
        async move {
            if big {
                matches!(c.echo_bytes(context::current(), data).await, Ok(r) if r.len() == 1024)
            } else {
                matches!(c.echo_int(context::current(), i as i64).await, Ok(r) if r == i as i64)
            }
        }
    })
    .await;
}
