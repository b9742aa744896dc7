use harness::echo_pb::echo_server::{Echo, EchoServer};
use harness::echo_pb::{BytesMsg, IntMsg};
use tonic::{Request, Response, Status};

struct Svc;

#[tonic::async_trait]
impl Echo for Svc {
    async fn echo_int(&self, r: Request<IntMsg>) -> Result<Response<IntMsg>, Status> {
        Ok(Response::new(r.into_inner()))
    }
    async fn echo_bytes(&self, r: Request<BytesMsg>) -> Result<Response<BytesMsg>, Status> {
        Ok(Response::new(r.into_inner()))
    }
}

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or("127.0.0.1:7001".into())
        .parse()
        .unwrap();
    // Defaults everywhere (what a user would write).
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(Svc))
        .serve(addr)
        .await
        .unwrap();
}
