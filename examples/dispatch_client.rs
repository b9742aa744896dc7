//! A client that calls `dispatch_server`'s methods by name alone: it shares only the
//! request and response types of `dispatch_types/mod.rs`, never the server's functions.
//!
//! ```text
//! cargo run --example dispatch_server -- [127.0.0.1:7100]
//! cargo run --example dispatch_client -- [127.0.0.1:7100]
//! ```

#[path = "dispatch_types/mod.rs"]
mod types;

use tower::{Service, ServiceExt};
use towerpc::dispatch::{MethodInfo, METHODS};
use towerpc::{BoxError, Client};

use types::{Add, CalcError, Div, LogLine, Quotient, Set};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7100".to_owned());
    let client = Client::connect(addr.as_str()).await?;

    // What does the server offer?
    let methods: Vec<MethodInfo> = client.invoke(METHODS, &()).await?;
    println!(
        "{} methods: {:?}",
        methods.len(),
        methods.iter().map(|m| &m.name).collect::<Vec<_>>()
    );

    // A typed call, by name.
    let sum: i64 = client.invoke("Calc.Add", &Add { a: 2, b: 40 }).await?;
    println!("Calc.Add(2, 40) = {sum}");

    // A typed handle: a tower Service for one method.
    let mut div = client.method::<Div, Quotient>("Calc.Div");
    let q = div
        .ready()
        .await?
        .call(Div {
            dividend: 7,
            divisor: 2,
        })
        .await?;
    println!("Calc.Div(7, 2) = {} rem {}", q.quotient, q.remainder);

    // A remote error is typed: match on it instead of parsing text.
    let err = div
        .ready()
        .await?
        .call(Div {
            dividend: 1,
            divisor: 0,
        })
        .await
        .expect_err("division by zero fails");
    match err.details::<CalcError>() {
        Some(CalcError::DivisionByZero { dividend }) => {
            println!(
                "Calc.Div(1, 0) failed as expected: {dividend} / 0 ({:?})",
                err.code()
            )
        }
        other => return Err(format!("unexpected error {err} ({other:?})").into()),
    }

    // Two instances of one cache type, under their own names, in one batch (one write).
    let set = |key: &str, value: &str| Set {
        key: key.into(),
        value: value.into(),
        ttl_secs: None,
    };
    let mut batch = client.batch();
    let set_user = batch.call::<_, Option<String>>("UsersCache.Set", &set("alice", "admin"))?;
    let set_post =
        batch.call::<_, Option<String>>("PostsCache.Set", &set("alice", "first post"))?;
    let user = batch.call::<_, Option<String>>("UsersCache.Get", "alice")?;
    let post = batch.call::<_, Option<String>>("PostsCache.Get", "alice")?;
    batch.send(
        "Log.Write",
        &LogLine {
            level: "info".into(),
            text: "batch sent".into(),
        },
    )?;
    let mut replies = batch.run().await?;
    // Each entry has its own result; the previous values, if this ran before.
    let _previous = (replies.take(set_user)?, replies.take(set_post)?);
    println!(
        "UsersCache.Get(alice) = {:?}, PostsCache.Get(alice) = {:?}",
        replies.take(user)?,
        replies.take(post)?
    );

    // A one-way message: returns once it is queued.
    client.send(
        "Log.Write",
        &LogLine {
            level: "info".into(),
            text: "goodbye".into(),
        },
    )?;
    // Give the writer a moment before the process (and the connection) ends.
    let _: Option<String> = client.invoke("UsersCache.Get", "nobody").await?;
    Ok(())
}
