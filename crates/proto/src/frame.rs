//! Frames: a 4-byte big-endian length, then one bincode 2 (serde) value, at most
//! [`MAX_FRAME`] bytes.

use std::io::Read;

use serde::{de::DeserializeOwned, Serialize};

use crate::MAX_FRAME;

/// Framing and decoding problems.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("undecodable frame: {0}")]
    Decode(String),
    #[error("cannot encode frame: {0}")]
    Encode(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn config() -> bincode::config::Configuration<
    bincode::config::BigEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME>,
> {
    bincode::config::standard().with_big_endian().with_limit::<MAX_FRAME>()
}

/// Encodes a value as one frame (length prefix included).
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, ProtoError> {
    let body = bincode::serde::encode_to_vec(value, config()).map_err(|e| ProtoError::Encode(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(ProtoError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| ProtoError::TooLarge(body.len()))?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a frame body; trailing bytes are an error (a frame holds exactly one value).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProtoError> {
    let (value, used) =
        bincode::serde::decode_from_slice(body, config()).map_err(|e| ProtoError::Decode(e.to_string()))?;
    if used != body.len() {
        return Err(ProtoError::Decode(format!("{} trailing bytes after the value", body.len() - used)));
    }
    Ok(value)
}

/// Reads a frame's length prefix and checks it against the limit.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    Ok(len)
}

pub(crate) fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> Result<T, ProtoError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtoError::Closed,
        _ => ProtoError::Io(e),
    })?;
    let mut body = vec![0u8; frame_len(prefix)?];
    r.read_exact(&mut body)?;
    decode_body(&body)
}
