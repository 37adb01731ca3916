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

fn phases(label: &str, text: &str, n: usize) {
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
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists; nothing to list.
    }
    phases("seed catalog (5 capabilities)", SEED, 500);
    let big = catgen::generated(10_000);
    println!("generated catalog: {} bytes", big.len());
    phases("10,000 capabilities", &big, 21);

    let aap = env!("CARGO_BIN_EXE_aap");
    let (a, t) = pairwise(
        300,
        Command::new(aap).arg("--version").stdout(Stdio::null()),
        &mut Command::new("/bin/true"),
    );
    println!(
        "process `aap --version`: median {} vs /bin/true {} (ratio {:.2}x), 300 pairwise runs",
        ms(a),
        ms(t),
        a.as_secs_f64() / t.as_secs_f64()
    );
}
