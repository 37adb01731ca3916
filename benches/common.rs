//! A tiny benchmark harness: run closures many times, report medians. No criterion: we want a
//! small dependency tree and plain numbers, and medians resist this shared machine's noise.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// Median of `n` timed runs of `f`, after `warm` untimed runs.
pub fn median<F: FnMut()>(warm: usize, n: usize, mut f: F) -> Duration {
    for _ in 0..warm {
        f();
    }
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    v.sort();
    v[v.len() / 2]
}

/// Medians of two commands run alternately (pairwise, same run), `n` times each.
pub fn pairwise(
    n: usize,
    a: &mut std::process::Command,
    b: &mut std::process::Command,
) -> (Duration, Duration) {
    let mut ta = Vec::with_capacity(n);
    let mut tb = Vec::with_capacity(n);
    for i in 0..n + 5 {
        let t = Instant::now();
        let sa = a.status().expect("run a");
        let da = t.elapsed();
        let t = Instant::now();
        let sb = b.status().expect("run b");
        let db = t.elapsed();
        assert!(
            sa.success() && sb.success(),
            "benchmark commands must succeed"
        );
        if i >= 5 {
            ta.push(da);
            tb.push(db);
        }
    }
    ta.sort();
    tb.sort();
    (ta[n / 2], tb[n / 2])
}

pub fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// The sample count from `--pairs N` (default `default`), or `None` when cargo only lists the
/// benchmarks (`--list`). In an unoptimized build (`cargo test --all-targets`) it is a smoke run
/// of 2 samples, and says so.
pub fn rounds(default: usize) -> Option<usize> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return None;
    }
    let mut n = match args.iter().position(|a| a == "--pairs") {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--pairs N"),
        None => default,
    };
    if cfg!(debug_assertions) {
        n = 2;
        println!("unoptimized build: smoke run only, numbers are meaningless; use cargo bench");
    }
    Some(n)
}

/// Median of collected samples (sorts them in place).
pub fn median_of(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `aap dev-server --tls` with its built-in seed, in this process.
pub fn dev_server() -> aap::devserver::Handle {
    aap::devserver::spawn(aap::devserver::Options {
        tls: true,
        ..Default::default()
    })
    .expect("dev-server")
}

/// A private temp dir for one benchmark run, removed on drop.
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
}
