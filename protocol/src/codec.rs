//! MessagePack codec. Size is checked before decoding; after decoding, the
//! frame's own counts (window, ack batch) are checked against [`Limits`].

use crate::{DecodeError, EncodeError, Frame, Limits};

/// Encodes a frame with named fields (`rmp_serde::to_vec_named`).
pub fn encode(frame: &Frame, limits: &Limits) -> Result<Vec<u8>, EncodeError> {
    let bytes = rmp_serde::to_vec_named(frame)?;
    if bytes.len() > limits.max_frame {
        return Err(EncodeError::TooLarge { size: bytes.len(), limit: limits.max_frame });
    }
    Ok(bytes)
}

/// Decodes one frame, refusing oversize input before touching it.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Frame, DecodeError> {
    if bytes.len() > limits.max_frame {
        return Err(DecodeError::TooLarge { size: bytes.len(), limit: limits.max_frame });
    }
    let frame: Frame = rmp_serde::from_slice(bytes)?;
    match &frame {
        Frame::Hello { window, .. } | Frame::Flow { window, .. } if *window > limits.max_window => {
            Err(DecodeError::Limit(format!("window {window} is above the maximum of {}", limits.max_window)))
        }
        Frame::Ack { ids } if ids.len() > limits.max_ack_batch => Err(DecodeError::Limit(format!(
            "ack of {} ids is above the maximum of {}",
            ids.len(),
            limits.max_ack_batch
        ))),
        _ => Ok(frame),
    }
}
