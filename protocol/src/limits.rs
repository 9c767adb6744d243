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
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_frame: Self::DEFAULT_MAX_FRAME, max_window: 10_000, max_ack_batch: 10_000 }
    }
}
