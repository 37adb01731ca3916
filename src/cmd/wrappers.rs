//! `aap wrappers install --dir DIR [--cap C...]`: PATH shims that run a program through
//! `aap-exec CAP`.
//!
//! A shim is a POSIX sh script. It finds the real program by walking PATH, skipping its own
//! directory and any other directory of aap shims (so it can never recurse into itself), and
//! runs `aap-exec CAP -- /abs/real/PROG "$@"`. Inside an `aap-exec` child (where the credential
//! is already in place, e.g. a git hook running git) it runs the real program directly. A shim
//! whose real program is missing exits 127 with a message.
//!
//! Without `--cap`, the shims shipped in `wrappers/` (embedded in the binary) are installed;
//! with `--cap`, one shim per program the capability names (`allowed_commands`, or a
//! wrapped-command's `command`). Installing is idempotent and never overwrites a file that does
//! not carry our marker line.

#![forbid(unsafe_code)]

use crate::catalog::{Backing, Catalog};
use crate::config::Config;
use crate::error::{Error, Kind, Result, shell_quote};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The second line of every shim we write; a file without it is never overwritten.
pub const MARKER: &str = "# aap-wrapper: written by `aap wrappers install`, which rewrites it; change the catalog, not this file";

/// A file in a directory of shims, so that a shim skips every shim directory in PATH.
pub const DIR_MARKER: &str = ".aap-wrappers";

/// The shims shipped in `wrappers/`: (program, text). Their `aap_exec=aap-exec` line is replaced
/// by the absolute path of the installed aap-exec.
pub const EMBEDDED: &[(&str, &str)] = &[("git", include_str!("../../wrappers/git"))];

/// The line of a shim naming aap-exec, as shipped (found in PATH).
const AAP_EXEC_LINE_SHIPPED: &str = "aap_exec=aap-exec\n";

/// The part of a `git` shim that decides whether this git invocation needs the credential.
/// Only what reaches a remote does (clone, fetch, pull, push, ls-remote, the remote-touching
/// forms of `remote`, `submodule`, `lfs`, `archive --remote`, ...); `git status`, `log`, `diff`
/// and the other local commands run the real git directly: no session, no audit line. Global
/// options before the subcommand (`-C DIR`, `-c K=V`, `--git-dir DIR`, ...) are skipped. What
/// the shim does not know (an alias, a `git-foo` on PATH, an unknown option) goes through
/// aap-exec: the broker decides, as for any use.
const GIT_GATE: &str = r#"
# needs_credential ARGS...: whether git ARGS may reach a remote (then it goes through aap-exec).
needs_credential() {
  while [ $# -gt 0 ]; do
    case $1 in
      -C|-c|--git-dir|--work-tree|--namespace|--config-env|--super-prefix|--attr-source|--list-cmds)
        [ $# -ge 2 ] || return 0
        shift 2 ;;
      --git-dir=*|--work-tree=*|--namespace=*|--config-env=*|--super-prefix=*|--attr-source=*|--list-cmds=*|--exec-path=*)
        shift ;;
      -p|--paginate|-P|--no-pager|--bare|--no-replace-objects|--literal-pathspecs|--glob-pathspecs|--noglob-pathspecs|--icase-pathspecs|--no-optional-locks|--no-advice|--no-lazy-fetch)
        shift ;;
      --version|-v|--help|-h|--html-path|--man-path|--info-path|--exec-path)
        return 1 ;;
      -*) return 0 ;;
      *) break ;;
    esac
  done
  [ $# -gt 0 ] || return 1
  sub=$1
  shift
  case $sub in
    clone|fetch|pull|push|ls-remote|fetch-pack|send-pack|request-pull|submodule|lfs|maintenance|credential)
      return 0 ;;
    remote)
      for a; do
        case $a in update|prune|show|set-head|-f|--fetch) return 0 ;; esac
      done
      return 1 ;;
    archive)
      for a; do
        case $a in --remote|--remote=*) return 0 ;; esac
      done
      return 1 ;;
    add|am|annotate|apply|bisect|blame|branch|bundle|cat-file|check-attr|check-ignore|check-mailmap|\
    check-ref-format|checkout|cherry|cherry-pick|clean|column|commit|commit-graph|commit-tree|config|\
    count-objects|describe|diff|diff-files|diff-index|diff-tree|difftool|fast-export|fast-import|\
    for-each-ref|format-patch|fsck|gc|grep|hash-object|help|init|interpret-trailers|log|ls-files|\
    ls-tree|mailinfo|mailsplit|merge|merge-base|merge-file|merge-tree|mergetool|mktag|mktree|mv|\
    name-rev|notes|pack-refs|prune|range-diff|read-tree|rebase|reflog|repack|replace|rerere|reset|\
    restore|rev-list|rev-parse|revert|rm|shortlog|show|show-branch|show-ref|sparse-checkout|stash|\
    status|stripspace|switch|symbolic-ref|tag|update-index|update-ref|var|verify-commit|verify-pack|\
    verify-tag|version|whatchanged|worktree|write-tree)
      return 1 ;;
    *) return 0 ;;
  esac
}
"#;

/// The text of the shim that runs `prog` through `aap_exec CAP`.
pub fn shim(cap: &str, prog: &str, aap_exec: &str) -> String {
    let is_git = Path::new(prog).file_name().is_some_and(|n| n == "git");
    let gate = if is_git { GIT_GATE } else { "" };
    let direct = if is_git {
        "if [ -n \"$nested\" ] || ! needs_credential \"$@\"; then\n  exec \"$real\" \"$@\" # nested, or git that reaches no remote: no credential, no session, no audit line\nfi"
    } else {
        "if [ -n \"$nested\" ]; then\n  exec \"$real\" \"$@\"\nfi"
    };
    format!(
        r#"#!/bin/sh
{MARKER}
# Runs {prog} through `aap-exec {cap}`, with the real {prog} found in PATH outside any directory
# of aap shims. See docs/backings.md, "PATH wrappers".
cap={cap}
prog={prog}
aap_exec={aap_exec}
{gate}
if [ -n "${{AAP_EXEC_INVOCATION:-}}" ]; then
  nested=1 # already inside an aap-exec child: its credential is in place, run the real program
else
  nested=
fi
here=$(CDPATH= cd -- "$(dirname -- "$0")" 2>/dev/null && pwd -P) || here=
real=
set -f
save_ifs=$IFS
IFS=:
for d in $PATH; do
  [ -n "$d" ] || d=.
  [ -f "$d/$prog" ] && [ -x "$d/$prog" ] || continue
  [ -e "$d/{DIR_MARKER}" ] && continue
  dd=$(CDPATH= cd -- "$d" 2>/dev/null && pwd -P) || continue
  [ "$dd" = "$here" ] && continue
  real=$dd/$prog
  break
done
IFS=$save_ifs
set +f
if [ -z "$real" ]; then
  echo "aap: error: wrapper $0: no real $prog in PATH outside the wrapper directory ${{here:-?}}" >&2
  echo "aap: hint: install $prog, or put the directory that holds it in PATH after ${{here:-the wrapper directory}}" >&2
  exit 127
fi
{direct}
if ! command -v "$aap_exec" >/dev/null 2>&1; then
  echo "aap: error: wrapper $0: $aap_exec not found" >&2
  echo "aap: hint: reinstall the wrappers: aap wrappers install --dir ${{here:-DIR}}" >&2
  exit 127
fi
exec "$aap_exec" "$cap" -- "$real" "$@"
"#,
        cap = shell_quote(cap),
        prog = shell_quote(prog),
        aap_exec = shell_quote(aap_exec),
    )
}

/// `aap wrappers install`.
pub fn install(dir: &Path, caps: &[String]) -> Result<u8> {
    let aap_exec = aap_exec_path()?;
    let mut plan: BTreeMap<String, (String, String)> = BTreeMap::new(); // prog -> (cap, text)
    if caps.is_empty() {
        for (prog, text) in EMBEDDED {
            let text = text.replacen(
                AAP_EXEC_LINE_SHIPPED,
                &format!("aap_exec={}\n", shell_quote(&aap_exec)),
                1,
            );
            plan.insert(prog.to_string(), ("(shipped)".into(), text));
        }
    } else {
        let cfg = Config::load()?;
        let catalog = Catalog::load(&cfg.catalog.value)?;
        for id in caps {
            let cap = catalog
                .get(id)
                .ok_or_else(|| catalog.unknown(id, Kind::Config))?;
            let mut progs: Vec<String> = cap.allowed_commands.clone().unwrap_or_default();
            if let Backing::WrappedCommand { command, .. } = &cap.backing {
                progs.push(command.clone());
            }
            if progs.is_empty() {
                return Err(Error::config(format!(
                    "capability `{id}` names no program (no allowed_commands), so there is nothing to wrap"
                ))
                .hint(format!(
                    "add allowed_commands: [PROG] to `{id}` in the catalog, then: aap wrappers install --dir {} --cap {id}",
                    shell_quote(&dir.to_string_lossy())
                )));
            }
            for p in progs {
                let name = Path::new(&p)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if name.is_empty() || name.starts_with('.') {
                    return Err(Error::config(format!(
                        "capability `{id}` names the program {p:?}, which cannot be a wrapper's file name"
                    ))
                    .hint(format!("aap catalog show {id}")));
                }
                if let Some((other, _)) = plan.get(&name)
                    && other != id
                {
                    return Err(Error::config(format!(
                        "both `{other}` and `{id}` name the program {name}; one wrapper can run it through only one capability"
                    ))
                    .hint(format!(
                        "install one of them: aap wrappers install --dir {} --cap {other}",
                        shell_quote(&dir.to_string_lossy())
                    )));
                }
                let text = shim(id, &name, &aap_exec);
                plan.insert(name, (id.clone(), text));
            }
        }
    }

    let qdir = shell_quote(&dir.to_string_lossy());
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::config(format!(
            "cannot create the wrapper directory {}: {e}",
            dir.display()
        ))
        .hint(format!("check the parent's permissions: ls -ld {qdir}"))
    })?;
    // Refuse everything before writing anything.
    for prog in plan.keys() {
        let path = dir.join(prog);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(
                    Error::config(format!("cannot inspect {}: {e}", path.display()))
                        .hint(format!("ls -l {}", shell_quote(&path.to_string_lossy()))),
                );
            }
            Ok(m) => {
                let ours = m.file_type().is_file()
                    && std::fs::read_to_string(&path)
                        .ok()
                        .is_some_and(|t| t.lines().nth(1) == Some(MARKER));
                if !ours {
                    let q = shell_quote(&path.to_string_lossy());
                    return Err(Error::config(format!(
                        "{} exists and was not written by aap; it is left alone",
                        path.display()
                    ))
                    .hint(format!(
                        "move it away and install again: mv {q} {q}.orig && aap wrappers install --dir {qdir}{}",
                        caps.iter().map(|c| format!(" --cap {c}")).collect::<String>()
                    )));
                }
            }
        }
    }
    write_if_changed(
        &dir.join(DIR_MARKER),
        "aap PATH wrappers live here; shims skip this directory when looking for the real program.\n",
        0o644,
    )?;
    let mut out = std::io::stdout().lock();
    for (prog, (cap, text)) in &plan {
        let path = dir.join(prog);
        let changed = write_if_changed(&path, text, 0o755)?;
        let _ = writeln!(
            out,
            "{} {} ({})",
            if changed { "installed" } else { "unchanged" },
            path.display(),
            if cap == "(shipped)" {
                "shipped shim".to_string()
            } else {
                format!("aap-exec {cap}")
            }
        );
    }
    let _ = writeln!(
        out,
        "put {} first in PATH: export PATH={}:\"$PATH\"",
        dir.display(),
        qdir
    );
    Ok(0)
}

/// Write `path` atomically (a temporary file in the same directory, then rename) unless it
/// already holds exactly `text` with `mode`. Returns whether it wrote.
fn write_if_changed(path: &Path, text: &str, mode: u32) -> Result<bool> {
    if let Ok(m) = std::fs::symlink_metadata(path)
        && m.file_type().is_file()
        && m.permissions().mode() & 0o7777 == mode
        && std::fs::read_to_string(path).is_ok_and(|t| t == text)
    {
        return Ok(false);
    }
    let fail = |e: std::io::Error| {
        Error::config(format!("cannot write {}: {e}", path.display())).hint(format!(
            "check the directory's permissions: ls -ld {}",
            shell_quote(&path.parent().unwrap_or(Path::new(".")).to_string_lossy())
        ))
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.aap-new"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = crate::sys::create_new(&tmp, mode).map_err(fail)?;
    f.write_all(text.as_bytes()).map_err(fail)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(fail)?;
    f.sync_all().map_err(fail)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(fail)?;
    Ok(true)
}

/// The absolute path of `aap-exec`: next to the running `aap`.
fn aap_exec_path() -> Result<String> {
    let exe = std::env::current_exe().map_err(|e| {
        Error::internal(format!("cannot find the path of aap itself: {e}"))
            .hint("check that /proc is mounted: ls /proc/self/exe")
    })?;
    let p = exe.with_file_name("aap-exec");
    if !crate::sys::can_execute(&p) {
        return Err(Error::config(format!(
            "aap-exec is not next to aap ({} is missing or not executable); the wrappers would have nothing to run",
            p.display()
        ))
        .hint(format!("install aap-exec there: ls -l {}", shell_quote(&p.to_string_lossy()))));
    }
    Ok(p.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_git_shim_is_the_generated_one() {
        // wrappers/git is what `shim` renders. After changing the template, regenerate it:
        // AAP_REGENERATE_WRAPPERS=1 cargo test --lib wrappers
        let want = shim("forgejo-pat-read", "git", "aap-exec");
        if std::env::var_os("AAP_REGENERATE_WRAPPERS").is_some() {
            let p = concat!(env!("CARGO_MANIFEST_DIR"), "/wrappers/git");
            std::fs::write(p, &want).unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
            return;
        }
        assert_eq!(
            EMBEDDED[0].1, want,
            "wrappers/git drifted from cmd::wrappers::shim"
        );
        assert!(EMBEDDED[0].1.contains(AAP_EXEC_LINE_SHIPPED));
    }

    #[test]
    fn names_are_quoted() {
        let s = shim("c", "it's", "/opt/my aap/aap-exec");
        assert!(s.contains("prog='it'\\''s'\n"), "{s}");
        assert!(s.contains("aap_exec='/opt/my aap/aap-exec'\n"), "{s}");
    }
}
