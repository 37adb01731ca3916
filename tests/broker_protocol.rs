//! The broker's socket under hostile clients (issue 11 item 10): a client that sends garbage, an
//! oversized length, a truncated frame, unknown fields or message types, a report first, another
//! protocol version, nothing at all, too many connections, or descriptors, gets a clear error (or
//! is dropped), and the broker keeps serving: after every case a normal `aap-exec` through the
//! same broker still runs its child with the secret. Also: `aap-exec` with no broker running,
//! and the broker started by socket activation (`systemd-socket-activate`).

mod common;

use aap::proto::{BrokerMsg, Conn, MAX_FRAME, ProtoError};
use common::world::{DB_PASSWORD, World};
use common::*;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A world whose config has `lines` (indented, e.g. `  first_frame_timeout: 1s\n`) under
/// `broker:`, with its broker restarted to read them.
fn world_with_broker(lines: &str) -> World {
    let mut w = World::new();
    let text = std::fs::read_to_string(&w.config).unwrap();
    let key = "broker:\n  socket: broker.sock\n";
    assert!(
        text.contains(key),
        "the world's config changed shape:\n{text}"
    );
    std::fs::write(&w.config, text.replace(key, &format!("{key}{lines}"))).unwrap();
    w.start_broker();
    w
}

/// A normal `aap-exec` through the world's broker: the child gets the secret and exits 0.
fn assert_serves(w: &World, session: &str) {
    let script = format!("test \"$DB_PASSWORD\" = {DB_PASSWORD}");
    let o = run(&mut w.exec_in(session, "db-env", &["sh", "-c", &script]));
    assert_eq!(code(&o), 0, "a normal aap-exec failed: {}", stderr(&o));
}

fn connect(w: &World) -> UnixStream {
    let s = UnixStream::connect(w.path().join("broker.sock")).expect("connect to the broker");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Whether the broker has neither answered nor closed `s` (an idle connection it holds).
fn still_open(s: &UnixStream) -> bool {
    use std::os::fd::AsFd;
    // Nothing to read (no answer, no end of file) right now.
    aap::sys::wait_readable(&[s.as_fd()], 0).unwrap() == aap::sys::Ready::Timeout
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// The broker's one answer on `s`, then the end of the connection: `None` when it closed
/// without answering.
fn answer(s: UnixStream) -> Option<BrokerMsg> {
    let mut c = Conn::new(s);
    match c.recv::<BrokerMsg>() {
        Ok(m) => {
            match c.recv::<BrokerMsg>() {
                Err(ProtoError::Closed) => {}
                // The broker may close with our bytes unread (it refused before reading them).
                Err(ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => panic!("after its answer {m:?} the broker sent {other:?}, not EOF"),
            }
            Some(m)
        }
        Err(ProtoError::Closed) => None,
        Err(e) => panic!("reading the broker's answer: {e}"),
    }
}

/// Send `bytes`, expect a `BrokerMsg::Error` with `want` exit code whose message contains every
/// one of `needles`; returns the message.
fn refused(w: &World, bytes: &[u8], want: u8, needles: &[&str]) -> String {
    let mut s = connect(w);
    s.write_all(bytes).unwrap();
    expect_error(s, want, needles)
}

fn expect_error(s: UnixStream, want: u8, needles: &[&str]) -> String {
    match answer(s) {
        Some(BrokerMsg::Error {
            code,
            message,
            hint,
        }) => {
            assert_eq!(code, want, "{message}");
            for n in needles {
                assert!(message.contains(n), "expected {n:?} in {message:?}");
            }
            assert!(hint.is_some(), "no hint with {message:?}");
            message
        }
        other => panic!("expected an error naming {needles:?}, got {other:?}"),
    }
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn broker_pid(w: &World) -> u32 {
    w.broker.as_ref().expect("the world's broker").pid()
}

/// Wait until the broker holds at most `want` descriptors again (its connection threads close
/// theirs just after the client sees EOF; an idle pooled HTTPS connection may close too).
fn settle_fds(pid: u32, want: usize) -> usize {
    let t = Instant::now();
    loop {
        let n = fd_count(pid);
        if n <= want || t.elapsed() > Duration::from_secs(10) {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn malformed_first_messages_get_a_clear_error_and_the_broker_keeps_serving() {
    let w = World::new();
    let s = w.session(&["db-env"]);
    assert_serves(&w, &s);
    let execs_before = w.count("exec.start");

    // Not our protocol at all: an HTTP request reads as a 1.2 GB length prefix.
    refused(
        &w,
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        78,
        &["larger than the limit"],
    );
    assert_serves(&w, &s);
    // A small length with bytes that are not JSON, not UTF-8, empty, or not an object.
    for body in [
        &b"hello"[..],
        &[0xff, 0xfe, 0x00, 0x01],
        b"",
        b"[]",
        b"null",
        b"{\"type\":\"check\"",
    ] {
        refused(&w, &frame(body), 78, &["could not read the request"]);
        assert_serves(&w, &s);
    }
    // Unknown fields, at the top and inside hello: no field chooses the caller's uid.
    refused(
        &w,
        &frame(br#"{"type":"check","hello":{"version":1},"cap":"db-env","session":null,"uid":0}"#),
        78,
        &["unknown field `uid`"],
    );
    assert_serves(&w, &s);
    refused(
        &w,
        &frame(br#"{"type":"list","hello":{"version":1,"agent":"operator"},"session":null}"#),
        78,
        &["unknown field `agent`"],
    );
    assert_serves(&w, &s);
    // An unknown message type, and none.
    refused(
        &w,
        &frame(br#"{"type":"become-root","hello":{"version":1}}"#),
        78,
        &["unknown variant `become-root`"],
    );
    assert_serves(&w, &s);
    refused(
        &w,
        &frame(br#"{"hello":{"version":1},"cap":"db-env"}"#),
        78,
        &["missing field `type`"],
    );
    assert_serves(&w, &s);
    // A report as the first message: there is no run to report on.
    for body in [
        &br#"{"type":"started","pid":1}"#[..],
        br#"{"type":"ended","code":0,"signal":null}"#,
    ] {
        refused(&w, &frame(body), 78, &["must be a request, not a report"]);
        assert_serves(&w, &s);
    }
    // Another protocol version: a request of our shape, and one a later version might send
    // (a field we do not know), are both named as a version mismatch with both versions.
    refused(
        &w,
        &frame(br#"{"type":"check","hello":{"version":2},"cap":"db-env","session":null}"#),
        78,
        &["protocol 2", "this broker speaks 1"],
    );
    assert_serves(&w, &s);
    refused(
        &w,
        &frame(
            br#"{"type":"exec","hello":{"version":7},"cap":"db-env","argv":[[116]],"capabilities_v7":{}}"#,
        ),
        78,
        &["protocol 7", "this broker speaks 1"],
    );
    assert_serves(&w, &s);

    // A truncated frame, then close: the broker drops it without an answer.
    let mut c = connect(&w);
    c.write_all(&100u32.to_be_bytes()).unwrap();
    c.write_all(br#"{"type":"check","hel"#).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(answer(c).is_none(), "the broker answered a truncated frame");
    assert_serves(&w, &s);
    // Connect and close at once.
    drop(connect(&w));
    assert_serves(&w, &s);

    // None of it reached the audit log as a run; the log still verifies.
    assert_eq!(w.count("exec.start"), execs_before + 17);
    let v = w.audit_verify();
    assert_eq!(code(&v), 0, "{}", stderr(&v));
}

#[test]
fn an_oversized_length_is_refused_before_its_body_is_read() {
    // A long first-frame deadline: an answer that comes well before it was not waiting for a
    // body (none is sent) or for the deadline.
    let w = world_with_broker("  first_frame_timeout: 60s\n");
    let s = w.session(&["db-env"]);
    let pid = broker_pid(&w);
    let rss = |pid: u32| -> u64 {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        st.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let before = rss(pid);
    for len in [MAX_FRAME as u32 + 1, 0x7fff_ffff, u32::MAX] {
        let t = Instant::now();
        let mut c = connect(&w);
        // Only the prefix: a broker that tried to read the body would wait for the deadline.
        c.write_all(&len.to_be_bytes()).unwrap();
        let msg = expect_error(c, 78, &["larger than the limit of", &MAX_FRAME.to_string()]);
        assert!(msg.contains(&len.to_string()), "{msg}");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the broker waited {:?} before refusing",
            t.elapsed()
        );
        assert_serves(&w, &s);
    }
    // It allocated nothing near the announced sizes (4 GiB would not even fit the test box).
    let after = rss(pid);
    assert!(
        after < before + 64 * 1024,
        "broker RSS grew from {before} KiB to {after} KiB"
    );
    // A frame of exactly MAX_FRAME is allowed through the length check (and then refused as
    // not JSON), not refused as too large.
    let mut body = vec![b' '; MAX_FRAME];
    body[0] = b'x';
    refused(&w, &frame(&body), 78, &["malformed message"]);
    assert_serves(&w, &s);
}

#[test]
fn a_client_that_sends_nothing_or_trickles_is_dropped_at_the_deadline() {
    let w = world_with_broker("  first_frame_timeout: 1s\n");
    let s = w.session(&["db-env"]);

    // Nothing at all: dropped after about the deadline, with a message naming it, while a
    // normal exec goes through meanwhile.
    let t = Instant::now();
    let silent = connect(&w);
    assert_serves(&w, &s);
    expect_error(
        silent,
        69,
        &["no whole request within 1s", "closed the connection"],
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(20),
        "dropped after {took:?}"
    );
    assert_serves(&w, &s);

    // A valid request, one byte every 200 ms: the deadline is for the whole request, not for
    // each read, so the trickle is cut off after about a second, not after the 60-odd bytes.
    let req = frame(br#"{"type":"list","hello":{"version":1},"session":null}"#);
    let mut c = connect(&w);
    let reader = c.try_clone().unwrap();
    let t = Instant::now();
    let writer = std::thread::spawn(move || {
        for b in req {
            if c.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    expect_error(reader, 69, &["no whole request within 1s"]);
    let took = t.elapsed();
    assert!(took < Duration::from_secs(8), "cut off after {took:?}");
    writer.join().unwrap();
    assert_serves(&w, &s);
}

#[test]
fn the_per_uid_connection_cap_refuses_with_69_and_frees_slots_on_close() {
    // Held connections must outlive the test's steps: a long first-frame deadline.
    let w = world_with_broker("  max_connections_per_uid: 3\n  first_frame_timeout: 60s\n");
    let s = w.session(&["db-env"]);
    assert_serves(&w, &s);

    // Three idle connections of this uid: the broker holds all three slots. Each connect
    // returns before the broker has taken its slot, and the slot of the exec above is freed a
    // moment after that aap-exec has exited (its broker thread finishes first): a held
    // connection that came too early is refused (the broker answered and closed it). So: keep
    // three live ones, replacing any the broker refused, until a fourth is refused.
    let mut held: Vec<UnixStream> = Vec::new();
    let t = Instant::now();
    let o = loop {
        held.retain(still_open);
        while held.len() < 3 {
            held.push(connect(&w));
        }
        std::thread::sleep(Duration::from_millis(20));
        let o = run(&mut w.exec_in(&s, "db-env", &["true"]));
        let all_held = held.iter().all(still_open);
        if (code(&o) != 0 && all_held) || t.elapsed() > Duration::from_secs(10) {
            break o;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_fails(&o, 69, "already has 3 connections open to the broker");
    assert!(
        stderr(&o).contains("broker.max_connections_per_uid"),
        "{}",
        stderr(&o)
    );
    // A raw fourth connection gets the same answer, before it sends anything.
    expect_error(connect(&w), 69, &["already has 3 connections open"]);

    // Closing one frees its slot: a normal exec (one connection) works again.
    drop(held.pop());
    let t = Instant::now();
    loop {
        let o = run(&mut w.exec_in(&s, "db-env", &["true"]));
        if code(&o) == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the slot was never freed: {}",
            stderr(&o)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_serves(&w, &s);
    drop(held);
    assert_serves(&w, &s);
}

#[test]
fn two_hundred_junk_connections_at_once_then_a_normal_exec() {
    let w = world_with_broker("  first_frame_timeout: 2s\n");
    let s = w.session(&["db-env"]);
    assert_serves(&w, &s);
    let pid = broker_pid(&w);
    let base = fd_count(pid);
    let sock = w.path().join("broker.sock");
    let junk: Vec<Vec<u8>> = vec![
        b"\x00\x00\x00\x05hello".to_vec(),
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        frame(br#"{"type":"started","pid":1}"#),
        frame(br#"{"type":"check","hello":{"version":1},"cap":"db-env","session":null,"uid":0}"#),
        u32::MAX.to_be_bytes().to_vec(),
        b"\x00\x00\x01\x00{\"type\"".to_vec(), // truncated, then closed
        Vec::new(),                            // connect and close
        b"silent".to_vec(),                    // connect and send nothing
    ];
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let sock = sock.clone();
            let bytes = junk[i % junk.len()].clone();
            std::thread::spawn(move || {
                let Ok(mut c) = UnixStream::connect(&sock) else {
                    return false;
                };
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                if bytes == b"silent" {
                } else if bytes.is_empty() {
                    return true;
                } else {
                    let _ = c.write_all(&bytes);
                    if bytes.starts_with(b"\x00\x00\x01\x00") {
                        let _ = c.shutdown(std::net::Shutdown::Write);
                    }
                }
                let mut conn = Conn::new(c);
                // Whatever the broker answers, it then closes.
                loop {
                    match conn.recv::<BrokerMsg>() {
                        Ok(BrokerMsg::Error { .. }) => {}
                        Ok(other) => panic!("junk got {other:?}"),
                        Err(ProtoError::Closed) => return true,
                        Err(ProtoError::Io(e))
                            if e.kind() == std::io::ErrorKind::ConnectionReset =>
                        {
                            return true;
                        }
                        Err(e) => panic!("junk connection: {e}"),
                    }
                }
            })
        })
        .collect();
    // A normal exec while the junk is being handled.
    assert_serves(&w, &s);
    let ok = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|&b| b)
        .count();
    assert_eq!(ok, 200, "some junk connections could not even connect");
    assert_serves(&w, &s);
    // Every junk connection's socket is closed again.
    let after = settle_fds(pid, base);
    assert!(
        after <= base,
        "the broker holds {after} descriptors, {base} before"
    );
    let v = w.audit_verify();
    assert_eq!(code(&v), 0, "{}", stderr(&v));
}

#[test]
fn descriptors_a_client_sends_are_refused_and_never_leak() {
    let w = World::new();
    let s = w.session(&["db-env"]);
    assert_serves(&w, &s);
    let pid = broker_pid(&w);
    let base = fd_count(pid);
    let files: Vec<std::fs::File> = (0..253)
        .map(|_| std::fs::File::open("/dev/null").unwrap())
        .collect();
    let raw = |n: usize| -> Vec<i32> { files[..n].iter().map(|f| f.as_raw_fd()).collect() };
    let check = frame(br#"{"type":"check","hello":{"version":1},"cap":"db-env","session":null}"#);
    for round in 0..10 {
        // More than the 8 one message may carry, with a valid request.
        let c = connect(&w);
        aap::sys::send_with_fds(&c, &check, &raw(12)).unwrap();
        expect_error(
            c,
            78,
            &["sent 12 descriptors with one message, more than 8"],
        );
        // The most one sendmsg(2) may carry (SCM_MAX_FD): all received, all closed.
        let c = connect(&w);
        aap::sys::send_with_fds(&c, &check, &raw(253)).unwrap();
        expect_error(c, 78, &["sent 253 descriptors"]);
        // A few, with a valid request: refused, and closed at once.
        let c = connect(&w);
        aap::sys::send_with_fds(&c, &check, &raw(3)).unwrap();
        expect_error(c, 78, &["came with 3 descriptor(s)", "accepts none"]);
        // With garbage, and with half a frame then close.
        let c = connect(&w);
        aap::sys::send_with_fds(&c, &frame(b"junk"), &raw(8)).unwrap();
        expect_error(c, 78, &["could not read the request"]);
        let c = connect(&w);
        aap::sys::send_with_fds(&c, &check[..10], &raw(8)).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(answer(c).is_none());
        if round % 5 == 0 {
            assert_serves(&w, &s);
        }
    }
    assert_serves(&w, &s);
    let after = settle_fds(pid, base);
    assert!(
        after <= base,
        "the broker holds {after} descriptors after 50 connections that sent 2,840 descriptors, {base} before"
    );
}

// ---- starting the broker ----------------------------------------------------------------------

/// A config whose broker socket is `<dir>/broker.sock`, and nothing else: all `aap-exec` reads
/// before it connects.
fn socket_only_config(dir: &Path) -> PathBuf {
    let config = dir.join("config.yaml");
    // Its audit log and state dir in the world too: the broker its hint starts
    // (`aap broker --socket ...`, followed by tests/common/follow.rs) runs on it.
    write(
        &config,
        "broker:\n  socket: broker.sock\naudit_log: audit.jsonl\nstate_dir: state\n",
    );
    config
}

#[test]
fn aap_exec_without_a_broker_exits_69_naming_how_to_start_it() {
    let d = tempdir();
    let config = socket_only_config(d.path());
    let exec = || {
        let mut c = cmd(AAP_EXEC, d.path());
        c.env("AAP_CONFIG", &config)
            .env("AAP_SESSION", "01JAAAAAAAAAAAAAAAAAAAAAAA")
            .args(["db-env", "--", "sh", "-c", "echo the child ran > ran"]);
        run(&mut c)
    };
    // No socket at all, then a stale one nobody listens on (a broker that was killed).
    for stale in [false, true] {
        if stale {
            drop(std::os::unix::net::UnixListener::bind(d.path().join("broker.sock")).unwrap());
        }
        let o = exec();
        assert_fails(&o, 69, "cannot reach the aap broker at");
        let err = stderr(&o);
        assert!(err.contains("broker.sock"), "{err}");
        assert!(
            err.contains("systemctl start aap-broker.socket"),
            "no systemd hint: {err}"
        );
        assert!(
            err.contains("aap broker --socket"),
            "no foreground hint: {err}"
        );
        assert!(
            !d.path().join("ran").exists(),
            "the child ran without a broker"
        );
    }
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// `systemd-socket-activate -l SOCK... aap broker`, killed on drop.
struct Activated(std::process::Child);

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn activate(tool: &Path, w: &World, sockets: &[PathBuf], log: &Path) -> Activated {
    let mut c = cmd(tool.to_str().unwrap(), w.path());
    for s in sockets {
        c.arg("-l").arg(s);
    }
    // The launched process gets only LISTEN_* and what --setenv names.
    c.arg(format!("--setenv=AAP_CONFIG={}", w.config.display()))
        .arg("--setenv=PATH")
        .arg("--setenv=HOME")
        .arg(AAP)
        .arg("broker")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    let child = Activated(c.spawn().expect("start systemd-socket-activate"));
    let t = Instant::now();
    while !sockets.iter().all(|s| s.exists()) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "systemd-socket-activate never listened: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

#[test]
fn the_broker_runs_by_socket_activation_and_refuses_two_sockets() {
    const T: &str = "the_broker_runs_by_socket_activation_and_refuses_two_sockets";
    let Some(tool) = which("systemd-socket-activate") else {
        missing_tool(T, "systemd-socket-activate", "apt-get install systemd");
        return;
    };
    let mut w = World::new();
    let s = w.session(&["db-env"]);
    // The world's own broker goes; systemd-socket-activate listens on the config's socket
    // instead and starts `aap broker` (no --socket) on the first connection.
    w.broker = None;
    let sock = w.path().join("broker.sock");
    let _ = std::fs::remove_file(&sock);
    let log = w.path().join("activated.log");
    let act = activate(&tool, &w, std::slice::from_ref(&sock), &log);
    let script = format!("test \"$DB_PASSWORD\" = {DB_PASSWORD}");
    for _ in 0..2 {
        let o = run(&mut w.exec_in(&s, "db-env", &["sh", "-c", &script]));
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(code(&o), 0, "{}\n---- broker ----\n{log_text}", stderr(&o));
    }
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("listening on the socket systemd passed (socket activation)"),
        "{log_text}"
    );
    assert_eq!(w.count("exec.end"), 2);
    drop(act);

    // Two sockets: the broker listens on exactly one, and says so.
    let two = [w.path().join("a.sock"), w.path().join("b.sock")];
    let log2 = w.path().join("activated-two.log");
    let mut act = activate(&tool, &w, &two, &log2);
    // systemd-socket-activate starts the program on the first connection.
    // (It may have started, and failed, already: then nobody answers, which is fine.)
    let _c = UnixStream::connect(&two[0]).ok();
    let t = Instant::now();
    let st = loop {
        if let Some(st) = act.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the broker kept running with two sockets: {}",
            std::fs::read_to_string(&log2).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log2).unwrap();
    assert_eq!(st.code(), Some(78), "{text}");
    assert!(
        text.contains("systemd passed 2 sockets; the broker listens on exactly one"),
        "{text}"
    );
    assert!(text.contains("systemctl cat aap-broker.socket"), "{text}");
}

// ---- the fuzz seeds ---------------------------------------------------------------------------

/// The `proto` fuzz target's seeds (`fuzz/corpus/proto/`) stay real messages of this protocol:
/// every frame of a `client-*` seed decodes as a request or report, of a `broker-*` seed as a
/// broker message; `bad-*` seeds are refused by the decoder.
#[test]
fn the_proto_fuzz_seeds_are_messages_of_this_protocol() {
    use aap::proto::{ClientMsg, decode, split_frame};
    let dir = repo().join("fuzz/corpus/proto");
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let data = std::fs::read(&path).unwrap();
        let mut buf = &data[..];
        let mut frames = 0;
        let mut bad = false;
        while !buf.is_empty() {
            let Ok(Some((body, rest))) = split_frame(buf) else {
                bad = true;
                break;
            };
            frames += 1;
            let client = decode::<ClientMsg>(body)
                .map(|_| ())
                .map_err(|e| e.to_string());
            let broker = decode::<BrokerMsg>(body)
                .map(|_| ())
                .map_err(|e| e.to_string());
            if name.starts_with("client-") {
                assert!(client.is_ok(), "{name} frame {frames}: {client:?}");
            } else if name.starts_with("broker-") {
                assert!(broker.is_ok(), "{name} frame {frames}: {broker:?}");
            } else {
                bad |= client.is_err() && broker.is_err();
            }
            buf = rest;
        }
        if name.starts_with("bad-") {
            assert!(bad, "{name} is accepted by the decoder");
        } else {
            assert!(!bad && frames > 0, "{name} is not whole frames");
        }
        seen += 1;
    }
    assert!(seen >= 8, "only {seen} seeds in {}", dir.display());
}

#[test]
fn sigterm_stops_the_broker_and_revokes_the_token_it_holds() {
    let mut w = World::new();
    let s = w.session(&["db-env"]);
    assert_serves(&w, &s);
    let pid = broker_pid(&w);
    let revokes = w.server.stats()["revokes"].as_u64().unwrap();
    // SIGTERM (as systemctl stop sends): the broker revokes the agent identity's cached token,
    // says so, and exits 0.
    let k = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(k.success());
    let mut b = w.broker.take().expect("the world's broker");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = b.try_wait() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the broker did not stop within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    assert_eq!(
        w.server.stats()["revokes"].as_u64().unwrap(),
        revokes + 1,
        "the cached access token was not revoked at stop"
    );
    let log = std::fs::read_to_string(w.path().join("broker.log")).unwrap();
    assert!(log.contains("stopping (signal 15)"), "broker log: {log}");
}
