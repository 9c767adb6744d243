//! The configuration's documentation agrees with the code. Each binary's
//! `config.default.toml` is what its loader starts from (a unit test in
//! each crate keeps it equal to the `Default` impls); here:
//!
//! 1. every key of it is in the README's key table with the same default,
//!    and the table names no other key;
//! 2. the keys it shows commented out (no default, or an example
//!    `[[list]]` entry) are real keys with valid example values;
//! 3. the shipped example configs load, use only keys it has, and the
//!    `systemd/` ones show every key and name, in its comment, the default
//!    of each value they change (as their headers say).
//!
//! The files are read simply, line by line:
//! - a TOML file: `[section]` and `[[list]]` headers and `key = value`
//!   lines, each possibly commented out with `#`. A commented line counts
//!   only when it reads `# key = …` with a lower-case bare key, so prose
//!   comments are skipped; the active lines found are checked against a
//!   real TOML parser.
//! - the README: the first table after `### Edge` / `### Agent`. Column 1
//!   holds the keys as code spans: `a.b` / `c` (a later key without a
//!   section takes the first one's), `[[route]] name` for `route.name`.
//!   Column 2 holds the default: one code span is a value, anything else
//!   (`none`, `—`, prose) means there is none; `x` / `y` pairs up with the
//!   keys.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use relay_agent::AgentConfig;
use relay_edge::EdgeConfig;
use relay_runtime::config::{ENV_PREFIX, load, parse};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(file: &str) -> String {
    std::fs::read_to_string(root().join(file)).unwrap_or_else(|e| panic!("cannot read {file}: {e}"))
}

/// One `key = value` line of a TOML file, active or commented out.
#[derive(Debug)]
struct KeyLine {
    /// Dotted: `ingest.listen`, `route.name`.
    key: String,
    /// As written, without a string's quotes: `4MiB`, `[]`, `false`.
    value: String,
    /// The comment after the value (empty without one).
    comment: String,
    /// Written `# key = value`: no default, or in a commented-out example.
    commented: bool,
    /// Under a `[[list]]` header: a key of each entry of that list.
    in_list: bool,
    /// 1-based, for messages.
    line: usize,
}

fn is_bare_key(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// `[name]` is `(name, false)`, `[[name]]` is `(name, true)`; a comment may follow.
fn header(body: &str) -> Option<(&str, bool)> {
    let body = body.split_once('#').map_or(body, |(before, _)| before).trim();
    let (name, list) = match body.strip_prefix("[[").and_then(|b| b.strip_suffix("]]")) {
        Some(name) => (name, true),
        None => (body.strip_prefix('[')?.strip_suffix(']')?, false),
    };
    (!name.is_empty() && name.split('.').all(is_bare_key)).then_some((name, list))
}

/// `key = rest`, when `key` is a bare key.
fn assignment(body: &str) -> Option<(&str, &str)> {
    let (key, rest) = body.split_once('=')?;
    let key = key.trim();
    is_bare_key(key).then_some((key, rest.trim()))
}

/// The value at the start of `rest` (a string, without its quotes; an array
/// to its closing bracket; else up to a comment) and the comment after it.
fn value_and_comment(rest: &str) -> (String, String) {
    let end = if let Some(string) = rest.strip_prefix('"') {
        string.find('"').map_or(rest.len(), |i| i + 2)
    } else if rest.starts_with('[') {
        let (mut depth, mut in_string, mut end) = (0, false, rest.len());
        for (i, c) in rest.char_indices() {
            match c {
                '"' => in_string = !in_string,
                '[' if !in_string => depth += 1,
                ']' if !in_string => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        end
    } else {
        rest.find('#').unwrap_or(rest.len())
    };
    let (value, after) = rest.split_at(end);
    let value = value.trim();
    let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
    let comment = after.trim().strip_prefix('#').unwrap_or_default().trim();
    (value.to_string(), comment.to_string())
}

fn key_lines(text: &str) -> Vec<KeyLine> {
    let mut section = String::new();
    let mut in_list = false;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        let (commented, body) = match trimmed.strip_prefix('#') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, trimmed),
        };
        if let Some((name, list)) = header(body) {
            section = name.to_string();
            in_list = list;
        } else if let Some((key, rest)) = assignment(body) {
            let (value, comment) = value_and_comment(rest);
            let key = if section.is_empty() { key.to_string() } else { format!("{section}.{key}") };
            out.push(KeyLine { key, value, comment, commented, in_list, line: i + 1 });
        }
    }
    out
}

/// `text` with its commented-out keys and headers made active.
fn uncomment(text: &str) -> String {
    let mut out = String::new();
    for raw in text.lines() {
        match raw.trim().strip_prefix('#').map(str::trim_start) {
            Some(body) if header(body).is_some() || assignment(body).is_some() => out.push_str(body),
            _ => out.push_str(raw),
        }
        out.push('\n');
    }
    out
}

/// The keys a TOML parser finds; the keys of `[[list]]` entries as `list.key`.
fn toml_keys(file: &str, text: &str) -> BTreeSet<String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
        for (name, value) in table {
            let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
            match value {
                toml::Value::Table(t) => walk(&key, t, out),
                toml::Value::Array(items) if !items.is_empty() && items.iter().all(toml::Value::is_table) => {
                    for item in items.iter().filter_map(toml::Value::as_table) {
                        walk(&key, item, out);
                    }
                }
                _ => {
                    out.insert(key);
                }
            }
        }
    }
    let table: toml::Table = toml::from_str(text).unwrap_or_else(|e| panic!("{file} is not TOML: {e}"));
    let mut out = BTreeSet::new();
    walk("", &table, &mut out);
    out
}

/// `Some(inner)` when `part` is exactly one code span.
fn one_code_span(part: &str) -> Option<String> {
    let inner = part.trim().strip_prefix('`')?.strip_suffix('`')?;
    (!inner.contains('`')).then(|| inner.to_string())
}

/// The keys of a README key cell: its code spans, `[[list]] key` as
/// `list.key`; a later key without a section takes the first key's.
fn row_keys(cell: &str) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for span in cell.split('`').skip(1).step_by(2) {
        let key = match span.strip_prefix("[[").and_then(|s| s.split_once("]]")) {
            Some((list, key)) => format!("{list}.{}", key.trim()),
            None => span.to_string(),
        };
        let key = match keys.first().and_then(|first| first.rsplit_once('.')) {
            Some((section, _)) if !key.contains('.') => format!("{section}.{key}"),
            _ => key,
        };
        keys.push(key);
    }
    keys
}

/// The keys of the README's first table after `heading`, each with its
/// default: `Some(value)` for a cell that is one code span, `None` for a
/// cell that gives none (`none`, `—`, prose).
fn readme_table(readme: &str, heading: &str) -> BTreeMap<String, Option<String>> {
    let rows: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with(heading))
        .skip(1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        // The header row and `|---|---|`.
        .skip(2)
        .collect();
    assert!(!rows.is_empty(), "README: no key table after `{heading}`");
    let mut table: BTreeMap<String, Option<String>> = BTreeMap::new();
    for row in rows {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (Some(keys), Some(defaults)) = (cells.get(1), cells.get(2)) else {
            panic!("README row `{row}` has no key and default columns");
        };
        let keys = row_keys(keys);
        let mut defaults: Vec<Option<String>> = defaults.split(" / ").map(one_code_span).collect();
        if defaults.len() == 1 && keys.len() > 1 {
            let one = defaults[0].clone();
            defaults = vec![one; keys.len()];
        }
        assert_eq!(defaults.len(), keys.len(), "README row `{row}`: the defaults do not pair up with the keys");
        for (key, default) in keys.into_iter().zip(defaults) {
            assert!(!table.contains_key(&key), "README lists `{key}` twice");
            table.insert(key, default);
        }
    }
    table
}

/// The keys of a defaults file by name, each once; checks the line reader
/// against a TOML parser on the way.
fn defaults_by_key(file: &str, text: &str, problems: &mut Vec<String>) -> BTreeMap<String, KeyLine> {
    let mut keys: BTreeMap<String, KeyLine> = BTreeMap::new();
    for line in key_lines(text) {
        if let Some(first) = keys.get(&line.key) {
            problems.push(format!("{file}:{}: `{}` again (first on line {})", line.line, line.key, first.line));
            continue;
        }
        keys.insert(line.key.clone(), line);
    }
    let active: BTreeSet<String> = keys.values().filter(|l| !l.commented).map(|l| l.key.clone()).collect();
    let parsed = toml_keys(file, text);
    if active != parsed {
        problems.push(format!("{file}: the line reader finds the keys {active:?}, a TOML parser {parsed:?}"));
    }
    keys
}

/// Every key of the defaults file is in the README's table under
/// `heading`, with the same default, and the table has no other key.
fn check_readme(file: &str, defaults: &BTreeMap<String, KeyLine>, heading: &str, problems: &mut Vec<String>) {
    let table = readme_table(&read("README.md"), heading);
    for key in defaults.keys().filter(|k| !table.contains_key(*k)) {
        problems.push(format!("`{key}` is in {file} but not in the README's table under `{heading}`"));
    }
    for (key, readme_default) in &table {
        let Some(line) = defaults.get(key) else {
            problems.push(format!("the README's table under `{heading}` lists `{key}`, which {file} does not have"));
            continue;
        };
        match readme_default {
            Some(value) if line.commented && !line.in_list => problems.push(format!(
                "`{key}`: the README gives the default `{value}`, {file} none (line {}, commented out)",
                line.line
            )),
            Some(value) if *value != line.value => problems.push(format!(
                "`{key}`: the README gives the default `{value}`, {file} `{}` (line {})",
                line.value, line.line
            )),
            None if !line.commented => problems
                .push(format!("`{key}`: the README gives no default, {file} `{}` (line {})", line.value, line.line)),
            _ => {}
        }
    }
}

/// A shipped example config loads (`loads`: the binary's layers, without
/// its checks of files) and uses only keys of the defaults file. When
/// `complete`, it also shows every key, and the comment of a value that is
/// not the default says `default`.
fn check_example(
    example: &str,
    file: &str,
    defaults: &BTreeMap<String, KeyLine>,
    complete: bool,
    loads: impl Fn(&Path) -> Result<(), String>,
    problems: &mut Vec<String>,
) {
    if let Err(e) = loads(&root().join(example)) {
        problems.push(format!("{example} does not load: {e}"));
    }
    let text = read(example);
    let lines = key_lines(&text);
    let mut used = toml_keys(example, &text);
    used.extend(lines.iter().map(|l| l.key.clone()));
    for key in used.iter().filter(|k| !defaults.contains_key(*k)) {
        problems.push(format!("{example} uses `{key}`, which {file} does not have"));
    }
    if !complete {
        return;
    }
    for key in defaults.keys().filter(|k| !used.contains(*k)) {
        problems.push(format!("{example} does not show `{key}`, though its header says every key is shown"));
    }
    for line in lines.iter().filter(|l| !l.commented && !l.in_list) {
        let Some(default) = defaults.get(&line.key) else { continue };
        if (default.commented || default.value != line.value) && !line.comment.contains("default") {
            let default = if default.commented { "none".to_string() } else { format!("`{}`", default.value) };
            problems.push(format!(
                "{example}:{}: `{}` = `{}` is not the default ({default}); its comment must name the default",
                line.line, line.key, line.value
            ));
        }
    }
}

#[test]
fn edge_config_docs_and_examples_agree_with_its_defaults() {
    let file = "relay-edge/config.default.toml";
    let text = relay_edge::config::DEFAULT_CONFIG;
    let mut problems = Vec::new();
    let defaults = defaults_by_key(file, text, &mut problems);
    if let Err(e) = parse::<EdgeConfig>(&uncomment(text)) {
        problems.push(format!("{file} with its commented-out keys made active does not parse: {e}"));
    }
    check_readme(file, &defaults, "### Edge", &mut problems);
    let loads = |path: &Path| load::<EdgeConfig>(text, Some(path), ENV_PREFIX).map(drop).map_err(|e| e.to_string());
    check_example("systemd/edge.example.toml", file, &defaults, true, loads, &mut problems);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn agent_config_docs_and_examples_agree_with_its_defaults() {
    let file = "relay-agent/config.default.toml";
    let text = relay_agent::config::DEFAULT_CONFIG;
    let mut problems = Vec::new();
    let defaults = defaults_by_key(file, text, &mut problems);
    if let Err(e) = parse::<AgentConfig>(&uncomment(text)) {
        problems.push(format!("{file} with its commented-out keys made active does not parse: {e}"));
    }
    check_readme(file, &defaults, "### Agent", &mut problems);
    let loads = |path: &Path| load::<AgentConfig>(text, Some(path), ENV_PREFIX).map(drop).map_err(|e| e.to_string());
    check_example("systemd/agent.example.toml", file, &defaults, true, loads, &mut problems);
    check_example("compose/agent.toml", file, &defaults, false, loads, &mut problems);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The readers on the shapes the files use, so a reader bug cannot make
/// the checks above pass vacuously.
#[test]
fn the_readers_read_the_shapes_the_files_use() {
    let lines = key_lines(
        "top = 1  # one\n[a]\nlisten = \"x # y\"   # why\n# token = \"t\"\n# Prose = no key\n# see: k = v\n\
         list = [\"p\", \"q\"] # l\n# [[r]]\n# name = \"n\"\n",
    );
    let seen: Vec<(&str, &str, &str, bool, bool)> =
        lines.iter().map(|l| (l.key.as_str(), l.value.as_str(), l.comment.as_str(), l.commented, l.in_list)).collect();
    assert_eq!(
        seen,
        [
            ("top", "1", "one", false, false),
            ("a.listen", "x # y", "why", false, false),
            ("a.token", "t", "", true, false),
            ("a.list", "[\"p\", \"q\"]", "l", false, false),
            ("r.name", "n", "", true, true),
        ]
    );
    assert_eq!(uncomment("# [[r]]\n# name = \"n\"\n# Prose here\n"), "[[r]]\nname = \"n\"\n# Prose here\n");
    assert_eq!(row_keys("`reconnect.initial_delay` / `max_delay`"), ["reconnect.initial_delay", "reconnect.max_delay"]);
    assert_eq!(row_keys("`cert` / `key`"), ["cert", "key"]);
    assert_eq!(row_keys("`[[target]] channel` / `url`"), ["target.channel", "target.url"]);
    assert_eq!(one_code_span(" `4MiB` "), Some("4MiB".to_string()));
    assert_eq!(one_code_span("none"), None);
    assert_eq!(one_code_span("`a` under systemd, else `b`"), None);
    let readme = "### Edge (x)\n\n| key | default | meaning |\n|---|---|---|\n\
                  | `a.b` / `c` | `1` / `2` | m |\n| `d` | none | m |\n\n| `e` | `3` | m |\n";
    let table = readme_table(readme, "### Edge");
    let expected: BTreeMap<String, Option<String>> = [
        ("a.b".to_string(), Some("1".to_string())),
        ("a.c".to_string(), Some("2".to_string())),
        ("d".to_string(), None),
    ]
    .into_iter()
    .collect();
    assert_eq!(table, expected);
}
