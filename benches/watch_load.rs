//! Watchers on a control socket while the vault auto-locks: N connections send
//! `{"cmd":"watch"}` (one after another: a connection not yet watching holds a
//! request slot), then one `keepalive` restarts the idle period, and every
//! watcher reads until the `locked` state. Prints one JSON line: when the last
//! watcher heard the lock, measured from the keepalive, minus the idle timeout
//! (the lateness, conservative: the clock starts before the keepalive is sent).
//!
//!   watch_load SOCKET WATCHERS AUTO_LOCK_SECONDS
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.len() != 3 {
        eprintln!("usage: watch_load SOCKET WATCHERS AUTO_LOCK_SECONDS");
        std::process::exit(2);
    }
    let socket = &args[0];
    let n: usize = args[1].parse().expect("WATCHERS");
    let auto_lock: f64 = args[2].parse().expect("AUTO_LOCK_SECONDS");
    let wait = Duration::from_secs_f64(auto_lock + 60.0);
    let t = Instant::now();
    let mut watchers = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = UnixStream::connect(socket)
            .unwrap_or_else(|e| fail(&format!("watcher {i}: connect: {e}")));
        s.set_read_timeout(Some(wait)).expect("timeout");
        s.write_all(b"{\"cmd\":\"watch\"}\n").expect("write");
        let mut r = BufReader::new(s);
        let mut first = String::new();
        r.read_line(&mut first).expect("first line");
        if !first.contains("\"event\":\"state\"") {
            fail(&format!("watcher {i}: first line {}", first.trim()));
        }
        watchers.push(r);
    }
    let connect_s = t.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut k = UnixStream::connect(socket).unwrap_or_else(|e| fail(&format!("keepalive: {e}")));
    k.write_all(b"{\"cmd\":\"keepalive\"}\n")
        .expect("keepalive");
    let mut heard = 0usize;
    let mut last = Duration::ZERO;
    let mut first_heard: Option<Duration> = None;
    for r in &mut watchers {
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if line.contains("\"event\":\"state\"") && line.contains("\"state\":\"locked\"") {
                let at = t0.elapsed();
                heard += 1;
                last = last.max(at);
                first_heard.get_or_insert(at);
                break;
            }
        }
    }
    println!(
        "{{\"watchers\":{n},\"heard\":{heard},\"connect_s\":{connect_s:.3},\
         \"first_late_s\":{:.3},\"last_late_s\":{:.3}}}",
        first_heard.map_or(-1.0, |d| d.as_secs_f64() - auto_lock),
        last.as_secs_f64() - auto_lock
    );
}

fn fail(msg: &str) -> ! {
    eprintln!("watch_load: {msg}");
    std::process::exit(1);
}
