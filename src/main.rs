//! Entry point: parse arguments, load the configuration, dispatch.

use std::path::Path;
use std::process::ExitCode;
use vaultguard::cli::{Args, Command};
use vaultguard::config::{self, Config};

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vaultguard: {e}");
            ExitCode::from(1)
        }
    }
}

fn load_config(args: &Args) -> Result<Config, Box<dyn std::error::Error>> {
    let (path, explicit) = match &args.config {
        Some(p) => (p.as_path(), true),
        None => (Path::new(config::DEFAULT_PATH), false),
    };
    let mut cfg = Config::load(path, explicit)?;
    if let Some(cmdline) = &args.cmdline {
        let text = std::fs::read_to_string(cmdline)
            .map_err(|e| format!("cannot read {}: {e}", cmdline.display()))?;
        for w in cfg.apply_cmdline(&text) {
            eprintln!("vaultguard: {w}");
        }
    }
    Ok(cfg)
}

fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match &args.command {
        Command::Config(_) => {
            let cfg = load_config(&args)?;
            println!("{}", serde_json::to_string_pretty(&cfg)?);
        }
        Command::Version(_) => {
            println!("vaultguard {}", env!("CARGO_PKG_VERSION"));
        }
    }
    Ok(ExitCode::SUCCESS)
}
