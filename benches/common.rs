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
    } else if quick() {
        n = n.min(20);
        println!("quick mode (AAP_BENCH_QUICK): smoke run of {n} rounds, numbers are rough");
    }
    Some(n)
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
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

/// `aap broker` for a benchmark's installation (`config`), listening on `dir/broker.sock`;
/// killed on drop.
pub fn broker(aap: &str, config: &std::path::Path, dir: &std::path::Path) -> aap::broker::Spawned {
    aap::broker::Spawned::start(
        std::path::Path::new(aap),
        config,
        &dir.join("broker.sock"),
        None,
    )
    .expect("start the broker")
}

/// A private temp dir for one benchmark run, removed on drop.
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
}

/// Quick (smoke) mode: `AAP_BENCH_QUICK=1` (what `benches/run.sh --quick` sets), or an
/// unoptimized build. Few rounds: for checking that the benchmarks run, not for numbers.
pub fn quick() -> bool {
    cfg!(debug_assertions) || std::env::var_os("AAP_BENCH_QUICK").is_some_and(|v| v != "0")
}

/// `n` in a full run, `q` in quick mode.
pub fn full_or_quick(n: usize, q: usize) -> usize {
    if quick() { q.min(n) } else { n }
}

/// Call first in `main`. When this benchmark binary was started by [`peak_rss_kib`] as a probe
/// (`--rss-probe PROGRAM ARGS...`), it runs that one command, prints the peak RSS (KiB) of its
/// waited-for descendants (`getrusage(RUSAGE_CHILDREN)`), and exits.
pub fn rss_probe_main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_none_or(|a| a != "--rss-probe") {
        return;
    }
    let st = std::process::Command::new(&args[2])
        .args(&args[3..])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("rss probe: run the command");
    assert!(st.success(), "rss probe: the command failed");
    println!(
        "{} {}",
        aap::sys::children_peak_rss_kib().expect("getrusage"),
        aap::sys::children_minor_faults().expect("getrusage")
    );
    std::process::exit(0);
}

/// Peak RSS (KiB) of one run of `c` (program, arguments, environment changes and directory;
/// not `env_clear`), measured in a fresh child of this benchmark that only runs it, so that
/// `RUSAGE_CHILDREN` sees that one command and what it waited for. `None` if it failed.
pub fn peak_rss_kib(c: &std::process::Command) -> Option<u64> {
    probe(c).map(|(rss, _)| rss)
}

/// Minor page faults of one run of `c` (and what it waited for), measured like [`peak_rss_kib`].
pub fn minor_faults(c: &std::process::Command) -> Option<u64> {
    probe(c).map(|(_, f)| f)
}

fn probe(c: &std::process::Command) -> Option<(u64, u64)> {
    let mut p = std::process::Command::new(std::env::current_exe().ok()?);
    p.arg("--rss-probe").arg(c.get_program()).args(c.get_args());
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => p.env(k, v),
            None => p.env_remove(k),
        };
    }
    if let Some(d) = c.get_current_dir() {
        p.current_dir(d);
    }
    let o = p.stderr(std::process::Stdio::inherit()).output().ok()?;
    if !o.status.success() {
        eprintln!("peak RSS probe failed for {:?}", c.get_program());
        return None;
    }
    let out = String::from_utf8_lossy(&o.stdout);
    let mut it = out.split_whitespace().map(|w| w.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

/// One measurement, for the machine-readable results that `benches/run.sh` turns into the
/// table in BENCHMARKS.md. Times are in `unit` ("ms" or "µs").
#[derive(Default)]
pub struct Record {
    pub name: String,
    pub median: f64,
    pub unit: &'static str,
    /// Shown after the median (e.g. a throughput).
    pub extra: Option<String>,
    pub baseline: Option<String>,
    pub baseline_median: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    pub baseline_peak_rss_kib: Option<u64>,
    pub target: Option<String>,
    /// `None`: reported only (no target).
    pub ok: Option<bool>,
    pub rounds: usize,
    /// "harness" (this repository's timing loop) or "hyperfine".
    pub tool: &'static str,
}

impl Record {
    /// A process timed against a baseline process in the same run (times in ms).
    pub fn pair(
        name: &str,
        median: Duration,
        baseline: &str,
        base: Duration,
        rounds: usize,
    ) -> Self {
        Record {
            name: name.into(),
            median: median.as_secs_f64() * 1e3,
            unit: "ms",
            baseline: Some(baseline.into()),
            baseline_median: Some(base.as_secs_f64() * 1e3),
            rounds,
            ..Default::default()
        }
    }

    /// An in-process measurement with no baseline, in µs (or ms when `ms`).
    pub fn single(name: &str, median: Duration, ms: bool, rounds: usize) -> Self {
        let (m, unit) = if ms {
            (median.as_secs_f64() * 1e3, "ms")
        } else {
            (median.as_secs_f64() * 1e6, "µs")
        };
        Record {
            name: name.into(),
            median: m,
            unit,
            rounds,
            ..Default::default()
        }
    }

    pub fn ratio(&self) -> Option<f64> {
        self.baseline_median.map(|b| self.median / b)
    }

    /// Target and verdict.
    pub fn target(mut self, target: &str, ok: bool) -> Self {
        self.target = Some(target.into());
        self.ok = Some(ok);
        self
    }

    pub fn rss(mut self, aap: Option<u64>, baseline: Option<u64>) -> Self {
        self.peak_rss_kib = aap;
        self.baseline_peak_rss_kib = baseline;
        self
    }

    pub fn extra(mut self, s: String) -> Self {
        self.extra = Some(s);
        self
    }

    /// Appends one JSON line to the file named by `AAP_BENCH_JSON` (or `--json PATH`), if any.
    pub fn emit(self, bench: &str) {
        let args: Vec<String> = std::env::args().collect();
        let path = args
            .iter()
            .position(|a| a == "--json")
            .and_then(|i| args.get(i + 1).cloned())
            .or_else(|| std::env::var("AAP_BENCH_JSON").ok())
            .filter(|p| !p.is_empty());
        let Some(path) = path else { return };
        let line = serde_json::json!({
            "bench": bench,
            "name": self.name,
            "median": self.median,
            "unit": self.unit,
            "extra": self.extra,
            "baseline": self.baseline,
            "baseline_median": self.baseline_median,
            "ratio": self.ratio(),
            "peak_rss_kib": self.peak_rss_kib,
            "baseline_peak_rss_kib": self.baseline_peak_rss_kib,
            "target": self.target,
            "ok": self.ok,
            "rounds": self.rounds,
            "tool": if self.tool.is_empty() { "harness" } else { self.tool },
            "quick": quick(),
        });
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open the AAP_BENCH_JSON file");
        writeln!(f, "{line}").expect("write the AAP_BENCH_JSON file");
    }
}

/// Cross-check with hyperfine, a public tool: runs `/bin/true` and each of `cmds` with
/// `hyperfine -N` (no shell), exporting its JSON to `AAP_BENCH_DIR` (or a temporary file), and
/// returns the medians (ms): first `/bin/true`'s, then each command's. `None` when hyperfine is
/// not installed or `AAP_BENCH_HYPERFINE=0`. The commands' environment changes and directory
/// are merged and given to hyperfine, which passes them on.
pub fn hyperfine(label: &str, cmds: &[&std::process::Command], runs: usize) -> Option<Vec<f64>> {
    if cfg!(debug_assertions) || std::env::var_os("AAP_BENCH_HYPERFINE").is_some_and(|v| v == "0") {
        return None;
    }
    let word = |s: &std::ffi::OsStr| {
        let s = s.to_string_lossy().into_owned();
        if s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=@+,".contains(c))
        {
            s
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    let dir = std::env::var_os("AAP_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let export = dir.join(format!("hyperfine-{label}.json"));
    let mut h = std::process::Command::new("hyperfine");
    h.args(["-N", "--style", "basic", "--warmup", "10", "--runs"])
        .arg(runs.to_string())
        .arg("--export-json")
        .arg(&export)
        .arg("/bin/true");
    for c in cmds {
        let mut line = word(c.get_program());
        for a in c.get_args() {
            line.push(' ');
            line.push_str(&word(a));
        }
        h.arg(line);
        for (k, v) in c.get_envs() {
            match v {
                Some(v) => h.env(k, v),
                None => h.env_remove(k),
            };
        }
        if let Some(d) = c.get_current_dir() {
            h.current_dir(d);
        }
    }
    match h.status() {
        Ok(st) if st.success() => {}
        Ok(st) => {
            eprintln!("hyperfine failed ({st}); skipping the cross-check");
            return None;
        }
        Err(e) => {
            eprintln!(
                "hyperfine not run ({e}); skipping the cross-check (apt-get install hyperfine)"
            );
            return None;
        }
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&export).ok()?).ok()?;
    v["results"]
        .as_array()?
        .iter()
        .map(|r| r["median"].as_f64().map(|s| s * 1e3))
        .collect()
}

/// A target: a ratio to the baseline, or an absolute median in ms (both upper limits).
#[derive(Clone, Copy)]
pub enum Limit {
    Ratio(f64),
    Ms(f64),
}

impl Limit {
    pub fn apply(self, r: Record) -> Record {
        match self {
            Limit::Ratio(m) => {
                let ok = r.ratio().is_some_and(|x| x <= m);
                r.target(&format!("≤ {m}× baseline"), ok)
            }
            Limit::Ms(m) => {
                let ok = r.median <= m;
                r.target(&format!("< {m} ms"), ok)
            }
        }
    }
}

/// Records hyperfine's medians (from [`hyperfine`]) for `names` (one per command), each
/// against hyperfine's `/bin/true`, with the targets in `limits` (one per command, if any).
pub fn emit_hyperfine(
    bench: &str,
    names: &[&str],
    medians: &[f64],
    runs: usize,
    limits: &[Option<Limit>],
) {
    for (i, name) in names.iter().enumerate() {
        let r = Record {
            name: format!("{name} (hyperfine)"),
            median: medians[i + 1],
            unit: "ms",
            baseline: Some("`/bin/true` (hyperfine)".into()),
            baseline_median: Some(medians[0]),
            rounds: runs,
            tool: "hyperfine",
            ..Default::default()
        };
        match limits.get(i).copied().flatten() {
            Some(l) => l.apply(r),
            None => r,
        }
        .emit(bench);
    }
}
