//! Session grants end to end: the real binaries, the real ssh-keygen (no mocks of it).

mod common;
#[path = "common/grants.rs"]
mod grants;

use aap::grant::{CheckRequest, Denial};
use common::{code, stderr, stdout, story_lines};
use grants::*;
use std::time::SystemTime;

macro_rules! need_ssh_keygen {
    () => {
        if !have_ssh_keygen() {
            return;
        }
    };
}

fn assert_denied(o: &std::process::Output, want: &str) {
    let err = stderr(o);
    assert_eq!(code(o), 77, "want exit 77 ({want}); stderr: {err}");
    assert!(err.contains(want), "want {want:?} in stderr: {err}");
    assert!(
        err.contains("aap: hint: ") || err.contains("aap-exec: hint: "),
        "no hint: {err}"
    );
}

/// Call the library's check as the exec path will.
fn lib_check(
    env: &Env,
    session: &str,
    cap: &str,
    agent: Option<&str>,
    host: &str,
) -> Result<aap::grant::Authorized, Denial> {
    let cfg = env.load_config();
    let cat = env.load_catalog();
    let req = CheckRequest {
        session,
        capability: cap,
        agent,
        host,
        uid: aap::sys::uid(),
    };
    aap::grant::check(&cfg, &cat, &req, SystemTime::now())
}

#[test]
fn start_then_check_and_ssh_keygen_verifies_the_grant() {
    need_ssh_keygen!();
    let env = Env::new();
    let id = env.start(&[
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
        "--ttl",
        "1h",
    ]);
    // aap -> ssh-keygen: the stored grant verifies with plain ssh-keygen.
    let o = ssh_verify(
        &env.allowed,
        OPERATOR,
        &env.sig_path(&id),
        &env.grant_path(&id),
    );
    assert!(
        o.status.success(),
        "ssh-keygen -Y verify: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains("Good \"aap-grant\" signature for op@example.org")
    );
    // The grant is the documented JSON.
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.grant_path(&id)).unwrap()).unwrap();
    assert_eq!(g["session"], id.as_str());
    assert_eq!(g["agent"], "codex");
    assert_eq!(g["capabilities"][0]["id"], "forgejo-pat-read");
    // Checks.
    let o = env.check(&id, "forgejo-pat-read");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).starts_with(&format!(
        "allowed: session {id} (agent codex) may use forgejo-pat-read"
    )));
    let o = env.check(&id, "ssh-vps1000-iskra-readonly");
    assert_denied(&o, "is not granted ssh-vps1000-iskra-readonly");
    assert!(stderr(&o).contains(&format!(
        "aap: hint: ask the operator for it: aap request --session {id} ssh-vps1000-iskra-readonly --reason '...' --wait   (the operator adds it with: aap session approve {id} --cap ssh-vps1000-iskra-readonly)\n"
    )));
    // aap-exec --check agrees, with AAP_SESSION.
    let o = common::run(
        env.exec(&["--check", "forgejo-pat-read"])
            .env("AAP_SESSION", &id),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = common::run(
        env.exec(&["--check", "ssh-vps1000-iskra-readonly"])
            .env("AAP_SESSION", &id),
    );
    assert_eq!(code(&o), 77);
    assert!(
        stderr(&o).starts_with("aap-exec: error: denied: "),
        "{}",
        stderr(&o)
    );
    let o = common::run(env.exec(&["--list"]).env("AAP_SESSION", &id));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("forgejo-pat-read  usable until"),
        "{}",
        stdout(&o)
    );
    // --json output of start.
    let o = env.run(&[
        "session",
        "start",
        "--agent",
        "claude",
        "--cap",
        "forgejo-pat-read",
        "--json",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["agent"], "claude");
    assert_eq!(v["session"].as_str().unwrap().len(), 26);
}

#[test]
fn grants_signed_by_plain_ssh_keygen_verify_in_aap_for_every_key_type() {
    need_ssh_keygen!();
    let env = Env::new();
    let mut allowed = std::fs::read_to_string(&env.allowed).unwrap();
    let mut keys = Vec::new();
    for (ty, bits) in [
        ("ed25519", None),
        ("ecdsa", Some(256)),
        ("ecdsa", Some(384)),
        ("rsa", Some(2048)),
    ] {
        let key = env.path().join(format!("k-{ty}-{}", bits.unwrap_or(0)));
        keygen(&key, ty, bits);
        allowed.push_str(&format!(
            "{OPERATOR} namespaces=\"git,aap-grant\" {}\n",
            pubkey(&key)
        ));
        keys.push((
            format!("{ty}{}", bits.map(|b| b.to_string()).unwrap_or_default()),
            key,
        ));
    }
    common::write(&env.allowed, allowed);
    for (name, key) in keys {
        let id = new_id();
        let g = grant_json(&id, "codex", &["forgejo-pat-read"], 0, 3600, &[]);
        let sig = ssh_sign(&key, "aap-grant", g.as_bytes());
        env.put_grant(&id, g.as_bytes(), &sig);
        let o = env.check(&id, "forgejo-pat-read");
        assert_eq!(code(&o), 0, "{name}: {}", stderr(&o));
        let a = lib_check(&env, &id, "forgejo-pat-read", Some("codex"), "anyhost").unwrap();
        assert_eq!(a.operator(), OPERATOR);
        assert!(a.signer_fingerprint().starts_with("SHA256:"));
        // The message hash may be sha256 too (ssh-keygen -O hashalg=sha256).
        let id = new_id();
        let g = grant_json(&id, "codex", &["forgejo-pat-read"], 0, 3600, &[]);
        let o = std::process::Command::new("ssh-keygen")
            .args([
                "-q",
                "-Y",
                "sign",
                "-n",
                "aap-grant",
                "-O",
                "hashalg=sha256",
                "-f",
            ])
            .arg(&key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(g.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(o.status.success());
        env.put_grant(&id, g.as_bytes(), &o.stdout);
        let o = env.check(&id, "forgejo-pat-read");
        assert_eq!(code(&o), 0, "{name} sha256: {}", stderr(&o));
    }
}

/// Build an sk-ssh-ed25519@openssh.com SSHSIG the way a FIDO token would (no hardware here),
/// and prove both ssh-keygen and aap accept it, and that aap rejects it when altered.
#[test]
fn sk_ssh_ed25519_signatures_verify_like_ssh_keygen() {
    need_ssh_keygen!();
    use ed25519_dalek::Signer as _;
    use sha2::Digest;
    use ssh_key::public::{Ed25519PublicKey, KeyData, SkEd25519};
    use ssh_key::{Algorithm, HashAlg, LineEnding, PublicKey, Signature, SshSig};

    let env = Env::new();
    let sk = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let app = "ssh:";
    let pubdata = KeyData::SkEd25519(SkEd25519::new(
        Ed25519PublicKey(sk.verifying_key().to_bytes()),
        app,
    ));
    let pubkey = PublicKey::from(pubdata.clone()).to_openssh().unwrap();
    let mut allowed = std::fs::read_to_string(&env.allowed).unwrap();
    allowed.push_str(&format!("{OPERATOR} namespaces=\"aap-grant\" {pubkey}\n"));
    common::write(&env.allowed, allowed);

    let id = new_id();
    let g = grant_json(&id, "codex", &["forgejo-pat-read"], 0, 3600, &[]);
    let signed = SshSig::signed_data("aap-grant", HashAlg::Sha512, g.as_bytes()).unwrap();
    let (flags, counter) = (0x01u8, 42u32); // user present
    let mut data = Vec::new();
    data.extend(sha2::Sha256::digest(app.as_bytes()));
    data.push(flags);
    data.extend(counter.to_be_bytes());
    data.extend(sha2::Sha256::digest(&signed));
    let mut raw = sk.sign(&data).to_bytes().to_vec();
    raw.push(flags);
    raw.extend(counter.to_be_bytes());
    let sig = SshSig::new(
        pubdata,
        "aap-grant",
        HashAlg::Sha512,
        Signature::new(Algorithm::SkEd25519, raw).unwrap(),
    )
    .unwrap();
    let pem = sig.to_pem(LineEnding::LF).unwrap();
    env.put_grant(&id, g.as_bytes(), pem.as_bytes());
    let o = ssh_verify(
        &env.allowed,
        OPERATOR,
        &env.sig_path(&id),
        &env.grant_path(&id),
    );
    assert!(
        o.status.success(),
        "ssh-keygen rejects our sk signature: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = env.check(&id, "forgejo-pat-read");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // The same signature over altered bytes is refused.
    let altered = g.replace("codex", "claude");
    std::fs::write(env.grant_path(&id), altered).unwrap();
    assert_denied(&env.check(&id, "forgejo-pat-read"), "bad signature");
}

#[test]
fn flipped_bytes_in_grant_or_signature_are_bad_signatures() {
    need_ssh_keygen!();
    let env = Env::new();
    let id = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    let grant = std::fs::read(env.grant_path(&id)).unwrap();
    let sig = std::fs::read(env.sig_path(&id)).unwrap();
    // A flipped byte in the grant (inside the agent name, still valid JSON).
    let pos = grant.windows(5).position(|w| w == b"codex").unwrap();
    let mut g = grant.clone();
    g[pos] ^= 0x01; // "codex" -> "bodex"
    std::fs::write(env.grant_path(&id), &g).unwrap();
    assert_denied(
        &env.check(&id, "forgejo-pat-read"),
        "bad signature on the grant",
    );
    std::fs::write(env.grant_path(&id), &grant).unwrap();
    assert_eq!(code(&env.check(&id, "forgejo-pat-read")), 0);
    // A flipped byte in the signature: every position in the base64 body is refused.
    let body_start = sig.iter().position(|&b| b == b'\n').unwrap() + 1;
    let body_end = sig.len() - "-----END SSH SIGNATURE-----\n".len();
    let mut checked = 0;
    for i in (body_start..body_end).step_by(17) {
        if sig[i] == b'\n' {
            continue;
        }
        let mut s = sig.clone();
        s[i] = if s[i] == b'A' { b'B' } else { b'A' };
        std::fs::write(env.sig_path(&id), &s).unwrap();
        let d = lib_check(&env, &id, "forgejo-pat-read", None, "h").unwrap_err();
        assert!(
            matches!(
                d,
                Denial::BadSignature { .. } | Denial::SignerNotAllowed { .. }
            ),
            "byte {i}: {d:?}"
        );
        checked += 1;
    }
    assert!(checked > 10);
    std::fs::write(env.sig_path(&id), &sig).unwrap();
    // The signature file missing.
    std::fs::remove_file(env.sig_path(&id)).unwrap();
    assert_denied(&env.check(&id, "forgejo-pat-read"), "bad signature");
}

#[test]
fn signer_missing_wrong_namespace_and_expired_signer_are_refused() {
    need_ssh_keygen!();
    let env = Env::new();
    // A key that is not in allowed_signers.
    let stranger = env.path().join("stranger");
    keygen(&stranger, "ed25519", None);
    let id = new_id();
    let g = grant_json(&id, "codex", &["forgejo-pat-read"], 0, 3600, &[]);
    env.put_grant(
        &id,
        g.as_bytes(),
        &ssh_sign(&stranger, "aap-grant", g.as_bytes()),
    );
    let o = env.check(&id, "forgejo-pat-read");
    assert_denied(&o, "signed by a key that may not sign grants");
    assert!(stderr(&o).contains("is not listed in"), "{}", stderr(&o));

    // The operator key, but the git namespace.
    let id = new_id();
    let g = grant_json(&id, "codex", &["forgejo-pat-read"], 0, 3600, &[]);
    env.put_grant(&id, g.as_bytes(), &ssh_sign(&env.key, "git", g.as_bytes()));
    let o = env.check(&id, "forgejo-pat-read");
    assert_denied(&o, "namespace \"git\", not \"aap-grant\"");

    // A key allowed only for git in allowed_signers.
    let gitkey = env.path().join("gitkey");
    keygen(&gitkey, "ed25519", None);
    let mut allowed = std::fs::read_to_string(&env.allowed).unwrap();
    allowed.push_str(&format!(
        "{OPERATOR} namespaces=\"git\" {}\n",
        pubkey(&gitkey)
    ));
    // A signer whose validity ended (valid-before in the past).
    let old = env.path().join("oldkey");
    keygen(&old, "ed25519", None);
    allowed.push_str(&format!(
        "{OPERATOR} namespaces=\"aap-grant\",valid-before=\"20200101Z\" {}\n",
        pubkey(&old)
    ));
    common::write(&env.allowed, allowed);
    let id = new_id();
    let g = grant_json(&id, "codex", &["forgejo-pat-read"], 0, 3600, &[]);
    env.put_grant(
        &id,
        g.as_bytes(),
        &ssh_sign(&gitkey, "aap-grant", g.as_bytes()),
    );
    assert_denied(
        &env.check(&id, "forgejo-pat-read"),
        "allowed only for namespaces \"git\"",
    );
    let id = new_id();
    let g = grant_json(&id, "codex", &["forgejo-pat-read"], 0, 3600, &[]);
    env.put_grant(
        &id,
        g.as_bytes(),
        &ssh_sign(&old, "aap-grant", g.as_bytes()),
    );
    assert_denied(
        &env.check(&id, "forgejo-pat-read"),
        "the key expired at 2020-01-01T00:00:00Z",
    );
    // ssh-keygen agrees that this signer is no longer valid.
    let o = ssh_verify(
        &env.allowed,
        OPERATOR,
        &env.sig_path(&id),
        &env.grant_path(&id),
    );
    assert!(!o.status.success(), "ssh-keygen accepted an expired signer");
    // A principal mismatch: the grant names another operator than the key's line.
    let id = new_id();
    let g = grant_json(&id, "codex", &["forgejo-pat-read"], 0, 3600, &[])
        .replace(OPERATOR, "mallory@example.org");
    env.put_grant(
        &id,
        g.as_bytes(),
        &ssh_sign(&env.key, "aap-grant", g.as_bytes()),
    );
    assert_denied(
        &env.check(&id, "forgejo-pat-read"),
        "not for the grant's operator \"mallory@example.org\"",
    );
}

#[test]
fn expired_not_yet_valid_revoked_and_unknown_sessions() {
    need_ssh_keygen!();
    let env = Env::new();
    let sign = |nbf: i64, exp: i64| {
        let id = new_id();
        let g = grant_json(&id, "codex", &["forgejo-pat-read"], nbf, exp, &[]);
        env.put_grant(
            &id,
            g.as_bytes(),
            &ssh_sign(&env.key, "aap-grant", g.as_bytes()),
        );
        id
    };
    let expired = sign(-7200, -60);
    let o = env.check(&expired, "forgejo-pat-read");
    assert_denied(&o, &format!("session {expired} expired at"));
    assert!(stderr(&o).contains(&format!(
        "aap: hint: aap session approve {expired} --cap forgejo-pat-read"
    )));
    let future = sign(3600, 7200);
    assert_denied(
        &env.check(&future, "forgejo-pat-read"),
        "is not valid before",
    );
    assert!(matches!(
        lib_check(&env, &future, "forgejo-pat-read", None, "h"),
        Err(Denial::NotYetValid { .. })
    ));

    let id = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    assert_eq!(code(&env.check(&id, "forgejo-pat-read")), 0);
    let o = env.run(&["session", "revoke", &id, "--reason", "test over"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(env.state.join("revoked").join(&id).exists());
    let o = env.check(&id, "forgejo-pat-read");
    assert_denied(&o, &format!("session {id} was revoked"));
    assert!(stderr(&o).contains("test over"));
    // Revoked stays revoked even if someone re-signs: approve refuses.
    let o = env.run(&["session", "approve", &id, "--cap", "forgejo-pat-read"]);
    assert_eq!(code(&o), 77, "{}", stderr(&o));

    let unknown = new_id();
    let o = env.check(&unknown, "forgejo-pat-read");
    assert_denied(&o, &format!("no session {unknown}"));
    // The broker knows the caller is codex (its uid), so the hint names that agent.
    assert!(
        stderr(&o).contains("aap: hint: the operator starts a session: aap session start --agent codex --cap forgejo-pat-read"),
        "{}",
        stderr(&o)
    );
    // No session at all in the environment.
    let o = env.run(&["session", "check", "forgejo-pat-read"]);
    assert_denied(&o, "AAP_SESSION is not set");
}

#[test]
fn agent_host_and_uid_mismatches() {
    need_ssh_keygen!();
    let env = Env::new();
    let id = env.start(&[
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
        "--host",
        "build1.example.org",
    ]);
    let d = lib_check(
        &env,
        &id,
        "forgejo-pat-read",
        Some("claude"),
        "build1.example.org",
    )
    .unwrap_err();
    assert!(matches!(d, Denial::AgentMismatch { .. }), "{d:?}");
    assert!(
        d.message()
            .contains("belongs to agent codex, not to claude")
    );
    assert_eq!(
        d.hint(),
        "use claude's own session (its AAP_SESSION), for what claude may use: aap catalog list --agent claude"
    );
    let d = lib_check(
        &env,
        &id,
        "forgejo-pat-read",
        Some("codex"),
        "other.example.org",
    )
    .unwrap_err();
    assert!(matches!(d, Denial::HostMismatch { .. }), "{d:?}");
    assert_eq!(
        d.hint(),
        "aap session start --agent codex --cap forgejo-pat-read --host other.example.org"
    );
    let a = lib_check(
        &env,
        &id,
        "forgejo-pat-read",
        Some("codex"),
        "BUILD1.example.org",
    )
    .unwrap();
    assert_eq!(a.hosts(), ["build1.example.org"]);
    // The CLI checks this host's name, which is not build1.
    let o = env.check(&id, "forgejo-pat-read");
    assert_denied(&o, "is limited to host(s) build1.example.org");

    // uid binding in the config. codex bound to another uid: to the broker this process is
    // no agent at all, so it learns nothing about the session.
    let me = aap::sys::uid();
    let other = me.wrapping_add(4242);
    env.write_config(&format!("agents:\n  codex:\n    uid: {other}\n"));
    let id = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    let o = env.check(&id, "forgejo-pat-read");
    assert_denied(&o, &format!("uid {me} is not an agent"));
    assert!(
        !stderr(&o).contains(&id),
        "leaks the session: {}",
        stderr(&o)
    );
    // The grant check itself still binds the agent to its uid (what the broker asks with the
    // kernel's uid of the caller).
    let d = lib_check(&env, &id, "forgejo-pat-read", Some("codex"), "h").unwrap_err();
    assert!(matches!(d, Denial::UidNotAllowed { .. }), "{d:?}");
    assert!(
        d.message().contains(&format!(
            "binds to uid {other}; this process runs as uid {me}"
        )),
        "{}",
        d.message()
    );
    env.write_config(&format!("agents:\n  codex:\n    uid: {me}\n"));
    assert_eq!(code(&env.check(&id, "forgejo-pat-read")), 0);
    // Another agent's uid: the broker maps this process to claude, and codex's session is not
    // claude's.
    env.be_agent("claude");
    assert_denied(
        &env.check(&id, "forgejo-pat-read"),
        "belongs to agent codex, not to claude",
    );
}

#[test]
fn malformed_and_path_traversal_ids_are_denied_before_any_path_use() {
    need_ssh_keygen!();
    let env = Env::new();
    // Plant a valid grant outside the grants dir that a traversal would reach.
    let id = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    let outside = env.path().join("evil");
    std::fs::copy(env.grant_path(&id), outside.with_extension("grant")).unwrap();
    std::fs::copy(env.sig_path(&id), outside.with_extension("grant.sig")).unwrap();
    let long = "0".repeat(5000);
    let abs = outside.to_string_lossy().into_owned();
    for bad in [
        "../../evil",
        "../evil",
        abs.as_str(),
        "",
        "01j0000000000000000000000a",
        long.as_str(),
        "01M85PEFW4670TW39GD8PMS73P/../x",
        ".",
    ] {
        let o = env.check(bad, "forgejo-pat-read");
        // An empty id is no session at all (the client sends none); every other one is
        // malformed. Either way the broker denies before using any path.
        assert_denied(
            &o,
            if bad.is_empty() {
                "AAP_SESSION is not set and --session was not given"
            } else {
                "is malformed"
            },
        );
        assert!(
            stderr(&o).len() < 600,
            "echoes hostile input: {}",
            stderr(&o)
        );
    }
    // NUL bytes cannot travel in argv; the library refuses them too.
    let d = lib_check(
        &env,
        "01M85PEFW4670TW39GD8PMS73\0",
        "forgejo-pat-read",
        None,
        "h",
    )
    .unwrap_err();
    assert!(matches!(d, Denial::MalformedId { .. }), "{d:?}");
    for sub in ["revoke", "show", "approve"] {
        let mut args = vec!["session", sub, "../../evil"];
        if sub == "approve" {
            args.extend(["--cap", "forgejo-pat-read"]);
        }
        let o = env.run(&args);
        assert_eq!(code(&o), 77, "{sub}: {}", stderr(&o));
        assert!(stderr(&o).contains("is malformed"), "{sub}: {}", stderr(&o));
    }
    let o = env.run(&["approve", "../x"]);
    assert_eq!(code(&o), 77, "{}", stderr(&o));
}

#[test]
fn symlinked_fifo_oversized_and_hostile_grant_files_are_refused() {
    need_ssh_keygen!();
    let env = Env::new();
    let id = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    let real = std::fs::read(env.grant_path(&id)).unwrap();
    // A symlink to a perfectly valid copy is still refused.
    let copy = env.path().join("copy.grant");
    std::fs::write(&copy, &real).unwrap();
    std::fs::remove_file(env.grant_path(&id)).unwrap();
    std::os::unix::fs::symlink(&copy, env.grant_path(&id)).unwrap();
    let o = env.check(&id, "forgejo-pat-read");
    assert_denied(&o, "is a symlink");
    std::fs::remove_file(env.grant_path(&id)).unwrap();
    // A FIFO: refused at once, without blocking.
    let st = std::process::Command::new("mkfifo")
        .arg(env.grant_path(&id))
        .status()
        .unwrap();
    assert!(st.success());
    let o = env.check(&id, "forgejo-pat-read");
    assert_denied(&o, "is not a regular file");
    std::fs::remove_file(env.grant_path(&id)).unwrap();
    // Larger than 64 KiB, even if signed.
    let big = format!(
        "{}{}",
        String::from_utf8(real.clone()).unwrap(),
        " ".repeat(70_000)
    );
    env.put_grant(
        &id,
        big.as_bytes(),
        &ssh_sign(&env.key, "aap-grant", big.as_bytes()),
    );
    assert_denied(&env.check(&id, "forgejo-pat-read"), "the limit is 65536");
    // Signed, but with an unknown field, a duplicate key, or another session's id.
    let text = String::from_utf8(real).unwrap();
    let other = new_id();
    for (doc, want) in [
        (
            text.replacen("\"v\": 1,", "\"v\": 1,\n  \"admin\": true,", 1),
            "unknown field `admin`",
        ),
        (
            text.replacen("\"v\": 1,", "\"v\": 1,\n  \"agent\": \"claude\",", 1),
            "duplicate field `agent`",
        ),
        (
            text.replace(&id, &other),
            &format!("names session {other}, but its file is for session {id}") as &str,
        ),
    ] {
        env.put_grant(
            &id,
            doc.as_bytes(),
            &ssh_sign(&env.key, "aap-grant", doc.as_bytes()),
        );
        let o = env.check(&id, "forgejo-pat-read");
        assert_denied(&o, want);
        assert!(
            stderr(&o).contains("the grant of session"),
            "{}",
            stderr(&o)
        );
    }
    // A grant+signature copied from another session into this one's name.
    let id2 = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    std::fs::copy(env.grant_path(&id2), env.grant_path(&id)).unwrap();
    std::fs::copy(env.sig_path(&id2), env.sig_path(&id)).unwrap();
    assert_denied(
        &env.check(&id, "forgejo-pat-read"),
        &format!("names session {id2}, but its file is for session {id}"),
    );
}

#[test]
fn start_refusals_have_the_contract_exit_codes_and_hints() {
    need_ssh_keygen!();
    let env = Env::new();
    let o = env.run(&[
        "session",
        "start",
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-reed",
    ]);
    common::assert_fails(&o, 78, "did you mean forgejo-pat-read?");
    let o = env.run(&[
        "session",
        "start",
        "--agent",
        "hermes",
        "--cap",
        "ssh-vps1000-iskra-readonly",
    ]);
    common::assert_fails(&o, 77, "does not allow agent hermes");
    let o = env.run(&[
        "session",
        "start",
        "--agent",
        "codex",
        "--cap",
        "ssh-vps1000-iskra-readonly",
        "--ttl",
        "3h",
    ]);
    common::assert_fails(
        &o,
        77,
        "aap: hint: aap session start --agent codex --cap ssh-vps1000-iskra-readonly --ttl 2h\n",
    );
    let o = env.run(&[
        "session",
        "start",
        "--agent",
        "codex",
        "--cap",
        "break-glass-full-access",
    ]);
    common::assert_fails(&o, 77, "--break-glass --reason");
    let o = env.run(&[
        "session",
        "start",
        "--agent",
        "codex",
        "--cap",
        "break-glass-full-access",
        "--break-glass",
    ]);
    assert_eq!(code(&o), 77, "{}", stderr(&o));
    // Break-glass with a reason works, and only that grant may use the critical capability.
    let id = env.start(&[
        "--agent",
        "codex",
        "--cap",
        "break-glass-full-access",
        "--break-glass",
        "--reason",
        "prod is down",
        "--ttl",
        "15m",
    ]);
    let o = env.check(&id, "break-glass-full-access");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("BREAK-GLASS"));
    // An operator key that cannot sign: missing, or not in allowed_signers.
    let missing = env.path().join("nokey");
    let cfg = std::fs::read_to_string(&env.config).unwrap().replace(
        &env.key.display().to_string(),
        &missing.display().to_string(),
    );
    common::write(&env.config, cfg);
    let o = env.run(&[
        "session",
        "start",
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
    ]);
    common::assert_fails(&o, 78, "ssh-keygen -y -f");
    let unlisted = env.path().join("unlisted");
    keygen(&unlisted, "ed25519", None);
    let cfg = std::fs::read_to_string(&env.config).unwrap().replace(
        &missing.display().to_string(),
        &unlisted.display().to_string(),
    );
    common::write(&env.config, cfg);
    let o = env.run(&[
        "session",
        "start",
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
    ]);
    common::assert_fails(&o, 78, "cannot sign grants");
    assert!(
        stderr(&o).contains("namespaces=\"aap-grant\" ssh-ed25519 "),
        "{}",
        stderr(&o)
    );
    // Listed (public half present) but the private key is gone: ssh-keygen itself fails.
    let allowed = format!(
        "{OPERATOR} namespaces=\"aap-grant\" {}\n",
        pubkey(&unlisted)
    );
    common::write(&env.allowed, allowed);
    std::fs::remove_file(&unlisted).unwrap();
    let o = env.run(&[
        "session",
        "start",
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
    ]);
    assert_eq!(code(&o), 78, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot sign (ssh-keygen -Y sign failed"),
        "{}",
        stderr(&o)
    );
    // Nothing was written by the refused starts.
    let n = std::fs::read_dir(env.state.join("grants")).unwrap().count();
    assert_eq!(n, 2, "only the break-glass grant and its signature");
}

#[test]
fn approve_adds_capabilities_and_a_tampered_grant_is_never_resigned() {
    need_ssh_keygen!();
    let env = Env::new();
    let id = env.start(&[
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
        "--ttl",
        "1h",
    ]);
    let o = env.run(&[
        "session",
        "approve",
        &id,
        "--cap",
        "ssh-vps1000-iskra-readonly",
        "--ttl",
        "30m",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&env.check(&id, "ssh-vps1000-iskra-readonly")), 0);
    assert_eq!(code(&env.check(&id, "forgejo-pat-read")), 0);
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.grant_path(&id)).unwrap()).unwrap();
    assert_eq!(g["seq"], 2);
    assert_eq!(g["capabilities"].as_array().unwrap().len(), 2);
    let o = ssh_verify(
        &env.allowed,
        OPERATOR,
        &env.sig_path(&id),
        &env.grant_path(&id),
    );
    assert!(o.status.success());
    // An agent widens its own grant by hand: checks deny, and approve refuses to launder it.
    let widened = std::fs::read_to_string(env.grant_path(&id))
        .unwrap()
        .replace("\"hosts\": []", "\"hosts\": [\"x\"]");
    std::fs::write(env.grant_path(&id), widened).unwrap();
    assert_denied(&env.check(&id, "forgejo-pat-read"), "bad signature");
    let o = env.run(&[
        "session",
        "approve",
        &id,
        "--cap",
        "infisical-secrets-read-scoped",
    ]);
    common::assert_fails(&o, 65, "refusing to re-sign it");
}

/// Approve rewrites both files while checks run: no check may see a torn pair.
#[test]
fn approve_racing_with_checks_never_shows_a_torn_grant() {
    need_ssh_keygen!();
    let env = Env::new();
    let id = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    let cfg = env.load_config();
    let cat = env.load_catalog();
    let done = std::sync::atomic::AtomicBool::new(false);
    let approvals = 16;
    std::thread::scope(|s| {
        let approver = s.spawn(|| {
            for i in 0..approvals {
                let cap = [
                    "ssh-vps1000-iskra-readonly",
                    "ssh-rs2000-platform-host-agent",
                    "infisical-secrets-read-scoped",
                ][i % 3];
                let o = env.run(&["session", "approve", &id, "--cap", cap]);
                assert_eq!(code(&o), 0, "{}", stderr(&o));
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        // In-process checks as fast as possible, from two threads, while approvals run.
        let checker = || {
            let mut n = 0u64;
            let mut seqs = std::collections::BTreeSet::new();
            while !done.load(std::sync::atomic::Ordering::SeqCst) || n < 100 {
                let req = CheckRequest {
                    session: &id,
                    capability: "forgejo-pat-read",
                    agent: Some("codex"),
                    host: "h",
                    uid: aap::sys::uid(),
                };
                match aap::grant::check(&cfg, &cat, &req, SystemTime::now()) {
                    Ok(_) => n += 1,
                    Err(d) => panic!("check {n} saw a torn or broken grant: {d:?}"),
                }
                if let Ok(b) = std::fs::read(env.grant_path(&id)) {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) {
                        seqs.insert(v["seq"].as_u64().unwrap_or(0));
                    }
                }
            }
            (n, seqs)
        };
        let checkers: Vec<_> = (0..2).map(|_| s.spawn(checker)).collect();
        approver.join().unwrap();
        for c in checkers {
            let (n, seqs) = c.join().unwrap();
            assert!(n >= 100, "only {n} checks");
            assert!(
                seqs.len() >= 3,
                "checks did not overlap the approvals: saw grant versions {seqs:?}"
            );
            eprintln!("{n} in-process checks across grant versions {seqs:?}");
        }
    });
    // And 100 checks through the binary while approvals run again.
    std::thread::scope(|s| {
        let approver = s.spawn(|| {
            for _ in 0..5 {
                let o = env.run(&[
                    "session",
                    "approve",
                    &id,
                    "--cap",
                    "ssh-vps1000-iskra-readonly",
                ]);
                assert_eq!(code(&o), 0, "{}", stderr(&o));
            }
        });
        for i in 0..100 {
            let o = env.check(&id, "forgejo-pat-read");
            assert_eq!(code(&o), 0, "binary check {i}: {}", stderr(&o));
        }
        approver.join().unwrap();
    });
}

#[test]
fn requests_are_pending_until_the_operator_answers() {
    need_ssh_keygen!();
    let env = Env::new();
    let id = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    let agent = |args: &[&str]| common::run(env.aap(args).env("AAP_SESSION", &id));
    let o = agent(&[
        "request",
        "ssh-vps1000-iskra-readonly",
        "--reason",
        "read the nginx logs",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let rid = stdout(&o).split_whitespace().nth(1).unwrap().to_owned();
    assert!(stdout(&o).contains(&format!("aap approve {rid}")));
    // The broker wrote it (the agent only asked over the socket): the file is owned by the
    // broker's uid, like requests/ (mode 0750, writable by its owner alone), and names the uid
    // the kernel reported for the caller.
    {
        use std::os::unix::fs::MetadataExt;
        let pid = env.broker_pid().expect("aap request started the broker");
        let broker_uid = std::fs::metadata(format!("/proc/{pid}")).unwrap().uid();
        let dir = std::fs::metadata(env.state.join("requests")).unwrap();
        assert_eq!(
            dir.mode() & 0o7777,
            0o750,
            "requests/ mode {:o}",
            dir.mode()
        );
        let file =
            std::fs::metadata(env.state.join("requests").join(format!("{rid}.json"))).unwrap();
        assert_eq!(
            file.uid(),
            broker_uid,
            "request file not owned by the broker"
        );
        assert_eq!(
            file.uid(),
            dir.uid(),
            "request file and requests/ owners differ"
        );
        let v: serde_json::Value = serde_json::from_slice(
            &std::fs::read(env.state.join("requests").join(format!("{rid}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(v["uid"], aap::sys::uid());
        assert_eq!(v["agent"], "codex");
    }
    // A request grants nothing by itself.
    assert_denied(
        &env.check(&id, "ssh-vps1000-iskra-readonly"),
        "is not granted",
    );
    let o = env.run(&["requests"]);
    assert!(
        stdout(&o).contains(&rid) && stdout(&o).contains("read the nginx logs"),
        "{}",
        stdout(&o)
    );
    let o = env.run(&["requests", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["capability"], "ssh-vps1000-iskra-readonly");
    assert_eq!(v[0]["agent"], "codex");
    // Agents cannot ask for break-glass, nor for what their agent may not have.
    let o = agent(&["request", "break-glass-full-access", "--reason", "please"]);
    assert_eq!(code(&o), 77, "{}", stderr(&o));
    let o = agent(&["request", "nonexistent-cap", "--reason", "please"]);
    assert_eq!(code(&o), 77, "{}", stderr(&o));
    // Approve.
    let o = env.run(&["approve", &rid, "--ttl", "10m"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&env.check(&id, "ssh-vps1000-iskra-readonly")), 0);
    assert!(
        !env.state
            .join("requests")
            .join(format!("{rid}.json"))
            .exists()
    );
    let o = env.run(&["approve", &rid]);
    assert_eq!(code(&o), 77, "approved twice: {}", stderr(&o));
    // Deny.
    let o = agent(&[
        "request",
        "ssh-rs2000-platform-host-agent",
        "--reason",
        "deploy",
    ]);
    let rid2 = stdout(&o).split_whitespace().nth(1).unwrap().to_owned();
    let o = env.run(&["deny", &rid2, "--reason", "not now"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_denied(
        &env.check(&id, "ssh-rs2000-platform-host-agent"),
        "is not granted",
    );
    assert_eq!(code(&env.run(&["approve", &rid2])), 77);
    // An expired request cannot be approved, and is not listed.
    let o = agent(&[
        "request",
        "ssh-rs2000-platform-host-agent",
        "--reason",
        "deploy again",
    ]);
    let rid3 = stdout(&o).split_whitespace().nth(1).unwrap().to_owned();
    let p = env.state.join("requests").join(format!("{rid3}.json"));
    let past = rfc(now_secs() - 10);
    let text = std::fs::read_to_string(&p).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let text = text.replace(v["expires_at"].as_str().unwrap(), &past);
    std::fs::write(&p, text).unwrap();
    assert!(!stdout(&env.run(&["requests"])).contains(&rid3));
    let o = env.run(&["approve", &rid3]);
    common::assert_fails(&o, 77, "expired");
    // A forged request naming another agent is refused on approve.
    let o = agent(&["request", "ssh-rs2000-platform-host-agent", "--reason", "x"]);
    let rid4 = stdout(&o).split_whitespace().nth(1).unwrap().to_owned();
    let p = env.state.join("requests").join(format!("{rid4}.json"));
    std::fs::write(
        &p,
        std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"codex\"", "\"claude\""),
    )
    .unwrap();
    let o = env.run(&["approve", &rid4]);
    assert_eq!(code(&o), 65, "{}", stderr(&o));
    // Only the broker writes requests/: a request file in a requests/ others may write, or one
    // owned by another uid than the directory's owner, is a forgery, and approve refuses it
    // without touching the grant.
    let o = agent(&["request", "ssh-rs2000-platform-host-agent", "--reason", "y"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let rid5 = stdout(&o).split_whitespace().nth(1).unwrap().to_owned();
    let reqs = env.state.join("requests");
    let p5 = reqs.join(format!("{rid5}.json"));
    let grant_before = std::fs::read(env.grant_path(&id)).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&reqs, std::fs::Permissions::from_mode(0o770)).unwrap();
        let o = env.run(&["approve", &rid5]);
        common::assert_fails(&o, 77, "is writable by others (mode 770)");
        assert!(stderr(&o).contains("may be forged"), "{}", stderr(&o));
        std::fs::set_permissions(&reqs, std::fs::Permissions::from_mode(0o757)).unwrap();
        common::assert_fails(&env.run(&["approve", &rid5]), 77, "is writable by others");
        std::fs::set_permissions(&reqs, std::fs::Permissions::from_mode(0o750)).unwrap();
    }
    assert_eq!(std::fs::read(env.grant_path(&id)).unwrap(), grant_before);
    assert!(
        p5.exists(),
        "a refused request stays for the operator to deny"
    );
    if aap::sys::uid() == 0 {
        // Another uid's file (e.g. an agent planting one): refused, naming the owner.
        std::os::unix::fs::chown(&p5, Some(65534), None).unwrap();
        let o = env.run(&["approve", &rid5]);
        common::assert_fails(&o, 77, "is owned by uid 65534, not by the broker");
        assert!(
            stderr(&o).contains("refusing a forged request"),
            "{}",
            stderr(&o)
        );
        assert_eq!(std::fs::read(env.grant_path(&id)).unwrap(), grant_before);
        assert_denied(
            &env.check(&id, "ssh-rs2000-platform-host-agent"),
            "is not granted",
        );
        std::os::unix::fs::chown(&p5, Some(0), None).unwrap();
    } else {
        common::skip(
            "requests_are_pending_until_the_operator_answers",
            "not root: cannot make a request file owned by another uid (the owner check)",
        );
    }
    // The genuine request, in a 0750 requests/, is approved.
    let o = env.run(&["approve", &rid5]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&env.check(&id, "ssh-rs2000-platform-host-agent")), 0);
    // The audit log holds the whole story, and verifies.
    let log = std::fs::read_to_string(&env.audit).unwrap();
    for ev in [
        "\"session.start\"",
        "\"request\"",
        "\"request.approve\"",
        "\"request.deny\"",
    ] {
        assert!(log.contains(ev), "{ev} missing");
    }
    assert_eq!(code(&env.run(&["audit", "verify"])), 0);
}

#[test]
fn list_show_and_gc() {
    need_ssh_keygen!();
    let env = Env::new();
    let a = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    let b = env.start(&["--agent", "claude", "--cap", "forgejo-pat-read"]);
    // An old expired session, signed long ago (by hand), and a revoked one.
    let old = new_id();
    let g = grant_json(
        &old,
        "codex",
        &["forgejo-pat-read"],
        -30 * 86400,
        -20 * 86400,
        &[],
    );
    env.put_grant(
        &old,
        g.as_bytes(),
        &ssh_sign(&env.key, "aap-grant", g.as_bytes()),
    );
    assert_eq!(code(&env.run(&["session", "revoke", &b])), 0);
    let o = env.run(&["session", "list"]);
    let out = stdout(&o);
    assert!(
        out.contains(&a) && !out.contains(&b) && !out.contains(&old),
        "{out}"
    );
    assert!(out.contains(OPERATOR));
    let o = env.run(&["session", "list", "--all", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let status = |id: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|s| s["session"] == id)
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(status(&a), "active");
    assert_eq!(status(&b), "revoked");
    assert_eq!(status(&old), "expired");
    let o = env.run(&["session", "show", &a]);
    assert_eq!(code(&o), 0);
    assert!(
        stdout(&o).contains("signature:  good (ssh-ed25519 key SHA256:"),
        "{}",
        stdout(&o)
    );
    // show on a tampered grant says so and exits 65.
    let t = std::fs::read_to_string(env.grant_path(&a))
        .unwrap()
        .replace("codex", "hermes");
    std::fs::write(env.grant_path(&a), t).unwrap();
    let o = env.run(&["session", "show", &a]);
    assert_eq!(code(&o), 65, "{}", stderr(&o));
    assert!(stdout(&o).contains("DOES NOT VERIFY"), "{}", stdout(&o));
    // gc: the 20-day-old grant goes with a 7d retention; the fresh ones stay.
    let o = env.run(&["session", "gc"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("removed 1 session(s)"),
        "{}",
        stdout(&o)
    );
    assert!(!env.grant_path(&old).exists() && !env.sig_path(&old).exists());
    assert!(env.grant_path(&a).exists() && env.grant_path(&b).exists());
    let log = std::fs::read_to_string(&env.audit).unwrap();
    assert!(
        log.lines()
            .last()
            .unwrap()
            .contains("\"event\":\"session.gc\"")
    );
}

#[test]
fn an_unwritable_audit_log_stops_the_action() {
    need_ssh_keygen!();
    let env = Env::new();
    // The audit log path is a directory: nothing may be granted.
    std::fs::create_dir_all(&env.audit).unwrap();
    let o = env.run(&[
        "session",
        "start",
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
    ]);
    common::assert_fails(&o, 65, "nothing was done");
    assert!(
        !env.state.join("grants").exists()
            || std::fs::read_dir(env.state.join("grants")).unwrap().count() == 0
    );
    std::fs::remove_dir(&env.audit).unwrap();
    // A symlinked audit log is refused too.
    let real = env.path().join("real.jsonl");
    std::fs::write(&real, b"").unwrap();
    std::os::unix::fs::symlink(&real, &env.audit).unwrap();
    let o = env.run(&[
        "session",
        "start",
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
    ]);
    common::assert_fails(&o, 65, "symlink");
    std::fs::remove_file(&env.audit).unwrap();
    // A damaged log (partial last line): approve is refused and the grant stays as it was.
    let id = env.start(&["--agent", "codex", "--cap", "forgejo-pat-read"]);
    let before = std::fs::read(env.grant_path(&id)).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&env.audit)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"v\":1,\"id\"").unwrap();
    let o = env.run(&[
        "session",
        "approve",
        &id,
        "--cap",
        "ssh-vps1000-iskra-readonly",
    ]);
    assert_eq!(code(&o), 65, "{}", stderr(&o));
    assert_eq!(
        std::fs::read(env.grant_path(&id)).unwrap(),
        before,
        "grant changed although the log failed"
    );
    let o = ssh_verify(
        &env.allowed,
        OPERATOR,
        &env.sig_path(&id),
        &env.grant_path(&id),
    );
    assert!(o.status.success(), "rollback left a mismatched pair");
}

#[test]
fn nothing_secret_reaches_the_log_or_the_state_dir() {
    need_ssh_keygen!();
    let env = Env::new();
    let id = env.start(&[
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
        "--reason",
        "routine",
    ]);
    let o = common::run(
        env.aap(&["request", "ssh-vps1000-iskra-readonly", "--reason", "logs"])
            .env("AAP_SESSION", &id),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    env.run(&[
        "session",
        "approve",
        &id,
        "--cap",
        "infisical-secrets-read-scoped",
    ]);
    env.run(&["session", "revoke", &id]);
    // The private key's body must appear nowhere aap writes.
    let key = std::fs::read_to_string(&env.key).unwrap();
    let secret_lines: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!secret_lines.is_empty());
    let mut files = vec![env.audit.clone()];
    for sub in ["grants", "revoked", "requests"] {
        for e in std::fs::read_dir(env.state.join(sub)).unwrap() {
            files.push(e.unwrap().path());
        }
    }
    assert!(files.len() > 4);
    for f in files {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
        for l in &secret_lines {
            assert!(
                !text.contains(l),
                "{} contains private key material",
                f.display()
            );
        }
    }
}

#[test]
fn catalog_changes_apply_to_grants_already_signed() {
    need_ssh_keygen!();
    let env = Env::new();
    let id = env.start(&[
        "--agent",
        "claude",
        "--cap",
        "ssh-vps1000-iskra-readonly",
        "--cap",
        "forgejo-pat-read",
        "--ttl",
        "2h",
    ]);
    // This process is claude to the broker (its uid), as the agent of this session would be.
    env.be_agent("claude");
    assert_eq!(code(&env.check(&id, "ssh-vps1000-iskra-readonly")), 0);
    let a = lib_check(&env, &id, "ssh-vps1000-iskra-readonly", None, "h").unwrap();
    assert!(a.remaining().as_secs() > 7000);
    let original = std::fs::read_to_string(&env.catalog).unwrap();
    let vps = "    agents: [codex, claude]\n    max_ttl: 2h\n";
    assert!(original.contains(vps));
    // max_ttl lowered to 30m: the grant now ends 30m after its approval.
    common::write(
        &env.catalog,
        original.replace(vps, "    agents: [codex, claude]\n    max_ttl: 30m\n"),
    );
    let a = lib_check(&env, &id, "ssh-vps1000-iskra-readonly", None, "h").unwrap();
    assert!(a.remaining().as_secs() <= 1800, "{:?}", a.remaining());
    // claude removed from the capability's agents: denied although the grant lists it.
    common::write(
        &env.catalog,
        original.replace(vps, "    agents: [codex]\n    max_ttl: 2h\n"),
    );
    let o = env.check(&id, "ssh-vps1000-iskra-readonly");
    assert_denied(&o, "which no longer include claude");
    // The capability removed from the catalog altogether.
    let start = original.find("  - id: ssh-vps1000-iskra-readonly").unwrap();
    let end = original
        .find("  - id: infisical-secrets-read-scoped")
        .unwrap();
    common::write(
        &env.catalog,
        format!("{}{}", &original[..start], &original[end..]),
    );
    let o = env.check(&id, "ssh-vps1000-iskra-readonly");
    assert_denied(&o, "is granted to session");
    assert!(
        stderr(&o).contains("no longer in the catalog"),
        "{}",
        stderr(&o)
    );
    assert_eq!(code(&env.check(&id, "forgejo-pat-read")), 0);
}

#[test]
fn hostile_capability_names_are_quoted_in_denials() {
    need_ssh_keygen!();
    let env = Env::new();
    let unknown = new_id();
    let d = lib_check(&env, &unknown, "x\n\u{1b}[2Jrm -rf /", None, "h").unwrap_err();
    assert!(matches!(d, Denial::NoSuchSession { .. }), "{d:?}");
    assert!(
        !d.message().contains('\n') && !d.hint().contains('\n') && !d.hint().contains('\u{1b}'),
        "{}",
        d.hint()
    );
    assert!(
        d.hint().contains("--cap \"x\\n\\u{1b}[2Jrm -rf /\""),
        "{}",
        d.hint()
    );
}

// ---- aap session import: grants signed on another host ----------------------------------------

/// Two hosts: a laptop that signs, and the agent's host, whose allowed_signers trusts the
/// laptop's key. Returns (laptop, target).
fn two_hosts() -> (Env, Env) {
    let laptop = Env::new();
    let target = Env::new();
    let mut allowed = std::fs::read_to_string(&target.allowed).unwrap();
    allowed.push_str(&format!(
        "{OPERATOR} namespaces=\"aap-grant\" {}\n",
        pubkey(&laptop.key)
    ));
    common::write(&target.allowed, allowed);
    (laptop, target)
}

/// Copy the laptop's two files of `id` into `dir` (as scp would), returning the .grant path.
fn copy_out(laptop: &Env, id: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let g = dir.join(format!("{id}.grant"));
    std::fs::copy(laptop.grant_path(id), &g).unwrap();
    std::fs::copy(laptop.sig_path(id), dir.join(format!("{id}.grant.sig"))).unwrap();
    g
}

fn import(target: &Env, file: &std::path::Path) -> std::process::Output {
    target.run(&["session", "import", file.to_str().unwrap()])
}

fn audit_events(env: &Env) -> Vec<String> {
    std::fs::read_to_string(&env.audit)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[test]
fn import_installs_a_grant_signed_on_another_host_and_audits_it() {
    let (laptop, target) = two_hosts();
    let host = aap::sys::hostname().unwrap();
    let id = laptop.start(&[
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
        "--host",
        &host,
        "--ttl",
        "1h",
    ]);
    let inbox = common::tempdir();
    let file = copy_out(&laptop, &id, inbox.path());
    // Before: this host knows no such session.
    assert_eq!(code(&target.check(&id, "forgejo-pat-read")), 77);
    let o = import(&target, &file);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains(&format!(
            "imported: session {id} for codex: forgejo-pat-read until "
        )),
        "{out}"
    );
    assert!(out.contains(&format!("export AAP_SESSION={id}")), "{out}");
    // Installed byte for byte, usable, and verifiable with plain OpenSSH.
    assert_eq!(
        std::fs::read(target.grant_path(&id)).unwrap(),
        std::fs::read(laptop.grant_path(&id)).unwrap()
    );
    let c = target.check(&id, "forgejo-pat-read");
    assert_eq!(code(&c), 0, "{}", stderr(&c));
    let v = ssh_verify(
        &target.allowed,
        OPERATOR,
        &target.sig_path(&id),
        &target.grant_path(&id),
    );
    assert!(v.status.success(), "{v:?}");
    // No temporary file left next to the grants.
    let names: Vec<String> = std::fs::read_dir(target.state.join("grants"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // Audited on the target (the start was audited on the laptop only).
    assert_eq!(audit_events(&target), ["session.import"]);
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&target.audit)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(line["session"], id.as_str());
    assert_eq!(line["agent"], "codex");
    assert_eq!(line["capability"], "forgejo-pat-read");
    // Importing the same files again changes nothing; a re-signed (newer) grant replaces it.
    let o = import(&target, &file);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).starts_with("unchanged:"), "{}", stdout(&o));
    let o = laptop.run(&[
        "session",
        "approve",
        &id,
        "--cap",
        "ssh-vps1000-iskra-readonly",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let newer = common::tempdir();
    let file2 = copy_out(&laptop, &id, newer.path());
    let o = import(&target, &file2);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("replaces the older version"),
        "{}",
        stdout(&o)
    );
    assert_eq!(code(&target.check(&id, "ssh-vps1000-iskra-readonly")), 0);
    // ...and the older one cannot come back.
    let o = import(&target, &file);
    assert_eq!(code(&o), 77, "{}", stderr(&o));
    assert!(stderr(&o).contains("not newer"), "{}", stderr(&o));
    assert_eq!(audit_events(&target), ["session.import", "session.import"]);
    let v = target.run(&["audit", "verify"]);
    assert_eq!(code(&v), 0, "{}", stderr(&v));
    // The target's story of the session starts with its imports (issue 15, items 3 and 7).
    let (story, imported) = story_lines(&target.run(&["session", "log", &id]), "imported");
    assert_eq!(imported.len(), 2, "{story}");
    assert!(
        imported[1].contains("ssh-vps1000-iskra-readonly"),
        "{story}"
    );
}

#[test]
fn import_refuses_forged_untrusted_expired_wrong_host_and_revoked_grants() {
    let (laptop, target) = two_hosts();
    let inbox = common::tempdir();
    let refuse = |file: &std::path::Path, want: i32, needle: &str| {
        let o = import(&target, file);
        assert_eq!(code(&o), want, "{needle}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains(needle), "want {needle:?} in {err}");
        assert!(err.contains("aap: hint: "), "{err}");
    };

    // Forged: the agent widened its grant after signing.
    let id = laptop.start(&[
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
        "--ttl",
        "1h",
    ]);
    let file = copy_out(&laptop, &id, inbox.path());
    let text = std::fs::read_to_string(&file).unwrap();
    common::write(
        &file,
        text.replace("forgejo-pat-read", "ssh-vps1000-iskra-readonly"),
    );
    refuse(&file, 65, "does not verify");
    assert!(!target.grant_path(&id).exists());

    // Signed by a key the target does not trust (a third operator's).
    let stranger = Env::new();
    let id = stranger.start(&[
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
        "--ttl",
        "1h",
    ]);
    let file = copy_out(&stranger, &id, inbox.path());
    refuse(&file, 65, "signed by a key this host does not trust");

    // A valid signature over an expired grant.
    let id = new_id();
    let bytes = grant_json(&id, "codex", &["forgejo-pat-read"], -7200, -60, &[]);
    let file = inbox.path().join(format!("{id}.grant"));
    common::write(&file, &bytes);
    common::write(
        &inbox.path().join(format!("{id}.grant.sig")),
        ssh_sign(&laptop.key, "aap-grant", bytes.as_bytes()),
    );
    refuse(&file, 77, "expired at");

    // For another host.
    let id = laptop.start(&[
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
        "--host",
        "build9.example.org",
        "--ttl",
        "1h",
    ]);
    let file = copy_out(&laptop, &id, inbox.path());
    refuse(
        &file,
        77,
        "is limited to build9.example.org and this host is ",
    );

    // For an agent this host does not configure.
    let id = laptop.start(&[
        "--agent",
        "claude",
        "--cap",
        "forgejo-pat-read",
        "--ttl",
        "1h",
    ]);
    let file = copy_out(&laptop, &id, inbox.path());
    refuse(&file, 78, "is for agent claude, which ");

    // Revoked here: a newer version re-signed on the laptop does not bring it back.
    let id = laptop.start(&[
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
        "--ttl",
        "1h",
    ]);
    let file = copy_out(&laptop, &id, inbox.path());
    let o = import(&target, &file);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = target.run(&["session", "revoke", &id, "--reason", "incident"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = laptop.run(&[
        "session",
        "approve",
        &id,
        "--cap",
        "ssh-vps1000-iskra-readonly",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let file = copy_out(&laptop, &id, inbox.path());
    refuse(&file, 77, "was revoked on this host");

    // Files that are not a grant pair at all.
    let sig_only = inbox.path().join(format!("{id}.grant.sig"));
    refuse(&sig_only, 65, "is a grant's signature, not an aap grant");
    let not_json = inbox.path().join("notes.grant");
    common::write(&not_json, "hello\n");
    common::write(&inbox.path().join("notes.grant.sig"), "x");
    refuse(&not_json, 65, "is not an aap grant");
    let missing = inbox.path().join("01M85XA7EM1NKT4B0M6GZGD707.grant");
    refuse(&missing, 65, "does not exist");
    let link = inbox.path().join("link.grant");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    refuse(&link, 65, "is a symlink");

    // Nothing of it was installed but the grant that was later revoked, and only that import
    // and the revocation were audited.
    let mut grants: Vec<String> = std::fs::read_dir(target.state.join("grants"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    grants.sort();
    assert_eq!(grants, [format!("{id}.grant"), format!("{id}.grant.sig")]);
    assert_eq!(audit_events(&target), ["session.import", "session.revoke"]);
}

/// Issue 15, item 3: `aap session list --agent/--cap/--active`, with hosts and reason, and a
/// grant limited to another host marked as such.
#[test]
fn session_list_filters_and_shows_hosts_and_reason() {
    need_ssh_keygen!();
    let env = Env::new();
    let a = env.start(&[
        "--agent",
        "codex",
        "--cap",
        "forgejo-pat-read",
        "--host",
        "elsewhere.example.org",
        "--reason",
        "review PR 12",
    ]);
    let b = env.start(&["--agent", "codex", "--cap", "ssh-vps1000-iskra-readonly"]);
    let c = env.start(&["--agent", "claude", "--cap", "forgejo-pat-read"]);
    let d = env.start(&["--agent", "claude", "--cap", "forgejo-pat-read"]);
    assert_eq!(code(&env.run(&["session", "revoke", &d])), 0);
    let list = |args: &[&str]| {
        let mut a = vec!["session", "list"];
        a.extend_from_slice(args);
        let o = env.run(&a);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        stdout(&o)
    };
    let out = list(&["--agent", "claude"]);
    assert!(
        out.contains(&c) && !out.contains(&a) && !out.contains(&b),
        "{out}"
    );
    let out = list(&["--cap", "ssh-vps1000-iskra-readonly"]);
    assert!(
        out.contains(&b) && !out.contains(&a) && !out.contains(&c),
        "{out}"
    );
    let out = list(&[]);
    let row = out.lines().find(|l| l.contains(&a)).unwrap();
    assert!(
        row.contains("elsewhere.example.org(not this host)"),
        "{row}"
    );
    assert!(row.contains("\"review PR 12\""), "{row}");
    let row = out.lines().find(|l| l.contains(&b)).unwrap();
    assert!(row.contains("  any  "), "{row}");
    assert!(out.lines().next().unwrap().contains("HOSTS"), "{out}");
    let out = list(&["--all", "--agent", "claude"]);
    assert!(out.contains(&d), "{out}");
    let out = list(&["--active", "--agent", "claude"]);
    assert!(out.contains(&c) && !out.contains(&d), "{out}");
    let out = list(&["--agent", "nobody"]);
    assert!(out.contains("no active nobody sessions"), "{out}");
    let o = env.run(&["session", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let row = v
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["session"] == a.as_str())
        .unwrap();
    assert_eq!(row["other_host"], true);
    assert_eq!(code(&env.run(&["session", "list", "--all", "--active"])), 2);
}
