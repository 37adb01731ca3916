//! Hints shared by more than one place of the exec path (and by the broker's ssh agent), kept
//! here so that each is written once and stays a command that works when followed.

#![forbid(unsafe_code)]

use crate::error::shell_quote;
use std::path::PathBuf;

/// A grant too close to its end for the use: the agent asks for more time itself.
pub fn grant_ran_out(cap: &str) -> String {
    format!(
        "ask the operator for more time and wait for the answer: aap request {cap} --reason 'the grant ran out' --wait"
    )
}

/// Destination constraints without the destinations' host keys. Not `ssh-keyscan >>
/// ~/.ssh/known_hosts`: that file is the agent's to write, and a scanned key is unverified.
/// The operator verifies each key out of band and adds it to a file `ssh_known_hosts` names.
pub fn no_host_key(hosts: &[String], known_hosts: &[PathBuf]) -> String {
    let files = if known_hosts.is_empty() {
        "a file that ssh_known_hosts in the config names (e.g. /etc/ssh/ssh_known_hosts, root's, mode 0644)".to_string()
    } else {
        known_hosts
            .iter()
            .map(|p| shell_quote(&p.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" or ")
    };
    format!(
        "the operator adds the host key of {} to {files}, after checking its fingerprint out of band (on the host: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub)",
        hosts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_key_hint_names_the_configured_file_and_no_agent_writable_one() {
        let h = no_host_key(&["vps1000".into()], &["/etc/aap/known_hosts".into()]);
        assert!(h.contains("/etc/aap/known_hosts"), "{h}");
        assert!(h.contains("out of band"), "{h}");
        for bad in ["~/.ssh", "ssh-keyscan", ">>"] {
            assert!(!h.contains(bad), "{h}");
            assert!(!no_host_key(&["x".into()], &[]).contains(bad));
        }
    }
}
