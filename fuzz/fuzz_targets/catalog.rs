//! `Catalog::from_text_with` over arbitrary text: the strict YAML loader (src/yaml.rs: duplicate
//! keys, non-string keys, alias limits), the JSON Schema check and its rendered messages (which
//! locate the bad node in the YAML text again), the typed model and the semantic checks.
#![no_main]

use aap::catalog::{Catalog, compile_schema};
use aap::error::Kind;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static SCHEMA: OnceLock<jsonschema::Validator> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Compiling the schema costs milliseconds; do it once per process, as the benchmarks do.
    let validator = SCHEMA.get_or_init(compile_schema);
    // The strict YAML loader on its own (also the first step of from_text).
    let _ = aap::yaml::to_json(text);
    match Catalog::from_text_with(validator, text, "fuzz.yaml") {
        Ok(cat) => {
            // Whatever loaded must answer the lookups the commands make.
            assert_eq!(cat.len(), cat.capabilities().len());
            for c in cat.capabilities() {
                assert!(cat.get(&c.id).is_some());
            }
            let _ = cat.for_agent("codex").count();
            let _ = cat.unknown("no-such-capability", Kind::NotFound);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
