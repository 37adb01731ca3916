//! Just enough HTTP/1.1 for the dev-server: requests with `Content-Length` bodies, keep-alive,
//! and responses shaped like Infisical's (its headers, `content-type`, `content-length`).

#![forbid(unsafe_code)]

use std::io::{self, BufRead, Read, Write};

const MAX_HEAD: usize = 64 * 1024;
const MAX_REQUEST_BODY: usize = 1024 * 1024;

pub struct Request {
    pub method: String,
    /// Path and query as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    /// Decoded query parameters (`+` is a space, `%XX` decoded), in order.
    pub fn query(&self) -> Vec<(String, String)> {
        let Some((_, q)) = self.target.split_once('?') else {
            return Vec::new();
        };
        q.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (decode(k, true), decode(v, true))
            })
            .collect()
    }
    pub fn param(&self, name: &str) -> Option<String> {
        self.query()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
    pub fn keep_alive(&self) -> bool {
        !self
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// Percent-decode (and `+` as space in queries). Invalid escapes stay as they are.
pub use crate::urlenc::decode_lossy as decode;

/// Read one request. `Ok(None)` on a clean close before any byte.
pub fn read_request<R: BufRead>(r: &mut R) -> io::Result<Option<Request>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = Read::take(&mut *r, MAX_HEAD as u64).read_until(b'\n', &mut line)?;
        if n == 0 {
            if head.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof in head"));
        }
        if line == b"\r\n" || line == b"\n" {
            if head.is_empty() {
                continue; // tolerate a stray empty line between requests
            }
            break;
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    if method.is_empty() || !target.starts_with('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request line",
        ));
    }
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    if len > MAX_REQUEST_BODY {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "body too large"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(Request {
        method,
        target,
        headers,
        body,
    }))
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, body: Vec<u8>) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body,
        }
    }
    pub fn with_header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_string(), v.into()));
        self
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The head Infisical sends (helmet's headers, CORS, JSON, keep-alive), for `len` body bytes or
/// chunked when `len` is `None`.
pub fn head(resp: &Response, site_url: &str, len: Option<usize>) -> Vec<u8> {
    let mut h = format!(
        "HTTP/1.1 {} {}\r\n\
         Cross-Origin-Opener-Policy: same-origin\r\n\
         Cross-Origin-Resource-Policy: same-origin\r\n\
         Origin-Agent-Cluster: ?1\r\n\
         Referrer-Policy: no-referrer\r\n\
         Strict-Transport-Security: max-age=15552000; includeSubDomains\r\n\
         X-Content-Type-Options: nosniff\r\n\
         X-DNS-Prefetch-Control: off\r\n\
         X-Download-Options: noopen\r\n\
         X-Frame-Options: SAMEORIGIN\r\n\
         X-Permitted-Cross-Domain-Policies: none\r\n\
         X-XSS-Protection: 0\r\n\
         vary: Origin\r\n\
         access-control-allow-origin: {site_url}\r\n\
         access-control-allow-credentials: true\r\n",
        resp.status,
        reason(resp.status)
    );
    for (k, v) in &resp.headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("content-type: application/json; charset=utf-8\r\n");
    match len {
        Some(n) => h.push_str(&format!("content-length: {n}\r\n")),
        None => h.push_str("transfer-encoding: chunked\r\n"),
    }
    h.push_str("Connection: keep-alive\r\nKeep-Alive: timeout=72\r\n\r\n");
    h.into_bytes()
}

pub fn write_response(w: &mut impl Write, resp: &Response, site_url: &str) -> io::Result<()> {
    let mut out = head(resp, site_url, Some(resp.body.len()));
    out.extend_from_slice(&resp.body);
    w.write_all(&out)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_request_with_query_and_body() {
        let raw = b"POST /a/b%20c?x=1&y=%2Fp+q HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}GET / HTTP/1.1\r\n\r\n";
        let mut r = std::io::BufReader::new(&raw[..]);
        let q = read_request(&mut r).unwrap().unwrap();
        assert_eq!(q.method, "POST");
        assert_eq!(q.path(), "/a/b%20c");
        assert_eq!(q.param("y").as_deref(), Some("/p q"));
        assert_eq!(q.body, b"{}");
        assert_eq!(q.header("host"), Some("h"));
        let q2 = read_request(&mut r).unwrap().unwrap();
        assert_eq!(q2.method, "GET");
        assert!(read_request(&mut r).unwrap().is_none());
    }

    #[test]
    fn decodes() {
        assert_eq!(decode("a%2Fb%zz%", false), "a/b%zz%");
        assert_eq!(decode("a+b", true), "a b");
        assert_eq!(decode("a+b", false), "a+b");
    }
}
