//! Hand-written pipelined echo client: one connection, callers register a
//! oneshot in a HashMap<u64, oneshot::Sender>, push (id, payload) to an mpsc;
//! a writer task drains the mpsc and flushes once per drain; a reader task
//! completes the oneshots.
use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use harness::{drive, payload_bytes, Opts};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

struct Raw {
    next: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Bytes>>>,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Raw {
    async fn connect(addr: &str) -> Arc<Raw> {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let (r, w) = s.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        let raw = Arc::new(Raw {
            next: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            tx,
        });
        let mut wr = FramedWrite::new(w, LengthDelimitedCodec::new());
        tokio::spawn(async move {
            let mut buf: Vec<Bytes> = Vec::with_capacity(1024);
            loop {
                if rx.recv_many(&mut buf, 1024).await == 0 {
                    break;
                }
                for f in buf.drain(..) {
                    if wr.feed(f).await.is_err() {
                        return;
                    }
                }
                if SinkExt::<Bytes>::flush(&mut wr).await.is_err() {
                    return;
                }
            }
        });
        let r2 = raw.clone();
        tokio::spawn(async move {
            let mut rd = FramedRead::new(r, LengthDelimitedCodec::new());
            while let Some(Ok(mut f)) = rd.next().await {
                let id = u64::from_le_bytes(f[..8].try_into().unwrap());
                let body = f.split_off(8).freeze();
                if let Some(s) = r2.pending.lock().unwrap().remove(&id) {
                    let _ = s.send(body);
                }
            }
        });
        raw
    }

    async fn call(&self, payload: &[u8]) -> Option<Bytes> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (otx, orx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, otx);
        let mut b = BytesMut::with_capacity(8 + payload.len());
        b.put_u64_le(id);
        b.put_slice(payload);
        self.tx.send(b.freeze()).ok()?;
        orx.await.ok()
    }
}

#[tokio::main]
async fn main() {
    let o = Opts::parse();
    let mut conns = Vec::with_capacity(o.conns);
    for _ in 0..o.conns {
        conns.push(Raw::connect(&o.addr).await);
    }
    // Borrowed for the process's life by every call: no shared handle cloned per call.
    let conns: &'static [Arc<Raw>] = conns.leak();
    let big = o.big();
    let data: &'static [u8] = payload_bytes(big).leak();
    drive(&o, move |i| {
        // Caller t makes calls t << 32, t << 32 + 1, ...: each caller keeps to one connection.
        let raw = &conns[(i >> 32) as usize % conns.len()];
        async move {
            if big {
                matches!(raw.call(data).await, Some(r) if r.len() == 1024)
            } else {
                let v = (i as i64).to_le_bytes();
                matches!(raw.call(&v).await, Some(r) if r[..] == v[..])
            }
        }
    })
    .await;
}
