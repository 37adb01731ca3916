//! Catalog loading and validation, in process: schema compile, YAML parse, schema validate, and
//! end to end, for the seed catalog and a generated 10,000-capability catalog. Then the
//! `aap --version` process against `/bin/true`, pairwise. Run: `cargo bench --bench catalog`.

#[path = "../tests/common/catgen.rs"]
mod catgen;
mod common;

use aap::catalog::{Catalog, compile_schema};
use common::*;
use std::hint::black_box;
use std::process::{Command, Stdio};

const SEED: &str = include_str!("../policies/agent-capabilities.yaml");

/// Prints the phases; returns the end-to-end median.
fn phases(label: &str, text: &str, n: usize) -> std::time::Duration {
    let compile = median(3, n, || {
        black_box(compile_schema());
    });
    let validator = compile_schema();
    let parse = median(3, n, || {
        black_box(aap::yaml::to_json(black_box(text)).unwrap());
    });
    let value = aap::yaml::to_json(text).unwrap();
    let validate = median(3, n, || {
        assert!(validator.is_valid(black_box(&value)));
    });
    let rest = median(3, n, || {
        black_box(Catalog::from_text_with(&validator, black_box(text), "bench").unwrap());
    });
    let total = median(3, n, || {
        black_box(Catalog::from_text(black_box(text), "bench").unwrap());
    });
    println!(
        "{label}: schema compile {} | YAML parse {} | schema validate {} | load with compiled schema {} | end to end (compile + parse + validate + semantic) {}",
        us(compile),
        us(parse),
        us(validate),
        us(rest),
        us(total)
    );
    total
}

fn main() {
    rss_probe_main();
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists; nothing to list.
    }
    let n = full_or_quick(500, 20);
    let seed = phases("seed catalog (5 capabilities)", SEED, n);
    Limit::Ms(1.0)
        .apply(Record::single(
            "seed catalog (5 capabilities), load end to end, in process",
            seed,
            true,
            n,
        ))
        .emit("catalog");
    let big = catgen::generated(10_000);
    println!("generated catalog: {} bytes", big.len());
    let n = full_or_quick(21, 3);
    let big = phases("10,000 capabilities", &big, n);
    Limit::Ms(150.0)
        .apply(Record::single(
            "10,000 capabilities, load end to end, in process",
            big,
            true,
            n,
        ))
        .emit("catalog");

    let aap = env!("CARGO_BIN_EXE_aap");
    let pairs = full_or_quick(300, 20);
    let mut version = Command::new(aap);
    version.arg("--version").stdout(Stdio::null());
    let mut truth = Command::new("/bin/true");
    let (a, t) = pairwise(pairs, &mut version, &mut truth);
    println!(
        "process `aap --version`: median {} vs /bin/true {} (ratio {:.2}x), {pairs} pairwise runs",
        ms(a),
        ms(t),
        a.as_secs_f64() / t.as_secs_f64()
    );
    Limit::Ms(3.0)
        .apply(
            Record::pair("`aap --version`", a, "`/bin/true`", t, pairs)
                .rss(peak_rss_kib(&version), peak_rss_kib(&truth)),
        )
        .emit("catalog");
    if let Some(h) = hyperfine("catalog", &[&version], pairs) {
        emit_hyperfine(
            "catalog",
            &["`aap --version`"],
            &h,
            pairs,
            &[Some(Limit::Ms(3.0))],
        );
    }
}
