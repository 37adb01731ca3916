//! Benchmarks for issue 3 (sessions and audit), with a small timing loop that prints medians.
//! Run: `cargo bench --bench sessions`. Needs the real `ssh-keygen` to sign the grant.
//!
//! - grant check: in-process verify + expiry + revocation (target < 150 µs)
//! - lookup with 100,000 sessions in the state dir vs 1 (target: within 10%)
//! - audit append without fsync, in process (target < 20 µs)
//! - `aap audit verify` throughput (target >= 300,000 lines/s)

mod common;

use aap::audit::{Event, EventKind, Log, Outcome};
use aap::catalog::{Catalog, Tier};
use aap::config::Config;
use aap::grant::{CheckRequest, Grant, GrantedCap};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[((v.len() - 1) as f64 * p) as usize]
}

fn ssh_sign(key: &Path, msg: &[u8]) -> Vec<u8> {
    let mut c = Command::new("ssh-keygen")
        .args(["-q", "-Y", "sign", "-n", "aap-grant", "-f"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("ssh-keygen");
    c.stdin.take().unwrap().write_all(msg).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success());
    o.stdout
}

struct Setup {
    _dir: tempfile::TempDir,
    cfg: Config,
    cat: Catalog,
    session: String,
    grants: std::path::PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("aap-bench-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let key = d.join("op");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen is needed for the benchmarks");
    assert!(st.success());
    let pubkey = std::fs::read_to_string(d.join("op.pub")).unwrap();
    std::fs::write(
        d.join("allowed_signers"),
        format!("op@example.org namespaces=\"aap-grant\" {pubkey}"),
    )
    .unwrap();
    let catalog = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/agent-capabilities.yaml");
    std::fs::write(
        d.join("config.yaml"),
        format!(
            "catalog: {}\nstate_dir: {}\naudit_log: {}\noperator:\n  allowed_signers: {}\n  signing_key: {}\n",
            catalog.display(),
            d.join("state").display(),
            d.join("audit.jsonl").display(),
            d.join("allowed_signers").display(),
            key.display()
        ),
    )
    .unwrap();
    let now = aap::timefmt::unix_secs(SystemTime::now());
    let id = aap::id::SessionId::generate(SystemTime::now())
        .unwrap()
        .to_string();
    let t = aap::timefmt::rfc3339_secs;
    let g = Grant {
        v: 1,
        session: id.clone(),
        agent: "codex".into(),
        operator: "op@example.org".into(),
        seq: 1,
        issued_at: t(now),
        not_before: t(now),
        expires_at: t(now + 3 * 3600),
        capabilities: vec![GrantedCap {
            id: "forgejo-pat-read".into(),
            approved_at: t(now),
            expires_at: t(now + 3 * 3600),
        }],
        hosts: vec![],
        reason: None,
        break_glass: false,
    };
    let bytes = g.to_bytes();
    let grants = d.join("state/grants");
    std::fs::create_dir_all(&grants).unwrap();
    std::fs::create_dir_all(d.join("state/revoked")).unwrap();
    std::fs::write(grants.join(format!("{id}.grant")), &bytes).unwrap();
    std::fs::write(
        grants.join(format!("{id}.grant.sig")),
        ssh_sign(&key, &bytes),
    )
    .unwrap();
    let cfg = Config::load_path(&d.join("config.yaml")).unwrap();
    let cat = Catalog::load(&catalog).unwrap();
    Setup {
        _dir: dir,
        cfg,
        cat,
        session: id,
        grants,
    }
}

fn time_checks(s: &Setup, n: usize) -> Vec<Duration> {
    let req = CheckRequest {
        session: &s.session,
        capability: "forgejo-pat-read",
        agent: Some("codex"),
        host: "bench",
        uid: aap::sys::uid(),
    };
    for _ in 0..200 {
        aap::grant::check(&s.cfg, &s.cat, &req, SystemTime::now()).expect("allowed");
    }
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let a = aap::grant::check(&s.cfg, &s.cat, &req, SystemTime::now());
            let e = t.elapsed();
            assert!(a.is_ok());
            e
        })
        .collect()
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_nanos() as f64 / 1000.0)
}

fn main() {
    common::rss_probe_main();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `cargo test --benches` runs this with --bench absent; stay quick then.
    let quick = !std::env::args().any(|a| a == "--bench") || common::quick();
    let s = setup();
    let n = if quick { 50 } else { 5000 };

    // 1. Grant check.
    let one = time_checks(&s, n);
    println!(
        "grant check (verify + expiry + revocation), 1 session: median {}, p90 {} over {n} runs  [target < 150 µs]",
        us(median(one.clone())),
        us(pct(&one, 0.9))
    );
    let m = median(one.clone());
    common::Record::single(
        "grant check (SSHSIG verify + expiry + revocation), 1 session",
        m,
        false,
        n,
    )
    .extra(format!("p90 {}", us(pct(&one, 0.9))))
    .target("< 150 µs", m < Duration::from_micros(150))
    .emit("sessions");

    // 2. The same check with 100,000 sessions in the state dir.
    let extra = if quick { 1000 } else { 100_000 };
    let t = Instant::now();
    let dummy = std::fs::read(s.grants.join(format!("{}.grant", s.session))).unwrap();
    for _ in 1..extra {
        let id = aap::id::SessionId::generate(SystemTime::now()).unwrap();
        std::fs::write(s.grants.join(format!("{id}.grant")), &dummy).unwrap();
        std::fs::write(s.grants.join(format!("{id}.grant.sig")), b"x").unwrap();
    }
    eprintln!(
        "(created {} more sessions in {:.1}s)",
        extra - 1,
        t.elapsed().as_secs_f64()
    );
    let many = time_checks(&s, n);
    let (m1, mn) = (median(one), median(many.clone()));
    println!(
        "grant check with {extra} sessions in the state dir: median {}, p90 {}; ratio to 1 session {:.3}  [target within 10%]",
        us(mn),
        us(pct(&many, 0.9)),
        mn.as_secs_f64() / m1.as_secs_f64()
    );
    let mut r = common::Record::single(
        &format!(
            "grant check with {} sessions in the state dir",
            common::thousands(extra as u64)
        ),
        mn,
        false,
        n,
    );
    r.baseline = Some("the same with 1 session".into());
    r.baseline_median = Some(m1.as_secs_f64() * 1e6);
    let ok = r.ratio().is_some_and(|x| x <= 1.10);
    r.target("≤ 1.10× baseline", ok).emit("sessions");
    // Re-measure with one session after, to show the run-to-run noise of the pair.
    drop(many);

    // 3. Audit append, no fsync (a low-tier exec.start event).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut log = Log::open(&path).unwrap();
    let mut e = Event::new(EventKind::ExecStart, Outcome::Ok);
    e.session = Some(s.session.clone());
    e.agent = Some("codex".into());
    e.capability = Some("forgejo-pat-read".into());
    e.tier = Some(Tier::Low);
    e.program = Some("git".into());
    e.argv = Some(vec!["git".into(), "fetch".into(), "origin".into()]);
    e.cwd = Some("/home/codex/work/repo".into());
    e.pid = Some(4242);
    e.invocation = Some(s.session.clone());
    assert!(!e.needs_fsync());
    let appends = if quick { 200 } else { 20_000 };
    let times: Vec<Duration> = (0..appends)
        .map(|_| {
            let t = Instant::now();
            log.append(&e).unwrap();
            t.elapsed()
        })
        .collect();
    let m = median(times.clone());
    println!(
        "audit append without fsync: median {}, p90 {} over {appends} appends  [target < 20 µs]",
        us(m),
        us(pct(&times, 0.9))
    );
    common::Record::single("audit append without fsync, in process", m, false, appends)
        .extra(format!("p90 {}", us(pct(&times, 0.9))))
        .target("< 20 µs", m < Duration::from_micros(20))
        .emit("sessions");
    let mut synced = e.clone();
    synced.tier = Some(Tier::High);
    let nfs = if quick { 5 } else { 200 };
    let fs: Vec<Duration> = (0..nfs)
        .map(|_| {
            let t = Instant::now();
            log.append(&synced).unwrap();
            t.elapsed()
        })
        .collect();
    let m = median(fs);
    println!(
        "audit append with fsync (tier high), for reference: median {}",
        us(m)
    );
    common::Record::single(
        "audit append with fsync (tier high), for reference",
        m,
        false,
        nfs,
    )
    .emit("sessions");

    // 4. `aap audit verify` throughput, on a log of 300,000 lines (the binary, end to end).
    let lines = if quick { 2000 } else { 300_000 };
    let vpath = dir.path().join("verify.jsonl");
    let mut vlog = Log::open(&vpath).unwrap();
    for _ in 0..lines {
        vlog.append(&e).unwrap();
    }
    let size = std::fs::metadata(&vpath).unwrap().len();
    let verify_cmd = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_aap"));
        c.args(["audit", "verify"]).arg(&vpath);
        c
    };
    let nv = if quick { 1 } else { 7 };
    let runs: Vec<Duration> = (0..nv)
        .map(|_| {
            let t = Instant::now();
            let o = verify_cmd().output().unwrap();
            let e = t.elapsed();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            e
        })
        .collect();
    let m = median(runs);
    println!(
        "aap audit verify: {lines} lines ({:.1} MB) in median {:.1} ms = {:.0} lines/s (whole process)  [target >= 300,000 lines/s]",
        size as f64 / 1e6,
        m.as_secs_f64() * 1000.0,
        lines as f64 / m.as_secs_f64()
    );
    let rate = lines as f64 / m.as_secs_f64();
    common::Record::single(
        &format!(
            "`aap audit verify`, {} lines ({:.1} MB), whole process",
            common::thousands(lines as u64),
            size as f64 / 1e6
        ),
        m,
        true,
        nv,
    )
    .extra(format!("{} lines/s", common::thousands(rate as u64)))
    .rss(common::peak_rss_kib(&verify_cmd()), None)
    .target("≥ 300,000 lines/s", rate >= 300_000.0)
    .emit("sessions");
    let inproc: Vec<Duration> = (0..nv)
        .map(|_| {
            let t = Instant::now();
            let r = aap::audit::verify_file(&vpath).unwrap();
            assert_eq!(r.lines, lines as u64);
            t.elapsed()
        })
        .collect();
    let m = median(inproc);
    println!(
        "audit verify in process: median {:.1} ms = {:.0} lines/s",
        m.as_secs_f64() * 1000.0,
        lines as f64 / m.as_secs_f64()
    );
    common::Record::single("audit verify in process, same file", m, true, nv)
        .extra(format!(
            "{} lines/s",
            common::thousands((lines as f64 / m.as_secs_f64()) as u64)
        ))
        .emit("sessions");
}
