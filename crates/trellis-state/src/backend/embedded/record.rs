//! The on-disk encoding of one value in the embedded backend.
//!
//! ```text
//! [format: u8 = 1][revision: u64 LE][expires_at_ms: u64 LE, 0 = never]
//! [content_type_len: u16 LE][content_type: UTF-8][data]
//! ```

use bytes::Bytes;

const FORMAT: u8 = 1;
const HEADER: usize = 1 + 8 + 8 + 2;

/// A decoded value record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) revision: u64,
    /// Milliseconds since the epoch; `None` = never expires.
    pub(crate) expires_at: Option<u64>,
    pub(crate) content_type: String,
    pub(crate) data: Bytes,
}

impl Record {
    pub(crate) fn is_live(&self, now_millis: u64) -> bool {
        self.expires_at.is_none_or(|at| at > now_millis)
    }

    pub(crate) fn encode(
        revision: u64,
        expires_at: Option<u64>,
        content_type: &str,
        data: &[u8],
    ) -> Vec<u8> {
        // Content types are short; one that isn't is cut to fit (at a char boundary)
        // rather than making the write fail.
        let mut ct_len = content_type.len().min(u16::MAX as usize);
        while !content_type.is_char_boundary(ct_len) {
            ct_len -= 1;
        }
        let mut out = Vec::with_capacity(HEADER + ct_len + data.len());
        out.push(FORMAT);
        out.extend_from_slice(&revision.to_le_bytes());
        out.extend_from_slice(&expires_at.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&(ct_len as u16).to_le_bytes());
        out.extend_from_slice(&content_type.as_bytes()[..ct_len]);
        out.extend_from_slice(data);
        out
    }

    /// Just the revision and expiry, without copying the value.
    pub(crate) fn decode_header(bytes: &[u8]) -> Result<(u64, Option<u64>), String> {
        if bytes.len() < HEADER || bytes[0] != FORMAT {
            return Err(format!(
                "corrupt state record: {} bytes, format {:?}",
                bytes.len(),
                bytes.first()
            ));
        }
        let revision = u64::from_le_bytes(bytes[1..9].try_into().map_err(|_| "short record")?);
        let expires = u64::from_le_bytes(bytes[9..17].try_into().map_err(|_| "short record")?);
        Ok((revision, (expires != 0).then_some(expires)))
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, String> {
        let (revision, expires_at) = Self::decode_header(bytes)?;
        let ct_len = u16::from_le_bytes([bytes[17], bytes[18]]) as usize;
        let ct_end = HEADER + ct_len;
        let content_type = bytes.get(HEADER..ct_end).ok_or_else(|| {
            format!("corrupt state record: content type runs past the end ({ct_len} bytes)")
        })?;
        let content_type = std::str::from_utf8(content_type)
            .map_err(|e| format!("corrupt state record: content type is not UTF-8: {e}"))?
            .to_owned();
        Ok(Self {
            revision,
            expires_at,
            content_type,
            data: Bytes::copy_from_slice(&bytes[ct_end..]),
        })
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(rev: u64, exp in proptest::option::of(1u64..), ct in "\\PC{0,40}", data: Vec<u8>) {
            let encoded = Record::encode(rev, exp, &ct, &data);
            let decoded = Record::decode(&encoded).expect("decodes");
            prop_assert_eq!(decoded, Record { revision: rev, expires_at: exp, content_type: ct, data: Bytes::from(data) });
        }

        #[test]
        fn decoding_garbage_never_panics(bytes: Vec<u8>) {
            let _ = Record::decode(&bytes);
        }
    }

    #[test]
    fn liveness() {
        let r = |exp| Record {
            revision: 1,
            expires_at: exp,
            content_type: String::new(),
            data: Bytes::new(),
        };
        assert!(r(None).is_live(u64::MAX));
        assert!(r(Some(10)).is_live(9));
        assert!(!r(Some(10)).is_live(10));
    }
}
