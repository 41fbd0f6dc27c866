//! Load generator for a control socket: N clients, each on its own connection,
//! send `{"cmd":"status"}` lines one at a time (request, wait for the reply line)
//! for a fixed time. Prints requests per second and latency percentiles as one JSON
//! line, so qemu-tests/bench.sh can put the figures side by side.
//!
//!   cargo bench --bench socket_load -- SOCKET CLIENTS SECONDS [TOKENS]
//!
//! With TOKENS (a file of bearer tokens, one per line, as `vaultguard token issue`
//! prints them), client i sends token i mod n as `"token"` in every request, so
//! each client is its own identity and every request is authenticated by token.
//!
//! Works against anything that answers one JSON line per request line (vaultguard
//! supervise, the Python watchdog of the benchmark).
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if !(3..=4).contains(&args.len()) {
        eprintln!("usage: socket_load SOCKET CLIENTS SECONDS [TOKENS]");
        std::process::exit(2);
    }
    let tokens: Vec<String> = match args.get(3) {
        None => Vec::new(),
        Some(p) => std::fs::read_to_string(p)
            .unwrap_or_else(|e| {
                eprintln!("socket_load: cannot read the tokens file {p}: {e}");
                std::process::exit(2)
            })
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    if args.len() == 4 && tokens.is_empty() {
        eprintln!("socket_load: no token in {}", args[3]);
        std::process::exit(2);
    }
    let socket = args[0].clone();
    let clients: usize = args[1].parse().expect("CLIENTS");
    let secs: f64 = args[2].parse().expect("SECONDS");
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|i| {
            let socket = socket.clone();
            let request = match tokens.get(i % tokens.len().max(1)) {
                Some(t) => format!("{{\"cmd\":\"status\",\"token\":\"{t}\"}}\n"),
                None => "{\"cmd\":\"status\"}\n".to_string(),
            };
            std::thread::spawn(move || -> Result<(Vec<u32>, usize), String> {
                let stream = UnixStream::connect(&socket).map_err(|e| format!("connect: {e}"))?;
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .map_err(|e| e.to_string())?;
                let mut w = stream.try_clone().map_err(|e| e.to_string())?;
                let mut r = BufReader::new(stream);
                let mut lat = Vec::with_capacity(1 << 16);
                let mut errors = 0;
                let mut line = String::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    w.write_all(request.as_bytes())
                        .map_err(|e| format!("write: {e}"))?;
                    line.clear();
                    let n = r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
                    if n == 0 {
                        return Err("server closed the connection".into());
                    }
                    if !line.contains("\"state\"") {
                        errors += 1;
                    }
                    lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                Ok((lat, errors))
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    let mut failed = Vec::new();
    for w in workers {
        match w.join().expect("worker panicked") {
            Ok((lat, e)) => {
                all.extend(lat);
                errors += e;
            }
            Err(e) => failed.push(e),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> u32 {
        if all.is_empty() {
            0
        } else {
            all[((all.len() as f64 * p) as usize).min(all.len() - 1)]
        }
    };
    println!(
        "{{\"clients\":{clients},\"tokens\":{},\"requests\":{},\"per_second\":{:.0},\"p50_us\":{},\"p99_us\":{},\"max_us\":{},\"bad_replies\":{errors},\"failed_clients\":{}}}",
        tokens.len(),
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        all.last().copied().unwrap_or(0),
        failed.len()
    );
    if !failed.is_empty() {
        eprintln!(
            "socket_load: {} client(s) failed: {}",
            failed.len(),
            failed[0]
        );
    }
}
