//! The real `relay-edge` binary: certificates, config validation, and the
//! shipped example configs.

use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_relay-edge"))
}

fn certs_in(dir: &Path) {
    let out = bin().args(["certs", "init", "--agent", "lan-1", "--dir"]).arg(dir).output().expect("run certs init");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["ca.pem", "ca-key.pem", "edge.pem", "edge-key.pem", "lan-1.pem", "lan-1-key.pem"] {
        assert!(dir.join(f).is_file(), "{f} written");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("lan-1-key.pem")).expect("meta").permissions().mode();
        assert_eq!(mode & 0o077, 0, "private keys are not readable by others");
    }
}

#[test]
fn certs_init_writes_ca_edge_and_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs_in(dir.path());
    let out = bin().args(["certs", "agent", "bad name", "--dir"]).arg(dir.path()).output().expect("run");
    assert!(!out.status.success());
}

#[test]
fn bad_config_fails_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs_in(dir.path());
    let d = dir.path().display();
    let base = format!("[tunnel]\ncert = \"{d}/edge.pem\"\nkey = \"{d}/edge-key.pem\"\nclient_ca = \"{d}/ca.pem\"\n");
    let cases = [
        ("[[route]]\nname = \"meta\"\nchannels = [\"crm\"]\napi_keys = []\n", "route[0].api_keys"),
        ("[[route]]\nname = \"bad name\"\nchannels = [\"crm\"]\napi_keys = [\"long-enough-key\"]\n", "route[0].name"),
        ("[ingest]\nlisten = \"nowhere\"\n", "ingest.listen"),
        ("[ingest]\nmax_body = \"lots\"\n", "max_body"),
        ("[store]\nretention = \"forever\"\n", "retention"),
        ("[ingest]\nlisen = \"127.0.0.1:1\"\n", "lisen"),
    ];
    for (extra, key) in cases {
        let cfg = dir.path().join("edge.toml");
        // Sections may repeat across base/extra only if distinct; put extra first.
        std::fs::write(&cfg, format!("{extra}\n{base}")).expect("write");
        let out = bin().arg("--config").arg(&cfg).arg("check-config").output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{key}: {err}");
        assert!(err.contains(key), "error must name `{key}`: {err}");
        assert!(!err.contains("long-enough-key"), "secrets never printed: {err}");
    }
    let cfg = dir.path().join("missing.toml");
    let out = bin().arg("--config").arg(&cfg).output().expect("run");
    assert_eq!(out.status.code(), Some(64));
}

/// A configured revocation list that is missing would revoke nothing
/// (fail open): the edge refuses to start (and a reload keeps the running
/// configuration). An empty file is fine.
#[test]
fn a_missing_revocation_file_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs_in(dir.path());
    let d = dir.path().display();
    let list = dir.path().join("revoked.txt");
    let text = format!(
        "[tunnel]\ncert = \"{d}/edge.pem\"\nkey = \"{d}/edge-key.pem\"\nclient_ca = \"{d}/ca.pem\"\nrevoked_file = \"{}\"\n",
        list.display()
    );
    let cfg = dir.path().join("edge.toml");
    std::fs::write(&cfg, text).expect("write");
    let out = bin().arg("--config").arg(&cfg).arg("check-config").output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("tunnel.revoked_file") && err.contains("does not exist"), "{err}");
    std::fs::write(&list, "").expect("create an empty list");
    let out = bin().arg("--config").arg(&cfg).arg("check-config").output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `retention = "0s"` would dead-letter every webhook not delivered at
/// once: refused with the key named.
#[test]
fn a_retention_too_short_to_deliver_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs_in(dir.path());
    let d = dir.path().display();
    for (retention, ok) in [("0s", false), ("500ms", false), ("1m", true)] {
        let text = format!(
            "[tunnel]\ncert = \"{d}/edge.pem\"\nkey = \"{d}/edge-key.pem\"\nclient_ca = \"{d}/ca.pem\"\n[store]\nretention = \"{retention}\"\n"
        );
        let cfg = dir.path().join("edge.toml");
        std::fs::write(&cfg, text).expect("write");
        let out = bin().arg("--config").arg(&cfg).arg("check-config").output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), ok, "retention {retention}: {err}");
        if !ok {
            assert!(err.contains("store.retention"), "{err}");
        }
    }
}

#[test]
fn shipped_example_configs_parse() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs_in(dir.path());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let d = dir.path().display();
    {
        let file = "systemd/edge.example.toml";
        let text = std::fs::read_to_string(root.join(file)).expect("example exists");
        let text = text.replace("/etc/relay/certs", &d.to_string()).replace("certs/dev", &d.to_string());
        let cfg = dir.path().join("edge.toml");
        std::fs::write(&cfg, text).expect("write");
        let out = bin().arg("--config").arg(&cfg).arg("check-config").output().expect("run");
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `print-default-config` prints the built-in defaults, which are the
/// file in the repository (`config.default.toml`), and needs no config.
#[test]
fn print_default_config_prints_the_built_in_defaults() {
    let out = bin().arg("print-default-config").output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.default.toml");
    assert_eq!(String::from_utf8_lossy(&out.stdout), std::fs::read_to_string(file).expect("config.default.toml"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), relay_edge::config::DEFAULT_CONFIG);
}

/// `systemd-analyze verify` on both shipped units (pointing ExecStart at the
/// built binaries). CI installs systemd when it is missing.
#[test]
fn systemd_units_verify() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tool = Command::new("systemd-analyze").arg("--version").output();
    assert!(tool.is_ok(), "systemd-analyze is needed for this test: apt-get install -y systemd");
    let target = Path::new(env!("CARGO_BIN_EXE_relay-edge")).parent().expect("bin dir").to_path_buf();
    let dir = tempfile::tempdir().expect("tempdir");
    for unit in ["relay-edge.service", "relay-agent.service"] {
        let text = std::fs::read_to_string(root.join("systemd").join(unit)).expect("unit");
        let name = unit.trim_end_matches(".service");
        let text = text.replace(&format!("/usr/local/bin/{name}"), &target.join(name).display().to_string());
        let path = dir.path().join(unit);
        std::fs::write(&path, text).expect("write");
        let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("run");
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{unit}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
