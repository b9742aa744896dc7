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
    let big = o.big();
    let data = payload_bytes(big);
    drive(&o, move |i| {
        let c = client.clone();
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
