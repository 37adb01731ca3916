//! The capability catalog: load, validate against the embedded JSON Schema, then check what the
//! schema cannot express. A capability that is not in a catalog that passed all of this does not
//! exist.

#![forbid(unsafe_code)]

mod model;
mod semantic;

pub use model::{Access, Backing, Capability, CatalogFile, HttpProxy, Inject, SecretRef, Tier};

use crate::error::{Error, Kind, Result, shell_quote};
use crate::fsutil::{self, ReadOpts};
use crate::yaml::{self, truncate};
use jsonschema::error::ValidationErrorKind;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The schema, compiled into the binary from `schema/`, its single source.
pub const SCHEMA_TEXT: &str = include_str!("../../schema/agent-capability.schema.json");

/// A catalog over 16 MiB is refused before parsing (10,000 capabilities take about 4 MiB).
pub const MAX_CATALOG_BYTES: u64 = 16 * 1024 * 1024;

/// At most this many problems are listed in one error.
const MAX_PROBLEMS: usize = 20;

/// A loaded, fully validated catalog.
#[derive(Debug)]
pub struct Catalog {
    origin: String,
    caps: Vec<Capability>,
    index: HashMap<String, usize>,
}

/// One thing wrong with a catalog, before it is given a position.
pub(crate) struct Problem {
    /// JSON pointer of the offending node.
    pub pointer: String,
    /// When the problem is a key of the mapping at `pointer` (an unknown key), that key.
    pub key: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

/// File name of the validated-catalog marker in `<state_dir>/cache/`.
pub const VALIDATED_MARKER: &str = "catalog-validated";

/// SHA-256 over the schema, this aap version and the catalog text, hex.
pub fn validation_digest(text: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [SCHEMA_TEXT, env!("CARGO_PKG_VERSION"), text] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Compile the embedded schema. Exposed for benchmarks, which time it separately.
pub fn compile_schema() -> jsonschema::Validator {
    let schema: Value =
        serde_json::from_str(SCHEMA_TEXT).expect("embedded schema is valid JSON (tested)");
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&schema)
        .expect("embedded schema compiles (tested)")
}

/// Best effort: whoever cannot write the state dir (an agent, usually) just pays the full
/// price of the next validation.
fn record_validated(state_dir: &Path, digest: &str) {
    // Never create the state dir itself here: whoever runs first would own it.
    if !state_dir.is_dir() {
        return;
    }
    let cache_dir = state_dir.join("cache");
    if std::fs::create_dir(&cache_dir).is_ok() || cache_dir.is_dir() {
        let _ = crate::state::write_atomic(&cache_dir, VALIDATED_MARKER, digest.as_bytes(), 0o644);
    }
}

impl Catalog {
    /// Read and validate the catalog at `path`.
    pub fn load(path: &Path) -> Result<Catalog> {
        let bytes = fsutil::read_file(path, ReadOpts::config_file("catalog", MAX_CATALOG_BYTES))?;
        let text = fsutil::utf8(bytes, "the catalog", path, Kind::Config)?;
        Self::from_text(&text, &path.display().to_string())
    }

    /// Load for the exec path. A full validation (schema + semantic) leaves a marker in
    /// `<state_dir>/cache/catalog-validated`: the SHA-256 of the schema, this aap version and the
    /// catalog bytes. When the marker matches, the JSON-Schema pass (whose compile dominates a
    /// cold process) is skipped; YAML parsing, the strict typed model (unknown keys refused) and
    /// every semantic check still run on every load. The marker is not secret; forging it needs
    /// write access to the operator-owned state dir, and it only ever skips the schema pass for
    /// bytes whose hash a full validation produced.
    pub fn load_cached(path: &Path, state_dir: &Path) -> Result<Catalog> {
        let bytes = fsutil::read_file(path, ReadOpts::config_file("catalog", MAX_CATALOG_BYTES))?;
        let text = fsutil::utf8(bytes, "the catalog", path, Kind::Config)?;
        let origin = path.display().to_string();
        let digest = validation_digest(&text);
        // Read like every state file: no symlinks, no FIFOs, at most 64 KiB.
        let known = crate::state::read_state_file(&state_dir.join("cache").join(VALIDATED_MARKER))
            .is_ok_and(|m| m == digest.as_bytes());
        if known {
            if let Ok(c) = Self::from_value_checked(&text, &origin, None) {
                return Ok(c);
            }
        }
        let cat = Self::from_text(&text, &origin)?;
        record_validated(state_dir, &digest);
        Ok(cat)
    }

    /// Validate the catalog at `path` in full (never trusting a marker), then record the
    /// validation in `<state_dir>/cache/` so that later loads of the same bytes skip the schema
    /// pass. `aap catalog check` (run by the operator, who can write the state dir) calls this;
    /// agents usually cannot write there.
    pub fn validate_and_record(path: &Path, state_dir: &Path) -> Result<Catalog> {
        let bytes = fsutil::read_file(path, ReadOpts::config_file("catalog", MAX_CATALOG_BYTES))?;
        let text = fsutil::utf8(bytes, "the catalog", path, Kind::Config)?;
        let cat = Self::from_text(&text, &path.display().to_string())?;
        record_validated(state_dir, &validation_digest(&text));
        Ok(cat)
    }

    /// Validate catalog text; `origin` names it in messages (a path, or a label).
    pub fn from_text(text: &str, origin: &str) -> Result<Catalog> {
        let validator = compile_schema();
        Self::from_text_with(&validator, text, origin)
    }

    /// As [`Catalog::from_text`] with a schema compiled beforehand.
    pub fn from_text_with(
        validator: &jsonschema::Validator,
        text: &str,
        origin: &str,
    ) -> Result<Catalog> {
        Self::from_value_checked(text, origin, Some(validator))
    }

    /// Parse, validate against the schema when `validator` is given, then the typed model and
    /// the semantic checks.
    fn from_value_checked(
        text: &str,
        origin: &str,
        validator: Option<&jsonschema::Validator>,
    ) -> Result<Catalog> {
        let check_cmd = format!("aap catalog check {}", shell_quote(origin));
        if text.trim().is_empty() {
            return Err(
                Error::config(format!("{origin}:1:1: the catalog is empty")).hint(format!(
                    "write the capabilities into it (format: docs/catalog.md; the seed catalog is policies/agent-capabilities.yaml of the source), then run: aap catalog check {}",
                    shell_quote(origin)
                )),
            );
        }
        let value = yaml::to_json(text).map_err(|e| {
            let pos = match (e.line, e.column) {
                (Some(l), Some(c)) => format!("{l}:{c}"),
                _ => "1:1".into(),
            };
            let hint = if e.message.contains("billion laughs") {
                format!("write the document out without anchors (&name) and aliases (*name), then run: {check_cmd}")
            } else {
                format!("fix the YAML at that line, then run: {check_cmd}")
            };
            Error::config(format!("{origin}:{pos}: invalid YAML: {}", e.message)).hint(hint)
        })?;
        let problems = validator
            .map(|v| schema_problems(v, &value))
            .unwrap_or_default();
        if !problems.is_empty() {
            return Err(render(problems, text, origin, &value, &check_cmd));
        }
        let file: CatalogFile = serde_json::from_value(value).map_err(|e| {
            Error::config(format!(
                "{origin}: the catalog passed the schema but does not fit aap's model: {e}"
            ))
            .hint("report this as a bug in aap, with the catalog attached")
        })?;
        let problems = semantic::check(&file);
        if !problems.is_empty() {
            let ids = serde_json::json!({ "capabilities": file.capabilities.iter().map(|c| serde_json::json!({ "id": c.id })).collect::<Vec<_>>() });
            return Err(render(problems, text, origin, &ids, &check_cmd));
        }
        let index = file
            .capabilities
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.clone(), i))
            .collect();
        Ok(Catalog {
            origin: origin.to_owned(),
            caps: file.capabilities,
            index,
        })
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }
    pub fn get(&self, id: &str) -> Option<&Capability> {
        self.index.get(id).map(|&i| &self.caps[i])
    }
    pub fn capabilities(&self) -> &[Capability] {
        &self.caps
    }
    pub fn len(&self) -> usize {
        self.caps.len()
    }
    pub fn is_empty(&self) -> bool {
        self.caps.is_empty()
    }
    /// Capabilities `agent` may be granted without break-glass.
    pub fn for_agent<'a>(&'a self, agent: &'a str) -> impl Iterator<Item = &'a Capability> + 'a {
        self.caps.iter().filter(move |c| c.allows_agent(agent))
    }

    /// The error for an id that is not here, with the nearest ids as a hint.
    pub fn unknown(&self, id: &str, kind: Kind) -> Error {
        let mut near: Vec<&str> = self
            .caps
            .iter()
            .map(|c| c.id.as_str())
            .filter(|c| strsim(c, id) <= 3 || c.contains(id) || id.contains(c))
            .collect();
        near.truncate(3);
        // The list of the catalog that was read, which need not be the configured one.
        let list = if std::path::Path::new(&self.origin).is_file() {
            format!("aap catalog list --catalog {}", shell_quote(&self.origin))
        } else {
            "aap catalog list".to_string()
        };
        let hint = if near.is_empty() {
            format!("list what exists: {list}")
        } else {
            format!("did you mean {}? List all: {list}", near.join(", "))
        };
        Error::new(
            kind,
            format!(
                "capability `{}` is not in the catalog {}",
                truncate(id, 80),
                self.origin
            ),
        )
        .hint(hint)
    }
}

/// Levenshtein distance, for "did you mean" hints.
fn strsim(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn schema_problems(validator: &jsonschema::Validator, value: &Value) -> Vec<Problem> {
    let mut out: Vec<Problem> = Vec::new();
    for err in validator.iter_errors(value) {
        if out.len() >= MAX_PROBLEMS {
            break;
        }
        let pointer = err.instance_path().as_str().to_owned();
        let last = pointer.rsplit('/').next().unwrap_or("").to_owned();
        let shown = |v: &Value| truncate(&v.to_string(), 80);
        let (key, message, hint): (Option<String>, String, Option<String>) = match err.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                let k = unexpected.first().cloned().unwrap_or_default();
                let list = unexpected
                    .iter()
                    .map(|u| format!("`{}`", truncate(u, 40)))
                    .collect::<Vec<_>>()
                    .join(", ");
                (Some(k), format!("unknown key {list}"), Some("remove it or fix its spelling (unknown keys are errors, so typos never pass silently)".into()))
            }
            ValidationErrorKind::Required { property } => (
                None,
                format!("missing required key {}", property),
                Some(format!("add {} here", property)),
            ),
            ValidationErrorKind::Enum { options } => (
                None,
                format!("{} is not one of {}", shown(err.instance()), options),
                None,
            ),
            ValidationErrorKind::Constant { expected_value } => (
                None,
                format!(
                    "{} must be {}",
                    if last.is_empty() { "value" } else { &last },
                    expected_value
                ),
                None,
            ),
            ValidationErrorKind::Pattern { .. } => {
                let what = match last.as_str() {
                    "max_ttl" | "key_lifetime" => "a duration such as 30m, 8h or 1h30m",
                    "id" | "identity" => "kebab-case (lower-case letters, digits, single hyphens)",
                    "name" => "an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
                    "path" | "secret_path" => "an absolute Infisical folder path starting with /",
                    "command" => "an absolute path",
                    "host" => "a host name",
                    _ if pointer.contains("/agents/") => "an agent name in kebab-case",
                    _ if pointer.contains("/hosts/") => "a host name",
                    _ if pointer.contains("/allowed_commands/") => {
                        "a program name or an absolute path"
                    }
                    _ => "the expected form",
                };
                (
                    None,
                    format!("{} is not {what}", shown(err.instance())),
                    None,
                )
            }
            ValidationErrorKind::Type { kind } => (
                None,
                format!(
                    "expected {}, found {}",
                    type_words(kind),
                    json_type(err.instance())
                ),
                None,
            ),
            ValidationErrorKind::MinItems { limit } => {
                (None, format!("needs at least {limit} item(s)"), None)
            }
            ValidationErrorKind::UniqueItems => (
                None,
                "has a repeated item".into(),
                Some("remove the duplicate".into()),
            ),
            _ => (None, truncate(&err.to_string(), 200), None),
        };
        out.push(Problem {
            pointer,
            key,
            message,
            hint,
        });
    }
    out
}

fn type_words(kind: &jsonschema::error::TypeKind) -> String {
    match kind {
        jsonschema::error::TypeKind::Single(t) => format!("{} {t}", article(&t.to_string())),
        jsonschema::error::TypeKind::Multiple(ts) => format!("one of {ts:?}"),
    }
}

/// "a" or "an", by sound: "an ssh-agent", "an infisical-token", "a secret", "an object".
pub(crate) fn article(word: &str) -> &'static str {
    let vowel_sound = word.starts_with(['a', 'e', 'i', 'o', 'u']) || word.starts_with("ssh");
    if vowel_sound { "an" } else { "a" }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing (null)",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Turn problems into one error: `FILE:LINE:COL: capability `id`: what` per problem.
fn render(
    problems: Vec<Problem>,
    text: &str,
    origin: &str,
    value: &Value,
    check_cmd: &str,
) -> Error {
    let mut placed: Vec<((usize, usize), &Problem)> = problems
        .iter()
        .map(|p| {
            let steps = yaml::pointer_steps(&p.pointer);
            (
                yaml::locate(text, &steps, p.key.as_deref()).unwrap_or((1, 1)),
                p,
            )
        })
        .collect();
    placed.sort_by_key(|(pos, _)| *pos);
    let mut lines = Vec::with_capacity(problems.len());
    let mut first_hint = None;
    for ((line, col), p) in placed {
        let steps = yaml::pointer_steps(&p.pointer);
        let cap_id = match (steps.first(), steps.get(1)) {
            (Some(s0), Some(s1)) if s0.0 == "capabilities" => {
                s1.0.parse::<usize>()
                    .ok()
                    .and_then(|i| value["capabilities"][i]["id"].as_str())
                    .map(|id| format!("capability `{}`: ", truncate(id, 64)))
            }
            _ => None,
        }
        .unwrap_or_default();
        let place = if p.pointer.is_empty() {
            String::new()
        } else {
            format!(" (at {})", p.pointer)
        };
        lines.push(format!(
            "{origin}:{line}:{col}: {cap_id}{}{place}",
            p.message
        ));
        if first_hint.is_none() {
            first_hint = p.hint.clone();
        }
    }
    let message = if lines.len() == 1 {
        lines.remove(0)
    } else {
        let more = if problems.len() >= MAX_PROBLEMS {
            " (showing the first 20)"
        } else {
            ""
        };
        format!(
            "the catalog has {} problems{more}:\n{}",
            lines.len(),
            lines.join("\n")
        )
    };
    let hint = match first_hint {
        Some(h) => format!("{h}; then run: {check_cmd}"),
        None => format!("fix the catalog as the message says, then run: {check_cmd}"),
    };
    Error::config(message).hint(hint)
}

/// Where a catalog comes from: the `--catalog` flag or the config.
pub fn resolve_path(flag: Option<PathBuf>) -> Result<PathBuf> {
    match flag {
        Some(p) => Ok(p),
        None => Ok(crate::config::Config::load()?.catalog.value.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_schema_compiles() {
        let _ = compile_schema();
    }

    #[test]
    fn edit_distance() {
        assert_eq!(strsim("forgejo-pat-read", "forgejo-pat-reed"), 1);
        assert_eq!(strsim("", "abc"), 3);
    }
}
