//! Decodes arbitrary bytes as a sequence of log frames: must never panic, and every
//! frame it accepts must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_storage::log::frame::{decode, encode};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((record, used))) = decode(rest) {
        let mut again = Vec::new();
        encode(record.offset, record.timestamp_ms, &record.payload, &mut again);
        assert_eq!(&again[..], &rest[..used], "accepted a frame that doesn't re-encode to itself");
        rest = &rest[used..];
    }
});
