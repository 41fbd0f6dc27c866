//! The configuration file, then rd.vaultguard.* options from a kernel command line
//! (the input's part after the first NUL byte).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vaultguard::config::Config;

fuzz_target!(|data: &[u8]| {
    let (json, cmdline) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(json) = std::str::from_utf8(json) else {
        return;
    };
    let mut cfg = match Config::from_json(json, "fuzz") {
        Ok(c) => c,
        Err(_) => Config::default(),
    };
    let _ = cfg.apply_cmdline(&String::from_utf8_lossy(cmdline));
    let _ = cfg.validate();
});
