//! clevis LUKS2 tokens (`"type": "clevis"`): read them, and open them with every
//! pin at once under one deadline.
//!
//! What clevis 19 (`clevis luks bind`) writes is what is read here: a token whose
//! `jwe` is a flattened JWE, its protected header naming the pin in
//! `clevis.pin` — `tang` (`tang.rs`), `sss` (`sss.rs`, nested to any depth) or
//! `tpm2` (decrypted by the caller's TPM code, see [`TpmPin`]). The JWE's plaintext
//! is the LUKS passphrase of the token's keyslot.
//!
//! The engine ([`open_tokens`]) is what makes this better than clevis at boot:
//! every leaf pin of every token starts at once on its own thread (TPM pins are
//! serialised among themselves — one device — but never wait for the network);
//! each sss node combines as soon as `t` of its children answered; the first token
//! whose key opens a keyslot wins, and the rest are abandoned (their threads end
//! at the deadline at the latest, holding nothing of the key that opened). After
//! the deadline, or when every pin has answered, the caller gets one line per pin
//! saying what happened (connection refused, no route, timed out, wrong
//! thumbprint, TPM policy refused …) to show above the passphrase prompt.
//!
//! Boot-path API (for the route wait in `boot`): call [`open_tokens`] with an
//! [`EngineOptions`] whose `deadline` is the instant the whole network wait ends
//! (`clevis.deadline`, default 10 s, `rd.vaultguard.clevis.deadline=`); a route
//! wait before it should use the same instant, so the total stays bounded.
//!
//! Never: logs a key, a share, a blinding scalar or a plaintext; follows a redirect;
//! retries past the deadline.

pub mod enroll;
pub mod gcry;
pub mod http;
pub mod jwe;
pub mod jwk;
pub mod sss;
pub mod tang;
pub mod tpm2pin;

use crate::secret::SecretBytes;
use jwe::Jwe;
use serde_json::Value;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const TOKEN_TYPE: &str = "clevis";
/// Default of `clevis.deadline`, seconds.
pub const DEFAULT_DEADLINE_SECS: u64 = 10;
/// How long past the deadline the engine listens for the pins' own timeouts.
const REPORT_GRACE: Duration = Duration::from_millis(150);

/// Why a pin or token could not be used. Each message names the failure for the
/// operator; none carries key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClevisError {
    Malformed(String),
    Unsupported(String),
    Crypto(String),
    /// The server's advertisement is not signed by a key we trust.
    Untrusted(String),
    Http(String, http::HttpError),
    Tpm(String),
}

impl std::fmt::Display for ClevisError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClevisError::Malformed(m) => write!(f, "malformed: {m}"),
            ClevisError::Unsupported(m) => write!(f, "unsupported: {m}"),
            ClevisError::Crypto(m) => write!(f, "{m}"),
            ClevisError::Untrusted(m) => write!(f, "wrong thumbprint: {m}"),
            ClevisError::Http(url, e) => write!(f, "{url}: {e}"),
            ClevisError::Tpm(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for ClevisError {}

/// base64url without padding (RFC 7515 §2), through the `base64` crate already
/// linked (no second base64 implementation in the binary); padding is tolerated
/// on input because some JOSE writers add it.
pub mod b64 {
    use super::ClevisError;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;

    pub fn encode(b: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    pub fn decode(s: &str, what: &str) -> Result<Vec<u8>, ClevisError> {
        URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map_err(|e| ClevisError::Malformed(format!("{what} is not base64url: {e}")))
    }
}

/// A clevis LUKS2 token.
#[derive(Debug, Clone)]
pub struct ClevisToken {
    pub id: u32,
    pub keyslots: Vec<u32>,
    pub jwe: Jwe,
}

impl ClevisToken {
    pub fn from_json(id: u32, v: &Value) -> Result<ClevisToken, ClevisError> {
        if v.get("type").and_then(Value::as_str) != Some(TOKEN_TYPE) {
            return Err(ClevisError::Malformed("not a clevis token".into()));
        }
        let keyslots = v
            .get("keyslots")
            .and_then(Value::as_array)
            .ok_or_else(|| ClevisError::Malformed("clevis token without keyslots".into()))?
            .iter()
            .map(|k| {
                k.as_str()
                    .and_then(|s| s.parse::<u32>().ok())
                    .filter(|n| *n < 32)
                    .ok_or_else(|| ClevisError::Malformed(format!("bad keyslot {k}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let jwe = Jwe::from_json(
            v.get("jwe")
                .ok_or_else(|| ClevisError::Malformed("clevis token without \"jwe\"".into()))?,
        )?;
        Ok(ClevisToken { id, keyslots, jwe })
    }
}

/// Decrypts a clevis `tpm2` pin's JWE (the caller owns the TPM code). Called on
/// the engine's TPM thread, one at a time.
pub type TpmPin = Arc<dyn Fn(&Jwe) -> Result<SecretBytes, ClevisError> + Send + Sync>;

/// Waits (until the deadline) for a route to a Tang server's URL; `Err` names
/// what was missing. Called on each tang pin's thread before its request, so a
/// lease that arrives after the engine started still reaches the server while
/// a TPM pin beside it has already run (the caller owns the network code).
pub type RouteWait = Arc<dyn Fn(&str, Instant) -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
pub struct EngineOptions {
    /// When the engine stops waiting.
    pub deadline: Instant,
    /// S256 thumbprints of Tang signing keys trusted beyond those in the tokens.
    pub trusted_thumbprints: Vec<String>,
    pub tpm: Option<TpmPin>,
    pub route_wait: Option<RouteWait>,
}

impl EngineOptions {
    pub fn new(wait: Duration) -> EngineOptions {
        EngineOptions {
            deadline: Instant::now() + wait,
            trusted_thumbprints: Vec::new(),
            tpm: None,
            route_wait: None,
        }
    }
}

/// What one pin did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinLine {
    pub token: u32,
    /// Where the pin sits: "" for the token's own pin, "sss[1]", "sss[0].sss[2]".
    pub path: String,
    /// "tang http://…", "tpm2", "sss t=2", or the unknown pin's name.
    pub pin: String,
    /// `Ok(())`: it answered; `Err(reason)`.
    pub outcome: Result<(), String>,
}

impl std::fmt::Display for PinLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = if self.path.is_empty() {
            String::new()
        } else {
            format!(" {}", self.path)
        };
        match &self.outcome {
            Ok(()) => write!(f, "clevis token {}{at} {}: answered", self.token, self.pin),
            Err(e) => write!(f, "clevis token {}{at} {}: {e}", self.token, self.pin),
        }
    }
}

/// The engine's result.
pub struct Outcome<T> {
    /// The token that opened and what `try_key` returned for it.
    pub opened: Option<(u32, T)>,
    pub lines: Vec<PinLine>,
    pub elapsed: Duration,
}

enum Node {
    Leaf(usize),
    Sss {
        pin: sss::SssPin,
        jwe: Box<Jwe>,
        children: Vec<Node>,
        leaf: usize,
    },
}

struct Leaf {
    token: u32,
    path: String,
    pin: String,
    state: Option<Result<SecretBytes, String>>,
}

enum Eval {
    Done(SecretBytes),
    Pending,
    Failed,
}

struct Engine {
    leaves: Vec<Leaf>,
    tx: mpsc::Sender<(usize, Result<SecretBytes, String>)>,
    opts: EngineOptions,
    tpm_lock: Arc<Mutex<()>>,
}

impl Engine {
    fn leaf(&mut self, token: u32, path: &str, pin: String) -> usize {
        self.leaves.push(Leaf {
            token,
            path: path.to_string(),
            pin,
            state: None,
        });
        self.leaves.len() - 1
    }

    fn fail(&mut self, token: u32, path: &str, pin: String, e: ClevisError) -> Node {
        let i = self.leaf(token, path, pin);
        self.leaves[i].state = Some(Err(e.to_string()));
        Node::Leaf(i)
    }

    /// Build the pin tree of one JWE, starting every leaf's thread.
    fn build(&mut self, token: u32, path: &str, jwe: Jwe, depth: usize) -> Node {
        let pin = match jwe.pin() {
            Ok(p) => p.to_string(),
            Err(e) => return self.fail(token, path, "?".into(), e),
        };
        match pin.as_str() {
            "tang" => {
                let tp = match tang::TangPin::from_jwe(&jwe) {
                    Ok(t) => t,
                    Err(e) => return self.fail(token, path, "tang".into(), e),
                };
                let i = self.leaf(token, path, format!("tang {}", tp.url));
                let tx = self.tx.clone();
                let trusted = self.opts.trusted_thumbprints.clone();
                let deadline = self.opts.deadline;
                let route_wait = self.opts.route_wait.clone();
                std::thread::spawn(move || {
                    if let Some(wait) = route_wait {
                        if let Err(e) = wait(&tp.url, deadline) {
                            let _ = tx.send((i, Err(e)));
                            return;
                        }
                    }
                    let r = tp
                        .decrypt(&jwe, &trusted, deadline)
                        .map_err(|e| e.to_string());
                    let _ = tx.send((i, r));
                });
                Node::Leaf(i)
            }
            "tpm2" => {
                let Some(tpm) = self.opts.tpm.clone() else {
                    return self.fail(
                        token,
                        path,
                        "tpm2".into(),
                        ClevisError::Tpm("no TPM available to this unlock".into()),
                    );
                };
                let i = self.leaf(token, path, "tpm2".into());
                let tx = self.tx.clone();
                let lock = self.tpm_lock.clone();
                std::thread::spawn(move || {
                    // One TPM: its pins queue for it, the network pins do not.
                    let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
                    let r = tpm(&jwe).map_err(|e| e.to_string());
                    let _ = tx.send((i, r));
                });
                Node::Leaf(i)
            }
            "sss" => {
                let sp = match sss::SssPin::from_jwe(&jwe) {
                    Ok(s) => s,
                    Err(e) => return self.fail(token, path, "sss".into(), e),
                };
                if depth > 8 {
                    return self.fail(
                        token,
                        path,
                        "sss".into(),
                        ClevisError::Unsupported("sss nested deeper than 8".into()),
                    );
                }
                let leaf = self.leaf(token, path, format!("sss t={}", sp.t));
                let mut children = Vec::new();
                for (k, c) in sp.children.iter().enumerate() {
                    let cpath = if path.is_empty() {
                        format!("sss[{k}]")
                    } else {
                        format!("{path}.sss[{k}]")
                    };
                    children.push(match Jwe::from_compact(c) {
                        Ok(cj) => self.build(token, &cpath, cj, depth + 1),
                        Err(e) => self.fail(token, &cpath, "?".into(), e),
                    });
                }
                Node::Sss {
                    pin: sp,
                    jwe: Box::new(jwe),
                    children,
                    leaf,
                }
            }
            other => self.fail(
                token,
                path,
                other.to_string(),
                ClevisError::Unsupported(format!("clevis pin {other:?}")),
            ),
        }
    }

    fn eval(&mut self, node: &Node) -> Eval {
        match node {
            Node::Leaf(i) => match &self.leaves[*i].state {
                None => Eval::Pending,
                Some(Ok(s)) => Eval::Done(s.clone()),
                Some(Err(_)) => Eval::Failed,
            },
            Node::Sss {
                pin,
                jwe,
                children,
                leaf,
            } => {
                match &self.leaves[*leaf].state {
                    Some(Ok(s)) => return Eval::Done(s.clone()),
                    Some(Err(_)) => return Eval::Failed,
                    None => {}
                }
                let mut done = Vec::new();
                let mut pending = 0;
                let mut failed = 0;
                for c in children {
                    match self.eval(c) {
                        Eval::Done(s) => done.push(s),
                        Eval::Pending => pending += 1,
                        Eval::Failed => failed += 1,
                    }
                }
                if done.len() >= pin.t {
                    let refs: Vec<&SecretBytes> = done.iter().collect();
                    let r = pin.combine(jwe, &refs);
                    let ev = match &r {
                        Ok(s) => Eval::Done(s.clone()),
                        Err(_) => Eval::Failed,
                    };
                    self.leaves[*leaf].state = Some(r.map_err(|e| e.to_string()));
                    ev
                } else if done.len() + pending < pin.t {
                    self.leaves[*leaf].state = Some(Err(format!(
                        "{failed} of its {} pins failed, {} needed: cannot open",
                        children.len(),
                        pin.t
                    )));
                    Eval::Failed
                } else {
                    Eval::Pending
                }
            }
        }
    }
}

/// Open clevis tokens: every pin at once, until one token's key is accepted by
/// `try_key` (which tries it on the token's keyslots and returns `Some` when it
/// opened one), every token has failed, or the deadline passes.
pub fn open_tokens<T>(
    tokens: Vec<ClevisToken>,
    opts: &EngineOptions,
    mut try_key: impl FnMut(&ClevisToken, &SecretBytes) -> Result<Option<T>, String>,
) -> Outcome<T> {
    let started = Instant::now();
    let (tx, rx) = mpsc::channel();
    let mut engine = Engine {
        leaves: Vec::new(),
        tx,
        opts: opts.clone(),
        tpm_lock: Arc::new(Mutex::new(())),
    };
    let mut roots = Vec::new();
    for t in &tokens {
        let root = engine.build(t.id, "", t.jwe.clone(), 0);
        roots.push(Some(root));
    }
    // The engine's own sender would keep `recv` from ever seeing "all done".
    drop(std::mem::replace(&mut engine.tx, mpsc::channel().0));
    let mut extra = Vec::new();
    let mut opened = None;
    'outer: loop {
        for (k, slot) in roots.iter_mut().enumerate() {
            let Some(root) = slot else { continue };
            match engine.eval(root) {
                Eval::Pending => {}
                Eval::Failed => *slot = None,
                Eval::Done(key) => {
                    *slot = None;
                    match try_key(&tokens[k], &key) {
                        Ok(Some(v)) => {
                            opened = Some((tokens[k].id, v));
                            break 'outer;
                        }
                        Ok(None) => extra.push(PinLine {
                            token: tokens[k].id,
                            path: String::new(),
                            pin: "key".into(),
                            outcome: Err(
                                "the recovered passphrase opens none of the token's keyslots"
                                    .into(),
                            ),
                        }),
                        Err(e) => extra.push(PinLine {
                            token: tokens[k].id,
                            path: String::new(),
                            pin: "key".into(),
                            outcome: Err(e),
                        }),
                    }
                }
            }
        }
        if roots.iter().all(Option::is_none) {
            break;
        }
        // The pins' own timeouts end at the deadline; a moment more lets their
        // "timed out" reach the report instead of a bare "no answer".
        let Some(left) = (opts.deadline + REPORT_GRACE).checked_duration_since(Instant::now())
        else {
            break;
        };
        match rx.recv_timeout(left) {
            Ok((i, r)) => engine.leaves[i].state = Some(r),
            Err(_) => break,
        }
    }
    let waited = opts
        .deadline
        .saturating_duration_since(started)
        .as_secs_f64();
    let mut lines: Vec<PinLine> = engine
        .leaves
        .into_iter()
        .map(|l| PinLine {
            token: l.token,
            path: l.path,
            pin: l.pin,
            outcome: match l.state {
                Some(Ok(_)) => Ok(()),
                Some(Err(e)) => Err(e),
                None if opened.is_some() => Err("abandoned (another pin set won)".into()),
                None if Instant::now() < opts.deadline => {
                    Err("abandoned (its token could no longer open)".into())
                }
                None => Err(format!("no answer within the deadline ({waited:.0} s)")),
            },
        })
        .collect();
    lines.extend(extra);
    Outcome {
        opened,
        lines,
        elapsed: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn token_parsing_names_what_is_wrong() {
        let e = ClevisToken::from_json(0, &json!({"type":"clevis","keyslots":["x"],"jwe":{}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad keyslot"), "{e}");
        let e = ClevisToken::from_json(0, &json!({"type":"clevis","keyslots":["1"]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("without \"jwe\""), "{e}");
    }

    #[test]
    fn unknown_and_malformed_pins_fail_at_once_with_a_line() {
        let hdr = b64::encode(br#"{"alg":"dir","enc":"A256GCM","clevis":{"pin":"yubikey"}}"#);
        let jwe = Jwe::from_compact(&format!(
            "{hdr}..AAAAAAAAAAAAAAAA.AA.AAAAAAAAAAAAAAAAAAAAAA"
        ))
        .unwrap();
        let tok = ClevisToken {
            id: 3,
            keyslots: vec![1],
            jwe,
        };
        let t0 = Instant::now();
        let out = open_tokens::<()>(
            vec![tok],
            &EngineOptions::new(Duration::from_secs(5)),
            |_, _| Ok(Some(())),
        );
        assert!(t0.elapsed() < Duration::from_secs(1));
        assert!(out.opened.is_none());
        assert_eq!(out.lines.len(), 1);
        let l = out.lines[0].to_string();
        assert!(
            l.contains("clevis token 3 yubikey: unsupported: clevis pin \"yubikey\""),
            "{l}"
        );
    }

    #[test]
    fn a_tang_pin_waits_for_its_route_first_and_reports_a_missing_one() {
        // A real `clevis luks bind` tang token (src/boot/testdata): its pin must ask
        // the route wait for its own URL before any request, and a wait that ends
        // without a route is that pin's line; the engine does not hang on it.
        let v: Value =
            serde_json::from_str(include_str!("../boot/testdata/clevis-token-tang.json")).unwrap();
        let tok = ClevisToken::from_json(1, &v).unwrap();
        let asked = Arc::new(Mutex::new(Vec::<String>::new()));
        let mut opts = EngineOptions::new(Duration::from_secs(5));
        let seen = asked.clone();
        opts.route_wait = Some(Arc::new(move |url: &str, _deadline| {
            seen.lock().unwrap().push(url.to_string());
            Err(format!("no route to {url} (the network is not up)"))
        }));
        let t0 = Instant::now();
        let out = open_tokens::<()>(vec![tok], &opts, |_, _| Ok(Some(())));
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(out.opened.is_none());
        let asked = asked.lock().unwrap().clone();
        assert_eq!(asked.len(), 1, "{asked:?}");
        assert!(asked[0].starts_with("http://"), "{asked:?}");
        assert_eq!(out.lines.len(), 1);
        let l = out.lines[0].to_string();
        assert!(
            l.contains("tang http://") && l.contains("no route to http://"),
            "{l}"
        );
    }
}
