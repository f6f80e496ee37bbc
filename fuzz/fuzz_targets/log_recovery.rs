//! Opens a log whose only segment holds arbitrary bytes: recovery must never panic,
//! and whatever it keeps must read back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_storage::log::{Log, LogOptions};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("00000000000000000000.log"), data).expect("write");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        if let Ok(log) = Log::open(dir.path(), LogOptions::default()) {
            let records = log.read(0, usize::MAX, usize::MAX).await.expect("recovered records read back");
            assert_eq!(records.len() as u64, log.end());
            let _ = log.close().await;
        }
    });
});
