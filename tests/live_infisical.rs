//! The client tests against a real Infisical. They run only when these are set, and otherwise
//! say that they were skipped and why:
//!
//! - `INFISICAL_URL`, `INFISICAL_PROJECT_ID`
//! - `INFISICAL_UNIVERSAL_AUTH_CLIENT_ID`, `INFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET`
//! - `AAP_LIVE_SECRET`: `<env>:<path>:<KEY>=<expected value>`, one secret the identity can read
//! - optional `INFISICAL_CA_BUNDLE`: a PEM CA bundle for a private CA
//!
//! Run: `cargo test --test live_infisical` (with the variables set).

mod common;

use common::*;
use std::path::Path;

struct Live {
    url: String,
    project_id: String,
    client_id: String,
    client_secret: String,
    env: String,
    path: String,
    key: String,
    value: String,
    ca: Option<String>,
}

fn live(test: &str) -> Option<Live> {
    let names = [
        "INFISICAL_URL",
        "INFISICAL_PROJECT_ID",
        "INFISICAL_UNIVERSAL_AUTH_CLIENT_ID",
        "INFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET",
        "AAP_LIVE_SECRET",
    ];
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| std::env::var_os(n).is_none_or(|v| v.is_empty()))
        .collect();
    if !missing.is_empty() {
        // Not a failure even in the full run: no live server exists here. It is counted and
        // listed in scripts/test-all.sh's summary.
        skip(
            &format!("live_infisical::{test}"),
            &format!(
                "{} not set (a live Infisical; see tests/live_infisical.rs)",
                missing.join(", ")
            ),
        );
        return None;
    }
    let v = |n: &str| std::env::var(n).unwrap();
    let spec = v("AAP_LIVE_SECRET");
    let (reference, value) = spec
        .split_once('=')
        .expect("AAP_LIVE_SECRET is <env>:<path>:<KEY>=<value>");
    let parts: Vec<&str> = reference.splitn(3, ':').collect();
    assert_eq!(
        parts.len(),
        3,
        "AAP_LIVE_SECRET is <env>:<path>:<KEY>=<value>"
    );
    Some(Live {
        url: v("INFISICAL_URL"),
        project_id: v("INFISICAL_PROJECT_ID"),
        client_id: v("INFISICAL_UNIVERSAL_AUTH_CLIENT_ID"),
        client_secret: v("INFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET"),
        env: parts[0].into(),
        path: parts[1].into(),
        key: parts[2].into(),
        value: value.into(),
        ca: std::env::var("INFISICAL_CA_BUNDLE")
            .ok()
            .filter(|c| !c.is_empty()),
    })
}

impl Live {
    fn secrets(&self) -> Vec<String> {
        vec![self.value.clone(), self.client_secret.clone()]
    }

    fn config(&self, dir: &Path, project_id: &str) -> std::path::PathBuf {
        let ca = self
            .ca
            .as_ref()
            .map(|c| format!("  ca_bundle: {c}\n"))
            .unwrap_or_default();
        let p = dir.join("config.yaml");
        write(
            &p,
            format!(
                "infisical:\n  url: {}\n  project_id: {project_id}\n{ca}",
                self.url
            ),
        );
        p
    }

    /// `aap infisical check` with the identity from the environment; leak-checked.
    fn check(
        &self,
        secret: &str,
        client_id: &str,
        client_secret: &str,
        project: &str,
    ) -> std::process::Output {
        let dir = tempdir();
        let cfg = self.config(dir.path(), project);
        let o = run(cmd(AAP, dir.path())
            .env("AAP_CONFIG", &cfg)
            .env("AAP_LOG", "trace")
            .env("INFISICAL_UNIVERSAL_AUTH_CLIENT_ID", client_id)
            .env("INFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET", client_secret)
            .args(["infisical", "check", "--agent", "live", secret]));
        let text = format!("{}{}", stdout(&o), stderr(&o));
        assert_no_leak(&self.secrets(), &text, dir.path());
        o
    }

    fn ok(&self, secret: &str) -> std::process::Output {
        self.check(
            secret,
            &self.client_id,
            &self.client_secret,
            &self.project_id,
        )
    }

    fn reference(&self) -> String {
        format!("{}:{}:{}", self.env, self.path, self.key)
    }
}

#[test]
fn live_fetch_matches_the_expected_value() {
    let Some(l) = live("live_fetch_matches_the_expected_value") else {
        return;
    };
    let o = l.ok(&l.reference());
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("({} bytes)", l.value.len())),
        "{}",
        stdout(&o)
    );
    // In-process: the bytes themselves, and re-login after revocation.
    use aap::secret::SecretBytes;
    use aap::source::{Client, Identity};
    let mut yaml = format!("url: {}\nproject_id: {}\n", l.url, l.project_id);
    if let Some(ca) = &l.ca {
        yaml.push_str(&format!("ca_bundle: {ca}\n"));
    }
    let c = Client::new(&serde_yaml_ng::from_str(&yaml).unwrap()).unwrap();
    let id = Identity::new(
        "live",
        &l.client_id,
        SecretBytes::from_slice(l.client_secret.as_bytes()),
    );
    let r = aap::catalog::SecretRef {
        path: l.path.clone(),
        key: l.key.clone(),
        environment: Some(l.env.clone()),
    };
    let v = c.fetch(&id, &r, &l.env, &|_| {}).unwrap();
    assert!(v.expose() == l.value.as_bytes(), "value differs");
    // A separate (uncached) token, revoked, is refused with 77.
    let t = c.login(&id).unwrap();
    c.revoke(&t).unwrap();
    let e = c
        .get_secret(&t, &l.project_id, &l.env, &l.path, &l.key)
        .unwrap_err();
    assert_eq!(e.exit_code(), 77, "{}", e.message());
    // The cached token still works (one read), then is revoked with the cache.
    let v = c.fetch(&id, &r, &l.env, &|_| {}).unwrap();
    assert!(
        v.expose() == l.value.as_bytes(),
        "value differs on the cached token"
    );
    c.revoke_cached().unwrap();
    let v = c.fetch(&id, &r, &l.env, &|_| {}).unwrap();
    assert!(
        v.expose() == l.value.as_bytes(),
        "value differs after a fresh login"
    );
    c.revoke_cached().unwrap();
}

#[test]
fn live_wrong_client_secret_and_unknown_client_id_are_77() {
    let Some(l) = live("live_wrong_client_secret_and_unknown_client_id_are_77") else {
        return;
    };
    let o = l.check(
        &l.reference(),
        &l.client_id,
        "0000000000000000000000000000000000000000000000000000000000000000",
        &l.project_id,
    );
    assert_fails(&o, 77, "wrong client secret");
    let o = l.check(
        &l.reference(),
        "00000000-0000-0000-0000-000000000000",
        &l.client_secret,
        &l.project_id,
    );
    assert_fails(&o, 77, "no machine identity");
}

#[test]
fn live_unknown_secret_environment_path_and_project_are_78() {
    let Some(l) = live("live_unknown_secret_environment_path_and_project_are_78") else {
        return;
    };
    for (secret, needle) in [
        (
            format!("{}:{}:{}_AAP_NO_SUCH_KEY", l.env, l.path, l.key),
            "no secret",
        ),
        (
            format!("aap-no-such-env:{}:{}", l.path, l.key),
            "in environment aap-no-such-env of project",
        ),
        (
            format!("{}:/aap-no-such-folder:{}", l.env, l.key),
            "at path /aap-no-such-folder in environment",
        ),
    ] {
        let o = l.ok(&secret);
        assert_eq!(code(&o), 78, "{secret}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
    }
    let o = l.check(
        &l.reference(),
        &l.client_id,
        &l.client_secret,
        "00000000-0000-0000-0000-000000000000",
    );
    assert_fails(&o, 78, "does not exist");
}
