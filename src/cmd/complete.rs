//! Dynamic shell completion: `aap __complete --program P --index N -- WORDS...` (hidden).
//!
//! The completion scripts `aap completions SHELL` prints are clap's static ones (subcommands,
//! flags, files), plus a small wrapper per shell that first asks this command whether the word
//! under the cursor is an id: a capability (`--cap`, `aap-exec CAP`, `catalog show ID`, ...), a
//! session (`session revoke ID`, `--session`), a request (`approve REQ`, `deny REQ`) or an agent
//! (`--agent`). If it is, this prints the candidates, one `ID<TAB>description` a line, from the
//! catalog and the state dir, and exits 0 (printing nothing when they cannot be read: a
//! completion never prints an error); if not, it exits 1 and the shell's static completion runs.
//! Which word is an id is read from the clap definitions themselves (option names and
//! positional ids), so it follows the real command line.

#![forbid(unsafe_code)]

use clap::CommandFactory;
use std::time::SystemTime;

/// What an id position holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Capability,
    Session,
    Request,
    Agent,
}

/// The kind of a value-taking option, by its long name.
fn option_kind(long: &str) -> Option<Kind> {
    match long {
        "cap" | "check" => Some(Kind::Capability),
        "session" => Some(Kind::Session),
        "agent" => Some(Kind::Agent),
        _ => None,
    }
}

/// The kind of a positional argument, by its id and the command it belongs to.
fn positional_kind(path: &[String], id: &str) -> Option<Kind> {
    match id {
        "cap" => Some(Kind::Capability),
        "req" => Some(Kind::Request),
        "id" if path.first().is_some_and(|p| p == "session") => Some(Kind::Session),
        "id" if path.first().is_some_and(|p| p == "catalog") => Some(Kind::Capability),
        _ => None,
    }
}

fn takes_value(a: &clap::Arg) -> bool {
    a.get_action().takes_values()
}

/// Which kind of id the word at `index` of `words` (`words[0]` is the program) is, if any.
pub fn classify(root: &clap::Command, words: &[String], index: usize) -> Option<Kind> {
    let mut root = root.clone();
    root.build();
    let mut cmd = &root;
    let mut path: Vec<String> = Vec::new();
    let mut positionals = 0usize;
    let before = words.get(1..index.min(words.len())).unwrap_or(&[]);
    let mut i = 0;
    // What the word at the cursor is the value of, when the word before it is an option.
    let mut value_of: Option<String> = None;
    while i < before.len() {
        let w = &before[i];
        value_of = None;
        if w == "--" {
            return None; // after `--`: the command aap-exec runs
        }
        if let Some(long) = w.strip_prefix("--") {
            let (name, has_eq) = match long.split_once('=') {
                Some((n, _)) => (n, true),
                None => (long, false),
            };
            let arg = cmd.get_arguments().find(|a| a.get_long() == Some(name));
            if arg.is_some_and(takes_value) && !has_eq {
                // bash splits `--cap=x` into `--cap`, `=`, `x`.
                let skip = if before.get(i + 1).is_some_and(|n| n == "=") {
                    2
                } else {
                    1
                };
                if i + skip >= before.len() {
                    value_of = Some(name.to_string());
                    break;
                }
                i += skip + 1;
                continue;
            }
            i += 1;
            continue;
        }
        if w.len() > 1 && w.starts_with('-') {
            let c = w.chars().nth(1);
            let arg = cmd.get_arguments().find(|a| a.get_short() == c);
            if let Some(a) = arg.filter(|a| takes_value(a)) {
                if w.chars().count() == 2 {
                    if i + 1 >= before.len() {
                        value_of = a.get_long().map(str::to_string);
                        break;
                    }
                    i += 2;
                    continue;
                }
            }
            i += 1;
            continue;
        }
        if positionals == 0
            && let Some(sub) = cmd.find_subcommand(w)
        {
            path.push(sub.get_name().to_string());
            cmd = sub;
            i += 1;
            continue;
        }
        positionals += 1;
        i += 1;
    }
    if let Some(name) = value_of {
        return option_kind(&name);
    }
    let current = words.get(index).map(String::as_str).unwrap_or("");
    if current.starts_with('-') {
        return None;
    }
    if positionals == 0 && cmd.has_subcommands() {
        return None;
    }
    let arg = cmd.get_positionals().nth(positionals)?;
    if arg.is_last_set() {
        return None;
    }
    positional_kind(&path, arg.get_id().as_str())
}

/// The candidates for `kind`: (id, description). Anything unreadable gives none.
pub fn candidates(kind: Kind) -> Vec<(String, String)> {
    let Ok(cfg) = crate::config::Config::load() else {
        return Vec::new();
    };
    let now = crate::timefmt::unix_secs(SystemTime::now());
    match kind {
        Kind::Capability => crate::catalog::Catalog::load(&cfg.catalog.value)
            .map(|cat| {
                cat.capabilities()
                    .iter()
                    .map(|c| {
                        (
                            c.id.clone(),
                            format!("{} tier: {}", c.audit_tier, one_line(&c.description)),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        Kind::Agent => cfg
            .agents
            .keys()
            .map(|a| (a.clone(), "agent".to_string()))
            .collect(),
        Kind::Session => {
            let st = crate::state::StateDir::of(&cfg);
            let ids = super::session::session_ids(&st).unwrap_or_default();
            let mut out = Vec::new();
            for id in ids.into_iter().rev().take(500) {
                if st.is_revoked(&id).unwrap_or(true) {
                    continue;
                }
                let Ok(bytes) = crate::state::read_state_file(&st.grant_path(&id)) else {
                    continue;
                };
                let Ok(g) = crate::grant::Grant::decode(&bytes, &id) else {
                    continue;
                };
                if g.expires_at <= now {
                    continue;
                }
                let caps: Vec<&str> = g.grant.capabilities.iter().map(|c| c.id.as_str()).collect();
                out.push((
                    id.to_string(),
                    format!(
                        "{}: {} until {}",
                        g.grant.agent,
                        caps.join(","),
                        g.grant.expires_at
                    ),
                ));
            }
            out
        }
        Kind::Request => {
            let st = crate::state::StateDir::of(&cfg);
            let ids = crate::request::list_ids(&st).unwrap_or_default();
            ids.into_iter()
                .filter_map(|id| match crate::request::load(&st, &id) {
                    Ok(Some(r)) if r.expires_at > now => Some((
                        id.to_string(),
                        format!(
                            "{}: {} ({})",
                            r.req.agent,
                            r.req.capability,
                            one_line(&r.req.reason)
                        ),
                    )),
                    _ => None,
                })
                .collect()
        }
    }
}

/// A description on one line, without tabs, at most 80 characters.
fn one_line(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > 80 {
        format!("{}...", s.chars().take(77).collect::<String>())
    } else {
        s
    }
}

/// `aap __complete`: exit 0 with the candidates when the word is an id, 1 otherwise.
pub fn run(program: &str, index: usize, words: &[String]) -> u8 {
    let root = if program == "aap-exec" {
        crate::exec_cli::ExecCli::command()
    } else {
        crate::cli::Cli::command()
    };
    let Some(kind) = classify(&root, words, index) else {
        return 1;
    };
    let prefix = words.get(index).map(String::as_str).unwrap_or("");
    let mut out = String::new();
    for (id, desc) in candidates(kind) {
        if id.starts_with(prefix) {
            out.push_str(&id);
            out.push('\t');
            out.push_str(&desc);
            out.push('\n');
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().write_all(out.as_bytes());
    0
}

/// The wrapper appended to (or spliced into) clap's script for `shell`, so that id positions
/// complete dynamically. `func` is clap's completion function (`_aap`, `_aap-exec`).
pub fn dynamic_part(shell: clap_complete::Shell, program: &str, script: &str) -> String {
    // clap's function: `_aap`, `_aap__exec` in bash (the name `complete -F` registers).
    let func = script
        .lines()
        .rev()
        .find_map(|l| l.trim_start().strip_prefix("complete -F "))
        .and_then(|rest| rest.split_whitespace().next())
        .filter(|_| shell == clap_complete::Shell::Bash)
        .map_or_else(|| format!("_{program}"), str::to_string);
    let dynf = format!("_{}_dynamic", program.replace('-', "_"));
    match shell {
        clap_complete::Shell::Bash => format!(
            r#"{script}
# Dynamic ids (capabilities, sessions, requests, agents), asked from aap itself; everything else
# is the static completion above.
{dynf}() {{
    local out
    if out=$("${{COMP_WORDS[0]%-exec}}" __complete --program {program} --index "$COMP_CWORD" -- "${{COMP_WORDS[@]}}" 2>/dev/null); then
        local IFS=$'\n'
        COMPREPLY=($(compgen -W "$(printf '%s\n' "$out" | cut -f1)" -- "${{COMP_WORDS[COMP_CWORD]}}"))
        return 0
    fi
    {func} "$@"
}}
complete -F {dynf} -o nosort -o bashdefault -o default {program}
"#
        ),
        clap_complete::Shell::Zsh => {
            let body = format!(
                r#"# Dynamic ids (capabilities, sessions, requests, agents), asked from aap itself; everything else
# is the static completion above.
{dynf}() {{
    local out
    if out=$("${{words[1]%-exec}}" __complete --program {program} --index $((CURRENT - 1)) -- "${{words[@]}}" 2>/dev/null); then
        local -a ids
        ids=("${{(@f)${{out//$'\t'/:}}}}")
        [[ -n $out ]] && _describe -t ids 'id' ids
        return 0
    fi
    {func} "$@"
}}
"#
            );
            // clap ends with: if [ "$funcstack[1]" = "_aap" ]; then _aap "$@"; else compdef _aap aap; fi
            let tail_call = format!("    {func} \"$@\"\nelse\n    compdef {func} {program}\nfi");
            let new_tail = format!("    {dynf} \"$@\"\nelse\n    compdef {dynf} {program}\nfi");
            match script.rfind(&tail_call) {
                Some(at) => {
                    let start = script[..at].rfind("if [ \"$funcstack[1]\"").unwrap_or(at);
                    format!(
                        "{}{body}{}{new_tail}{}",
                        &script[..start],
                        &script[start..at],
                        &script[at + tail_call.len()..]
                    )
                }
                None => format!("{script}\n{body}compdef {dynf} {program}\n"),
            }
        }
        clap_complete::Shell::Fish => format!(
            r#"{script}
# Dynamic ids (capabilities, sessions, requests, agents), asked from aap itself.
function __{dynf}
    set -l words (commandline -opc)
    set -l bin (string replace -r -- '-exec$' '' $words[1])
    $bin __complete --program {program} --index (count $words) -- $words (commandline -ct) 2>/dev/null
end
complete -c {program} -f -n '__{dynf} >/dev/null' -a '(__{dynf})'
# fish completes the value of an option that needs one from that option's own rules only.
for opt in cap check session agent
    complete -c {program} -f -n '__{dynf} >/dev/null' -l $opt -r -a '(__{dynf})'
end
"#
        ),
        _ => script.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(program: &str, line: &str) -> Option<Kind> {
        let root = if program == "aap-exec" {
            crate::exec_cli::ExecCli::command()
        } else {
            crate::cli::Cli::command()
        };
        let mut words: Vec<String> = line.split(' ').map(str::to_string).collect();
        if line.ends_with(' ') {
            words.pop();
            words.push(String::new());
        }
        let index = words.len() - 1;
        classify(&root, &words, index)
    }

    #[test]
    fn id_positions_are_found_from_the_clap_definitions() {
        use Kind::*;
        assert_eq!(
            k("aap", "aap session start --agent codex --cap "),
            Some(Capability)
        );
        assert_eq!(k("aap", "aap session start --agent "), Some(Agent));
        assert_eq!(k("aap", "aap session start --cap = "), Some(Capability));
        assert_eq!(k("aap", "aap session revoke "), Some(Session));
        assert_eq!(k("aap", "aap session revoke 01M --reason "), None);
        assert_eq!(k("aap", "aap session show 01"), Some(Session));
        assert_eq!(k("aap", "aap session approve "), Some(Session));
        assert_eq!(k("aap", "aap session approve 01M --cap "), Some(Capability));
        assert_eq!(k("aap", "aap session check --session "), Some(Session));
        assert_eq!(k("aap", "aap session check "), Some(Capability));
        assert_eq!(k("aap", "aap catalog show "), Some(Capability));
        assert_eq!(k("aap", "aap request "), Some(Capability));
        assert_eq!(k("aap", "aap approve "), Some(Request));
        assert_eq!(k("aap", "aap deny "), Some(Request));
        assert_eq!(k("aap", "aap audit tail --session "), Some(Session));
        assert_eq!(k("aap", "aap audit tail -n 5 --agent "), Some(Agent));
        assert_eq!(
            k("aap", "aap wrappers install --dir d --cap "),
            Some(Capability)
        );
        // Not ids: subcommands, flags, files, free text.
        assert_eq!(k("aap", "aap "), None);
        assert_eq!(k("aap", "aap session "), None);
        assert_eq!(k("aap", "aap session start --"), None);
        assert_eq!(k("aap", "aap catalog check "), None);
        assert_eq!(k("aap", "aap session start --ttl "), None);
        assert_eq!(k("aap", "aap session revoke 01M "), None);
        // aap-exec: CAP, --check, --session; nothing after `--`.
        assert_eq!(k("aap-exec", "aap-exec "), Some(Capability));
        assert_eq!(k("aap-exec", "aap-exec --session 01M "), Some(Capability));
        assert_eq!(k("aap-exec", "aap-exec --session "), Some(Session));
        assert_eq!(k("aap-exec", "aap-exec --check "), Some(Capability));
        assert_eq!(
            k("aap-exec", "aap-exec --reason x forgejo-pat-read -- "),
            None
        );
        assert_eq!(
            k("aap-exec", "aap-exec forgejo-pat-read -- git --cap "),
            None
        );
    }

    #[test]
    fn bad_input_never_panics() {
        let root = crate::cli::Cli::command();
        for words in [
            vec![],
            vec!["aap".to_string()],
            vec!["-".into(), "--=".into(), "=".into()],
        ] {
            for index in 0..5 {
                let _ = classify(&root, &words, index);
            }
        }
    }
}
