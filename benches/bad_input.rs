//! Bad-input sweep against a running control socket, with a probe that must keep
//! being answered throughout:
//!   - malformed JSON, unknown commands, missing fields, binary garbage;
//!   - lines over 64 KiB;
//!   - stalled clients (half a line, then silence);
//!   - a flood of CONNS connections held open at once;
//!   - a burst of wrong-passphrase unlocks.
//!
//! The probe (root, the operator) sends `{"cmd":"status"}` every 50 ms on a new
//! connection and counts requests without an answer. The stalled clients and the
//! flood come from ATTACKER_UID (a local user: that thread alone changes uid), the
//! malformed lines and the wrong passphrases from root (authorised, so the lockout
//! is exercised). A uid that `control.allow` grants nothing is closed at accept, so
//! the supervisor under test should allow ATTACKER_UID `status` (qemu-tests/bench.py
//! does): then the attacker holds its share of slots until the read timeout and the
//! rest are refused. `closed_why` in the output counts each reason.
//!
//!   cargo bench --bench bad_input -- SOCKET CONNS SECONDS ATTACKER_UID
//!
//! Prints one JSON line; exit status 1 if a probe request went unanswered.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn send(socket: &str, payload: &[u8]) -> Option<String> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(payload).ok()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    Some(line)
}

fn raise_fd_limit(want: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current.is_some_and(|c| c < want) {
        let current = Some(lim.maximum.map_or(want, |m| want.min(m)));
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current,
                maximum: lim.maximum,
            },
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.len() != 4 {
        eprintln!("usage: bad_input SOCKET CONNS SECONDS ATTACKER_UID");
        std::process::exit(2);
    }
    let socket = args[0].clone();
    let conns: usize = args[1].parse().expect("CONNS");
    let secs: f64 = args[2].parse().expect("SECONDS");
    let attacker: u32 = args[3].parse().expect("ATTACKER_UID");
    raise_fd_limit(conns as u64 + 256);
    let stop = Arc::new(AtomicBool::new(false));
    let probe_sent = Arc::new(AtomicUsize::new(0));
    let probe_lost = Arc::new(AtomicUsize::new(0));
    let probe_max_us = Arc::new(AtomicUsize::new(0));

    let probe = {
        let (socket, stop) = (socket.clone(), stop.clone());
        let (sent, lost, max) = (probe_sent.clone(), probe_lost.clone(), probe_max_us.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                sent.fetch_add(1, Ordering::Relaxed);
                match send(&socket, b"{\"cmd\":\"status\"}\n") {
                    Some(l) if l.contains("\"state\"") => {
                        max.fetch_max(t.elapsed().as_micros() as usize, Ordering::Relaxed);
                    }
                    _ => {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Malformed requests: every one must get an error line, not silence.
    let malformed: Vec<Vec<u8>> = vec![
        b"{\n".to_vec(),
        b"not json\n".to_vec(),
        b"{\"cmd\":\"reboot\"}\n".to_vec(),
        b"{\"cmd\":\"unlock\"}\n".to_vec(),
        b"{\"cmd\":42}\n".to_vec(),
        b"[]\n".to_vec(),
        b"\xff\xfe\x00\x01\n".to_vec(),
        b"{\"cmd\":\"status\",\"cmd\":\"lock\"}\n".to_vec(),
    ];
    let mut malformed_answered = 0;
    for _ in 0..25 {
        for m in &malformed {
            if send(&socket, m).is_some_and(|l| l.contains("error")) {
                malformed_answered += 1;
            }
        }
    }
    let malformed_total = 25 * malformed.len();

    // Oversize lines: answered with an error or dropped, never buffered without end.
    let mut big = vec![b'a'; 70 * 1024];
    big.extend_from_slice(b"\n");
    let mut oversize_handled = 0;
    for _ in 0..20 {
        match send(&socket, &big) {
            Some(l) if l.contains("error") => oversize_handled += 1,
            None => oversize_handled += 1, // connection closed on us: also bounded
            Some(_) => {}
        }
    }

    // Wrong-passphrase burst: each must be refused (wrong, or locked out).
    let mut wrong_refused = 0;
    let mut retry_after_seen = false;
    for _ in 0..20 {
        if let Some(l) = send(&socket, b"{\"cmd\":\"unlock\",\"passphrase\":\"wrong\"}\n") {
            if l.contains("\"success\":false") {
                wrong_refused += 1;
            }
            retry_after_seen |= l.contains("retry_after");
        }
    }

    // The attacker: stalled clients (half a line, then nothing) and the flood of
    // CONNS connections held open, from a thread running as ATTACKER_UID.
    let t = Instant::now();
    let attack = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            // A raw per-thread setresuid: the other threads stay root.
            let uid = rustix::process::Uid::from_raw(attacker);
            rustix::thread::set_thread_res_uid(uid, uid, uid).expect("setresuid(ATTACKER_UID)");
            let stalled: Vec<UnixStream> = (0..50)
                .filter_map(|_| {
                    let mut s = UnixStream::connect(&socket).ok()?;
                    s.write_all(b"{\"cmd\":\"sta").ok()?;
                    Some(s)
                })
                .collect();
            let mut flood = Vec::with_capacity(conns);
            let mut refused = 0;
            for _ in 0..conns {
                match UnixStream::connect(&socket) {
                    Ok(s) => flood.push(s),
                    Err(_) => refused += 1,
                }
            }
            (stalled, flood, refused)
        })
    };
    let (stalled, flood, refused) = attack.join().expect("attacker thread");
    let flood_ms = t.elapsed().as_millis();

    let rest = Duration::from_secs_f64(secs).saturating_sub(t.elapsed());
    std::thread::sleep(rest);
    // What became of the held connections: closed by the server (bounded) or open,
    // and why, by the error line that came before the end of the stream: refused at
    // accept (the uid may run nothing, its share of slots is taken, or all are) or
    // cut off by the read timeout.
    let mut closed_by_server = 0;
    let mut why: std::collections::BTreeMap<&str, usize> = Default::default();
    for mut s in flood.into_iter().chain(stalled) {
        s.set_read_timeout(Some(Duration::from_millis(2))).ok();
        let mut b = [0u8; 512];
        let mut said = Vec::new();
        for _ in 0..4 {
            match s.read(&mut b) {
                Ok(0) => {
                    closed_by_server += 1;
                    let said = String::from_utf8_lossy(&said);
                    let reason = if said.contains("may run no command") {
                        "no_command"
                    } else if said.contains("too many connections from uid") {
                        "uid_share"
                    } else if said.contains("too many connections") {
                        "full"
                    } else if said.contains("not completed in time") {
                        "read_timeout"
                    } else {
                        "silent"
                    };
                    *why.entry(reason).or_default() += 1;
                    break;
                }
                Ok(n) => said.extend_from_slice(&b[..n]),
                Err(_) => break,
            }
        }
    }
    let why = why
        .iter()
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect::<Vec<_>>()
        .join(",");
    stop.store(true, Ordering::Relaxed);
    probe.join().unwrap();
    let lost = probe_lost.load(Ordering::Relaxed);
    println!(
        "{{\"malformed\":{malformed_total},\"malformed_answered\":{malformed_answered},\"oversize\":20,\"oversize_bounded\":{oversize_handled},\"stalled\":50,\"flood\":{conns},\"flood_refused\":{refused},\"flood_connect_ms\":{flood_ms},\"held_closed_by_server\":{closed_by_server},\"closed_why\":{{{why}}},\"wrong_passphrases\":20,\"wrong_refused\":{wrong_refused},\"retry_after_seen\":{retry_after_seen},\"probe_requests\":{},\"probe_lost\":{lost},\"probe_max_ms\":{:.1}}}",
        probe_sent.load(Ordering::Relaxed),
        probe_max_us.load(Ordering::Relaxed) as f64 / 1000.0
    );
    std::process::exit(if lost == 0 { 0 } else { 1 });
}
