//! Instructions per webhook, from `valgrind --tool=callgrind`: unlike wall
//! time on a shared host, the count repeats run to run on the same binary
//! and input, so it shows a 5 % change. `relay-bench --callgrind N` runs
//! the edge and the agent under callgrind with instrumentation off, warms
//! up, turns it on (`callgrind_control -i on`) for exactly `N` webhooks
//! relayed end to end, turns it off and divides.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Writes an executable wrapper that runs `bin` under callgrind,
/// instrumentation off, its profile going to `out`.
pub fn wrapper(dir: &Path, bin: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let name = bin.file_name().context("binary name")?;
    let path = dir.join(name);
    let script = format!(
        "#!/bin/sh\nexec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file={} {} \"$@\"\n",
        out.display(),
        bin.display()
    );
    std::fs::write(&path, script)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// `callgrind_control -i on|off PID`: starts or stops counting.
pub async fn collect(pid: u32, on: bool) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("callgrind_control")
        .args(["-i", if on { "on" } else { "off" }, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .context("callgrind_control (apt-get install valgrind)")?;
    if !status.success() {
        bail!("callgrind_control -i for PID {pid}: {status}");
    }
    Ok(())
}

/// Instructions counted in a callgrind profile (its `totals:` line).
pub fn instructions(out: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(out).with_context(|| format!("read {}", out.display()))?;
    // `summary:` near the top counts from the start (0 with instrumentation
    // off then); `totals:` at the end counts what was collected.
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("totals:"))
        .with_context(|| format!("no totals in {}", out.display()))?;
    line.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("bad totals in {}", out.display()))
}
