//! Contract tests: every recorded case in tests/fixtures/infisical-api/cases.json is replayed
//! against a real `aap dev-server` process, and status, body (field by field) and the headers
//! that matter are compared with the recording.
//!
//! Volatile values are compared by shape only: `reqId`, access tokens, and the server-generated
//! ids and timestamps of secrets and folders (`id`, `_id`, `envId`, `parentId`, `createdAt`,
//! `updatedAt`). Lists of secrets are compared as sets (Infisical does not sort them).

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

fn fixtures() -> std::path::PathBuf {
    repo().join("tests/fixtures/infisical-api")
}

#[test]
fn fixture_copy_is_identical_to_shared_recordings() {
    let shared = repo().join("../shared/infisical-api");
    if !shared.is_dir() {
        skip(
            "fixture_copy_is_identical_to_shared_recordings",
            &format!(
                "{} does not exist (the copy in tests/fixtures is used as is)",
                shared.display()
            ),
        );
        return;
    }
    fn files(dir: &Path, base: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, base, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_path_buf());
            }
        }
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    files(&shared, &shared, &mut a);
    files(&fixtures(), &fixtures(), &mut b);
    a.sort();
    b.sort();
    assert_eq!(
        a, b,
        "file lists differ; copy ../shared/infisical-api again"
    );
    for f in &a {
        assert_eq!(
            std::fs::read(shared.join(f)).unwrap(),
            std::fs::read(fixtures().join(f)).unwrap(),
            "{} differs from the shared recording",
            f.display()
        );
    }
}

const VOLATILE_ID: &[&str] = &["id", "_id", "envId", "parentId"];
const VOLATILE_TIME: &[&str] = &["createdAt", "updatedAt"];

fn compare(case: &str, at: &str, want: &Value, got: &Value) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            let mut wk: Vec<_> = w.keys().collect();
            let mut gk: Vec<_> = g.keys().collect();
            wk.sort();
            gk.sort();
            assert_eq!(wk, gk, "{case}: keys of {at}");
            for (k, wv) in w {
                let gv = &g[k];
                let here = format!("{at}.{k}");
                if k == "reqId" {
                    assert!(
                        gv.as_str()
                            .is_some_and(|s| s.starts_with("req-") && s.len() == 18),
                        "{case}: {here} = {gv}"
                    );
                } else if k == "accessToken" {
                    assert!(
                        gv.as_str().is_some_and(|s| s.split('.').count() == 3),
                        "{case}: {here} is not a JWT"
                    );
                } else if VOLATILE_ID.contains(&k.as_str()) && wv.is_string() {
                    assert!(
                        gv.as_str()
                            .is_some_and(|s| s.len() == 36 && s.matches('-').count() == 4),
                        "{case}: {here} = {gv} is not a uuid"
                    );
                } else if VOLATILE_TIME.contains(&k.as_str()) && wv.is_string() {
                    assert!(
                        gv.as_str()
                            .is_some_and(|s| s.len() == 24 && s.ends_with('Z')),
                        "{case}: {here} = {gv} is not an ISO time"
                    );
                } else if k == "secrets" {
                    let key = |v: &Value| {
                        format!(
                            "{}\0{}",
                            v["secretPath"],
                            v["secretKey"].as_str().unwrap_or("")
                        )
                    };
                    let mut ws = wv.as_array().unwrap().clone();
                    let mut gs = gv.as_array().expect("secrets is a list").clone();
                    ws.sort_by_key(key);
                    gs.sort_by_key(key);
                    compare(case, &here, &Value::Array(ws), &Value::Array(gs));
                } else {
                    compare(case, &here, wv, gv);
                }
            }
        }
        (Value::Array(w), Value::Array(g)) => {
            assert_eq!(
                w.len(),
                g.len(),
                "{case}: length of {at}: want {want} got {got}"
            );
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                compare(case, &format!("{at}[{i}]"), wv, gv);
            }
        }
        _ => assert_eq!(want, got, "{case}: {at}"),
    }
}

fn substitute(text: &str, vars: &HashMap<String, String>) -> String {
    let mut s = text.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    s
}

fn tamper(token: &str) -> String {
    let (head, _) = token.rsplit_once('.').unwrap();
    format!("{head}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
}

#[test]
fn every_recorded_case_replays_against_dev_server() {
    let dir = tempdir();
    // The recorded world exactly (the built-in seed adds the seed catalog's secrets to it).
    let seed = repo().join("tests/fixtures/recorded-world-seed.yaml");
    let server = DevServer::start(dir.path(), &["--seed", seed.to_str().unwrap()]);
    let cases: Vec<Value> =
        serde_json::from_slice(&std::fs::read(fixtures().join("cases.json")).unwrap()).unwrap();
    let mut vars: HashMap<String, String> = HashMap::new();
    vars.insert("projectId".into(), server.project_id.clone());
    vars.insert("projectSlug".into(), "aap-dev".into());
    vars.insert("siteUrl".into(), server.url.clone());
    for name in ["reader", "noaccess", "outsider", "scoped", "shortttl"] {
        let (id, secret) = seed_identity(name);
        vars.insert(format!("{name}.clientId"), id);
        vars.insert(format!("{name}.clientSecret"), secret);
    }
    let login = |name: &str| -> String {
        let body = serde_json::json!({
            "clientId": seed_identity(name).0, "clientSecret": seed_identity(name).1,
        });
        let (s, _, b) = server.request(
            "POST",
            "/api/v1/auth/universal-auth/login",
            None,
            Some(&body),
        );
        assert_eq!(s, 200);
        let v: Value = serde_json::from_slice(&b).unwrap();
        v["accessToken"].as_str().unwrap().to_string()
    };

    let mut current = String::new(); // the token of the latest login
    let mut by_identity: HashMap<String, String> = HashMap::new();
    let mut renewed = String::new();
    let mut replayed = 0;
    for case in &cases {
        let name = case["case"].as_str().unwrap();
        // Time-dependent cases: instead of waiting 7 s for the 5 s TTL, expire tokens now.
        if name == "err-expired-token" {
            server.faults(serde_json::json!({"expire_all_tokens": true}));
        }
        let token = match name {
            "err-bad-signature-token" => tamper(&by_identity["reader"]),
            "err-expired-renewed-token" => renewed.clone(),
            "err-permission-reader-write" => login("reader"),
            _ => current.clone(),
        };
        let mut local = vars.clone();
        local.insert("token".into(), token.clone());
        let path = substitute(case["path"].as_str().unwrap(), &local);
        let body = (!case["body"].is_null()).then(|| {
            serde_json::from_str::<Value>(&substitute(&case["body"].to_string(), &local)).unwrap()
        });
        let auth = case["authorization"]
            .as_str()
            .map(|a| substitute(a, &local));
        let method = case["method"].as_str().unwrap();
        let (status, headers, got) = server.request(method, &path, auth.as_deref(), body.as_ref());

        assert_eq!(
            u64::from(status),
            case["status"].as_u64().unwrap(),
            "{name}: status; body {}",
            String::from_utf8_lossy(&got)
        );
        let resp_file = fixtures().join(case["response"].as_str().unwrap());
        let want: Value = serde_json::from_str(&substitute(
            &std::fs::read_to_string(&resp_file).unwrap(),
            &local,
        ))
        .unwrap();
        let got_v: Value = serde_json::from_slice(&got)
            .unwrap_or_else(|e| panic!("{name}: body is not JSON ({e})"));
        compare(name, "$", &want, &got_v);

        // Headers that matter: every recorded header is present; content-type and CORS match;
        // content-length is the real length.
        let head_text = std::fs::read_to_string(resp_file.with_extension("headers")).unwrap();
        let mut lines = head_text.lines();
        let status_line = lines.next().unwrap();
        assert!(
            status_line.starts_with(&format!("HTTP/1.1 {status} ")),
            "{name}: {status_line}"
        );
        for l in lines.filter(|l| !l.is_empty()) {
            let (k, v) = l.split_once(':').unwrap();
            let k = k.trim().to_ascii_lowercase();
            let v = substitute(v.trim(), &local);
            let got_v = headers
                .iter()
                .find(|(hk, _)| hk.eq_ignore_ascii_case(&k))
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{name}: header {k} missing"));
            match k.as_str() {
                "content-length" => assert_eq!(got_v, got.len().to_string(), "{name}"),
                _ => assert_eq!(got_v, v, "{name}: header {k}"),
            }
        }

        if status == 200 && name.starts_with("ua-login") {
            current = got_v["accessToken"].as_str().unwrap().to_string();
            let who = case["body"]["clientId"]
                .as_str()
                .unwrap()
                .trim_start_matches('{')
                .split('.')
                .next()
                .unwrap()
                .to_string();
            by_identity.insert(who, current.clone());
        }
        if name == "token-renew-ok" {
            renewed = got_v["accessToken"].as_str().unwrap().to_string();
        }
        replayed += 1;
    }
    assert_eq!(replayed, cases.len());
    assert!(replayed >= 40, "only {replayed} cases");
}

#[test]
fn dev_server_refuses_non_loopback_without_the_flag() {
    let dir = tempdir();
    let o = run(cmd(AAP, dir.path()).args(["dev-server", "--listen", "0.0.0.0:0"]));
    assert_fails(&o, 78, "not a loopback address");
    assert!(
        stderr(&o).contains("hint: listen on loopback"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn dev_server_tls_ca_is_readable_by_all_and_writable_by_its_creator_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    let server = DevServer::start(dir.path(), &["--tls"]);
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    let ca = server.ca.clone().expect("ca= on the ready line");
    assert!(
        ca.starts_with(dir.path()),
        "CA not under $TMPDIR: {}",
        ca.display()
    );
    // Every uid the server serves (an agent's child holding a scoped token) must be able to
    // trust it, so the CA is readable by all; nobody but its creator can swap it.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(ca.parent().unwrap()), 0o755);
    assert_eq!(mode(&ca), 0o644);
    assert!(
        std::fs::read_to_string(&ca)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    let (s, _, _) = server.request("GET", "/api/status", None, None);
    assert_eq!(s, 200);
}

#[test]
fn admin_endpoint_changes_knobs_while_running() {
    let dir = tempdir();
    let server = DevServer::start(dir.path(), &["--fail-next", "1", "--fail-status", "500"]);
    let (s, _, _) = server.request("GET", "/api/status", None, None);
    assert_eq!(s, 500, "flag knob applies");
    let (s, _, _) = server.request("GET", "/api/status", None, None);
    assert_eq!(s, 200, "one failure only");
    server.faults(serde_json::json!({"fail_next": 1, "fail_status": 429, "retry_after": 2}));
    let (s, h, b) = server.request("GET", "/api/status", None, None);
    assert_eq!(s, 429);
    assert!(
        h.iter().any(|(k, v)| k == "retry-after" && v == "2"),
        "{h:?}"
    );
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["statusCode"], 429);
    server.faults(serde_json::json!({"malformed_next": 1}));
    let (s, _, b) = server.request("GET", "/api/status", None, None);
    assert_eq!(s, 200);
    assert!(serde_json::from_slice::<Value>(&b).is_err());
    let stats = server.stats();
    assert_eq!(stats["faults_injected"], 3, "{stats}");
    let (s, _, _) = server.request(
        "POST",
        "/_aap/faults",
        None,
        Some(&serde_json::json!({"nope": 1})),
    );
    assert_eq!(s, 400, "unknown knobs are refused");
}

#[test]
fn dev_server_serves_a_custom_seed_and_refuses_a_bad_one() {
    let dir = tempdir();
    let seed = dir.path().join("seed.yaml");
    write(
        &seed,
        "project_id: p-1\nproject_slug: demo\nsecrets:\n  - {environment: staging, path: /a/b, key: K, value: v-1}\nidentities:\n  - {name: ci, client_id: ci-id, client_secret: ci-secret, read: [{environment: staging, path: /a/**}]}\n",
    );
    let server = DevServer::start(dir.path(), &["--seed", seed.to_str().unwrap()]);
    assert_eq!(server.project_id, "p-1");
    let body = serde_json::json!({"clientId": "ci-id", "clientSecret": "ci-secret"});
    let (s, _, b) = server.request(
        "POST",
        "/api/v1/auth/universal-auth/login",
        None,
        Some(&body),
    );
    assert_eq!(s, 200);
    let token = serde_json::from_slice::<Value>(&b).unwrap()["accessToken"]
        .as_str()
        .unwrap()
        .to_string();
    let auth = format!("Bearer {token}");
    let (s, _, b) = server.request(
        "GET",
        "/api/v3/secrets/raw/K?workspaceSlug=demo&environment=staging&secretPath=/a/b",
        Some(&auth),
        None,
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["secret"]["secretValue"],
        "v-1"
    );
    // The glob /a/** does not reach another environment.
    let (s, _, _) = server.request(
        "GET",
        "/api/v3/secrets/raw/K?workspaceId=p-1&environment=prod&secretPath=/a/b",
        Some(&auth),
        None,
    );
    assert_eq!(s, 403);

    drop(server);

    // `extends: builtin`: one identity of your own, next to the built-in world.
    write(
        &seed,
        "extends: builtin\nidentities:\n  - {name: ci, client_id: ci-id, client_secret: ci-secret, read: [{path: /forgejo}]}\n",
    );
    let server = DevServer::start(dir.path(), &["--seed", seed.to_str().unwrap()]);
    for (id, secret) in [
        ("ci-id".to_string(), "ci-secret".to_string()),
        seed_identity("app-reader"),
        seed_identity("reader"),
    ] {
        let body = serde_json::json!({"clientId": id, "clientSecret": secret});
        let (s, _, _) = server.request(
            "POST",
            "/api/v1/auth/universal-auth/login",
            None,
            Some(&body),
        );
        assert_eq!(s, 200, "{id}");
    }
    drop(server);

    write(
        &seed,
        "project_id: p\nsecrets: [{path: no-slash, key: K, value: v}]\n",
    );
    let o = run(cmd(AAP, dir.path()).args(["dev-server", "--seed", seed.to_str().unwrap()]));
    assert_fails(&o, 78, "invalid seed");
    assert!(stderr(&o).contains("hint: fix"), "{}", stderr(&o));
}

#[test]
fn dev_server_removes_its_ca_directory_on_sigterm() {
    let dir = tempdir();
    let mut server = DevServer::start(dir.path(), &["--tls"]);
    let ca_dir = server.ca.clone().unwrap().parent().unwrap().to_path_buf();
    assert!(ca_dir.is_dir());
    let st = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(!ca_dir.exists(), "{} left behind", ca_dir.display());
}

/// The rate-limit knob answers exactly like the recorded unlicensed v2024-10 server (`h1`):
/// status 500, the four rate-limit headers, and the body byte-for-byte in shape and values;
/// and the secret read after it is the recorded `h2`/`i5` answer.
#[test]
fn rate_limit_knob_answers_like_the_recorded_v2024_10_server() {
    let dir = tempdir();
    let server = DevServer::start(dir.path(), &["--rate-limit-next", "1"]);
    let rec: Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("v2024-10/h1_rate_limit_secret_reads.json")).unwrap(),
    )
    .unwrap();
    let path = rec["path"]
        .as_str()
        .unwrap()
        .replace("{projectId}", &server.project_id);
    let (s, h, b) = server.request("GET", &path, Some("Bearer not-even-looked-at"), None);
    assert_eq!(u64::from(s), rec["status"].as_u64().unwrap());
    for (k, v) in rec["responseHeaders"].as_object().unwrap() {
        let got = h
            .iter()
            .find(|(hk, _)| hk.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.as_str());
        assert_eq!(got, v.as_str(), "header {k}: {h:?}");
    }
    let body: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(body, rec["response"], "body");
    assert_eq!(server.stats()["faults_injected"], 1);

    // 429 (other releases): the same headers with the wanted retry-after.
    server.faults(
        serde_json::json!({"rate_limit_next": 1, "rate_limit_status": 429, "retry_after": 7}),
    );
    let (s, h, b) = server.request("GET", &path, None, None);
    assert_eq!(s, 429);
    for (k, v) in [
        ("retry-after", "7"),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-limit", "40"),
        ("x-ratelimit-reset", "7"),
    ] {
        assert!(h.iter().any(|(hk, hv)| hk == k && hv == v), "{k}: {h:?}");
    }
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["statusCode"],
        429
    );
    // A plain 500 from --fail-status carries neither header: not a rate limit.
    server.faults(serde_json::json!({"fail_next": 1, "fail_status": 500}));
    let (s, h, _) = server.request("GET", "/api/status", None, None);
    assert_eq!(s, 500);
    assert!(
        !h.iter()
            .any(|(k, _)| k == "retry-after" || k.starts_with("x-ratelimit")),
        "{h:?}"
    );
}
