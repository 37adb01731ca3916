//! A real sshd on 127.0.0.1 with a throwaway host key, accepting the seed's ssh key, for the
//! tests of the ssh-agent backing (tests/backings_ssh.rs, tests/broker_two_uids.rs).

use super::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SSHD: &str = "/usr/sbin/sshd";

/// The seed's /ssh:SSH_PUBLIC_KEY (its private half is /ssh:SSH_PRIVATE_KEY).
pub const SEED_PUB: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEwVYnrtnvKamQPSjTjO+eeJY/7F4qZPnqDjnWlsiCZ/ infisical-test@localhost";

pub fn have_sshd(test: &str) -> bool {
    if Path::new(SSHD).exists() {
        true
    } else {
        missing_tool(
            test,
            SSHD,
            "apt-get install -y openssh-server openssh-client",
        );
        false
    }
}

pub fn keygen(path: &Path) -> String {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
    let p = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    p.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// A real sshd on 127.0.0.1, killed (by pid) on drop.
pub struct Sshd {
    child: Child,
    pub port: u16,
    /// `ssh-ed25519 AAAA...` of its host key.
    pub host_key: String,
}

impl Sshd {
    pub fn start(dir: &Path, name: &str) -> Sshd {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let _ = std::fs::create_dir_all("/run/sshd"); // privilege-separation dir
        let host_key = keygen(&d.join("host_key"));
        write(&d.join("authorized_keys"), format!("{SEED_PUB}\n"));
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        write(
            &d.join("sshd_config"),
            format!(
                "ListenAddress 127.0.0.1:{port}\nHostKey {hk}\nPidFile {pid}\nAuthorizedKeysFile {ak}\n\
                 StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nAllowAgentForwarding yes\n\
                 LogLevel VERBOSE\n",
                hk = d.join("host_key").display(),
                pid = d.join("sshd.pid").display(),
                ak = d.join("authorized_keys").display(),
            ),
        );
        std::fs::set_permissions(
            d.join("host_key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("sshd.log")).unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "sshd did not listen: {}",
                std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Sshd {
            child,
            port,
            host_key,
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
