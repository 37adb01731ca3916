//! Benchmark (issue 12): the broker as the SSH agent.
//!
//! 1. Whole-process wall time of `aap-exec ssh-bench -- /bin/true` (grant check, Infisical
//!    fetch of the key over HTTPS on loopback, the broker parses it and opens the exec's agent
//!    socket, audit start/end, child, teardown), paired in the same run with the floor
//!    (`timeout 10 /bin/true`: a program that only spawns and waits). Target: at most 1.5x.
//!    Also, interleaved: the same at tier low (no fsync), a plain env secret (everything but
//!    the agent), and bare `/bin/true`.
//! 2. `ssh vps-bench true` against a real sshd on 127.0.0.1, through the broker's agent (one
//!    running exec's `SSH_AUTH_SOCK`) and through OpenSSH's `ssh-agent` with the same key loaded
//!    the same way (`ssh-add -h vps-bench -H known_hosts`), alternated. Target: at most 1.1x.
//!
//! Run: `cargo bench --bench ssh_agent` (add `-- --pairs N`), or `benches/run.sh --only
//! ssh_agent`. The dev-server runs in this process (on its own threads).

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";

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

/// A real sshd on 127.0.0.1 that accepts the seed key, killed on drop.
struct Sshd(Child);

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_sshd(d: &Path, seed_pub: &str) -> (Sshd, u16) {
    let _ = std::fs::create_dir_all("/run/sshd");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    std::fs::write(d.join("authorized_keys"), format!("{seed_pub}\n")).unwrap();
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "ListenAddress 127.0.0.1:{port}\nHostKey {hk}\nPidFile {pid}\nAuthorizedKeysFile {ak}\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nLogLevel ERROR\n",
            hk = d.join("host_key").display(),
            pid = d.join("sshd.pid").display(),
            ak = d.join("authorized_keys").display(),
        ),
    )
    .unwrap();
    let child = Command::new(SSHD)
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sshd");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "sshd did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Sshd(child), port)
}

fn main() {
    common::rss_probe_main();
    let Some(pairs) = common::rounds(300) else {
        return;
    };
    for tool in ["/usr/bin/ssh-agent", "/usr/bin/ssh", SSHD] {
        if !Path::new(tool).exists() {
            println!(
                "SKIPPED: {tool} is not installed (apt-get install -y openssh-client openssh-server)"
            );
            return;
        }
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
    let secret_of = |k: &str| {
        seed.secrets
            .iter()
            .find(|s| s.key == k)
            .unwrap()
            .value
            .clone()
    };
    let key = secret_of("SSH_PRIVATE_KEY");
    let seed_pub = secret_of("SSH_PUBLIC_KEY");

    // ---- 1. aap-exec ssh-bench -- /bin/true against the floor ----
    let exec_cmd = |cap: &str, argv: &[&str]| {
        let mut c = Command::new(aap_exec);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("AAP_CONFIG", &cfg)
            .env("AAP_SESSION", &session)
            .arg(cap)
            .arg("--")
            .args(argv)
            .stdout(Stdio::null());
        c
    };
    let run = |c: &mut Command| {
        let st = c.status().unwrap();
        assert!(st.success(), "{c:?} failed; run it by hand");
    };
    let exec_true = |cap: &str| run(&mut exec_cmd(cap, &["/bin/true"]));
    let mut floor = Command::new("timeout");
    floor.env_clear().args(["10", "/bin/true"]);
    let mut truth = Command::new("/bin/true");
    truth.env_clear();
    for _ in 0..common::full_or_quick(20, 3) {
        exec_true("ssh-bench");
        run(&mut floor);
    }
    let mut t: [Vec<Duration>; 5] = Default::default();
    for _ in 0..pairs {
        let s = Instant::now();
        run(&mut floor);
        t[0].push(s.elapsed());
        let s = Instant::now();
        exec_true("ssh-bench");
        t[1].push(s.elapsed());
        let s = Instant::now();
        exec_true("ssh-bench-low");
        t[2].push(s.elapsed());
        let s = Instant::now();
        exec_true("db-low");
        t[3].push(s.elapsed());
        let s = Instant::now();
        run(&mut truth);
        t[4].push(s.elapsed());
    }
    let m: Vec<f64> = t
        .iter_mut()
        .map(|v| common::median_of(v).as_secs_f64() * 1e3)
        .collect();
    println!("samples: {pairs} interleaved rounds");
    println!("floor (timeout 10 /bin/true) median: {:.3} ms", m[0]);
    println!(
        "aap-exec ssh-bench (tier high) -- /bin/true median: {:.3} ms = {:.2}x the floor (target <= 1.5x)",
        m[1],
        m[1] / m[0]
    );
    println!(
        "aap-exec ssh-bench-low (tier low) -- /bin/true median: {:.3} ms = {:.2}x the floor",
        m[2],
        m[2] / m[0]
    );
    println!(
        "aap-exec db-low (env secret) -- /bin/true median: {:.3} ms = {:.2}x the floor",
        m[3],
        m[3] / m[0]
    );
    println!(
        "/bin/true median: {:.3} ms; aap-exec ssh-bench = {:.2}x /bin/true",
        m[4],
        m[1] / m[4]
    );
    let floor_rss = common::peak_rss_kib(&floor);
    let ms = |x: f64| Duration::from_secs_f64(x / 1e3);
    let floor_name = "`timeout 10 /bin/true` (the floor)";
    let pair =
        |name: &str, i: usize| common::Record::pair(name, ms(m[i]), floor_name, ms(m[0]), pairs);
    common::Limit::Ratio(1.5)
        .apply(
            pair(
                "`aap-exec` ssh-agent capability, tier high, `-- /bin/true`",
                1,
            )
            .rss(
                common::peak_rss_kib(&exec_cmd("ssh-bench", &["/bin/true"])),
                floor_rss,
            ),
        )
        .emit("ssh_agent");
    pair("`aap-exec` ssh-agent capability, tier low (no fsync)", 2).emit("ssh_agent");
    pair("`aap-exec` env secret, tier low", 3).emit("ssh_agent");
    common::Record::pair(
        "`aap-exec` ssh-agent capability, tier high, `-- /bin/true`",
        ms(m[1]),
        "`/bin/true`",
        ms(m[4]),
        pairs,
    )
    .emit("ssh_agent");

    // ---- 2. ssh vps-bench true: the broker's agent against OpenSSH's ----
    std::fs::set_permissions(d.join("host_key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let (_sshd, port) = start_sshd(d, seed_pub.trim());
    // One running exec holds the broker's agent for this session; its socket is read back.
    let sock_file = d.join("sock");
    let mut holder = exec_cmd(
        "ssh-bench",
        &[
            "/bin/sh",
            "-c",
            &format!(
                "echo $$ > {}.pid; printf '%s\\n' \"$SSH_AUTH_SOCK\" > {}; exec sleep 3600",
                sock_file.display(),
                sock_file.display()
            ),
        ],
    )
    .stdin(Stdio::null())
    .spawn()
    .unwrap();
    let t0 = Instant::now();
    let ours = loop {
        let v = std::fs::read_to_string(&sock_file).unwrap_or_default();
        if v.ends_with('\n') {
            break v.trim().to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the holding exec wrote no socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    // OpenSSH's agent with the same key, loaded the same way.
    let theirs = d.join("openssh-agent.sock");
    let mut agent = Command::new("/usr/bin/ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&theirs)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !theirs.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "ssh-agent did not listen"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut add = Command::new("/usr/bin/ssh-add")
        .args(["-q", "-t", "900", "-h", "vps-bench", "-H"])
        .arg(d.join("known_hosts"))
        .arg("-")
        .env_clear()
        .env("SSH_AUTH_SOCK", &theirs)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    add.stdin.take().unwrap().write_all(key.as_bytes()).unwrap();
    assert!(add.wait().unwrap().success(), "ssh-add failed");
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
    let ssh = |sock: &Path| {
        let mut c = Command::new("/usr/bin/ssh");
        c.env_clear()
            .env("SSH_AUTH_SOCK", sock)
            .env("HOME", d)
            .args(["-F", "/dev/null", "-p", &port.to_string(), "-o"])
            .arg(format!(
                "UserKnownHostsFile={}",
                d.join("known_hosts").display()
            ))
            .args([
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "HostKeyAlias=vps-bench",
                "-o",
                "IdentityFile=/nonexistent/aap-bench-key",
                "-o",
                "BatchMode=yes",
                "-o",
                "ControlMaster=no",
                "-l",
                user.trim(),
                "127.0.0.1",
                "true",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        c
    };
    let mut via_ours = ssh(Path::new(&ours));
    let mut via_theirs = ssh(&theirs);
    let sshes = common::full_or_quick(100, 5);
    let (a, b) = common::pairwise(sshes, &mut via_ours, &mut via_theirs);
    println!(
        "ssh vps-bench true: through the broker's agent {} vs through OpenSSH's ssh-agent {} ({:.3}x, target <= 1.1x), {sshes} pairs",
        common::ms(a),
        common::ms(b),
        a.as_secs_f64() / b.as_secs_f64()
    );
    common::Limit::Ratio(1.1)
        .apply(common::Record::pair(
            "`ssh host true` through the broker's agent (tier high: each signature audited and fsync'd)",
            a,
            "through OpenSSH's `ssh-agent`, same key and constraint",
            b,
            sshes,
        ))
        .emit("ssh_agent");
    let _ = agent.kill();
    let _ = agent.wait();
    // End the holding exec's child (sleep) itself: a signal to aap-exec from this process
    // group is not forwarded (the child is in the same group and would have got it).
    let child = std::fs::read_to_string(d.join("sock.pid")).unwrap_or_default();
    let _ = Command::new("kill").arg("-TERM").arg(child.trim()).status();
    let _ = holder.wait();
}
