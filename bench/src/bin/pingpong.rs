//! Physical floor: blocking std::net ping-pong, one message in flight.
//! `pingpong server ADDR [spin]` / `pingpong client ADDR SIZE SECS [spin]`
//! With `spin`, sockets are non-blocking and both sides busy-poll read(),
//! which removes the thread sleep/wake-up cost and leaves syscalls + loopback.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let spin = a.last().map(|x| x == "spin").unwrap_or(false);
    if a[1] == "server" {
        let l = TcpListener::bind(&a[2]).unwrap();
        for s in l.incoming() {
            let mut s = s.unwrap();
            s.set_nodelay(true).unwrap();
            s.set_nonblocking(spin).unwrap();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    match s.read(&mut buf) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if write_all_spin(&mut s, &buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    } else {
        let size: usize = a[3].parse().unwrap();
        let secs: f64 = a[4].parse().unwrap();
        let mut s = TcpStream::connect(&a[2]).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_nonblocking(spin).unwrap();
        let msg = vec![7u8; size];
        let mut back = vec![0u8; size];
        let mut lat = Vec::with_capacity(1 << 20);
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let start = Instant::now();
        while Instant::now() < end {
            let t0 = Instant::now();
            write_all_spin(&mut s, &msg).unwrap();
            let mut got = 0;
            while got < size {
                match s.read(&mut back[got..]) {
                    Ok(0) => panic!("eof"),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            lat.push(t0.elapsed().as_nanos() as u64);
        }
        let el = start.elapsed().as_secs_f64();
        lat.sort_unstable();
        let n = lat.len();
        println!(
            "PINGPONG spin={} size={} n={} rt_per_s={:.0} mean_us={:.2} p50_us={:.2} p99_us={:.2}",
            spin,
            size,
            n,
            n as f64 / el,
            lat.iter().sum::<u64>() as f64 / n as f64 / 1000.0,
            lat[n / 2] as f64 / 1000.0,
            lat[n * 99 / 100] as f64 / 1000.0
        );
    }
}

fn write_all_spin(s: &mut TcpStream, mut b: &[u8]) -> std::io::Result<()> {
    while !b.is_empty() {
        match s.write(b) {
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
