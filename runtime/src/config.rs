//! The configuration layers of both binaries, lowest first:
//!
//! 1. the binary's embedded `config.default.toml`, every key with its
//!    default: the one place the defaults are written;
//! 2. the `--config` file, when one is named (a named file that does not
//!    exist is an error, never skipped);
//! 3. `RELAY_*` environment variables, `__` for nesting
//!    (`RELAY_STORE__REDIS_URL` is `store.redis_url`), less those the
//!    command line reads itself ([`CLI_VARS`]).
//!
//! What comes after (the reference relay's flat variables, files that keys
//! name, validation) is each binary's own. [`check_defaults`] is what keeps
//! an embedded defaults file and the `Default` impl beside it equal.

use std::collections::BTreeMap;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ConfigError;

/// Prefix of the environment layer.
pub const ENV_PREFIX: &str = "RELAY_";

/// `RELAY_*` variables that the command lines read themselves
/// (`RELAY_CONFIG`, `RELAY_LOG_FORMAT`, `RELAY_ADMIN_URL`,
/// `RELAY_ADMIN_TOKEN`): not configuration keys, so never unknown ones.
pub const CLI_VARS: &[&str] = &["config", "log_format", "admin_url", "admin_token"];

/// The layers merged and deserialized: `defaults_toml` (the embedded
/// defaults), then the file at `path` when given, then the variables
/// `<env_prefix><KEY>` / `<env_prefix><SECTION>__<KEY>` (but [`CLI_VARS`]).
/// Unknown keys are errors when `T` denies them.
pub fn load<T: DeserializeOwned>(defaults_toml: &str, path: Option<&Path>, env_prefix: &str) -> Result<T, ConfigError> {
    let mut fig = Figment::from(Toml::string(defaults_toml));
    if let Some(path) = path {
        if !path.is_file() {
            return Err(ConfigError::Missing(path.to_path_buf()));
        }
        fig = fig.merge(Toml::file_exact(path));
    }
    fig = fig.merge(Env::prefixed(env_prefix).split("__").ignore(CLI_VARS));
    extract(&fig)
}

/// One TOML text alone, with no file and no environment: what the
/// embedded defaults give by themselves.
pub fn parse<T: DeserializeOwned>(toml: &str) -> Result<T, ConfigError> {
    extract(&Figment::from(Toml::string(toml)))
}

fn extract<T: DeserializeOwned>(fig: &Figment) -> Result<T, ConfigError> {
    fig.extract().map_err(|e| ConfigError::Invalid(Box::new(without_quoted_lines(e))))
}

/// A TOML syntax error quotes the line it is on, and that line may hold a
/// secret (`redis_url = "redis://:pw@…` with its closing quote missing):
/// keep where it is and what is wrong, never the line itself.
fn without_quoted_lines(e: figment::Error) -> figment::Error {
    let figment::error::Kind::Message(text) = &e.kind else { return e };
    if !text.lines().any(|l| l.trim_start().starts_with('|')) {
        return e;
    }
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let at = lines.next().unwrap_or("TOML parse error");
    let why = lines.rfind(|l| !l.starts_with('|') && !l.contains(" | ")).unwrap_or("invalid TOML");
    let mut redacted = figment::Error::from(format!("{at}: {why} (the line is not shown: it may hold a secret)"));
    redacted.metadata = e.metadata.clone();
    redacted.path = e.path.clone();
    redacted
}

/// Whether an embedded defaults file stands for `T::default()`: parsed
/// alone it yields exactly `T::default()` (compared as JSON), and it writes
/// out every key whose default has a value, so that no default lives in
/// code only. Keys whose default is unset (`None`) are not written (the
/// file shows them commented out); `unwritten` names the others that cannot
/// be: arrays of tables (`route`) and defaults computed at start. The error
/// names the keys that differ.
pub fn check_defaults<T>(defaults_toml: &str, unwritten: &[&str]) -> Result<(), String>
where
    T: DeserializeOwned + Serialize + Default,
{
    let unparsable = |e: ConfigError| format!("the defaults file does not parse: {e}");
    let parsed: T = parse(defaults_toml).map_err(unparsable)?;
    let as_json = |v: &T| serde_json::to_value(v).map_err(|e| format!("cannot compare the defaults: {e}"));
    let parsed = leaves(&as_json(&parsed)?);
    let expected = leaves(&as_json(&T::default())?);
    let differing: Vec<String> = expected
        .iter()
        .filter(|(key, value)| parsed.get(*key) != Some(*value))
        .map(|(key, value)| format!("{key}: file gives {}, Default gives {value}", show(parsed.get(key))))
        .collect();
    if !differing.is_empty() {
        return Err(format!("the defaults file and the Default impl differ:\n{}", differing.join("\n")));
    }
    let written = leaves(&parse::<serde_json::Value>(defaults_toml).map_err(unparsable)?);
    let missing: Vec<&str> = expected
        .iter()
        .filter(|(key, value)| !value.is_null() && !written.contains_key(*key) && !unwritten.contains(&key.as_str()))
        .map(|(key, _)| key.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(format!("the defaults file leaves out these keys that have a default: {}", missing.join(", ")));
    }
    if let Some(stray) = unwritten.iter().find(|key| !expected.contains_key(**key)) {
        return Err(format!("`{stray}` is listed as unwritten but is no key"));
    }
    Ok(())
}

/// Every leaf of a JSON tree by its dotted key (`ingest.listen`); arrays
/// and nulls are leaves.
fn leaves(value: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
        match value {
            serde_json::Value::Object(map) if !map.is_empty() || prefix.is_empty() => {
                for (key, value) in map {
                    let key = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                    walk(&key, value, out);
                }
            }
            _ => {
                out.insert(prefix.to_string(), value.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", value, &mut out);
    out
}

fn show(value: Option<&serde_json::Value>) -> String {
    value.map_or_else(|| "nothing".to_string(), ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A syntax error on a line holding a password names the line and what
    /// is wrong, and never shows the password.
    #[test]
    fn a_syntax_error_never_quotes_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        for text in ["[store]\nredis_url = \"redis://:SuperSecretPw@h:6379/0\n", "token = \"SuperSecretPw\" x\n"] {
            let path = dir.path().join("bad.toml");
            std::fs::write(&path, text).expect("write");
            let e = load::<Sample>("", Some(&path), "RELAY_TEST_NONE_").expect_err("a syntax error");
            let shown = e.to_string();
            assert!(!shown.contains("SuperSecretPw"), "{shown}");
            assert!(shown.contains("line"), "{shown}");
        }
    }

    #[derive(Debug, PartialEq, serde::Deserialize, serde::Serialize)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        listen: String,
        token: Option<String>,
        inner: Inner,
    }

    #[derive(Debug, PartialEq, serde::Deserialize, serde::Serialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        window: u32,
    }

    impl Default for Sample {
        fn default() -> Self {
            Self { listen: "127.0.0.1:1".into(), token: None, inner: Inner::default() }
        }
    }

    impl Default for Inner {
        fn default() -> Self {
            Self { window: 64 }
        }
    }

    const DEFAULTS: &str = "listen = \"127.0.0.1:1\"\n# token = \"example\"\n[inner]\nwindow = 64\n";

    #[test]
    fn a_file_overrides_the_defaults_it_names_and_keeps_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[inner]\nwindow = 3\n").expect("write");
        // A prefix no variable of this process has: the environment adds nothing.
        let cfg: Sample = load(DEFAULTS, Some(&path), "RELAY_RUNTIME_TEST_UNSET_").expect("loads");
        assert_eq!(cfg, Sample { inner: Inner { window: 3 }, ..Sample::default() });
        let cfg: Sample = load(DEFAULTS, None, "RELAY_RUNTIME_TEST_UNSET_").expect("loads");
        assert_eq!(cfg, Sample::default());
    }

    #[test]
    fn a_named_file_that_is_missing_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("none.toml");
        let err = load::<Sample>(DEFAULTS, Some(&path), ENV_PREFIX).expect_err("must fail");
        assert!(matches!(err, ConfigError::Missing(_)), "{err}");
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[inner]\nwindw = 3\n").expect("write");
        let err = load::<Sample>(DEFAULTS, Some(&path), "RELAY_RUNTIME_TEST_UNSET_").expect_err("must fail");
        assert!(err.to_string().contains("windw"), "{err}");
    }

    #[test]
    fn check_defaults_finds_a_drifted_value_and_a_key_left_out() {
        assert_eq!(check_defaults::<Sample>(DEFAULTS, &[]), Ok(()));
        let drifted = DEFAULTS.replace("window = 64", "window = 65");
        let err = check_defaults::<Sample>(&drifted, &[]).expect_err("drift found");
        assert!(err.contains("inner.window"), "{err}");
        let left_out = DEFAULTS.replace("listen = \"127.0.0.1:1\"\n", "");
        let err = check_defaults::<Sample>(&left_out, &[]).expect_err("left-out key found");
        assert!(err.contains("listen"), "{err}");
        assert_eq!(check_defaults::<Sample>(&left_out, &["listen"]), Ok(()));
        assert!(check_defaults::<Sample>(DEFAULTS, &["nonesuch"]).is_err());
    }
}
