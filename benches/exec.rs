//! The whole `aap-exec CAP -- /bin/true` process, for an `env` and an `fd` capability, against
//! `aap dev-server` over loopback HTTPS, paired with bare `/bin/true` in the same run. Also the
//! peak RSS of `aap-exec`, and the median again with 100,000 sessions in the state dir.
//! Run: `cargo bench --bench exec`.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};

const AAP: &str = env!("CARGO_BIN_EXE_aap");
const AAP_EXEC: &str = env!("CARGO_BIN_EXE_aap-exec");
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
";

fn exec_cmd(dir: &Path, session: &str, cap: &str) -> Command {
    let mut c = Command::new(AAP_EXEC);
    c.args(["--session", session, cap, "--", "/bin/true"])
        .env("AAP_CONFIG", dir.join("config.yaml"))
        .current_dir(dir)
        .stdout(Stdio::null());
    c
}

/// Peak RSS (KiB) of one run of `c`, measured in a fresh child of ours that only runs it.
fn peak_rss(dir: &Path, session: &str, cap: &str) -> u64 {
    let exe = std::env::current_exe().unwrap();
    let o = Command::new(exe)
        .args(["--rss-probe", &dir.display().to_string(), session, cap])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if args.get(1).map(String::as_str) == Some("--rss-probe") {
        let st = exec_cmd(Path::new(&args[2]), &args[3], &args[4])
            .status()
            .unwrap();
        assert!(st.success());
        println!("{}", aap::sys::children_peak_rss_kib().unwrap());
        return;
    }

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

    let mut results = Vec::new();
    for cap in ["bench-env", "bench-fd"] {
        let (a, t) = pairwise(
            RUNS,
            &mut exec_cmd(d, &session, cap),
            &mut Command::new("/bin/true"),
        );
        println!(
            "aap-exec {cap} -- /bin/true: median {} vs /bin/true {} (ratio {:.2}x), {RUNS} pairwise runs; peak RSS {} KiB",
            ms(a),
            ms(t),
            a.as_secs_f64() / t.as_secs_f64(),
            peak_rss(d, &session, cap)
        );
        results.push(a);
    }

    // 100,000 other sessions in the state dir: lookup is by file name, so nothing should change.
    let grants = d.join("state/grants");
    let src = std::fs::read(grants.join(format!("{session}.grant"))).unwrap();
    for i in 0..100_000u32 {
        // Names of the right form (26 Crockford base-32 characters); contents do not matter.
        let name = format!("01M8{:022}.grant", i).replace(['I', 'L', 'O', 'U'], "0");
        std::fs::write(grants.join(name), &src).unwrap();
    }
    let (a, t) = pairwise(
        RUNS,
        &mut exec_cmd(d, &session, "bench-env"),
        &mut Command::new("/bin/true"),
    );
    println!(
        "aap-exec bench-env with 100,000 sessions in the state dir: median {} vs /bin/true {} (ratio {:.2}x); change vs 1 session: {:+.1}%",
        ms(a),
        ms(t),
        a.as_secs_f64() / t.as_secs_f64(),
        (a.as_secs_f64() / results[0].as_secs_f64() - 1.0) * 100.0
    );
    drop(server);
}
