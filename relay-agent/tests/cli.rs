//! The real `relay-agent` binary: exit codes of `status` and of a bad config.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_relay-agent"))
}

#[test]
fn status_without_a_running_agent_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("none.sock");
    let out = bin().args(["status", "--socket"]).arg(&sock).output().expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not running"));
    let out = bin().args(["status", "--json", "--socket"]).arg(&sock).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["running"], false);
}

#[test]
fn bad_config_fails_at_start_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "edge = \"ws://insecure:80\"\n[[target]]\nchannel = \"crm\"\nurl = \"http://127.0.0.1:3000/\"\n",
    )
    .expect("write");
    let out = bin().arg("--config").arg(&cfg).arg("check-config").output().expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`edge`") && err.contains("wss://"), "{err}");

    std::fs::write(&cfg, "windw = 3\n").expect("write");
    let out = bin().arg("--config").arg(&cfg).arg("check-config").output().expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("windw"), "unknown keys are named");

    let out = bin().arg("--config").arg(dir.path().join("missing.toml")).output().expect("run");
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn shipped_example_config_parses() {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["lan-1.pem", "lan-1-key.pem", "ca.pem"] {
        std::fs::write(dir.path().join(f), "placeholder").expect("write");
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for example in ["systemd/agent.example.toml", "compose/agent.toml"] {
        let text = std::fs::read_to_string(root.join(example)).expect("example exists");
        let cfg = dir.path().join("agent.toml");
        std::fs::write(&cfg, text.replace("/etc/relay/certs", &dir.path().display().to_string())).expect("write");
        let out = bin().arg("--config").arg(&cfg).arg("check-config").output().expect("run");
        assert!(out.status.success(), "{example}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `print-default-config` prints the built-in defaults, which are the
/// file in the repository (`config.default.toml`), and needs no config.
#[test]
fn print_default_config_prints_the_built_in_defaults() {
    let out = bin().arg("print-default-config").output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.default.toml");
    assert_eq!(String::from_utf8_lossy(&out.stdout), std::fs::read_to_string(file).expect("config.default.toml"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), relay_agent::config::DEFAULT_CONFIG);
}
