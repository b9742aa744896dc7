//! `towerpc`: call a towerpc server's methods with JSON, list them, check its health, load-test
//! it, or run an echo server to try things against.
//!
//! ```text
//! towerpc serve-echo 127.0.0.1:7100
//! towerpc list 127.0.0.1:7100
//! towerpc call 127.0.0.1:7100 echo '{"hello": "world"}'
//! towerpc health 127.0.0.1:7100
//! towerpc bench 127.0.0.1:7100 echo --callers 1000 --duration 10s
//! ```
//!
//! Requests are JSON, sent as msgpack with field names (what a `Dispatcher` handler decodes into
//! its serde type); replies print as JSON. Every error is one line on standard error and a
//! non-zero exit status.

mod bench;
mod call;
mod json;
mod serve;
mod target;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The towerpc command-line tool.
#[derive(Debug, Parser)]
#[command(name = "towerpc", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Call a method with a JSON request and print the reply as JSON.
    Call(call::CallArgs),
    /// List the methods a server's dispatcher registered, with their types.
    List(call::ListArgs),
    /// Ask the server's health method; exit status 0 only when SERVING.
    Health(call::HealthArgs),
    /// Load-test a method: live progress, then latency percentiles and a histogram.
    Bench(bench::BenchArgs),
    /// Serve `echo`, `sleep` (milliseconds) and `fail` ({"code", "message"}) on ADDR.
    ServeEcho(serve::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Call(args) => call::call(args).await.map(|()| true),
            Command::List(args) => call::list(args).await.map(|()| true),
            Command::Health(args) => call::health(args).await,
            Command::Bench(args) => bench::bench(args).await.map(|()| true),
            Command::ServeEcho(args) => serve::serve(args).await.map(|()| true),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        // Health said NOT_SERVING: it printed so, and the status tells scripts.
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
