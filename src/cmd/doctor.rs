//! `aap doctor`: check an installation the way an operator would by hand, and say what to fix.
//!
//! Every finding is `ok`, `warn` or `fail`, with a hint naming the next command. The exit status
//! is 0 unless something fails (then 78, "configuration invalid"). Nothing here reads a secret:
//! the Infisical check logs each identity in and revokes the token at once.
//!
//! Ownership and modes are judged the way OpenSSH's StrictModes judges `authorized_keys`, but
//! per agent uid: a file is exposed to an agent when the agent can write it, owns it (and so
//! could chmod it), or can replace it through a writable directory anywhere above it (a sticky
//! directory protects entries the agent does not own). POSIX ACLs are not read.
//!
//! The boundary is the broker's (`aap broker`): it alone reads the identities' client secrets,
//! writes the audit log and `requests/`, and answers on `broker.socket`. So none of those may be
//! readable (the secrets, the log) or writable (the log, `requests/`, the socket's directory) by
//! any agent uid, and every agent needs a uid, by which the broker knows it.

#![forbid(unsafe_code)]

use crate::catalog::{Backing, Catalog, Inject};
use crate::config::{Config, SYSTEM_CONFIG};
use crate::error::{Error, Kind, Result, quote_path as q};
use crate::grant::signers::AllowedSigners;
use crate::source::{Client, Identity};
use crate::state::StateDir;
use serde::Serialize;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Oldest OpenSSH with `ssh-keygen -Y sign`, which signs grants.
const MIN_OPENSSH_SIGN: (u32, u32) = (8, 1);
/// Oldest git that reads `GIT_CONFIG_COUNT`, through which the credential helper is set.
const MIN_GIT: (u32, u32) = (2, 31);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Not checked: out of reach of the user running the check (an agent cannot read the
    /// broker's secrets or its audit log). Not a fault; the hint says who can check it.
    Skip,
    Warn,
    Fail,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Skip => "skip",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Debug, Serialize)]
pub struct Finding {
    /// Which check: config, catalog, agents, permissions, broker, allowed-signers, signing-key,
    /// infisical, tools, audit-log, run-as.
    pub check: &'static str,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Default)]
struct Report {
    findings: Vec<Finding>,
}

impl Report {
    fn push(&mut self, check: &'static str, status: Status, message: String, hint: Option<String>) {
        self.findings.push(Finding {
            check,
            status,
            message,
            hint,
        });
    }
    fn ok(&mut self, check: &'static str, message: impl Into<String>) {
        self.push(check, Status::Ok, message.into(), None);
    }
    fn warn(&mut self, check: &'static str, message: impl Into<String>, hint: impl Into<String>) {
        self.push(check, Status::Warn, message.into(), Some(hint.into()));
    }
    fn skip(&mut self, check: &'static str, message: impl Into<String>, hint: impl Into<String>) {
        self.push(check, Status::Skip, message.into(), Some(hint.into()));
    }
    fn fail(&mut self, check: &'static str, message: impl Into<String>, hint: impl Into<String>) {
        self.push(check, Status::Fail, message.into(), Some(hint.into()));
    }
    /// An error from the code the real commands run, reported as a failed check.
    fn error(&mut self, check: &'static str, e: &Error) {
        self.push(
            check,
            Status::Fail,
            e.message().to_string(),
            e.hint_text().map(str::to_string),
        );
    }
    fn count(&self, s: Status) -> usize {
        self.findings.iter().filter(|f| f.status == s).count()
    }
}

/// `aap doctor [--json] [--offline]`.
pub fn run(json: bool, offline: bool) -> Result<u8> {
    let report = diagnose(offline);
    if json {
        let out = serde_json::json!({
            "ok": report.count(Status::Ok),
            "skip": report.count(Status::Skip),
            "warn": report.count(Status::Warn),
            "fail": report.count(Status::Fail),
            "checks": report.findings,
        });
        println!("{out:#}");
    } else {
        for f in &report.findings {
            println!("{:<5} {:<16} {}", f.status.word(), f.check, f.message);
            if let (Some(h), Status::Skip | Status::Warn | Status::Fail) = (&f.hint, f.status) {
                println!("{:<22} hint: {h}", "");
            }
        }
        println!(
            "aap doctor: {} ok, {} skipped, {} warn, {} fail",
            report.count(Status::Ok),
            report.count(Status::Skip),
            report.count(Status::Warn),
            report.count(Status::Fail)
        );
    }
    Ok(if report.count(Status::Fail) > 0 {
        Kind::Config.exit_code()
    } else {
        0
    })
}

fn diagnose(offline: bool) -> Report {
    let mut r = Report::default();
    let Some(cfg) = check_config(&mut r) else {
        check_tools(&mut r, None, "/usr/local/bin:/usr/bin:/bin");
        return r;
    };
    let catalog = match Catalog::load(&cfg.catalog.value) {
        Ok(c) => {
            r.ok(
                "catalog",
                format!(
                    "{} is valid: {} capabilities",
                    cfg.catalog.value.display(),
                    c.len()
                ),
            );
            Some(c)
        }
        Err(e) => {
            r.error("catalog", &e);
            None
        }
    };
    let agents = check_agents(&mut r, &cfg, catalog.as_ref());
    check_permissions(&mut r, &cfg, &agents);
    check_broker(&mut r, &cfg, &agents, offline);
    let signers = match crate::grant::allowed_signers(&cfg) {
        Ok(s) => {
            r.ok(
                "allowed-signers",
                format!("{} parses: {} keys", s.origin(), s.signers().len()),
            );
            Some(s)
        }
        Err(e) => {
            r.error("allowed-signers", &e);
            None
        }
    };
    check_signing_key(&mut r, &cfg, signers.as_ref());
    if offline {
        r.warn(
            "infisical",
            "not checked (--offline)",
            "check the logins too: aap doctor",
        );
    } else {
        check_infisical(&mut r, &cfg);
    }
    check_tools(&mut r, Some((&cfg, catalog.as_ref())), &cfg.secure_path);
    check_audit_log(&mut r, &cfg);
    r
}

fn check_config(r: &mut Report) -> Option<Config> {
    let cfg = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            r.error("config", &e);
            return None;
        }
    };
    match &cfg.file {
        Some(f) => r.ok("config", format!("{} is valid", f.value.display())),
        None => r.warn(
            "config",
            "no config file: built-in defaults only",
            format!("write {SYSTEM_CONFIG} (docs/operator-guide.md), then: aap doctor"),
        ),
    }
    let system = Path::new(SYSTEM_CONFIG);
    if system.exists()
        && let Err(e) = Config::load_for_agent()
        && e.kind() != Kind::Denied
    {
        // What aap-exec itself would say about the system config (its owner, say).
        r.error("config", &e);
    }
    let uses_other = cfg.file.as_ref().is_some_and(|f| f.value != system);
    if uses_other && system.exists() {
        r.warn(
            "config",
            format!(
                "aap-exec reads only {SYSTEM_CONFIG}, but this check read {}",
                cfg.describe_file()
            ),
            format!("check the file aap-exec uses: AAP_CONFIG={SYSTEM_CONFIG} aap doctor"),
        );
    }
    Some(cfg)
}

/// A uid the permission checks judge files against.
struct Who {
    label: String,
    uid: u32,
    groups: Vec<u32>,
}

/// Any local user who is neither the owner nor in the group: judged by the "other" bits.
fn anyone() -> Who {
    Who {
        label: "any local user".into(),
        uid: u32::MAX - 1,
        groups: Vec::new(),
    }
}

fn check_agents(r: &mut Report, cfg: &Config, catalog: Option<&Catalog>) -> Vec<Who> {
    let me = crate::sys::uid();
    let mut out = Vec::new();
    if cfg.agents.is_empty() {
        r.warn(
            "agents",
            "the config names no agents",
            "add an agents: entry per agent with its uid (docs/operator-guide.md), then: aap doctor",
        );
    }
    for (name, a) in &cfg.agents {
        let Some(uid) = a.uid else {
            r.fail(
                "agents",
                format!(
                    "agents.{name} has no uid: the broker knows agents only by their uid, so it refuses to start, and the checks below cannot tell what {name} can read or write"
                ),
                format!(
                    "run the agent as its own user and set agents.{name}.uid in {}: id -u {name}",
                    cfg.describe_file()
                ),
            );
            continue;
        };
        if uid == 0 {
            r.fail(
                "agents",
                format!("agents.{name} runs as root (uid 0): it can rewrite grants, the catalog and the audit log"),
                format!("create a user for it: useradd --system --create-home {name}; then set agents.{name}.uid"),
            );
            continue;
        }
        if uid == me {
            // The agent's own uid runs the check: either the guide's `runuser -u codex -- aap
            // doctor` (the operator, who owns the state dir and the signing key, is someone
            // else), or a single-user setup where the agent is the operator.
            if operator_is(cfg, me) == Some(false) {
                r.ok(
                    "agents",
                    format!("this check runs as agent {name} (uid {uid}): it shows what {name} can see and reach"),
                );
            } else {
                r.warn(
                    "agents",
                    format!("agents.{name} has uid {uid}, the uid running this check, which also owns the state dir or the signing key: a single-user setup, where the agent can do what the operator can"),
                    "give the agent its own user (docs/threat-model.md lists what holds without one)",
                );
            }
        }
        let groups = match crate::sys::user_groups(uid) {
            Ok(Some((user, groups))) => {
                r.ok("agents", format!("agents.{name} is uid {uid} ({user})"));
                groups
            }
            Ok(None) => {
                r.warn(
                    "agents",
                    format!("agents.{name} has uid {uid}, which has no passwd entry: its groups are unknown, so group permissions are not checked for it"),
                    format!("create the user or fix the uid: getent passwd {uid}"),
                );
                Vec::new()
            }
            Err(e) => {
                r.warn(
                    "agents",
                    format!("agents.{name} has uid {uid}, whose groups cannot be read ({e}), so group permissions are not checked for it"),
                    format!("check the user and group databases: id {uid}"),
                );
                Vec::new()
            }
        };
        out.push(Who {
            label: format!("agent {name} (uid {uid})"),
            uid,
            groups,
        });
    }
    if let Some(c) = catalog {
        let mut named: Vec<&str> = c
            .capabilities()
            .iter()
            .flat_map(|cap| cap.agents.iter().map(String::as_str))
            .filter(|a| !cfg.agents.contains_key(*a))
            .collect();
        named.sort_unstable();
        named.dedup();
        // The broker maps callers by `agents.<name>.uid` only: an agent the config does not
        // name is one nobody can act as here, simply unused.
        if !named.is_empty() {
            r.ok(
                "agents",
                format!(
                    "the catalog also names {}, which the config does not: unused here (the broker maps no uid to them)",
                    named.join(", ")
                ),
            );
        }
    }
    out
}

/// Whether `uid` is the operator: the owner of the state dir or of the signing key. `None`
/// when neither exists to tell.
fn operator_is(cfg: &Config, uid: u32) -> Option<bool> {
    let owner = |p: &Path| std::fs::metadata(p).ok().map(|m| m.uid());
    let owners: Vec<u32> = [
        Some(cfg.state_dir.value.as_path()),
        cfg.operator.signing_key.as_deref(),
    ]
    .into_iter()
    .flatten()
    .filter_map(owner)
    .collect();
    if owners.is_empty() {
        None
    } else {
        Some(owners.contains(&uid))
    }
}

/// Whether `w` has `bits` (0o2 write, 0o4 read) on the file, by the owner, group and other
/// bits. An owner counts as having every access, since it can chmod.
fn has_access(m: &Metadata, w: &Who, bits: u32) -> bool {
    if m.uid() == w.uid {
        return true;
    }
    let shift = if w.groups.contains(&m.gid()) { 3 } else { 0 };
    m.mode() & (bits << shift) != 0
}

fn can_write(m: &Metadata, w: &Who) -> bool {
    has_access(m, w, 0o2)
}

fn can_read(m: &Metadata, w: &Who) -> bool {
    has_access(m, w, 0o4)
}

/// Symlinks followed before the doctor gives up on a path (and calls it exposed).
const MAX_LINKS: u32 = 40;

fn mode_of(m: &Metadata) -> String {
    format!("owner uid {}, mode {:04o}", m.uid(), m.mode() & 0o7777)
}

/// Why `w` can change what `path` holds: write it, own it, replace it or any directory above
/// it (through symlinks, whose own directories and targets both count), or, when it does not
/// exist, create it. `None` when it cannot.
fn exposure(path: &Path, w: &Who) -> Option<String> {
    exposure_of(path, w).map(|(why, _)| why)
}

/// The hint for a directory through which an agent could replace what doctor checks.
fn root_alone_hint(culprit: &Path) -> String {
    format!(
        "make {} (through which it can be replaced) root's alone: chown root: {c} && chmod go-w {c}",
        culprit.display(),
        c = q(culprit)
    )
}

/// [`exposure`], and the path to fix: the file itself, or the directory through which `w`
/// reaches it.
fn exposure_of(path: &Path, w: &Who) -> Option<(String, PathBuf)> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let shown = format!("{} ", path.display());
    exposure_at(&path, w, 0).map(|(why, culprit)| {
        if why.starts_with(&shown) {
            (why, culprit)
        } else {
            (
                format!("{} can be replaced by {}: {why}", path.display(), w.label),
                culprit,
            )
        }
    })
}

/// Why `w` can change `path`, and the path to fix.
type Exposed = Option<(String, PathBuf)>;

fn exposure_at(path: &Path, w: &Who, links: u32) -> Exposed {
    if links > MAX_LINKS {
        return Some((
            format!(
                "{} is behind more than {MAX_LINKS} symlinks",
                path.display()
            ),
            path.to_path_buf(),
        ));
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return creatable(path, w, links),
        // Cannot look (a directory above is unreadable to us): the caller warns for the top
        // path; deeper, there is nothing to judge.
        Err(_) => return None,
    };
    if meta.file_type().is_symlink() {
        if let Some(why) = entry_exposure(path, &meta, w, links) {
            return Some(why);
        }
        let target = std::fs::read_link(path).ok()?;
        let target = match path.parent() {
            Some(dir) => dir.join(target),
            None => target,
        };
        return exposure_at(&target, w, links + 1);
    }
    if can_write(&meta, w) {
        let how = if meta.uid() == w.uid {
            "owned"
        } else {
            "writable"
        };
        return Some((
            format!(
                "{} is {how} by {} ({})",
                path.display(),
                w.label,
                mode_of(&meta)
            ),
            path.to_path_buf(),
        ));
    }
    entry_exposure(path, &meta, w, links)
}

/// A missing `path`: exposed when `w` can create it in the nearest directory that exists, or
/// replace that directory.
fn creatable(path: &Path, w: &Who, links: u32) -> Exposed {
    let mut dir = path.parent()?;
    let dm = loop {
        match std::fs::metadata(dir) {
            Ok(m) => break m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => dir = dir.parent()?,
            Err(_) => return None,
        }
    };
    if can_write(&dm, w) {
        return Some((
            format!(
                "{} does not exist, and {} can create it: {} is writable by it ({})",
                path.display(),
                w.label,
                dir.display(),
                mode_of(&dm)
            ),
            dir.to_path_buf(),
        ));
    }
    dir_replaceable(dir, w, links)
}

/// Whether `w` can replace the directory entry `path` (whose own lstat is `meta`): its
/// directory is writable by `w` (a sticky directory protects entries `w` owns neither of), or
/// that directory can itself be replaced, up to `/`.
fn entry_exposure(path: &Path, meta: &Metadata, w: &Who, links: u32) -> Exposed {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty())?;
    let dm = std::fs::metadata(dir).ok()?;
    let sticky = dm.mode() & 0o1000 != 0;
    if can_write(&dm, w) && (!sticky || meta.uid() == w.uid || dm.uid() == w.uid) {
        return Some((
            format!(
                "{} can be replaced by {}: {} is writable by it ({})",
                path.display(),
                w.label,
                dir.display(),
                mode_of(&dm)
            ),
            dir.to_path_buf(),
        ));
    }
    dir_replaceable(dir, w, links)
}

/// Whether `w` can replace the directory `dir` itself: its entry in its parent, and, when
/// `dir` is a symlink, the directory it resolves to as well.
fn dir_replaceable(dir: &Path, w: &Who, links: u32) -> Exposed {
    let lm = std::fs::symlink_metadata(dir).ok()?;
    if let Some(why) = entry_exposure(dir, &lm, w, links) {
        return Some(why);
    }
    if !lm.file_type().is_symlink() {
        return None;
    }
    if links >= MAX_LINKS {
        return Some((
            format!("{} is behind too many symlinks", dir.display()),
            dir.to_path_buf(),
        ));
    }
    let real = std::fs::canonicalize(dir).ok()?;
    let rm = std::fs::symlink_metadata(&real).ok()?;
    entry_exposure(&real, &rm, w, links + 1)
}

/// Who should own `path`, for a hint: the state dir's owner (the operator, who signs grants)
/// for anything in the state dir, else root.
fn owner_for(cfg: &Config, path: &Path) -> String {
    let root = &cfg.state_dir.value;
    if path.starts_with(root)
        && let Ok(m) = std::fs::metadata(root)
        && m.uid() != 0
        && !cfg.agents.values().any(|a| a.uid == Some(m.uid()))
    {
        return match crate::sys::user_groups(m.uid()) {
            Ok(Some((name, _))) => name,
            _ => m.uid().to_string(),
        };
    }
    "root".into()
}

/// The hint for an exposed `path`: make the path through which it is exposed (`culprit`: the
/// file, or a directory above it) the operator's alone.
fn operators_alone(cfg: &Config, path: &Path, culprit: &Path) -> String {
    let cmd = format!(
        "chown {owner}: {c} && chmod go-w {c}",
        owner = owner_for(cfg, culprit),
        c = q(culprit)
    );
    if culprit == path {
        format!("make it the operator's alone: {cmd}")
    } else {
        format!(
            "make {} (through which it can be replaced) the operator's alone: {cmd}",
            culprit.display()
        )
    }
}

/// How many exposed files of one kind (grants, say) are named one by one.
const MAX_PER_KIND: usize = 10;

/// Paths an agent must never be able to change: what it is judged by.
fn protected_paths(r: &mut Report, cfg: &Config) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    if let Some(f) = &cfg.file {
        out.push(("the config".to_string(), f.value.clone()));
    }
    out.push(("the catalog".into(), cfg.catalog.value.clone()));
    if let Some(s) = &cfg.operator.allowed_signers {
        out.push(("allowed_signers".into(), s.clone()));
    }
    let st = StateDir::of(cfg);
    out.push(("the state dir".into(), st.root().to_path_buf()));
    for (what, dir) in [
        ("grants", st.grants_dir()),
        ("revocations", st.revoked_dir()),
        ("request answers", st.answers_dir()),
        ("the validated-catalog cache", st.root().join("cache")),
    ] {
        if !dir.exists() {
            continue;
        }
        out.push((what.to_string(), dir.clone()));
        match std::fs::read_dir(&dir) {
            Ok(rd) => {
                let mut files: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
                files.sort();
                out.extend(files.into_iter().map(|p| (what.to_string(), p)));
            }
            Err(e) => r.warn(
                "permissions",
                format!("the files in {what} {}: not checked, {e}", dir.display()),
                "run the full check as root: su -c 'aap doctor'",
            ),
        }
    }
    for d in std::env::split_paths(std::ffi::OsStr::new(&cfg.secure_path)) {
        if d.is_absolute() {
            out.push(("a secure_path directory".into(), d));
        }
    }
    out
}

fn check_permissions(r: &mut Report, cfg: &Config, agents: &[Who]) {
    let others = anyone();
    // "Any local user" first: when it applies, it covers every agent too, and each file is
    // reported once, for the first uid that can change it.
    let judged: Vec<&Who> = std::iter::once(&others).chain(agents.iter()).collect();
    let before = r.findings.len();
    let mut missing = Vec::new();
    let mut per_kind: std::collections::BTreeMap<String, (usize, PathBuf)> = Default::default();
    for (what, path) in protected_paths(r, cfg) {
        match std::fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Missing is fine only while no agent can create it first.
                if let Some(why) = judged.iter().find_map(|w| exposure(&path, w)) {
                    r.fail(
                        "permissions",
                        format!("{what}: {why}"),
                        format!(
                            "create it yourself, owned by the operator, or make the directory above it the operator's alone: chown {owner}: {d} && chmod go-w {d}",
                            owner = owner_for(cfg, &path),
                            d = q(path.parent().unwrap_or(Path::new("/")))
                        ),
                    );
                } else {
                    missing.push((what, path));
                }
                continue;
            }
            Err(e) => {
                r.warn(
                    "permissions",
                    format!("{what} {}: not checked, {e}", path.display()),
                    "run the full check as root: su -c 'aap doctor'",
                );
                continue;
            }
        }
        if let Some((why, culprit)) = judged.iter().find_map(|w| exposure_of(&path, w)) {
            // A whole grants/ of exposed files is one problem: name the first few.
            let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
            let n = per_kind.entry(what.clone()).or_insert((0usize, dir));
            n.0 += 1;
            if n.0 <= MAX_PER_KIND {
                r.fail(
                    "permissions",
                    format!("{what}: {why}"),
                    operators_alone(cfg, &path, &culprit),
                );
            }
        }
    }
    for (what, (n, dir)) in per_kind.into_iter().filter(|(_, (n, _))| *n > MAX_PER_KIND) {
        r.fail(
            "permissions",
            format!(
                "{what}: {} more exposed like the ones above",
                n - MAX_PER_KIND
            ),
            format!(
                "fix them all at once: chown -R {owner}: {d} && chmod -R go-w {d}",
                owner = owner_for(cfg, &dir),
                d = q(&dir)
            ),
        );
    }
    for (what, path) in missing {
        if what == "the state dir" {
            r.warn(
                "permissions",
                format!("{what} {} does not exist yet", path.display()),
                "it is created by the first grant: aap session start --agent NAME --cap CAP",
            );
        } else if what != "a secure_path directory" {
            r.fail(
                "permissions",
                format!("{what} {} does not exist", path.display()),
                format!("create it, then: ls -l {}", q(&path)),
            );
        }
    }
    check_requests_dir(r, cfg, &judged);
    check_signing_key_exposure(r, cfg, &judged);
    check_identity_files(r, cfg, agents, &others);
    check_audit_log_modes(r, cfg, agents);
    if r.findings[before..]
        .iter()
        .all(|f| f.status != Status::Fail)
    {
        let n = if agents.is_empty() {
            "any local user".to_string()
        } else {
            format!("{} agent uid(s) or any other local user", agents.len())
        };
        r.ok(
            "permissions",
            format!(
                "config, catalog, allowed_signers, grants, revocations and requests cannot be changed by {n}; the audit log and the client secrets are the broker's alone"
            ),
        );
    }
}

/// Who the broker runs as, for hints: the owner of its socket when that is neither root nor an
/// agent (a broker that bound the socket itself), else `aap-broker` (under socket activation
/// the socket is systemd's, so its owner says nothing).
fn broker_user(cfg: &Config) -> String {
    let owner = std::fs::symlink_metadata(&cfg.broker.socket.value)
        .ok()
        .map(|m| m.uid())
        .filter(|&u| u != 0 && !cfg.agents.values().any(|a| a.uid == Some(u)));
    match owner {
        Some(uid) => match crate::sys::user_groups(uid) {
            Ok(Some((name, _))) => name,
            _ => uid.to_string(),
        },
        // The unit's `User=aap` when this host has that user; else the broker runs as root.
        None if matches!(crate::sys::user_exists("aap"), Ok(true)) => "aap".into(),
        None => "root".into(),
    }
}

/// `requests/` is the broker's: it writes each request itself, so no agent may write there
/// (the sticky bit is no longer the point: agents do not drop files in it any more).
fn check_requests_dir(r: &mut Report, cfg: &Config, judged: &[&Who]) {
    let dir = StateDir::of(cfg).requests_dir();
    if std::fs::symlink_metadata(&dir).is_err() {
        return;
    }
    if let Some(why) = judged.iter().find_map(|w| exposure(&dir, w)) {
        r.fail(
            "permissions",
            format!(
                "requests: {why}: an agent could forge, delete or replace requests, which only the broker writes"
            ),
            format!(
                "make it the broker's alone: chown {b}: {d} && chmod 0750 {d}",
                b = broker_user(cfg),
                d = q(&dir)
            ),
        );
    }
}

fn check_signing_key_exposure(r: &mut Report, cfg: &Config, judged: &[&Who]) {
    let Some(key) = &cfg.operator.signing_key else {
        return;
    };
    if key.extension().is_some_and(|e| e == "pub") {
        return; // the private half is in ssh-agent
    }
    let Ok(m) = std::fs::metadata(key) else {
        return;
    };
    for w in judged {
        if can_read(&m, w) {
            r.fail(
                "permissions",
                format!(
                    "the signing key {} is readable by {}: it could sign its own grants",
                    key.display(),
                    w.label
                ),
                format!(
                    "make it the operator's alone: chown {owner}: {k} && chmod 0600 {k}",
                    owner = owner_for(cfg, key),
                    k = q(key)
                ),
            );
        }
    }
}

/// Every identity's client secret is the broker's to read, and no agent's: an agent that can
/// read one logs in to Infisical as that identity without the broker.
fn check_identity_files(r: &mut Report, cfg: &Config, agents: &[Who], others: &Who) {
    for (what, secret) in cfg.client_secret_files() {
        let m = match std::fs::metadata(secret) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                r.warn(
                    "permissions",
                    format!("{what} {}: not checked, {e}", secret.display()),
                    "run the full check as root: su -c 'aap doctor'",
                );
                continue;
            }
            Err(e) => {
                r.fail(
                    "permissions",
                    format!("{what} {}: {e}", secret.display()),
                    format!("create it, then: ls -l {}", q(secret)),
                );
                continue;
            }
        };
        let readers = std::iter::once(others)
            .chain(agents.iter())
            .filter(|w| can_read(&m, w));
        for w in readers {
            r.fail(
                "permissions",
                format!(
                    "{what} {} is readable by {}: it could log in to Infisical as that identity without the broker",
                    secret.display(),
                    w.label
                ),
                format!(
                    "make it the broker's alone: chown {b}: {p} && chmod 0400 {p}",
                    b = broker_user(cfg),
                    p = q(secret)
                ),
            );
        }
    }
}

/// The audit log is the broker's alone: an agent that can write it forges or erases events, and
/// one that can merely open it can flock it and stall every write.
fn check_audit_log_modes(r: &mut Report, cfg: &Config, agents: &[Who]) {
    let log = &cfg.audit_log.value;
    let Ok(m) = std::fs::symlink_metadata(log) else {
        return; // check_audit_log reports a missing log
    };
    if m.file_type().is_symlink() || !m.file_type().is_file() {
        r.fail(
            "permissions",
            format!("the audit log {} is not a regular file", log.display()),
            format!("ls -l {}", q(log)),
        );
        return;
    }
    if m.mode() & 0o002 != 0 {
        r.fail(
            "permissions",
            format!(
                "the audit log {} is world-writable (mode {:04o}): any user can forge or erase events",
                log.display(),
                m.mode() & 0o7777
            ),
            format!("chmod o-w {}", q(log)),
        );
    }
    if let Some(dir) = log.parent()
        && let Ok(dm) = std::fs::metadata(dir)
        && dm.mode() & 0o002 != 0
        && dm.mode() & 0o1000 == 0
    {
        r.fail(
            "permissions",
            format!(
                "the audit log's directory {} is world-writable without the sticky bit: any user can replace the log",
                dir.display()
            ),
            format!("chmod o-w {}", q(dir)),
        );
    }
    let broker = broker_user(cfg);
    for w in agents {
        if let Some((why, culprit)) = exposure_of(log, w) {
            let hint = if culprit == *log {
                format!(
                    "make it the broker's alone: chown {broker}: {p} && chmod 0600 {p}",
                    p = q(log)
                )
            } else {
                root_alone_hint(&culprit)
            };
            r.fail(
                "permissions",
                format!(
                    "the audit log: {why}: it could forge or erase the events the broker records"
                ),
                hint,
            );
        } else if can_read(&m, w) {
            r.fail(
                "permissions",
                format!(
                    "the audit log {} is readable by {}: it could open it and flock it, stalling every event the broker writes",
                    log.display(),
                    w.label
                ),
                format!(
                    "make it the broker's alone: chown {broker}: {p} && chmod 0600 {p}",
                    p = q(log)
                ),
            );
        }
    }
    match crate::sys::is_append_only(log) {
        Ok(true) => r.ok(
            "permissions",
            format!("the audit log {} is append-only (chattr +a)", log.display()),
        ),
        Ok(false) => r.warn(
            "permissions",
            format!(
                "the audit log {} is not append-only: whoever can write it can rewrite the whole hash chain",
                log.display()
            ),
            format!("chattr +a {} (and ship it off the host: docs/operator-guide.md)", q(log)),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => r.skip(
            "permissions",
            format!(
                "not checked whether the audit log {} is append-only: this user cannot open it",
                log.display()
            ),
            "run the full check as root: su -c 'aap doctor'",
        ),
        Err(e) => r.warn(
            "permissions",
            format!(
                "cannot tell whether the audit log {} is append-only: {e}",
                log.display()
            ),
            format!("lsattr {}", q(log)),
        ),
    }
}

fn check_signing_key(r: &mut Report, cfg: &Config, signers: Option<&AllowedSigners>) {
    if cfg.operator.signing_key.is_none() {
        r.warn(
            "signing-key",
            "operator.signing_key is not set: this host cannot sign grants (fine on a host that only receives them)",
            format!("set operator.signing_key in {}", cfg.describe_file()),
        );
        return;
    }
    // Run by an agent, the key is (rightly) out of reach: that is not a fault.
    let me = crate::sys::uid();
    let agent = cfg
        .agents
        .iter()
        .find(|(_, a)| a.uid == Some(me) && me != 0)
        .map(|(n, _)| n.clone());
    let mut failed = |e: Error| match &agent {
        Some(name) => r.skip(
            "signing-key",
            format!(
                "not checked as agent {name} ({}); agents do not sign grants",
                e.message()
            ),
            "run the check as the operator: aap doctor",
        ),
        None => r.error("signing-key", &e),
    };
    if me == 0
        && let Some(owner) = cfg
            .operator
            .signing_key
            .as_deref()
            .and_then(|k| std::fs::metadata(k).ok())
            .map(|m| m.uid())
            .filter(|&u| u != 0)
    {
        // Root would sign with the operator's key without its ssh-agent or its passphrase
        // prompt: that says nothing about whether the operator can.
        r.warn(
            "signing-key",
            format!("not checked as root: the signing key belongs to uid {owner}"),
            "run this check as the operator too: aap doctor",
        );
        return;
    }
    let (path, key) = match crate::grant::operator_key(cfg) {
        Ok(k) => k,
        Err(e) => return failed(e),
    };
    let msg = b"aap doctor: can this key sign grants?";
    let sig = match crate::grant::sign_bytes(&path, msg) {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let parsed = crate::grant::signers::parse_sig(&sig)
        .and_then(|s| crate::grant::signers::verify_crypto(msg, &s).map(|()| s));
    if parsed.as_ref().is_err() || parsed.as_ref().is_ok_and(|s| s.public_key() != &key) {
        r.fail(
            "signing-key",
            format!("{} made a signature that does not verify", path.display()),
            format!(
                "sign by hand to see why: echo test | ssh-keygen -Y sign -n aap-grant -f {}",
                q(&path)
            ),
        );
        return;
    }
    let Some(signers) = signers else {
        return; // allowed-signers already failed
    };
    let now = crate::timefmt::unix_secs(std::time::SystemTime::now());
    match signers.principal_for(&key, now) {
        Ok(p) => r.ok(
            "signing-key",
            format!(
                "{} signs, and {} trusts it as {p}",
                path.display(),
                signers.origin()
            ),
        ),
        Err(why) => r.fail(
            "signing-key",
            format!(
                "{} signs, but grants it signs would be refused: {why}",
                path.display()
            ),
            format!(
                "add it, with your user name as its principal: echo \"$(id -un) namespaces=\\\"aap-grant\\\" $(cat {}.pub)\" >> {}",
                q(&path),
                q(Path::new(signers.origin()))
            ),
        ),
    }
}

fn check_infisical(r: &mut Report, cfg: &Config) {
    let inf = match cfg.infisical() {
        Ok(i) => i,
        Err(e) => {
            r.error("infisical", &e);
            return;
        }
    };
    let client = match Client::new(inf) {
        Ok(c) => c,
        Err(e) => {
            r.error("infisical", &e);
            return;
        }
    };
    let mut identities: Vec<(String, Result<Identity>)> = Vec::new();
    match client.status() {
        Ok(()) => r.ok(
            "infisical",
            format!("{} answers (GET /api/status)", client.url()),
        ),
        Err(e) => {
            // Unreachable: every login would fail the same way; say it once.
            r.error("infisical", &e);
            return;
        }
    }
    let mut unreadable = |label: String, file: Option<&Path>| {
        let denied = file.is_some_and(|f| {
            // Non-blocking: a FIFO in the secret's place must not hang the check.
            crate::sys::open_read_nonblocking(f, true)
                .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
        });
        if denied {
            r.skip(
                "infisical",
                format!("{label}: not checked, this user cannot read its client secret"),
                "run the full check as root: su -c 'aap doctor'",
            );
        }
        denied
    };
    for (name, a) in &cfg.agents {
        let label = format!("agent {name}");
        if (a.client_id_file.is_some() || a.client_secret_file.is_some())
            && !unreadable(label.clone(), a.client_secret_file.as_deref())
        {
            identities.push((label, Identity::for_agent(cfg, name)));
        }
    }
    for (name, i) in &cfg.identities {
        let label = format!("identity {name}");
        if !unreadable(label.clone(), Some(&i.client_secret_file)) {
            identities.push((label, Identity::named(cfg, name)));
        }
    }
    if identities.is_empty() && !r.findings.iter().any(|f| f.check == "infisical") {
        r.warn(
            "infisical",
            "no agent names identity files, so no login was tried",
            format!(
                "set agents.NAME.client_id_file and client_secret_file in {}",
                cfg.describe_file()
            ),
        );
        return;
    }
    for (label, identity) in identities {
        let result = identity.and_then(|id| {
            let token = client.login(&id)?;
            client.revoke(&token)
        });
        match result {
            Ok(()) => r.ok(
                "infisical",
                format!(
                    "{label} logs in to {} (token revoked; no secret read)",
                    client.url()
                ),
            ),
            Err(e) => r.push(
                "infisical",
                Status::Fail,
                format!("{label}: {}", e.message()),
                e.hint_text().map(str::to_string),
            ),
        }
    }
}

/// `major.minor` from the first run of digits and dots after `prefix`.
fn parse_version(text: &str, prefix: &str) -> Option<(u32, u32)> {
    let rest = &text[text.find(prefix)? + prefix.len()..];
    let mut it = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn version_of(bin: &Path, arg: &str, prefix: &str) -> Option<(u32, u32)> {
    let out = Command::new(bin)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_version(&text, prefix)
}

struct Tool {
    name: &'static str,
    /// Which program prints the version, with which flag and prefix.
    version: (&'static str, &'static str, &'static str),
    min: (u32, u32),
    needed_for: Option<String>,
    package: &'static str,
}

fn check_tools(r: &mut Report, ctx: Option<(&Config, Option<&Catalog>)>, path: &str) {
    let caps = ctx
        .and_then(|(_, c)| c)
        .map(Catalog::capabilities)
        .unwrap_or_default();
    let first = |pred: &dyn Fn(&crate::catalog::Capability) -> bool| {
        caps.iter()
            .find(|c| pred(c))
            .map(|c| format!("capability {}", c.id))
    };
    let git_for = first(&|c| {
        matches!(c.backing, Backing::ForgejoPat { .. })
            || c.inject.iter().any(|i| matches!(i, Inject::GitCredential))
    });
    let sign_for = ctx
        .filter(|(cfg, _)| cfg.operator.signing_key.is_some())
        .map(|_| "signing grants (operator.signing_key)".to_string());
    let ssh_version = ("ssh", "-V", "OpenSSH_");
    let tools = [
        Tool {
            name: "ssh-keygen",
            version: ssh_version,
            min: MIN_OPENSSH_SIGN,
            needed_for: sign_for,
            package: "openssh-client",
        },
        Tool {
            name: "git",
            version: ("git", "--version", "git version "),
            min: MIN_GIT,
            needed_for: git_for,
            package: "git",
        },
    ];
    for t in tools {
        let found = crate::exec::command::find_trusted(t.name, path).ok();
        let (Some(bin), Some(why)) = (&found, &t.needed_for) else {
            match (found, &t.needed_for) {
                (None, Some(why)) => {
                    // Installed, but outside the trusted path: installing it again changes
                    // nothing.
                    let elsewhere = crate::exec::command::find_trusted(
                        t.name,
                        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    )
                    .ok();
                    let hint = match (elsewhere, ctx) {
                        (Some(bin), Some((cfg, _))) => format!(
                            "it is installed as {}: add {} to secure_path in {}",
                            bin.display(),
                            bin.parent().unwrap_or(Path::new("/")).display(),
                            cfg.describe_file()
                        ),
                        _ => format!("apt-get install -y {}", t.package),
                    };
                    r.fail(
                        "tools",
                        format!(
                            "{} is not in the trusted path {path}; {why} needs it",
                            t.name
                        ),
                        hint,
                    )
                }
                (Some(bin), None) => r.ok(
                    "tools",
                    format!("{} found ({}); nothing needs it", t.name, bin.display()),
                ),
                _ => r.ok("tools", format!("{} not found; nothing needs it", t.name)),
            }
            continue;
        };
        let vbin = bin.with_file_name(t.version.0);
        match version_of(&vbin, t.version.1, t.version.2) {
            Some(v) if v >= t.min => r.ok(
                "tools",
                format!(
                    "{} found ({}), version {}.{} >= {}.{}",
                    t.name,
                    bin.display(),
                    v.0,
                    v.1,
                    t.min.0,
                    t.min.1
                ),
            ),
            Some(v) => r.fail(
                "tools",
                format!(
                    "{} is version {}.{}; {why} needs {}.{} or later",
                    t.name, v.0, v.1, t.min.0, t.min.1
                ),
                format!("apt-get install -y {} (from a newer release)", t.package),
            ),
            None => r.warn(
                "tools",
                format!(
                    "{} found ({}), but `{} {}` printed no version",
                    t.name,
                    bin.display(),
                    vbin.display(),
                    t.version.1
                ),
                format!("{} {}", vbin.display(), t.version.1),
            ),
        }
    }
}

fn check_audit_log(r: &mut Report, cfg: &Config) {
    let log = &cfg.audit_log.value;
    if std::fs::symlink_metadata(log).is_err() {
        r.warn(
            "audit-log",
            format!("{} does not exist yet", log.display()),
            format!(
                "create it append-only, the broker's alone: install -m 0600 -o {b} /dev/null {p} && chattr +a {p}",
                b = broker_user(cfg),
                p = q(log)
            ),
        );
        return;
    }
    // Run by an agent, the log is (rightly) out of reach: that is not a fault.
    let me = crate::sys::uid();
    if me != 0
        && let Some((name, _)) = cfg.agents.iter().find(|(_, a)| a.uid == Some(me))
        && crate::sys::open_read_nonblocking(log, false)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
    {
        r.skip(
            "audit-log",
            format!(
                "not checked as agent {name}: agents cannot open the audit log, which is the broker's alone"
            ),
            "run the check as the operator: aap doctor",
        );
        return;
    }
    match crate::audit::verify_file(log) {
        Ok(rep) => r.ok(
            "audit-log",
            format!(
                "{} verifies: {} lines, head {}",
                log.display(),
                rep.lines,
                rep.head
            ),
        ),
        Err(e) => r.error("audit-log", &e),
    }
}

/// `broker.socket`: there, a socket, in a directory no agent can write (or an agent could bind
/// its own socket in the broker's place and answer aap-exec), and, online, answering.
fn check_broker(r: &mut Report, cfg: &Config, agents: &[Who], offline: bool) {
    use std::os::unix::fs::FileTypeExt;
    let sock = &cfg.broker.socket.value;
    let start = format!(
        "systemctl start aap-broker.socket (or run it by hand: aap broker --socket {})",
        q(sock)
    );
    let mut failed = false;
    if let Some(dir) = sock.parent().filter(|d| !d.as_os_str().is_empty())
        && std::fs::symlink_metadata(dir).is_ok()
        && let Some((why, culprit)) = std::iter::once(&anyone())
            .chain(agents.iter())
            .find_map(|w| exposure_of(dir, w))
    {
        r.fail(
            "broker",
            format!(
                "the directory of broker.socket {}: {why}: an agent could put its own socket in the broker's place",
                sock.display()
            ),
            if culprit == dir {
                format!(
                    "make it root's alone: chown root: {d} && chmod 0755 {d}",
                    d = q(dir)
                )
            } else {
                root_alone_hint(&culprit)
            },
        );
        failed = true;
    }
    let m = match std::fs::symlink_metadata(sock) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            r.warn(
                "broker",
                format!(
                    "broker.socket {} does not exist: the broker is not listening, so every aap-exec fails",
                    sock.display()
                ),
                start,
            );
            return;
        }
        Err(e) => {
            r.warn(
                "broker",
                format!("broker.socket {}: not checked, {e}", sock.display()),
                "run the full check as root: su -c 'aap doctor'",
            );
            return;
        }
    };
    if !m.file_type().is_socket() {
        r.fail(
            "broker",
            format!(
                "broker.socket {} is not a socket ({}): the broker cannot listen there and aap-exec cannot connect",
                sock.display(),
                mode_of(&m)
            ),
            format!(
                "move it away or choose another broker.socket in {}: ls -l {}",
                cfg.describe_file(),
                q(sock)
            ),
        );
        return;
    }
    {
        use std::os::unix::fs::MetadataExt;
        if let Some(agent) = cfg
            .agents
            .iter()
            .find(|(_, a)| a.uid == Some(m.uid()) && m.uid() != crate::sys::uid())
            .map(|(n, _)| n)
        {
            r.fail(
                "broker",
                format!(
                    "broker.socket {} is owned by agent {agent} (uid {}): that agent, not the broker, may be listening there",
                    sock.display(),
                    m.uid()
                ),
                format!(
                    "stop whatever listens there (see it with fuser -v {p}), then restart the broker, which replaces the socket: systemctl restart aap-broker.socket (or run it by hand: aap broker --socket {p})",
                    p = q(sock)
                ),
            );
            failed = true;
        }
    }
    if offline {
        if !failed {
            r.ok(
                "broker",
                format!(
                    "broker.socket {} is a socket (connection not checked: --offline)",
                    sock.display()
                ),
            );
        }
        return;
    }
    match std::os::unix::net::UnixStream::connect(sock) {
        Ok(_) if failed => {}
        Ok(_) => {
            r.ok(
                "broker",
                format!("broker.socket {} accepts connections", sock.display()),
            );
            check_run_as(r, sock);
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => r.fail(
            "broker",
            format!("cannot connect to broker.socket {}: {e}", sock.display()),
            format!(
                "every agent must be able to connect (mode 0666): ls -l {}",
                q(sock)
            ),
        ),
        Err(e) => r.fail(
            "broker",
            format!(
                "cannot connect to broker.socket {}: {e}: no broker is listening, so every aap-exec fails",
                sock.display()
            ),
            format!(
                "systemctl restart aap-broker.socket (or run it by hand: aap broker --socket {})",
                q(sock)
            ),
        ),
    }
}

/// Each wrapped-command capability: can the running broker start it as its `run_as` user?
/// Asked of the broker itself (it alone knows its effective capabilities; under socket
/// activation the socket's peer is systemd, not the broker), which runs the very check a use
/// runs first.
fn check_run_as(r: &mut Report, sock: &Path) {
    let checks = match crate::client::run_as_checks(sock) {
        Ok(c) => c,
        Err(e) => return r.error("run-as", &e),
    };
    if checks.is_empty() {
        return;
    }
    let mut good = Vec::new();
    for c in &checks {
        match &c.error {
            None => good.push(format!("{} as {}", c.cap, c.run_as)),
            Some((message, _)) if message.contains("CAP_SETUID") => r.fail(
                "run-as",
                format!(
                    "capability `{}` cannot run: the broker cannot switch to its run_as user {}: {message}",
                    c.cap, c.run_as
                ),
                format!(
                    "give the broker CAP_SETUID and CAP_SETGID: under systemd, the drop-in contrib/systemd/run-as-other-users.conf (its line AmbientCapabilities=CAP_SETUID CAP_SETGID; docs/systemd.md), in the foreground, run aap broker as root; or remove run_as from `{}` in the catalog, then: aap catalog check",
                    c.cap
                ),
            ),
            Some((message, hint)) => r.fail(
                "run-as",
                format!("capability `{}` cannot run: {message}", c.cap),
                hint.clone()
                    .unwrap_or_else(|| "then: aap catalog check".to_owned()),
            ),
        }
    }
    if !good.is_empty() {
        r.ok(
            "run-as",
            format!("the broker can start {}", good.join(", ")),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(
            parse_version("OpenSSH_9.2p1 Debian-2+deb12u3, OpenSSL 3.0.15", "OpenSSH_"),
            Some((9, 2))
        );
        assert_eq!(
            parse_version("git version 2.39.5\n", "git version "),
            Some((2, 39))
        );
        assert_eq!(parse_version("usage: ssh", "OpenSSH_"), None);
        assert_eq!(parse_version("OpenSSH_9", "OpenSSH_"), None);
    }
}
