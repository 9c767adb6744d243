use thiserror::Error;

/// Why a received frame was refused. Each variant closes only the session
/// that sent it.
#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    #[error("frame violates a limit: {0}")]
    Limit(String),
}

/// A frame could not be encoded (only possible for frames over the limit).
#[derive(Debug, Error)]
pub enum EncodeError {
    #[error("encoding failed: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("encoded frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}
