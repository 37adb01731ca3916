//! `aap catalog` and `aap config` from the outside: exit codes and the exact stderr for valid
//! and hostile input.

mod common;

use common::*;
use std::path::Path;

const SEED: &str = include_str!("../policies/agent-capabilities.yaml");

/// Write `name` into `dir` and run `aap catalog check name` there.
fn check_file(dir: &Path, name: &str, contents: &[u8]) -> std::process::Output {
    write(&dir.join(name), contents);
    run(cmd(AAP, dir).args(["catalog", "check", name]))
}

/// Assert exit code 78, empty stdout, and exactly this stderr.
fn assert_config_error(o: &std::process::Output, expected_stderr: &str) {
    assert_eq!(stderr(o), expected_stderr);
    assert_eq!(code(o), 78, "stderr: {}", stderr(o));
    assert_eq!(stdout(o), "");
}

#[test]
fn seed_catalog_is_valid() {
    let o = run(cmd(AAP, &repo()).args(["catalog", "check", "policies/agent-capabilities.yaml"]));
    assert_eq!(stderr(&o), "");
    assert_eq!(
        stdout(&o),
        "policies/agent-capabilities.yaml: ok, 5 capabilities (1 critical)\n"
    );
    assert_eq!(code(&o), 0);
}

#[test]
fn design_contract_example_is_valid() {
    let o = run(cmd(AAP, &repo()).args(["catalog", "check", "tests/fixtures/design-example.yaml"]));
    assert_eq!(
        stdout(&o),
        "tests/fixtures/design-example.yaml: ok, 5 capabilities (0 critical)\n"
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn seed_has_the_five_designed_capabilities() {
    let o = run(cmd(AAP, &repo()).args([
        "catalog",
        "list",
        "--json",
        "--catalog",
        "policies/agent-capabilities.yaml",
    ]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let got: Vec<(&str, &str, &str)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap(),
                c["audit_tier"].as_str().unwrap(),
                c["backing"]["type"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("forgejo-pat-read", "low", "forgejo-pat"),
            ("ssh-rs2000-platform-host-agent", "high", "ssh-agent"),
            ("ssh-vps1000-iskra-readonly", "high", "ssh-agent"),
            ("infisical-secrets-read-scoped", "medium", "infisical-token"),
            ("break-glass-full-access", "critical", "ssh-agent"),
        ]
    );
}

#[test]
fn invalid_yaml() {
    let d = tempdir();
    let o = check_file(
        d.path(),
        "cat.yaml",
        b"schema_version: 1\ncapabilities: [\n",
    );
    assert_config_error(
        &o,
        "aap: error: cat.yaml:3:1: invalid YAML: did not find expected node content\n\
         aap: hint: fix the YAML at that line, then run: aap catalog check cat.yaml\n",
    );
}

#[test]
fn empty_file() {
    let d = tempdir();
    let o = check_file(d.path(), "cat.yaml", b"  \n\n");
    assert_config_error(
        &o,
        "aap: error: cat.yaml:1:1: the catalog is empty\n\
         aap: hint: write the capabilities into it (format: docs/catalog.md; the seed catalog is policies/agent-capabilities.yaml of the source), then run: aap catalog check cat.yaml\n",
    );
}

#[test]
fn non_utf8_bytes() {
    let d = tempdir();
    let o = check_file(
        d.path(),
        "cat.yaml",
        b"schema_version: 1\ncapabilities: []\n# caf\xe9\n",
    );
    assert_config_error(
        &o,
        "aap: error: cat.yaml:3:6: the catalog is not valid UTF-8 (bad byte at offset 40)\n\
         aap: hint: re-save it as UTF-8, e.g. from Latin-1: iconv -f LATIN1 -t UTF-8 cat.yaml > cat.yaml.utf8 && mv cat.yaml.utf8 cat.yaml\n",
    );
}

#[test]
fn alias_bomb_is_refused_quickly() {
    let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        let refs = vec![format!("*a{p}"); 10].join(", ");
        doc.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    let d = tempdir();
    let o = check_file(d.path(), "cat.yaml", doc.as_bytes());
    assert_config_error(
        &o,
        "aap: error: cat.yaml:1:1: invalid YAML: repetition limit exceeded: anchors and aliases expand beyond the allowed size (a \"billion laughs\" document?)\n\
         aap: hint: write the document out without anchors (&name) and aliases (*name), then run: aap catalog check cat.yaml\n",
    );
}

#[test]
fn fifty_megabyte_file() {
    let d = tempdir();
    let big = vec![b'#'; 50 * 1024 * 1024];
    let o = check_file(d.path(), "cat.yaml", &big);
    assert_config_error(
        &o,
        "aap: error: catalog cat.yaml is 52428800 bytes; the limit is 16777216 bytes\n\
         aap: hint: check that cat.yaml is the right file; a real catalog is far smaller\n",
    );
}

#[test]
fn directory_instead_of_file() {
    let d = tempdir();
    std::fs::create_dir(d.path().join("policies")).unwrap();
    let o = run(cmd(AAP, d.path()).args(["catalog", "check", "policies"]));
    assert_config_error(
        &o,
        "aap: error: catalog policies is a directory, not a file\n\
         aap: hint: name the file inside it, e.g. 'policies/…'\n",
    );
}

#[test]
fn dangling_symlink() {
    let d = tempdir();
    std::os::unix::fs::symlink("gone.yaml", d.path().join("cat.yaml")).unwrap();
    let o = run(cmd(AAP, d.path()).args(["catalog", "check", "cat.yaml"]));
    assert_config_error(
        &o,
        "aap: error: catalog cat.yaml is a dangling symlink (its target does not exist)\n\
         aap: hint: create it, or point to the right file: ls -l cat.yaml\n",
    );
}

#[test]
fn missing_file() {
    let d = tempdir();
    let o = run(cmd(AAP, d.path()).args(["catalog", "check", "nope.yaml"]));
    assert_config_error(
        &o,
        "aap: error: catalog nope.yaml does not exist\n\
         aap: hint: create it, or point to the right file: ls -l nope.yaml\n",
    );
}

#[test]
fn fifo_does_not_block() {
    let d = tempdir();
    let st = std::process::Command::new("mkfifo")
        .arg(d.path().join("cat.yaml"))
        .status()
        .unwrap();
    assert!(st.success());
    let o = run(cmd(AAP, d.path()).args(["catalog", "check", "cat.yaml"]));
    assert_config_error(
        &o,
        "aap: error: catalog cat.yaml is not a regular file (a FIFO, socket or device)\n\
         aap: hint: point to a regular file: ls -l cat.yaml\n",
    );
}

#[test]
fn world_writable_catalog_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempdir();
    write(&d.path().join("cat.yaml"), SEED);
    std::fs::set_permissions(
        d.path().join("cat.yaml"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let o = run(cmd(AAP, d.path()).args(["catalog", "check", "cat.yaml"]));
    assert_config_error(
        &o,
        "aap: error: catalog cat.yaml is writable by group or others (mode 666); it grants power, so it is refused\n\
         aap: hint: chmod go-w cat.yaml\n",
    );
}

#[test]
fn schema_errors_name_line_column_and_capability() {
    let d = tempdir();
    let doc = "schema_version: 1\n\
               capabilities:\n  \
               - id: Foo\n    \
               description: x\n    \
               audit_tier: hihg\n    \
               agents: [codex]\n    \
               max_ttl: 8h\n    \
               backing: {type: secret, secret: {path: /a, key: K}}\n    \
               inject: [{type: env, name: X, extra: 1}]\n    \
               colour: red\n";
    let o = check_file(d.path(), "cat.yaml", doc.as_bytes());
    assert_config_error(
        &o,
        "aap: error: the catalog has 4 problems:\n\
         aap:   cat.yaml:3:9: capability `Foo`: \"Foo\" is not kebab-case (lower-case letters, digits, single hyphens) (at /capabilities/0/id)\n\
         aap:   cat.yaml:5:17: capability `Foo`: \"hihg\" is not one of [\"low\",\"medium\",\"high\",\"critical\"] (at /capabilities/0/audit_tier)\n\
         aap:   cat.yaml:9:35: capability `Foo`: unknown key `extra` (at /capabilities/0/inject/0)\n\
         aap:   cat.yaml:10:5: capability `Foo`: unknown key `colour` (at /capabilities/0)\n\
         aap: hint: remove it or fix its spelling (unknown keys are errors, so typos never pass silently); then run: aap catalog check cat.yaml\n",
    );
}

#[test]
fn wrong_schema_version_and_missing_keys() {
    let d = tempdir();
    let o = check_file(
        d.path(),
        "cat.yaml",
        b"schema_version: 2\ncapabilities:\n  - id: x\n",
    );
    let err = stderr(&o);
    assert_eq!(code(&o), 78);
    assert!(
        err.contains("cat.yaml:1:17: schema_version must be 1 (at /schema_version)"),
        "{err}"
    );
    assert!(err.contains("cat.yaml:3:5: capability `x`: missing required key \"description\" (at /capabilities/0)"), "{err}");
}

#[test]
fn duplicate_ids() {
    let d = tempdir();
    let doc = SEED.replace("id: ssh-vps1000-iskra-readonly", "id: forgejo-pat-read");
    let o = check_file(d.path(), "cat.yaml", doc.as_bytes());
    assert_config_error(
        &o,
        "aap: error: cat.yaml:36:9: capability `forgejo-pat-read`: duplicate id; capability #1 already uses it (at /capabilities/2/id)\n\
         aap: hint: give each capability its own id; then run: aap catalog check cat.yaml\n",
    );
}

#[test]
fn duplicate_yaml_keys() {
    let d = tempdir();
    let doc = SEED.replacen("    max_ttl: 8h\n", "    max_ttl: 8h\n    max_ttl: 9h\n", 1);
    let o = check_file(d.path(), "cat.yaml", doc.as_bytes());
    assert_config_error(
        &o,
        "aap: error: cat.yaml:12:5: invalid YAML: capabilities[0]: duplicate key `max_ttl`\n\
         aap: hint: fix the YAML at that line, then run: aap catalog check cat.yaml\n",
    );
}

#[test]
fn critical_rules() {
    let d = tempdir();
    let doc = SEED.replace(
        "    agents: []\n    max_ttl: 1h\n",
        "    agents: [codex]\n    max_ttl: 2h\n",
    );
    let o = check_file(d.path(), "cat.yaml", doc.as_bytes());
    assert_config_error(
        &o,
        "aap: error: the catalog has 2 problems:\n\
         aap:   cat.yaml:70:13: capability `break-glass-full-access`: a critical capability may not be granted to agents by default, but it lists codex (at /capabilities/4/agents)\n\
         aap:   cat.yaml:71:14: capability `break-glass-full-access`: max_ttl 2h exceeds the critical tier's limit of 1h (at /capabilities/4/max_ttl)\n\
         aap: hint: set agents: [] (critical capabilities are granted only by the operator, with aap session start --break-glass); then run: aap catalog check cat.yaml\n",
    );
}

#[test]
fn ttl_bounds_for_other_tiers() {
    let d = tempdir();
    let doc = SEED.replacen("max_ttl: 8h", "max_ttl: 8d", 1);
    let o = check_file(d.path(), "cat.yaml", doc.as_bytes());
    assert_config_error(
        &o,
        "aap: error: cat.yaml:11:14: capability `forgejo-pat-read`: max_ttl 8d exceeds the low tier's limit of 7d (at /capabilities/0/max_ttl)\n\
         aap: hint: set max_ttl: 7d or less; then run: aap catalog check cat.yaml\n",
    );
}

#[test]
fn inject_must_fit_the_backing() {
    let d = tempdir();
    let doc = SEED.replacen(
        "      - type: ssh-agent\n\n  - id: ssh-vps1000",
        "      - type: env\n        name: SSH_KEY\n\n  - id: ssh-vps1000",
        1,
    );
    let o = check_file(d.path(), "cat.yaml", doc.as_bytes());
    assert_config_error(
        &o,
        "aap: error: cat.yaml:34:9: capability `ssh-rs2000-platform-host-agent`: inject type env does not fit an ssh-agent backing (at /capabilities/1/inject/0)\n\
         aap: hint: use ssh-agent only (a key never goes into env or files); then run: aap catalog check cat.yaml\n",
    );
}

#[test]
fn http_proxy_fits_forgejo_pat_with_access() {
    let d = tempdir();
    // The seed's forgejo-pat-read is http-proxy, read; the same as write.
    let o = run(cmd(AAP, &repo()).args([
        "catalog",
        "show",
        "forgejo-pat-read",
        "--catalog",
        "policies/agent-capabilities.yaml",
    ]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o)
            .contains("http-proxy, read (the broker adds the token; it never reaches the child)"),
        "{}",
        stdout(&o)
    );
    let doc = SEED.replacen("    access: read\n", "    access: write\n", 1);
    assert_ne!(doc, SEED);
    let o = check_file(d.path(), "cat.yaml", doc.as_bytes());
    assert_eq!(stderr(&o), "");
    assert_eq!(code(&o), 0);
    let o = run(cmd(AAP, d.path()).args([
        "catalog",
        "show",
        "forgejo-pat-read",
        "--catalog",
        "cat.yaml",
    ]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o)
            .contains("http-proxy, write (the broker adds the token; it never reaches the child)"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn http_proxy_only_for_forgejo_pat_and_access_only_with_it() {
    let d = tempdir();
    let doc = SEED.replacen(
        "      - type: ssh-agent\n\n  - id: ssh-vps1000",
        "      - type: http-proxy\n\n  - id: ssh-vps1000",
        1,
    );
    let o = check_file(d.path(), "cat.yaml", doc.as_bytes());
    assert_config_error(
        &o,
        "aap: error: cat.yaml:34:9: capability `ssh-rs2000-platform-host-agent`: inject type http-proxy does not fit an ssh-agent backing (at /capabilities/1/inject/0)\n\
         aap: hint: use ssh-agent only (a key never goes into env or files); then run: aap catalog check cat.yaml\n",
    );
    let doc = SEED.replacen(
        "      - type: http-proxy\n",
        "      - type: git-credential\n",
        1,
    );
    assert_ne!(doc, SEED);
    let o = check_file(d.path(), "cat2.yaml", doc.as_bytes());
    assert_eq!(code(&o), 78, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("access is enforced only by the http-proxy inject form"),
        "{}",
        stderr(&o)
    );
    let doc = SEED.replacen("    access: read\n", "    access: all\n", 1);
    assert_ne!(doc, SEED);
    let o = check_file(d.path(), "cat3.yaml", doc.as_bytes());
    assert_eq!(code(&o), 78, "{}", stderr(&o));
    assert!(stderr(&o).contains("access"), "{}", stderr(&o));
}

#[test]
fn ssh_agent_needs_hosts() {
    let d = tempdir();
    let doc = SEED.replacen("hosts: [rs2000.example.org]", "hosts: []", 1);
    let o = check_file(d.path(), "cat.yaml", doc.as_bytes());
    assert_config_error(
        &o,
        "aap: error: cat.yaml:32:14: capability `ssh-rs2000-platform-host-agent`: needs at least 1 item(s) (at /capabilities/1/backing/hosts)\n\
         aap: hint: fix the catalog as the message says, then run: aap catalog check cat.yaml\n",
    );
}

const WRAPPED: &str = "schema_version: 1
capabilities:
  - id: restart-web
    description: Restart the web unit
    audit_tier: high
    agents: [codex]
    max_ttl: 1h
    backing:
      type: wrapped-command
      command: /usr/bin/../bin/systemctl
      args: [\"restart\", \"^web(\\\\.service$\"]
";

#[test]
fn wrapped_command_paths_and_patterns() {
    let d = tempdir();
    let o = check_file(d.path(), "cat.yaml", WRAPPED.as_bytes());
    let err = stderr(&o);
    assert_eq!(code(&o), 78, "{err}");
    assert!(
        err.starts_with("aap: error: the catalog has 3 problems:\n"),
        "{err}"
    );
    assert!(err.contains("cat.yaml:10:16: capability `restart-web`: command `/usr/bin/../bin/systemctl` must be an absolute path without `.`, `..` or `//` (at /capabilities/0/backing/command)\n"), "{err}");
    assert!(err.contains("cat.yaml:11:14: capability `restart-web`: argument pattern #1 is not anchored (it must start with ^ and end with $) (at /capabilities/0/backing/args/0)\n"), "{err}");
    assert!(
        err.contains(
            "cat.yaml:11:25: capability `restart-web`: argument pattern #2 is not a valid regex:"
        ),
        "{err}"
    );
}

#[test]
fn reserved_injection_variables() {
    let d = tempdir();
    let doc = SEED.replace("name: INFISICAL_TOKEN", "name: LD_PRELOAD");
    assert_ne!(doc, SEED);
    let o = check_file(d.path(), "cat.yaml", doc.as_bytes());
    assert_config_error(
        &o,
        "aap: error: cat.yaml:62:15: capability `infisical-secrets-read-scoped`: variable LD_PRELOAD is reserved: it changes how the child runs (at /capabilities/3/inject/0/name)\n\
         aap: hint: choose a name of your own, e.g. FORGEJO_TOKEN; then run: aap catalog check cat.yaml\n",
    );
}

#[test]
fn ten_thousand_capabilities_load_and_validate() {
    let d = tempdir();
    let o = check_file(d.path(), "big.yaml", catgen::generated(10_000).as_bytes());
    assert_eq!(
        stdout(&o),
        "big.yaml: ok, 10000 capabilities (0 critical)\n",
        "{}",
        stderr(&o)
    );
    assert_eq!(code(&o), 0);
    let o = run(cmd(AAP, d.path()).args([
        "catalog",
        "list",
        "--json",
        "--agent",
        "claude",
        "--catalog",
        "big.yaml",
    ]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 10_000);
    assert_eq!(v[9_999]["id"], "cap-9999");
    assert_eq!(v[9_999]["inject"][0]["name"], "DB_FILE_9999");
}

#[test]
fn ten_thousand_capabilities_with_one_error_at_the_end() {
    let d = tempdir();
    let doc = catgen::generated(10_000).replace("  - id: cap-9999\n", "  - id: cap-0\n");
    let line = doc.lines().position(|l| l == "  - id: cap-0").unwrap();
    let last = doc
        .lines()
        .enumerate()
        .filter(|(_, l)| *l == "  - id: cap-0")
        .map(|(i, _)| i + 1)
        .last()
        .unwrap();
    assert_ne!(line + 1, last);
    let o = check_file(d.path(), "big.yaml", doc.as_bytes());
    assert_config_error(
        &o,
        &format!(
            "aap: error: big.yaml:{last}:9: capability `cap-0`: duplicate id; capability #1 already uses it (at /capabilities/9999/id)\n\
             aap: hint: give each capability its own id; then run: aap catalog check big.yaml\n"
        ),
    );
}

#[test]
fn list_for_an_agent_and_show() {
    let o = run(cmd(AAP, &repo()).args([
        "catalog",
        "list",
        "--agent",
        "claude",
        "--catalog",
        "policies/agent-capabilities.yaml",
    ]));
    assert_eq!(code(&o), 0);
    let ids: Vec<String> = stdout(&o)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["forgejo-pat-read", "ssh-vps1000-iskra-readonly"]);

    let o = run(cmd(AAP, &repo()).args([
        "catalog",
        "show",
        "ssh-vps1000-iskra-readonly",
        "--catalog",
        "policies/agent-capabilities.yaml",
    ]));
    assert_eq!(code(&o), 0);
    let out = stdout(&o);
    assert!(out.contains("audit tier:      high\n"), "{out}");
    assert!(
        out.contains("  hosts:         vps1000.example.org\n"),
        "{out}"
    );
    assert!(
        out.contains("inject:          ssh-agent (the broker signs; the key never leaves it)\n"),
        "{out}"
    );
    assert!(out.contains("  forwarding:    refused\n"), "{out}");

    let o = run(cmd(AAP, &repo()).args([
        "catalog",
        "show",
        "forgejo-pat-read",
        "--json",
        "--catalog",
        "policies/agent-capabilities.yaml",
    ]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["backing"]["secret"]["key"], "FORGEJO_PAT_READ");
    assert_eq!(v["max_ttl"], "8h");
}

#[test]
fn show_unknown_id_suggests_the_nearest() {
    let o = run(cmd(AAP, &repo()).args([
        "catalog",
        "show",
        "forgejo-pat-reed",
        "--catalog",
        "policies/agent-capabilities.yaml",
    ]));
    assert_config_error(
        &o,
        "aap: error: capability `forgejo-pat-reed` is not in the catalog policies/agent-capabilities.yaml\n\
         aap: hint: did you mean forgejo-pat-read? List all: aap catalog list --catalog policies/agent-capabilities.yaml\n",
    );
}

#[test]
fn catalog_comes_from_the_config() {
    let d = tempdir();
    write(&d.path().join("etc/cat.yaml"), SEED);
    write(&d.path().join("etc/config.yaml"), "catalog: cat.yaml\n");
    let o = run(cmd(AAP, d.path())
        .env("AAP_CONFIG", d.path().join("etc/config.yaml"))
        .args(["catalog", "check"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!(
            "{}: ok, 5 capabilities (1 critical)\n",
            d.path().join("etc/cat.yaml").display()
        )
    );
}

#[test]
fn config_show_names_every_source() {
    let d = tempdir();
    let cfg = d.path().join("config.yaml");
    write(
        &cfg,
        "catalog: /srv/cat.yaml\ninfisical:\n  url: https://infisical.example.org\n  project_id: p1\nagents:\n  codex:\n    uid: 1001\n    client_id_file: ids/codex/id\n    client_secret_file: ids/codex/secret\n",
    );
    let o = run(cmd(AAP, d.path())
        .env("AAP_CONFIG", &cfg)
        .env("INFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET", "s3cr3t-value")
        .args(["config", "show"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    let c = cfg.display();
    assert!(
        out.starts_with(&format!("# config file: {c} (named by $AAP_CONFIG)\n")),
        "{out}"
    );
    assert!(
        out.contains(&format!("catalog = /srv/cat.yaml  # {c}\n")),
        "{out}"
    );
    assert!(
        out.contains("state_dir = /var/lib/aap  # built-in default\n"),
        "{out}"
    );
    // Each value the file sets is the file's; each it leaves out is the default's.
    for want in [
        format!("infisical.url = https://infisical.example.org  # {c}\n"),
        format!("agents.codex.uid = 1001  # {c}\n"),
        "infisical.environment = prod  # built-in default\n".to_string(),
        "infisical.timeout = 10s  # built-in default\n".to_string(),
        "infisical.connect_timeout = 3s  # built-in default\n".to_string(),
        "infisical.ca_bundle = (unset)  # built-in default\n".to_string(),
        "broker.max_connections_per_uid = 1024  # built-in default\n".to_string(),
        "requests.ttl = 1h  # built-in default\n".to_string(),
        "secure_path = /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin  # built-in default\n".to_string(),
        "operator.allowed_signers = (unset)  # built-in default\n".to_string(),
    ] {
        assert!(out.contains(&want), "missing {want:?} in:\n{out}");
    }
    assert!(
        out.contains(&format!(
            "agents.codex.client_id_file = {}  # {c}\n",
            d.path().join("ids/codex/id").display()
        )),
        "{out}"
    );
    assert!(out.contains("env.INFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET = (set; value not shown)  # $INFISICAL_UNIVERSAL_AUTH_CLIENT_SECRET\n"), "{out}");
    assert!(!out.contains("s3cr3t-value"));
}

#[test]
fn config_found_under_xdg_and_defaults_without_any() {
    let d = tempdir();
    let o = run(cmd(AAP, d.path()).args(["config", "show"]));
    assert_eq!(code(&o), 0);
    // The test machine may have /etc/aap/config.yaml; only assert the no-file case when it does not.
    if !Path::new("/etc/aap/config.yaml").exists() {
        assert!(
            stdout(&o).starts_with("# config file: none found"),
            "{}",
            stdout(&o)
        );
    } else {
        skip(
            "config_found_under_xdg_and_defaults_without_any (the no-config half)",
            "/etc/aap/config.yaml exists on this machine",
        );
    }
    write(
        &d.path().join(".config/aap/config.yaml"),
        "state_dir: /tmp/x\n",
    );
    let o = run(cmd(AAP, d.path()).args(["config", "show"]));
    let out = stdout(&o);
    assert!(
        out.starts_with(&format!(
            "# config file: {}/.config/aap/config.yaml (found under $XDG_CONFIG_HOME)\n",
            d.path().display()
        )),
        "{out}"
    );
    assert!(out.contains("state_dir = /tmp/x"), "{out}");
}

#[test]
fn config_errors() {
    let d = tempdir();
    let cfg = d.path().join("config.yaml");
    write(&cfg, "catalog: /x\nstate_dri: /y\n");
    let o = run(cmd(AAP, d.path())
        .env("AAP_CONFIG", "config.yaml")
        .args(["config", "show"]));
    let err = stderr(&o);
    assert_eq!(code(&o), 78, "{err}");
    assert!(err.starts_with("aap: error: config.yaml:2:1: invalid config: unknown field `state_dri`, expected one of `catalog`, `state_dir`"), "{err}");
    assert!(
        err.contains("aap: hint: aap config show  # after fixing config.yaml\n"),
        "{err}"
    );

    let o = run(cmd(AAP, d.path())
        .env("AAP_CONFIG", "missing.yaml")
        .args(["config", "show"]));
    assert_config_error(
        &o,
        "aap: error: config missing.yaml does not exist\n\
         aap: hint: create it, or point to the right file: ls -l missing.yaml (it was named by $AAP_CONFIG; unset it to use the default search order)\n",
    );
}

#[test]
fn version_and_usage() {
    let o = run(cmd(AAP, &repo()).arg("--version"));
    assert_eq!(code(&o), 0);
    assert_eq!(stdout(&o), format!("aap {}\n", env!("CARGO_PKG_VERSION")));
    let o = run(cmd(AAP, &repo()).args(["catalog", "frobnicate"]));
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("unrecognized subcommand 'frobnicate'"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn the_operator_guide_config_example_is_valid() {
    let guide = std::fs::read_to_string(repo().join("docs/operator-guide.md")).unwrap();
    let start = guide
        .find("```yaml\ncatalog: ")
        .expect("the operator guide has a config example")
        + "```yaml\n".len();
    let end = start + guide[start..].find("```").unwrap();
    let example = &guide[start..end];
    // As written, and with every commented-out option ("# key: value") switched on.
    let uncommented: String = example
        .lines()
        .map(|l| {
            let body = l.trim_start();
            let indent = &l[..l.len() - body.len()];
            match body.strip_prefix("# ") {
                Some(rest)
                    if rest
                        .trim_start()
                        .split_once(':')
                        .is_some_and(|(k, _)| !k.contains(' ')) =>
                {
                    format!("{indent}{rest}\n")
                }
                _ => format!("{l}\n"),
            }
        })
        .collect();
    for (text, want) in [
        (example.to_string(), "agents.codex.uid = 1001"),
        (uncommented, "notify.timeout = 10s"),
    ] {
        let d = tempdir();
        write(&d.path().join("config.yaml"), &text);
        let o = run(cmd(AAP, d.path())
            .env("AAP_CONFIG", d.path().join("config.yaml"))
            .args(["config", "show"]));
        assert_eq!(code(&o), 0, "{}\n{text}", stderr(&o));
        assert!(stdout(&o).contains(want), "{}", stdout(&o));
    }
}

#[test]
fn the_readme_config_example_is_valid() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("```yaml\ncatalog: ")
        .expect("the README has a config example")
        + "```yaml\n".len();
    let end = start + readme[start..].find("```").unwrap();
    let d = tempdir();
    write(&d.path().join("config.yaml"), &readme[start..end]);
    let o = run(cmd(AAP, d.path())
        .env("AAP_CONFIG", d.path().join("config.yaml"))
        .args(["config", "show"]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("agents.codex.uid = 1001"),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains("notify.timeout = 10s"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_run_as_user_that_does_not_exist_is_refused_at_check_time() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.yaml");
    std::fs::write(
        &f,
        "schema_version: 1
capabilities:
  - id: restart-web
    description: restart
    audit_tier: high
    agents: [codex]
    max_ttl: 1h
    backing: { type: wrapped-command, command: /bin/true, args: [], run_as: no-such-user-aap }
",
    )
    .unwrap();
    let o = run(cmd(AAP, &repo()).args(["catalog", "check", f.to_str().unwrap()]));
    assert_eq!(code(&o), 78, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("runs as user `no-such-user-aap`, which has no passwd entry"),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("hint: create the user"),
        "{}",
        stderr(&o)
    );
    let ok = std::fs::read_to_string(&f)
        .unwrap()
        .replace("no-such-user-aap", "daemon");
    std::fs::write(&f, ok).unwrap();
    let o = run(cmd(AAP, &repo()).args(["catalog", "check", f.to_str().unwrap()]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}
