//! Hard limits, checked before any decoding so a hostile peer cannot make us
//! allocate or parse more than these.

/// Limits applied to every frame of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded frame accepted, in bytes. WhatsApp payloads reach 3 MB
    /// and the ingest body limit defaults to 4 MiB, so 8 MiB leaves room for
    /// headers and framing.
    pub max_frame: usize,
    /// Largest window an agent may ask for (max unacked deliveries in flight).
    pub max_window: u32,
    /// Largest number of ids in one `Ack`.
    pub max_ack_batch: usize,
}

impl Limits {
    pub const DEFAULT_MAX_FRAME: usize = 8 * 1024 * 1024;

    /// Largest frame an agent sends (`Hello`, `Ack`, `Nack`, `Flow`,
    /// heartbeats; never a webhook): the edge decodes agent frames with
    /// this cap, so with the counted lists of [`crate::Frame`] no agent frame
    /// costs the edge much more than a few MiB to decode.
    pub const MAX_AGENT_FRAME: usize = 1024 * 1024;

    /// The limits for frames an agent sends, from the session's limits.
    pub fn for_agent_frames(self) -> Self {
        Self { max_frame: self.max_frame.min(Self::MAX_AGENT_FRAME), ..self }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_frame: Self::DEFAULT_MAX_FRAME, max_window: 10_000, max_ack_batch: 10_000 }
    }
}
