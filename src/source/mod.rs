//! The Infisical client: Universal Auth login, one secret, token revocation, and a per-identity
//! token cache for a long-running, multi-threaded process (the broker).
//!
//! Shapes, status codes and error bodies follow the recordings in
//! `tests/fixtures/infisical-api/` (a real Infisical server). In short:
//!
//! - login: `POST /api/v1/auth/universal-auth/login` `{clientId, clientSecret}` -> 200
//!   `{accessToken, expiresIn, accessTokenMaxTTL, tokenType}`; 401 wrong secret, 404 unknown id.
//! - one secret: `GET /api/v3/secrets/raw/{KEY}?workspaceId=&environment=&secretPath=` -> 200
//!   `{"secret":{..."secretKey","secretValue"...}}`; 404 unknown secret/folder/env/project.
//! - revoke: `POST /api/v1/auth/token/revoke` `{accessToken}` -> 200.
//! - a token that is expired, malformed or badly signed gets **403** `error: "TokenError"`; a
//!   revoked or deleted one gets 401. Both mean "log in again". Any other 403 is a permission
//!   failure.
//! - rate limit: 429, or (self-hosted without a license, `v2024-10/h1`) 500 with `retry-after`
//!   and `x-ratelimit-remaining: 0`. Waited out when it fits `infisical.timeout`, else 69.
//! - every decision is by status, headers and the `error` field, never by message wording
//!   (404 texts differ between releases); server messages are quoted in errors.
//!
//! Secrets: the client secret and the access token are [`SecretBytes`]; response bodies are read
//! into pre-sized zeroizing buffers, and secret strings are unescaped straight from the body into
//! a zeroizing buffer (see `json.rs`). What stays beyond our reach is listed in
//! docs/threat-model.md.

#![forbid(unsafe_code)]

mod identity;
pub mod json;

pub use identity::{ENV_CLIENT_ID, ENV_CLIENT_SECRET, Identity, read_secret_file};

use crate::catalog::SecretRef;
use crate::config::InfisicalConfig;
use crate::error::{Error, Kind, Result, shell_quote};
use crate::secret::{SecretBytes, extend_zeroizing};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// Largest response body we accept. Larger bodies are refused (exit 69), never buffered.
pub const MAX_BODY: usize = 1024 * 1024;
/// Idle kept-alive connections the pool keeps (the broker's threads share them).
const MAX_IDLE_CONNECTIONS: usize = 16;
/// At most this many attempts per request (connect errors, 429, 5xx only).
pub const MAX_ATTEMPTS: u32 = 3;

/// A Universal Auth access token. No `Display`; `Debug` is redacted.
pub struct AccessToken {
    token: SecretBytes,
    expires_in: u64,
}

impl AccessToken {
    /// Wrap a token obtained elsewhere (e.g. Token Auth).
    pub fn new(token: SecretBytes, expires_in: u64) -> Self {
        AccessToken { token, expires_in }
    }
    pub fn expose(&self) -> &[u8] {
        self.token.expose()
    }
    /// Lifetime in seconds, as the server said at login.
    pub fn expires_in(&self) -> u64 {
        self.expires_in
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AccessToken([REDACTED], expires_in: {})",
            self.expires_in
        )
    }
}

/// One HTTP answer: status, the rate-limit headers, and the body in a zeroizing buffer.
struct Answer {
    status: u16,
    /// `retry-after` in seconds (the HTTP-date form is not used by Infisical and is ignored).
    retry_after: Option<Duration>,
    /// `x-ratelimit-remaining: 0`.
    quota_exhausted: bool,
    body: Zeroizing<Vec<u8>>,
}

impl Answer {
    /// Is this a rate limit? 429 on most releases; on self-hosted releases without a license
    /// (recorded: v2024-10 `h1`) a **500** with `retry-after` and `x-ratelimit-remaining: 0`,
    /// because the error handler does not map the rate limiter's error. Decided by status and
    /// headers only, never by the body's wording; a 500 without both headers is a server error.
    fn rate_limited(&self) -> bool {
        self.status == 429
            || (self.status == 500 && self.retry_after.is_some() && self.quota_exhausted)
    }
}

/// Why one attempt failed before an answer arrived.
struct TransportError {
    message: String,
    retryable: bool,
    tls: bool,
}

/// Infisical's error body: `{"reqId","statusCode","message","error"}` (+ `details`).
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: serde_json::Value,
    #[serde(default)]
    error: Option<String>,
}

/// Where a secret is read from.
#[derive(Clone, Copy)]
struct SecretAt<'a> {
    project_id: &'a str,
    environment: &'a str,
    path: &'a str,
    key: &'a str,
}

/// What a secret read failed with: the token was refused (log in again), or anything else.
enum ReadFailure {
    TokenRejected(Error),
    Other(Error),
}

impl From<Error> for ReadFailure {
    fn from(e: Error) -> Self {
        ReadFailure::Other(e)
    }
}

/// The backoff before attempt `attempt + 1` (attempt counts from 1): 100 ms, 200 ms, ... with
/// full jitter in [50%, 100%].
fn backoff(attempt: u32) -> Duration {
    let base = 100u64 << (attempt.saturating_sub(1)).min(6);
    let mut r = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    let jitter = u64::from(u16::from_le_bytes(r)) * base / 2 / 65535;
    Duration::from_millis(base / 2 + jitter)
}

/// Is this host a loopback address (where plain http is allowed)?
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if h.eq_ignore_ascii_case("localhost") {
        return true;
    }
    h.parse::<std::net::IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

/// Split `scheme://host[:port][/base]` and return (scheme, host, rest-without-trailing-slash).
fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let host = if let Some(stripped) = authority.strip_prefix('[') {
        &authority[..stripped.find(']')? + 2]
    } else {
        authority.split(':').next()?
    };
    Some((scheme, host, path.trim_end_matches('/')))
}

/// Percent-encode a query or path component (RFC 3986 unreserved stay; `/` kept when asked).
fn enc(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// Name resolution: hyper-util's connector takes an IP-literal host (the usual
// `https://10.0.0.5:8443` or loopback) as the address itself, with no resolver call, so the
// literal-first behaviour the ureq client had to add by hand is built in. Host names go
// through getaddrinfo on reqwest's runtime.

/// Renew a cached token once this much of its lifetime has passed (80%), or 30 s before it
/// ends, whichever comes first.
const RENEW_AT_PERCENT: u64 = 80;
const RENEW_BEFORE_END: Duration = Duration::from_secs(30);

/// A token in the cache, with when to stop using it and a digest of the client secret it was
/// obtained with (so an identity with another secret never gets it).
struct Cached {
    token: AccessToken,
    renew_at: Instant,
    secret_digest: [u8; 32],
}

/// One identity's place in the cache. Its lock is held while logging in, so concurrent fetches
/// of a cold (or expired) identity make one login, not one each.
type Slot = Arc<Mutex<Option<Arc<Cached>>>>;

/// The Infisical client: one kept-alive connection pool, and a cache of access tokens keyed by
/// identity (client id). `Send + Sync`: share it in an `Arc` across threads. Tokens live in this
/// process's memory only; secret values are never cached.
pub struct Client {
    http: reqwest::Client,
    /// Drives `http` on the calling thread: each request runs inside `block_on` of the thread
    /// that asks, so no other thread is woken to carry it (reqwest's blocking client hands
    /// every request and every body chunk to a runtime thread of its own and back).
    rt: tokio::runtime::Runtime,
    base: String,
    project_id: String,
    environment: String,
    /// `infisical.timeout`: the most one request may take, rate-limit waits included.
    timeout: Duration,
    tokens: Mutex<HashMap<String, Slot>>,
}

// The broker shares one client across its threads.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<Client>();
};

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("project_id", &self.project_id)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for the config's `infisical:` section. Checks the URL (https, or http to a
    /// loopback address) and loads `ca_bundle` when set. Makes no request.
    pub fn new(cfg: &InfisicalConfig) -> Result<Client> {
        let url = cfg.url.trim();
        let bad_url = || {
            Error::config(format!(
                "infisical.url {url:?} is not an http(s) URL like https://infisical.example.org"
            ))
            .hint("set infisical.url in the config, then: aap config show")
        };
        let (scheme, host, _) = split_url(url).ok_or_else(bad_url)?;
        match scheme {
            "https" => {}
            "http" if is_loopback_host(host) => {
                tracing::debug!(
                    url,
                    "infisical.url uses plain http; accepted only because {host} is a loopback address"
                );
            }
            "http" => {
                return Err(Error::config(format!(
                    "infisical.url {url} uses plain http to {host}, which is not a loopback address; secrets would cross the network unencrypted"
                ))
                .hint(format!(
                    "use https: set infisical.url to https://{}, then: aap config show",
                    url.trim_start_matches("http://")
                )));
            }
            _ => return Err(bad_url()),
        }
        // rustls with ring, configured here and handed to reqwest as is: only `ca_bundle`
        // when set, else the compiled-in Mozilla roots; never the system store.
        let mut roots = rustls::RootCertStore::empty();
        match &cfg.ca_bundle {
            Some(ca) => {
                for cert in load_ca_bundle(ca)? {
                    roots.add(cert).map_err(|e| {
                        Error::config(format!(
                            "CA bundle {} holds a certificate rustls cannot use: {e}",
                            ca.display()
                        ))
                        .hint(format!(
                            "check it: openssl x509 -noout -subject -in {}",
                            shell_quote(&ca.to_string_lossy())
                        ))
                    })?;
                }
                tracing::debug!(ca_bundle = %ca.display(), "trusting only the CA bundle");
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let internal = |what: &str, e: &dyn fmt::Display| {
            Error::internal(format!("setting up the Infisical client: {what}: {e}"))
                .hint("report this with the output of: aap --version")
        };
        // The process-wide default too, for any code that asks rustls for one; a provider that
        // is already installed (ring, by an earlier client) is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = tls_config(roots).map_err(|e| internal("TLS versions", &e))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .http1_only()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(cfg.connect_timeout.secs().max(1)))
            .timeout(Duration::from_secs(cfg.timeout.secs().max(1)))
            // Infisical keeps idle connections 72 s; drop ours before it does.
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(MAX_IDLE_CONNECTIONS)
            .user_agent(concat!("aap/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| internal("HTTP client", &e))?;
        // A current-thread runtime that several threads may drive at once: whichever thread
        // holds its core runs the I/O for all; the others poll their own request.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| internal("HTTP runtime", &e))?;
        Ok(Client {
            http,
            rt,
            base: url.trim_end_matches('/').to_string(),
            project_id: cfg.project_id.clone(),
            environment: cfg.environment.clone(),
            timeout: Duration::from_secs(cfg.timeout.secs().max(1)),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// The server's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// One request with retries: connect errors and 5xx with backoff (at most
    /// [`MAX_ATTEMPTS`]); a rate limit (see [`Answer::rate_limited`]) by waiting its
    /// `retry-after` when that fits the request's timeout, telling `progress` first.
    fn request(
        &self,
        what: &str,
        method: &str,
        path: &str,
        token: Option<&AccessToken>,
        body: Option<&[u8]>,
        progress: &dyn Fn(&str),
    ) -> Result<Answer> {
        let url = format!("{}{}", self.base, path);
        let first = Instant::now();
        let mut attempt = 1;
        let mut rate_waits = 0;
        loop {
            let started = Instant::now();
            let outcome = self.once(method, &url, token, body);
            tracing::debug!(
                what,
                method,
                path,
                attempt,
                elapsed_us = started.elapsed().as_micros() as u64,
                status = outcome.as_ref().ok().map(|a| a.status),
                "infisical request"
            );
            let wait = match &outcome {
                Ok(a) if a.rate_limited() => match a.retry_after {
                    Some(_) if rate_waits >= MAX_ATTEMPTS => {
                        return Err(self.rate_limited(what, a, None));
                    }
                    Some(d) if first.elapsed() + d >= self.timeout => {
                        return Err(self.rate_limited(what, a, Some(d)));
                    }
                    Some(d) => {
                        rate_waits += 1;
                        progress(&format!(
                            "waiting {} s for Infisical's rate limit",
                            d.as_secs()
                        ));
                        tracing::debug!(
                            what,
                            wait_ms = d.as_millis() as u64,
                            "rate limited; waiting"
                        );
                        std::thread::sleep(d);
                        continue;
                    }
                    // 429 without a usable `retry-after`: back off like for a 5xx.
                    None => Some(backoff(attempt)),
                },
                Ok(a) if a.status >= 500 => Some(backoff(attempt)),
                Ok(_) => None,
                Err(t) if t.retryable => Some(backoff(attempt)),
                Err(_) => None,
            };
            match wait {
                Some(d) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(what, attempt, wait_ms = d.as_millis() as u64, "retrying");
                    std::thread::sleep(d);
                    attempt += 1;
                }
                _ => {
                    return match outcome {
                        Ok(a) if a.rate_limited() => Err(self.rate_limited(what, &a, None)),
                        Ok(a) if a.status >= 500 => Err(self.server_failed(what, &a, attempt)),
                        Ok(a) => Ok(a),
                        Err(t) if t.tls => Err(Error::unavailable(format!(
                            "{what}: {}",
                            t.message
                        ))
                        .hint(format!(
                            "set infisical.ca_bundle to the CA that signed the server's certificate; see it with: openssl s_client -connect {} -showcerts </dev/null",
                            host_port(&self.base)
                        ))),
                        Err(t) => Err(Error::unavailable(format!(
                            "{what}: {} (after {attempt} attempt{})",
                            t.message,
                            if attempt == 1 { "" } else { "s" }
                        ))
                        .hint(format!(
                            "check that Infisical answers: curl -sS -o /dev/null -w '%{{http_code}}\\n' {}/api/status",
                            self.base
                        ))),
                    };
                }
            }
        }
    }

    fn server_failed(&self, what: &str, a: &Answer, attempts: u32) -> Error {
        let detail = error_summary(&a.body);
        Error::unavailable(format!(
            "{what}: Infisical at {} answered {} after {attempts} attempt{}{detail}",
            self.base,
            a.status,
            if attempts == 1 { "" } else { "s" }
        ))
        .hint("retry later; if it persists, check the Infisical server's health and logs")
    }

    /// A rate limit we do not wait out: `wait` is the server's `retry-after` when it did not
    /// fit the request's timeout; `None` when the server named no wait and retries ran out.
    fn rate_limited(&self, what: &str, a: &Answer, wait: Option<Duration>) -> Error {
        let detail = error_summary(&a.body);
        match wait {
            Some(d) => {
                let secs = d.as_secs();
                Error::unavailable(format!(
                    "{what}: Infisical at {} is rate limiting ({}{detail}) and asks to wait {secs} s, longer than the request's timeout (infisical.timeout: {} s)",
                    self.base,
                    a.status,
                    self.timeout.as_secs()
                ))
                .hint(format!(
                    "run the same command again in {secs} s (sleep {secs}); to have aap wait instead, set infisical.timeout above {secs}s in the config, then: aap config show"
                ))
            }
            None => Error::unavailable(format!(
                "{what}: Infisical at {} is still rate limiting ({}{detail}) after {MAX_ATTEMPTS} tries",
                self.base, a.status
            ))
            .hint("run the same command again in a minute (sleep 60)"),
        }
    }

    fn once(
        &self,
        method: &str,
        url: &str,
        token: Option<&AccessToken>,
        body: Option<&[u8]>,
    ) -> std::result::Result<Answer, TransportError> {
        use reqwest::header;
        let mut req = match (method, body) {
            ("POST", Some(b)) => {
                // Handed over as `Bytes` that own a zeroizing copy: wiped when reqwest drops it.
                let owned = Zeroizing::new(b.to_vec());
                self.http
                    .post(url)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(bytes::Bytes::from_owner(owned))
            }
            _ => self.http.get(url),
        };
        req = req.header(header::ACCEPT, "application/json");
        if let Some(t) = token {
            let mut v = Zeroizing::new(Vec::with_capacity(7 + t.expose().len()));
            v.extend_from_slice(b"Bearer ");
            v.extend_from_slice(t.expose());
            // No copy: the header value is these zeroizing bytes; `sensitive` keeps it out of
            // reqwest's and http's `Debug` output.
            let mut auth = header::HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(v))
                .map_err(|_| TransportError {
                    message: "the access token is not valid in an HTTP header".into(),
                    retryable: false,
                    tls: false,
                })?;
            auth.set_sensitive(true);
            req = req.header(header::AUTHORIZATION, auth);
        }
        let base = &self.base;
        // Boxed: the future lives on the heap for the request, not on the stack of the
        // broker's connection thread, where the pages it touched would stay resident for the
        // thread's whole life (1,000 open runs hold 1,000 threads).
        self.rt.block_on(Box::pin(async move {
            let mut resp = req.send().await.map_err(|e| transport_error(&e, base))?;
            let status = resp.status().as_u16();
            let head = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
            };
            let retry_after = head("retry-after")
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs);
            let quota_exhausted = head("x-ratelimit-remaining") == Some("0");
            let len_hint = head("content-length").and_then(|v| v.parse::<u64>().ok());
            if len_hint.is_some_and(|n| n > MAX_BODY as u64) {
                return Err(TransportError {
                    message: format!(
                        "Infisical at {base} sent a {}-byte body; aap accepts at most {MAX_BODY} bytes",
                        len_hint.unwrap_or(0)
                    ),
                    retryable: false,
                    tls: false,
                });
            }
            let cap = len_hint.map_or(16 * 1024, |n| n as usize);
            let mut body = Zeroizing::new(Vec::with_capacity(cap));
            loop {
                match resp.chunk().await {
                    Ok(None) => break,
                    Ok(Some(chunk)) => {
                        if body.len() + chunk.len() > MAX_BODY {
                            return Err(TransportError {
                                message: format!(
                                    "Infisical at {base} sent a body over {MAX_BODY} bytes; aap refuses it"
                                ),
                                retryable: false,
                                tls: false,
                            });
                        }
                        extend_zeroizing(&mut body, &chunk);
                    }
                    Err(e) => {
                        return Err(TransportError {
                            message: format!(
                                "the connection to Infisical at {base} failed while reading the answer ({status}): {}",
                                describe_body(&e)
                            ),
                            retryable: false,
                            tls: false,
                        });
                    }
                }
            }
            Ok(Answer {
                status,
                retry_after,
                quota_exhausted,
                body,
            })
        }))
    }

    /// Universal Auth login: a fresh token, **not** cached (for a scoped `infisical-token`
    /// capability the caller hands on and revokes with [`Client::revoke`]). A rate limit is
    /// waited out silently when it fits the timeout (see [`Client::fetch`] for reporting).
    pub fn login(&self, identity: &Identity) -> Result<AccessToken> {
        self.log_in(identity, &|_| {})
    }

    fn log_in(&self, identity: &Identity, progress: &dyn Fn(&str)) -> Result<AccessToken> {
        let what = format!("logging in to Infisical as {}", identity.label());
        let body = json::object(&[
            ("clientId", identity.client_id().as_bytes()),
            ("clientSecret", identity.client_secret().expose()),
        ]);
        let a = self.request(
            &what,
            "POST",
            "/api/v1/auth/universal-auth/login",
            None,
            Some(&body),
            progress,
        )?;
        drop(body);
        let hint_secret = format!(
            "check the client secret in {} against the identity's Universal Auth client secrets in Infisical, or create a new one there and write it to that file (chmod 600)",
            identity.secret_source()
        );
        match a.status {
            200 => {
                #[derive(Deserialize)]
                struct Login<'a> {
                    #[serde(borrow, rename = "accessToken")]
                    access_token: &'a RawValue,
                    #[serde(rename = "expiresIn", default)]
                    expires_in: u64,
                }
                let parsed: Login<'_> = serde_json::from_slice(&a.body)
                    .map_err(|e| self.bad_body(&what, "a login answer", &e))?;
                let token = json::unescape_secret(parsed.access_token.get())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        self.bad_body(&what, "a login answer", &"accessToken is not a string")
                    })?;
                tracing::debug!(identity = identity.label(), expires_in = parsed.expires_in, "logged in");
                Ok(AccessToken {
                    token,
                    expires_in: parsed.expires_in,
                })
            }
            401 => Err(Error::denied(format!(
                "Infisical refused the login of {} (client id {}): wrong client secret (401{})",
                identity.label(),
                identity.client_id(),
                error_summary(&a.body)
            ))
            .hint(hint_secret)),
            404 => Err(Error::denied(format!(
                "Infisical has no machine identity with the client id {} (used for {}): 404{}",
                identity.client_id(),
                identity.label(),
                error_summary(&a.body)
            ))
            .hint(
                "check the client id file against the identity's Universal Auth page in Infisical, then: aap config show",
            )),
            s => Err(self.unexpected(&what, s, &a.body)),
        }
    }

    /// Read one secret with a token. An expired or revoked token is a `Denied` error here;
    /// [`Client::fetch`] logs in again instead.
    pub fn get_secret(
        &self,
        token: &AccessToken,
        project_id: &str,
        environment: &str,
        path: &str,
        key: &str,
    ) -> Result<SecretBytes> {
        let at = SecretAt {
            project_id,
            environment,
            path,
            key,
        };
        match self.read_secret(token, "the identity", &at, &|_| {}) {
            Ok(s) => Ok(s),
            Err(ReadFailure::TokenRejected(e) | ReadFailure::Other(e)) => Err(e),
        }
    }

    fn read_secret(
        &self,
        token: &AccessToken,
        who: &str,
        at: &SecretAt<'_>,
        progress: &dyn Fn(&str),
    ) -> std::result::Result<SecretBytes, ReadFailure> {
        let SecretAt {
            project_id,
            environment,
            path,
            key,
        } = *at;
        let name = format!("{environment}:{path}:{key}");
        let what = format!("reading secret {name} of project {project_id} as {who}");
        let q = format!(
            "/api/v3/secrets/raw/{}?workspaceId={}&environment={}&secretPath={}",
            enc(key, false),
            enc(project_id, false),
            enc(environment, false),
            enc(path, true)
        );
        let a = self.request(&what, "GET", &q, Some(token), None, progress)?;
        let err = parse_error(&a.body);
        match a.status {
            200 => {
                #[derive(Deserialize)]
                struct Secret<'a> {
                    #[serde(rename = "secretKey")]
                    secret_key: Option<&'a str>,
                    #[serde(borrow, rename = "secretValue")]
                    secret_value: &'a RawValue,
                }
                #[derive(Deserialize)]
                struct Wrapper<'a> {
                    #[serde(borrow)]
                    secret: Secret<'a>,
                }
                let w: Wrapper<'_> = serde_json::from_slice(&a.body)
                    .map_err(|e| self.bad_body(&what, "a secret", &e))?;
                if w.secret.secret_key.is_some_and(|k| k != key) {
                    return Err(self
                        .bad_body(&what, "a secret", &"secretKey names another secret")
                        .into());
                }
                let v = json::unescape_secret(w.secret.secret_value.get()).ok_or_else(|| {
                    self.bad_body(&what, "a secret", &"secretValue is not a string")
                })?;
                tracing::debug!(secret = %name, project_id, len = v.len(), "fetched secret");
                Ok(v)
            }
            // v2024-10 answers a request its handler finds invalid with 401 `ValidationFailure`:
            // not the token's fault, so no new login.
            401 if err.error.as_deref() == Some("ValidationFailure") => Err(Error::config(format!(
                "{what}: Infisical refused the request as invalid (401{})",
                err.summary()
            ))
            .hint("check infisical.project_id and the secret reference, then: aap config show")
            .into()),
            401 => Err(ReadFailure::TokenRejected(
                Error::denied(format!(
                    "{what}: Infisical rejected the access token (401{})",
                    err.summary()
                ))
                .hint("log in again; if it keeps failing, check the identity in Infisical"),
            )),
            403 if err.error.as_deref() == Some("TokenError") => Err(ReadFailure::TokenRejected(
                Error::denied(format!(
                    "{what}: Infisical rejected the access token (403{})",
                    err.summary()
                ))
                .hint("log in again; if it keeps failing, check the clocks and the identity's token TTL in Infisical"),
            )),
            403 => Err(Error::denied(format!(
                "{what}: permission denied (403{})",
                err.summary()
            ))
            .hint(format!(
                "in Infisical, give {who} read access to environment {environment}, path {path} of project {project_id} (Access Control -> Machine Identities -> role)"
            ))
            .into()),
            // Unknown project, environment, folder and key all answer 404, with texts that
            // differ between releases (mid-2025: "Secret with name ...", "Folder with path ...";
            // v2024-10: "Secret not found", "Folder not found for the given environment slug &
            // secret path" for a folder and an environment alike). So the request, not the
            // wording, says what was asked for; the server's message is quoted as it is.
            404 => Err(Error::config(format!(
                "{what}: Infisical found no secret {key} at path {path} in environment {environment} of project {project_id}; the project, the environment, the folder or the key does not exist (404{})",
                err.summary()
            ))
            .hint(format!(
                "compare the reference {name} (environment slug, folder path from /, key) with the project in Infisical, and infisical.project_id with its Project Settings; fix the catalog or the config, then check it: {}",
                match who.strip_prefix("agent ") {
                    Some(agent) => format!("aap infisical check --agent {agent} {name}"),
                    None => "aap catalog check".to_string(),
                }
            ))
            .into()),
            400 => Err(Error::config(format!(
                "{what}: Infisical refused the request (400{})",
                err.summary()
            ))
            .hint("check infisical.project_id and the secret reference, then: aap config show")
            .into()),
            s => Err(self.unexpected(&what, s, &a.body).into()),
        }
    }

    /// `GET /api/status`, Infisical's unauthenticated health check: whether the server is
    /// reachable and answering (used by `aap doctor`; sends no credential).
    pub fn status(&self) -> Result<()> {
        let what = "checking Infisical's status";
        let a = self.request(what, "GET", "/api/status", None, None, &|_| {})?;
        match a.status {
            200 => Ok(()),
            s => Err(self.unexpected(what, s, &a.body)),
        }
    }

    /// Revoke an access token. Revoking one that is already invalid is not an error.
    pub fn revoke(&self, token: &AccessToken) -> Result<()> {
        let what = "revoking the Infisical access token";
        let body = json::object(&[("accessToken", token.expose())]);
        let a = self.request(
            what,
            "POST",
            "/api/v1/auth/token/revoke",
            None,
            Some(&body),
            &|_| {},
        )?;
        drop(body);
        match a.status {
            200 => Ok(()),
            401 | 403 => {
                tracing::debug!(status = a.status, "token was already invalid when revoked");
                Ok(())
            }
            s => Err(self.unexpected(what, s, &a.body)),
        }
    }

    /// Read one secret as `identity`, with its cached token (logging in when there is none or
    /// it is near its end, see [`RENEW_AT_PERCENT`]). When the server refuses the token (401, or
    /// 403 with `error: "TokenError"`: expired, revoked, malformed), log in again and retry
    /// once. With a warm token this is one request. `progress` gets one line per rate-limit
    /// wait (`waiting 58 s for Infisical's rate limit`), for the caller to relay.
    pub fn fetch(
        &self,
        identity: &Identity,
        secret: &SecretRef,
        default_env: &str,
        progress: &dyn Fn(&str),
    ) -> Result<SecretBytes> {
        let env = secret.environment.as_deref().unwrap_or(default_env);
        let slot = self.slot(identity);
        let at = SecretAt {
            project_id: &self.project_id,
            environment: env,
            path: &secret.path,
            key: &secret.key,
        };
        let read = |t: &AccessToken| self.read_secret(t, identity.label(), &at, progress);
        let token = self.cached_token(&slot, identity, None, progress)?;
        match read(&token.token) {
            Ok(v) => Ok(v),
            Err(ReadFailure::Other(e)) => Err(e),
            Err(ReadFailure::TokenRejected(_)) => {
                tracing::debug!(
                    identity = identity.label(),
                    "token rejected; logging in again"
                );
                let token = self.cached_token(&slot, identity, Some(&token), progress)?;
                match read(&token.token) {
                    Ok(v) => Ok(v),
                    Err(ReadFailure::Other(e)) => Err(e),
                    Err(ReadFailure::TokenRejected(e)) => {
                        forget(&slot, &token);
                        Err(Error::new(
                            Kind::Denied,
                            format!("{} (again, right after a fresh login)", e.message()),
                        )
                        .hint(format!(
                            "check the token TTL of {} in Infisical (Universal Auth settings) and this host's clock: date -u",
                            identity.label()
                        )))
                    }
                }
            }
        }
    }

    /// The cache slot of an identity (created empty on first use).
    fn slot(&self, identity: &Identity) -> Slot {
        lock(&self.tokens)
            .entry(identity.client_id().to_string())
            .or_default()
            .clone()
    }

    /// The identity's cached token, or a fresh one from a login (then cached). `stale` is a
    /// token the server just refused: it is not returned again, but a newer one another thread
    /// put in the slot meanwhile is.
    fn cached_token(
        &self,
        slot: &Slot,
        identity: &Identity,
        stale: Option<&Arc<Cached>>,
        progress: &dyn Fn(&str),
    ) -> Result<Arc<Cached>> {
        let digest = secret_digest(identity);
        let mut held = lock(slot);
        if let Some(c) = held.as_ref()
            && Instant::now() < c.renew_at
            && c.secret_digest == digest
            && !stale.is_some_and(|s| Arc::ptr_eq(s, c))
        {
            return Ok(c.clone());
        }
        // Dropping the old token zeroizes it; it is not revoked (it ends at its TTL, and it
        // never left this process).
        *held = None;
        let obtained = Instant::now();
        let token = self.log_in(identity, progress)?;
        let fresh = Arc::new(Cached {
            // An absurd lifetime that overflows the clock: do not reuse the token at all.
            renew_at: obtained
                .checked_add(reuse_for(token.expires_in))
                .unwrap_or(obtained),
            token,
            secret_digest: digest,
        });
        *held = Some(fresh.clone());
        Ok(fresh)
    }

    /// Revoke and forget every cached token: for a process that is about to end (a one-shot
    /// command, or the broker shutting down), once no fetch is running (a fetch still running
    /// may log in again and keep its new token out of reach of this call). Tries them all;
    /// returns the first failure.
    pub fn revoke_cached(&self) -> Result<()> {
        let slots: Vec<Slot> = lock(&self.tokens).drain().map(|(_, s)| s).collect();
        let mut first_err = None;
        for slot in slots {
            let Some(c) = lock(&slot).take() else {
                continue;
            };
            if let Err(e) = self.revoke(&c.token) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The configured default environment.
    pub fn default_environment(&self) -> &str {
        &self.environment
    }

    fn bad_body(&self, what: &str, expected: &str, e: &dyn fmt::Display) -> Error {
        // serde_json's message names a line and column, never the input.
        Error::unavailable(format!(
            "{what}: Infisical at {} answered 200 but the body is not {expected} ({e})",
            self.base
        ))
        .hint(format!(
            "check that infisical.url points at Infisical itself, not a proxy or login page: curl -sS {}/api/status",
            self.base
        ))
    }

    fn unexpected(&self, what: &str, status: u16, body: &[u8]) -> Error {
        Error::unavailable(format!(
            "{what}: unexpected answer {status} from Infisical at {}{}",
            self.base,
            error_summary(body)
        ))
        .hint(format!(
            "check infisical.url and the server version: curl -sS {}/api/status",
            self.base
        ))
    }
}

/// Lock, and carry on past a poisoned lock: the data behind these locks (a token slot, the
/// slot map) stays consistent whatever panicked while holding it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a token that lives `expires_in` seconds is used before a new login: 80% of its
/// life or until 30 s before its end, whichever is earlier. 0 (unknown or very short): not at
/// all beyond the fetch that logged in.
fn reuse_for(expires_in: u64) -> Duration {
    // Integer steps: a huge `expiresIn` from a broken server must not overflow.
    let share = expires_in / 100 * RENEW_AT_PERCENT + expires_in % 100 * RENEW_AT_PERCENT / 100;
    Duration::from_secs(share.min(expires_in.saturating_sub(RENEW_BEFORE_END.as_secs())))
}

/// SHA-256 of the identity's client secret, to tell a cached token's secret from another.
fn secret_digest(identity: &Identity) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(identity.client_secret().expose()).into()
}

/// Drop `token` from the slot if it is still the one there.
fn forget(slot: &Slot, token: &Arc<Cached>) {
    let mut held = lock(slot);
    if held.as_ref().is_some_and(|c| Arc::ptr_eq(c, token)) {
        *held = None;
    }
}

/// `error`, `message` of an Infisical error body, for messages.
struct ParsedError {
    error: Option<String>,
    message: Option<String>,
}

impl ParsedError {
    fn summary(&self) -> String {
        let mut s = String::new();
        if let Some(e) = &self.error {
            s.push(' ');
            s.push_str(&clip(e));
        }
        if let Some(m) = &self.message {
            s.push_str(": ");
            s.push_str(&clip(m));
        }
        s
    }
}

fn parse_error(body: &[u8]) -> ParsedError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => ParsedError {
            error: b.error,
            message: match b.message {
                serde_json::Value::String(s) => Some(s),
                serde_json::Value::Null => None,
                other => Some(other.to_string()),
            },
        },
        Err(_) => ParsedError {
            error: None,
            message: None,
        },
    }
}

fn error_summary(body: &[u8]) -> String {
    parse_error(body).summary()
}

/// Keep server-provided text short and printable.
fn clip(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    if s.chars().count() > 300 {
        out.push('…');
    }
    out
}

/// What went wrong while a body was arriving, by the error's kind (never its wording).
fn describe_body(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut innermost = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cur {
        innermost = Some(c.to_string());
        cur = c.source();
    }
    match innermost {
        Some(d) => format!("the connection broke before the whole body arrived ({d})"),
        None => "the connection broke before the whole body arrived".into(),
    }
}

/// Classify a reqwest error by its kind and the errors under it (never by its wording).
fn transport_error(e: &reqwest::Error, base: &str) -> TransportError {
    let plain = |message: String, retryable: bool| TransportError {
        message,
        retryable,
        tls: false,
    };
    // The innermost cause; rustls errors travel inside io::Error, whose `source()` skips the
    // wrapped error itself, so look into each io::Error's payload too.
    let mut tls = None;
    let mut innermost: Option<String> = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<rustls::Error>() {
            tls = Some(t.to_string());
        }
        // io::Errors nest (tokio-rustls wraps an io::Error holding the rustls::Error).
        let mut inner = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        while let Some(i) = inner {
            if let Some(t) = i.downcast_ref::<rustls::Error>() {
                tls = Some(t.to_string());
            }
            inner = i
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref());
        }
        innermost = Some(c.to_string());
        cur = c.source();
    }
    if let Some(t) = tls {
        return TransportError {
            message: format!("TLS with Infisical at {base} failed: {t}"),
            retryable: false,
            tls: true,
        };
    }
    let detail = innermost.map(|d| format!(": {d}")).unwrap_or_default();
    if e.is_connect() && e.is_timeout() {
        plain(format!("connecting to Infisical at {base} timed out"), true)
    } else if e.is_timeout() {
        plain(format!("Infisical at {base} did not answer in time"), false)
    } else if e.is_connect() {
        plain(
            format!("cannot connect to Infisical at {base}{detail}"),
            true,
        )
    } else if e.is_redirect() {
        plain(
            format!("Infisical at {base} answered with a redirect, which aap does not follow"),
            false,
        )
    } else {
        plain(
            format!("talking to Infisical at {base} failed{detail}"),
            false,
        )
    }
}

/// `host:port` of a base URL, for hints.
fn host_port(base: &str) -> String {
    let rest = base.split_once("://").map_or(base, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:443")
    }
}

/// The TLS client configuration of every HTTPS client of ours (Infisical, the http-proxy's
/// host): rustls with the ring provider, its safe default versions, `roots` only, HTTP/1.1.
pub(crate) fn tls_config(
    roots: rustls::RootCertStore,
) -> std::result::Result<rustls::ClientConfig, rustls::Error> {
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// Read a PEM CA bundle (not secret; checked like other operator files).
pub(crate) fn load_ca_bundle(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let bytes = crate::fsutil::read_file(
        path,
        crate::fsutil::ReadOpts::config_file("CA bundle", 4 * 1024 * 1024),
    )?;
    let mut certs = Vec::new();
    for item in rustls::pki_types::CertificateDer::pem_slice_iter(&bytes) {
        match item {
            Ok(c) => certs.push(c),
            Err(e) => {
                return Err(Error::config(format!(
                    "CA bundle {} is not valid PEM: {e}",
                    path.display()
                ))
                .hint(format!(
                    "check it: openssl x509 -noout -subject -in {}",
                    shell_quote(&path.to_string_lossy())
                )));
            }
        }
    }
    if certs.is_empty() {
        return Err(Error::config(format!(
            "CA bundle {} holds no certificate",
            path.display()
        ))
        .hint(format!(
            "point infisical.ca_bundle at a PEM file with -----BEGIN CERTIFICATE-----: ls -l {}",
            shell_quote(&path.to_string_lossy())
        )));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in ["127.0.0.1", "localhost", "[::1]", "127.1.2.3", "LOCALHOST"] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["10.0.0.1", "example.org", "[::2]", "127.0.0.1.nip.io"] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn url_split() {
        assert_eq!(
            split_url("https://inf.example.org:8443/base/"),
            Some(("https", "inf.example.org", "/base"))
        );
        assert_eq!(split_url("http://[::1]:80"), Some(("http", "[::1]", "")));
        assert_eq!(split_url("http://user@host"), None);
        assert_eq!(split_url("nope"), None);
    }

    fn cfg(url: &str) -> InfisicalConfig {
        serde_yaml_ng::from_str(&format!("url: {url}\nproject_id: p\n")).unwrap()
    }

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(Client::new(&cfg("http://127.0.0.1:1")).is_ok());
        assert!(Client::new(&cfg("https://example.org")).is_ok());
        let e = Client::new(&cfg("http://example.org")).unwrap_err();
        assert_eq!(e.exit_code(), 78);
        assert!(e.hint_text().unwrap().contains("https://example.org"));
        assert_eq!(Client::new(&cfg("ftp://x")).unwrap_err().exit_code(), 78);
    }

    #[test]
    fn encoding() {
        assert_eq!(enc("/a b/c", true), "/a%20b/c");
        assert_eq!(enc("a/b&c", false), "a%2Fb%26c");
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        for attempt in 1..4 {
            let d = backoff(attempt);
            let base = 100u128 << (attempt - 1);
            assert!(d.as_millis() >= base / 2 && d.as_millis() <= base, "{d:?}");
        }
    }

    #[test]
    fn tokens_are_reused_until_80_percent_or_30_s_before_the_end() {
        assert_eq!(reuse_for(7200), Duration::from_secs(5760));
        assert_eq!(reuse_for(100), Duration::from_secs(70));
        assert_eq!(reuse_for(150), Duration::from_secs(120));
        assert_eq!(reuse_for(30), Duration::ZERO);
        assert_eq!(reuse_for(5), Duration::ZERO);
        assert_eq!(reuse_for(0), Duration::ZERO);
        assert_eq!(
            reuse_for(u64::MAX),
            Duration::from_secs(u64::MAX / 100 * 80 + 12)
        );
    }

    fn answer(status: u16, retry_after: Option<u64>, quota_exhausted: bool) -> Answer {
        Answer {
            status,
            retry_after: retry_after.map(Duration::from_secs),
            quota_exhausted,
            body: Zeroizing::new(Vec::new()),
        }
    }

    #[test]
    fn rate_limits_are_told_by_status_and_headers() {
        assert!(answer(429, None, false).rate_limited());
        assert!(answer(429, Some(3), true).rate_limited());
        // v2024-10 without a license (h1): 500 + retry-after + x-ratelimit-remaining: 0.
        assert!(answer(500, Some(58), true).rate_limited());
        // A plain 500, or one with only one of the two headers, is a server error.
        assert!(!answer(500, None, false).rate_limited());
        assert!(!answer(500, Some(58), false).rate_limited());
        assert!(!answer(500, None, true).rate_limited());
        assert!(!answer(503, Some(5), true).rate_limited());
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = AccessToken::new(SecretBytes::from_slice(b"eyJ-token-value"), 5);
        assert!(!format!("{t:?}").contains("eyJ"));
    }
}
