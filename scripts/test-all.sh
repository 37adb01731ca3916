#!/usr/bin/env bash
# The whole test suite, on a fresh machine of this image: installs what the tests need (real
# OpenSSH and git, and rsyslog for the audit-shipping test; we are root on these machines), then
# runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
command -v ssh-agent >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v git >/dev/null 2>&1 || need+=(git)
[ -x /usr/sbin/rsyslogd ] || need+=(rsyslog)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "test-all: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "test-all: error: missing ${need[*]}" >&2
    echo "test-all: hint: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
fi

cargo test --locked
