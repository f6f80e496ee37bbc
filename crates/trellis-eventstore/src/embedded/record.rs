//! Encodings of the embedded backend's small records.

use std::time::Duration;

use bytes::{Buf as _, BufMut as _, Bytes};
use serde_json::value::RawValue;

use crate::api::{Deletion, Snapshot, StreamMetadata};
use crate::event::Body;

/// A stream's row in `streams`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct StreamRecord {
    /// The last event's version.
    pub(super) version: Option<u64>,
    pub(super) metadata: StreamMetadata,
    pub(super) deleted: Option<Deletion>,
}

fn put_opt(out: &mut Vec<u8>, value: Option<u64>) {
    match value {
        Some(v) => {
            out.put_u8(1);
            out.put_u64_le(v);
        }
        None => out.put_u8(0),
    }
}

fn get_opt(b: &mut &[u8]) -> Result<Option<u64>, &'static str> {
    if b.remaining() < 1 {
        return Err("truncated stream record");
    }
    match b.get_u8() {
        0 => Ok(None),
        1 if b.remaining() >= 8 => Ok(Some(b.get_u64_le())),
        _ => Err("malformed stream record"),
    }
}

impl StreamRecord {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40);
        out.put_u8(1);
        put_opt(&mut out, self.version);
        out.put_u8(match self.deleted {
            None => 0,
            Some(Deletion::Soft) => 1,
            Some(Deletion::Hard) => 2,
        });
        put_opt(&mut out, self.metadata.truncate_before);
        put_opt(&mut out, self.metadata.max_count);
        put_opt(
            &mut out,
            self.metadata
                .max_age
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        );
        out
    }

    pub(super) fn decode(mut b: &[u8]) -> Result<Self, &'static str> {
        if b.first() != Some(&1) {
            return Err("unknown stream record encoding");
        }
        b.advance(1);
        let version = get_opt(&mut b)?;
        if b.remaining() < 1 {
            return Err("truncated stream record");
        }
        let deleted = match b.get_u8() {
            0 => None,
            1 => Some(Deletion::Soft),
            2 => Some(Deletion::Hard),
            _ => return Err("malformed stream record"),
        };
        let truncate_before = get_opt(&mut b)?;
        let max_count = get_opt(&mut b)?;
        let max_age = get_opt(&mut b)?.map(Duration::from_millis);
        Ok(Self {
            version,
            metadata: StreamMetadata {
                max_age,
                max_count,
                truncate_before,
            },
            deleted,
        })
    }
}

pub(super) fn encode_snapshot(snapshot: &Snapshot) -> Vec<u8> {
    let (kind, body): (u8, &[u8]) = match &snapshot.data {
        Body::Json(raw) => (0, raw.get().as_bytes()),
        Body::Bytes(b) => (1, b),
    };
    let mut out = Vec::with_capacity(9 + body.len());
    out.put_u64_le(snapshot.version);
    out.put_u8(kind);
    out.put_slice(body);
    out
}

pub(super) fn decode_snapshot(mut b: &[u8]) -> Result<Snapshot, &'static str> {
    if b.remaining() < 9 {
        return Err("truncated snapshot");
    }
    let version = b.get_u64_le();
    let data = match b.get_u8() {
        0 => {
            let text = std::str::from_utf8(b).map_err(|_| "snapshot JSON is not UTF-8")?;
            Body::Json(RawValue::from_string(text.to_owned()).map_err(|_| "snapshot is not JSON")?)
        }
        1 => Body::Bytes(Bytes::copy_from_slice(b)),
        _ => return Err("unknown snapshot body"),
    };
    Ok(Snapshot { version, data })
}

#[cfg(test)]
mod test {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn stream_records_round_trip(
            version: Option<u64>, deleted in 0u8..3, truncate_before: Option<u64>, max_count: Option<u64>, max_age_ms: Option<u32>,
        ) {
            let record = StreamRecord {
                version,
                metadata: StreamMetadata { max_age: max_age_ms.map(|ms| Duration::from_millis(ms.into())), max_count, truncate_before },
                deleted: [None, Some(Deletion::Soft), Some(Deletion::Hard)][usize::from(deleted)],
            };
            prop_assert_eq!(StreamRecord::decode(&record.encode()), Ok(record));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = StreamRecord::decode(&bytes);
            let _ = decode_snapshot(&bytes);
        }
    }
}
