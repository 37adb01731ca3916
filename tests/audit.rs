//! The audit log: concurrent appends from many processes, verification and its tamper cases,
//! and tail.

mod common;

use aap::audit::{Event, EventKind, GENESIS, Log, Outcome};
use aap::catalog::Tier;
use common::{code, stderr, stdout};
use std::path::{Path, PathBuf};
use std::process::Command;

/// When set, the test `child_appender` appends events instead of testing (re-exec'd below).
const CHILD_ENV: &str = "AAP_TEST_AUDIT_CHILD_LOG";
const PER_CHILD: usize = 200;
const CHILDREN: usize = 64;

fn config_for(dir: &Path, log: &Path) -> PathBuf {
    let cfg = dir.join("config.yaml");
    common::write(
        &cfg,
        format!(
            "catalog: {}\nstate_dir: {}\naudit_log: {}\n",
            common::repo()
                .join("policies/agent-capabilities.yaml")
                .display(),
            dir.join("state").display(),
            log.display()
        ),
    );
    cfg
}

fn aap(dir: &Path, log: &Path, args: &[&str]) -> std::process::Output {
    let cfg = config_for(dir, log);
    common::run(
        common::cmd(common::AAP, dir)
            .env("AAP_CONFIG", cfg)
            .args(args),
    )
}

fn event(i: usize, session: &str, agent: &str) -> Event {
    let mut e = Event::new(EventKind::ExecStart, Outcome::Ok);
    e.session = Some(session.to_owned());
    e.agent = Some(agent.to_owned());
    e.capability = Some("forgejo-pat-read".into());
    e.tier = Some(Tier::Low);
    e.invocation = Some(
        aap::id::EventId::generate(std::time::SystemTime::now())
            .unwrap()
            .to_string(),
    );
    e.program = Some("git".into());
    e.argv = Some(vec!["git".into(), "fetch".into(), format!("origin-{i}")]);
    e.cwd = Some("/work/repo".into());
    e.pid = Some(std::process::id());
    e
}

/// Not a test on its own: the body of each of the 64 appending processes.
#[test]
fn child_appender() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut log = Log::open(Path::new(&path)).expect("open");
    let me = std::process::id().to_string();
    for i in 0..PER_CHILD {
        log.append(&event(i, "01JD0000000000000000000000", &me))
            .expect("append");
    }
}

#[test]
fn sixty_four_processes_appending_at_once_keep_one_valid_chain() {
    let dir = common::tempdir();
    let path = dir.path().join("audit.jsonl");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..CHILDREN)
        .map(|_| {
            Command::new(&exe)
                .args(["--exact", "child_appender", "--test-threads=1", "--quiet"])
                .env(CHILD_ENV, &path)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a child failed to append");
    }
    let o = aap(
        dir.path(),
        &path,
        &["audit", "verify", path.to_str().unwrap()],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let want = CHILDREN * PER_CHILD;
    assert!(
        stdout(&o).contains(&format!("valid, {want} events")),
        "{}",
        stdout(&o)
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 12_800);
    // Every process's 200 events are there.
    let mut per: std::collections::HashMap<String, usize> = Default::default();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        *per.entry(v["agent"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(per.len(), CHILDREN);
    assert!(per.values().all(|&n| n == PER_CHILD), "{per:?}");
}

/// A valid log of `n` events written through the real API.
fn make_log(dir: &Path, n: usize) -> (PathBuf, Vec<String>) {
    let path = dir.join("audit.jsonl");
    let mut log = Log::open(&path).unwrap();
    for i in 0..n {
        log.append(&event(i, "01JD0000000000000000000001", "codex"))
            .unwrap();
    }
    let lines = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    (path, lines)
}

fn write_lines(path: &Path, lines: &[String], final_newline: bool) {
    let mut t = lines.join("\n");
    if final_newline {
        t.push('\n');
    }
    std::fs::write(path, t).unwrap();
}

#[test]
fn verify_reports_count_and_head_and_names_the_first_bad_line() {
    let dir = common::tempdir();
    let (path, good) = make_log(dir.path(), 8);
    let p = path.to_str().unwrap();
    let o = aap(dir.path(), &path, &["audit", "verify", p]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let head = aap::audit::hash_hex(good[7].as_bytes());
    assert_eq!(
        stdout(&o).trim(),
        format!("{p}: valid, 8 events, head {head}")
    );
    let o = aap(dir.path(), &path, &["audit", "verify", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["events"], 8);
    assert_eq!(v["head"], head.as_str());
    // The first line chains from the genesis value.
    assert!(good[0].ends_with(&format!("\"prev\":\"{GENESIS}\"}}")));

    let bad = dir.path().join("bad.jsonl");
    let check = |lines: Vec<String>, newline: bool, line: usize, want: &str| {
        write_lines(&bad, &lines, newline);
        let o = aap(
            dir.path(),
            &bad,
            &["audit", "verify", bad.to_str().unwrap()],
        );
        assert_eq!(code(&o), 65, "{want}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.starts_with(&format!(
                "aap: error: {}:{line}: the audit log is invalid: line {line} ",
                bad.display()
            )),
            "{want}: {err}"
        );
        assert!(err.contains(want), "{want}: {err}");
        assert!(err.contains("aap: hint: "), "{err}");
        // --json: a result on stdout for the machine, the error on stderr, the same exit.
        let o = aap(
            dir.path(),
            &bad,
            &["audit", "verify", "--json", bad.to_str().unwrap()],
        );
        assert_eq!(code(&o), 65, "{want}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o))
            .unwrap_or_else(|e| panic!("{want}: no JSON on stdout ({e}): {:?}", stdout(&o)));
        assert_eq!(v["valid"], false, "{v}");
        assert_eq!(v["line"], line, "{v}");
        assert_eq!(v["file"], bad.to_str().unwrap(), "{v}");
        assert!(v["error"].as_str().unwrap().contains(want), "{v}");
        assert!(stderr(&o).starts_with("aap: error: "), "{}", stderr(&o));
    };
    // Edited line 4 (an outcome changed): line 5 no longer chains from it.
    let mut l = good.clone();
    l[3] = l[3].replace("\"outcome\":\"ok\"", "\"outcome\":\"denied\"");
    check(l, true, 5, "does not chain from line 4: line 4 was edited");
    // Inserted line after line 2, well-formed and chaining from line 2.
    let mut l = good.clone();
    let forged = good[2].replace(
        &good[2][good[2].find("\"prev\":").unwrap()..],
        &format!(
            "\"prev\":\"{}\"}}",
            aap::audit::hash_hex(good[1].as_bytes())
        ),
    );
    l.insert(2, forged.replace("origin-2", "origin-x"));
    check(l, true, 4, "does not chain from line 3");
    // Deleted line 6.
    let mut l = good.clone();
    l.remove(5);
    check(l, true, 6, "does not chain from line 5");
    // Reordered lines 2 and 3.
    let mut l = good.clone();
    l.swap(1, 2);
    check(l, true, 2, "does not chain from line 1");
    // Truncated last line.
    let mut l = good.clone();
    let last = l.pop().unwrap();
    l.push(last[..last.len() / 2].to_owned());
    check(l, false, 8, "is truncated");
    // A line that is not JSON.
    let mut l = good.clone();
    l[2] = "this is not json".into();
    check(l, true, 3, "is not JSON");
    // Deleting the first line.
    check(
        good[1..].to_vec(),
        true,
        1,
        "does not chain from the genesis value",
    );
    // A missing file and a directory are errors too (65).
    let o = aap(
        dir.path(),
        &bad,
        &["audit", "verify", dir.path().join("none").to_str().unwrap()],
    );
    assert_eq!(code(&o), 65);
    let o = aap(
        dir.path(),
        &bad,
        &["audit", "verify", dir.path().to_str().unwrap()],
    );
    assert_eq!(code(&o), 65);
}

#[test]
fn exec_events_and_high_tier_events_verify_and_render() {
    let dir = common::tempdir();
    let path = dir.path().join("audit.jsonl");
    let mut log = Log::open(&path).unwrap();
    let mut start = event(0, "01JD0000000000000000000002", "codex");
    start.tier = Some(Tier::High);
    start.capability = Some("ssh-vps1000-iskra-readonly".into());
    log.append(&start).unwrap();
    let mut end = start.clone();
    end.event = EventKind::ExecEnd;
    end.exit_code = Some(3);
    end.duration_ms = Some(1234);
    log.append(&end).unwrap();
    let mut deny = Event::new(EventKind::Deny, Outcome::Denied);
    deny.session = Some("01JD0000000000000000000003".into());
    deny.agent = Some("claude".into());
    deny.capability = Some("forgejo-pat-read".into());
    deny.error = Some("not granted\n\u{1b}[31m".into());
    log.append(&deny).unwrap();
    let o = aap(dir.path(), &path, &["audit", "verify"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("valid, 3 events"));
    let o = aap(dir.path(), &path, &["audit", "tail"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[1].contains(" exec.end ")
            && lines[1].contains("exit=3")
            && lines[1].contains("duration=1234ms"),
        "{out}"
    );
    assert!(
        !out.contains('\u{1b}'),
        "an escape sequence reached the terminal: {out:?}"
    );
    assert!(
        lines[2].contains("error=\"not granted\\n\\u{1b}[31m\""),
        "{out}"
    );
    // Filters and JSON.
    let o = aap(
        dir.path(),
        &path,
        &["audit", "tail", "--agent", "claude", "--json"],
    );
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["event"], "deny");
    let o = aap(
        dir.path(),
        &path,
        &[
            "audit",
            "tail",
            "--session",
            "01JD0000000000000000000002",
            "-n",
            "1",
        ],
    );
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("exec.end"));
}

#[test]
fn tail_follow_prints_new_events() {
    use std::io::{BufRead, BufReader};
    use std::sync::mpsc;
    use std::time::Duration;
    let dir = common::tempdir();
    let (path, _) = make_log(dir.path(), 2);
    let cfg = config_for(dir.path(), &path);
    let mut child = common::cmd(common::AAP, dir.path())
        .env("AAP_CONFIG", cfg)
        .args(["audit", "tail", "-f", "--agent", "codex"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Lines arrive through a channel, so a hung tail fails the test instead of hanging it.
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for l in out.lines() {
            if tx.send(l.unwrap()).is_err() {
                break;
            }
        }
    });
    let next = || match rx.recv_timeout(Duration::from_secs(15)) {
        Ok(l) => Ok(l),
        Err(e) => Err(format!("no line from aap audit tail -f: {e}")),
    };
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(next());
    }
    let mut log = Log::open(&path).unwrap();
    let mut e = event(9, "01JD0000000000000000000001", "codex");
    e.event = EventKind::ExecEnd;
    e.exit_code = Some(0);
    log.append(&e).unwrap();
    let mut other = event(10, "01JD0000000000000000000001", "hermes");
    other.event = EventKind::Deny;
    log.append(&other).unwrap();
    log.append(&e).unwrap();
    // Two codex lines arrive; the hermes line is filtered out.
    for _ in 0..2 {
        got.push(next());
    }
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    let got: Vec<String> = got.into_iter().map(|l| l.unwrap()).collect();
    assert!(
        got[0].contains("exec.start") && got[1].contains("exec.start"),
        "{got:?}"
    );
    for l in &got[2..] {
        assert!(
            l.contains("exec.end") && l.contains("agent=codex"),
            "{got:?}"
        );
    }
    assert!(
        rx.try_recv().is_err(),
        "the filtered-out hermes line was printed"
    );
}

#[test]
fn lines_have_the_documented_fields_in_order() {
    let dir = common::tempdir();
    let (path, _) = make_log(dir.path(), 3);
    let text = std::fs::read_to_string(&path).unwrap();
    let allowed = [
        "v",
        "id",
        "ts",
        "event",
        "session",
        "agent",
        "uid",
        "host",
        "capability",
        "tier",
        "outcome",
        "reason",
        "error",
        "invocation",
        "program",
        "argv",
        "cwd",
        "pid",
        "exit_code",
        "signal",
        "duration_ms",
        "prev",
    ];
    for l in text.lines() {
        assert!(l.starts_with("{\"v\":1,\"id\":\""), "{l}");
        assert!(
            l.contains(",\"ts\":\"") && l.contains(",\"event\":\"exec.start\""),
            "{l}"
        );
        let tail = &l[l.rfind(",\"prev\":\"").expect("prev")..];
        assert_eq!(
            tail.len(),
            ",\"prev\":\"\"}".len() + 64,
            "prev is not last: {l}"
        );
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        for k in v.as_object().unwrap().keys() {
            assert!(allowed.contains(&k.as_str()), "unexpected field {k}");
        }
        // Fields in documented order: each present field appears after the previous one.
        let mut last = 0;
        for k in allowed {
            if let Some(p) = l.find(&format!("\"{k}\":")) {
                assert!(p >= last, "{k} out of order in {l}");
                last = p;
            }
        }
    }
}
