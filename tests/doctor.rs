//! `aap doctor` against real installations: a healthy one passes, and each misconfiguration it
//! claims to catch is created for real and must show up as the named failing check.

mod common;

use common::world::World;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// The agent's uid in these worlds: `nobody`, which every Debian system has, so the doctor can
/// look its groups up as it would for a real agent user.
const AGENT_UID: u32 = 65534;

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), None).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Rewrite the world's config with `f`.
fn edit_config(w: &World, f: impl FnOnce(String) -> String) {
    let cfg = std::fs::read_to_string(&w.config).unwrap();
    write(&w.config, f(cfg));
}

/// The uid these tests (and the world's broker) run as: the owner of the world's directory.
fn my_uid(w: &World) -> u32 {
    std::fs::metadata(w.path()).unwrap().uid()
}

/// A world set up the way docs/operator-guide.md says: codex runs as its own uid; the broker
/// (this test's uid) alone reads the identity's client secret (0400) and writes the audit log
/// (0600) and requests/; everything else is root's.
fn healthy() -> World {
    let mut w = World::new();
    // The world names the test's own uid (0 in CI) for codex: make codex a user of its own.
    let mine = format!("  codex:\n    uid: {}\n", my_uid(&w));
    let cfg = std::fs::read_to_string(&w.config).unwrap();
    assert!(
        cfg.contains(&mine),
        "the world's config names codex's uid: {cfg}"
    );
    edit_config(&w, |c| {
        c.replace(&mine, &format!("  codex:\n    uid: {AGENT_UID}\n"))
    });
    // The broker maps peers by the config it started with.
    w.start_broker();
    let sid = w.session(&["db-env"]);
    assert_eq!(sid.len(), 26);
    chmod(&w.path().join("identity/client_secret"), 0o400);
    chmod(&w.path().join("audit.jsonl"), 0o600);
    w
}

/// `aap ARGS` from `bin`, as the agent uid (and gid, no supplementary groups), through
/// `setpriv` as the guide's `runuser -u codex -- aap doctor` would: the hint follower
/// (tests/common/follow.rs) sees the uid in the argv and follows the hints as that user.
fn as_agent(w: &World, bin: &Path, args: &[&str]) -> std::process::Command {
    let c = w.aap_from(bin, args);
    let u = AGENT_UID.to_string();
    let mut s = std::process::Command::new("setpriv");
    s.args(["--reuid", &u, "--regid", &u, "--clear-groups", "--"])
        .arg(c.get_program())
        .args(c.get_args())
        .env_clear()
        .current_dir(c.get_current_dir().unwrap_or(w.path()));
    for (k, v) in c.get_envs() {
        if let Some(v) = v {
            s.env(k, v);
        }
    }
    s
}

struct Report {
    code: i32,
    json: serde_json::Value,
    text: String,
}

fn doctor(w: &World, extra: &[&str]) -> Report {
    let mut args = vec!["doctor", "--json"];
    args.extend_from_slice(extra);
    let o = run(&mut w.aap(&args));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}): {}", stdout(&o)));
    let t = run(&mut w.aap(&["doctor", "--offline"]));
    Report {
        code: code(&o),
        json,
        text: stdout(&t),
    }
}

impl Report {
    fn with(&self, status: &str, check: &str) -> Vec<String> {
        self.json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["status"] == status && c["check"] == check)
            .map(|c| format!("{} / hint: {}", c["message"], c["hint"]))
            .collect()
    }

    /// Assert exit 78 and a failing `check` whose message contains `needle`.
    fn assert_fail(&self, check: &str, needle: &str) {
        let fails = self.with("fail", check);
        assert!(
            fails.iter().any(|m| m.contains(needle)),
            "expected a failing `{check}` check mentioning {needle:?}; got {fails:#?}\n{:#}",
            self.json
        );
        assert_eq!(self.code, 78, "{:#}", self.json);
        assert!(
            fails.iter().all(|m| !m.contains("hint: null")),
            "every failure has a hint: {fails:#?}"
        );
    }
}

#[test]
fn a_healthy_installation_passes_and_json_counts_match() {
    let w = healthy();
    let r = doctor(&w, &[]);
    assert_eq!(r.code, 0, "{:#}", r.json);
    // It logged in with the client secret and never shows it (nor any secret value).
    let (_, client_secret) = seed_identity("reader");
    let mut secrets = seed_secret_values();
    secrets.push(client_secret);
    for s in &secrets {
        assert!(!r.json.to_string().contains(s.as_str()) && !r.text.contains(s.as_str()));
    }
    let checks = r.json["checks"].as_array().unwrap();
    for status in ["ok", "skip", "warn", "fail"] {
        let n = checks.iter().filter(|c| c["status"] == status).count();
        assert_eq!(r.json[status], n, "{status} count");
    }
    assert_eq!(r.json["fail"], 0);
    for check in [
        "config",
        "catalog",
        "agents",
        "permissions",
        "broker",
        "allowed-signers",
        "signing-key",
        "infisical",
        "tools",
        "audit-log",
    ] {
        assert!(
            !r.with("ok", check).is_empty(),
            "no ok for {check}: {:#}",
            r.json
        );
    }
    // The login really happened, and the token was revoked again.
    let infisical = r.with("ok", "infisical");
    assert!(
        infisical[0].contains("answers (GET /api/status)"),
        "{infisical:?}"
    );
    assert!(infisical[1].contains("token revoked"), "{infisical:?}");
    // Online, the broker's socket was connected to.
    let broker = r.with("ok", "broker");
    assert!(broker[0].contains("accepts connections"), "{broker:?}");
    let stats = w.server.stats();
    assert!(stats.to_string().contains("login"), "{stats}");
    // The text form says the same, one line per finding, and ends with the tally.
    assert!(r.text.contains("ok    catalog"), "{}", r.text);
    assert!(
        r.text
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .starts_with("aap doctor: "),
        "{}",
        r.text
    );
}

#[test]
fn an_invalid_config_fails() {
    let w = healthy();
    write(&w.config, "catalog: [\n");
    doctor(&w, &["--offline"]).assert_fail("config", "config");
}

#[test]
fn an_invalid_catalog_fails() {
    let w = healthy();
    write(
        &w.path().join("catalog.yaml"),
        "schema_version: 1\ncapabilities: 3\n",
    );
    doctor(&w, &["--offline"]).assert_fail("catalog", "catalog");
}

#[test]
fn grants_owned_by_the_agent_fail() {
    let w = healthy();
    chown(&w.path().join("state/grants"), AGENT_UID);
    doctor(&w, &["--offline"]).assert_fail("permissions", "state/grants is owned by agent codex");
}

/// Issue 15: the operator's answers to requests (what a waiting agent is told) are guarded like
/// grants.
#[test]
fn an_answers_dir_owned_by_the_agent_fails() {
    let w = healthy();
    std::fs::create_dir_all(w.path().join("state/answers")).unwrap();
    chown(&w.path().join("state/answers"), AGENT_UID);
    doctor(&w, &["--offline"]).assert_fail("permissions", "state/answers is owned by agent codex");
}

#[test]
fn a_world_writable_grant_file_fails() {
    let w = healthy();
    let grant = std::fs::read_dir(w.path().join("state/grants"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "grant"))
        .expect("a grant file");
    chmod(&grant, 0o666);
    doctor(&w, &["--offline"]).assert_fail("permissions", "is writable by any local user");
}

#[test]
fn a_revocation_dir_the_agent_can_replace_fails() {
    let w = healthy();
    // The state dir itself is world-writable (no sticky bit): revoked/ can be renamed away.
    chmod(&w.path().join("state"), 0o777);
    doctor(&w, &["--offline"]).assert_fail("permissions", "state/revoked can be replaced");
}

#[test]
fn a_world_writable_audit_log_fails() {
    let w = healthy();
    chmod(&w.path().join("audit.jsonl"), 0o666);
    doctor(&w, &["--offline"]).assert_fail("permissions", "audit.jsonl is world-writable");
}

#[test]
fn an_audit_log_the_agent_owns_fails() {
    // The broker alone writes the log: an agent that owns it (as the agent once had to, to
    // append) could rewrite it.
    let w = healthy();
    chown(&w.path().join("audit.jsonl"), AGENT_UID);
    doctor(&w, &["--offline"]).assert_fail("permissions", "audit.jsonl is owned by agent codex");
}

#[test]
fn an_audit_log_writable_through_the_agents_group_fails() {
    let w = healthy();
    let log = w.path().join("audit.jsonl");
    // The old layout: the agents' group may append (nobody's group, nogroup, 65534).
    std::os::unix::fs::lchown(&log, None, Some(AGENT_UID)).unwrap();
    chmod(&log, 0o660);
    doctor(&w, &["--offline"]).assert_fail("permissions", "audit.jsonl is writable by agent codex");
}

#[test]
fn an_audit_log_the_agent_can_read_fails() {
    // Opening it is enough to flock it and stall the broker.
    let w = healthy();
    chmod(&w.path().join("audit.jsonl"), 0o644);
    doctor(&w, &["--offline"]).assert_fail("permissions", "audit.jsonl is readable by agent codex");
}

#[test]
fn a_world_writable_config_and_catalog_fail() {
    let w = healthy();
    chmod(&w.path().join("catalog.yaml"), 0o666);
    // The loader itself refuses a group/world-writable catalog; doctor reports that too.
    let r = doctor(&w, &["--offline"]);
    r.assert_fail("permissions", "catalog.yaml is writable by any local user");
    r.assert_fail("catalog", "catalog.yaml");
}

#[test]
fn a_config_owned_by_the_agent_fails() {
    let w = healthy();
    chown(&w.config, AGENT_UID);
    doctor(&w, &["--offline"]).assert_fail("permissions", "config.yaml is owned by agent codex");
}

#[test]
fn a_requests_dir_the_agents_can_write_fails_even_sticky() {
    // The broker writes requests/ itself: the old 1733 (sticky, anyone may drop a file) is
    // now an exposure.
    let w = healthy();
    let requests = w.path().join("state/requests");
    // The broker makes it at the first request (0750, its own); here, as the broker would.
    std::fs::create_dir(&requests).unwrap();
    chmod(&requests, 0o1733);
    doctor(&w, &["--offline"]).assert_fail(
        "permissions",
        "state/requests is writable by any local user",
    );
}

#[test]
fn a_requests_dir_the_agent_owns_fails() {
    let w = healthy();
    std::fs::create_dir(w.path().join("state/requests")).unwrap();
    chown(&w.path().join("state/requests"), AGENT_UID);
    doctor(&w, &["--offline"]).assert_fail("permissions", "state/requests is owned by agent codex");
}

#[test]
fn an_identity_secret_readable_by_others_fails() {
    let w = healthy();
    chmod(&w.path().join("identity/client_secret"), 0o444);
    doctor(&w, &["--offline"]).assert_fail("permissions", "is readable by any local user");
}

#[test]
fn an_identity_secret_readable_by_its_own_agent_fails() {
    // The broker logs in for the agent; an agent that can read the secret (as it once had
    // to) logs in without it.
    let w = healthy();
    let secret = w.path().join("identity/client_secret");
    chown(&secret, AGENT_UID);
    chmod(&secret, 0o400);
    let r = doctor(&w, &["--offline"]);
    r.assert_fail("permissions", "client_secret is readable by agent codex");
    assert!(
        r.with("fail", "permissions")
            .iter()
            .any(|m| m.starts_with("\"agents.codex.client_secret_file ")),
        "{:#}",
        r.json
    );
}

#[test]
fn a_named_identity_secret_readable_through_the_agents_group_fails() {
    let w = healthy();
    let (id, secret) = seed_identity("reader");
    let dir = w.path().join("identity2");
    write(&dir.join("client_id"), format!("{id}\n"));
    write(&dir.join("client_secret"), format!("{secret}\n"));
    std::os::unix::fs::lchown(dir.join("client_secret"), None, Some(AGENT_UID)).unwrap();
    chmod(&dir.join("client_secret"), 0o440);
    edit_config(&w, |c| {
        format!(
            "{c}identities:\n  shared:\n    client_id_file: identity2/client_id\n    client_secret_file: identity2/client_secret\n"
        )
    });
    let r = doctor(&w, &["--offline"]);
    r.assert_fail(
        "permissions",
        "identity2/client_secret is readable by agent codex",
    );
    assert!(
        r.with("fail", "permissions")
            .iter()
            .any(|m| m.starts_with("\"identities.shared.client_secret_file ")),
        "{:#}",
        r.json
    );
}

#[test]
fn a_signing_key_readable_by_the_agent_fails() {
    let w = healthy();
    chown(&w.path().join("operator"), AGENT_UID);
    doctor(&w, &["--offline"]).assert_fail("permissions", "it could sign its own grants");
}

#[test]
fn an_agent_running_as_root_fails() {
    let w = healthy();
    edit_config(&w, |c| c.replace(&format!("uid: {AGENT_UID}"), "uid: 0"));
    doctor(&w, &["--offline"]).assert_fail("agents", "runs as root");
}

#[test]
fn an_agent_without_a_uid_fails() {
    // The broker maps callers by uid: an agent without one cannot be served (it was a warning).
    let w = healthy();
    edit_config(&w, |c| c.replace(&format!("    uid: {AGENT_UID}\n"), ""));
    let r = doctor(&w, &["--offline"]);
    r.assert_fail("agents", "agents.codex has no uid");
    assert!(
        r.with("fail", "agents")
            .iter()
            .any(|m| m.contains("set agents.codex.uid")),
        "{:#}",
        r.json
    );
}

#[test]
fn a_missing_broker_socket_warns_with_how_to_start_it() {
    let mut w = healthy();
    w.broker = None;
    std::fs::remove_file(w.path().join("broker.sock")).unwrap();
    let r = doctor(&w, &[]);
    let warns = r.with("warn", "broker");
    assert!(
        warns
            .iter()
            .any(|m| m.contains("broker.sock does not exist")
                && m.contains("systemctl start aap-broker.socket")
                && m.contains("aap broker --socket")),
        "{:#}",
        r.json
    );
    assert!(r.with("fail", "broker").is_empty(), "{:#}", r.json);
    assert!(r.with("ok", "broker").is_empty(), "{:#}", r.json);
}

#[test]
fn a_broker_socket_that_is_not_a_socket_fails() {
    let mut w = healthy();
    w.broker = None;
    let sock = w.path().join("broker.sock");
    std::fs::remove_file(&sock).unwrap();
    write(&sock, "not a socket\n");
    doctor(&w, &["--offline"]).assert_fail("broker", "broker.sock is not a socket");
}

#[test]
fn a_broker_socket_in_a_directory_the_agent_can_write_fails() {
    let w = healthy();
    // The live socket, moved into a directory the agent owns: connecting still works, but the
    // agent could put its own socket there instead.
    let run = w.path().join("run");
    std::fs::create_dir(&run).unwrap();
    chown(&run, AGENT_UID);
    std::fs::rename(w.path().join("broker.sock"), run.join("broker.sock")).unwrap();
    edit_config(&w, |c| {
        c.replace("socket: broker.sock", "socket: run/broker.sock")
    });
    let r = doctor(&w, &[]);
    r.assert_fail("broker", "run is owned by agent codex");
    assert!(r.with("ok", "broker").is_empty(), "{:#}", r.json);
    // World-writable (even sticky) is no better.
    chown(&run, 0);
    chmod(&run, 0o1777);
    doctor(&w, &["--offline"]).assert_fail("broker", "run is writable by any local user");
}

/// The broker's socket path held by an agent (it listens there, as a broker would): aap-exec
/// of every agent would talk to it. The hint restarts the broker, which replaces the socket.
#[test]
fn a_broker_socket_owned_by_an_agent_fails() {
    let mut w = healthy();
    w.broker = None;
    let sock = w.path().join("broker.sock");
    std::fs::remove_file(&sock).unwrap();
    let _squatter = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    chown(&sock, AGENT_UID);
    let r = doctor(&w, &[]);
    r.assert_fail("broker", "broker.sock is owned by agent codex");
    let fails = r.with("fail", "broker");
    assert!(
        fails
            .iter()
            .any(|m| m.contains(&format!("fuser -v {}", sock.display()))
                && m.contains("systemctl restart aap-broker.socket")
                && m.contains(&format!("aap broker --socket {}", sock.display()))),
        "{:#}",
        r.json
    );
    assert!(r.with("ok", "broker").is_empty(), "{:#}", r.json);
}

#[test]
fn a_broker_socket_nobody_listens_on_fails_online() {
    let mut w = healthy();
    // Killed: its socket stays behind, stale.
    w.broker = None;
    assert!(w.path().join("broker.sock").exists());
    let r = doctor(&w, &[]);
    r.assert_fail("broker", "cannot connect to broker.socket");
    assert!(
        r.with("fail", "broker")
            .iter()
            .any(|m| m.contains("systemctl restart aap-broker.socket")),
        "{:#}",
        r.json
    );
    // Offline, only the file is judged.
    let off = doctor(&w, &["--offline"]);
    assert!(off.with("fail", "broker").is_empty(), "{:#}", off.json);
    assert!(
        off.with("ok", "broker")
            .iter()
            .any(|m| m.contains("connection not checked")),
        "{:#}",
        off.json
    );
}

#[test]
fn unparsable_allowed_signers_fail() {
    let w = healthy();
    write(
        &w.path().join("allowed_signers"),
        "operator@aap ssh-ed25519 AAAAnot-base64\n",
    );
    doctor(&w, &["--offline"]).assert_fail("allowed-signers", "allowed_signers");
}

#[test]
fn a_signing_key_that_allowed_signers_does_not_trust_fails() {
    let w = healthy();
    let other = w.path().join("other");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    assert!(st.success());
    let pubkey = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    write(
        &w.path().join("allowed_signers"),
        format!("operator@aap namespaces=\"aap-grant\" {pubkey}"),
    );
    doctor(&w, &["--offline"]).assert_fail("signing-key", "would be refused");
}

#[test]
fn an_unreachable_infisical_fails() {
    let w = healthy();
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    edit_config(&w, |c| {
        c.replace(&w.server.url, &format!("https://127.0.0.1:{port}"))
    });
    doctor(&w, &[]).assert_fail("infisical", "checking Infisical's status");
}

#[test]
fn an_identity_that_cannot_log_in_fails() {
    let w = healthy();
    let secret = w.path().join("identity/client_secret");
    chmod(&secret, 0o600);
    write(&secret, "not-the-secret");
    chmod(&secret, 0o400);
    let r = doctor(&w, &[]);
    r.assert_fail("infisical", "agent codex");
    // Only logins happened: no secret was read.
    let stats = w.server.stats().to_string();
    assert!(!stats.contains("\"secrets\""), "{stats}");
}

#[test]
fn a_missing_tool_fails_when_the_installation_needs_it() {
    let w = healthy();
    let empty = w.path().join("empty-bin");
    std::fs::create_dir(&empty).unwrap();
    edit_config(&w, |c| format!("{c}secure_path: {}\n", empty.display()));
    // ssh-keygen signs grants (operator.signing_key is set); git and ssh-agent are unneeded
    // by this catalog, so their absence is fine.
    let r = doctor(&w, &["--offline"]);
    r.assert_fail("tools", "ssh-keygen is not in the trusted path");
    assert!(r.with("fail", "tools").len() == 1, "{:#}", r.json);
}

/// Issue 12: the broker is the ssh agent, so an `ssh-agent` capability needs neither
/// `ssh-agent` nor `ssh-add` on the trusted path.
#[test]
fn an_ssh_agent_capability_needs_no_ssh_agent_or_ssh_add() {
    let w = healthy();
    let cat = w.path().join("catalog.yaml");
    let mut text = std::fs::read_to_string(&cat).unwrap();
    text.push_str(
        "  - id: ssh-doc
    description: an ssh key
    audit_tier: high
    agents: [codex]
    max_ttl: 1h
    backing:
      type: ssh-agent
      secret: { path: /ssh, key: SSH_PRIVATE_KEY }
      key_lifetime: 15m
      hosts: [vps-test]
    inject: [ { type: ssh-agent } ]
",
    );
    write(&cat, text);
    let empty = w.path().join("empty-bin");
    std::fs::create_dir(&empty).unwrap();
    edit_config(&w, |c| format!("{c}secure_path: {}\n", empty.display()));
    let r = doctor(&w, &["--offline"]);
    // The catalog (with its ssh-agent capability) loaded: the tools check saw it.
    assert!(r.with("fail", "catalog").is_empty(), "{:#}", r.json);
    // Only ssh-keygen (operator.signing_key) is missed.
    r.assert_fail("tools", "ssh-keygen is not in the trusted path");
    let fails = r.with("fail", "tools");
    assert_eq!(fails.len(), 1, "{:#}", r.json);
    let all = r.json.to_string();
    assert!(!all.contains("ssh-add is not"), "{all}");
    assert!(!all.contains("ssh-agent is not"), "{all}");
}

#[test]
fn a_tampered_audit_log_fails() {
    let w = healthy();
    // A second line, so that the first one is covered by the chain.
    w.session(&["db-fd"]);
    let log = w.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("\"codex\""), "{text}");
    write(&log, text.replacen("\"codex\"", "\"other\"", 1));
    chmod(&log, 0o600);
    let r = doctor(&w, &["--offline"]);
    r.assert_fail("audit-log", "line 1");
    assert!(r.with("fail", "permissions").is_empty(), "{:#}", r.json);
}

#[test]
fn an_append_only_audit_log_is_reported() {
    let w = healthy();
    let log = w.path().join("audit.jsonl");
    let before = doctor(&w, &["--offline"]);
    assert!(
        before
            .with("warn", "permissions")
            .iter()
            .any(|m| m.contains("not append-only")),
        "{:#}",
        before.json
    );
    let set = std::process::Command::new("chattr")
        .arg("+a")
        .arg(&log)
        .output();
    match set {
        Ok(o) if o.status.success() => {}
        other => {
            skip(
                "the append-only half of the audit-log permission test",
                &format!("chattr +a does not work on this file system ({other:?})"),
            );
            return;
        }
    }
    let after = doctor(&w, &["--offline"]);
    let _ = std::process::Command::new("chattr")
        .arg("-a")
        .arg(&log)
        .status();
    assert!(
        after
            .with("ok", "permissions")
            .iter()
            .any(|m| m.contains("append-only (chattr +a)")),
        "{:#}",
        after.json
    );
}

#[test]
fn run_as_the_agent_it_skips_what_is_out_of_its_reach_and_fails_nothing() {
    let w = healthy();
    // Let the agent (nobody) into the world, as /etc/aap is readable on a real host. (std
    // drops root's supplementary groups when it sets the uid.)
    chmod(w.path(), 0o755);
    let ca = w.server.ca.clone().expect("the dev-server's CA");
    chmod(ca.parent().unwrap(), 0o755);
    // The checkout may be where the agent cannot reach it (/root, any 0700 dir): run a copy.
    let bins = agent_bins();
    let o = run(&mut as_agent(&w, &bins.aap, &["doctor", "--json"]));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {} {}", stdout(&o), stderr(&o)));
    assert_eq!(code(&o), 0, "{json:#}");
    let checks = json["checks"].as_array().unwrap();
    assert!(
        checks.iter().any(|c| c["check"] == "signing-key"
            && c["status"] == "skip"
            && c["message"]
                .as_str()
                .unwrap()
                .contains("agents do not sign")),
        "{json:#}"
    );
    let has = |check: &str, status: &str, needle: &str| {
        checks.iter().any(|c| {
            c["check"] == check
                && c["status"] == status
                && c["message"].as_str().unwrap().contains(needle)
        })
    };
    // Its identity's secret is the broker's: the agent cannot read it, so no login is tried.
    assert!(
        has("infisical", "skip", "cannot read its client secret"),
        "{json:#}"
    );
    assert!(!has("infisical", "ok", "logs in"), "{json:#}");
    // Nor can it open the audit log (it could flock it): not verified, and not a fault.
    assert!(
        has("audit-log", "skip", "not checked as agent codex"),
        "{json:#}"
    );
    // But it reaches the broker.
    assert!(has("broker", "ok", "accepts connections"), "{json:#}");
    // Run as the agent the way the guide says, it is not a single-user setup: the operator
    // (the owner of the state dir) is someone else. Nothing in `agents` warns.
    assert!(
        has("agents", "ok", "this check runs as agent codex (uid 65534)"),
        "{json:#}"
    );
    let agent_warnings: Vec<_> = checks
        .iter()
        .filter(|c| c["check"] == "agents" && c["status"] == "warn")
        .collect();
    assert!(agent_warnings.is_empty(), "{agent_warnings:#?}");
    // What is out of its reach is skipped, not warned about: run as the guide says, a healthy
    // installation gives the agent no warning at all.
    let warnings: Vec<_> = checks.iter().filter(|c| c["status"] == "warn").collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
    assert_eq!(json["warn"], 0, "{json:#}");
    assert!(json["skip"].as_u64().unwrap() >= 3, "{json:#}");
}

#[test]
fn a_catalog_agent_the_config_does_not_name_is_unused_not_a_warning() {
    // The world's catalog grants a capability to claude; its config names codex only.
    let w = healthy();
    let r = doctor(&w, &["--offline"]);
    assert_eq!(r.code, 0, "{:#}", r.json);
    assert!(r.with("warn", "agents").is_empty(), "{:#}", r.json);
    let ok = r.with("ok", "agents");
    assert!(
        ok.iter()
            .any(|m| m
                .contains("the catalog also names claude, which the config does not: unused here")),
        "{ok:#?}"
    );
}

#[test]
fn a_single_user_setup_still_warns() {
    // codex's uid runs the check and also owns the state dir: the agent is the operator.
    let w = healthy();
    chmod(w.path(), 0o755);
    let ca = w.server.ca.clone().expect("the dev-server's CA");
    chmod(ca.parent().unwrap(), 0o755);
    chown(&w.path().join("state"), AGENT_UID);
    let bins = agent_bins();
    let o = run(&mut as_agent(
        &w,
        &bins.aap,
        &["doctor", "--json", "--offline"],
    ));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {} {}", stdout(&o), stderr(&o)));
    let warned = json["checks"].as_array().unwrap().iter().any(|c| {
        c["check"] == "agents"
            && c["status"] == "warn"
            && c["message"]
                .as_str()
                .unwrap()
                .contains("a single-user setup")
    });
    assert!(warned, "{json:#}");
}

#[test]
fn many_exposed_grant_files_are_summarised_after_ten() {
    let w = healthy();
    for _ in 0..5 {
        w.session(&["db-env"]);
    }
    let grants = w.path().join("state/grants");
    let files: Vec<_> = std::fs::read_dir(&grants)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 12, "6 grants and their signatures");
    for f in &files {
        chmod(f, 0o666);
    }
    let r = doctor(&w, &["--offline"]);
    let fails = r.with("fail", "permissions");
    let named = fails
        .iter()
        .filter(|m| m.contains("is writable by any local user"))
        .count();
    assert_eq!(named, 10, "{fails:#?}");
    r.assert_fail("permissions", "grants: 2 more exposed like the ones above");
}

#[test]
fn grants_writable_through_the_agents_group_fail() {
    let w = healthy();
    let grants = w.path().join("state/grants");
    // nobody's primary group (nogroup, 65534), looked up through the group database.
    std::os::unix::fs::lchown(&grants, Some(0), Some(AGENT_UID)).unwrap();
    chmod(&grants, 0o775);
    doctor(&w, &["--offline"])
        .assert_fail("permissions", "state/grants is writable by agent codex");
}

#[test]
fn a_catalog_behind_a_symlinked_directory_the_agent_owns_fails() {
    let w = healthy();
    // cat -> agentarea/cat, and agentarea is the agent's: it can swap the whole directory.
    let area = w.path().join("agentarea");
    std::fs::create_dir_all(area.join("cat")).unwrap();
    std::fs::rename(w.path().join("catalog.yaml"), area.join("cat/catalog.yaml")).unwrap();
    chown(&area, AGENT_UID);
    std::os::unix::fs::symlink(area.join("cat"), w.path().join("cat")).unwrap();
    edit_config(&w, |c| {
        c.replace("catalog: catalog.yaml", "catalog: cat/catalog.yaml")
    });
    let r = doctor(&w, &["--offline"]);
    r.assert_fail("permissions", "catalog.yaml can be replaced by agent codex");
    // The catalog itself is fine: only the doctor sees the danger.
    assert!(r.with("fail", "catalog").is_empty(), "{:#}", r.json);
}

#[test]
fn a_missing_secure_path_directory_the_agent_could_create_fails() {
    let w = healthy();
    let area = w.path().join("agentarea");
    std::fs::create_dir(&area).unwrap();
    chown(&area, AGENT_UID);
    edit_config(&w, |c| {
        format!("{c}secure_path: {}/bin:/usr/bin:/bin\n", area.display())
    });
    doctor(&w, &["--offline"]).assert_fail(
        "permissions",
        "agentarea/bin does not exist, and agent codex (uid 65534) can create it",
    );
}

#[test]
fn a_fifo_for_the_client_secret_does_not_hang_the_check() {
    let w = healthy();
    let secret = w.path().join("identity/client_secret");
    std::fs::remove_file(&secret).unwrap();
    let st = std::process::Command::new("mkfifo")
        .arg(&secret)
        .status()
        .unwrap();
    assert!(st.success());
    chmod(&secret, 0o400);
    let mut child = w
        .aap(&["doctor", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            panic!("aap doctor hangs on a FIFO client secret");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status.code(), Some(78), "{json:#}");
    assert!(
        json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["check"] == "infisical" && c["status"] == "fail"),
        "{json:#}"
    );
}

const RUN_AS_CAPS: &str = "  - id: as-nobody
    description: a wrapped command run as another user
    audit_tier: high
    agents: [codex]
    max_ttl: 1h
    backing:
      type: wrapped-command
      command: /bin/true
      args: [\"^x$\"]
      run_as: nobody
  - id: as-broker
    description: a wrapped command run as the broker's own user
    audit_tier: high
    agents: [codex]
    max_ttl: 1h
    backing:
      type: wrapped-command
      command: /bin/true
      args: [\"^x$\"]
";

fn with_run_as_caps(w: &World) {
    let path = w.path().join("catalog.yaml");
    let mut cat = std::fs::read_to_string(&path).unwrap();
    cat.push_str(RUN_AS_CAPS);
    std::fs::write(&path, cat).unwrap();
}

#[test]
fn a_broker_that_can_switch_users_passes_every_run_as() {
    // The world's broker runs as root (CI), with CAP_SETUID and CAP_SETGID.
    let w = healthy();
    with_run_as_caps(&w);
    let r = doctor(&w, &[]);
    assert!(r.with("fail", "run-as").is_empty(), "{:#}", r.json);
    let ok = r.with("ok", "run-as");
    assert!(
        ok.len() == 1 && ok[0].contains("as-nobody as nobody") && ok[0].contains("as-broker"),
        "{:#}",
        r.json
    );
}

#[test]
fn a_broker_without_setuid_fails_the_capability_that_runs_as_another_user() {
    let mut w = healthy();
    with_run_as_caps(&w);
    // The same broker, started without CAP_SETUID/CAP_SETGID in its bounding set (so root's
    // exec gets neither), as a unit without the run-as drop-in would run it.
    let wrapper = w.path().join("bin/aap-nosetuid");
    std::fs::create_dir_all(wrapper.parent().unwrap()).unwrap();
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec setpriv --bounding-set=-setuid,-setgid {AAP} \"$@\"\n"),
    )
    .unwrap();
    chmod(&wrapper, 0o755);
    w.broker = None;
    let d = w.path().to_path_buf();
    w.broker = Some(
        aap::broker::Spawned::start(
            &wrapper,
            &w.config,
            &d.join("broker.sock"),
            Some(&d.join("broker.log")),
        )
        .unwrap_or_else(|e| panic!("start the broker: {}", e.render("test"))),
    );
    let r = doctor(&w, &[]);
    r.assert_fail(
        "run-as",
        "capability `as-nobody` cannot run: the broker cannot switch to its run_as user nobody",
    );
    let fails = r.with("fail", "run-as");
    assert_eq!(fails.len(), 1, "{fails:#?}");
    assert!(
        fails[0].contains("AmbientCapabilities=CAP_SETUID CAP_SETGID")
            && fails[0].contains("run aap broker as root")
            && fails[0].contains("aap catalog check"),
        "{fails:#?}"
    );
    // The capability that runs as the broker's own user needs no capability.
    let ok = r.with("ok", "run-as");
    assert!(
        ok.len() == 1 && ok[0].contains("as-broker") && !ok[0].contains("as-nobody"),
        "{:#}",
        r.json
    );
}
