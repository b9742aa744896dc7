//! `towerpc call`, `towerpc list` and `towerpc health`.

use std::io::{IsTerminal, Read};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Args;
use serde_json::json;
use towerpc::dispatch::{MethodInfo, METHODS};
use towerpc::server::health::{ServingStatus, HEALTH_METHOD};
use towerpc::{Client, Code, Request};

use crate::json;
use crate::target::{connect, parse_duration, ConnectOpts};

/// `towerpc call ADDR METHOD [JSON]`.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// HOST:PORT, unix:PATH, or http(s)://HOST[:PORT]/PATH for a server behind an HTTP upgrade.
    pub addr: String,
    /// The method's name.
    pub method: String,
    /// The request as JSON (default: standard input when it is not a terminal, else null).
    pub json: Option<String>,
    /// Give up on the call after this long (the server learns the deadline).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Request metadata, as a JSON object.
    #[arg(long, value_name = "JSON")]
    pub metadata: Option<String>,
    /// Print the reply's msgpack bytes in hex instead of JSON.
    #[arg(long)]
    pub raw: bool,
    /// Send a one-way message: no reply, the command ends once it is written.
    #[arg(long)]
    pub oneway: bool,
    #[command(flatten)]
    pub conn: ConnectOpts,
}

/// `towerpc list ADDR`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// HOST:PORT, unix:PATH, or an http(s):// upgrade URL.
    pub addr: String,
    /// Print the list as JSON.
    #[arg(long)]
    pub json: bool,
    /// Give up after this long.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub conn: ConnectOpts,
}

/// `towerpc health ADDR [SERVICE]`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// HOST:PORT, unix:PATH, or an http(s):// upgrade URL.
    pub addr: String,
    /// The service to ask about (default: the server as a whole).
    #[arg(default_value = "")]
    pub service: String,
    /// Give up after this long.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub conn: ConnectOpts,
}

/// The request body: the argument, standard input, or null.
fn request_json(arg: Option<&str>) -> Result<String> {
    match arg {
        Some("-") => read_stdin(),
        Some(text) => Ok(text.to_string()),
        None if !std::io::stdin().is_terminal() => {
            let text = read_stdin()?;
            Ok(if text.trim().is_empty() {
                "null".into()
            } else {
                text
            })
        }
        None => Ok("null".into()),
    }
}

fn read_stdin() -> Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("cannot read the request from standard input")?;
    Ok(text)
}

pub async fn call(args: CallArgs) -> Result<()> {
    let body = json::to_msgpack(&request_json(args.json.as_deref())?, "the request")?;
    let metadata = match &args.metadata {
        Some(text) => {
            let value = json::parse(text, "--metadata")?;
            if !value.is_object() {
                bail!("--metadata must be a JSON object, not {value}");
            }
            Some(json::encode(&value)?)
        }
        None => None,
    };
    let client = connect(&args.addr, &args.conn, Client::builder()).await?;
    let mut req = Request::new(args.method.clone(), body).with_timeout(args.timeout);
    if let Some(metadata) = metadata {
        req = req.with_metadata(metadata);
    }
    if args.oneway {
        req = req.one_way();
        client.request(req).await?;
        client.close().await;
        return Ok(());
    }
    let reply = match client.request(req).await {
        Ok(reply) => reply,
        Err(e) if e.is_timeout() => bail!(
            "call to {:?} on {} timed out after {} (--timeout)",
            args.method,
            args.addr,
            crate::bench::fmt_ns(args.timeout.as_nanos() as u64)
        ),
        Err(e) => return Err(explain(&client, &args.addr, &args.method, e).await),
    };
    if args.raw {
        println!("{}", json::hex(reply.body()));
    } else {
        let value = json::from_msgpack(reply.body())?;
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(())
}

/// Turns a failed call into one line; for an unknown method, names close matches.
pub async fn explain(
    client: &Client,
    addr: &str,
    method: &str,
    e: towerpc::Error,
) -> anyhow::Error {
    let Some(status) = e.status() else {
        return anyhow!(e);
    };
    if status.code() != Code::NotFound || !status.message().starts_with("unknown method") {
        let code = status.code().to_string().to_uppercase().replace(' ', "_");
        return anyhow!("{addr} answered {code}: {}", status.message());
    }
    let mut msg = format!("unknown method {method:?} on {addr}");
    if let Ok(methods) = client.invoke::<_, Vec<MethodInfo>>(METHODS, &()).await {
        let close = close_matches(method, methods.iter().map(|m| m.name.as_str()));
        if close.is_empty() {
            let names: Vec<_> = methods
                .iter()
                .filter(|m| !m.name.starts_with("towerpc."))
                .map(|m| m.name.as_str())
                .collect();
            msg.push_str(&format!("; it has: {}", names.join(", ")));
        } else {
            msg.push_str(&format!("; did you mean {}?", close.join(" or ")));
        }
    }
    anyhow!(msg)
}

/// The names that look like `wanted`, best first (at most three).
pub fn close_matches<'a>(wanted: &str, names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let lower = wanted.to_lowercase();
    let mut scored: Vec<(f64, &str)> = names
        .map(|n| (strsim::jaro_winkler(&lower, &n.to_lowercase()), n))
        .filter(|(score, _)| *score >= 0.8)
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored
        .into_iter()
        .take(3)
        .map(|(_, n)| format!("{n:?}"))
        .collect()
}

pub async fn list(args: ListArgs) -> Result<()> {
    let client = connect(
        &args.addr,
        &args.conn,
        Client::builder().timeout(args.timeout),
    )
    .await?;
    let methods: Vec<MethodInfo> = client.invoke(METHODS, &()).await.map_err(|e| {
        if e.code() == Some(Code::NotFound) {
            anyhow!(
                "{} does not list its methods (it serves no towerpc Dispatcher): {e}",
                args.addr
            )
        } else {
            anyhow!(e)
        }
    })?;
    if args.json {
        let list: Vec<_> = methods
            .iter()
            .map(|m| json!({"name": m.name, "request": m.request, "response": m.response}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let rows: Vec<[&str; 3]> = methods
        .iter()
        .map(|m| [m.name.as_str(), m.request.as_str(), m.response.as_str()])
        .collect();
    print!("{}", table(&["METHOD", "REQUEST", "RESPONSE"], &rows));
    Ok(())
}

/// Left-aligned columns, two spaces apart.
fn table(head: &[&str; 3], rows: &[[&str; 3]]) -> String {
    let mut widths = head.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(head).chain(rows) {
        let line = format!(
            "{:w0$}  {:w1$}  {}",
            row[0],
            row[1],
            row[2],
            w0 = widths[0],
            w1 = widths[1]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Prints SERVING or NOT_SERVING; `Ok(true)` when serving.
pub async fn health(args: HealthArgs) -> Result<bool> {
    let client = connect(
        &args.addr,
        &args.conn,
        Client::builder().timeout(args.timeout),
    )
    .await?;
    let status: ServingStatus = client
        .invoke(HEALTH_METHOD, args.service.as_str())
        .await
        .map_err(|e| match e.code() {
            Some(Code::NotFound) => anyhow!("{} knows no service {:?}", args.addr, args.service),
            _ => anyhow!(e),
        })?;
    let serving = status == ServingStatus::Serving;
    println!("{}", if serving { "SERVING" } else { "NOT_SERVING" });
    Ok(serving)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_matches_rank_by_likeness() {
        let names = ["echo", "sleep", "fail", "towerpc.methods"];
        assert_eq!(close_matches("ecoh", names.into_iter()), vec!["\"echo\""]);
        assert_eq!(close_matches("Sleep", names.into_iter()), vec!["\"sleep\""]);
        assert!(close_matches("zzz", names.into_iter()).is_empty());
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["METHOD", "REQUEST", "RESPONSE"],
            &[["echo", "rmpv::Value", "x"]],
        );
        assert_eq!(t, "METHOD  REQUEST      RESPONSE\necho    rmpv::Value  x\n");
    }
}
