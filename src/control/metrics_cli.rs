//! `vaultguard metrics`: ask the supervisor for `{"cmd":"metrics"}` and print the
//! Prometheus text exposition it answers, as is (for a scrape by hand, or a cron
//! job that writes a textfile where `metrics.textfile_dir` is not set). With
//! `--json`, the supervisor's own answer shape instead:
//! `{"success":true,"metrics":"<text>"}`, or the failure object of
//! [`crate::exit::json_error`].

use super::client;
use crate::config::Config;
use std::process::ExitCode;
use std::time::Duration;

pub fn run(cfg: &Config, json: bool) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let reply = client::request(
        &cfg.control.socket,
        b"{\"cmd\":\"metrics\"}\n",
        Duration::from_secs(30),
    )?;
    match reply.value.get("metrics").and_then(|m| m.as_str()) {
        Some(text) if reply.success() => {
            if json {
                println!("{}", serde_json::json!({"success": true, "metrics": text}));
            } else {
                print!("{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            let err = reply
                .value
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("no metrics in the answer");
            let exit = crate::exit::Exit::Error;
            if json {
                println!("{}", crate::exit::json_error(err, exit));
            } else {
                eprintln!("vaultguard: metrics: {err}");
            }
            Ok(exit.into())
        }
    }
}
