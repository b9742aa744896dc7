//! The `towerpc` binary driven as a user drives it, against real servers on 127.0.0.1: a
//! `serve-echo` child process, or a server of the test's own where a case needs one (health
//! NOT_SERVING, the HTTP upgrade).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_towerpc");

/// A `towerpc serve-echo` child, killed on drop.
struct Echo {
    child: Child,
    addr: String,
}

impl Echo {
    fn start(extra: &[&str]) -> Echo {
        let mut child = Command::new(BIN)
            .args(["serve-echo", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn serve-echo");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("serve-echo said {line:?}"))
            .to_string();
        Echo { child, addr }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn towerpc(args: &[&str]) -> Output {
    towerpc_stdin(args, None)
}

fn towerpc_stdin(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn towerpc");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs and expects success; returns standard output.
fn ok(args: &[&str]) -> String {
    let out = towerpc(args);
    assert!(
        out.status.success(),
        "towerpc {args:?} failed: {}",
        stderr(&out)
    );
    stdout(&out)
}

/// Runs and expects failure with one line on standard error; returns that line.
fn fails(args: &[&str]) -> String {
    let out = towerpc(args);
    assert!(
        !out.status.success(),
        "towerpc {args:?} succeeded: {}",
        stdout(&out)
    );
    let err = stderr(&out);
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn call_echoes_json_through_msgpack() {
    let echo = Echo::start(&[]);
    let out = ok(&[
        "call",
        &echo.addr,
        "echo",
        r#"{"name": "ada", "tags": [1, 2.5, null, true]}"#,
    ]);
    let value: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        value,
        serde_json::json!({"name": "ada", "tags": [1, 2.5, null, true]})
    );
    // Pretty-printed.
    assert!(out.contains("\n  \"name\": \"ada\""), "{out}");

    // From standard input, with `-` or with no argument at all.
    let out = towerpc_stdin(&["call", &echo.addr, "echo", "-"], Some("[\"in\"]"));
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        serde_json::json!(["in"])
    );
    let out = towerpc_stdin(&["call", &echo.addr, "echo"], Some("42"));
    assert_eq!(stdout(&out).trim(), "42");

    // The reply's msgpack bytes in hex: [1] is 0x91 0x01.
    assert_eq!(
        ok(&["call", &echo.addr, "echo", "[1]", "--raw"]).trim(),
        "9101"
    );

    // Metadata, compression, a timeout that is long enough: the call still works.
    let out = ok(&[
        "call",
        &echo.addr,
        "sleep",
        "5",
        "--metadata",
        r#"{"tenant": "t1"}"#,
        "--compression",
        "lz4",
        "--timeout",
        "5s",
    ]);
    assert_eq!(out.trim(), "5");

    // One-way: nothing printed, exit 0.
    assert_eq!(ok(&["call", &echo.addr, "echo", "1", "--oneway"]), "");
}

#[test]
fn call_errors_are_one_clear_line() {
    let echo = Echo::start(&[]);

    let err = fails(&["call", &echo.addr, "ecoh", "1"]);
    assert_eq!(
        err.trim(),
        format!(
            "error: unknown method \"ecoh\" on {}; did you mean \"echo\"?",
            echo.addr
        )
    );
    let err = fails(&["call", &echo.addr, "zzzz", "1"]);
    assert!(err.contains("it has: echo, fail, sleep"), "{err}");

    let err = fails(&["call", &echo.addr, "echo", "{\"a\": 1,\n \"b\": tru}"]);
    assert!(
        err.starts_with("error: invalid JSON in the request at line 2, column"),
        "{err}"
    );
    assert!(err.contains(r#"(at the end of " \"b\": tru}")"#), "{err}");

    let err = fails(&["call", &echo.addr, "echo", "1", "--metadata", "[1]"]);
    assert!(err.contains("--metadata must be a JSON object"), "{err}");

    let err = fails(&[
        "call",
        &echo.addr,
        "fail",
        r#"{"code": "not_found", "message": "no such user"}"#,
    ]);
    assert_eq!(
        err.trim(),
        format!("error: {} answered NOT_FOUND: no such user", echo.addr)
    );

    let err = fails(&["call", &echo.addr, "sleep", "5000", "--timeout", "100ms"]);
    assert!(err.contains("timed out after 100.00 ms"), "{err}");

    // Connection refused names the address.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let err = fails(&["call", &addr, "echo", "1"]);
    assert!(
        err.starts_with(&format!("error: cannot connect to {addr}")),
        "{err}"
    );
    assert!(err.to_lowercase().contains("refused"), "{err}");

    let err = fails(&["call", "nonsense", "echo"]);
    assert!(err.contains("not HOST:PORT"), "{err}");
}

#[test]
fn list_shows_methods_and_types() {
    let echo = Echo::start(&[]);
    let table = ok(&["list", &echo.addr]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("METHOD "), "{table}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("sleep ") && l.contains("u64")),
        "{table}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("towerpc.methods ")),
        "{table}"
    );

    let list: Vec<Value> = serde_json::from_str(&ok(&["list", &echo.addr, "--json"])).unwrap();
    let names: Vec<&str> = list.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["echo", "fail", "sleep", "towerpc.methods"]);
    assert_eq!(list[2]["request"], "u64");
}

#[test]
fn health_exit_status_says_serving() {
    let echo = Echo::start(&[]);
    assert_eq!(ok(&["health", &echo.addr]).trim(), "SERVING");
    let err = fails(&["health", &echo.addr, "Users"]);
    assert!(err.contains("knows no service \"Users\""), "{err}");

    // A server of our own with a service marked NOT_SERVING.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = towerpc::Server::builder();
    let health = server.health();
    health.set_serving("Users");
    health.set_not_serving("Reports");
    let addr = rt.block_on(async {
        let incoming = towerpc::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = incoming.local_addr().unwrap();
        tokio::spawn(server.serve_with_incoming(incoming, towerpc::dispatch::Dispatcher::new()));
        addr.to_string()
    });
    assert_eq!(ok(&["health", &addr, "Users"]).trim(), "SERVING");
    let out = towerpc(&["health", &addr, "Reports"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out).trim(), "NOT_SERVING");
}

#[test]
fn bench_summary_as_text_and_json() {
    let echo = Echo::start(&[]);
    let text = ok(&[
        "bench",
        &echo.addr,
        "echo",
        "--callers",
        "20",
        "--duration",
        "500ms",
        "--payload-size",
        "64",
    ]);
    assert!(text.contains("closed loop, 20 callers"), "{text}");
    assert!(text.contains("latency   p50 "), "{text}");
    assert!(text.contains("write syscalls/call"), "{text}");
    assert!(text.contains("latency histogram"), "{text}");

    let out = ok(&[
        "bench",
        &echo.addr,
        "echo",
        r#"{"k": "v"}"#,
        "--callers",
        "10",
        "--duration",
        "500ms",
        "--connections",
        "2",
        "--json",
    ]);
    let s: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["mode"], "closed");
    assert_eq!(s["connections"], 2);
    let calls = s["calls"].as_u64().unwrap();
    assert!(calls > 0);
    assert_eq!(s["ok"].as_u64().unwrap(), calls);
    assert_eq!(s["errors"], serde_json::json!({}));
    let lat = &s["latency_us"];
    assert!(lat["p50"].as_f64().unwrap() <= lat["p99"].as_f64().unwrap());
    assert!(lat["p99"].as_f64().unwrap() <= lat["max"].as_f64().unwrap());
    assert!(s["wire_bytes_per_call"].as_f64().unwrap() > 0.0);
    assert!(s["write_syscalls_per_call"].as_f64().unwrap() > 0.0);
    let in_histogram: u64 = s["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(in_histogram, calls);

    // Open loop: calls start on schedule; errors are counted by code.
    let out = ok(&[
        "bench",
        &echo.addr,
        "sleep",
        "1",
        "--rate",
        "200",
        "--callers",
        "50",
        "--duration",
        "1s",
        "--json",
    ]);
    let s: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["mode"], "open");
    let calls = s["calls"].as_u64().unwrap();
    assert!(
        (100..=210).contains(&calls),
        "{calls} calls at 200/s for 1 s"
    );

    // A wrong method fails before the run, with the same message as `call`.
    let err = fails(&["bench", &echo.addr, "ech", "--duration", "1s"]);
    assert!(err.contains("did you mean \"echo\""), "{err}");
}

/// A throwaway CA, a `localhost` certificate it signs, and a client certificate, as PEM files.
struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    fn new(name: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("towerpc-cli-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let issue = |names: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &ca, &ca_key)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server, server_key) = issue(vec!["localhost".into()]);
        let (client, client_key) = issue(vec!["client".into()]);
        for (file, pem) in [
            ("ca.pem", ca.pem()),
            ("server.pem", server),
            ("server.key", server_key),
            ("client.pem", client),
            ("client.key", client_key),
        ] {
            std::fs::write(dir.join(file), pem).unwrap();
        }
        Pki { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn tls_and_mutual_tls() {
    let pki = Pki::new("tls");
    let echo = Echo::start(&[
        "--cert",
        &pki.path("server.pem"),
        "--key",
        &pki.path("server.key"),
    ]);
    let out = ok(&[
        "call",
        &echo.addr,
        "echo",
        "\"secret\"",
        "--tls",
        "--ca",
        &pki.path("ca.pem"),
        "--server-name",
        "localhost",
    ]);
    assert_eq!(out.trim(), "\"secret\"");
    // The certificate is for localhost, not 127.0.0.1.
    let err = fails(&[
        "call",
        &echo.addr,
        "echo",
        "1",
        "--tls",
        "--ca",
        &pki.path("ca.pem"),
    ]);
    assert!(err.contains("cannot connect"), "{err}");
    drop(echo);

    let echo = Echo::start(&[
        "--cert",
        &pki.path("server.pem"),
        "--key",
        &pki.path("server.key"),
        "--client-ca",
        &pki.path("ca.pem"),
    ]);
    let base = [
        "--tls",
        "--ca",
        &pki.path("ca.pem"),
        "--server-name",
        "localhost",
    ];
    let mut args = vec!["call", &echo.addr, "echo", "2"];
    args.extend(base);
    // No client certificate: the server refuses the connection.
    fails(&args);
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    args.extend(["--cert", &cert, "--key", &key]);
    assert_eq!(ok(&args).trim(), "2");
}

#[test]
fn calls_through_an_http_upgrade_url() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr: SocketAddr = rt.block_on(async {
        let rpc = towerpc::Server::builder().into_upgrade(
            towerpc::dispatch::Dispatcher::new()
                .route("hi", |name: String| async move { format!("hi {name}") }),
        );
        let router = axum::Router::new().route_service("/rpc", rpc);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    });
    let url = format!("http://{addr}/rpc");
    assert_eq!(ok(&["call", &url, "hi", "\"ada\""]).trim(), "\"hi ada\"");
    let names: Vec<Value> = serde_json::from_str(&ok(&["list", &url, "--json"])).unwrap();
    assert_eq!(names[0]["name"], "hi");
    // A path the app does not serve: the upgrade is refused, and the error says so.
    let err = fails(&["call", &format!("http://{addr}/nope"), "hi", "\"x\""]);
    assert!(err.contains("404"), "{err}");
    rt.shutdown_timeout(Duration::from_secs(1));
}
