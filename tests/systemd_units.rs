//! The shipped systemd units (`contrib/systemd/`): `systemd-analyze security --offline=true`
//! must rate `aap-broker.service` at an overall exposure of at most 2.0, `systemd-analyze verify`
//! must accept both units (and the service with the run_as drop-in) without a single warning, and
//! the units must name the same paths as the config's defaults.
//!
//! Needs no running systemd. Skips, saying so, only when `systemd-analyze` is not installed
//! (`apt-get install systemd`); with `AAP_TEST_FULL=1` that is a failure instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SERVICE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/contrib/systemd/aap-broker.service"
);
const SOCKET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/contrib/systemd/aap-broker.socket"
);
const RUN_AS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/contrib/systemd/run-as-other-users.conf"
);

/// The bar from issue 11: `systemd-analyze security` calls 2.0 and below "OK".
const MAX_EXPOSURE: f64 = 2.0;

/// DESIGN.md's default for `broker.socket`, used until the config itself carries the key.
const DESIGN_BROKER_SOCKET: &str = "/run/aap/broker.sock";

fn full() -> bool {
    std::env::var_os("AAP_TEST_FULL").is_some_and(|v| v == "1")
}

/// `systemd-analyze ARGS`, or `None` (after printing why) when it is not installed and this is
/// not a full run.
fn analyze(args: &[&str], env: &[(&str, &Path)]) -> Option<Output> {
    let mut cmd = Command::new("systemd-analyze");
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    match cmd.output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                !full(),
                "systemd-analyze is not installed, and AAP_TEST_FULL=1 forbids skipping (apt-get install systemd)"
            );
            eprintln!(
                "SKIPPED: systemd-analyze is not installed (apt-get install systemd; scripts/test-all.sh does it)"
            );
            None
        }
        Err(e) => panic!("cannot run systemd-analyze: {e}"),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The number in `→ Overall exposure level for NAME: 1.4 OK 🙂`.
fn overall_exposure(stdout: &str) -> Option<f64> {
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let (_, rest) = line.rsplit_once(": ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// `systemd-analyze security --offline=true UNIT`: the overall exposure and the full table.
fn exposure(unit: &Path) -> Option<(f64, String)> {
    let unit = unit.to_str().expect("UTF-8 path");
    let out = analyze(&["security", "--offline=true", "--no-pager", unit], &[])?;
    let stdout = text(&out.stdout);
    let score = overall_exposure(&stdout).unwrap_or_else(|| {
        panic!(
            "no overall exposure level in the output of systemd-analyze security {unit} ({}):\n{stdout}\n{}",
            out.status,
            text(&out.stderr)
        )
    });
    Some((score, stdout))
}

/// `(section, key, value)` of every assignment in a unit file, in order.
fn assignments(unit: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not an assignment: {line:?}"));
        out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
    }
    out
}

/// Every value of `section.key`.
fn values(unit: &str, section: &str, key: &str) -> Vec<String> {
    assignments(unit)
        .into_iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v)
        .collect()
}

/// The one value of `section.key`; fails when it is missing or set more than once.
fn value(unit: &str, section: &str, key: &str) -> String {
    match values(unit, section, key).as_slice() {
        [v] => v.clone(),
        other => panic!("expected exactly one {key}= in [{section}], found {other:?}"),
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

#[test]
fn the_service_scores_at_most_2_0_in_systemd_analyze_security() {
    let Some((score, table)) = exposure(Path::new(SERVICE)) else {
        return;
    };
    eprintln!("systemd-analyze security --offline=true {SERVICE}: overall exposure {score}");
    assert!(
        score <= MAX_EXPOSURE,
        "aap-broker.service is rated {score}, above {MAX_EXPOSURE:.1}; restore the hardening (docs/systemd.md):\n{table}"
    );

    // The parse is not vacuous: an unhardened service with the same ExecStart rates far above
    // the bar, read by the same code.
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("aap-broker.service");
    std::fs::write(
        &bare,
        "[Service]\nExecStart=/usr/local/bin/aap broker\nUser=aap\n",
    )
    .unwrap();
    let (bare_score, _) = exposure(&bare).expect("systemd-analyze ran a moment ago");
    assert!(
        bare_score > MAX_EXPOSURE && bare_score > score,
        "an unhardened unit rated {bare_score}: the score is not being read right"
    );

    // The run_as drop-in (docs/systemd.md) takes effect when merged: it grants CAP_SETUID and
    // CAP_SETGID, so the rating must rise. Reported, not bounded: it is the operator's choice.
    let merged = dir.path().join("merged").join("aap-broker.service");
    std::fs::create_dir(merged.parent().unwrap()).unwrap();
    std::fs::write(&merged, read(SERVICE) + &read(RUN_AS)).unwrap();
    let (run_as_score, run_as_table) = exposure(&merged).expect("systemd-analyze ran");
    eprintln!("with run-as-other-users.conf: overall exposure {run_as_score}");
    assert!(
        run_as_score > score
            && run_as_table.contains("Service process receives ambient capabilities"),
        "the run_as drop-in changed nothing ({run_as_score} vs {score}):\n{run_as_table}"
    );
}

/// A temp copy of the units whose ExecStart is the binary under test, so that `verify` can check
/// that the command exists (it does not at /usr/local/bin/aap on a build machine).
fn units_for_verify(dir: &Path, with_run_as: bool) -> (PathBuf, PathBuf) {
    let aap = env!("CARGO_BIN_EXE_aap");
    let service = read(SERVICE);
    assert_eq!(
        value(&service, "Service", "ExecStart"),
        "/usr/local/bin/aap broker",
        "the ExecStart the docs install"
    );
    let mut service = service.replace(
        "ExecStart=/usr/local/bin/aap broker",
        &format!("ExecStart={aap} broker"),
    );
    if with_run_as {
        service += &read(RUN_AS);
    }
    std::fs::create_dir_all(dir).unwrap();
    let (svc, sock) = (
        dir.join("aap-broker.service"),
        dir.join("aap-broker.socket"),
    );
    std::fs::write(&svc, service).unwrap();
    std::fs::write(&sock, read(SOCKET)).unwrap();
    (svc, sock)
}

#[test]
fn systemd_analyze_verify_accepts_both_units_without_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    // Documentation=man:aap(1): verify runs `man` on it. Point MANPATH at the pages this
    // binary generates, so the reference is checked against what `aap man` installs.
    let mandir = tmp.path().join("man");
    let man_flag = if which("man").is_some() {
        std::fs::create_dir_all(mandir.join("man1")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_aap"))
            .arg("man")
            .arg("--dir")
            .arg(mandir.join("man1"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "aap man --dir failed: {}",
            text(&out.stderr)
        );
        "--man=yes"
    } else {
        assert!(
            !full(),
            "man is not installed, and AAP_TEST_FULL=1 forbids skipping (apt-get install man-db)"
        );
        eprintln!(
            "SKIPPED the Documentation=man:aap(1) check: man is not installed (apt-get install man-db)"
        );
        "--man=no"
    };
    for with_run_as in [false, true] {
        let dir = tmp
            .path()
            .join(if with_run_as { "run-as" } else { "plain" });
        let (svc, sock) = units_for_verify(&dir, with_run_as);
        let Some(out) = analyze(
            &[
                "verify",
                man_flag,
                sock.to_str().unwrap(),
                svc.to_str().unwrap(),
            ],
            &[("MANPATH", &mandir)],
        ) else {
            return;
        };
        // verify exits 0 on an unknown key or a value it cannot parse ("ignoring"), so any
        // output at all is a failure.
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
            "systemd-analyze verify (run_as drop-in: {with_run_as}): {}\n{stdout}{stderr}",
            out.status
        );
    }
}

fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// The config's default `broker.socket`: from the config code once it has the key, else
/// DESIGN.md's default.
fn default_broker_socket() -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, "{}\n").unwrap();
    let cfg = aap::config::Config::load_path(&file).expect("an empty config loads");
    let json = serde_json::to_value(&cfg).unwrap();
    let socket = &json["broker"]["socket"];
    match socket.get("value").unwrap_or(socket).as_str() {
        Some(s) => s.to_string(),
        None => {
            eprintln!(
                "note: the config has no broker.socket yet; checking against DESIGN.md's default {DESIGN_BROKER_SOCKET}"
            );
            DESIGN_BROKER_SOCKET.to_string()
        }
    }
}

#[test]
fn the_units_name_the_configs_default_paths() {
    let socket = read(SOCKET);
    let service = read(SERVICE);
    assert_eq!(
        value(&socket, "Socket", "ListenStream"),
        default_broker_socket(),
        "ListenStream= must be the config's default broker.socket"
    );
    assert_eq!(value(&socket, "Socket", "Accept"), "no");
    assert_eq!(value(&socket, "Socket", "RemoveOnStop"), "yes");
    assert_eq!(value(&socket, "Socket", "SocketUser"), "aap");

    assert_eq!(value(&service, "Service", "User"), "aap");
    assert_eq!(value(&service, "Service", "Group"), "aap");
    assert!(values(&service, "Unit", "Requires").contains(&"aap-broker.socket".to_string()));
    assert!(
        values(&service, "Unit", "After")
            .iter()
            .any(|v| v.split_whitespace().any(|u| u == "aap-broker.socket"))
    );

    // The state dir, the audit log's directory and /etc/aap are where the config looks.
    let state = Path::new(aap::config::DEFAULT_STATE_DIR);
    assert_eq!(
        Path::new("/var/lib").join(value(&service, "Service", "StateDirectory")),
        state.join("broker")
    );
    assert_eq!(
        value(&service, "Service", "ReadWritePaths"),
        state.to_str().unwrap()
    );
    assert_eq!(
        Path::new("/var/log").join(value(&service, "Service", "LogsDirectory")),
        Path::new(aap::config::DEFAULT_AUDIT_LOG).parent().unwrap()
    );
    assert_eq!(
        Path::new("/etc").join(value(&service, "Service", "ConfigurationDirectory")),
        Path::new(aap::config::SYSTEM_CONFIG).parent().unwrap()
    );
    // The audit log's directory: no access for others (agents), whatever the umask.
    let logs_mode = u32::from_str_radix(&value(&service, "Service", "LogsDirectoryMode"), 8)
        .expect("an octal mode");
    assert_eq!(
        logs_mode & 0o007,
        0,
        "LogsDirectoryMode gives others access"
    );
    assert_eq!(value(&service, "Service", "UMask"), "0077");
}
