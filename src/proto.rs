//! The protocol between `aap-exec` (the client, the agent's uid) and `aap broker` (its own uid),
//! over a Unix stream socket. Both sides use this module and nothing else to talk.
//!
//! A frame is a 4-byte big-endian length, then that many bytes of one JSON object. Frames are at
//! most [`MAX_FRAME`] bytes; decoding is strict (unknown fields and unknown message types are
//! errors). Descriptors (sealed memfds) travel with a frame as `SCM_RIGHTS`, attached to its
//! first byte, and the frame says how many to expect.
//!
//! A conversation: the client sends one [`Hello`]-carrying request ([`ClientMsg::Exec`],
//! [`ClientMsg::Check`], [`ClientMsg::List`] or [`ClientMsg::Request`]); the broker answers
//! with any number of [`BrokerMsg::Progress`] lines, then one final answer. For an exec that
//! answer is [`BrokerMsg::Deliver`]; the client then reports [`ClientMsg::Started`] and later
//! [`ClientMsg::Ended`], which the broker acknowledges with [`BrokerMsg::Recorded`]. For an
//! `ssh-agent` capability the broker first sends [`BrokerMsg::AgentSocket`], and the client
//! answers with [`ClientMsg::AgentSocket`], the listening socket of a 0700 directory of its
//! own attached: the broker's agent serves on it.
//!
//! What the client sends is a request, never a fact: its uid, agent, pid and time come from
//! the kernel and the broker's clock, never from a field here.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Instant;

/// Bumped on any incompatible change; a broker refuses other versions with a clear message.
pub const VERSION: u32 = 1;
/// The largest frame either side accepts: an argv at Linux's 2 MiB ARG_MAX, as JSON arrays of
/// bytes (up to 4 characters a byte), fits.
pub const MAX_FRAME: usize = 10 * 1024 * 1024;

/// The first field of every request: which protocol the client speaks.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub version: u32,
}

impl Hello {
    pub fn current() -> Hello {
        Hello { version: VERSION }
    }
}

/// Client to broker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ClientMsg {
    /// Run `argv` with capability `cap`. `program` is what the client resolved `argv[0]` to
    /// against its own PATH and `cwd`; the broker decides what is actually run.
    Exec {
        hello: Hello,
        cap: String,
        session: Option<String>,
        reason: Option<String>,
        /// The exact bytes of each argument (argv[0] first); they need not be UTF-8.
        argv: Vec<Vec<u8>>,
        program: String,
        /// Why `argv[0]` could not be resolved (not found: 127, not executable: 126); the
        /// broker records the denial.
        program_error: Option<ProgramError>,
        cwd: String,
        /// The caller's nesting marker (an outer aap-exec's invocation), if any.
        nested: Option<String>,
    },
    /// `aap-exec --check CAP [-- CMD ARG...]` / `aap session check CAP`: the verdict a run
    /// would get. With `command`, the command is judged too, exactly as an exec judges it;
    /// nothing is fetched.
    Check {
        hello: Hello,
        cap: String,
        session: Option<String>,
        #[serde(default)]
        command: Option<CheckCommand>,
    },
    /// `aap-exec --list [--json]`: what the session may use now.
    List {
        hello: Hello,
        session: Option<String>,
        #[serde(default)]
        json: bool,
    },
    /// `aap doctor`: can this broker start each `wrapped-command` capability of its catalog as
    /// the capability's `run_as` user? Answered by `Done`, whose `stdout` is a JSON array of
    /// [`RunAsCheck`]. Any uid that may connect may ask: it reveals only what the catalog says.
    RunAs { hello: Hello },
    /// `aap request CAP --reason R [--wait]`: ask the operator for a capability; with `wait`,
    /// the broker then answers as for [`ClientMsg::RequestWait`] on the new request.
    Request {
        hello: Hello,
        cap: String,
        session: Option<String>,
        reason: String,
        #[serde(default)]
        wait: bool,
        /// How long to wait at most (default: until the request expires).
        #[serde(default)]
        timeout_secs: Option<u64>,
    },
    /// `aap request --wait-on REQ`: wait until the operator answers one of the caller's own
    /// requests. The broker sends [`BrokerMsg::Pending`] about once a second, then `Done` (0,
    /// approved) or `Error` (77 denied, 75 timed out or expired).
    RequestWait {
        hello: Hello,
        request: String,
        #[serde(default)]
        timeout_secs: Option<u64>,
    },
    /// The answer to [`BrokerMsg::AgentSocket`]: exactly one descriptor comes with it, a Unix
    /// stream socket listening on `path` (in a fresh 0700 directory of the client's uid). The
    /// client keeps no copy of it.
    AgentSocket { path: String },
    /// The answer to [`BrokerMsg::Stdio`]: four descriptors come with it, the caller's
    /// standard input, output and error and its working directory (`O_PATH`). `term` and
    /// `locale` are the caller's `TERM` and `LANG`/`LC_*`; the broker keeps only plain values.
    /// `foreground`: the caller is its terminal's foreground job (true when stdin is no
    /// terminal).
    Stdio {
        term: Option<String>,
        locale: Vec<(String, String)>,
        foreground: bool,
    },
    /// Relay this signal to the broker-run command (its process group).
    Signal { signo: i32 },
    /// The caller was continued (SIGCONT: `fg`, `bg`); continue the broker-run command, and
    /// relay its terminal's input only when the caller is now in the foreground.
    Continued { foreground: bool },
    /// The child of an exec was started with this pid.
    Started { pid: u32 },
    /// The child ended: exit code, or the signal that killed it.
    Ended {
        code: Option<i32>,
        signal: Option<i32>,
    },
}

/// One wrapped-command capability in the broker's answer to [`ClientMsg::RunAs`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RunAsCheck {
    pub cap: String,
    /// The user it runs as (the catalog's `run_as`, else the broker's own user).
    pub run_as: String,
    /// Why the broker cannot start it as that user, and the hint; None when it can.
    pub error: Option<(String, Option<String>)>,
}

/// The command of `aap-exec --check CAP -- CMD ARG...`: the same fields an exec sends.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CheckCommand {
    pub argv: Vec<Vec<u8>>,
    pub program: String,
    pub program_error: Option<ProgramError>,
    pub cwd: String,
    pub nested: Option<String>,
}

/// A command the client could not resolve.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProgramError {
    pub code: u8,
    pub message: String,
    pub hint: Option<String>,
}

/// How the client hands one delivered descriptor (memfd) to the child.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "form", rename_all = "kebab-case", deny_unknown_fields)]
pub enum FdUse {
    /// Read the memfd and set variable `name` to its bytes (the `env` form).
    Env { name: String },
    /// Let the child inherit the memfd; `name=/dev/fd/N` (the `fd` form).
    Fd { name: String },
    /// A one-shot git credential helper reads the memfd (the `git-credential` form).
    GitCredential { host: String },
}

/// The `http-proxy` form as the client hands it to the child. Its `Debug` hides the base URL
/// (the prefix in it is the run's capability).
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProxyUse {
    /// `http://127.0.0.1:PORT/PREFIX/`: valid while the run lives (the prefix is its secret).
    pub base: String,
    /// The capability's `host[:port]`, whose `https://` URLs git is pointed at the base
    /// instead (a `forgejo-pat` backing only; empty for another).
    pub host: String,
    /// The variable the base URL goes in (the catalog's `name`, default `FORGEJO_URL`).
    pub var: String,
}

impl std::fmt::Debug for ProxyUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyUse")
            .field("base", &"<redacted>")
            .field("host", &self.host)
            .field("var", &self.var)
            .finish()
    }
}

/// Broker to client.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum BrokerMsg {
    /// One line for the agent's stderr while it waits (a rate limit, a slow server).
    Progress { message: String },
    /// Text for the agent's stderr as it is (the break-glass banner, shown even when the use
    /// is then denied).
    Notice { text: String },
    /// The request failed: print it like any error of ours and exit with `code`.
    Error {
        code: u8,
        message: String,
        hint: Option<String>,
    },
    /// The answer to Check, List or Request: print `stdout` and exit with `code`.
    Done { code: u8, stdout: String },
    /// What to run and what to hand it. `fds` descriptors follow as SCM_RIGHTS, in order.
    Deliver {
        invocation: String,
        /// The absolute program to run, and the name it gets as argv[0].
        program: String,
        arg0: String,
        /// Variables of the caller's environment the child must not get.
        strip: Vec<String>,
        /// Also strip loader, interpreter and hook variables (the capability names programs).
        strip_code_vars: bool,
        fds: Vec<FdUse>,
        /// A warning for the agent's stderr.
        warning: Option<String>,
        /// The socket the broker's ssh agent serves on for this run (the `ssh-agent` form; the
        /// one the client sent): the child's `SSH_AUTH_SOCK`. No key is ever sent.
        ssh_auth_sock: Option<String>,
        /// The broker's http-proxy for this run (the `http-proxy` form): the child's git is
        /// pointed at it and API tools get its base URL. No token is ever sent.
        #[serde(default)]
        http_proxy: Option<ProxyUse>,
    },
    /// A broker-run command (`wrapped-command`): send the caller's stdio and working directory
    /// ([`ClientMsg::Stdio`]); the broker starts the command itself. (A struct variant, as
    /// [`BrokerMsg::AgentSocket`].)
    Stdio {},
    /// The broker-run command, on a terminal of its own, stopped (^Z): the caller's terminal
    /// has its modes back; stop, and on continuing send [`ClientMsg::Continued`].
    Stopped {},
    /// The broker-run command ended and `exec.end` is written: exit with this status (the
    /// exit code, or 128+N for signal N).
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// The end was recorded (exec.end is written). (A struct variant: serde accepts any
    /// field on a unit variant of an internally tagged enum, `deny_unknown_fields` or not.)
    Recorded {},
    /// Make the socket of the broker's ssh agent for this exec and send it
    /// ([`ClientMsg::AgentSocket`]); sent before [`BrokerMsg::Deliver`]. (A struct variant,
    /// so that a field added to it is refused like any unknown field.)
    AgentSocket {},
    /// What the broker waits for now (`Infisical`): said by the client only if the answer takes
    /// longer than a second.
    Stage { waiting_for: String },
    /// A request is still pending: what a waiting client shows, and how long it waits at most.
    Pending { request: String, left_secs: u64 },
}

/// A protocol failure: what went wrong, for a message.
#[derive(Debug)]
pub enum ProtoError {
    Io(io::Error),
    /// The peer closed the connection (before a frame, or inside one).
    Closed,
    TooLarge(usize),
    Malformed(String),
    /// A frame said N descriptors would come and a different number came.
    Fds {
        want: usize,
        got: usize,
    },
    /// No whole frame arrived by the deadline ([`Conn::recv_by`]).
    Deadline,
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtoError::Io(e) if e.kind() == io::ErrorKind::WouldBlock => {
                write!(f, "timed out waiting for the peer")
            }
            ProtoError::Io(e) => write!(f, "{e}"),
            ProtoError::Closed => write!(f, "the connection closed"),
            ProtoError::TooLarge(n) => {
                write!(
                    f,
                    "a frame of {n} bytes is larger than the limit of {MAX_FRAME}"
                )
            }
            ProtoError::Malformed(e) => write!(f, "malformed message: {e}"),
            ProtoError::Fds { want, got } => {
                write!(f, "expected {want} descriptors with the message, got {got}")
            }
            ProtoError::Deadline => write!(f, "no whole message arrived in time"),
        }
    }
}

impl From<io::Error> for ProtoError {
    fn from(e: io::Error) -> Self {
        ProtoError::Io(e)
    }
}

/// Decode one frame's body: strict JSON for `T`. The fuzz target calls this directly.
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ProtoError> {
    serde_json::from_slice(body).map_err(|e| ProtoError::Malformed(e.to_string()))
}

/// The protocol version a request body claims (`hello.version`), read leniently: for a clear
/// "versions differ" message when a request of another version does not decode as ours.
pub fn claimed_version(body: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("hello")?.get("version")?.as_u64()
}

/// A whole frame's body and the bytes after it.
pub type Split<'a> = (&'a [u8], &'a [u8]);

/// Split a buffer into the first frame's body and the rest, if a whole frame is there.
pub fn split_frame(buf: &[u8]) -> Result<Option<Split<'_>>, ProtoError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if n > MAX_FRAME {
        return Err(ProtoError::TooLarge(n));
    }
    if buf.len() < 4 + n {
        return Ok(None);
    }
    Ok(Some((&buf[4..4 + n], &buf[4 + n..])))
}

/// Encode a message as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// One end of a connection: reads frames (collecting descriptors that arrive) and writes them.
pub struct Conn<S: AsFd> {
    sock: S,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl<S: AsFd> Conn<S> {
    pub fn new(sock: S) -> Self {
        Conn {
            sock,
            buf: Vec::new(),
            fds: Vec::new(),
        }
    }

    pub fn sock(&self) -> &S {
        &self.sock
    }

    /// Send one message, with `fds` attached.
    pub fn send<T: Serialize>(&self, msg: &T, fds: &[&OwnedFd]) -> Result<(), ProtoError> {
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        crate::sys::send_with_fds(&self.sock, &encode(msg), &raw)?;
        Ok(())
    }

    /// Receive one message. Descriptors that came with it are kept for [`Conn::take_fds`].
    pub fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<T, ProtoError> {
        let body = self.recv_frame(None)?;
        decode(&body)
    }

    /// Receive one frame's body, all of it by `deadline` (a total, not per read: a peer that
    /// trickles a byte at a time is cut off too).
    pub fn recv_by(&mut self, deadline: Instant) -> Result<Vec<u8>, ProtoError> {
        self.recv_frame(Some(deadline))
    }

    fn recv_frame(&mut self, deadline: Option<Instant>) -> Result<Vec<u8>, ProtoError> {
        loop {
            if let Some((body, rest)) = split_frame(&self.buf)? {
                let body = body.to_vec();
                let consumed = self.buf.len() - rest.len();
                self.buf.drain(..consumed);
                return Ok(body);
            }
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ProtoError::Deadline);
                }
                let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
                if crate::sys::wait_readable(&[self.sock.as_fd()], ms)?
                    == crate::sys::Ready::Timeout
                {
                    return Err(ProtoError::Deadline);
                }
            }
            // On the heap, not the stack: a broker thread that holds an open run for its whole
            // life would otherwise keep these pages resident (1,000 open runs: 16 MiB).
            let mut chunk = vec![0u8; 16 * 1024];
            let n = crate::sys::recv_with_fds(&self.sock, &mut chunk, &mut self.fds)?;
            if n == 0 {
                return Err(ProtoError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(len) = self.buf.get(..4) {
                let want = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                if want > MAX_FRAME {
                    return Err(ProtoError::TooLarge(want));
                }
            }
        }
    }

    /// The descriptors received so far, exactly `want` of them.
    pub fn take_fds(&mut self, want: usize) -> Result<Vec<OwnedFd>, ProtoError> {
        let got = std::mem::take(&mut self.fds);
        if got.len() != want {
            return Err(ProtoError::Fds {
                want,
                got: got.len(),
            });
        }
        Ok(got)
    }

    /// Whether bytes are buffered already (a frame may be waiting without a read).
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_delivery_round_trips_and_its_debug_hides_the_base() {
        let u = ProxyUse {
            base: "http://127.0.0.1:1/abcdef0123/".into(),
            host: "git.example.org".into(),
            var: "FORGEJO_URL".into(),
        };
        let m = BrokerMsg::Deliver {
            invocation: "i".into(),
            program: "/usr/bin/git".into(),
            arg0: "git".into(),
            strip: vec![],
            strip_code_vars: false,
            fds: vec![],
            warning: None,
            ssh_auth_sock: None,
            http_proxy: Some(u.clone()),
        };
        let f = encode(&m);
        let (body, _) = split_frame(&f).unwrap().unwrap();
        assert_eq!(decode::<BrokerMsg>(body).unwrap(), m);
        assert!(!format!("{m:?}").contains("abcdef0123"), "{m:?}");
        assert!(format!("{u:?}").contains("git.example.org"));
    }

    #[test]
    fn a_frame_round_trips_and_unknown_fields_are_refused() {
        let m = ClientMsg::Started { pid: 42 };
        let f = encode(&m);
        let (body, rest) = split_frame(&f).unwrap().unwrap();
        assert!(rest.is_empty());
        assert_eq!(decode::<ClientMsg>(body).unwrap(), m);
        let extra = br#"{"type":"started","pid":42,"uid":0}"#;
        assert!(matches!(
            decode::<ClientMsg>(extra),
            Err(ProtoError::Malformed(_))
        ));
        let unknown = br#"{"type":"become-root"}"#;
        assert!(decode::<ClientMsg>(unknown).is_err());
        // A message without fields refuses one too (a unit variant would take it silently).
        assert_eq!(
            decode::<BrokerMsg>(br#"{"type":"recorded"}"#).unwrap(),
            BrokerMsg::Recorded {}
        );
        assert!(matches!(
            decode::<BrokerMsg>(br#"{"type":"recorded","code":0}"#),
            Err(ProtoError::Malformed(_))
        ));
    }

    #[test]
    fn the_agent_socket_messages_decode_strictly() {
        assert_eq!(
            decode::<BrokerMsg>(br#"{"type":"agent-socket"}"#).unwrap(),
            BrokerMsg::AgentSocket {}
        );
        assert_eq!(
            decode::<ClientMsg>(br#"{"type":"agent-socket","path":"/tmp/a/agent.sock"}"#).unwrap(),
            ClientMsg::AgentSocket {
                path: "/tmp/a/agent.sock".into()
            }
        );
        for bad in [
            &br#"{"type":"agent-socket","path":"/x","fd":3}"#[..],
            br#"{"type":"agent-socket"}"#,
            br#"{"type":"agent-socket","path":7}"#,
        ] {
            assert!(
                decode::<ClientMsg>(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(decode::<BrokerMsg>(br#"{"type":"agent-socket","path":"/x"}"#).is_err());
    }

    #[test]
    fn an_oversized_length_is_refused_before_reading_the_body() {
        let mut f = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        f.extend_from_slice(b"{}");
        assert!(matches!(split_frame(&f), Err(ProtoError::TooLarge(_))));
        assert!(split_frame(&[0, 0]).unwrap().is_none());
        assert!(split_frame(&[0, 0, 0, 5, b'{']).unwrap().is_none());
    }

    #[test]
    fn the_deadline_is_for_the_whole_frame() {
        use std::io::Write;
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut rx = Conn::new(b);
        // Half a frame, then silence: Deadline, not a wait for the rest.
        let f = encode(&ClientMsg::Started { pid: 7 });
        a.write_all(&f[..6]).unwrap();
        let t = Instant::now();
        let deadline = t + std::time::Duration::from_millis(150);
        assert!(matches!(rx.recv_by(deadline), Err(ProtoError::Deadline)));
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        // The rest arrives: the frame is whole.
        a.write_all(&f[6..]).unwrap();
        let body = rx
            .recv_by(Instant::now() + std::time::Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            decode::<ClientMsg>(&body).unwrap(),
            ClientMsg::Started { pid: 7 }
        );
    }

    #[test]
    fn the_claimed_version_is_read_leniently() {
        assert_eq!(
            claimed_version(br#"{"type":"exec","hello":{"version":9},"new":1}"#),
            Some(9)
        );
        assert_eq!(claimed_version(br#"{"type":"started","pid":1}"#), None);
        assert_eq!(claimed_version(b"garbage"), None);
        assert_eq!(claimed_version(br#"{"hello":{"version":-1}}"#), None);
    }

    #[test]
    fn descriptors_travel_with_their_frame() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let tx = Conn::new(a);
        let mut rx = Conn::new(b);
        let fd = crate::sys::sealed_memfd(c"t", b"value").unwrap();
        tx.send(&BrokerMsg::Recorded {}, &[&fd]).unwrap();
        assert_eq!(rx.recv::<BrokerMsg>().unwrap(), BrokerMsg::Recorded {});
        let got = rx.take_fds(1).unwrap();
        let mut s = String::new();
        use std::io::Read;
        std::fs::File::from(got.into_iter().next().unwrap())
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "value");
    }
}
