//! A small HTTP/1.1 client for Tang: `GET /adv`, `POST /rec/<kid>`, plain `http://`
//! only (Tang's protocol carries nothing secret; its security is in the JWS and the
//! blinded exchange, not the transport).
//!
//! Written by hand, not taken from a crate, because the boot path needs exactly
//! this and no more: one request per connection, a hard deadline over connect,
//! send and receive together, a response size limit, `Content-Length`, `chunked`
//! and read-to-close bodies, and redirects refused (a Tang URL that redirects is
//! misconfigured or hijacked; following it would let a network attacker choose
//! the server). No DNS cache, no keep-alive, no TLS. The response parser is a pure
//! function over bytes (`parse_response`), fuzzed in `fuzz/`.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Instant;

/// The most a Tang answer may be: an advertisement with a few keys is ~1-3 KiB.
pub const MAX_RESPONSE: usize = 64 * 1024;
const MAX_HEAD: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    BadUrl(String),
    Resolve(String),
    NoRoute,
    Refused,
    TimedOut,
    Io(String),
    Redirect(u16, Option<String>),
    Status(u16),
    TooLarge,
    Malformed(String),
    Truncated,
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::BadUrl(m) => write!(f, "bad URL: {m}"),
            HttpError::Resolve(m) => write!(f, "cannot resolve the host name: {m}"),
            HttpError::NoRoute => write!(f, "no route to the server (network not up?)"),
            HttpError::Refused => write!(f, "connection refused (is tangd running?)"),
            HttpError::TimedOut => write!(f, "timed out (no answer before the deadline)"),
            HttpError::Io(m) => write!(f, "{m}"),
            HttpError::Redirect(code, loc) => write!(
                f,
                "answered with redirect {code} to {}; redirects are not followed: put the final URL in the binding",
                loc.as_deref().unwrap_or("(no Location)")
            ),
            HttpError::Status(code) => write!(f, "answered HTTP {code}"),
            HttpError::TooLarge => write!(f, "response larger than {MAX_RESPONSE} bytes"),
            HttpError::Malformed(m) => write!(f, "malformed HTTP response: {m}"),
            HttpError::Truncated => write!(f, "response truncated (connection closed early)"),
        }
    }
}

/// `http://host[:port][/base]`, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    pub base: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, HttpError> {
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if url.starts_with("https://") {
            return Err(HttpError::BadUrl(format!(
                "{url}: https is not supported (Tang needs no TLS: the advertisement is signed)"
            )));
        } else {
            // clevis accepts a bare host[:port] and means http.
            url
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty()
            || authority.contains('@')
            || authority.contains(char::is_whitespace)
        {
            return Err(HttpError::BadUrl(format!("{url}: no usable host")));
        }
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let Some((h, after)) = h.split_once(']') else {
                return Err(HttpError::BadUrl(format!("{url}: unclosed [")));
            };
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = match port {
            None | Some("") => 80,
            Some(p) => p
                .parse()
                .map_err(|_| HttpError::BadUrl(format!("{url}: bad port {p:?}")))?,
        };
        if path.contains(|c: char| c.is_control() || c == ' ') {
            return Err(HttpError::BadUrl(format!("{url}: bad path")));
        }
        Ok(Url {
            host,
            port,
            base: path.trim_end_matches('/').to_string(),
        })
    }

    fn host_header(&self) -> String {
        let h = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            h
        } else {
            format!("{h}:{}", self.port)
        }
    }
}

/// A successful (2xx) response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// One request, everything done by `deadline`.
pub fn request(
    url: &Url,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    deadline: Instant,
) -> Result<Response, HttpError> {
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(HttpError::TimedOut)
    };
    let addrs: Vec<SocketAddr> = match url.host.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, url.port)],
        Err(_) => (url.host.as_str(), url.port)
            .to_socket_addrs()
            .map_err(|e| HttpError::Resolve(format!("{}: {e}", url.host)))?
            .collect(),
    };
    let mut last = HttpError::Resolve(format!("{}: no address", url.host));
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, left()?) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = io_error(&e),
        }
    }
    let mut s = stream.ok_or(last)?;
    let mut req = format!(
        "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nAccept: application/jose+json, application/jwk+json\r\nConnection: close\r\nUser-Agent: vaultguard\r\n",
        url.base,
        url.host_header()
    );
    if let Some((ct, b)) = body {
        req.push_str(&format!(
            "Content-Type: {ct}\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut out = req.into_bytes();
    if let Some((_, b)) = body {
        out.extend_from_slice(b);
    }
    s.set_write_timeout(Some(left()?))
        .map_err(|e| io_error(&e))?;
    s.write_all(&out).map_err(|e| io_error(&e))?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        s.set_read_timeout(Some(left()?))
            .map_err(|e| io_error(&e))?;
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_RESPONSE {
                    return Err(HttpError::TooLarge);
                }
                // Done as soon as the response is complete (or refused by its
                // header): tangd keeps reading requests until its input closes,
                // so waiting for the close would cost the whole deadline.
                match parse_response(&buf, false) {
                    Ok(None) => {}
                    Ok(Some(r)) => return Ok(r),
                    Err(e) => return Err(e),
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(&e)),
        }
    }
    match parse_response(&buf, true)? {
        Some(r) => Ok(r),
        None => Err(HttpError::Truncated),
    }
}

fn io_error(e: &std::io::Error) -> HttpError {
    match e.kind() {
        ErrorKind::ConnectionRefused => HttpError::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => HttpError::TimedOut,
        _ => match e.raw_os_error() {
            Some(code) if code == libc_enetunreach() || code == libc_ehostunreach() => {
                HttpError::NoRoute
            }
            _ => HttpError::Io(e.to_string()),
        },
    }
}

fn libc_enetunreach() -> i32 {
    rustix::io::Errno::NETUNREACH.raw_os_error()
}
fn libc_ehostunreach() -> i32 {
    rustix::io::Errno::HOSTUNREACH.raw_os_error()
}

/// Parse a response from the bytes read so far. `Ok(None)`: incomplete (more may
/// come). `closed`: the peer closed, so a body without a length ends here.
pub fn parse_response(buf: &[u8], closed: bool) -> Result<Option<Response>, HttpError> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(HttpError::Malformed("header section too long".into()));
        }
        return if closed && !buf.is_empty() {
            Err(HttpError::Truncated)
        } else if closed {
            Err(HttpError::Malformed("empty response".into()))
        } else {
            Ok(None)
        };
    };
    if head_end > MAX_HEAD {
        return Err(HttpError::Malformed("header section too long".into()));
    }
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| HttpError::Malformed("header is not text".into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed(format!(
            "status line {:?}",
            status_line.chars().take(40).collect::<String>()
        )));
    }
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .filter(|c| (100..600).contains(c))
        .ok_or_else(|| HttpError::Malformed("no status code".into()))?;
    let mut content_length = None;
    let mut chunked = false;
    let mut content_type = None;
    let mut location = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Malformed("header line without ':'".into()));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                let n: usize = value
                    .parse()
                    .map_err(|_| HttpError::Malformed("bad Content-Length".into()))?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(HttpError::Malformed("conflicting Content-Length".into()));
                }
                content_length = Some(n);
            }
            "transfer-encoding" => {
                if value.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                } else {
                    return Err(HttpError::Malformed(format!(
                        "unsupported Transfer-Encoding {value:?}"
                    )));
                }
            }
            "content-type" => content_type = Some(value.to_string()),
            "location" => location = Some(value.chars().take(200).collect()),
            _ => {}
        }
    }
    if (300..400).contains(&status) {
        return Err(HttpError::Redirect(status, location));
    }
    if !(200..300).contains(&status) {
        return Err(HttpError::Status(status));
    }
    let rest = &buf[head_end + 4..];
    let body = if chunked {
        match dechunk(rest)? {
            Some(b) => b,
            None if closed => return Err(HttpError::Truncated),
            None => return Ok(None),
        }
    } else if let Some(n) = content_length {
        if n > MAX_RESPONSE {
            return Err(HttpError::TooLarge);
        }
        if rest.len() < n {
            return if closed {
                Err(HttpError::Truncated)
            } else {
                Ok(None)
            };
        }
        rest[..n].to_vec()
    } else if closed {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(Response {
        status,
        content_type,
        body,
    }))
}

/// Decode a chunked body; `None` until the last chunk has arrived.
fn dechunk(mut b: &[u8]) -> Result<Option<Vec<u8>>, HttpError> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = find(b, b"\r\n") else {
            if b.len() > 64 {
                return Err(HttpError::Malformed("chunk size line too long".into()));
            }
            return Ok(None);
        };
        let size_str = std::str::from_utf8(&b[..eol])
            .map_err(|_| HttpError::Malformed("chunk size is not text".into()))?;
        let size_str = size_str.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16)
            .map_err(|_| HttpError::Malformed(format!("bad chunk size {size_str:?}")))?;
        if size > MAX_RESPONSE || out.len() + size > MAX_RESPONSE {
            return Err(HttpError::TooLarge);
        }
        b = &b[eol + 2..];
        if size == 0 {
            // Trailers are not used by Tang; the body is complete either way.
            return Ok(Some(out));
        }
        if b.len() < size + 2 {
            return Ok(None);
        }
        if &b[size..size + 2] != b"\r\n" {
            return Err(HttpError::Malformed("chunk not followed by CRLF".into()));
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://10.0.2.100:8080/tang/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base.as_str()),
            ("10.0.2.100", 8080, "/tang")
        );
        let u = Url::parse("tang.example").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base.as_str()),
            ("tang.example", 80, "")
        );
        let u = Url::parse("http://[::1]:7500").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 7500));
        assert!(Url::parse("https://x")
            .unwrap_err()
            .to_string()
            .contains("https"));
        assert!(Url::parse("http://x:99999").is_err());
        assert!(Url::parse("http://u@x/").is_err());
    }

    #[test]
    fn content_length_chunked_and_close() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef", false)
            .unwrap()
            .unwrap();
        assert_eq!(r.body, b"abc");
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", false).unwrap(),
            None
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", true),
            Err(HttpError::Truncated)
        );
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.body, b"abcde");
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\nxyz", true)
            .unwrap()
            .unwrap();
        assert_eq!(r.body, b"xyz");
    }

    #[test]
    fn hostile_responses_are_named() {
        let e = parse_response(
            b"HTTP/1.1 302 Found\r\nLocation: http://evil/\r\n\r\n",
            false,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("redirect 302 to http://evil/"),
            "{e}"
        );
        let e = parse_response(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .unwrap_err();
        assert_eq!(e, HttpError::Status(404));
        let e = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n",
            false,
        )
        .unwrap_err();
        assert_eq!(e, HttpError::TooLarge);
        let e = parse_response(b"SSH-2.0-OpenSSH\r\n\r\n", false).unwrap_err();
        assert!(matches!(e, HttpError::Malformed(_)), "{e}");
        let e = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\n",
            false,
        )
        .unwrap_err();
        assert!(
            matches!(e, HttpError::Malformed(_) | HttpError::TooLarge),
            "{e}"
        );
        let big = vec![b'a'; MAX_HEAD + 10];
        assert!(parse_response(&big, false).is_err());
    }
}
