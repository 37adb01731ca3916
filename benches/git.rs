//! Benchmark (issue 6): `aap-exec forgejo-pat-read -- git ls-remote URL` against a real
//! `git http-backend` behind a Basic-auth HTTPS server on loopback, compared pairwise with
//! `git ls-remote` given the token directly (in the URL), and with `/bin/true`, in the same run.
//! Issue 13: the same through the broker's http-proxy (`forgejo-proxy`), in the same rounds.
//!
//! Run: `cargo bench --bench git` (add `-- --pairs N`). The dev-server and the git server run in
//! this process (on their own threads); each sample spawns fresh processes. Results go to
//! BENCHMARKS.md by hand, with the machine and date.

#[path = "../tests/common/gitserver.rs"]
#[allow(dead_code)]
mod gitserver;

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    common::rss_probe_main();
    let Some(pairs) = common::rounds(200) else {
        return;
    };
    let aap = env!("CARGO_BIN_EXE_aap");
    let aap_exec = env!("CARGO_BIN_EXE_aap-exec");
    let server = common::dev_server();
    let dir = common::tempdir("aap-bench-git-");
    let d = dir.path();
    let seed = server.seed();
    let token = seed
        .secrets
        .iter()
        .find(|s| s.path == "/forgejo" && s.key == "FORGEJO_TOKEN")
        .unwrap()
        .value
        .clone();
    let reader = seed.identities.iter().find(|i| i.name == "reader").unwrap();
    std::fs::write(d.join("client_id"), &reader.client_id).unwrap();
    let secret = d.join("client_secret");
    std::fs::write(&secret, &reader.client_secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();

    let repos = d.join("repos");
    std::fs::create_dir_all(&repos).unwrap();
    gitserver::make_repo(&repos, "demo");
    // HTTPS, as a Forgejo is reached: the http-proxy forwards over TLS only, so the direct
    // rows pay for TLS too. The git server's certificate is from the dev-server's CA, which
    // the broker trusts through `ca_bundle` and git through GIT_SSL_CAINFO.
    let git = gitserver::GitServer::start_tls(&repos, &token, server.ca().unwrap());
    let ca_file = server.ca_path().unwrap();

    assert!(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "op@bench", "-f"])
            .arg(d.join("operator"))
            .status()
            .unwrap()
            .success()
    );
    let pubkey = std::fs::read_to_string(d.join("operator.pub")).unwrap();
    std::fs::write(
        d.join("allowed_signers"),
        format!("op@bench namespaces=\"aap-grant\" {pubkey}"),
    )
    .unwrap();
    std::fs::write(
        d.join("catalog.yaml"),
        format!(
            "schema_version: 1\ncapabilities:\n  - id: forgejo-pat-read\n    description: bench\n    audit_tier: low\n    agents: [codex]\n    max_ttl: 2h\n    allowed_commands: [git, \"/bin/true\"]\n    backing: {{ type: forgejo-pat, host: \"{0}\", secret: {{ path: /forgejo, key: FORGEJO_TOKEN }} }}\n    inject: [ {{ type: git-credential }} ]\n  - id: forgejo-proxy\n    description: bench\n    audit_tier: low\n    agents: [codex]\n    max_ttl: 2h\n    allowed_commands: [git]\n    access: read\n    backing: {{ type: forgejo-pat, host: \"{0}\", secret: {{ path: /forgejo, key: FORGEJO_TOKEN }} }}\n    inject: [ {{ type: http-proxy }} ]\n",
            git.host()
        ),
    )
    .unwrap();
    for f in ["allowed_signers", "catalog.yaml", "client_id"] {
        std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let cfg = d.join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "infisical:\n  url: {}\n  project_id: {}\n  ca_bundle: {}\ncatalog: catalog.yaml\nstate_dir: state\naudit_log: audit.jsonl\noperator:\n  allowed_signers: allowed_signers\n  signing_key: operator\nbroker:\n  socket: broker.sock\nagents:\n  codex:\n    uid: {}\n    client_id_file: client_id\n    client_secret_file: client_secret\n",
            server.url(),
            seed.project_id,
            ca_file.display(),
            aap::sys::uid()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _broker = common::broker(aap, &cfg, d);
    let base = |c: &mut Command| {
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap())
            .env("HOME", d)
            .env("AAP_CONFIG", &cfg)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_SSL_CAINFO", &ca_file)
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    };
    let mut c = Command::new(aap);
    base(&mut c);
    let out = c
        .args([
            "session",
            "start",
            "--agent",
            "codex",
            "--cap",
            "forgejo-pat-read",
            "--cap",
            "forgejo-proxy",
            "--ttl",
            "1h",
        ])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "session start failed");
    let session = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .strip_prefix("export AAP_SESSION=")
        .unwrap()
        .to_string();

    let url = git.url("demo.git");
    let direct_url = format!("https://bench:{token}@{}/demo.git", git.host());
    let through_aap_cmd = || {
        let mut c = Command::new(aap_exec);
        base(&mut c);
        c.args([
            "--session",
            &session,
            "forgejo-pat-read",
            "--",
            "git",
            "ls-remote",
            &url,
        ]);
        c
    };
    // `aap-exec forgejo-proxy -- git ARGS...`
    let proxy_git = |args: &[&str]| {
        let mut c = Command::new(aap_exec);
        base(&mut c);
        c.args(["--session", &session, "forgejo-proxy", "--", "git"])
            .args(args);
        c
    };
    let through_proxy_cmd = || proxy_git(&["ls-remote", &url]);
    let through_proxy = || {
        let st = through_proxy_cmd().status().unwrap();
        assert!(
            st.success(),
            "aap-exec forgejo-proxy git ls-remote failed; run it by hand"
        );
    };
    let direct_cmd = || {
        let mut c = Command::new("git");
        base(&mut c);
        c.args(["ls-remote", &direct_url]);
        c
    };
    let through_aap = || {
        let st = through_aap_cmd().status().unwrap();
        assert!(
            st.success(),
            "aap-exec git ls-remote failed; run it by hand"
        );
    };
    // aap-exec's own cost (authorize, login + fetch, memfd, audit x2) without git or the helper.
    let aap_true = || {
        let mut c = Command::new(aap_exec);
        base(&mut c);
        let st = c
            .args(["--session", &session, "forgejo-pat-read", "--", "/bin/true"])
            .status()
            .unwrap();
        assert!(st.success(), "aap-exec /bin/true failed; run it by hand");
    };
    let direct = || {
        let st = direct_cmd().status().unwrap();
        assert!(st.success(), "git ls-remote with the token failed");
    };
    let truth = || {
        assert!(Command::new("/bin/true").status().unwrap().success());
    };
    for _ in 0..common::full_or_quick(10, 2) {
        through_aap();
        through_proxy();
        direct();
        truth();
    }
    let (mut a, mut b, mut c, mut e) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut p = Vec::new();
    for _ in 0..pairs {
        let t = Instant::now();
        aap_true();
        e.push(t.elapsed());
        let t = Instant::now();
        truth();
        a.push(t.elapsed());
        let t = Instant::now();
        direct();
        b.push(t.elapsed());
        let t = Instant::now();
        through_aap();
        c.push(t.elapsed());
        let t = Instant::now();
        through_proxy();
        p.push(t.elapsed());
    }
    let mp = common::median_of(&mut p);
    let (ma, mb, mc, me) = (
        common::median_of(&mut a),
        common::median_of(&mut b),
        common::median_of(&mut c),
        common::median_of(&mut e),
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("samples: {pairs} interleaved quintuples");
    println!("/bin/true median: {:.3} ms", ms(ma));
    println!(
        "git ls-remote, token in the URL, median: {:.3} ms = {:.2}x /bin/true",
        ms(mb),
        ms(mb) / ms(ma)
    );
    println!(
        "aap-exec forgejo-pat-read -- git ls-remote, median: {:.3} ms = {:.2}x the direct git ls-remote (+{:.3} ms), {:.2}x /bin/true",
        ms(mc),
        ms(mc) / ms(mb),
        ms(mc) - ms(mb),
        ms(mc) / ms(ma)
    );
    println!(
        "aap-exec forgejo-proxy -- git ls-remote (http-proxy), median: {:.3} ms = {:.2}x the direct git ls-remote (+{:.3} ms)",
        ms(mp),
        ms(mp) / ms(mb),
        ms(mp) - ms(mb)
    );
    println!(
        "aap-exec forgejo-pat-read -- /bin/true, median: {:.3} ms = {:.2}x /bin/true",
        ms(me),
        ms(me) / ms(ma)
    );
    common::Record::pair(
        "`aap-exec` forgejo PAT `-- git ls-remote` (loopback `git http-backend`)",
        mc,
        "`git ls-remote`, token in the URL",
        mb,
        pairs,
    )
    .rss(
        common::peak_rss_kib(&through_aap_cmd()),
        common::peak_rss_kib(&direct_cmd()),
    )
    .emit("git");
    common::Record::pair(
        "`aap-exec` forgejo PAT through the broker's http-proxy `-- git ls-remote`",
        mp,
        "`git ls-remote`, token in the URL",
        mb,
        pairs,
    )
    .rss(
        common::peak_rss_kib(&through_proxy_cmd()),
        common::peak_rss_kib(&direct_cmd()),
    )
    .target(
        "≤ 1.3× baseline",
        mp.as_secs_f64() <= 1.3 * mb.as_secs_f64(),
    )
    .emit("git");
    common::Record::pair(
        "`aap-exec` forgejo PAT `-- /bin/true`",
        me,
        "`/bin/true`",
        ma,
        pairs,
    )
    .emit("git");

    // Issue 13: cloning about 50 MB through the proxy against directly, interleaved.
    let mb = if cfg!(debug_assertions) { 2 } else { 50 };
    make_big_repo(&repos, mb);
    let big_url = git.url("big.git");
    let big_direct = format!("https://bench:{token}@{}/big.git", git.host());
    let clone_rounds = common::full_or_quick(7, 2);
    let (mut cd, mut cp) = (Vec::new(), Vec::new());
    for i in 0..clone_rounds {
        let into = d.join(format!("direct-{i}"));
        let mut c = Command::new("git");
        base(&mut c);
        c.args(["clone", "-q", &big_direct]).arg(&into);
        let t = Instant::now();
        assert!(c.status().unwrap().success(), "direct clone failed");
        cd.push(t.elapsed());
        std::fs::remove_dir_all(&into).unwrap();
        let into = d.join(format!("proxy-{i}"));
        let mut c = proxy_git(&["clone", "-q", &big_url]);
        c.arg(&into);
        let t = Instant::now();
        assert!(
            c.status().unwrap().success(),
            "clone through the proxy failed"
        );
        cp.push(t.elapsed());
        std::fs::remove_dir_all(&into).unwrap();
    }
    let (mcd, mcp) = (common::median_of(&mut cd), common::median_of(&mut cp));
    println!(
        "git clone of {mb} MB: direct median {:.1} ms ({:.1} MB/s), through the http-proxy {:.1} ms ({:.1} MB/s) = {:.0}% of direct throughput ({clone_rounds} interleaved rounds)",
        ms(mcd),
        mb as f64 / mcd.as_secs_f64(),
        ms(mcp),
        mb as f64 / mcp.as_secs_f64(),
        100.0 * mcd.as_secs_f64() / mcp.as_secs_f64()
    );
    common::Record::pair(
        "`aap-exec` forgejo PAT through the broker's http-proxy `-- git clone` (50 MB)",
        mcp,
        "`git clone`, token in the URL",
        mcd,
        clone_rounds,
    )
    // Throughput is size over time: at least 80% of direct's is a time at most 1/0.8 of it.
    .target(
        "throughput ≥ 80% of direct (time ≤ 1.25× baseline)",
        mcp.as_secs_f64() <= 1.25 * mcd.as_secs_f64(),
    )
    .emit("git");
}

/// `repos/big.git`: one commit holding `mb` MB of random bytes (a pack of about that size).
fn make_big_repo(repos: &std::path::Path, mb: usize) {
    use std::io::Read;
    let work = repos.join("big-work");
    std::fs::create_dir_all(&work).unwrap();
    let mut data = vec![0u8; mb * 1024 * 1024];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    std::fs::write(work.join("blob.bin"), &data).unwrap();
    let git = |dir: &std::path::Path, args: &[&str]| {
        let st = Command::new("git")
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", repos)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "git {args:?}");
    };
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "blob.bin"]);
    git(
        &work,
        &[
            "-c",
            "user.name=b",
            "-c",
            "user.email=b@b",
            "commit",
            "-q",
            "-m",
            "big",
        ],
    );
    git(
        repos,
        &["clone", "-q", "--bare", work.to_str().unwrap(), "big.git"],
    );
    std::fs::remove_dir_all(&work).unwrap();
}
