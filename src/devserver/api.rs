//! The Infisical API subset, in memory, shaped like the recordings: login, one secret, list
//! secrets, list folders, renew and revoke tokens, and the framework's generic 404.

#![forbid(unsafe_code)]

use super::http::{Request, Response, decode};
use super::seed::{Seed, SeedIdentity, glob};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Fault knobs. Counters count down once per (non-admin) request they affect.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Added latency before every answer, in milliseconds.
    pub latency_ms: u64,
    /// Fail the next N requests with `fail_status`.
    pub fail_next: u32,
    /// 429, 500 or 503 (default 503).
    pub fail_status: Option<u16>,
    /// `Retry-After` seconds sent with 429/503 failures and with rate limits (default 58).
    pub retry_after: Option<u64>,
    /// Answer the next N requests as Infisical's rate limiter does (status `rate_limit_status`).
    pub rate_limit_next: u32,
    /// 500 (default: self-hosted without a license, recorded in v2024-10 `h1`: `retry-after`
    /// and `x-ratelimit-remaining: 0` on a 500) or 429 (other releases).
    pub rate_limit_status: Option<u16>,
    /// Answer the next N requests with 200 and a body that is not JSON.
    pub malformed_next: u32,
    /// Send only half of the next N bodies, then close the connection.
    pub close_mid_body_next: u32,
    /// Answer the next N requests with a 2 MiB body (chunked, so no length warns the client).
    pub huge_body_next: u32,
    /// The next N token checks find the token expired (403 TokenError).
    pub expire_tokens_next: u32,
}

/// A change to the knobs, as sent to `POST /_aap/faults`: fields present are set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultPatch {
    pub latency_ms: Option<u64>,
    pub fail_next: Option<u32>,
    pub fail_status: Option<u16>,
    pub retry_after: Option<u64>,
    pub rate_limit_next: Option<u32>,
    pub rate_limit_status: Option<u16>,
    pub malformed_next: Option<u32>,
    pub close_mid_body_next: Option<u32>,
    pub huge_body_next: Option<u32>,
    pub expire_tokens_next: Option<u32>,
    /// Expire every token issued so far, now (they get 403 `TokenError`).
    #[serde(default)]
    pub expire_all_tokens: bool,
    /// Revoke every token issued so far, now (they get 401, as revoked tokens do).
    #[serde(default)]
    pub revoke_all_tokens: bool,
    /// Reset every knob first.
    #[serde(default)]
    pub reset: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// TCP connections accepted (admin connections included).
    pub connections: u64,
    pub requests: u64,
    pub logins: u64,
    pub secret_reads: u64,
    pub revokes: u64,
    pub faults_injected: u64,
}

struct TokenRecord {
    identity: usize,
    created_ms: u64,
    expired: bool,
}

struct SecretRow {
    id: String,
    environment: String,
    path: String,
    key: String,
    value: String,
}

pub struct State {
    pub seed: Seed,
    pub site_url: Mutex<String>,
    key: ring::hmac::Key,
    tokens: Mutex<HashMap<String, TokenRecord>>,
    pub faults: Mutex<Faults>,
    pub stats: Mutex<Stats>,
    rows: Vec<SecretRow>,
    folder_ids: HashMap<String, String>,
    env_id: String,
    created_at: String,
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system RNG works");
    b
}

pub fn uuid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn req_id() -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let b = random_bytes::<14>();
    let s: String = b
        .iter()
        .map(|x| A[usize::from(*x) % A.len()] as char)
        .collect();
    format!("req-{s}")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `2026-11-24T02:07:38.964Z` for a Unix time in milliseconds.
pub fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

pub fn b64url(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

pub fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    b64_decode_with(s, b'-', b'_')
}

/// Standard base64 (`+`, `/`, optional `=` padding), e.g. an HTTP Basic `Authorization` value.
pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    b64_decode_with(s.trim().trim_end_matches('='), b'+', b'/')
}

/// Unpadded base64 whose 62nd and 63rd digits are `c62` and `c63`.
fn b64_decode_with(s: &str, c62: u8, c63: u8) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            _ if c == c62 => 62,
            _ if c == c63 => 63,
            _ => return None,
        } as u32)
    };
    let b = s.as_bytes();
    if b.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::new();
    for c in b.chunks(4) {
        let mut n = 0u32;
        for (i, &x) in c.iter().enumerate() {
            n |= val(x)? << (18 - 6 * i);
        }
        for i in 0..c.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

/// Normalise a secret path as Infisical does: a trailing slash is dropped (except for `/`).
fn norm_path(p: &str) -> String {
    if p.len() > 1 {
        p.trim_end_matches('/').to_string()
    } else {
        p.to_string()
    }
}

fn err(status: u16, message: impl Into<Value>, error: &str) -> Response {
    let body = json!({
        "reqId": req_id(),
        "statusCode": status,
        "message": message.into(),
        "error": error,
    });
    Response::json(status, serde_json::to_vec(&body).unwrap_or_default())
}

fn err_details(status: u16, message: &str, details: Value, error: &str) -> Response {
    let body = json!({
        "reqId": req_id(),
        "statusCode": status,
        "message": message,
        "details": details,
        "error": error,
    });
    Response::json(status, serde_json::to_vec(&body).unwrap_or_default())
}

fn ok(body: Value) -> Response {
    Response::json(200, serde_json::to_vec(&body).unwrap_or_default())
}

const TOKEN_MALFORMED: &str = "The provided access token is malformed. Please use a valid token or generate a new one and try again.";
const TOKEN_EXPIRED: &str = "Your token has expired. Please re-authenticate.";

impl State {
    pub fn new(seed: Seed) -> State {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &random_bytes::<32>());
        let rows = seed
            .secrets
            .iter()
            .map(|s| SecretRow {
                id: uuid(),
                environment: s.environment.clone(),
                path: norm_path(&s.path),
                key: s.key.clone(),
                value: s.value.clone(),
            })
            .collect::<Vec<_>>();
        let mut folder_ids = HashMap::new();
        for r in &rows {
            let mut p = r.path.as_str();
            loop {
                folder_ids
                    .entry(format!("{}\0{p}", r.environment))
                    .or_insert_with(uuid);
                match p.rfind('/') {
                    Some(0) if p != "/" => p = "/",
                    Some(i) if i > 0 => p = &p[..i],
                    _ => break,
                }
            }
        }
        for e in &seed.environments {
            folder_ids.entry(format!("{e}\0/")).or_insert_with(uuid);
        }
        State {
            seed,
            site_url: Mutex::new(String::new()),
            key,
            tokens: Mutex::new(HashMap::new()),
            faults: Mutex::new(Faults::default()),
            stats: Mutex::new(Stats::default()),
            rows,
            folder_ids,
            env_id: uuid(),
            created_at: iso8601(now_ms()),
        }
    }

    pub fn apply(&self, p: FaultPatch) -> Faults {
        let mut f = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        if p.reset {
            *f = Faults::default();
        }
        macro_rules! set {
            ($($n:ident),*) => { $( if let Some(v) = p.$n { f.$n = v; } )* };
        }
        set!(
            latency_ms,
            fail_next,
            rate_limit_next,
            malformed_next,
            close_mid_body_next,
            huge_body_next,
            expire_tokens_next
        );
        if p.fail_status.is_some() {
            f.fail_status = p.fail_status;
        }
        if p.retry_after.is_some() {
            f.retry_after = p.retry_after;
        }
        if p.rate_limit_status.is_some() {
            f.rate_limit_status = p.rate_limit_status;
        }
        if p.expire_all_tokens {
            for t in self
                .tokens
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values_mut()
            {
                t.expired = true;
            }
        }
        if p.revoke_all_tokens {
            self.tokens
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
        f.clone()
    }

    fn identity(&self, i: usize) -> &SeedIdentity {
        &self.seed.identities[i]
    }

    fn issue(&self, identity: usize, jti: &str, created_ms: u64) -> (String, u64) {
        let id = self.identity(identity);
        let now = now_ms() / 1000;
        let exp = now + id.access_token_ttl;
        let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = b64url(
            json!({
                "identityId": format!("identity-{identity}"),
                "identityAccessTokenId": jti,
                "authTokenType": "identityAccessToken",
                "iat": now,
                "exp": exp,
            })
            .to_string()
            .as_bytes(),
        );
        let signing_input = format!("{header}.{payload}");
        let sig = ring::hmac::sign(&self.key, signing_input.as_bytes());
        let _ = created_ms;
        (
            format!("{signing_input}.{}", b64url(sig.as_ref())),
            id.access_token_ttl,
        )
    }

    /// Check a token as Infisical does: malformed / bad signature / expired are 403 TokenError,
    /// unknown (revoked, deleted) is 401. On success: (identity index, token id).
    fn check_token(&self, token: &str) -> Result<(usize, String), Response> {
        let parts: Vec<&str> = token.split('.').collect();
        let malformed = || err(403, TOKEN_MALFORMED, "TokenError");
        if parts.len() != 3 {
            return Err(malformed());
        }
        let payload: Value = b64url_decode(parts[1])
            .and_then(|p| serde_json::from_slice(&p).ok())
            .ok_or_else(malformed)?;
        if b64url_decode(parts[0]).is_none() {
            return Err(malformed());
        }
        let sig = b64url_decode(parts[2]).ok_or_else(malformed)?;
        let input = format!("{}.{}", parts[0], parts[1]);
        if ring::hmac::verify(&self.key, input.as_bytes(), &sig).is_err() {
            return Err(err(403, "invalid signature", "TokenError"));
        }
        let exp = payload["exp"].as_u64().unwrap_or(0);
        if exp * 1000 <= now_ms() {
            return Err(err(403, TOKEN_EXPIRED, "TokenError"));
        }
        {
            let mut f = self.faults.lock().unwrap_or_else(|e| e.into_inner());
            if f.expire_tokens_next > 0 {
                f.expire_tokens_next -= 1;
                return Err(err(403, TOKEN_EXPIRED, "TokenError"));
            }
        }
        let jti = payload["identityAccessTokenId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        match tokens.get(&jti) {
            None => Err(err(
                401,
                "No identity access token found",
                "UnauthorizedError",
            )),
            Some(t) if t.expired => Err(err(403, TOKEN_EXPIRED, "TokenError")),
            Some(t) => Ok((t.identity, jti)),
        }
    }

    fn bearer(&self, req: &Request) -> Result<(usize, String), Response> {
        let token = req
            .header("authorization")
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty());
        match token {
            None => Err(err(401, "Token missing", "UnauthorizedError")),
            Some(t) => self.check_token(t),
        }
    }

    fn stat(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn handle(&self, req: &Request) -> Response {
        let path = req.path().to_string();
        match (req.method.as_str(), path.as_str()) {
            ("POST", "/api/v1/auth/universal-auth/login") => self.login(req),
            ("POST", "/api/v1/auth/token/revoke") => self.revoke(req),
            ("POST", "/api/v1/auth/token/renew") => self.renew(req),
            ("GET", "/api/v3/secrets/raw") => self.list(req),
            ("GET", "/api/v1/folders") => self.folders(req),
            ("GET", p) if p.starts_with("/api/v3/secrets/raw/") => {
                self.get_secret(req, &decode(&p["/api/v3/secrets/raw/".len()..], false))
            }
            ("POST", p) if p.starts_with("/api/v3/secrets/raw/") => self.create_secret(req),
            ("GET", "/api/status") => ok(
                json!({"date": iso8601(now_ms()), "message": "Ok", "emailConfigured": false, "inviteOnlySignup": false, "redisConfigured": false, "secretScanningConfigured": false, "samlDefaultOrgSlug": null, "auditLogStorageDisabled": false}),
            ),
            (m, _) => Response::json(
                404,
                serde_json::to_vec(&json!({
                    "message": format!("Route {m}:{} not found", req.target),
                    "error": "Not Found",
                    "statusCode": 404,
                }))
                .unwrap_or_default(),
            ),
        }
    }

    fn body_json(req: &Request) -> Value {
        serde_json::from_slice(&req.body).unwrap_or(Value::Null)
    }

    /// zod-style 422 for required string fields.
    fn require_strings(body: &Value, fields: &[&str]) -> Result<(), Response> {
        let issues: Vec<Value> = fields
            .iter()
            .filter(|f| !body[**f].is_string())
            .map(|f| {
                let received = match &body[*f] {
                    Value::Null if body.get(*f).is_none() => "undefined",
                    Value::Null => "null",
                    Value::Bool(_) => "boolean",
                    Value::Number(_) => "number",
                    Value::Array(_) => "array",
                    Value::Object(_) => "object",
                    Value::String(_) => "string",
                };
                json!({"code": "invalid_type", "expected": "string", "received": received, "path": [f], "message": "Required"})
            })
            .collect();
        if issues.is_empty() {
            Ok(())
        } else {
            Err(err(422, Value::Array(issues), "ValidationFailure"))
        }
    }

    fn login(&self, req: &Request) -> Response {
        let body = Self::body_json(req);
        if let Err(r) = Self::require_strings(&body, &["clientId", "clientSecret"]) {
            return r;
        }
        let client_id = body["clientId"].as_str().unwrap_or_default();
        let secret = body["clientSecret"].as_str().unwrap_or_default();
        let Some(idx) = self
            .seed
            .identities
            .iter()
            .position(|i| i.client_id == client_id)
        else {
            return err(
                404,
                "No identity with specified client ID was found",
                "NotFound",
            );
        };
        let id = self.identity(idx);
        if !ct_eq(id.client_secret.as_bytes(), secret.as_bytes()) {
            return err(401, "Invalid credentials", "UnauthorizedError");
        }
        let jti = uuid();
        let created = now_ms();
        let (token, ttl) = self.issue(idx, &jti, created);
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                jti,
                TokenRecord {
                    identity: idx,
                    created_ms: created,
                    expired: false,
                },
            );
        self.stat(|s| s.logins += 1);
        ok(json!({
            "accessToken": token,
            "expiresIn": ttl,
            "accessTokenMaxTTL": id.access_token_max_ttl,
            "tokenType": "Bearer",
        }))
    }

    fn token_from_body(&self, req: &Request) -> Result<(usize, String), Response> {
        let body = Self::body_json(req);
        Self::require_strings(&body, &["accessToken"])?;
        self.check_token(body["accessToken"].as_str().unwrap_or_default())
    }

    fn revoke(&self, req: &Request) -> Response {
        match self.token_from_body(req) {
            Err(r) => r,
            Ok((_, jti)) => {
                self.tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&jti);
                self.stat(|s| s.revokes += 1);
                ok(json!({"message": "Successfully revoked access token"}))
            }
        }
    }

    fn renew(&self, req: &Request) -> Response {
        let (idx, jti) = match self.token_from_body(req) {
            Err(r) => return r,
            Ok(x) => x,
        };
        let id = self.identity(idx);
        let created = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&jti)
            .map_or(0, |t| t.created_ms);
        if now_ms() + id.access_token_ttl * 1000 >= created + id.access_token_max_ttl * 1000 {
            // Infisical deletes the token when renewal fails.
            self.tokens
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&jti);
            return err(
                401,
                "Failed to renew MI access token past its Max TTL expiration",
                "UnauthorizedError",
            );
        }
        let (token, ttl) = self.issue(idx, &jti, created);
        ok(json!({
            "accessToken": token,
            "expiresIn": ttl,
            "accessTokenMaxTTL": id.access_token_max_ttl,
            "tokenType": "Bearer",
        }))
    }

    /// Project, membership checks. Returns the identity index.
    fn project_access(&self, req: &Request, idx: usize) -> Result<(), Response> {
        let by_id = req.param("workspaceId");
        let by_slug = req.param("workspaceSlug");
        let project_ok = match (&by_id, &by_slug) {
            (Some(id), _) if !id.is_empty() => {
                if *id != self.seed.project_id {
                    return Err(err(
                        404,
                        format!(
                            "Project with ID '{id}' not found during bot lookup. Are you sure you are using the correct project ID?"
                        ),
                        "NotFound",
                    ));
                }
                true
            }
            (_, Some(slug)) if !slug.is_empty() => {
                if *slug != self.seed.project_slug {
                    return Err(err(
                        404,
                        format!("Project with slug '{slug}' not found"),
                        "NotFound",
                    ));
                }
                true
            }
            _ => false,
        };
        if !project_ok {
            return Err(err(
                400,
                "You must provide workspaceSlug or workspaceId",
                "BadRequest",
            ));
        }
        if !self.identity(idx).member {
            return Err(err(
                403,
                "You are not allowed to access this resource",
                &format!(
                    "Identity is not a member of the specified project with ID '{}'",
                    self.seed.project_id
                ),
            ));
        }
        Ok(())
    }

    fn may_read(&self, idx: usize, env: &str, path: &str) -> bool {
        match &self.identity(idx).read {
            None => true,
            Some(rules) => rules
                .iter()
                .any(|r| glob(&r.environment, env) && glob(&r.path, &norm_path(path))),
        }
    }

    fn denied(&self, idx: usize) -> Response {
        let details: Vec<Value> = self
            .identity(idx)
            .read
            .iter()
            .flatten()
            .map(|r| {
                let mut cond = serde_json::Map::new();
                if r.path != "/**" {
                    cond.insert("secretPath".into(), json!({"$glob": r.path}));
                }
                if r.environment != "*" {
                    cond.insert("environment".into(), json!(r.environment));
                }
                json!({
                    "action": ["describeSecret", "readValue"],
                    "inverted": false,
                    "subject": ["secrets"],
                    "conditions": cond,
                })
            })
            .collect();
        err_details(
            403,
            "You are not allowed to describeSecret on secrets",
            Value::Array(details),
            "PermissionDenied",
        )
    }

    fn folder_exists(&self, env: &str, path: &str) -> bool {
        path.starts_with('/')
            && self
                .folder_ids
                .contains_key(&format!("{env}\0{}", norm_path(path)))
    }

    fn secret_json(&self, r: &SecretRow, with_path: bool) -> Value {
        let mut v = json!({
            "id": r.id,
            "_id": r.id,
            "workspace": self.seed.project_id,
            "environment": r.environment,
            "version": 1,
            "type": "shared",
            "secretKey": r.key,
            "secretValue": r.value,
            "secretComment": "",
            "secretReminderNote": null,
            "secretReminderRepeatDays": null,
            "skipMultilineEncoding": false,
            "createdAt": self.created_at,
            "updatedAt": self.created_at,
            "secretValueHidden": false,
            "tags": [],
            "secretMetadata": [],
        });
        if with_path && let Some(m) = v.as_object_mut() {
            m.insert("isRotatedSecret".into(), json!(false));
            m.insert("rotationId".into(), Value::Null);
            m.insert("secretPath".into(), json!(r.path));
        }
        v
    }

    fn get_secret(&self, req: &Request, key: &str) -> Response {
        let (idx, _) = match self.bearer(req) {
            Ok(x) => x,
            Err(r) => return r,
        };
        if let Err(r) = self.project_access(req, idx) {
            return r;
        }
        let env = req.param("environment").unwrap_or_default();
        let path = req.param("secretPath").unwrap_or_else(|| "/".into());
        if !self.may_read(idx, &env, &path) {
            return self.denied(idx);
        }
        if !self.folder_exists(&env, &path) {
            return err(
                404,
                format!("Folder with path '{path}' in environment with slug '{env}' not found"),
                "GetSecretByName",
            );
        }
        let np = norm_path(&path);
        match self
            .rows
            .iter()
            .find(|r| r.environment == env && r.path == np && r.key == key)
        {
            Some(r) => {
                self.stat(|s| s.secret_reads += 1);
                ok(json!({ "secret": self.secret_json(r, false) }))
            }
            None => err(
                404,
                format!("Secret with name '{key}' not found"),
                "NotFound",
            ),
        }
    }

    fn list(&self, req: &Request) -> Response {
        let (idx, _) = match self.bearer(req) {
            Ok(x) => x,
            Err(r) => return r,
        };
        if let Err(r) = self.project_access(req, idx) {
            return r;
        }
        if self.identity(idx).read.as_ref().is_some_and(Vec::is_empty) {
            return self.denied(idx);
        }
        let env = req.param("environment").unwrap_or_default();
        let path = norm_path(&req.param("secretPath").unwrap_or_else(|| "/".into()));
        let recursive = req.param("recursive").as_deref() == Some("true");
        let under = |p: &str| {
            p == path || (recursive && (path == "/" || p.starts_with(&format!("{path}/"))))
        };
        let secrets: Vec<Value> = self
            .rows
            .iter()
            .filter(|r| r.environment == env && under(&r.path))
            .filter(|r| self.may_read(idx, &env, &r.path))
            .map(|r| self.secret_json(r, true))
            .collect();
        ok(json!({"secrets": secrets, "imports": []}))
    }

    fn folders(&self, req: &Request) -> Response {
        let (idx, _) = match self.bearer(req) {
            Ok(x) => x,
            Err(r) => return r,
        };
        if let Err(r) = self.project_access(req, idx) {
            return r;
        }
        let env = req.param("environment").unwrap_or_default();
        let path = norm_path(&req.param("path").unwrap_or_else(|| "/".into()));
        let parent_id = self
            .folder_ids
            .get(&format!("{env}\0{path}"))
            .cloned()
            .unwrap_or_default();
        let mut names: Vec<(&str, &String)> = self
            .folder_ids
            .iter()
            .filter_map(|(k, id)| {
                let (e, p) = k.split_once('\0')?;
                if e != env || p == "/" {
                    return None;
                }
                let (parent, name) = p.rsplit_once('/')?;
                let parent = if parent.is_empty() { "/" } else { parent };
                (parent == path).then_some((name, id))
            })
            .collect();
        names.sort();
        let folders: Vec<Value> = names
            .into_iter()
            .map(|(name, id)| {
                json!({
                    "id": id, "name": name, "version": 1,
                    "createdAt": self.created_at, "updatedAt": self.created_at,
                    "envId": self.env_id, "parentId": parent_id,
                    "isReserved": false, "description": null, "lastSecretModified": null,
                })
            })
            .collect();
        ok(json!({ "folders": folders }))
    }

    /// The dev-server is read-only: writes are refused like a viewer's.
    fn create_secret(&self, req: &Request) -> Response {
        let (idx, _) = match self.bearer(req) {
            Ok(x) => x,
            Err(r) => return r,
        };
        if !self.identity(idx).member {
            return err(
                403,
                "You are not allowed to access this resource",
                &format!(
                    "Identity is not a member of the specified project with ID '{}'",
                    self.seed.project_id
                ),
            );
        }
        err_details(
            403,
            "You are not allowed to create on secrets",
            json!([]),
            "PermissionDenied",
        )
    }

    /// Infisical's rate limiter's answer. 500: exactly as recorded from an unlicensed
    /// self-hosted release (v2024-10 `h1`): the headers of @fastify/rate-limit and the error
    /// handler's generic 500 body, with no `reqId`. 429: the same headers and Infisical's usual
    /// error body (no 429 body was recorded).
    pub fn rate_limited(status: u16, retry_after: u64) -> Response {
        let r = if status == 429 {
            err(
                429,
                format!("Rate limit exceeded. Please try again in {retry_after} seconds"),
                "Too Many Requests",
            )
        } else {
            Response::json(
                500,
                br#"{"statusCode":500,"message":"Something went wrong","error":"InternalServerError"}"#
                    .to_vec(),
            )
        };
        r.with_header("x-ratelimit-limit", "40")
            .with_header("x-ratelimit-remaining", "0")
            .with_header("x-ratelimit-reset", retry_after.to_string())
            .with_header("retry-after", retry_after.to_string())
    }

    /// The answer for an injected failure.
    pub fn failure(status: u16, retry_after: Option<u64>) -> Response {
        let mut r = match status {
            429 => err(
                429,
                "Rate limit exceeded. Please try again in 60 seconds",
                "Too Many Requests",
            )
            .with_header("x-ratelimit-limit", "40")
            .with_header("x-ratelimit-remaining", "0")
            .with_header("x-ratelimit-reset", retry_after.unwrap_or(60).to_string()),
            500 => err(500, "Something went wrong", "InternalServerError"),
            s => err(s, "Service temporarily unavailable", "ServiceUnavailable"),
        };
        if let Some(ra) = retry_after
            && (status == 429 || status == 503)
        {
            r = r.with_header("retry-after", ra.to_string());
        }
        r
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_roundtrip() {
        for s in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            &[0xff, 0xfe],
        ] {
            assert_eq!(b64url_decode(&b64url(s)).unwrap(), s);
        }
        assert_eq!(b64url(b"foobar"), "Zm9vYmFy");
        assert!(b64url_decode("a").is_none());
        assert!(b64url_decode("a*cd").is_none());
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_795_486_058_964), "2026-11-24T02:07:38.964Z");
    }

    #[test]
    fn uuids_look_like_uuids() {
        let u = uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
