#!/usr/bin/env bash
# The whole test suite, on a fresh machine of this image: installs what the tests need (real
# OpenSSH and git, rsyslog for the audit-shipping test, man-db to render the man pages,
# systemd-analyze for the units in contrib/systemd; we are root on these machines), runs every
# test, then checks the dependency tree with cargo-deny (licenses, bans, sources; offline:
# docs/supply-chain.md).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
command -v ssh-agent >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v git >/dev/null 2>&1 || need+=(git)
[ -x /usr/sbin/rsyslogd ] || need+=(rsyslog)
command -v man >/dev/null 2>&1 || need+=(man-db)
command -v chattr >/dev/null 2>&1 || need+=(e2fsprogs)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)   # tests/systemd_units.rs
command -v g++ >/dev/null 2>&1 || need+=(g++)   # libfuzzer-sys builds libFuzzer (C++)
command -v zsh >/dev/null 2>&1 || need+=(zsh)   # tests/manual.rs: completions in a real zsh
command -v fish >/dev/null 2>&1 || need+=(fish) # ... and in a real fish
command -v tmux >/dev/null 2>&1 || need+=(tmux)   # tests/requests.rs: terminal tests
command -v gdb >/dev/null 2>&1 || need+=(gdb)     # tests/broker_two_uids.rs: the agent traces aap-exec
[ -e "$(cc -print-file-name=libc.a 2>/dev/null)" ] || need+=(libc6-dev)   # build.rs: a static aap-exec
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "test-all: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "test-all: error: missing ${need[*]}" >&2
    echo "test-all: hint: as root (su -c, or a root shell): apt-get install -y ${need[*]}" >&2
    exit 1
  fi
fi

# Every crate Cargo.lock names, for every platform, so that nothing below depends on what a
# cargo cache happens to hold: a build fetches only this platform's crates, but the offline
# supply-chain check reads all of them (the root and the fuzz workspace alike).
echo "test-all: fetching every locked crate (cargo fetch --locked)" >&2
cargo fetch --locked
cargo fetch --locked --manifest-path fuzz/Cargo.toml

# The full run: a missing local tool (sshd, ssh-keygen, git, rsyslogd) fails its test instead of
# skipping it, and every skip that remains (a live Infisical that is not configured, a file
# system without chattr +a, ...) is written to the skip log and listed in the summary below.
skip_log=$(mktemp "${TMPDIR:-/tmp}/aap-test-skips.XXXXXX")
# Every hint a failing aap or aap-exec prints in a test is followed in a copy of its world and
# judged (tests/common/follow.rs); each outcome is a line of the hint log, counted below.
hint_log=$(mktemp "${TMPDIR:-/tmp}/aap-test-hints.XXXXXX")
trap 'rm -f "$skip_log" "$hint_log"' EXIT
export AAP_TEST_FULL=1 AAP_TEST_SKIP_LOG="$skip_log"
export AAP_TEST_FOLLOW_HINTS=1 AAP_TEST_HINT_LOG="$hint_log"
hint_summary() {
  echo "test-all: hints followed: $(grep -c '^FOLLOWED ' "$hint_log"), judged by the allowlist: $(grep -c '^ALLOWLISTED ' "$hint_log"), failed: $(grep -c '^FAILED ' "$hint_log")" >&2
  grep '^FAILED ' "$hint_log" | sed 's/^/test-all:   /' >&2 || true
}
cargo test --locked || { hint_summary; exit 1; }
hint_summary
skips=$(sort -u "$skip_log" | wc -l)
if [ "$skips" -gt 0 ]; then
  echo "test-all: $skips test(s) or test parts skipped; each says why:" >&2
  sort -u "$skip_log" | sed 's/^/test-all:   /' >&2
else
  echo "test-all: no test skipped" >&2
fi

# The fuzz targets (fuzz/, its own workspace) must keep compiling; CI builds them but does not
# run them, and needs no cargo-fuzz: a plain build, no sanitizer (libfuzzer-sys compiles
# libFuzzer with the image's g++). Running them: docs/fuzzing.md.
echo "test-all: building the fuzz targets (cargo build --manifest-path fuzz/Cargo.toml)" >&2
cargo build --locked --manifest-path fuzz/Cargo.toml --bins

# Supply chain: the pinned cargo-deny, built from the Rust package registry when missing. Advisories need the
# RustSec database from GitHub, which this network does not reach: docs/supply-chain.md.
deny_version=0.20.2
if ! cargo deny --version 2>/dev/null | grep -qx "cargo-deny $deny_version"; then
  echo "test-all: installing cargo-deny $deny_version" >&2
  cargo install --locked --quiet cargo-deny --version "$deny_version"
fi
cargo deny --offline --locked check licenses bans sources
