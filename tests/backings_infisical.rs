//! The infisical-token backing against a real dev-server: the child gets a token of the scoped
//! identity (reads /forgejo only), and the token is revoked when the child exits, also when it
//! was killed by a signal.

mod common;

use common::world::World;
use common::*;
use std::os::unix::process::ExitStatusExt;

fn token_world() -> World {
    use std::os::unix::fs::PermissionsExt;
    let mut w = World::new();
    let (id, secret) = seed_identity("scoped");
    let d = w.path().join("scoped");
    write(&d.join("client_id"), format!("{id}\n"));
    std::fs::write(d.join("client_secret"), format!("{secret}\n")).unwrap();
    std::fs::set_permissions(
        d.join("client_secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let mut cfg = std::fs::read_to_string(&w.config).unwrap();
    cfg.push_str(
        "identities:\n  scoped:\n    client_id_file: scoped/client_id\n    client_secret_file: scoped/client_secret\n",
    );
    write(&w.config, cfg);
    w.start_broker(); // the broker reads its config at start
    let cat = w.path().join("catalog.yaml");
    let mut text = std::fs::read_to_string(&cat).unwrap();
    text.push_str(
        "  - id: infisical-scoped
    description: A token of the scoped identity (reads /forgejo only)
    audit_tier: medium
    agents: [codex]
    max_ttl: 1h
    backing: { type: infisical-token, identity: scoped, secret_path: /forgejo }
    inject: [ { type: env, name: INFISICAL_TOKEN } ]
  - id: infisical-scoped-fd
    description: The same token in a memfd
    audit_tier: medium
    agents: [codex]
    max_ttl: 1h
    backing: { type: infisical-token, identity: scoped, secret_path: /forgejo }
    inject: [ { type: fd, name: INFISICAL_TOKEN_FILE } ]
  - id: infisical-unknown-identity
    description: An identity the config does not have
    audit_tier: medium
    agents: [codex]
    max_ttl: 1h
    backing: { type: infisical-token, identity: nobody, secret_path: /forgejo }
    inject: [ { type: env, name: INFISICAL_TOKEN } ]
",
    );
    write(&cat, text);
    w
}

/// A child script: print the token (for the test to check after exit), then the HTTP status of
/// reading /forgejo:FORGEJO_TOKEN and /app:DB_PASSWORD with it, each on its own line.
fn probe_script(w: &World, token_expr: &str) -> String {
    let ca = w.server.ca.as_ref().unwrap().display().to_string();
    let get = |path: &str, key: &str| {
        format!(
            "curl -s --cacert '{ca}' -o /dev/null -w '%{{http_code}}\\n' -H \"Authorization: Bearer {token_expr}\" '{}/api/v3/secrets/raw/{key}?workspaceId={}&environment=prod&secretPath={path}'",
            w.server.url, w.server.project_id
        )
    };
    format!(
        "printf '%s\\n' \"{token_expr}\"; {}; {}",
        get("/forgejo", "FORGEJO_TOKEN"),
        get("/app", "DB_PASSWORD")
    )
}

/// The status of reading /forgejo:FORGEJO_TOKEN with `token` now.
fn read_with(w: &World, token: &str) -> u16 {
    let path = format!(
        "/api/v3/secrets/raw/FORGEJO_TOKEN?workspaceId={}&environment=prod&secretPath=/forgejo",
        w.server.project_id
    );
    w.server
        .request("GET", &path, Some(&format!("Bearer {token}")), None)
        .0
}

#[test]
fn the_child_reads_its_scope_only_and_the_token_dies_at_exit() {
    let w = token_world();
    let s = w.session(&["infisical-scoped", "infisical-scoped-fd"]);
    for (cap, expr) in [
        ("infisical-scoped", "$INFISICAL_TOKEN"),
        ("infisical-scoped-fd", "$(cat \"$INFISICAL_TOKEN_FILE\")"),
    ] {
        let o = run(w
            .exec_in(&s, cap, &["sh", "-c", &probe_script(&w, expr)])
            .env("AAP_LOG", "trace"));
        assert_eq!(code(&o), 0, "{cap}: {}", stderr(&o));
        let out = stdout(&o);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let token = lines[0];
        assert!(token.len() >= 16, "no token in the child: {out}");
        assert_eq!(lines[1], "200", "{cap}: the scoped path must be readable");
        assert_eq!(
            lines[2], "403",
            "{cap}: a path outside the scope must be refused"
        );
        // After exit the token is revoked: the server rejects it.
        assert_eq!(
            read_with(&w, token),
            401,
            "{cap}: token still valid after exit"
        );
        assert_no_leak(&[token.to_string()], &stderr(&o), w.path());
    }
    assert_eq!(w.count("exec.end"), 2);
}

#[test]
fn the_token_is_revoked_when_the_child_is_killed_by_a_signal() {
    let w = token_world();
    let s = w.session(&["infisical-scoped"]);
    let o = run(&mut w.exec_in(
        &s,
        "infisical-scoped",
        &[
            "sh",
            "-c",
            "printf '%s\\n' \"$INFISICAL_TOKEN\"; kill -KILL $$",
        ],
    ));
    assert_eq!(o.status.signal(), Some(9), "{o:?}");
    let token = stdout(&o).trim().to_string();
    assert!(token.len() >= 16, "{o:?}");
    assert_eq!(
        read_with(&w, &token),
        401,
        "token still valid after SIGKILL"
    );
    let ends: Vec<_> = w
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "exec.end")
        .collect();
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0]["signal"], 9, "{}", ends[0]);
    assert_no_leak(&[token], &stderr(&o), w.path());
}

#[test]
fn a_missing_identity_is_a_config_error_and_nothing_runs() {
    let w = token_world();
    let s = w.session(&["infisical-unknown-identity"]);
    let o = run(&mut w.exec_in(&s, "infisical-unknown-identity", &["sh", "-c", "touch ran"]));
    assert_eq!(code(&o), 78, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("aap-exec: error: no identity \"nobody\""),
        "{err}"
    );
    assert!(
        err.contains("aap-exec: hint: add identities.nobody."),
        "{err}"
    );
    assert!(!w.path().join("ran").exists());
    assert_eq!(w.count("exec.start"), 0);
}

#[test]
fn without_approval_no_login_happens() {
    let w = token_world();
    let s = w.session(&["db-low"]);
    let before = w.server.stats();
    let o = run(&mut w.exec_in(&s, "infisical-scoped", &["sh", "-c", "touch ran"]));
    assert_eq!(code(&o), 77, "{}", stderr(&o));
    assert!(!w.path().join("ran").exists());
    let after = w.server.stats();
    for k in ["logins", "requests", "secret_reads"] {
        assert_eq!(after[k], before[k], "the dev-server saw {k}");
    }
}

#[test]
fn a_failed_revocation_is_reported_and_the_child_status_kept() {
    let w = token_world();
    let s = w.session(&["infisical-scoped"]);
    // The child kills the dev-server, so the revocation at teardown cannot reach it. (A killed
    // process's sockets close at once; it stays a zombie until the test reaps it.)
    let pid = w.server.child.id();
    let o = run(&mut w.exec_in(
        &s,
        "infisical-scoped",
        &["sh", "-c", &format!("kill -KILL {pid}; sleep 0.3; exit 3")],
    ));
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    let err = stderr(&o);
    // The broker revokes (and reports) it now; the agent is told, and so is the audit log.
    assert!(
        err.contains(
            "aap-exec: warning: the scoped Infisical token of identity scoped could not be revoked"
        ),
        "{err}"
    );
    let end = w
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "exec.end")
        .unwrap();
    assert!(
        end["error"]
            .as_str()
            .unwrap_or("")
            .contains("could not be revoked"),
        "{end}"
    );
    assert_eq!(w.count("exec.end"), 1);
}

#[test]
fn revoking_the_session_mid_run_revokes_the_scoped_token_while_the_child_still_runs() {
    let w = token_world();
    let s = w.session(&["infisical-scoped"]);
    let tok = w.path().join("token");
    let mut child = w
        .exec_in(
            &s,
            "infisical-scoped",
            &[
                "sh",
                "-c",
                &format!(
                    "printf '%s' \"$INFISICAL_TOKEN\" > {}; sleep 6",
                    tok.display()
                ),
            ],
        )
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::metadata(&tok).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(
            t0.elapsed().as_secs() < 20,
            "the child never wrote the token"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let token = std::fs::read_to_string(&tok).unwrap();
    assert_eq!(read_with(&w, &token), 200, "the token works while granted");
    let o = run(&mut w.aap(&["session", "revoke", &s, "--reason", "mid-run"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // The broker re-checks the grant of a run that holds a token about once a second.
    let t1 = std::time::Instant::now();
    while read_with(&w, &token) == 200 {
        assert!(
            t1.elapsed().as_secs() < 4,
            "the scoped token outlived the revocation by 4 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the child still runs; only its token is gone"
    );
    assert!(child.wait().unwrap().success());
    let end = w
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "exec.end")
        .unwrap();
    assert!(
        end["error"]
            .as_str()
            .unwrap_or("")
            .contains("was revoked while the child ran"),
        "{end}"
    );
}
