//! Variable Byte Integers (MQTT 5.0 section 1.5.5; 3.1.1 section 2.2.3 for Remaining Length).

use crate::error::DecodeError;
use bytes::BufMut;

/// The largest value a Variable Byte Integer can hold.
pub const MAX_VARINT: u32 = 268_435_455;

/// How many bytes `v` takes as a Variable Byte Integer.
pub const fn varint_len(v: u32) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Writes `v` (at most [`MAX_VARINT`]) as a Variable Byte Integer.
pub(crate) fn put_varint(buf: &mut impl BufMut, mut v: u32) {
    loop {
        let mut byte = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if v == 0 {
            break;
        }
    }
}

/// Reads a Variable Byte Integer from the start of `bytes`: `Ok(None)` when more bytes are
/// needed, else the value and how many bytes it took. More than four bytes, or a longer
/// encoding than the value needs [MQTT-1.5.5-1], is malformed.
pub(crate) fn get_varint(bytes: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for (i, &b) in bytes.iter().enumerate().take(4) {
        value |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            let len = i + 1;
            if len > 1 && b == 0 {
                return Err(DecodeError::MalformedVariableInteger);
            }
            return Ok(Some((value, len)));
        }
    }
    if bytes.len() >= 4 {
        Err(DecodeError::MalformedVariableInteger)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn spec_boundaries() {
        for (v, enc) in [
            (0u32, &[0x00u8][..]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xFF, 0xFF, 0x7F]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out, enc, "{v}");
            assert_eq!(varint_len(v), enc.len());
            assert_eq!(get_varint(enc).unwrap(), Some((v, enc.len())));
        }
    }

    #[test]
    fn rejects_five_bytes_and_overlong() {
        assert!(get_varint(&[0xFF, 0xFF, 0xFF, 0xFF, 0x7F]).is_err());
        assert!(get_varint(&[0x80, 0x80, 0x80, 0x80]).is_err());
        assert!(get_varint(&[0x80, 0x00]).is_err());
        assert_eq!(get_varint(&[0x80, 0x80]).unwrap(), None);
        assert_eq!(get_varint(&[]).unwrap(), None);
    }
}
