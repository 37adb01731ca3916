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
