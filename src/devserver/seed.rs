//! The dev-server's world: one project, its environments, secrets and machine identities.

#![forbid(unsafe_code)]

use crate::error::{Error, Result, shell_quote};
use serde::Deserialize;
use std::path::Path;

/// The built-in seed (the world of the recordings); see docs/infisical.md.
pub const DEFAULT_SEED: &str = include_str!("default-seed.yaml");

#[derive(Clone, Debug)]
pub struct Seed {
    pub project_id: String,
    pub project_slug: String,
    /// Environment slugs; those named by secrets are added.
    pub environments: Vec<String>,
    pub secrets: Vec<SeedSecret>,
    pub identities: Vec<SeedIdentity>,
}

/// A seed file as written: with `extends: builtin`, it adds to (and overrides) the built-in
/// world instead of replacing it, so that one identity or secret of your own needs one entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedFile {
    #[serde(default)]
    extends: Option<String>,
    #[serde(default)]
    project_id: Option<String>,
    #[serde(default)]
    project_slug: Option<String>,
    #[serde(default)]
    environments: Vec<String>,
    #[serde(default)]
    secrets: Vec<SeedSecret>,
    #[serde(default)]
    identities: Vec<SeedIdentity>,
}

fn default_slug() -> String {
    "dev".into()
}

/// A secret. These are test values: the dev-server never holds real secrets, so `Debug` is fine.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedSecret {
    #[serde(default = "default_env")]
    pub environment: String,
    pub path: String,
    pub key: String,
    pub value: String,
}

fn default_env() -> String {
    "prod".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedIdentity {
    pub name: String,
    pub client_id: String,
    pub client_secret: String,
    /// Member of the project (default true). A non-member can log in but reads nothing.
    #[serde(default = "yes")]
    pub member: bool,
    /// What it may read: environment and path globs. Absent: everything (role viewer).
    /// Empty: nothing (role no-access).
    #[serde(default)]
    pub read: Option<Vec<ReadRule>>,
    #[serde(default = "thirty_days")]
    pub access_token_ttl: u64,
    #[serde(default = "thirty_days")]
    pub access_token_max_ttl: u64,
}

fn yes() -> bool {
    true
}
fn thirty_days() -> u64 {
    2_592_000
}

/// `environment` and `path` are globs (`*` within a segment, `**` across segments).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadRule {
    #[serde(default = "star")]
    pub environment: String,
    #[serde(default = "star_star")]
    pub path: String,
}

fn star() -> String {
    "*".into()
}
fn star_star() -> String {
    "/**".into()
}

impl Seed {
    pub fn default_seed() -> Seed {
        Self::parse(DEFAULT_SEED, "the built-in seed").expect("the built-in seed is valid")
    }

    pub fn load(path: &Path) -> Result<Seed> {
        let bytes = crate::fsutil::read_file(
            path,
            crate::fsutil::ReadOpts {
                what: "seed file",
                max_len: 4 * 1024 * 1024,
                follow_symlinks: true,
                check_mode: false,
                require_root: false,
                kind: crate::error::Kind::Config,
            },
        )?;
        let text = crate::fsutil::utf8(bytes, "the seed file", path, crate::error::Kind::Config)?;
        Self::parse(&text, &path.display().to_string()).map_err(|e| {
            let hint = format!(
                "fix {} (format: docs/infisical.md, \"Seed file\")",
                shell_quote(&path.to_string_lossy())
            );
            e.hint(hint)
        })
    }

    pub fn parse(text: &str, shown: &str) -> Result<Seed> {
        let file: SeedFile = serde_yaml_ng::from_str(text).map_err(|e| {
            let (l, c) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
            let mut msg = e.to_string();
            if let Some(i) = msg.find(" at line ") {
                msg.truncate(i);
            }
            Error::config(format!("{shown}:{l}:{c}: invalid seed: {msg}")).hint(format!("fix the seed at that line; the built-in one is shown in docs/infisical.md: aap dev-server --seed {shown}"))
        })?;
        let mut seed = match file.extends.as_deref() {
            None => Seed {
                project_id: file.project_id.ok_or_else(|| {
                    Error::config(format!("{shown}: invalid seed: missing field `project_id`"))
                        .hint(format!("add project_id: ..., or add to the built-in world with `extends: builtin`; then: aap dev-server --seed {shown}"))
                })?,
                project_slug: file.project_slug.unwrap_or_else(default_slug),
                environments: file.environments,
                secrets: file.secrets,
                identities: file.identities,
            },
            Some("builtin") => {
                let mut base = Self::parse(DEFAULT_SEED, "the built-in seed")?;
                if let Some(p) = file.project_id {
                    base.project_id = p;
                }
                if let Some(p) = file.project_slug {
                    base.project_slug = p;
                }
                for e in file.environments {
                    if !base.environments.contains(&e) {
                        base.environments.push(e);
                    }
                }
                for sec in file.secrets {
                    base.secrets.retain(|b| {
                        (b.environment.as_str(), b.path.as_str(), b.key.as_str())
                            != (sec.environment.as_str(), sec.path.as_str(), sec.key.as_str())
                    });
                    base.secrets.push(sec);
                }
                for id in file.identities {
                    base.identities.retain(|b| b.name != id.name);
                    base.identities.push(id);
                }
                base
            }
            Some(other) => {
                return Err(Error::config(format!(
                    "{shown}: invalid seed: extends: {other:?} is not a world this dev-server has (only `builtin`)"
                ))
                .hint(format!("write extends: builtin, or drop it; then: aap dev-server --seed {shown}")));
            }
        };
        for s in &seed.secrets {
            if !s.path.starts_with('/') || s.key.is_empty() {
                return Err(Error::config(format!(
                    "{shown}: invalid seed: secret {:?} at {:?}: paths start with / and keys are not empty",
                    s.key, s.path
                )).hint(format!("fix the seed, then: aap dev-server --seed {shown}")));
            }
        }
        for (i, a) in seed.identities.iter().enumerate() {
            if seed.identities[..i]
                .iter()
                .any(|b| b.client_id == a.client_id)
            {
                return Err(Error::config(format!(
                    "{shown}: invalid seed: two identities share the client id of {:?}",
                    a.name
                ))
                .hint(format!(
                    "give each identity its own client_id, then: aap dev-server --seed {shown}"
                )));
            }
        }
        for s in &seed.secrets {
            if !seed.environments.contains(&s.environment) {
                seed.environments.push(s.environment.clone());
            }
        }
        Ok(seed)
    }
}

/// Glob match: `**` matches anything (including `/`), `*` anything but `/`, `?` one non-`/`.
/// A pattern ending in `/**` also matches its prefix (`/a/**` matches `/a`).
pub fn glob(pattern: &str, text: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix("/**")
        && (text == prefix || (prefix.is_empty() && text == "/"))
    {
        return true;
    }
    glob_bytes(pattern.as_bytes(), text.as_bytes())
}

fn glob_bytes(p: &[u8], t: &[u8]) -> bool {
    match p.first() {
        None => t.is_empty(),
        Some(b'*') if p.get(1) == Some(&b'*') => {
            let rest = &p[2..];
            (0..=t.len()).any(|i| glob_bytes(rest, &t[i..]))
        }
        Some(b'*') => {
            let rest = &p[1..];
            for i in 0..=t.len() {
                if glob_bytes(rest, &t[i..]) {
                    return true;
                }
                if i < t.len() && t[i] == b'/' {
                    break;
                }
            }
            false
        }
        Some(b'?') => !t.is_empty() && t[0] != b'/' && glob_bytes(&p[1..], &t[1..]),
        Some(&c) => t.first() == Some(&c) && glob_bytes(&p[1..], &t[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_seed_is_the_recorded_world_plus_the_seed_catalogs_secrets() {
        let s = Seed::default_seed();
        assert_eq!(s.environments, vec!["prod"]);
        assert_eq!(s.secrets.len(), 9);
        let key = s
            .secrets
            .iter()
            .find(|x| x.key == "SSH_PRIVATE_KEY")
            .unwrap();
        assert!(key.value.ends_with("-----END OPENSSH PRIVATE KEY-----\n"));
        let names: Vec<_> = s.identities.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "reader",
                "noaccess",
                "outsider",
                "scoped",
                "shortttl",
                "app-reader"
            ]
        );
    }

    /// Every secret a capability of the seed catalog reads is in the built-in world, and the
    /// identity its infisical-token capability names exists and reads its path only.
    #[test]
    fn default_seed_serves_every_seed_catalog_capability() {
        use crate::catalog::{Backing, Catalog};
        let seed = Seed::default_seed();
        let cat = Catalog::from_text(crate::cmd::demo::SEED_CATALOG, "seed catalog").unwrap();
        let mut checked = 0;
        for cap in cat.capabilities() {
            match &cap.backing {
                Backing::InfisicalToken {
                    identity,
                    secret_path,
                    ..
                } => {
                    let id = seed
                        .identities
                        .iter()
                        .find(|i| &i.name == identity)
                        .unwrap_or_else(|| panic!("no identity {identity} for {}", cap.id));
                    let rules = id.read.as_ref().expect("a scoped identity");
                    assert!(
                        rules.iter().all(|r| glob(&r.path, secret_path)),
                        "{}",
                        cap.id
                    );
                    assert!(
                        !rules.iter().any(|r| glob(&r.path, "/forgejo")),
                        "{}",
                        cap.id
                    );
                }
                _ => {
                    let r = cap
                        .secret()
                        .unwrap_or_else(|| panic!("{}: no secret", cap.id));
                    assert!(
                        seed.secrets
                            .iter()
                            .any(|s| s.path == r.path && s.key == r.key),
                        "{}: the built-in world has no {}:{}",
                        cap.id,
                        r.path,
                        r.key
                    );
                }
            }
            checked += 1;
        }
        assert_eq!(checked, 5);
    }

    /// The built-in world holds the recorded world unchanged (the contract test replays the
    /// recordings against the fixture; everything else runs on the built-in seed).
    #[test]
    fn default_seed_contains_the_recorded_world_unchanged() {
        let rec = Seed::parse(
            include_str!("../../tests/fixtures/recorded-world-seed.yaml"),
            "recorded",
        )
        .unwrap();
        let s = Seed::default_seed();
        assert_eq!(rec.project_id, s.project_id);
        assert_eq!(rec.project_slug, s.project_slug);
        for r in &rec.secrets {
            assert!(
                s.secrets.iter().any(|x| x.path == r.path
                    && x.key == r.key
                    && x.value == r.value
                    && x.environment == r.environment),
                "{}:{}",
                r.path,
                r.key
            );
        }
        for r in &rec.identities {
            assert!(
                s.identities.iter().any(|x| x.name == r.name
                    && x.client_id == r.client_id
                    && x.client_secret == r.client_secret),
                "{}",
                r.name
            );
        }
        assert_eq!(rec.secrets.len(), 5);
    }

    #[test]
    fn a_seed_that_extends_the_builtin_world_adds_and_overrides() {
        let s = Seed::parse(
            "extends: builtin\nsecrets:\n  - {path: /app, key: DB_PASSWORD, value: mine}\n  - {environment: staging, path: /x, key: K, value: v}\nidentities:\n  - {name: ci, client_id: ci-id, client_secret: ci-secret, read: [{path: /x}]}\n",
            "s.yaml",
        )
        .unwrap();
        let b = Seed::default_seed();
        assert_eq!(s.project_id, b.project_id);
        assert_eq!(s.secrets.len(), b.secrets.len() + 1);
        let db: Vec<_> = s
            .secrets
            .iter()
            .filter(|x| x.key == "DB_PASSWORD")
            .collect();
        assert_eq!(db.len(), 1);
        assert_eq!(db[0].value, "mine");
        assert_eq!(s.identities.len(), b.identities.len() + 1);
        assert!(s.environments.contains(&"staging".to_string()));
        // A client id shared with a built-in identity is still refused.
        let e = Seed::parse(
            "extends: builtin\nidentities: [{name: x, client_id: 0e1d2c3b-0000-4000-8000-00000000read, client_secret: s}]\n",
            "s.yaml",
        )
        .unwrap_err();
        assert!(
            e.message().contains("share the client id"),
            "{}",
            e.message()
        );
        let e = Seed::parse("extends: other\n", "s.yaml").unwrap_err();
        assert_eq!(e.exit_code(), 78);
        let e = Seed::parse("secrets: []\n", "s.yaml").unwrap_err();
        assert!(e.message().contains("project_id"), "{}", e.message());
    }

    #[test]
    fn globs() {
        assert!(glob("/forgejo", "/forgejo"));
        assert!(!glob("/forgejo", "/forgejo/sub"));
        assert!(!glob("/forgejo", "/app"));
        assert!(glob("/forgejo/**", "/forgejo"));
        assert!(glob("/forgejo/**", "/forgejo/a/b"));
        assert!(glob("/**", "/"));
        assert!(glob("/**", "/x/y"));
        assert!(glob("/*", "/x"));
        assert!(!glob("/*", "/x/y"));
        assert!(glob("*", "prod"));
        assert!(glob("pr?d", "prod"));
    }

    #[test]
    fn bad_seeds_are_refused() {
        let e = Seed::parse(
            "project_id: p\nsecrets: [{path: x, key: K, value: v}]\n",
            "s.yaml",
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 78);
        let e = Seed::parse("project_id: p\nbogus: 1\n", "s.yaml").unwrap_err();
        assert!(
            e.message().starts_with("s.yaml:2:1: invalid seed"),
            "{}",
            e.message()
        );
    }
}
