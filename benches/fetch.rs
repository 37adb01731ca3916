//! Benchmark (issue 4): a cold `aap` process doing Universal Auth login + fetch of one secret
//! (+ token revocation) against `aap dev-server` over HTTPS on loopback, compared pairwise with
//! `/bin/true` in the same run. Target: median wall time at most 4x `/bin/true`'s.
//!
//! Run: `cargo bench --bench fetch` (add `-- --pairs N` to change the sample size).
//! The dev-server runs in this process (on its own threads); each sample spawns a fresh `aap`.
//! Results go to BENCHMARKS.md by hand, with the machine and date.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    common::rss_probe_main();
    let Some(pairs) = common::rounds(300) else {
        return;
    };
    let aap = env!("CARGO_BIN_EXE_aap");
    let server = common::dev_server();
    let dir = common::tempdir("aap-bench-");
    let seed = server.seed();
    let reader = seed.identities.iter().find(|i| i.name == "reader").unwrap();
    std::fs::write(dir.path().join("client_id"), &reader.client_id).unwrap();
    let secret = dir.path().join("client_secret");
    std::fs::write(&secret, &reader.client_secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "infisical:\n  url: {}\n  project_id: {}\n  ca_bundle: {}\nagents:\n  codex:\n    client_id_file: client_id\n    client_secret_file: client_secret\n",
            server.url(),
            seed.project_id,
            server.ca_path().unwrap().display()
        ),
    )
    .unwrap();
    let cmd = |extra: &[&str]| {
        let mut c = Command::new(aap);
        c.env_clear()
            .env("AAP_CONFIG", &cfg)
            .args([
                "infisical",
                "check",
                "--agent",
                "codex",
                "prod:/app:DB_PASSWORD",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let run = |extra: &[&str]| {
        let st = cmd(extra).status().unwrap();
        assert!(st.success(), "aap infisical check failed; run it by hand");
    };
    let fetch = || run(&["--no-revoke"]);
    let fetch_revoke = || run(&[]);
    let truth = || {
        assert!(
            Command::new("/bin/true")
                .env_clear()
                .status()
                .unwrap()
                .success()
        );
    };
    for _ in 0..common::full_or_quick(20, 3) {
        fetch();
        truth();
    }
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..pairs {
        let t = Instant::now();
        truth();
        a.push(t.elapsed());
        let t = Instant::now();
        fetch();
        b.push(t.elapsed());
        let t = Instant::now();
        fetch_revoke();
        c.push(t.elapsed());
    }
    let (ma, mb, mc) = (
        common::median_of(&mut a),
        common::median_of(&mut b),
        common::median_of(&mut c),
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("samples: {pairs} interleaved triples");
    println!("/bin/true median: {:.3} ms", ms(ma));
    println!(
        "aap login + fetch (HTTPS loopback) median: {:.3} ms = {:.2}x /bin/true (target <= 4x)",
        ms(mb),
        ms(mb) / ms(ma)
    );
    println!(
        "aap login + fetch + revoke median: {:.3} ms = {:.2}x /bin/true",
        ms(mc),
        ms(mc) / ms(ma)
    );
    let fetch_rss = common::peak_rss_kib(&cmd(&["--no-revoke"]));
    let true_rss = common::peak_rss_kib(&Command::new("/bin/true"));
    common::Limit::Ratio(4.0)
        .apply(
            common::Record::pair(
                "`aap` login + fetch (HTTPS loopback)",
                mb,
                "`/bin/true`",
                ma,
                pairs,
            )
            .rss(fetch_rss, true_rss),
        )
        .emit("fetch");
    common::Record::pair("`aap` login + fetch + revoke", mc, "`/bin/true`", ma, pairs)
        .rss(common::peak_rss_kib(&cmd(&[])), true_rss)
        .emit("fetch");
    let hruns = common::full_or_quick(300, 20);
    if let Some(h) = common::hyperfine("fetch", &[&cmd(&["--no-revoke"])], hruns) {
        common::emit_hyperfine(
            "fetch",
            &["`aap` login + fetch (HTTPS loopback)"],
            &h,
            hruns,
            &[Some(common::Limit::Ratio(4.0))],
        );
    }
    let s = server.stats();
    println!(
        "server: {} logins, {} reads, {} connections",
        s.logins, s.secret_reads, s.connections
    );
}
