//! Benchmark (issue 6): whole-process wall time of `aap-exec ssh-cap -- /bin/true` (grant check,
//! Infisical login + fetch of the key over HTTPS on loopback, private ssh-agent start under its
//! keeper, `ssh-add -t -h -` of the key, audit start/end, child, teardown), paired with
//! `/bin/true` in the same run. Target: median at most 18x `/bin/true`'s.
//!
//! Also measured, interleaved in the same loop, to show where the time goes:
//! - the same capability at tier low (its audit lines are not fsync'd);
//! - `aap-exec` for a plain env secret at tier low (everything but the agent);
//! - the floor: `ssh-agent -D` start + `ssh-add -` of the key + kill, by hand, no aap at all.
//!
//! Run: `cargo bench --bench ssh_agent` (add `-- --pairs N`). The dev-server runs in this
//! process (on its own threads). Results go to BENCHMARKS.md by hand, with machine and date.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn keygen(path: &Path, comment: &str) -> String {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
    std::fs::read_to_string(path.with_extension("pub")).unwrap()
}

const CATALOG: &str = "schema_version: 1
capabilities:
  - id: ssh-bench
    description: the seed's ssh key, destination-constrained, tier high as in the seed catalog
    audit_tier: high
    agents: [codex]
    max_ttl: 2h
    backing:
      type: ssh-agent
      secret: { path: /ssh, key: SSH_PRIVATE_KEY }
      key_lifetime: 15m
      hosts: [vps-bench]
    inject: [ { type: ssh-agent } ]
  - id: ssh-bench-low
    description: the same at tier low (no fsync)
    audit_tier: low
    agents: [codex]
    max_ttl: 2h
    backing:
      type: ssh-agent
      secret: { path: /ssh, key: SSH_PRIVATE_KEY }
      key_lifetime: 15m
      hosts: [vps-bench]
    inject: [ { type: ssh-agent } ]
  - id: db-low
    description: a plain secret in env, tier low
    audit_tier: low
    agents: [codex]
    max_ttl: 2h
    backing: { type: secret, secret: { path: /app, key: DB_PASSWORD } }
    inject: [ { type: env, name: DB_PASSWORD } ]
";

fn main() {
    common::rss_probe_main();
    let Some(pairs) = common::rounds(300) else {
        return;
    };
    if !Path::new("/usr/bin/ssh-agent").exists() {
        println!("SKIPPED: ssh-agent is not installed (apt-get install -y openssh-client)");
        return;
    }
    let aap = env!("CARGO_BIN_EXE_aap");
    let aap_exec = env!("CARGO_BIN_EXE_aap-exec");
    let server = common::dev_server();
    let dir = common::tempdir("aap-bench-");
    let d = dir.path();
    let seed = server.seed();
    let reader = seed.identities.iter().find(|i| i.name == "reader").unwrap();
    std::fs::write(d.join("client_id"), &reader.client_id).unwrap();
    let secret = d.join("client_secret");
    std::fs::write(&secret, &reader.client_secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let op = keygen(&d.join("operator"), "operator@bench");
    std::fs::write(
        d.join("allowed_signers"),
        format!("operator@bench namespaces=\"aap-grant\" {op}"),
    )
    .unwrap();
    let host = keygen(&d.join("host_key"), "");
    std::fs::write(d.join("known_hosts"), format!("vps-bench {host}")).unwrap();
    std::fs::write(d.join("catalog.yaml"), CATALOG).unwrap();
    let cfg = d.join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "infisical:\n  url: {}\n  project_id: {}\n  ca_bundle: {}\nbroker:\n  socket: broker.sock\nagents:\n  codex:\n    uid: {}\n    client_id_file: client_id\n    client_secret_file: client_secret\n\
             catalog: catalog.yaml\nstate_dir: state\naudit_log: audit.jsonl\noperator:\n  allowed_signers: allowed_signers\n  signing_key: operator\n\
             ssh_known_hosts: [known_hosts]\n",
            server.url(),
            seed.project_id,
            server.ca_path().unwrap().display(),
            aap::sys::uid()
        ),
    )
    .unwrap();
    let _broker = common::broker(aap, &cfg, d);
    let o = Command::new(aap)
        .env_clear()
        .env("AAP_CONFIG", &cfg)
        .args([
            "session",
            "start",
            "--agent",
            "codex",
            "--ttl",
            "1h",
            "--cap",
            "ssh-bench",
            "--cap",
            "ssh-bench-low",
            "--cap",
            "db-low",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    let session = out
        .trim()
        .strip_prefix("export AAP_SESSION=")
        .unwrap()
        .to_string();
    let key = seed
        .secrets
        .iter()
        .find(|s| s.key == "SSH_PRIVATE_KEY")
        .unwrap()
        .value
        .clone();

    let exec_cmd = |cap: &str| {
        let mut c = Command::new(aap_exec);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("AAP_CONFIG", &cfg)
            .env("AAP_SESSION", &session)
            .args([cap, "--", "/bin/true"])
            .stdout(Stdio::null());
        c
    };
    let exec = |cap: &str| {
        let st = exec_cmd(cap).status().unwrap();
        assert!(st.success(), "aap-exec {cap} failed; run it by hand");
    };
    let truth = || {
        assert!(
            Command::new("/bin/true")
                .env_clear()
                .status()
                .unwrap()
                .success()
        );
    };
    // The floor: what any agent-based design pays, with no aap at all.
    let floor = || {
        let sock = d.join("floor.sock");
        let mut agent = Command::new("/usr/bin/ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        for line in BufReader::new(agent.stdout.take().unwrap()).lines() {
            if line.unwrap().starts_with("echo Agent pid") {
                break;
            }
        }
        let mut add = Command::new("/usr/bin/ssh-add")
            .args(["-q", "-t", "900", "-h", "vps-bench", "-H"])
            .arg(d.join("known_hosts"))
            .arg("-")
            .env_clear()
            .env("SSH_AUTH_SOCK", &sock)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        add.stdin.take().unwrap().write_all(key.as_bytes()).unwrap();
        assert!(add.wait().unwrap().success());
        agent.kill().unwrap();
        agent.wait().unwrap();
        let _ = std::fs::remove_file(&sock);
    };
    for _ in 0..common::full_or_quick(20, 3) {
        exec("ssh-bench");
        truth();
        floor();
    }
    let mut t: [Vec<Duration>; 5] = Default::default();
    for _ in 0..pairs {
        let s = Instant::now();
        truth();
        t[0].push(s.elapsed());
        let s = Instant::now();
        exec("ssh-bench");
        t[1].push(s.elapsed());
        let s = Instant::now();
        exec("ssh-bench-low");
        t[2].push(s.elapsed());
        let s = Instant::now();
        exec("db-low");
        t[3].push(s.elapsed());
        let s = Instant::now();
        floor();
        t[4].push(s.elapsed());
    }
    let m: Vec<f64> = t
        .iter_mut()
        .map(|v| common::median_of(v).as_secs_f64() * 1e3)
        .collect();
    println!("samples: {pairs} interleaved rounds");
    println!("/bin/true median: {:.3} ms", m[0]);
    println!(
        "aap-exec ssh-bench (tier high) -- /bin/true median: {:.3} ms = {:.2}x /bin/true (target <= 18x)",
        m[1],
        m[1] / m[0]
    );
    println!(
        "aap-exec ssh-bench-low (tier low) -- /bin/true median: {:.3} ms = {:.2}x",
        m[2],
        m[2] / m[0]
    );
    println!(
        "aap-exec db-low (env secret) -- /bin/true median: {:.3} ms = {:.2}x",
        m[3],
        m[3] / m[0]
    );
    println!(
        "floor: ssh-agent start + ssh-add - + kill median: {:.3} ms = {:.2}x",
        m[4],
        m[4] / m[0]
    );
    let true_rss = common::peak_rss_kib(&Command::new("/bin/true"));
    let ms = |x: f64| Duration::from_secs_f64(x / 1e3);
    let pair =
        |name: &str, i: usize| common::Record::pair(name, ms(m[i]), "`/bin/true`", ms(m[0]), pairs);
    common::Limit::Ratio(18.0)
        .apply(
            pair("`aap-exec` ssh-agent key, tier high, `-- /bin/true`", 1)
                .rss(common::peak_rss_kib(&exec_cmd("ssh-bench")), true_rss),
        )
        .emit("ssh_agent");
    pair("`aap-exec` ssh-agent key, tier low (no fsync)", 2).emit("ssh_agent");
    pair("`aap-exec` env secret, tier low", 3)
        .rss(common::peak_rss_kib(&exec_cmd("db-low")), true_rss)
        .emit("ssh_agent");
    pair("floor, no aap: `ssh-agent` + `ssh-add -` + kill", 4).emit("ssh_agent");
    let hruns = common::full_or_quick(200, 20);
    if let Some(h) = common::hyperfine("ssh_agent", &[&exec_cmd("ssh-bench")], hruns) {
        common::emit_hyperfine(
            "ssh_agent",
            &["`aap-exec` ssh-agent key, tier high, `-- /bin/true`"],
            &h,
            hruns,
            &[Some(common::Limit::Ratio(18.0))],
        );
    }
}
