//! Memory follows bytes received, under a real address-space cap (issue 10, item 1): a server in
//! a child process runs with `ulimit -v` set to what it uses at rest plus 256 MiB, and 60
//! connections each send a preface and one frame header announcing 16 MiB (under 1.2 KiB in
//! all). A server that reserved memory on a header's word would need 960 MiB and abort on the
//! failed allocation; this one must keep serving.
//!
//! The child is this test binary itself, run again with `TOWERPC_RLIMIT_CHILD` set.
#![cfg(target_os = "linux")]

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use towerpc::codec::DEFAULT_MAX_FRAME_LEN;
use towerpc::{Client, Server};

const CHILD: &str = "TOWERPC_RLIMIT_CHILD";

/// In the child: serve echo on the given address until killed. In the parent: nothing.
#[test]
fn rlimit_child_server() {
    let Ok(addr) = std::env::var(CHILD) else {
        return;
    };
    let addr: SocketAddr = addr.parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        Server::builder()
            .serve(addr, support::echo())
            .await
            .unwrap();
    });
}

fn spawn_child(addr: SocketAddr, limit_kib: Option<u64>) -> Child {
    let exe = std::env::current_exe().unwrap();
    let run = format!(
        "exec '{}' --exact rlimit_child_server --nocapture --test-threads 1",
        exe.display()
    );
    let script = match limit_kib {
        Some(kib) => format!("ulimit -v {kib} && {run}"),
        None => run,
    };
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .env(CHILD, addr.to_string())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn until_listening(addr: SocketAddr) {
    for _ in 0..500 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the child server did not come up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_frames_do_not_abort_a_server_under_an_address_space_cap() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    // What the server uses at rest, serving one call.
    let addr = support::free_addr();
    let mut child = spawn_child(addr, None);
    until_listening(addr).await;
    let client = Client::builder().connect(addr).await.unwrap();
    let _: u64 = client.invoke("echo", &1u64).await.unwrap();
    let rest = status_kib(child.id(), "VmPeak:");
    drop(client);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(rest > 0, "no VmPeak for the child");

    // The same server, capped at that plus 256 MiB.
    let limit = rest + 256 * 1024;
    let addr = support::free_addr();
    let mut child = spawn_child(addr, Some(limit));
    until_listening(addr).await;
    let mut attackers = Vec::new();
    for _ in 0..60 {
        let mut s = support::raw_connect(addr).await;
        // A header announcing a 16 MiB body with one message, and no body.
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&(DEFAULT_MAX_FRAME_LEN as u32).to_be_bytes());
        header[6..8].copy_from_slice(&1u16.to_be_bytes());
        s.write_all(&header).await.unwrap();
        attackers.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the server died under a {limit} KiB address-space cap"
    );
    let peak = status_kib(child.id(), "VmPeak:");
    let client = Client::builder().connect(addr).await.unwrap();
    let two: u64 = client.invoke("echo", &2u64).await.unwrap();
    assert_eq!(two, 2);
    eprintln!(
        "address space: {} MiB at rest, {} MiB peak with 60 frames announced, cap {} MiB",
        rest / 1024,
        peak / 1024,
        limit / 1024
    );
    drop(attackers);
    child.kill().unwrap();
    child.wait().unwrap();
}
