//! System calls per webhook, from `strace -c`: every hop's `read`,
//! `write` and `epoll_wait` costs a kernel crossing, which on a VM weighs
//! more than the instructions around it. `relay-bench --syscalls N` attaches
//! `strace -f -c` to the edge, the agent and Redis after a warm-up, for
//! exactly `N` webhooks relayed end to end, detaches and divides. strace
//! slows each process down, which batches more per call than an untraced
//! run would: read the counts as an upper bound, and compare runs. The
//! bench's own `XPENDING` polls (every 50 ms) count in Redis's figure.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};

/// `strace -c` attached to one process (all its threads).
pub struct Tracer {
    child: tokio::process::Child,
    out: PathBuf,
}

/// Calls counted by one tracer, by system call, most first.
#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    pub by_call: Vec<(String, u64)>,
}

impl Summary {
    /// Every call counted.
    pub fn total(&self) -> u64 {
        self.by_call.iter().map(|c| c.1).sum()
    }
}

/// Attaches `strace -f -c` to `pid`, its summary going to `out`; returns
/// once strace says it attached.
pub async fn attach(pid: u32, out: &Path) -> anyhow::Result<Tracer> {
    let mut child = tokio::process::Command::new("strace")
        .args(["-f", "-c", "-o"])
        .arg(out)
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("strace (apt-get install strace)")?;
    let stderr = child.stderr.take().context("strace's stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let attached = async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("attached") {
                return anyhow::Ok(true);
            }
        }
        anyhow::Ok(false)
    };
    match tokio::time::timeout(Duration::from_secs(10), attached).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => bail!("strace -p {pid} exited before attaching (ptrace permitted here?)"),
        Ok(Err(e)) => return Err(e).context("reading strace's stderr"),
        Err(_) => bail!("strace -p {pid} did not attach within 10 s"),
    }
    // The rest of its messages (one per thread), read so it never blocks.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Tracer { child, out: out.to_path_buf() })
}

impl Tracer {
    /// Detaches (`SIGINT`, which makes strace write its summary) and reads
    /// the counts.
    pub async fn detach(mut self) -> anyhow::Result<Summary> {
        let pid = self.child.id().context("strace had already exited")?;
        let status = tokio::process::Command::new("kill").args(["-INT", &pid.to_string()]).status().await?;
        if !status.success() {
            bail!("kill -INT {pid} (strace): {status}");
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .context("strace did not exit within 30 s of SIGINT")??;
        let text = std::fs::read_to_string(&self.out).with_context(|| format!("read {}", self.out.display()))?;
        parse(&text).with_context(|| format!("no total in {}", self.out.display()))
    }
}

/// Reads `strace -c`'s table: `% time  seconds  usecs/call  calls  [errors]
/// syscall` rows. The total is their sum (older straces print the `total`
/// row without `usecs/call`), and a second table (another personality)
/// adds to the first. `None` when there are no rows.
pub fn parse(text: &str) -> Option<Summary> {
    let mut calls: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Rows have 5 fields, or 6 with an error count; the name is last.
        if !(5..=6).contains(&fields.len()) || fields[0].parse::<f64>().is_err() {
            continue;
        }
        let (Ok(n), Some(name)) = (fields[3].parse::<u64>(), fields.last()) else { continue };
        if *name != "total" {
            *calls.entry(name.to_string()).or_default() += n;
        }
    }
    if calls.is_empty() {
        return None;
    }
    let mut by_call: Vec<(String, u64)> = calls.into_iter().collect();
    by_call.sort_by_key(|c| std::cmp::Reverse(c.1));
    Some(Summary { by_call })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_summary_table_with_and_without_error_counts() {
        let text = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 61.02    0.012000           2      5000           sendto
 30.10    0.006000           1      4200      1200 recvfrom
  8.88    0.001000           0       800           epoll_wait
------ ----------- ----------- --------- --------- ----------------
100.00    0.019000           1     10000      1200 total
";
        let s = parse(text).expect("a total");
        assert_eq!(s.total(), 10000);
        assert_eq!(
            s.by_call,
            vec![("sendto".to_string(), 5000), ("recvfrom".to_string(), 4200), ("epoll_wait".to_string(), 800)]
        );
        assert_eq!(parse("strace: Process 1 attached\n"), None, "no table, no summary");
        // An older strace's total row (no usecs/call) and a second table.
        let old = "\
 90.00    0.009000           2      3000           read
100.00    0.010000                  3000           total
System call usage summary for 32 bit mode:
 10.00    0.001000           1       500           read
";
        let s = parse(old).expect("rows");
        assert_eq!((s.total(), s.by_call), (3500, vec![("read".to_string(), 3500)]));
    }
}
