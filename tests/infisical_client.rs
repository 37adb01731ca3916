//! The Infisical client against a real `aap dev-server` process: every error row of issue 4's
//! table with its exit code, retries (Retry-After honoured, never on 4xx), re-login on an
//! expired or revoked token, oversized/malformed/cut-short bodies, TLS and timeouts.
//!
//! Each process test runs `aap infisical check` at `AAP_LOG=trace` and then checks that no
//! secret value of the seed appears in its stdout, stderr or any file under its `$TMPDIR`.

mod common;

use common::*;
use std::path::Path;
use std::process::Output;

/// Secret values that must never show (FORGEJO_URL is a URL, not a secret).
fn secrets() -> Vec<String> {
    seed_secret_values()
        .into_iter()
        .filter(|v| !v.starts_with("http://"))
        .collect()
}

fn check(dir: &Path, cfg: &Path, secret: &str) -> Output {
    let o = run(cmd(AAP, dir)
        .env("AAP_CONFIG", cfg)
        .env("AAP_LOG", "trace")
        .args(["infisical", "check", "--agent", "codex", secret]));
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert_no_leak(&secrets(), &all, dir);
    o
}

fn expect(o: &Output, exit: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(code(o), exit, "stderr: {err}");
    assert!(err.contains(needle), "wanted {needle:?} in: {err}");
    assert!(err.contains("aap: hint: "), "no hint in: {err}");
}

fn setup(
    identity: &str,
    args: &[&str],
    extra: &str,
) -> (tempfile::TempDir, DevServer, std::path::PathBuf) {
    let dir = tempdir();
    let server = DevServer::start(dir.path(), args);
    let cfg = infisical_config(dir.path(), &server, identity, extra);
    (dir, server, cfg)
}

#[test]
fn fetches_a_multiline_key_over_tls_with_the_ca_bundle_on_one_connection() {
    let (dir, server, cfg) = setup("reader", &["--tls"], "");
    let before = server.stats();
    let o = check(dir.path(), &cfg, "prod:/ssh:SSH_PRIVATE_KEY");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let want = seed_secret_values()
        .into_iter()
        .find(|v| v.starts_with("-----BEGIN OPENSSH"))
        .unwrap();
    assert!(
        stdout(&o).contains(&format!("({} bytes)", want.len())),
        "{}",
        stdout(&o)
    );
    let after = server.stats();
    assert_eq!(after["logins"], 1);
    assert_eq!(after["secret_reads"], 1);
    assert_eq!(after["revokes"], 1, "the token is revoked at the end");
    // login, read and revoke share one connection (+1 for this stats request itself).
    assert_eq!(
        after["connections"].as_u64().unwrap() - before["connections"].as_u64().unwrap(),
        2,
        "{before} -> {after}"
    );
    // Trace output is there (so the leak check looked at real logging).
    assert!(stderr(&o).contains("infisical request"), "{}", stderr(&o));
}

#[test]
fn default_environment_comes_from_the_config() {
    let (dir, _server, cfg) = setup("reader", &[], "  environment: prod\n");
    let o = check(dir.path(), &cfg, "/app:DB_PASSWORD");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("(18 bytes)"), "{}", stdout(&o));
}

#[test]
fn wrong_client_secret_is_77_and_not_retried() {
    let (dir, server, cfg) = setup("reader", &[], "");
    std::fs::write(
        dir.path().join("identity/client_secret"),
        "wrong-secret-value-123\n",
    )
    .unwrap();
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    expect(
        &o,
        77,
        "wrong client secret (401 UnauthorizedError: Invalid credentials)",
    );
    assert!(!stderr(&o).contains("wrong-secret-value-123"));
    assert_eq!(server.stats()["requests"], 1, "4xx is never retried");
}

#[test]
fn unknown_client_id_is_77() {
    let (dir, _server, cfg) = setup("reader", &[], "");
    write(
        &dir.path().join("identity/client_id"),
        "00000000-0000-0000-0000-000000000000\n",
    );
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    expect(
        &o,
        77,
        "no machine identity with the client id 00000000-0000-0000-0000-000000000000",
    );
}

#[test]
fn identity_without_permission_is_77() {
    for (identity, secret, needle) in [
        (
            "noaccess",
            "prod:/forgejo:FORGEJO_TOKEN",
            "permission denied (403 PermissionDenied",
        ),
        (
            "scoped",
            "prod:/app:DB_PASSWORD",
            "permission denied (403 PermissionDenied",
        ),
        (
            "outsider",
            "prod:/forgejo:FORGEJO_TOKEN",
            "not a member of the specified project",
        ),
    ] {
        let (dir, _server, cfg) = setup(identity, &[], "");
        let o = check(dir.path(), &cfg, secret);
        expect(&o, 77, needle);
        assert!(
            stderr(&o).contains(secret),
            "names the secret: {}",
            stderr(&o)
        );
    }
}

#[test]
fn unknown_secret_environment_path_and_project_are_78() {
    let (dir, _server, cfg) = setup("reader", &[], "");
    for (secret, needle) in [
        (
            "prod:/forgejo:NOPE_NOT_HERE",
            "no secret NOPE_NOT_HERE at path /forgejo in environment prod",
        ),
        (
            "nope:/forgejo:FORGEJO_TOKEN",
            "no secret FORGEJO_TOKEN at path /forgejo in environment nope",
        ),
        (
            "prod:/does-not-exist:FORGEJO_TOKEN",
            "no secret FORGEJO_TOKEN at path /does-not-exist in environment prod",
        ),
        (
            "prod:/app:FORGEJO_TOKEN",
            "no secret FORGEJO_TOKEN at path /app",
        ),
    ] {
        let o = check(dir.path(), &cfg, secret);
        expect(&o, 78, needle);
        // Told by status and request, not by wording: the server's own text is quoted.
        let quoted = if secret.contains("NOPE") || secret.starts_with("prod:/app:") {
            "(404 NotFound: Secret with name"
        } else {
            "(404 GetSecretByName: Folder with path"
        };
        expect(&o, 78, quoted);
    }
    let (dir, server, _) = setup("reader", &[], "");
    let text = std::fs::read_to_string(dir.path().join("config.yaml"))
        .unwrap()
        .replace(&server.project_id, "00000000-0000-0000-0000-000000000000");
    write(&dir.path().join("config.yaml"), text);
    let o = check(
        dir.path(),
        &dir.path().join("config.yaml"),
        "prod:/app:DB_PASSWORD",
    );
    expect(
        &o,
        78,
        "of project 00000000-0000-0000-0000-000000000000; the project, the environment, the folder or the key does not exist (404 NotFound: Project with ID",
    );
}

#[test]
fn expired_token_relogs_once_then_succeeds() {
    let (dir, server, cfg) = setup("reader", &["--expire-tokens-next", "1"], "");
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let s = server.stats();
    assert_eq!(s["logins"], 2, "{s}");
    assert_eq!(s["secret_reads"], 1, "{s}");
}

#[test]
fn expired_token_after_a_fresh_login_fails_77() {
    let (dir, server, cfg) = setup("reader", &["--expire-tokens-next", "2"], "");
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    expect(&o, 77, "again, right after a fresh login");
    assert_eq!(server.stats()["logins"], 2, "re-login exactly once");
}

#[test]
fn unreachable_server_is_69_after_3_attempts() {
    let dir = tempdir();
    // A port that was just free: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = DevServer::start(dir.path(), &[]);
    let cfg = infisical_config(dir.path(), &server, "reader", "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&server.url, &format!("http://127.0.0.1:{port}"));
    write(&cfg, text);
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    expect(&o, 69, "cannot connect to Infisical");
    assert!(stderr(&o).contains("after 3 attempts"), "{}", stderr(&o));
}

#[test]
fn untrusted_certificate_is_69() {
    let (dir, server, cfg) = setup("reader", &["--tls"], "");
    // Without the dev CA: the built-in webpki roots do not trust it.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let no_ca: String = text
        .lines()
        .filter(|l| !l.contains("ca_bundle"))
        .map(|l| format!("{l}\n"))
        .collect();
    write(&cfg, no_ca);
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    expect(&o, 69, "TLS with Infisical");
    assert!(
        stderr(&o).to_lowercase().contains("certificate"),
        "{}",
        stderr(&o)
    );
    // Trusting another throwaway CA is no better.
    let other = DevServer::start(dir.path(), &["--tls"]);
    let with_other = text.replace(
        &server.ca.as_ref().unwrap().display().to_string(),
        &other.ca.as_ref().unwrap().display().to_string(),
    );
    write(&cfg, with_other);
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    expect(&o, 69, "TLS with Infisical");
    assert_eq!(server.stats()["requests"], 0);
}

#[test]
fn timeout_is_69() {
    let (dir, _server, cfg) = setup("reader", &["--latency-ms", "3000"], "  timeout: 1s\n");
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    expect(&o, 69, "did not answer in time");
}

#[test]
fn server_errors_are_retried_then_69() {
    let (dir, server, cfg) = setup("reader", &["--fail-next", "5", "--fail-status", "503"], "");
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    expect(&o, 69, "answered 503 after 3 attempts");
    assert_eq!(server.stats()["requests"], 3);
}

#[test]
fn one_server_error_is_retried_and_succeeds() {
    let (dir, server, cfg) = setup("reader", &["--fail-next", "1", "--fail-status", "500"], "");
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // failed login, login, read, revoke
    assert_eq!(server.stats()["requests"], 4);
}

#[test]
fn rate_limit_honours_retry_after() {
    let (dir, server, cfg) = setup(
        "reader",
        &[
            "--fail-next",
            "2",
            "--fail-status",
            "429",
            "--retry-after",
            "1",
        ],
        "",
    );
    let started = std::time::Instant::now();
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Correctness, not speed: two waits of Retry-After: 1 s cannot take less than 2 s.
    assert!(started.elapsed() >= std::time::Duration::from_secs(2));
    assert_eq!(server.stats()["requests"], 5);
    assert!(stderr(&o).contains("wait_ms=1000"), "{}", stderr(&o));
}

#[test]
fn rate_limit_with_a_long_retry_after_fails_at_once() {
    let (dir, server, cfg) = setup(
        "reader",
        &[
            "--fail-next",
            "3",
            "--fail-status",
            "429",
            "--retry-after",
            "60",
        ],
        "",
    );
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    expect(&o, 69, "asks to wait 60 s");
    assert_eq!(server.stats()["requests"], 1);
}

/// The recorded v2024-10 rate limit (500 + retry-after + x-ratelimit-remaining: 0) and a 429,
/// each waited out when retry-after fits infisical.timeout, with one progress line.
#[test]
fn rate_limit_500_and_429_are_waited_out_with_one_line() {
    for status in ["500", "429"] {
        let (dir, server, cfg) = setup(
            "reader",
            &[
                "--rate-limit-next",
                "1",
                "--rate-limit-status",
                status,
                "--retry-after",
                "1",
            ],
            "",
        );
        let started = std::time::Instant::now();
        let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
        assert_eq!(code(&o), 0, "{status}: {}", stderr(&o));
        assert!(started.elapsed() >= std::time::Duration::from_secs(1));
        let line = "aap: waiting 1 s for Infisical's rate limit\n";
        assert_eq!(
            stderr(&o).matches(line).count(),
            1,
            "{status}: {}",
            stderr(&o)
        );
        // rate-limited login, login, read, revoke
        assert_eq!(server.stats()["requests"], 4, "{status}");
    }
}

#[test]
fn rate_limit_500_longer_than_the_timeout_is_69_naming_the_wait() {
    for status in ["500", "429"] {
        let (dir, server, cfg) = setup(
            "reader",
            &["--rate-limit-next", "1", "--rate-limit-status", status],
            "",
        );
        let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
        // The recorded wait is 58 s; the default infisical.timeout is 10 s.
        expect(&o, 69, "is rate limiting");
        expect(&o, 69, "asks to wait 58 s");
        expect(
            &o,
            69,
            "hint: run the same command again in 58 s (sleep 58)",
        );
        assert!(
            !stderr(&o).contains("for Infisical's rate limit"),
            "{}",
            stderr(&o)
        );
        assert!(
            !stderr(&o).contains("check the Infisical server's health"),
            "{}",
            stderr(&o)
        );
        assert_eq!(server.stats()["requests"], 1, "{status}: no retry");
    }
    // With infisical.timeout above the wait, the same answer is waited out.
    let (dir, _server, cfg) = setup(
        "reader",
        &["--rate-limit-next", "1", "--retry-after", "2"],
        "  timeout: 3s\n",
    );
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let (dir, _server, cfg) = setup(
        "reader",
        &["--rate-limit-next", "1", "--retry-after", "3"],
        "  timeout: 3s\n",
    );
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    expect(
        &o,
        69,
        "asks to wait 3 s, longer than the request's timeout",
    );
}

#[test]
fn plain_500_is_a_server_error_not_a_rate_limit() {
    let (dir, server, cfg) = setup("reader", &["--fail-next", "5", "--fail-status", "500"], "");
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    expect(&o, 69, "answered 500 after 3 attempts");
    assert!(!stderr(&o).contains("rate limit"), "{}", stderr(&o));
    assert_eq!(server.stats()["requests"], 3);
}

#[test]
fn body_over_one_mib_is_69() {
    let (dir, _server, cfg) = setup("reader", &["--huge-body-next", "1"], "");
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    expect(&o, 69, "body over 1048576 bytes");
}

#[test]
fn malformed_json_is_69() {
    let (dir, _server, cfg) = setup("reader", &["--malformed-next", "1"], "");
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    expect(&o, 69, "answered 200 but the body is not a login answer");
}

#[test]
fn connection_closed_mid_body_is_69() {
    for tls in [false, true] {
        let args: &[&str] = if tls {
            &["--close-mid-body-next", "1", "--tls"]
        } else {
            &["--close-mid-body-next", "1"]
        };
        let (dir, _server, cfg) = setup("reader", args, "");
        let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
        expect(&o, 69, "failed while reading the answer");
    }
}

#[test]
fn identity_from_the_environment() {
    let (dir, _server, cfg) = setup("reader", &[], "");
    // An agent that is not in the config: the INFISICAL_UNIVERSAL_AUTH_* variables are used.
    let (id, secret) = seed_identity("scoped");
    let o = run(cmd(AAP, dir.path())
        .env("AAP_CONFIG", &cfg)
        .env("AAP_LOG", "trace")
        .env("INFISICAL_UNIVERSAL_AUTH_CLIENT_ID", &id)
        .env("INFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET", &secret)
        .args([
            "infisical",
            "check",
            "--agent",
            "other",
            "prod:/forgejo:FORGEJO_TOKEN",
        ]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_no_leak(
        &secrets(),
        &format!("{}{}", stdout(&o), stderr(&o)),
        dir.path(),
    );
    let o = run(cmd(AAP, dir.path()).env("AAP_CONFIG", &cfg).args([
        "infisical",
        "check",
        "--agent",
        "other",
        "prod:/forgejo:FORGEJO_TOKEN",
    ]));
    expect(&o, 78, "no Infisical identity for agent other");
}

#[test]
fn readable_secret_file_is_refused_with_chmod_hint() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, server, cfg) = setup("reader", &[], "");
    let f = dir.path().join("identity/client_secret");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    expect(&o, 78, "a secret file must be private");
    assert!(
        stderr(&o).contains(&format!("hint: chmod 600 {}", f.display())),
        "{}",
        stderr(&o)
    );
    assert_eq!(server.stats()["requests"], 0);
}

#[test]
fn plain_http_to_a_remote_host_is_refused() {
    let (dir, server, cfg) = setup("reader", &[], "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&server.url, "http://infisical.example.org");
    write(&cfg, text);
    let o = check(dir.path(), &cfg, "prod:/app:DB_PASSWORD");
    expect(&o, 78, "not a loopback address");
}

// ---- in-process: the library API the exec path uses -------------------------------------------

mod library {
    use super::*;
    use aap::devserver::{self, api::FaultPatch};
    use aap::secret::SecretBytes;
    use aap::source::{Client, Identity};

    fn client_for(h: &devserver::Handle) -> Client {
        let mut yaml = format!("url: {}\nproject_id: {}\n", h.url(), h.seed().project_id);
        if let Some(ca) = h.ca_path() {
            yaml.push_str(&format!("ca_bundle: {}\n", ca.display()));
        }
        Client::new(&serde_yaml_ng::from_str(&yaml).unwrap()).unwrap()
    }

    fn reader() -> Identity {
        let (id, secret) = seed_identity("reader");
        Identity::new(
            "agent test",
            &id,
            SecretBytes::from_slice(secret.as_bytes()),
        )
    }

    fn sref(env: &str, path: &str, key: &str) -> aap::catalog::SecretRef {
        aap::catalog::SecretRef {
            path: path.into(),
            key: key.into(),
            environment: Some(env.into()),
        }
    }

    fn named(name: &str) -> Identity {
        let (id, secret) = seed_identity(name);
        Identity::new(
            &format!("agent {name}"),
            &id,
            SecretBytes::from_slice(secret.as_bytes()),
        )
    }

    const DB: (&str, &str, &str) = ("prod", "/app", "DB_PASSWORD");

    fn fetch_db(c: &Client, id: &Identity) -> aap::error::Result<SecretBytes> {
        c.fetch(id, &sref(DB.0, DB.1, DB.2), "prod", &|l| {
            panic!("no progress expected: {l}")
        })
    }

    #[test]
    fn a_warm_token_makes_one_secret_read_per_fetch() {
        let h = devserver::spawn(devserver::Options::default()).unwrap();
        let c = client_for(&h);
        let id = reader();
        assert_eq!(fetch_db(&c, &id).unwrap().expose(), b"app-db-pass-s3cr3t");
        let before = h.stats();
        let v = c
            .fetch(
                &id,
                &sref("prod", "/ssh", "SSH_PUBLIC_KEY"),
                "prod",
                &|_| {},
            )
            .unwrap();
        assert!(v.expose().starts_with(b"ssh-ed25519 "));
        let after = h.stats();
        assert_eq!(after.logins, 1, "one login for both fetches");
        assert_eq!(
            after.requests - before.requests,
            1,
            "the second fetch is one request"
        );
        assert_eq!(after.secret_reads, 2);
        assert_eq!(after.revokes, 0, "fetch never revokes");
        c.revoke_cached().unwrap();
        assert_eq!(h.stats().revokes, 1);
        fetch_db(&c, &id).unwrap();
        assert_eq!(h.stats().logins, 2, "after revoke_cached, a fresh login");
    }

    #[test]
    fn expired_and_revoked_tokens_are_renewed_transparently() {
        let h = devserver::spawn(devserver::Options::default()).unwrap();
        let c = client_for(&h);
        let id = reader();
        fetch_db(&c, &id).unwrap();
        // 403 TokenError (expired) ...
        h.set_faults(FaultPatch {
            expire_all_tokens: true,
            ..Default::default()
        });
        assert_eq!(fetch_db(&c, &id).unwrap().expose(), b"app-db-pass-s3cr3t");
        assert_eq!(h.stats().logins, 2);
        // ... and 401 (revoked) both mean: log in again, once.
        h.set_faults(FaultPatch {
            revoke_all_tokens: true,
            ..Default::default()
        });
        assert_eq!(fetch_db(&c, &id).unwrap().expose(), b"app-db-pass-s3cr3t");
        let s = h.stats();
        assert_eq!((s.logins, s.secret_reads), (3, 3));
        // The renewed token is cached in turn.
        fetch_db(&c, &id).unwrap();
        assert_eq!(h.stats().logins, 3);
    }

    #[test]
    fn a_token_near_its_end_is_not_reused() {
        // shortttl's tokens live 5 s: under the 30 s margin, so every fetch logs in.
        let h = devserver::spawn(devserver::Options::default()).unwrap();
        let c = client_for(&h);
        let id = named("shortttl");
        fetch_db(&c, &id).unwrap();
        fetch_db(&c, &id).unwrap();
        assert_eq!(h.stats().logins, 2);
    }

    #[test]
    fn tokens_are_kept_per_identity_and_never_lent_to_another_secret() {
        let h = devserver::spawn(devserver::Options::default()).unwrap();
        let c = client_for(&h);
        let (reader, scoped) = (reader(), named("scoped"));
        let fj = sref("prod", "/forgejo", "FORGEJO_TOKEN");
        fetch_db(&c, &reader).unwrap();
        c.fetch(&scoped, &fj, "prod", &|_| {}).unwrap();
        // scoped's token cannot read /app: the cache did not hand it reader's.
        let e = c.fetch(
            &scoped,
            &sref("prod", "/app", "DB_PASSWORD"),
            "prod",
            &|_| {},
        );
        assert_eq!(e.unwrap_err().exit_code(), 77);
        fetch_db(&c, &reader).unwrap();
        assert_eq!(h.stats().logins, 2, "one login per identity");
        // Same client id, wrong secret: the warm token is not used; the login fails.
        let wrong = Identity::new(
            "agent test",
            reader.client_id(),
            SecretBytes::from_slice(b"not-the-secret"),
        );
        let e = fetch_db(&c, &wrong).unwrap_err();
        assert_eq!(e.exit_code(), 77);
        assert!(
            e.message().contains("wrong client secret"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn login_gives_a_fresh_token_that_is_not_cached() {
        let h = devserver::spawn(devserver::Options::default()).unwrap();
        let c = client_for(&h);
        let id = reader();
        let t = c.login(&id).unwrap();
        assert!(t.expires_in() > 0);
        fetch_db(&c, &id).unwrap();
        assert_eq!(h.stats().logins, 2, "fetch did not reuse login()'s token");
        c.revoke(&t).unwrap();
        let e = c
            .get_secret(&t, &h.seed().project_id, "prod", "/app", "DB_PASSWORD")
            .unwrap_err();
        assert_eq!(e.exit_code(), 77);
        assert!(e.message().contains("401"), "{}", e.message());
        // Revoking that token left the cached one alone.
        fetch_db(&c, &id).unwrap();
        assert_eq!(h.stats().logins, 2);
    }

    #[test]
    fn eight_threads_share_one_client_and_one_login() {
        let h = devserver::spawn(devserver::Options {
            tls: true,
            ..Default::default()
        })
        .unwrap();
        let c = std::sync::Arc::new(client_for(&h));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let id = if i % 2 == 0 {
                        reader()
                    } else {
                        named("scoped")
                    };
                    let r = if i % 2 == 0 {
                        sref("prod", "/app", "DB_PASSWORD")
                    } else {
                        sref("prod", "/forgejo", "FORGEJO_TOKEN")
                    };
                    for _ in 0..5 {
                        let v = c.fetch(&id, &r, "prod", &|_| {}).unwrap();
                        assert!(!v.is_empty());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = h.stats();
        assert_eq!(s.secret_reads, 40);
        assert_eq!(s.logins, 2, "one login per identity, however many threads");
        // Renewal under contention: every token refused at once, still one login each.
        h.set_faults(FaultPatch {
            revoke_all_tokens: true,
            ..Default::default()
        });
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || fetch_db(&c, &reader()).unwrap())
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap().expose(), b"app-db-pass-s3cr3t");
        }
        assert_eq!(h.stats().logins, 3);
    }

    fn with_progress(c: &Client, id: &Identity) -> (aap::error::Result<SecretBytes>, Vec<String>) {
        let lines = std::sync::Mutex::new(Vec::new());
        let r = c.fetch(id, &sref(DB.0, DB.1, DB.2), "prod", &|l| {
            lines.lock().unwrap().push(l.to_string())
        });
        (r, lines.into_inner().unwrap())
    }

    #[test]
    fn rate_limits_are_waited_out_or_fail_69_naming_the_wait() {
        let h = devserver::spawn(devserver::Options::default()).unwrap();
        let c = client_for(&h);
        let id = reader();
        fetch_db(&c, &id).unwrap(); // warm: the next fetch is one secret read
        for status in [500, 429] {
            h.set_faults(FaultPatch {
                rate_limit_next: Some(1),
                rate_limit_status: Some(status),
                retry_after: Some(1),
                ..Default::default()
            });
            let started = std::time::Instant::now();
            let (r, lines) = with_progress(&c, &id);
            assert_eq!(r.unwrap().expose(), b"app-db-pass-s3cr3t", "{status}");
            assert!(started.elapsed() >= std::time::Duration::from_secs(1));
            assert_eq!(
                lines,
                ["waiting 1 s for Infisical's rate limit"],
                "{status}"
            );

            // The recorded 58 s does not fit the default 10 s timeout: 69 at once.
            h.set_faults(FaultPatch {
                rate_limit_next: Some(1),
                retry_after: Some(58),
                ..Default::default()
            });
            let before = h.stats().requests;
            let (r, lines) = with_progress(&c, &id);
            let e = r.unwrap_err();
            assert_eq!(e.exit_code(), 69, "{}", e.message());
            assert!(e.message().contains("asks to wait 58 s"), "{}", e.message());
            let quoted = if status == 500 {
                "(500 InternalServerError: Something went wrong)"
            } else {
                "(429 Too Many Requests: Rate limit exceeded."
            };
            assert!(
                e.message().contains(quoted),
                "the server's message is quoted: {}",
                e.message()
            );
            assert!(e.hint_text().unwrap().contains("sleep 58"));
            assert!(lines.is_empty(), "{lines:?}");
            assert_eq!(h.stats().requests - before, 1);
        }
        // Waits are bounded: a server that keeps limiting gets 3 waits, then 69.
        h.set_faults(FaultPatch {
            rate_limit_next: Some(9),
            retry_after: Some(1),
            ..Default::default()
        });
        let before = h.stats().requests;
        let (r, lines) = with_progress(&c, &id);
        let e = r.unwrap_err();
        assert_eq!(e.exit_code(), 69);
        assert!(
            e.message().contains("still rate limiting"),
            "{}",
            e.message()
        );
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(h.stats().requests - before, 4);
        // A 429 without retry-after is retried with backoff, then 69.
        h.set_faults(FaultPatch {
            reset: true,
            fail_next: Some(3),
            fail_status: Some(429),
            ..Default::default()
        });
        let (r, lines) = with_progress(&c, &id);
        let e = r.unwrap_err();
        assert_eq!(e.exit_code(), 69);
        assert!(
            e.message().contains("still rate limiting (429")
                && e.message().contains("after 3 tries"),
            "{}",
            e.message()
        );
        assert!(lines.is_empty(), "{lines:?}");
        // A plain 500 is retried with backoff, silently, and is no rate limit.
        h.set_faults(FaultPatch {
            fail_next: Some(1),
            fail_status: Some(500),
            ..Default::default()
        });
        let (r, lines) = with_progress(&c, &id);
        r.unwrap();
        assert!(lines.is_empty(), "{lines:?}");
        h.set_faults(FaultPatch {
            fail_next: Some(3),
            fail_status: Some(500),
            retry_after: Some(1),
            ..Default::default()
        });
        let (r, lines) = with_progress(&c, &id);
        let e = r.unwrap_err();
        assert_eq!(e.exit_code(), 69);
        assert!(
            e.message().contains("answered 500 after 3 attempts"),
            "{}",
            e.message()
        );
        assert!(lines.is_empty(), "{lines:?}");
    }

    #[test]
    fn garbage_in_the_secret_answer_is_69() {
        let h = devserver::spawn(devserver::Options::default()).unwrap();
        let c = client_for(&h);
        let t = c.login(&reader()).unwrap();
        let pid = h.seed().project_id.clone();
        for patch in [
            FaultPatch {
                malformed_next: Some(1),
                ..Default::default()
            },
            FaultPatch {
                close_mid_body_next: Some(1),
                ..Default::default()
            },
            FaultPatch {
                huge_body_next: Some(1),
                ..Default::default()
            },
        ] {
            h.set_faults(patch);
            let e = c
                .get_secret(&t, &pid, "prod", "/app", "DB_PASSWORD")
                .unwrap_err();
            assert_eq!(e.exit_code(), 69, "{}", e.message());
            assert!(!e.message().contains("app-db-pass"), "{}", e.message());
        }
        // And the client still works afterwards.
        let v = c
            .get_secret(&t, &pid, "prod", "/app", "DB_PASSWORD")
            .unwrap();
        assert_eq!(v.expose(), b"app-db-pass-s3cr3t");
        assert!(!format!("{v:?}").contains("app-db"));
    }

    #[test]
    fn in_process_server_refuses_non_loopback() {
        let e = devserver::spawn(devserver::Options {
            listen: "0.0.0.0:0".parse().unwrap(),
            ..Default::default()
        })
        .err()
        .unwrap();
        assert_eq!(e.exit_code(), 78);
    }
}
