//! A tmux server of a test's own, for tests under a real terminal: start a window, type, read
//! the screen.
#![allow(dead_code)]

use super::{missing_tool, stderr, stdout};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A tmux server of its own (socket in the test's dir), killed on drop.
pub struct Tmux {
    sock: PathBuf,
}

impl Tmux {
    /// `None` (a skip, or a failure in the full run) when tmux is not installed.
    pub fn new(test: &str, dir: &Path) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            missing_tool(test, "tmux", "apt-get install -y tmux");
            return None;
        }
        Some(Tmux {
            sock: dir.join("tmux.sock"),
        })
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        let o = Command::new("tmux")
            .arg("-S")
            .arg(&self.sock)
            .args(args)
            .env_remove("TMUX")
            .output()
            .unwrap();
        assert!(o.status.success(), "tmux {args:?}: {}", stderr(&o));
        o
    }

    /// A detached 200x50 window `t` running `script` under sh, kept on the screen after it
    /// exits.
    pub fn start(&self, script: &str) {
        self.cmd(&[
            "new-session",
            "-d",
            "-x",
            "200",
            "-y",
            "50",
            "-s",
            "t",
            "sh",
            "-c",
            script,
        ]);
        self.cmd(&["set-option", "-t", "t", "remain-on-exit", "on"]);
    }

    pub fn screen(&self) -> String {
        stdout(&self.cmd(&["capture-pane", "-p", "-t", "t"]))
    }

    pub fn keys(&self, keys: &[&str]) {
        let mut a = vec!["send-keys", "-t", "t"];
        a.extend_from_slice(keys);
        self.cmd(&a);
    }

    /// Type `text` and Enter.
    pub fn type_line(&self, text: &str) {
        self.keys(&["-l", text]);
        self.keys(&["Enter"]);
    }

    /// Wait until the screen contains `want`; the screen.
    pub fn wait_for(&self, want: &str) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.screen();
            if s.contains(want) {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "{want:?} never appeared; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until a shell's `echo RC:$?:` shows a status (`RC:N:`, which the typed line is
    /// not); the last one shown.
    pub fn wait_status(&self) -> i32 {
        let t0 = Instant::now();
        loop {
            let s = self.screen();
            let last = s
                .match_indices("RC:")
                .filter_map(|(i, _)| {
                    let rest = &s[i + 3..];
                    let n = rest.find(':')?;
                    rest[..n].parse::<i32>().ok()
                })
                .last();
            if let Some(rc) = last {
                return rc;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no status shown; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.sock)
            .arg("kill-server")
            .output();
    }
}
