//! The on-disk frame of one log record.
//!
//! ```text
//! len:          u32 LE   bytes after the crc: 16 + payload
//! crc:          u32 LE   CRC-32C (Castagnoli) of those bytes
//! offset:       u64 LE   the record's position in the log
//! timestamp_ms: u64 LE   append time, ms since the Unix epoch
//! payload:      [u8]
//! ```
//!
//! The offset inside the frame lets recovery tell a frame that belongs here from
//! stale bytes that merely look like one.

use bytes::Bytes;

/// Bytes before the payload.
pub const HEADER_LEN: usize = 4 + 4 + 8 + 8;
/// Largest payload accepted: bounds memory when a corrupt length is read.
pub const MAX_PAYLOAD: usize = 64 << 20;

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its position: 0 for the first record ever appended, then +1 per record.
    pub offset: u64,
    /// When it was appended, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Its bytes.
    pub payload: Bytes,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length field is impossible (smaller than the fixed fields or too big).
    #[error("invalid frame length {0}")]
    BadLength(u32),
    /// The checksum does not match.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// The stored checksum.
        stored: u32,
        /// The checksum of the bytes.
        computed: u32,
    },
}

/// Appends the frame of `(offset, timestamp, payload)` to `out`.
pub fn encode(offset: u64, timestamp_ms: u64, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(16 + payload.len()).expect("payloads are bounded by MAX_PAYLOAD");
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The size of the frame of a payload of `len` bytes.
pub fn frame_len(payload_len: usize) -> usize {
    HEADER_LEN + payload_len
}

/// Decodes the frame at the start of `buf`: `Ok(None)` if `buf` holds only part of a
/// frame (read more), `Ok(Some((record, frame length)))`, or an error for bytes that
/// can't be a frame. Never panics, whatever the bytes.
///
/// ```
/// use trellis_storage::log::frame::{decode, encode};
///
/// let mut buf = Vec::new();
/// encode(7, 1_700_000_000_000, b"hello", &mut buf);
/// let (record, used) = decode(&buf).unwrap().unwrap();
/// assert_eq!((record.offset, &record.payload[..], used), (7, &b"hello"[..], buf.len()));
/// assert_eq!(decode(&buf[..10]).unwrap(), None);
/// buf[20] ^= 1;
/// assert!(decode(&buf).is_err());
/// ```
pub fn decode(buf: &[u8]) -> Result<Option<(Record, usize)>, FrameError> {
    let Some(len_bytes) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(len_bytes.try_into().map_err(|_| FrameError::BadLength(0))?);
    let body_len = len as usize;
    if body_len < 16 || body_len - 16 > MAX_PAYLOAD {
        return Err(FrameError::BadLength(len));
    }
    let total = 8 + body_len;
    let Some(frame) = buf.get(..total) else {
        return Ok(None);
    };
    let stored = u32::from_le_bytes(
        frame[4..8]
            .try_into()
            .map_err(|_| FrameError::BadLength(len))?,
    );
    let computed = crc32c::crc32c(&frame[8..]);
    if stored != computed {
        return Err(FrameError::BadChecksum { stored, computed });
    }
    let offset = u64::from_le_bytes(
        frame[8..16]
            .try_into()
            .map_err(|_| FrameError::BadLength(len))?,
    );
    let timestamp_ms = u64::from_le_bytes(
        frame[16..24]
            .try_into()
            .map_err(|_| FrameError::BadLength(len))?,
    );
    Ok(Some((
        Record {
            offset,
            timestamp_ms,
            payload: Bytes::copy_from_slice(&frame[24..]),
        },
        total,
    )))
}

#[cfg(test)]
mod test {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn round_trips(offset: u64, ts: u64, payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut buf = Vec::new();
            encode(offset, ts, &payload, &mut buf);
            prop_assert_eq!(buf.len(), frame_len(payload.len()));
            let (record, used) = decode(&buf).expect("valid").expect("complete");
            prop_assert_eq!(used, buf.len());
            prop_assert_eq!(record, Record { offset, timestamp_ms: ts, payload: Bytes::from(payload) });
        }

        #[test]
        fn every_prefix_is_incomplete_not_an_error(payload in proptest::collection::vec(any::<u8>(), 0..256), cut in 0usize..300) {
            let mut buf = Vec::new();
            encode(1, 2, &payload, &mut buf);
            let cut = cut.min(buf.len() - 1);
            prop_assert_eq!(decode(&buf[..cut]), Ok(None));
        }

        #[test]
        fn any_single_bit_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..256), bit in 0usize..(8 * 280)) {
            let mut buf = Vec::new();
            encode(1, 2, &payload, &mut buf);
            let bit = bit % (buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            // A flipped length may make the frame look incomplete; never a wrong record.
            if let Ok(Some((record, _))) = decode(&buf) {
                prop_assert!(false, "corruption accepted: {record:?}");
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }
    }
}
