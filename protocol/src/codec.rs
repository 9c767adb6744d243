//! MessagePack codec. Size is checked before decoding; after decoding, the
//! frame's own counts (window, ack batch) are checked against [`Limits`].

use crate::frame::WebhookView;
use crate::{DecodeError, EncodeError, Frame, Limits, Webhook};

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
        Frame::Ack { ids, .. } if ids.len() > limits.max_ack_batch => Err(DecodeError::Limit(format!(
            "ack of {} ids is above the maximum of {}",
            ids.len(),
            limits.max_ack_batch
        ))),
        Frame::Ack { ids, channels } if !channels.is_empty() && channels.len() != ids.len() => {
            Err(DecodeError::Limit(format!("ack names {} channels for {} ids", channels.len(), ids.len())))
        }
        _ => Ok(frame),
    }
}

/// The stored form of a webhook: MessagePack with named fields, the bytes
/// the edge keeps in its store and splices into `Deliver` frames
/// ([`encode_deliver`]) after [`check_webhook`].
pub fn encode_webhook(webhook: &Webhook) -> Result<Vec<u8>, EncodeError> {
    // Sized up front: growing a Vec field by field reallocates it a dozen
    // times per webhook (the field names and MessagePack heads fit in 256).
    let strings = webhook.id.len() + webhook.method.len() + webhook.path.len() + webhook.query.len();
    let headers: usize = webhook.headers.iter().map(|h| h.name.len() + h.value.len() + 16).sum();
    let size = 256 + strings + headers + webhook.body.len() + webhook.route.len() + webhook.client_ip.len();
    let mut out = Vec::with_capacity(size);
    rmp_serde::encode::write_named(&mut out, webhook)?;
    Ok(out)
}

/// Decodes a stored webhook ([`encode_webhook`]'s bytes).
pub fn decode_webhook(bytes: &[u8]) -> Result<Webhook, DecodeError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

/// Checks that `bytes` is an encoded [`crate::Webhook`] (named fields, as
/// the edge stores it) without copying it, and returns its
/// `received_at_ms`. Whatever passes decodes as a `Webhook`.
pub fn check_webhook(bytes: &[u8]) -> Result<u64, DecodeError> {
    let view: WebhookView<'_> = rmp_serde::from_slice(bytes)?;
    Ok(view.received_at_ms)
}

/// Encodes `Frame::Deliver` around an already encoded webhook (checked by
/// [`check_webhook`]): the same bytes as [`encode`] of the frame, without
/// decoding the webhook and encoding it again.
pub fn encode_deliver(
    id: &str,
    channel: &str,
    attempt: u32,
    received_at_ms: u64,
    webhook: &[u8],
    limits: &Limits,
) -> Result<Vec<u8>, EncodeError> {
    use rmp::encode::{write_map_len, write_str, write_uint};
    let mut out = Vec::with_capacity(64 + id.len() + channel.len() + webhook.len());
    // Writing to a Vec cannot fail.
    let _ = write_map_len(&mut out, 1);
    let _ = write_str(&mut out, "Deliver");
    let _ = write_map_len(&mut out, 5);
    let _ = write_str(&mut out, "id");
    let _ = write_str(&mut out, id);
    let _ = write_str(&mut out, "channel");
    let _ = write_str(&mut out, channel);
    let _ = write_str(&mut out, "attempt");
    let _ = write_uint(&mut out, u64::from(attempt));
    let _ = write_str(&mut out, "received_at_ms");
    let _ = write_uint(&mut out, received_at_ms);
    let _ = write_str(&mut out, "webhook");
    out.extend_from_slice(webhook);
    if out.len() > limits.max_frame {
        return Err(EncodeError::TooLarge { size: out.len(), limit: limits.max_frame });
    }
    Ok(out)
}
