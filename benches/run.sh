#!/usr/bin/env bash
# Every benchmark, one command: builds in the release (bench) profile, runs each benchmark in
# benches/ (each starts its own `aap dev-server --tls` in process and sets up its own
# installation, grants and sessions; process benchmarks alternate with /bin/true in the same
# run and are cross-checked with hyperfine), collects one JSON line per measurement, and
# regenerates the section of BENCHMARKS.md between `<!-- bench:run.sh begin -->` and
# `<!-- bench:run.sh end -->` (table, date, machine, load, commit, command).
#
# Usage: benches/run.sh [--quick] [--no-hyperfine] [--wait-load L] [--only NAME]...
#   --quick         smoke run: few rounds, to check that everything works; writes the table to
#                   the results directory only, BENCHMARKS.md is left alone
#   --no-hyperfine  skip the hyperfine cross-check
#   --wait-load L   first wait (up to 15 minutes) until the 1-minute load average is below L;
#                   on a shared machine other work inflates every ratio
#   --only NAME     run only this benchmark (catalog, sessions, fetch, exec, ssh_agent, git);
#                   repeatable; BENCHMARKS.md is left alone
# Results (JSON lines, logs, hyperfine exports): $CARGO_TARGET_DIR/bench-results/<time>/.
set -euo pipefail
cd "$(dirname "$0")/.."

args="$*"
all=(catalog sessions fetch exec ssh_agent git broker)
quick=0
hyper=1
only=()
wait_load=""
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --no-hyperfine) hyper=0 ;;
    --wait-load)
      [ $# -ge 2 ] || { echo "run.sh: --wait-load needs a load average, e.g. 1.0" >&2; exit 2; }
      wait_load="$2"
      shift
      ;;
    --only)
      [ $# -ge 2 ] || { echo "run.sh: --only needs a benchmark name" >&2; exit 2; }
      only+=("$2")
      shift
      ;;
    -h | --help) usage; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
benches=("${all[@]}")
if [ "${#only[@]}" -gt 0 ]; then
  for b in "${only[@]}"; do
    case " ${all[*]} " in
      *" $b "*) ;;
      *) echo "run.sh: unknown benchmark $b (one of: ${all[*]})" >&2; exit 2 ;;
    esac
  done
  benches=("${only[@]}")
fi

# What the benchmarks need: real OpenSSH (grant signing, ssh-agent), git with http-backend,
# sudo (the peer the exec path is compared with), setpriv, and hyperfine for the cross-check. We are root on the project's machines.
need=()
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
command -v ssh-agent >/dev/null 2>&1 || need+=(openssh-client)
command -v git >/dev/null 2>&1 || need+=(git)
command -v sudo >/dev/null 2>&1 || need+=(sudo)       # the exec bench pairs with sudo -u nobody
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)   # the broker bench's three agent uids
if [ "$hyper" = 1 ] && ! command -v hyperfine >/dev/null 2>&1; then need+=(hyperfine); fi
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "run.sh: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  elif [ "${need[*]}" = hyperfine ]; then
    echo "run.sh: hyperfine is not installed: no cross-check (hint: as root: apt-get install -y hyperfine)" >&2
    hyper=0
  else
    echo "run.sh: error: missing ${need[*]}" >&2
    echo "run.sh: hint: as root (su -c, or a root shell): apt-get install -y ${need[*]}" >&2
    exit 1
  fi
fi

target="${CARGO_TARGET_DIR:-target}"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="$target/bench-results/$stamp"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export AAP_BENCH_JSON="$out/results.jsonl" AAP_BENCH_DIR="$out"
: >"$AAP_BENCH_JSON"
if [ "$quick" = 1 ]; then export AAP_BENCH_QUICK=1; else unset AAP_BENCH_QUICK; fi
if [ "$hyper" = 0 ]; then export AAP_BENCH_HYPERFINE=0; fi

commit="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  commit="$commit (with uncommitted changes)"
fi

echo "run.sh: building (release profile)" >&2
cargo bench --locked --no-run

load1() { cut -d' ' -f1 /proc/loadavg; }
if [ -n "$wait_load" ]; then
  for _ in $(seq 90); do
    awk -v l="$(load1)" -v m="$wait_load" 'BEGIN { exit !(l < m) }' && break
    echo "run.sh: load average $(load1) >= $wait_load, waiting" >&2
    sleep 10
  done
fi
if awk -v l="$(load1)" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
  echo "run.sh: warning: load average $(load1) on $(nproc) CPUs; other work will inflate the numbers" >&2
fi

# Other processes that were busy (by average CPU since they started), for the record.
# (procps may be missing on a minimal image: then say so rather than stop.)
busy="$( (ps -eo pid=,ni=,pcpu=,comm= --sort=-pcpu 2>/dev/null || echo "0 0 0 unknown-(no-ps)") |
  awk -v me=$$ '$1 != me && $3 >= 20 || $4 == "unknown-(no-ps)" {
  printf "%s%s (nice %s, %s%% CPU)", (n++ ? ", " : ""), $4, $2, $3 }')"

start="$(date +%s)"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
date_start="$(date -u '+%Y-%m-%d %H:%M UTC')"
for b in "${benches[@]}"; do
  echo "run.sh: == $b ==" >&2
  cargo bench --locked --bench "$b" 2>&1 | tee "$out/$b.log"
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
secs=$(($(date +%s) - start))

cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
mem="$(awk '/^MemTotal:/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
cmd="benches/run.sh${args:+ $args}"
hf="$(hyperfine --version 2>/dev/null || echo 'not used')"
[ "$hyper" = 0 ] && hf="not used"
meta=(
  --meta "Command=\`$cmd\` (from a clone of the repository; needs cargo, and installs OpenSSH, git and hyperfine from Debian when missing)"
  --meta "Date=$date_start; the benchmarks took ${secs} s (build not included)"
  --meta "Machine=$(nproc) CPUs ($cpu), $mem RAM, Linux $(uname -r), $(rustc --version | cut -d' ' -f1-2), $(git --version), OpenSSH $(ssh -V 2>&1 | cut -d' ' -f1 | sed 's/^OpenSSH_//;s/,$//'), $hf"
  --meta "Load average (1, 5, 15 min)=$load_before before, $load_after after (the machine is shared); other busy processes at the start: ${busy:-none}"
  --meta "Commit=$commit"
  --meta "Raw results=\`bench-results/$stamp/\` in the cargo target directory (JSON lines, logs, hyperfine exports; not committed)"
)
write=(--section "$out/section.md")
if [ "$quick" = 0 ] && [ "${#only[@]}" = 0 ]; then
  write+=(--doc "$PWD/BENCHMARKS.md")
fi
cargo bench --locked --bench report -- --results "$AAP_BENCH_JSON" "${write[@]}" "${meta[@]}"
echo "run.sh: done in ${secs} s; results in $out" >&2
