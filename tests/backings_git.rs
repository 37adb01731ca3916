//! The forgejo-pat backing's git-credential form against real git: a real `git http-backend`
//! behind a small HTTP server on 127.0.0.1 that requires Basic auth with the token as password,
//! a real dev-server holding the token, real grants.

mod common;
#[path = "common/gitserver.rs"]
mod gitserver;

use aap::cmd::demo::servers;
use common::world::{DB_PASSWORD, World};
use common::*;
use gitserver::{GitServer, make_repo};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

/// /forgejo:FORGEJO_TOKEN of the dev-server's built-in seed.
const TOKEN: &str = "fj_test_0123456789abcdef0123456789abcdef";

struct GitWorld {
    w: World,
    /// Plain HTTP on loopback, for the git-credential form.
    server: GitServer,
    /// The same repositories over HTTPS (a throwaway CA the config's `ca_bundle` holds), for
    /// the http-proxy form, which forwards over TLS only.
    proxied: GitServer,
    /// The CA of `proxied`'s certificate, which the broker trusts (`ca_bundle`).
    ca: aap::devserver::ca::ThrowawayCa,
}

/// A world whose catalog also has `forgejo-pat-read` for the test server's host,
/// `forgejo-elsewhere` for another host, `forgejo-proxy` and `forgejo-proxy-write` for the
/// HTTPS server's host.
fn git_world() -> GitWorld {
    let mut w = World::new();
    let repos = w.path().join("repos");
    std::fs::create_dir_all(&repos).unwrap();
    make_repo(&repos, "demo");
    let server = GitServer::start(&repos, TOKEN);
    let ca = aap::devserver::ca::ThrowawayCa::generate("test forgejo CA").unwrap();
    let proxied = GitServer::start_tls(&repos, TOKEN, &ca);
    trust_also(&mut w, ca.pem());
    let cat = w.path().join("catalog.yaml");
    let mut text = std::fs::read_to_string(&cat).unwrap();
    text.push_str(&format!(
        "  - id: forgejo-pat-read
    description: Read-only Forgejo access
    audit_tier: low
    agents: [codex]
    max_ttl: 2h
    allowed_commands: [git, sh]
    backing:
      type: forgejo-pat
      host: \"{host}\"
      secret: {{ path: /forgejo, key: FORGEJO_TOKEN }}
    inject: [ {{ type: git-credential }} ]
  - id: forgejo-elsewhere
    description: A token for another Forgejo
    audit_tier: low
    agents: [codex]
    max_ttl: 2h
    backing:
      type: forgejo-pat
      host: \"127.0.0.1:1\"
      secret: {{ path: /forgejo, key: FORGEJO_TOKEN }}
    inject: [ {{ type: git-credential }} ]
  - id: forgejo-proxy
    description: The http-proxy form, read only
    audit_tier: low
    agents: [codex]
    max_ttl: 2h
    allowed_commands: [git, sh]
    access: read
    backing:
      type: forgejo-pat
      host: \"{proxied}\"
      secret: {{ path: /forgejo, key: FORGEJO_TOKEN }}
    inject: [ {{ type: http-proxy }} ]
  - id: forgejo-proxy-write
    description: The http-proxy form, read and write, one audit line per request
    audit_tier: medium
    agents: [codex]
    max_ttl: 2h
    allowed_commands: [git, sh]
    access: write
    backing:
      type: forgejo-pat
      host: \"{proxied}\"
      secret: {{ path: /forgejo, key: FORGEJO_TOKEN }}
    inject: [ {{ type: http-proxy }} ]
  - id: wrap-missing
    description: A program that is installed nowhere
    audit_tier: low
    agents: [codex]
    max_ttl: 2h
    allowed_commands: [no-such-prog-aap]
    backing:
      type: forgejo-pat
      host: \"{host}\"
      secret: {{ path: /forgejo, key: FORGEJO_TOKEN }}
    inject: [ {{ type: git-credential }} ]
",
        host = server.host(),
        proxied = proxied.host()
    ));
    write(&cat, text);
    // The user's own gitconfig: a `store` helper, and a helper that records whatever git hands
    // it. Neither may ever see the token.
    write(
        &w.path().join(".gitconfig"),
        "[credential]\n\thelper = store\n\thelper = \"!f() { cat >> \\\"$HOME/user-helper-saw\\\"; }; f\"\n[user]\n\tname = t\n\temail = t@t\n",
    );
    GitWorld {
        w,
        server,
        proxied,
        ca,
    }
}

/// Make the world's `ca_bundle` hold `pem` besides the dev-server's CA, and restart its
/// broker to read it.
fn trust_also(w: &mut World, pem: &str) {
    let devserver_ca = w.server.ca.clone().expect("a TLS dev-server");
    let bundle = w.path().join("ca-bundle.pem");
    let mut text = std::fs::read_to_string(&devserver_ca).unwrap();
    text.push_str(pem);
    write(&bundle, text);
    let cfg = std::fs::read_to_string(&w.config).unwrap();
    let line = format!("ca_bundle: {}\n", devserver_ca.display());
    assert!(cfg.contains(&line), "unexpected world config: {cfg}");
    write(
        &w.config,
        cfg.replace(&line, &format!("ca_bundle: {}\n", bundle.display())),
    );
    w.start_broker();
}

impl GitWorld {
    fn git_exec(&self, session: &str, cap: &str, dir: &Path, argv: &[&str]) -> Command {
        let mut c = self.w.exec_in(session, cap, argv);
        c.current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .stdin(Stdio::null());
        c
    }

    fn assert_token_stored_nowhere(&self, text: &str) {
        let creds = self.w.path().join(".git-credentials");
        if creds.exists() {
            let c = std::fs::read_to_string(&creds).unwrap();
            assert!(!c.contains(TOKEN), "the store helper saved the token");
        }
        assert!(
            !self.w.path().join("user-helper-saw").exists(),
            "the user's own credential helper was called: {:?}",
            std::fs::read_to_string(self.w.path().join("user-helper-saw"))
        );
        assert_no_leak(&[TOKEN.to_string()], text, self.w.path());
    }
}

#[test]
fn clone_and_fetch_work_through_the_one_shot_helper() {
    let g = git_world();
    let s = g.w.session(&["forgejo-pat-read"]);
    let url = g.server.url("demo.git");
    let o = run(g
        .git_exec(
            &s,
            "forgejo-pat-read",
            g.w.path(),
            &["git", "clone", "-q", &url, "clone"],
        )
        .env("AAP_LOG", "trace"));
    assert_eq!(code(&o), 0, "clone: {}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(g.w.path().join("clone/hello.txt")).unwrap(),
        "hello from the test server\n"
    );
    assert!(g.server.saw_token(TOKEN), "the server never got the token");
    let mut text = format!("{}{}", stdout(&o), stderr(&o));

    let clone = g.w.path().join("clone");
    // A `git -c credential.helper=store` inherited from a calling git (GIT_CONFIG_PARAMETERS,
    // which git reads after GIT_CONFIG_COUNT) must not bring the store helper back.
    let o = run(g
        .git_exec(&s, "forgejo-pat-read", &clone, &["git", "fetch", "origin"])
        .env("GIT_CONFIG_PARAMETERS", "'credential.helper'='store'"));
    assert_eq!(code(&o), 0, "fetch: {}", stderr(&o));
    let o2 = run(&mut g.git_exec(
        &s,
        "forgejo-pat-read",
        &clone,
        &["git", "ls-remote", "origin"],
    ));
    assert_eq!(code(&o2), 0, "ls-remote: {}", stderr(&o2));
    assert!(stdout(&o2).contains("refs/heads/main"), "{}", stdout(&o2));
    text.push_str(&format!(
        "{}{}{}{}",
        stdout(&o),
        stderr(&o),
        stdout(&o2),
        stderr(&o2)
    ));

    g.assert_token_stored_nowhere(&text);
    assert_eq!(g.w.count("exec.end"), 3);

    // Without aap-exec the same fetch is refused by the server: no credential anywhere.
    let o = run(Command::new("git")
        .current_dir(&clone)
        .env("HOME", g.w.path())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "/bin/false")
        .stdin(Stdio::null())
        .args(["fetch", "origin"]));
    assert_ne!(code(&o), 0, "a plain fetch must fail");
    // It consulted the user's own helpers (which had nothing to give).
    assert!(g.w.path().join("user-helper-saw").exists());
}

#[test]
fn without_approval_git_is_denied_and_no_token_is_sent() {
    let g = git_world();
    let s = g.w.session(&["db-low"]);
    let url = g.server.url("demo.git");
    let o = run(&mut g.git_exec(
        &s,
        "forgejo-pat-read",
        g.w.path(),
        &["git", "clone", "-q", &url, "clone"],
    ));
    assert_eq!(code(&o), 77, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.starts_with("aap-exec: error: "), "{err}");
    assert!(err.contains("aap-exec: hint: "), "{err}");
    assert!(!g.w.path().join("clone").exists());
    // A fetch in an existing clone (made without aap) is denied the same way.
    let plain = g.w.path().join("plain");
    make_repo(g.w.path(), "local");
    let st = Command::new("git")
        .args(["clone", "-q"])
        .arg(g.w.path().join("local.git"))
        .arg(&plain)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", g.w.path())
        .status()
        .unwrap();
    assert!(st.success());
    let o = run(&mut g.git_exec(&s, "forgejo-pat-read", &plain, &["git", "fetch", &url]));
    assert_eq!(code(&o), 77, "{}", stderr(&o));
    assert!(!g.server.saw_any_auth(), "the server saw credentials");
    assert_eq!(g.server.served(), 0);
    assert!(g.w.count("deny") >= 2);
    g.assert_token_stored_nowhere(&format!("{}{}", stdout(&o), stderr(&o)));
}

#[test]
fn the_helper_answers_only_for_the_capabilitys_host() {
    let g = git_world();
    // forgejo-elsewhere is approved, but its host is not this server: git asks, the helper
    // stays silent, no prompt is possible, the clone fails, the server never sees a token.
    let s = g.w.session(&["forgejo-elsewhere"]);
    let url = g.server.url("demo.git");
    let o = run(&mut g.git_exec(
        &s,
        "forgejo-elsewhere",
        g.w.path(),
        &["git", "clone", "-q", &url, "clone"],
    ));
    assert_ne!(code(&o), 0, "clone must fail: {}", stderr(&o));
    assert!(!g.server.saw_token(TOKEN));
    assert!(!g.server.saw_any_auth(), "{:?}", g.server.seen_auth);
    g.assert_token_stored_nowhere(&format!("{}{}", stdout(&o), stderr(&o)));
}

#[test]
fn the_token_is_in_neither_env_nor_argv_and_git_config_is_kept() {
    let g = git_world();
    let s = g.w.session(&["forgejo-pat-read"]);
    let script = format!(
        "env > env.txt; cat /proc/$$/cmdline /proc/$PPID/cmdline > cmdlines.txt; \
         git config --get user.name > kept.txt; \
         git config --get-urlmatch credential.helper {url} > ours.txt; \
         git config --get-urlmatch credential.helper http://127.0.0.1:1/x > other.txt || true",
        url = g.server.url("demo.git")
    );
    let o = run(g
        .git_exec(&s, "forgejo-pat-read", g.w.path(), &["sh", "-c", &script])
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "user.name")
        .env("GIT_CONFIG_VALUE_0", "kept-from-caller"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let read = |f: &str| std::fs::read_to_string(g.w.path().join(f)).unwrap();
    let env = read("env.txt");
    assert!(
        env.contains("GIT_CONFIG_KEY_1=credential.helper\n"),
        "{env}"
    );
    assert!(env.contains("git-credential --host 127.0.0.1:"), "{env}");
    assert_eq!(read("kept.txt"), "kept-from-caller\n");
    // Our helper applies to the capability's host, and to no other URL.
    assert!(read("ours.txt").contains(" git-credential --host 127.0.0.1:"));
    assert!(
        !read("other.txt").contains("git-credential"),
        "{}",
        read("other.txt")
    );
    assert_token_absent(&[&env, &read("cmdlines.txt")]);
    g.assert_token_stored_nowhere(&format!("{}{}", stdout(&o), stderr(&o)));
}

fn assert_token_absent(texts: &[&str]) {
    for t in texts {
        assert!(!t.contains(TOKEN), "token found");
    }
}

#[test]
fn the_helper_is_quiet_on_junk_and_never_reads_a_foreign_fd() {
    let d = tempdir();
    // Some junk on stdin, a descriptor that does not exist, actions git never sends.
    let inputs: [&[u8]; 6] = [
        b"",
        b"\xff\xfe\x00garbage\n\n",
        b"protocol=https\nhost=h.example\n",
        b"=====\n\n\n",
        &[b'x'; 200_000],
        b"protocol=http\nhost=127.0.0.1:9\npath=/\0\n",
    ];
    for input in inputs {
        for action in ["get", "store", "erase", "nonsense"] {
            let mut c = cmd(AAP, d.path());
            let mut child = c
                .args(["git-credential", "--host", "h.example", "--fd", "9", action])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            {
                use std::io::Write;
                let mut stdin = child.stdin.take().unwrap();
                let _ = stdin.write_all(input);
            }
            let o = child.wait_with_output().unwrap();
            assert_eq!(code(&o), 0, "{action}: {}", stderr(&o));
            assert_eq!(stdout(&o), "", "{action}");
            assert_eq!(stderr(&o), "", "{action}");
        }
    }
    // A matching request, but fd 0 (or any descriptor that is not our memfd) is never read.
    let secret_file = d.path().join("not-a-memfd");
    std::fs::write(&secret_file, "file-content-token").unwrap();
    let script = format!(
        "printf 'protocol=https\\nhost=h.example\\n\\n' | {} git-credential --host h.example --fd 7 get 7<{}",
        AAP,
        secret_file.display()
    );
    let o = run(cmd("/bin/sh", d.path()).args(["-c", &script]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "", "a plain file was read as the token");
}

// ---- PATH wrappers ----------------------------------------------------------------------------

impl GitWorld {
    /// `git ARGS` as an agent would type it: the wrapper directories first in PATH, the session
    /// in AAP_SESSION.
    fn plain_git(&self, session: &str, path_front: &[&Path], dir: &Path, args: &[&str]) -> Command {
        let mut path = std::env::join_paths(path_front).unwrap();
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap());
        let mut c = cmd("git", dir);
        c.env("PATH", path)
            .env("AAP_CONFIG", &self.w.config)
            .env("AAP_SESSION", session)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .stdin(Stdio::null())
            .args(args);
        c
    }
}

#[test]
fn plain_git_works_through_the_installed_wrapper() {
    let g = git_world();
    let wdir = g.w.path().join("wrappers");
    let o = run(&mut g.w.aap(&["wrappers", "install", "--dir", "wrappers"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("installed"), "{}", stdout(&o));
    let shim = std::fs::read_to_string(wdir.join("git")).unwrap();
    assert!(shim.contains("cap=forgejo-pat-read\n"), "{shim}");
    assert!(
        shim.contains(&format!("aap_exec={AAP_EXEC}\n")),
        "the installed shim must name the absolute aap-exec: {shim}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(wdir.join("git"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }
    // Idempotent.
    let o = run(&mut g.w.aap(&["wrappers", "install", "--dir", "wrappers"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("unchanged"), "{}", stdout(&o));
    assert!(!stdout(&o).contains("installed "), "{}", stdout(&o));

    let s = g.w.session(&["forgejo-pat-read"]);
    let url = g.server.url("demo.git");
    let o = run(&mut g.plain_git(&s, &[&wdir], g.w.path(), &["clone", "-q", &url, "clone"]));
    assert_eq!(code(&o), 0, "clone through the wrapper: {}", stderr(&o));
    let clone = g.w.path().join("clone");
    let o = run(&mut g.plain_git(&s, &[&wdir], &clone, &["fetch", "origin"]));
    assert_eq!(code(&o), 0, "fetch through the wrapper: {}", stderr(&o));
    assert!(g.server.saw_token(TOKEN));
    // Both went through aap-exec, with the real git (not the shim) as the program.
    let starts: Vec<_> =
        g.w.audit_lines()
            .into_iter()
            .filter(|l| l["event"] == "exec.start")
            .collect();
    assert_eq!(starts.len(), 2);
    for st in &starts {
        let p = st["program"].as_str().unwrap();
        assert!(
            p.ends_with("/git") && !p.starts_with(wdir.to_str().unwrap()),
            "{p}"
        );
    }

    // Two wrapper directories in PATH: the shim skips both and still finds the real git; a git
    // run inside the aap-exec child (like a hook would) goes straight to the real git.
    let o = run(&mut g.w.aap(&["wrappers", "install", "--dir", "wrappers2"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let w2 = g.w.path().join("wrappers2");
    let o = run(&mut g.plain_git(&s, &[&wdir, &w2], &clone, &["ls-remote", "origin"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("refs/heads/main"));
    let mut c = g.w.exec_in(
        &s,
        "forgejo-pat-read",
        &[
            "sh",
            "-c",
            "git ls-remote origin && git -c alias.x='!git ls-remote' x origin",
        ],
    );
    let mut path = std::ffi::OsString::from(wdir.as_os_str());
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap());
    let o = run(c
        .current_dir(&clone)
        .env("PATH", path)
        .env("GIT_TERMINAL_PROMPT", "0"));
    assert_eq!(code(&o), 0, "git inside the child: {}", stderr(&o));
    assert_eq!(g.w.count("deny"), 0, "a nested aap-exec was attempted");
    g.assert_token_stored_nowhere("");
}

#[test]
fn a_wrapper_without_its_real_program_exits_127_and_foreign_files_are_kept() {
    let g = git_world();
    let wdir = g.w.path().join("w");
    let o = run(&mut g
        .w
        .aap(&["wrappers", "install", "--dir", "w", "--cap", "wrap-missing"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let shim = wdir.join("no-such-prog-aap");
    let s = g.w.session(&["wrap-missing"]);
    let o = run(cmd(shim.to_str().unwrap(), g.w.path())
        .env("AAP_SESSION", &s)
        .env("AAP_CONFIG", &g.w.config)
        .arg("--help"));
    assert_eq!(code(&o), 127, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.starts_with("aap: error: wrapper ") && err.contains("no real no-such-prog-aap in PATH"),
        "{err}"
    );
    assert!(err.contains("aap: hint: install no-such-prog-aap"), "{err}");
    assert_eq!(g.w.count("exec.start"), 0);

    // A file we did not write is never overwritten.
    let foreign = wdir.join("git");
    write(&foreign, "#!/bin/sh\necho mine\n");
    let o = run(&mut g.w.aap(&["wrappers", "install", "--dir", "w"]));
    assert_fails(&o, 78, "was not written by aap");
    assert!(
        stderr(&o).contains("aap: hint: move it away"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(&foreign).unwrap(),
        "#!/bin/sh\necho mine\n"
    );
    // A capability that names no program has nothing to wrap.
    let o = run(&mut g
        .w
        .aap(&["wrappers", "install", "--dir", "w", "--cap", "db-low"]));
    assert_fails(&o, 78, "names no program");
}

/// The git shim gates only what needs the credential: local commands (with or without global
/// options before the subcommand) run the real git directly, with no session, no broker and no
/// audit line; everything that reaches a remote goes through aap-exec.
#[test]
fn the_git_shim_runs_local_commands_directly_and_remote_ones_through_aap_exec() {
    let g = git_world();
    let wdir = g.w.path().join("wrappers");
    let o = run(&mut g.w.aap(&["wrappers", "install", "--dir", "wrappers"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let s = g.w.session(&["forgejo-pat-read"]);
    let url = g.server.url("demo.git");
    let o = run(&mut g.plain_git(&s, &[&wdir], g.w.path(), &["clone", "-q", &url, "clone"]));
    assert_eq!(code(&o), 0, "clone through the wrapper: {}", stderr(&o));
    let clone = g.w.path().join("clone");
    std::fs::write(clone.join("hello.txt"), "changed\n").unwrap();
    let audit_before = g.w.audit_lines().len();
    let gitdir = format!("--git-dir={}", clone.join(".git").display());
    let clone_s = clone.to_str().unwrap();

    // No session, and a config that does not exist: anything routed through aap-exec fails.
    let offline = |dir: &Path, args: &[&str]| {
        let mut c = g.plain_git(&s, &[&wdir], dir, args);
        c.env_remove("AAP_SESSION")
            .env("AAP_CONFIG", g.w.path().join("no-such-config.yaml"));
        run(&mut c)
    };
    let local: &[&[&str]] = &[
        &["status", "--short"],
        &["log", "--oneline"],
        &["diff", "--stat"],
        &["-C", clone_s, "log", "-1", "--format=%s"],
        &["-c", "core.pager=cat", "-C", clone_s, "show", "--stat"],
        &["--no-pager", "-C", clone_s, "branch", "-a"],
        &[&gitdir, "rev-parse", "HEAD"],
        &["-C", clone_s, "remote", "-v"],
        &["-C", clone_s, "remote", "get-url", "origin"],
        &["--version"],
    ];
    for args in local {
        let dir = if args.contains(&"-C") || args[0].starts_with("--git-dir") {
            g.w.path()
        } else {
            &clone
        };
        let o = offline(dir, args);
        assert_eq!(code(&o), 0, "git {args:?} was gated: {}", stderr(&o));
        assert!(
            !stderr(&o).contains("aap-exec"),
            "git {args:?}: {}",
            stderr(&o)
        );
    }
    let o = offline(&clone, &["diff"]);
    assert!(stdout(&o).contains("+changed"), "{}", stdout(&o));
    assert_eq!(
        g.w.audit_lines().len(),
        audit_before,
        "a local git command left an audit line"
    );

    let remote: &[&[&str]] = &[
        &["fetch", "origin"],
        &["-C", clone_s, "fetch"],
        &[
            "-c",
            "core.askPass=/bin/false",
            "-C",
            clone_s,
            "pull",
            "--ff-only",
        ],
        &["-C", clone_s, "push", "origin", "HEAD:refs/heads/other"],
        &["ls-remote", &url],
        &["-C", clone_s, "remote", "update"],
        &["-C", clone_s, "remote", "show", "origin"],
        &["-C", clone_s, "submodule", "update", "--init"],
        &["-C", clone_s, "lfs", "fetch"],
        &["-C", clone_s, "archive", "--remote", &url, "HEAD"],
        &["-C"],
        &["--some-future-option", "status"],
        &["some-alias"],
    ];
    for args in remote {
        let o = offline(&clone, args);
        assert_ne!(code(&o), 0, "git {args:?} ran without aap-exec");
        assert!(
            stderr(&o).contains("aap-exec: error:"),
            "git {args:?} did not go through aap-exec: {}",
            stderr(&o)
        );
    }

    // With the session, the remote forms work through aap-exec, one audited run each.
    let starts = g.w.count("exec.start");
    for args in [
        &["-C", clone_s, "fetch"][..],
        &["-c", "fetch.prune=false", "-C", clone_s, "fetch", "origin"],
        &["-C", clone_s, "remote", "update"],
    ] {
        let o = run(&mut g.plain_git(&s, &[&wdir], g.w.path(), args));
        assert_eq!(code(&o), 0, "git {args:?}: {}", stderr(&o));
    }
    assert_eq!(g.w.count("exec.start"), starts + 3);
    g.assert_token_stored_nowhere("");
}

// ---- the http-proxy form ----------------------------------------------------------------------

/// What the broker sends on the wire: `Authorization: Basic base64(aap:TOKEN)`. The child must
/// never see this form either.
fn basic_form() -> String {
    use base64ct::{Base64, Encoding};
    Base64::encode_string(format!("aap:{TOKEN}").as_bytes())
}

impl GitWorld {
    /// The audit lines of `kind` for capability `cap`.
    fn lines(&self, kind: &str, cap: &str) -> Vec<serde_json::Value> {
        self.w
            .audit_lines()
            .into_iter()
            .filter(|l| l["event"] == kind && l["capability"] == cap)
            .collect()
    }

    /// Nothing the agent can reach holds the token, in either form: the output, every file
    /// under the world (the agent's home, its temp dir, the clones, `~/.git-credentials`).
    fn assert_no_token_anywhere(&self, text: &str) {
        self.assert_token_stored_nowhere(text);
        assert_no_leak(&[basic_form()], text, self.w.path());
    }

    /// A git commit in `dir` (no aap: local).
    fn commit(&self, dir: &Path, file: &str, content: impl AsRef<[u8]>) {
        std::fs::write(dir.join(file), content).unwrap();
        for args in [
            &["add", file][..],
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit",
                "-q",
                "-m",
                file,
            ],
        ] {
            let o = run(cmd("git", dir).env("GIT_CONFIG_NOSYSTEM", "1").args(args));
            assert_eq!(code(&o), 0, "git {args:?}: {}", stderr(&o));
        }
    }

    /// `git rev-parse REF` in the server's bare repository.
    fn server_ref(&self, r: &str) -> String {
        let o = run(cmd("git", self.w.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .arg("--git-dir")
            .arg(self.w.path().join("repos/demo.git"))
            .args(["rev-parse", r]));
        stdout(&o).trim().to_string()
    }
}

/// The test Forgejo keeps connections alive as a real one does: a plain `git ls-remote` over
/// HTTPS with the token in the URL makes three requests (the 401 that asks for the
/// credential, the ref advertisement, the ls-refs command) on one TLS connection, and one
/// through the broker's proxy makes its two on one connection from the proxy. (Before, the
/// server closed each connection, so the direct path paid three TLS handshakes, and git
/// three loads of the system CA store, to the proxy's one.)
#[test]
fn the_test_forgejo_serves_a_whole_ls_remote_on_one_kept_alive_connection() {
    let g = git_world();
    let ca = g.w.path().join("forgejo-ca.pem");
    write(&ca, g.ca.pem());
    let home = g.w.path().join("plain-home");
    std::fs::create_dir_all(&home).unwrap();
    let direct = format!("https://aap:{TOKEN}@{}/demo.git", g.proxied.host());
    let o = run(cmd("git", g.w.path())
        .env("HOME", &home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_SSL_CAINFO", &ca)
        .stdin(Stdio::null())
        .args(["ls-remote", &direct]));
    assert_eq!(code(&o), 0, "direct ls-remote: {}", stderr(&o));
    assert!(stdout(&o).contains("refs/heads/main"), "{}", stdout(&o));
    assert_eq!(g.proxied.requests(), 3, "401, info/refs, git-upload-pack");
    assert_eq!(g.proxied.served(), 2);
    assert_eq!(g.proxied.connections(), 1, "connections for one ls-remote");

    let s = g.w.session(&["forgejo-proxy"]);
    let o = run(&mut g.git_exec(
        &s,
        "forgejo-proxy",
        g.w.path(),
        &["git", "ls-remote", &g.proxied.url("demo.git")],
    ));
    assert_eq!(code(&o), 0, "ls-remote through the proxy: {}", stderr(&o));
    assert!(stdout(&o).contains("refs/heads/main"), "{}", stdout(&o));
    // The proxy sends the token at once (no 401), and both requests on one connection.
    assert_eq!(g.proxied.requests(), 5);
    assert_eq!(g.proxied.connections(), 2, "connections from the proxy");
}

/// Clone, fetch and ls-remote through the broker's proxy: git is pointed at it by
/// `url.insteadOf`, the broker adds the token on the wire, and the child has no token to give
/// away: not in its environment, its descriptors, a credential helper, `git credential fill`,
/// `~/.git-credentials`, its home or its temp dir.
#[test]
fn http_proxy_clone_fetch_and_ls_remote_work_and_the_child_never_holds_the_token() {
    let g = git_world();
    let s = g.w.session(&["forgejo-proxy"]);
    let url = g.proxied.url("demo.git");
    let o = run(&mut g.git_exec(
        &s,
        "forgejo-proxy",
        g.w.path(),
        &["git", "clone", "-q", &url, "clone"],
    ));
    assert_eq!(code(&o), 0, "clone: {}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(g.w.path().join("clone/hello.txt")).unwrap(),
        "hello from the test server\n"
    );
    let mut text = format!("{}{}", stdout(&o), stderr(&o));
    let clone = g.w.path().join("clone");
    // The clone's remote is the real URL: the rewrite lives only in this exec's environment.
    let remote = run(cmd("git", &clone).args(["remote", "get-url", "origin"]));
    assert_eq!(stdout(&remote).trim(), url);

    // A store helper inherited from a calling git does not come back.
    let o = run(g
        .git_exec(&s, "forgejo-proxy", &clone, &["git", "fetch", "origin"])
        .env("GIT_CONFIG_PARAMETERS", "'credential.helper'='store'"));
    assert_eq!(code(&o), 0, "fetch: {}", stderr(&o));
    text.push_str(&format!("{}{}", stdout(&o), stderr(&o)));
    let o = run(&mut g.git_exec(&s, "forgejo-proxy", &clone, &["git", "ls-remote", "origin"]));
    assert_eq!(code(&o), 0, "ls-remote: {}", stderr(&o));
    assert!(stdout(&o).contains("refs/heads/main"), "{}", stdout(&o));
    text.push_str(&format!("{}{}", stdout(&o), stderr(&o)));

    // The server got the token, and only in the broker's form.
    assert!(g.proxied.saw_token(TOKEN), "the server never got the token");
    for a in g.proxied.seen_auth.lock().unwrap().iter() {
        assert_eq!(
            a,
            &format!("aap:{TOKEN}"),
            "an Authorization not from the broker"
        );
    }

    // What the agent's own tricks get from inside the child.
    let script = format!(
        "env > env.txt; cat /proc/self/environ > environ.bin; ls -l /proc/$$/fd > fds.txt; \
         git config --get-regexp '^url\\.' > urls.txt; \
         git config --get-all credential.helper > helpers.txt; \
         printf 'protocol=https\\nhost={host}\\n\\n' | git credential fill > fill.txt 2>&1; \
         git -c credential.helper=store fetch -q origin; \
         git -c credential.helper='!cat >> helper-saw.txt' fetch -q origin; \
         GIT_TRACE_CURL=1 git ls-remote origin > trace.txt 2>&1;          ls -l /proc/$PPID/fd > wrapper-fds.txt;          for p in $$ $PPID; do for f in /proc/$p/fd/*; do            case $(readlink $f) in memfd:*) cat $f;; esac; done; done > memfds.bin;          git -c alias.x='!cat /proc/$PPID/environ > alias-environ.bin; env > alias-env.txt' x;          git -c core.fsmonitor='env > fsmonitor-env.txt; cat /proc/$PPID/environ > fsmonitor-environ.bin; true' status -s > /dev/null;          git -c protocol.ext.allow=always ls-remote 'ext::sh -c env% >ext-env.txt' 2>/dev/null;          mkdir -p tpl/hooks;          printf '#!/bin/sh\nenv > \"$HOME/hook-env.txt\"; cat /proc/$PPID/environ > \"$HOME/hook-environ.bin\"\n' > tpl/hooks/post-checkout;          chmod +x tpl/hooks/post-checkout;          GIT_TEMPLATE_DIR=$PWD/tpl git clone -q {url} hooked",
        host = g.proxied.host(),
        url = url
    );
    let o = run(&mut g.git_exec(&s, "forgejo-proxy", &clone, &["sh", "-c", &script]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    text.push_str(&format!("{}{}", stdout(&o), stderr(&o)));
    let read = |f: &str| std::fs::read_to_string(clone.join(f)).unwrap();
    let env = read("env.txt");
    assert!(env.contains("FORGEJO_URL=http://127.0.0.1:"), "{env}");
    assert!(
        !env.contains("git-credential"),
        "a credential helper was set: {env}"
    );
    assert!(
        read("urls.txt").contains(&format!(".insteadof https://{}/", g.proxied.host())),
        "{}",
        read("urls.txt")
    );
    // The user's helpers are listed, and reset by the empty value after them.
    assert_eq!(
        read("helpers.txt").lines().last(),
        Some(""),
        "no reset after the helpers: {}",
        read("helpers.txt")
    );
    assert!(!read("fds.txt").contains("memfd"), "{}", read("fds.txt"));
    assert!(
        !read("wrapper-fds.txt").contains("memfd"),
        "aap-exec holds a memfd: {}",
        read("wrapper-fds.txt")
    );
    assert_eq!(read("memfds.bin"), "", "a memfd was readable");
    // Each trick ran (so each had its chance at a token) and found the proxy's URL only.
    for f in [
        "alias-env.txt",
        "fsmonitor-env.txt",
        "ext-env.txt",
        "../hook-env.txt",
    ] {
        let t = read(f);
        assert!(t.contains("FORGEJO_URL=http://127.0.0.1:"), "{f}: {t}");
    }
    assert!(
        clone.join("hooked/hello.txt").exists(),
        "the hooked clone failed"
    );
    assert!(
        !read("fill.txt").contains("password="),
        "{}",
        read("fill.txt")
    );
    assert!(!clone.join("helper-saw.txt").exists(), "a helper was asked");
    // The wire as the child sees it: no Authorization header at all.
    assert!(
        !read("trace.txt")
            .to_ascii_lowercase()
            .contains("authorization"),
        "{}",
        read("trace.txt")
    );
    g.assert_no_token_anywhere(&text);

    // exec.end counts the requests and bytes; a low-tier capability writes no per-request line.
    let ends = g.lines("exec.end", "forgejo-proxy");
    assert_eq!(ends.len(), 4);
    for e in &ends {
        assert!(e["http_requests"].as_u64().unwrap() >= 2, "{e}");
        assert_eq!(e["http_refused"], 0, "{e}");
        assert!(e["bytes_down"].as_u64().unwrap() > 0, "{e}");
    }
    assert!(g.lines("http.request", "forgejo-proxy").is_empty());
    let v = g.w.audit_verify();
    assert_eq!(code(&v), 0, "{}", stderr(&v));
}

/// A read capability's proxy refuses a push with the message git shows; a write capability
/// pushes. At tier medium each request is an `http.request` line, without the prefix.
#[test]
fn http_proxy_read_refuses_a_push_with_the_message_and_write_pushes() {
    let g = git_world();
    let s = g.w.session(&["forgejo-proxy", "forgejo-proxy-write"]);
    let url = g.proxied.url("demo.git");
    let o = run(&mut g.git_exec(
        &s,
        "forgejo-proxy",
        g.w.path(),
        &["git", "clone", "-q", &url, "clone"],
    ));
    assert_eq!(code(&o), 0, "clone: {}", stderr(&o));
    let clone = g.w.path().join("clone");
    let before = g.server_ref("main");
    g.commit(&clone, "new.txt", "pushed through the proxy\n");
    let served = g.proxied.served();

    let o = run(&mut g.git_exec(
        &s,
        "forgejo-proxy",
        &clone,
        &["git", "push", "origin", "HEAD:main"],
    ));
    assert_ne!(code(&o), 0, "a push through a read capability worked");
    assert!(
        stderr(&o).contains("aap: forgejo-proxy is read-only; ask for a write capability"),
        "{}",
        stderr(&o)
    );
    assert_eq!(g.server_ref("main"), before);
    assert_eq!(
        g.proxied.served(),
        served,
        "the refused push reached the server"
    );
    let refused = g.lines("http.request", "forgejo-proxy");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["outcome"], "denied");
    assert_eq!(refused[0]["http_status"], 403);
    assert_eq!(
        refused[0]["http_path"],
        "/demo.git/info/refs?service=git-receive-pack"
    );

    // Some 768 KiB that do not compress (the test server takes bodies up to 1 MiB), with a
    // 64 KiB post buffer: the pack goes up chunked, streamed through the proxy.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let big: Vec<u8> = (0..768 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    g.commit(&clone, "big.bin", &big);
    let o = run(&mut g.git_exec(
        &s,
        "forgejo-proxy-write",
        &clone,
        &[
            "git",
            "-c",
            "http.postBuffer=65536",
            "push",
            "-q",
            "origin",
            "HEAD:main",
        ],
    ));
    assert_eq!(code(&o), 0, "push: {}", stderr(&o));
    let head = run(cmd("git", &clone).args(["rev-parse", "HEAD"]));
    assert_eq!(g.server_ref("main"), stdout(&head).trim());
    assert_ne!(g.server_ref("main"), before);

    let reqs = g.lines("http.request", "forgejo-proxy-write");
    assert!(reqs.len() >= 2, "{reqs:?}");
    for r in &reqs {
        assert_eq!(r["outcome"], "ok", "{r}");
        assert_eq!(r["http_status"], 200, "{r}");
        let path = r["http_path"].as_str().unwrap();
        assert!(path.starts_with("/demo.git/"), "the prefix was logged: {r}");
    }
    // With a small post buffer git first probes with a 4-byte POST; the pack is the largest.
    let post = reqs
        .iter()
        .filter(|r| r["http_method"] == "POST")
        .max_by_key(|r| r["bytes_up"].as_u64())
        .expect("the receive-pack POST");
    assert_eq!(post["http_path"], "/demo.git/git-receive-pack");
    assert!(
        post["bytes_up"].as_u64().unwrap() > 768 * 1024,
        "the pack went up whole: {post}"
    );
    let end = g.lines("exec.end", "forgejo-proxy-write");
    assert_eq!(end.len(), 1);
    assert_eq!(end[0]["http_requests"].as_u64().unwrap(), reqs.len() as u64);
    assert!(end[0]["bytes_up"].as_u64().unwrap() >= post["bytes_up"].as_u64().unwrap());
    g.assert_no_token_anywhere(&format!("{}{}", stdout(&o), stderr(&o)));

    // The operator sees every proxied request, the refused push among them, in the session's
    // story and in the tail (issue 15, item 3).
    let (story, proxied) = story_lines(
        &run(&mut g.w.aap(&["session", "log", &s])),
        "proxied request",
    );
    let all = g.w.count("http.request");
    assert_eq!(all, reqs.len() + refused.len());
    assert_eq!(proxied.len(), all, "{story}");
    for (what, parts) in [
        (
            "the refused push",
            [
                " forgejo-proxy ",
                "  denied",
                "http_path=/demo.git/info/refs?service=git-receive-pack",
                "http_status=403",
            ],
        ),
        (
            "the pushed pack",
            [
                " forgejo-proxy-write ",
                "http_method=POST",
                "http_path=/demo.git/git-receive-pack",
                "http_status=200",
            ],
        ),
    ] {
        assert!(
            proxied.iter().any(|l| parts.iter().all(|p| l.contains(p))),
            "no line for {what} in:\n{story}"
        );
    }
    assert!(
        story.contains(&format!("; {} proxied request(s)\n", proxied.len())),
        "{story}"
    );
    let o = run(&mut g.w.aap(&["audit", "tail", "-n", "200", "--session", &s]));
    let tail = stdout(&o);
    assert!(
        tail.lines().any(|l| l.contains(" http.request ")
            && l.contains(
                " http_method=POST http_path=/demo.git/git-receive-pack http_status=200 "
            )),
        "no proxied push in the tail:\n{tail}"
    );
}

/// Only the exec's own prefix, only the agent's uid, only while the exec lives.
#[test]
fn http_proxy_refuses_a_wrong_prefix_another_uid_and_requests_after_the_exec() {
    if sys_uid() != 0 {
        skip(
            "http_proxy_refuses_a_wrong_prefix_another_uid_and_requests_after_the_exec",
            "needs root to connect as another uid (setpriv)",
        );
        return;
    }
    let g = git_world();
    let s = g.w.session(&["forgejo-proxy"]);
    let script = "set -u; echo \"$FORGEJO_URL\" > base.txt; \
        rest=${FORGEJO_URL#http://}; hp=${rest%%/*}; \
        get() { curl -s -o /dev/null -w '%{http_code}' \"$1\"; }; \
        get \"http://$hp/0000000000000000000000000000000000000000000000000000000000000000/demo.git/info/refs?service=git-upload-pack\" > wrong.code; \
        get \"http://$hp/demo.git/info/refs?service=git-upload-pack\" > noprefix.code; \
        curl -s -o /dev/null -w '%{http_code}' --request-target \"http://git.example.org/${rest#*/}demo.git/info/refs\" \"http://$hp/\" > other-host.code; \
        get \"${FORGEJO_URL}demo.git/info/refs?service=git-upload-pack\" > right.code; \
        setpriv --reuid=65534 --regid=65534 --clear-groups \
          curl -s -o /dev/null -w '%{http_code}' \"${FORGEJO_URL}demo.git/info/refs?service=git-upload-pack\" > other.code; \
        echo $? > other.rc";
    let o = run(&mut g.git_exec(&s, "forgejo-proxy", g.w.path(), &["sh", "-c", script]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let read = |f: &str| std::fs::read_to_string(g.w.path().join(f)).unwrap();
    assert_eq!(read("wrong.code"), "404");
    assert_eq!(read("noprefix.code"), "404");
    // The right prefix in an absolute URL for another host.
    assert_eq!(read("other-host.code"), "404");
    assert_eq!(read("right.code"), "200", "the right prefix must work");
    assert_eq!(read("other.code"), "000", "another uid was served");
    // Closed unserved: an empty reply (52) or a reset (56), as the timing falls.
    assert!(
        ["52", "56"].contains(&read("other.rc").trim()),
        "curl: {}",
        read("other.rc")
    );
    assert_eq!(
        g.proxied.served(),
        1,
        "only the right request reaches the server"
    );

    // After the exec: nothing listens for its URL.
    let base = read("base.txt");
    let o = run(cmd("curl", g.w.path()).args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{}demo.git/info/refs?service=git-upload-pack", base.trim()),
    ]));
    assert_eq!(stdout(&o), "000");
    assert_eq!(code(&o), 7, "curl: connection refused expected");
    assert_eq!(g.proxied.served(), 1);

    let refused = g.lines("http.request", "forgejo-proxy");
    let why: Vec<&str> = refused
        .iter()
        .map(|r| r["error"].as_str().unwrap())
        .collect();
    assert_eq!(refused.len(), 4, "{why:?}");
    assert!(
        why.iter().any(|w| w.contains("for another host")),
        "{why:?}"
    );
    assert_eq!(
        why.iter()
            .filter(|w| w.contains("without this exec's prefix"))
            .count(),
        2,
        "{why:?}"
    );
    assert!(why.iter().any(|w| w.contains("from uid 65534")), "{why:?}");
    for r in &refused {
        assert_eq!(r["outcome"], "denied");
        assert!(
            r.get("http_path").is_none(),
            "an unrouted path was logged: {r}"
        );
    }
    let end = g.lines("exec.end", "forgejo-proxy");
    // Four refusals (three requests, one connection), one forwarded request.
    assert_eq!(end[0]["http_refused"], 4, "{}", end[0]);
    assert_eq!(end[0]["http_requests"], 1, "{}", end[0]);
    // The URL is dead and the prefix is in no log line.
    let prefix = base
        .trim()
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap();
    assert_eq!(prefix.len(), 64);
    let log = std::fs::read_to_string(g.w.path().join("audit.jsonl")).unwrap();
    assert!(!log.contains(prefix), "the prefix is in the audit log");
    let blog = std::fs::read_to_string(g.w.path().join("broker.log")).unwrap_or_default();
    assert!(!blog.contains(prefix), "the prefix is in the broker's log");
}

fn sys_uid() -> u32 {
    aap::sys::uid()
}

/// `curl` of `url` from the test (the agent's uid): the HTTP status, or `000` with curl's exit
/// code when no answer came.
fn curl_status(dir: &Path, url: &str) -> (String, i32) {
    let o = run(cmd("curl", dir).args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url]));
    (stdout(&o), code(&o))
}

/// Revoking the session while the child runs closes its proxy within the broker's re-check
/// (about a second): the child lives on, the URL is dead.
#[test]
fn http_proxy_dies_when_the_session_is_revoked_mid_run() {
    let g = git_world();
    let s = g.w.session(&["forgejo-proxy"]);
    let base_file = g.w.path().join("base.txt");
    let mut child = g
        .git_exec(
            &s,
            "forgejo-proxy",
            g.w.path(),
            &[
                "sh",
                "-c",
                &format!(
                    "printf '%s' \"$FORGEJO_URL\" > {}; sleep 6",
                    base_file.display()
                ),
            ],
        )
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::metadata(&base_file).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(t0.elapsed().as_secs() < 20, "the child never wrote the URL");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let url = format!(
        "{}demo.git/info/refs?service=git-upload-pack",
        std::fs::read_to_string(&base_file).unwrap()
    );
    assert_eq!(
        curl_status(g.w.path(), &url).0,
        "200",
        "works while granted"
    );
    let o = run(&mut g.w.aap(&["session", "revoke", &s, "--reason", "mid-run"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let t1 = std::time::Instant::now();
    loop {
        let (status, rc) = curl_status(g.w.path(), &url);
        if status == "000" {
            // Refused (7), or, in the moment the runtime ends, accepted and closed (52, 56).
            assert!([7, 52, 56].contains(&rc), "curl exit {rc}");
            break;
        }
        assert!(
            t1.elapsed().as_secs() < 4,
            "the proxy outlived the revocation by 4 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the child still runs; only its proxy is gone"
    );
    assert!(child.wait().unwrap().success());
    let end = g.lines("exec.end", "forgejo-proxy");
    assert!(
        end[0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("was revoked while the child ran"),
        "{}",
        end[0]
    );
}

/// Refusals are audit lines up to a cap per exec (64), so no local user can fill the log
/// through a proxy; `exec.end` counts them all.
#[test]
fn http_proxy_refusals_beyond_the_cap_are_counted_not_logged() {
    let g = git_world();
    let s = g.w.session(&["forgejo-proxy"]);
    let script = "rest=${FORGEJO_URL#http://}; hp=${rest%%/*}; i=0; \
        while [ $i -lt 70 ]; do curl -s -o /dev/null \"http://$hp/nope/$i\"; i=$((i+1)); done";
    let o = run(&mut g.git_exec(&s, "forgejo-proxy", g.w.path(), &["sh", "-c", script]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(g.lines("http.request", "forgejo-proxy").len(), 64);
    let end = g.lines("exec.end", "forgejo-proxy");
    // Every refusal counts under http_refused; http_requests counts forwarded ones only.
    assert_eq!(end[0]["http_refused"], 70, "{}", end[0]);
    assert_eq!(end[0]["http_requests"], 0, "{}", end[0]);
    assert_eq!(g.proxied.served(), 0);
}

/// The deployed shape: the broker as one uid (root, this test's), the agent as another (65534,
/// through `setpriv`). The agent's git goes through the proxy; a connection of the broker's
/// own uid to the agent's URL is closed unserved, as any other uid's.
#[test]
fn http_proxy_serves_the_agent_as_its_own_uid_and_no_other() {
    use std::os::unix::fs::PermissionsExt;
    const AGENT: u32 = 65534;
    if sys_uid() != 0 {
        skip(
            "http_proxy_serves_the_agent_as_its_own_uid_and_no_other",
            "needs root to be two uids (setpriv)",
        );
        return;
    }
    let mut g = git_world();
    let d = g.w.path().to_path_buf();
    let chmod = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    };
    let mut cfg = std::fs::read_to_string(&g.w.config).unwrap();
    let me = format!("agents:\n  codex:\n    uid: {}\n", sys_uid());
    assert!(cfg.contains(&me), "unexpected world config: {cfg}");
    cfg = cfg.replace(&me, &format!("agents:\n  codex:\n    uid: {AGENT}\n"));
    write(&g.w.config, cfg);
    chmod(&d, 0o755);
    for f in ["config.yaml", "catalog.yaml", "allowed_signers"] {
        chmod(&d.join(f), 0o644);
    }
    g.w.start_broker();
    let s = g.w.session(&["forgejo-proxy"]);
    let home = d.join(format!("home-{AGENT}"));
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(AGENT), Some(AGENT)).unwrap();
    chmod(&home, 0o700);
    let bins = agent_bins();
    let url = g.proxied.url("demo.git");
    // As the agent: ls-remote through the proxy, then hand the URL to the test (root) and wait
    // for it to try.
    let script = format!(
        "git ls-remote {url} > refs.txt && printf '%s' \"$FORGEJO_URL\" > base.txt && \
         i=0; while [ ! -e tried ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done"
    );
    let u = AGENT.to_string();
    let mut child = Command::new("setpriv")
        .args(["--reuid", &u, "--regid", &u, "--clear-groups", "--"])
        .arg(&bins.aap_exec)
        .args(["--session", &s, "forgejo-proxy", "--", "sh", "-c", &script])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &home)
        .env("AAP_CONFIG", &g.w.config)
        .env("GIT_TERMINAL_PROMPT", "0")
        .current_dir(&home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base_file = home.join("base.txt");
    let t0 = std::time::Instant::now();
    while std::fs::metadata(&base_file).map(|m| m.len()).unwrap_or(0) == 0 {
        if t0.elapsed().as_secs() >= 20 || child.try_wait().unwrap().is_some() {
            let o = child.wait_with_output().unwrap();
            panic!("the agent never wrote the URL: {}", stderr(&o));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        std::fs::read_to_string(home.join("refs.txt"))
            .unwrap()
            .contains("refs/heads/main")
    );
    let base = std::fs::read_to_string(&base_file).unwrap();
    let (status, rc) = curl_status(
        &d,
        &format!("{base}demo.git/info/refs?service=git-upload-pack"),
    );
    std::fs::write(home.join("tried"), "").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(status, "000", "the broker's own uid was served");
    assert!([52, 56].contains(&rc), "curl exit {rc}");
    let refused = g.lines("http.request", "forgejo-proxy");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0]["error"]
            .as_str()
            .unwrap()
            .contains(&format!("from uid 0, not the agent's uid {AGENT}")),
        "{}",
        refused[0]
    );
    assert_eq!(refused[0]["uid"], AGENT);
    assert!(g.proxied.saw_token(TOKEN));
    assert_no_leak(&[TOKEN.to_string(), basic_form()], "", &home);
}

/// One request an [`api_server`] got: its request line, its headers (names lower-cased), and
/// the audit log as it was when the request arrived.
#[derive(Debug)]
struct Got {
    line: String,
    headers: Vec<(String, String)>,
    audit_then: String,
}

type Seen = Arc<Mutex<Vec<Got>>>;

/// A loopback HTTPS API with a certificate from `ca`: it records each request (reading the
/// audit log at `audit` the moment it arrives) and answers `api says hi`. Returns its
/// `host:port` and the record.
fn api_server(ca: &aap::devserver::ca::ThrowawayCa, audit: PathBuf) -> (String, Seen) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = format!("127.0.0.1:{}", l.local_addr().unwrap().port());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    servers::accept_each(l, Some(ca.server_config("test api").unwrap()), move |req| {
        let audit_then = std::fs::read_to_string(&audit).unwrap_or_default();
        record.lock().unwrap().push(Got {
            line: format!("{} {}", req.method, req.target),
            headers: req.headers.clone(),
            audit_then,
        });
        servers::Answer::new("200 OK", "", "api says hi\n")
    });
    (host, seen)
}

/// Add a `secret` capability `id` at `tier` whose http-proxy goes to `api` with the secret in
/// `X-Api-Key: Bearer ...` and the base URL in `API_URL`.
fn add_api_capability(g: &GitWorld, id: &str, tier: &str, api: &str) {
    let cat = g.w.path().join("catalog.yaml");
    let mut text = std::fs::read_to_string(&cat).unwrap();
    text.push_str(&format!(
        "  - id: {id}
    description: An API key the broker adds as a header
    audit_tier: {tier}
    agents: [codex]
    max_ttl: 2h
    allowed_commands: [sh]
    backing: {{ type: secret, secret: {{ path: /app, key: DB_PASSWORD }} }}
    inject:
      - {{ type: http-proxy, host: \"{api}\", name: API_URL, header: X-Api-Key, scheme: Bearer }}
"
    ));
    write(&cat, text);
}

/// A git world with an [`api_server`] and a capability `id` at `tier` for it (see
/// [`add_api_capability`]); what the server sees, and a session with the capability.
fn api_world(id: &str, tier: &str) -> (GitWorld, Seen, String) {
    let g = git_world();
    let (api, seen) = api_server(&g.ca, g.w.path().join("audit.jsonl"));
    add_api_capability(&g, id, tier, &api);
    let s = g.w.session(&[id]);
    (g, seen, s)
}

/// A `secret` capability through the http-proxy, as the catalog names it: the host, the header
/// and its scheme, and the variable for the base URL. A loopback HTTPS API sees the secret in
/// that header and no credential of the child's; the child's environment has the URL only (no
/// secret, no git rewrite, no `FORGEJO_URL`).
#[test]
fn http_proxy_for_a_secret_sends_it_in_the_named_header_and_the_child_gets_only_the_url() {
    let (g, seen, s) = api_world("api-proxy", "medium");
    let script = "env > env.txt; cat /proc/self/environ > environ.bin; \
        curl -s -H 'X-Api-Key: child-own' -H 'Authorization: token child' \"${API_URL}v1/thing?x=1\" > out.txt";
    let o = run(&mut g.git_exec(&s, "api-proxy", g.w.path(), &["sh", "-c", script]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let read = |f: &str| std::fs::read_to_string(g.w.path().join(f)).unwrap();
    assert_eq!(read("out.txt"), "api says hi\n");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let Got { line, headers, .. } = &seen[0];
    assert_eq!(line, "GET /v1/thing?x=1");
    let keys: Vec<&str> = headers
        .iter()
        .filter(|(k, _)| k == "x-api-key")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(keys, [format!("Bearer {DB_PASSWORD}")], "{headers:?}");
    assert!(
        !headers
            .iter()
            .any(|(k, v)| k == "authorization" || v.contains("child")),
        "a credential of the child's went upstream: {headers:?}"
    );
    let env = read("env.txt");
    assert!(env.contains("API_URL=http://127.0.0.1:"), "{env}");
    for absent in [
        "FORGEJO_URL=",
        "GIT_CONFIG_COUNT=",
        "insteadOf",
        DB_PASSWORD,
    ] {
        assert!(!env.contains(absent), "{absent} in the child's env: {env}");
    }
    assert_no_leak(
        &[DB_PASSWORD.to_string()],
        &format!("{}{}", stdout(&o), stderr(&o)),
        g.w.path(),
    );
    // Tier medium: the request is an audit line, without the prefix or the secret.
    let reqs = g.lines("http.request", "api-proxy");
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0]["http_path"], "/v1/thing?x=1");
    assert_eq!(reqs[0]["http_status"], 200);
    assert!(reqs[0].get("http_phase").is_none(), "{}", reqs[0]);
}

/// At tier high the request's line is on disk before the host sees the request (as an
/// `ssh.sign` line is before the signature): the host reads the audit log the moment the
/// request arrives and finds the `start` line there; the `end` line with the status follows.
/// Below high there is one line, after the request (the test above).
#[test]
fn http_proxy_at_tier_high_writes_the_request_line_before_the_host_sees_it() {
    let (g, seen, s) = api_world("api-proxy-high", "high");
    let script = "curl -s \"${API_URL}v1/a\" > a.txt && curl -s -I -o /dev/null \"${API_URL}v1/b\"";
    let o = run(&mut g.git_exec(&s, "api-proxy-high", g.w.path(), &["sh", "-c", script]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(g.w.path().join("a.txt")).unwrap(),
        "api says hi\n"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    for (got, path) in seen.iter().zip(["/v1/a", "/v1/b"]) {
        let start = got
            .audit_then
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|l| l["event"] == "http.request" && l["http_path"] == path);
        let start = start
            .unwrap_or_else(|| panic!("{path}: no http.request line on disk when the host got it"));
        assert_eq!(start["http_phase"], "start", "{start}");
        assert!(start.get("http_status").is_none(), "{start}");
    }
    let reqs = g.lines("http.request", "api-proxy-high");
    let phases: Vec<(&str, &str)> = reqs
        .iter()
        .map(|r| {
            (
                r["http_phase"].as_str().unwrap(),
                r["http_path"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(phases.len(), 4, "{phases:?}");
    for path in ["/v1/a", "/v1/b"] {
        let at = |phase: &str| phases.iter().position(|p| *p == (phase, path));
        let (start, end) = (at("start"), at("end"));
        assert!(
            start.is_some() && end.is_some() && start < end,
            "{path}: {phases:?}"
        );
        assert_eq!(reqs[end.unwrap()]["http_status"], 200);
    }
    let v = g.w.audit_verify();
    assert_eq!(code(&v), 0, "{}", stderr(&v));
}

/// At tier high a request whose `http_phase: start` line cannot be written is not sent: the
/// audit log is really unwritable here (another process holds its lock, so the broker's append
/// gives up after its 10 s lock timeout, as it would on a full disk). The child gets a 503
/// that says what failed and what to do, the host sees no request, the proxy stops (fail
/// closed), and `exec.end`, written once the log is free again, counts the refusal.
#[test]
fn http_proxy_at_tier_high_refuses_a_request_whose_start_line_cannot_be_written() {
    let (g, seen, s) = api_world("api-proxy-high", "high");
    let d = g.w.path().to_path_buf();
    let wait = |f: &str| format!("while [ ! -e {f} ]; do sleep 0.05; done");
    let script = format!(
        "touch ready; {}; curl -s -o body.txt -w '%{{http_code}}' \"${{API_URL}}v1/a\" > code.txt; \
         touch asked; {}",
        wait("go"),
        wait("done")
    );
    let mut child = g
        .git_exec(&s, "api-proxy-high", &d, &["sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = |f: &str, what: &str, child: &mut std::process::Child| {
        let t0 = std::time::Instant::now();
        while !d.join(f).exists() {
            if t0.elapsed().as_secs() >= 40 || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                panic!("{what}: {:?}", child.wait());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    // exec.start is on disk once the child runs; now the log's lock is taken.
    until("ready", "the child never started", &mut child);
    let audit = d.join("audit.jsonl");
    let mut holder = Command::new("flock")
        .arg("-x")
        .arg(&audit)
        .args(["sh", "-c", &format!("touch held; {}", wait("release"))])
        .current_dir(&d)
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !d.join("held").exists() {
        assert!(t0.elapsed().as_secs() < 10, "flock never took the log");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::fs::write(d.join("go"), "").unwrap();
    until("asked", "the child's request never ended", &mut child);
    std::fs::write(d.join("release"), "").unwrap();
    assert!(holder.wait().unwrap().success());
    std::fs::write(d.join("done"), "").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    assert_eq!(read("code.txt"), "503", "{}", read("body.txt"));
    let body = read("body.txt");
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.len(), 2, "{body}");
    assert!(
        lines[0].starts_with(
            "aap: error: the broker cannot write this request's audit line (the audit log "
        ) && lines[0].contains("is still locked after 10s by another process")
            && lines[0].ends_with("so the request was not sent"),
        "{body}"
    );
    assert!(
        lines[1].starts_with("aap: hint: find the holder: fuser -v ")
            && lines[1].contains("audit.jsonl"),
        "{body}"
    );
    assert!(seen.lock().unwrap().is_empty(), "the host got the request");
    // No line for the request (none could be written); exec.end counts it as refused.
    assert!(g.lines("http.request", "api-proxy-high").is_empty());
    let end = g.lines("exec.end", "api-proxy-high");
    assert_eq!(end.len(), 1, "{end:?}");
    assert_eq!(end[0]["http_refused"], 1, "{}", end[0]);
    assert_eq!(end[0]["http_requests"], 0, "{}", end[0]);
    let v = g.w.audit_verify();
    assert_eq!(code(&v), 0, "{}", stderr(&v));
}
