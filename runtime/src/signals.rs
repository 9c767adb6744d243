//! The signals both binaries act on, and what each asks for: SIGTERM and
//! SIGINT a shutdown (the caller cancels its one shutdown token), SIGHUP
//! (the edge's `systemctl reload`) a configuration reload.
//!
//! Install the handlers before anything listens: from then on these
//! signals never take their default action (ending the process at once),
//! and failing to install one is an error at start, not a process that a
//! SIGTERM would kill mid-write.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::error::SignalError;

/// What a received signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGTERM or SIGINT.
    Shutdown,
    /// SIGHUP (only when its handler is installed).
    Reload,
}

/// The installed handlers.
pub struct Signals {
    /// SIGTERM: systemd's stop.
    term: Signal,
    /// SIGINT: Ctrl-C.
    int: Signal,
    /// SIGHUP, when the process reloads on it; else SIGHUP keeps its
    /// default action.
    hup: Option<Signal>,
}

impl Signals {
    /// Handlers of SIGTERM and SIGINT. Call within a Tokio runtime that
    /// has its I/O driver enabled.
    pub fn shutdown() -> Result<Self, SignalError> {
        Ok(Self {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            hup: None,
        })
    }

    /// Handlers of SIGTERM, SIGINT and SIGHUP.
    pub fn shutdown_and_reload() -> Result<Self, SignalError> {
        let mut signals = Self::shutdown()?;
        signals.hup = Some(install(SignalKind::hangup(), "SIGHUP")?);
        Ok(signals)
    }

    /// Waits for the next signal (cancel-safe); logs a shutdown signal.
    pub async fn recv(&mut self) -> Request {
        let Self { term, int, hup } = self;
        loop {
            let reload = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM received");
                    return Request::Shutdown;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT received");
                    return Request::Shutdown;
                }
                got = reload => {
                    if got.is_some() {
                        return Request::Reload;
                    }
                }
            }
            // No more SIGHUPs can arrive (the runtime is shutting down):
            // wait for the other two only.
            *hup = None;
        }
    }

    /// Cancels `shutdown` at the first SIGTERM or SIGINT; a SIGHUP (when
    /// installed) is ignored.
    pub async fn cancel_on_shutdown(mut self, shutdown: CancellationToken) {
        while self.recv().await == Request::Reload {}
        shutdown.cancel();
    }
}

fn install(kind: SignalKind, name: &'static str) -> Result<Signal, SignalError> {
    signal(kind).map_err(|source| SignalError { signal: name, source })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Sends `signal` to this test process, as `kill` would.
    fn send(signal: &str) {
        let cmd = format!("kill -{signal} {}", std::process::id());
        let status = std::process::Command::new("sh").args(["-c", &cmd]).status().expect("sh runs");
        assert!(status.success(), "{cmd}");
    }

    #[tokio::test]
    async fn sighup_asks_for_a_reload_and_sigterm_cancels_the_shutdown_token() {
        let mut signals = Signals::shutdown_and_reload().expect("handlers install");
        send("HUP");
        let got = tokio::time::timeout(Duration::from_secs(10), signals.recv()).await.expect("SIGHUP arrives");
        assert_eq!(got, Request::Reload);

        let shutdown = CancellationToken::new();
        let task = tokio::spawn(signals.cancel_on_shutdown(shutdown.clone()));
        send("HUP");
        let early = tokio::time::timeout(Duration::from_millis(300), shutdown.cancelled()).await;
        assert!(early.is_err(), "a SIGHUP does not shut down");
        send("TERM");
        tokio::time::timeout(Duration::from_secs(10), shutdown.cancelled()).await.expect("SIGTERM cancels");
        task.await.expect("the signal task ends");
    }
}
