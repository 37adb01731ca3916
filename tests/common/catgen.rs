//! Generates large catalogs for tests and benchmarks (shared by both through #[path]).

/// Generate a catalog of `n` capabilities cycling through every backing type.
pub fn generated(n: usize) -> String {
    let mut s = String::with_capacity(n * 400);
    s.push_str("schema_version: 1\ncapabilities:\n");
    for i in 0..n {
        let body = match i % 5 {
            0 => format!("    backing:\n      type: forgejo-pat\n      host: git{i}.example.org\n      secret: {{ path: /forgejo, key: PAT_{i} }}\n    inject:\n      - type: git-credential\n      - type: env\n        name: TOKEN_{i}\n"),
            1 => format!("    backing:\n      type: ssh-agent\n      secret: {{ path: /ssh, key: KEY_{i}, environment: prod }}\n      key_lifetime: 15m\n      hosts: [h{i}.example.org]\n    inject:\n      - type: ssh-agent\n"),
            2 => "    backing:\n      type: infisical-token\n      identity: app-reader\n      secret_path: /app\n    inject:\n      - type: env\n        name: INFISICAL_TOKEN\n".to_string(),
            3 => "    backing:\n      type: wrapped-command\n      command: /usr/bin/systemctl\n      args: [\"^restart$\", \"^web\\\\.service$\"]\n".to_string(),
            _ => format!("    backing:\n      type: secret\n      secret: {{ path: /app, key: DB_{i} }}\n    inject:\n      - type: fd\n        name: DB_FILE_{i}\n"),
        };
        s.push_str(&format!(
            "  - id: cap-{i}\n    description: generated capability {i}\n    audit_tier: {}\n    agents: [codex, claude]\n    max_ttl: 2h\n{body}",
            ["low", "medium", "high"][i % 3]
        ));
    }
    s
}
