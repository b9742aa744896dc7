//! A server of named methods: plain async functions and methods of two cache instances,
//! registered with a `Dispatcher`. Its client is `dispatch_client`, a separate program that
//! shares only `dispatch_types/mod.rs` with it.
//!
//! ```text
//! cargo run --example dispatch_server -- [127.0.0.1:7100]
//! cargo run --example dispatch_client -- [127.0.0.1:7100]
//! ```

#[path = "dispatch_types/mod.rs"]
mod types;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use towerpc::dispatch::{CallContext, Dispatcher, Receiver};
use towerpc::{BoxError, Code, Server, Status};

use types::{Add, CalcError, Div, LogLine, Quotient, Set};

impl From<CalcError> for Status {
    fn from(e: CalcError) -> Status {
        // The message for people, the details for programs.
        Status::typed(Code::InvalidArgument, &e)
    }
}

async fn add(req: Add) -> Result<i64, Status> {
    Ok(req.a.checked_add(req.b).ok_or(CalcError::Overflow)?)
}

async fn div(req: Div) -> Result<Quotient, Status> {
    if req.divisor == 0 {
        return Err(CalcError::DivisionByZero {
            dividend: req.dividend,
        }
        .into());
    }
    Ok(Quotient {
        quotient: req.dividend / req.divisor,
        remainder: req.dividend % req.divisor,
    })
}

/// One cache; the server runs two of them under different names.
#[derive(Debug, Default)]
struct Cache {
    entries: Mutex<HashMap<String, String>>,
}

impl Cache {
    async fn get(self: Arc<Self>, key: String) -> Option<String> {
        self.lock().get(&key).cloned()
    }

    async fn set(self: Arc<Self>, req: Set) -> Option<String> {
        // A real cache would honour `req.ttl_secs`.
        self.lock().insert(req.key, req.value)
    }

    /// `Cache`'s remote methods, registered for each instance under its own prefix.
    fn methods(r: Receiver<Self>) -> Receiver<Self> {
        r.method("Get", Cache::get).method("Set", Cache::set)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn log(ctx: CallContext, line: LogLine) {
    let peer = ctx.remote_addr().map(|a| a.to_string()).unwrap_or_default();
    eprintln!("dispatch_server: [{}] {peer}: {}", line.level, line.text);
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("127.0.0.1:7100")
        .parse()?;

    let users = Arc::new(Cache::default());
    let posts = Arc::new(Cache::default());
    let dispatcher = Dispatcher::new()
        .route("Calc.Add", add)
        .route("Calc.Div", div)
        .route("Log.Write", log)
        .receiver("UsersCache", users, Cache::methods)
        .receiver("PostsCache", posts, Cache::methods);

    eprintln!("dispatch_server: listening on {addr}; methods:");
    for m in dispatcher.methods() {
        eprintln!("  {}({}) -> {}", m.name, m.request, m.response);
    }
    Server::builder()
        .serve_with_shutdown(addr, dispatcher, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
