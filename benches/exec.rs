//! The whole `aap-exec CAP -- /bin/true` process through a warm `aap broker`, for an `env` and
//! an `fd` capability, against `aap dev-server` over loopback HTTPS, paired in the same run with
//! the floor (`timeout 10 /bin/true`: a program that only spawns and waits for `/bin/true`),
//! with bare `/bin/true`, and with `sudo -u nobody /bin/true`. Also: the first exec after the
//! broker starts (cold), `aap-exec`'s size, minor page faults and peak RSS, and the median again
//! with 100,000 sessions in the state dir. Run: `cargo bench --bench exec`.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};

const AAP: &str = env!("CARGO_BIN_EXE_aap");
const AAP_EXEC: &str = env!("CARGO_BIN_EXE_aap-exec");
/// Pairs per measurement in a full run.
const RUNS: usize = 300;

const CATALOG: &str = "schema_version: 1
capabilities:
  - id: bench-env
    description: env form
    audit_tier: medium
    agents: [codex]
    max_ttl: 2h
    backing: { type: secret, secret: { path: /app, key: DB_PASSWORD } }
    inject: [ { type: env, name: DB_PASSWORD } ]
  - id: bench-fd
    description: fd form
    audit_tier: medium
    agents: [codex]
    max_ttl: 2h
    backing: { type: secret, secret: { path: /app, key: DB_PASSWORD } }
    inject: [ { type: fd, name: DB_PASSWORD_FILE } ]
  - id: bench-wrapped
    description: a broker-run command (no secret)
    audit_tier: medium
    agents: [codex]
    max_ttl: 2h
    backing: { type: wrapped-command, command: /bin/true, args: [] }
";

fn exec_cmd(dir: &Path, session: &str, cap: &str) -> Command {
    let mut c = Command::new(AAP_EXEC);
    c.args(["--session", session, cap, "--", "/bin/true"])
        .env("AAP_CONFIG", dir.join("config.yaml"))
        .current_dir(dir)
        .stdout(Stdio::null());
    c
}

fn main() {
    rss_probe_main();
    let Some(runs) = rounds(RUNS) else {
        return;
    };

    let seed = aap::devserver::Seed::default_seed();
    let reader = seed
        .identities
        .iter()
        .find(|i| i.name == "reader")
        .unwrap()
        .clone();
    let project = seed.project_id.clone();
    let server = aap::devserver::spawn(aap::devserver::Options {
        tls: true,
        seed,
        ..Default::default()
    })
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ca = server.ca_path();
    let inst = aap::cmd::demo::Installation {
        url: server.url(),
        ca: ca.as_deref(),
        project_id: &project,
        client_id: &reader.client_id,
        client_secret: &reader.client_secret,
        catalog: CATALOG,
        infisical_extra: "",
    };
    aap::cmd::demo::write_installation(d, &inst).unwrap();
    let o = Command::new(AAP)
        .args([
            "session",
            "start",
            "--agent",
            "codex",
            "--cap",
            "bench-env",
            "--cap",
            "bench-fd",
            "--cap",
            "bench-wrapped",
            "--ttl",
            "1h",
        ])
        .env("AAP_CONFIG", d.join("config.yaml"))
        .current_dir(d)
        .output()
        .unwrap();
    let session = String::from_utf8_lossy(&o.stdout)
        .trim()
        .strip_prefix("export AAP_SESSION=")
        .expect("session")
        .to_string();

    let broker = broker(AAP, &d.join("config.yaml"), d);
    // Cold: the first exec after the broker started.
    let t = std::time::Instant::now();
    assert!(
        exec_cmd(d, &session, "bench-env")
            .status()
            .unwrap()
            .success()
    );
    let cold = t.elapsed();
    println!(
        "first aap-exec after the broker started (cold): {}",
        ms(cold)
    );
    Record::single(
        "first `aap-exec` env secret after the broker started (cold)",
        cold,
        true,
        1,
    )
    .emit("exec");

    let mut floor_cmd = Command::new("timeout");
    floor_cmd.args(["10", "/bin/true"]);
    let mut results = Vec::new();
    let true_rss = peak_rss_kib(&Command::new("/bin/true"));
    for (cap, form) in [("bench-env", "env"), ("bench-fd", "fd")] {
        let (a, t) = pairwise(runs, &mut exec_cmd(d, &session, cap), &mut floor_cmd);
        let rss = peak_rss_kib(&exec_cmd(d, &session, cap));
        println!(
            "aap-exec {cap} -- /bin/true: median {} vs timeout 10 /bin/true {} (ratio {:.2}x), {runs} pairwise runs; peak RSS {} KiB",
            ms(a),
            ms(t),
            a.as_secs_f64() / t.as_secs_f64(),
            rss.unwrap_or(0)
        );
        let r = Record::pair(
            &format!("`aap-exec` {form} secret `-- /bin/true`, warm broker"),
            a,
            "`timeout 10 /bin/true` (the floor)",
            t,
            runs,
        )
        .rss(rss, true_rss);
        let ok = r.ratio().is_some_and(|x| x <= 1.3) && rss.is_some_and(|k| k < 6 * 1024);
        r.target("≤ 1.3× the floor, peak RSS < 6 MiB", ok)
            .emit("exec");
        results.push(a);
    }
    let (a, t) = pairwise(
        runs,
        &mut exec_cmd(d, &session, "bench-env"),
        &mut Command::new("/bin/true"),
    );
    println!(
        "aap-exec bench-env vs /bin/true: {} vs {} ({:.2}x)",
        ms(a),
        ms(t),
        a.as_secs_f64() / t.as_secs_f64()
    );
    Record::pair(
        "`aap-exec` env secret `-- /bin/true`, warm broker",
        a,
        "`/bin/true`",
        t,
        runs,
    )
    .emit("exec");
    let mut sudo = Command::new("sudo");
    sudo.args(["-n", "-u", "nobody", "/bin/true"])
        .stderr(Stdio::null());
    if sudo.status().is_ok_and(|s| s.success()) {
        let (a, t) = pairwise(runs, &mut exec_cmd(d, &session, "bench-env"), &mut sudo);
        println!(
            "aap-exec bench-env vs sudo -u nobody /bin/true: {} vs {} ({:.2}x)",
            ms(a),
            ms(t),
            a.as_secs_f64() / t.as_secs_f64()
        );
        Record::pair(
            "`aap-exec` env secret `-- /bin/true`, warm broker",
            a,
            "`sudo -u nobody /bin/true`",
            t,
            runs,
        )
        .emit("exec");
    } else {
        println!(
            "sudo -u nobody /bin/true does not run here (benches/run.sh installs sudo); that pair was not measured"
        );
    }
    // A wrapped command, started by the broker (issue 14): against the floor, and against sudo.
    let (a, t) = pairwise(
        runs,
        &mut exec_cmd(d, &session, "bench-wrapped"),
        &mut floor_cmd,
    );
    println!(
        "aap-exec bench-wrapped (broker-run) vs timeout 10 /bin/true: {} vs {} ({:.2}x)",
        ms(a),
        ms(t),
        a.as_secs_f64() / t.as_secs_f64()
    );
    let r = Record::pair(
        "`aap-exec` wrapped-command `/bin/true` (the broker starts it), warm broker",
        a,
        "`timeout 10 /bin/true` (the floor)",
        t,
        runs,
    );
    let ok = r.ratio().is_some_and(|x| x <= 1.5);
    r.target("≤ 1.5× the floor", ok).emit("exec");
    if sudo.status().is_ok_and(|s| s.success()) {
        let (a, t) = pairwise(runs, &mut exec_cmd(d, &session, "bench-wrapped"), &mut sudo);
        println!(
            "aap-exec bench-wrapped (broker-run) vs sudo -u nobody /bin/true: {} vs {} ({:.2}x)",
            ms(a),
            ms(t),
            a.as_secs_f64() / t.as_secs_f64()
        );
        let r = Record::pair(
            "`aap-exec` wrapped-command `/bin/true` (the broker starts it), warm broker",
            a,
            "`sudo -u nobody /bin/true`",
            t,
            runs,
        );
        let ok = r.ratio().is_some_and(|x| x <= 0.8);
        r.target("≤ 0.8× sudo", ok).emit("exec");
    }
    let size = std::fs::metadata(AAP_EXEC).map(|m| m.len()).unwrap_or(0);
    let faults = minor_faults(&exec_cmd(d, &session, "bench-env"));
    let true_faults = minor_faults(&Command::new("/bin/true"));
    println!(
        "aap-exec: {} bytes; minor page faults per run {} (/bin/true: {})",
        thousands(size),
        faults.unwrap_or(0),
        true_faults.unwrap_or(0)
    );
    Record {
        name: "`aap-exec` binary size (bytes) and minor page faults per run".into(),
        median: size as f64,
        unit: "B",
        extra: Some(format!(
            "{} minor faults per run (`/bin/true`: {})",
            faults.unwrap_or(0),
            true_faults.unwrap_or(0)
        )),
        rounds: 1,
        tool: "harness",
        ..Default::default()
    }
    .emit("exec");

    // 100,000 other sessions in the state dir: lookup is by file name, so nothing should change.
    let many = full_or_quick(100_000, 1_000);
    let grants = d.join("state/grants");
    let src = std::fs::read(grants.join(format!("{session}.grant"))).unwrap();
    for i in 0..many as u32 {
        // Names of the right form (26 Crockford base-32 characters); contents do not matter.
        let name = format!("01M8{:022}.grant", i).replace(['I', 'L', 'O', 'U'], "0");
        std::fs::write(grants.join(name), &src).unwrap();
    }
    let (a, t) = pairwise(
        runs,
        &mut exec_cmd(d, &session, "bench-env"),
        &mut Command::new("/bin/true"),
    );
    let change = a.as_secs_f64() / results[0].as_secs_f64() - 1.0;
    println!(
        "aap-exec bench-env with {many} sessions in the state dir: median {} vs /bin/true {} (ratio {:.2}x); change vs 1 session: {:+.1}%",
        ms(a),
        ms(t),
        a.as_secs_f64() / t.as_secs_f64(),
        change * 100.0
    );
    Record::pair(
        &format!(
            "`aap-exec` env secret with {} sessions in the state dir",
            thousands(many as u64)
        ),
        a,
        "the same with 1 session",
        results[0],
        runs,
    )
    .extra(format!("{:+.1}%", change * 100.0))
    .target("< 5% slower", change < 0.05)
    .emit("exec");
    drop(broker);
    drop(server);
}
