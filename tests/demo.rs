//! The README's quick start, `aap demo`, runs end to end and prints no secret.

mod common;

use common::*;

#[test]
fn demo_runs_the_whole_main_job() {
    let d = tempdir();
    let o = run(cmd(AAP, d.path()).arg("demo"));
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "{out}\n{}", stderr(&o));
    for want in [
        "policies/agent-capabilities.yaml: ok, 5 capabilities",
        "export AAP_SESSION=",
        "child: DB_PASSWORD is set (18 bytes); not printing it",
        "child: reading /dev/fd/",
        "-> 18 bytes; DB_PASSWORD in env: no",
        "aap-exec: hint: aap session approve ",
        "was revoked",
        ": valid, 8 events, head ",
        "== done:",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert_eq!(out.matches("(exit 77)").count(), 2, "{out}");
    assert!(
        !out.lines().any(|l| l == "never printed"),
        "a denied child ran:\n{out}"
    );
    assert_no_leak(
        &seed_secret_values(),
        &format!("{out}{}", stderr(&o)),
        d.path(),
    );
}
