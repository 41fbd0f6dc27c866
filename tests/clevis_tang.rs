//! clevis tokens against a real Tang: Debian's `tangd` (started per test through
//! socat on a loopback port, keys from `tangd-keygen`), LUKS2 images bound with
//! the real `clevis luks bind`, opened by `vaultguard unlock --test`; and the
//! engine against hostile servers (a thread in this process) and an offline Tang,
//! each failing with one clear line within the deadline.
//!
//! Needs `clevis`, `clevis-luks`, `tang`, `socat`, `cryptsetup` (Debian packages);
//! without them the tests fail.

mod common;

use common::{luks_image, run, run_with_input, vaultguard_bin, TempDir};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use vaultguard::clevis::{self, ClevisToken, EngineOptions};

const PASS: &str = "correct horse battery staple";

/// A real tangd, one per test, on a free loopback port.
struct Tangd {
    keys: PathBuf,
    port: u16,
    child: Child,
}

impl Tangd {
    fn start(dir: &Path) -> Tangd {
        let keys = dir.join("tang-keys");
        std::fs::create_dir_all(&keys).unwrap();
        run(Command::new("/usr/libexec/tangd-keygen").arg(&keys));
        for _ in 0..20 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if let Some(t) = Tangd::try_serve(keys.clone(), port) {
                return t;
            }
        }
        panic!("tangd did not start");
    }

    /// Serve `keys` on `port` (a restart keeps the URL the bindings recorded).
    fn serve(keys: PathBuf, port: u16) -> Tangd {
        Tangd::try_serve(keys, port).unwrap_or_else(|| panic!("tangd did not start on {port}"))
    }

    /// The listening socket must be this socat's: a connection alone could reach
    /// another test's server that took the port after it was chosen.
    fn try_serve(keys: PathBuf, port: u16) -> Option<Tangd> {
        let mut child = Command::new("socat")
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"))
            .arg(format!("EXEC:/usr/libexec/tangd {}", keys.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (Debian package socat)");
        let t0 = Instant::now();
        while !common::listens_on(child.id(), port) {
            if t0.elapsed() > Duration::from_secs(10) || !matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Tangd { keys, port, child })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn key_files(&self, op: &str) -> Vec<PathBuf> {
        key_files(&self.keys, op)
    }
}

/// The key files in `dir` whose JWK has `op` in key_ops (`sign`, `deriveKey`).
fn key_files(dir: &Path, op: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        if v["key_ops"]
            .as_array()
            .is_some_and(|a| a.iter().any(|o| o == op))
        {
            out.push(p);
        }
    }
    out
}

impl Drop for Tangd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn clevis_bind(img: &Path, pin: &str, cfg: &str) {
    run_with_input(
        Command::new("clevis")
            .args(["luks", "bind", "-y", "-k", "-", "-d"])
            .arg(img)
            .args([pin, cfg]),
        PASS.as_bytes(),
    );
}

fn unlock_test(dir: &Path, img: &Path, config: &str) -> (Output, Duration) {
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, config).unwrap();
    let t0 = Instant::now();
    let out = Command::new(vaultguard_bin())
        .arg("--config")
        .arg(&cfg)
        .args(["unlock", "--test", "--no-tpm", "--headless", "--device"])
        .arg(img)
        .output()
        .unwrap();
    (out, t0.elapsed())
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn token_json(img: &Path, id: u32) -> Value {
    let out = run(Command::new("cryptsetup")
        .args(["token", "export", "--token-id", &id.to_string()])
        .arg(img));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn tang_binding_made_by_clevis_opens_with_vaultguard() {
    let d = TempDir::new("clevis-tang");
    let tang = Tangd::start(d.path());
    let img = luks_image(d.path(), PASS);
    clevis_bind(&img, "tang", &format!("{{\"url\":\"{}\"}}", tang.url()));
    let (out, _) = unlock_test(d.path(), &img, "{}");
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("the clevis token opens keyslot 1 of"),
        "keyslot 1 is clevis': {t}"
    );
    assert!(
        t.contains(&format!("clevis token 0 tang {}: answered", tang.url())),
        "{t}"
    );
}

#[test]
fn sss_of_two_tangs_threshold_one_opens_with_one_offline() {
    let d = TempDir::new("clevis-sss");
    let a = Tangd::start(&d.path().join("a"));
    let mut b = Tangd::start(&d.path().join("b"));
    let img = luks_image(d.path(), PASS);
    let cfg = format!(
        "{{\"t\":2,\"pins\":{{\"tang\":[{{\"url\":\"{}\"}},{{\"url\":\"{}\"}}]}}}}",
        a.url(),
        b.url()
    );
    clevis_bind(&img, "sss", &cfg);
    let (out, _) = unlock_test(d.path(), &img, "{}");
    assert!(out.status.success(), "t=2, both up: {}", text(&out));
    assert!(
        text(&out).contains("clevis token 0 sss t=2: answered"),
        "{}",
        text(&out)
    );

    // t=1 of the same two: one server down is enough to still open.
    let img1 = {
        let d1 = d.path().join("one");
        std::fs::create_dir_all(&d1).unwrap();
        luks_image(&d1, PASS)
    };
    let cfg = cfg.replace("\"t\":2", "\"t\":1");
    clevis_bind(&img1, "sss", &cfg);
    b.stop();
    let (out, _) = unlock_test(d.path(), &img1, "{}");
    let t = text(&out);
    assert!(out.status.success(), "t=1 with b down: {t}");
    assert!(t.contains("the clevis token opens keyslot 1"), "{t}");

    // t=2 with b down: refused, naming b and why.
    let (out, took) = unlock_test(d.path(), &img, r#"{"clevis":{"deadline":3}}"#);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "sss[1] tang {}: {}: connection refused",
            b.url(),
            b.url()
        )) || t.contains(&format!(
            "sss[0] tang {}: {}: connection refused",
            b.url(),
            b.url()
        )),
        "{t}"
    );
    assert!(
        t.contains("1 of its 2 pins failed, 2 needed: cannot open"),
        "{t}"
    );
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[test]
fn rotated_tang_keys_still_open_the_old_binding() {
    let d = TempDir::new("clevis-rotate");
    let mut tang = Tangd::start(d.path());
    let img = luks_image(d.path(), PASS);
    clevis_bind(&img, "tang", &format!("{{\"url\":\"{}\"}}", tang.url()));
    // Rotation as tang documents it: old keys renamed to hidden `.`-files (still
    // used for recovery, no longer advertised), new ones generated.
    tang.stop();
    let old: Vec<PathBuf> = std::fs::read_dir(&tang.keys)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for p in &old {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        std::fs::rename(p, tang.keys.join(format!(".{name}"))).unwrap();
    }
    run(Command::new("/usr/libexec/tangd-keygen").arg(&tang.keys));
    let tang = Tangd::serve(tang.keys.clone(), tang.port);
    let adv = run(Command::new("curl").args(["-s", &format!("{}/adv", tang.url())]));
    let adv: Value = serde_json::from_slice(&adv.stdout).unwrap();
    let token = token_json(&img, 0);
    let kid = jwe_header(&token)["kid"].as_str().unwrap().to_string();
    let advertised: Vec<String> = vaultguard::clevis::tang::adv_keys(&adv)
        .unwrap()
        .iter()
        .map(|k| {
            vaultguard::clevis::jwk::EcJwk::from_json(k)
                .unwrap()
                .thumbprint()
        })
        .collect();
    assert!(
        !advertised.contains(&kid),
        "the bound exchange key {kid} is no longer advertised: {advertised:?}"
    );
    let (out, _) = unlock_test(d.path(), &img, "{}");
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("the clevis token opens keyslot 1"), "{t}");
}

#[test]
fn advertisement_signed_by_an_unknown_key_is_refused() {
    let d = TempDir::new("clevis-unknown-signer");
    let mut tang = Tangd::start(d.path());
    let img = luks_image(d.path(), PASS);
    clevis_bind(&img, "tang", &format!("{{\"url\":\"{}\"}}", tang.url()));
    // Same exchange key (recovery would work), but the signing key replaced by one
    // nobody enrolled: the server is not the one bound and must not be used.
    tang.stop();
    for p in tang.key_files("sign") {
        std::fs::remove_file(p).unwrap();
    }
    let fresh = d.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    run(Command::new("/usr/libexec/tangd-keygen").arg(&fresh));
    for p in key_files(&fresh, "sign") {
        std::fs::copy(&p, tang.keys.join(p.file_name().unwrap())).unwrap();
    }
    let tang = Tangd::serve(tang.keys.clone(), tang.port);
    let (out, took) = unlock_test(d.path(), &img, "{}");
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "clevis token 0 tang {}: wrong thumbprint: {}: advertisement not signed by a key recorded at enrolment",
            tang.url(),
            tang.url()
        )),
        "{t}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    // With the new key's thumbprint trusted by the operator it opens again.
    let thp = key_files(&fresh, "sign")[0]
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let (out, _) = unlock_test(
        d.path(),
        &img,
        &format!("{{\"clevis\":{{\"tang_thumbprints\":[\"{thp}\"]}}}}"),
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn tang_offline_returns_within_the_deadline_naming_the_pin() {
    let d = TempDir::new("clevis-offline");
    let mut tang = Tangd::start(d.path());
    let img = luks_image(d.path(), PASS);
    clevis_bind(&img, "tang", &format!("{{\"url\":\"{}\"}}", tang.url()));
    tang.stop();
    let (out, took) = unlock_test(d.path(), &img, r#"{"clevis":{"deadline":2}}"#);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "clevis token 0 tang {}: {}: connection refused",
            tang.url(),
            tang.url()
        )),
        "{t}"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

fn jwe_header(token: &Value) -> Value {
    let p = token["jwe"]["protected"].as_str().unwrap();
    serde_json::from_slice(&clevis::b64::decode(p, "p").unwrap()).unwrap()
}

/// The token of a real binding with its Tang URL pointed elsewhere (the header
/// is authenticated, but a hostile server fails the pin before decryption).
fn token_for(img: &Path, url: &str) -> ClevisToken {
    let mut token = token_json(img, 0);
    let mut hdr = jwe_header(&token);
    hdr["clevis"]["tang"]["url"] = Value::String(url.to_string());
    token["jwe"]["protected"] = Value::String(clevis::b64::encode(hdr.to_string().as_bytes()));
    ClevisToken::from_json(0, &token).unwrap()
}

/// A server thread answering every connection with `answer(request)`.
fn hostile(answer: impl Fn(&str) -> Option<Vec<u8>> + Send + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = vec![0u8; 65536];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            match answer(&req) {
                Some(resp) => {
                    let _ = s.write_all(&resp);
                }
                // Accept and never answer: hold the connection open.
                None => std::mem::forget(s),
            }
        }
    });
    url
}

#[test]
fn hostile_servers_fail_one_pin_each_within_the_deadline() {
    let d = TempDir::new("clevis-hostile");
    let tang = Tangd::start(d.path());
    let img = luks_image(d.path(), PASS);
    clevis_bind(&img, "tang", &format!("{{\"url\":\"{}\"}}", tang.url()));
    let real_adv = run(Command::new("curl").args(["-s", &format!("{}/adv", tang.url())])).stdout;
    let ok = |body: &[u8]| {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/jose+json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let adv1 = real_adv.clone();
    let silent = hostile(|_| None);
    let redirect = hostile(|_| {
        Some(b"HTTP/1.1 301 Moved\r\nLocation: http://elsewhere.example/\r\nContent-Length: 0\r\n\r\n".to_vec())
    });
    let huge = hostile(|_| {
        let mut r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..200 {
            r.extend_from_slice(b"400\r\n");
            r.extend_from_slice(&[b'x'; 1024]);
            r.extend_from_slice(b"\r\n");
        }
        Some(r)
    });
    let truncated =
        hostile(|_| Some(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"payload\":".to_vec()));
    let off_curve = hostile(move |req| {
        if req.starts_with("GET") {
            return Some(ok(&adv1));
        }
        // A valid-looking P-521 JWK whose point is not on the curve.
        let coord = clevis::b64::encode(&[1u8; 66]);
        Some(ok(format!(
            "{{\"kty\":\"EC\",\"crv\":\"P-521\",\"x\":\"{coord}\",\"y\":\"{coord}\"}}"
        )
        .as_bytes()))
    });
    let cases = [
        (silent.clone(), "timed out"),
        (redirect, "redirect 301 to http://elsewhere.example/"),
        (huge, "larger than 65536 bytes"),
        (truncated, "truncated"),
        (off_curve, "not on curve P-521"),
    ];
    let tokens: Vec<ClevisToken> = cases
        .iter()
        .enumerate()
        .map(|(i, (url, _))| {
            let mut t = token_for(&img, url);
            t.id = i as u32;
            t
        })
        .collect();
    let t0 = Instant::now();
    let out = clevis::open_tokens::<()>(
        tokens,
        &EngineOptions::new(Duration::from_secs(2)),
        |_, _| panic!("no hostile server may yield a key"),
    );
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    assert!(out.opened.is_none());
    assert_eq!(out.lines.len(), cases.len(), "{:?}", out.lines);
    for (i, (url, want)) in cases.iter().enumerate() {
        let line = out
            .lines
            .iter()
            .find(|l| l.token == i as u32)
            .unwrap()
            .to_string();
        assert!(
            line.contains(url.as_str()) && line.contains(want),
            "case {i}: {line}"
        );
    }

    // A malformed JWE beside a good token: the good one still opens.
    let mut bad = token_json(&img, 0);
    bad["jwe"]["protected"] = Value::String("!!!".into());
    assert!(ClevisToken::from_json(1, &bad).is_err());
    let good = ClevisToken::from_json(0, &token_json(&img, 0)).unwrap();
    let mut unsupported = good.clone();
    unsupported.id = 1;
    unsupported.jwe.header["alg"] = Value::String("ECDH-ES+A128KW".into());
    let out = clevis::open_tokens(
        vec![unsupported, good],
        &EngineOptions::new(Duration::from_secs(5)),
        |t, pass| {
            let got = Command::new("cryptsetup")
                .args(["open", "--test-passphrase", "--key-file", "-"])
                .arg(&img)
                .stdin(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    c.stdin.take().unwrap().write_all(pass.as_bytes())?;
                    c.wait()
                })
                .map_err(|e| e.to_string())?;
            Ok(got.success().then_some(t.id))
        },
    );
    assert_eq!(out.opened.map(|o| o.0), Some(0), "{:?}", out.lines);
    let l = out.lines.iter().find(|l| l.token == 1).unwrap().to_string();
    assert!(
        l.contains("unsupported: tang JWE alg \"ECDH-ES+A128KW\""),
        "{l}"
    );
}

fn enroll_tang(dir: &Path, img: &Path, extra: &[&str]) -> Output {
    let pw = dir.join("pw");
    std::fs::write(&pw, PASS).unwrap();
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, "{}").unwrap();
    Command::new(vaultguard_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("enroll")
        .args(extra)
        .arg("--unlock-passphrase-file")
        .arg(&pw)
        .arg(img)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn signing_thumbprint(t: &Tangd) -> String {
    t.key_files("sign")[0]
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .to_string()
}

/// `clevis luks pass` prints the passphrase clevis recovers from the token of
/// `slot`; cryptsetup checks it opens that keyslot.
fn clevis_pass_opens(img: &Path, slot: u32) {
    let out = run(Command::new("clevis")
        .args(["luks", "pass", "-d"])
        .arg(img)
        .args(["-s", &slot.to_string()]));
    assert_eq!(out.stdout.len(), 43, "clevis' passphrase shape");
    run_with_input(
        Command::new("cryptsetup")
            .args([
                "open",
                "--test-passphrase",
                "--key-slot",
                &slot.to_string(),
                "--key-file",
                "-",
            ])
            .arg(img),
        &out.stdout,
    );
}

#[test]
fn vaultguard_tang_enrolment_opens_with_clevis() {
    let d = TempDir::new("clevis-enroll");
    let tang = Tangd::start(d.path());
    let img = luks_image(d.path(), PASS);
    // Not trusted, no terminal to ask: refused, naming the thumbprint to check.
    let out = enroll_tang(d.path(), &img, &["--tang", &tang.url()]);
    let thp = signing_thumbprint(&tang);
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("its signing keys ({thp}) were not confirmed")),
        "{}",
        text(&out)
    );
    assert!(token_list(&img).is_empty(), "nothing written");
    let out = enroll_tang(
        d.path(),
        &img,
        &["--tang", &tang.url(), "--tang-thumbprint", &thp],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("(tang): keyslot 1, clevis token 0"),
        "{}",
        text(&out)
    );
    let list = run(Command::new("clevis")
        .args(["luks", "list", "-d"])
        .arg(&img));
    assert_eq!(
        String::from_utf8_lossy(&list.stdout).trim(),
        format!("1: tang '{{\"url\":\"{}\"}}'", tang.url())
    );
    clevis_pass_opens(&img, 1);
    // And vaultguard opens its own binding.
    let (out, _) = unlock_test(d.path(), &img, "{}");
    assert!(
        text(&out).contains("the clevis token opens keyslot 1"),
        "{}",
        text(&out)
    );
}

#[test]
fn vaultguard_sss_enrolment_of_two_tangs_opens_with_clevis() {
    let d = TempDir::new("clevis-enroll-sss");
    let a = Tangd::start(&d.path().join("a"));
    let mut b = Tangd::start(&d.path().join("b"));
    let img = luks_image(d.path(), PASS);
    let out = enroll_tang(
        d.path(),
        &img,
        &[
            "--tang",
            &a.url(),
            "--tang",
            &b.url(),
            "--threshold",
            "2",
            "--tang-thumbprint",
            &signing_thumbprint(&a),
            "--tang-thumbprint",
            &signing_thumbprint(&b),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("(sss t=2 of 2)"), "{}", text(&out));
    let list = run(Command::new("clevis")
        .args(["luks", "list", "-d"])
        .arg(&img));
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(
        list.starts_with("1: sss '{\"t\":2,\"pins\":{\"tang\":["),
        "{list}"
    );
    clevis_pass_opens(&img, 1);
    // t=2: with b down neither clevis nor vaultguard may open it.
    b.stop();
    let out = Command::new("clevis")
        .args(["luks", "pass", "-d"])
        .arg(&img)
        .args(["-s", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success() || out.stdout.is_empty());
    let (out, _) = unlock_test(d.path(), &img, r#"{"clevis":{"deadline":2}}"#);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("1 of its 2 pins failed, 2 needed"),
        "{}",
        text(&out)
    );
}

fn token_list(img: &Path) -> Vec<String> {
    let out = run(Command::new("cryptsetup")
        .args(["luksDump", "--dump-json-metadata"])
        .arg(img));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["tokens"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn clevis_bind_tpm(img: &Path, sw: &common::Swtpm, cfg: &str) {
    run_with_input(
        Command::new("clevis")
            .args(["luks", "bind", "-y", "-k", "-", "-d"])
            .arg(img)
            .args(["sss", cfg])
            .env("TPM2TOOLS_TCTI", sw.tcti()),
        PASS.as_bytes(),
    );
}

#[test]
fn sss_of_tang_and_clevis_tpm2_pin_opens_and_names_a_pcr_change() {
    let d = TempDir::new("clevis-tpm2");
    let mut sw = common::Swtpm::start();
    let tang = Tangd::start(d.path());
    let both = luks_image(&d.path().join("both").tap_mkdir(), PASS);
    let either = luks_image(&d.path().join("either").tap_mkdir(), PASS);
    let cfg = |t: u32| {
        format!(
            "{{\"t\":{t},\"pins\":{{\"tang\":[{{\"url\":\"{}\"}}],\"tpm2\":{{\"pcr_ids\":\"7\",\"pcr_bank\":\"sha256\"}}}}}}",
            tang.url()
        )
    };
    clevis_bind_tpm(&both, &sw, &cfg(2));
    clevis_bind_tpm(&either, &sw, &cfg(1));
    let config = format!("{{\"tpm\":{{\"tcti\":\"{}\"}}}}", sw.tcti());
    let unlock = |img: &Path| {
        let cfgp = d.path().join("tpm-config.json");
        std::fs::write(&cfgp, &config).unwrap();
        Command::new(vaultguard_bin())
            .arg("--config")
            .arg(&cfgp)
            .args(["unlock", "--test", "--headless", "--device"])
            .arg(img)
            .output()
            .unwrap()
    };
    let out = unlock(&both);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("clevis token 0 sss[1] tpm2: answered"),
        "the TPM unsealed its share: {t}"
    );
    assert!(
        t.contains(&format!(
            "clevis token 0 sss[0] tang {}: answered",
            tang.url()
        )),
        "{t}"
    );

    // PCR 7 moves (a Secure Boot change): the tpm2 share is refused, naming PCR 7;
    // t=2 cannot open, t=1 still opens through Tang.
    sw.tool(
        "tpm2_pcrextend",
        &["7:sha256=0000000000000000000000000000000000000000000000000000000000000001"],
    );
    let out = unlock(&both);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("clevis token 0 sss[1] tpm2: TPM refused:"),
        "{t}"
    );
    assert!(t.contains("PCR"), "the refusal names the PCR policy: {t}");
    assert!(t.contains("1 of its 2 pins failed, 2 needed"), "{t}");
    let out = unlock(&either);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("the clevis token opens keyslot 1"), "{t}");
}

trait TapMkdir {
    fn tap_mkdir(self) -> PathBuf;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn vaultguard_sss_of_tpm2_and_tang_opens_with_clevis_and_tpm2_tools() {
    let d = TempDir::new("clevis-enroll-tpm2");
    let sw = common::Swtpm::start();
    let tang = Tangd::start(d.path());
    let img = luks_image(d.path(), PASS);
    let pw = d.path().join("pw");
    std::fs::write(&pw, PASS).unwrap();
    let cfg = d.path().join("tpm-config.json");
    std::fs::write(&cfg, format!("{{\"tpm\":{{\"tcti\":\"{}\"}}}}", sw.tcti())).unwrap();
    let out = Command::new(vaultguard_bin())
        .arg("--config")
        .arg(&cfg)
        .args(["enroll", "--tpm2", "--pcrs", "7", "--tang", &tang.url()])
        .args([
            "--tang-thumbprint",
            &signing_thumbprint(&tang),
            "--threshold",
            "2",
        ])
        .arg("--unlock-passphrase-file")
        .arg(&pw)
        .arg(&img)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("(sss t=2 of 2): keyslot 1, clevis token 0"),
        "{}",
        text(&out)
    );
    let list = run(Command::new("clevis")
        .args(["luks", "list", "-d"])
        .arg(&img));
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(
        list.contains("\"tpm2\":[{\"hash\":\"sha256\",\"key\":\"ecc\""),
        "{list}"
    );
    assert!(list.contains("\"pcr_ids\":\"7\""), "{list}");
    // clevis (tpm2-tools against the same swtpm, Tang) recovers the passphrase.
    let pass = run(Command::new("clevis")
        .args(["luks", "pass", "-d"])
        .arg(&img)
        .args(["-s", "1"])
        .env("TPM2TOOLS_TCTI", sw.tcti()));
    assert_eq!(pass.stdout.len(), 43);
    run_with_input(
        Command::new("cryptsetup")
            .args([
                "open",
                "--test-passphrase",
                "--key-slot",
                "1",
                "--key-file",
                "-",
            ])
            .arg(&img),
        &pass.stdout,
    );
    let out = Command::new(vaultguard_bin())
        .arg("--config")
        .arg(&cfg)
        .args(["unlock", "--test", "--headless", "--device"])
        .arg(&img)
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("clevis token 0 sss[1] tpm2: answered"), "{t}");
}

#[test]
fn a_tang_token_opens_while_the_tpm_token_still_waits_for_its_device() {
    // A volume with a systemd-tpm2 token (the TPM) and a clevis tang token: every
    // token starts at once, so with the TPM device missing (here: a device node
    // that never appears, tpm.timeout 40 s) Tang opens the volume in seconds and
    // the TPM wait ends there, instead of Tang starting after 40 s.
    let d = TempDir::new("clevis-beside-tpm");
    let sw = common::Swtpm::start();
    let tang = Tangd::start(d.path());
    let img = luks_image(d.path(), PASS);
    let pw = d.path().join("pw");
    std::fs::write(&pw, PASS).unwrap();
    let enrol_cfg = d.path().join("enrol.json");
    std::fs::write(
        &enrol_cfg,
        format!("{{\"tpm\":{{\"tcti\":\"{}\",\"pcrs\":[7]}}}}", sw.tcti()),
    )
    .unwrap();
    let out = Command::new(vaultguard_bin())
        .arg("--config")
        .arg(&enrol_cfg)
        .args(["enroll", "--unlock-passphrase-file"])
        .arg(&pw)
        .arg(&img)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    clevis_bind(&img, "tang", &format!("{{\"url\":\"{}\"}}", tang.url()));
    let missing = d.path().join("no-tpm-here");
    let cfg = d.path().join("config.json");
    std::fs::write(
        &cfg,
        format!(
            "{{\"tpm\":{{\"tcti\":\"device:{}\",\"timeout\":40}}}}",
            missing.display()
        ),
    )
    .unwrap();
    let t0 = Instant::now();
    let out = Command::new(vaultguard_bin())
        .arg("--config")
        .arg(&cfg)
        .args(["unlock", "--test", "--headless", "--device"])
        .arg(&img)
        .output()
        .unwrap();
    let took = t0.elapsed();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains(&format!("tang {}: answered", tang.url())),
        "the tang pin answered: {t}"
    );
    assert!(
        t.contains("not waited for: another token opened the volume"),
        "{t}"
    );
    assert!(
        took < Duration::from_secs(20),
        "Tang waited for the TPM device: {took:?}\n{t}"
    );
}
