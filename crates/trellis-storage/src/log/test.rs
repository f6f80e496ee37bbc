use std::io::Write as _;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

fn small() -> LogOptions {
    LogOptions {
        segment_bytes: 1024,
        index_interval_bytes: 128,
        ..LogOptions::default()
    }
}

fn payloads(range: std::ops::Range<u32>) -> Vec<Bytes> {
    range
        .map(|i| Bytes::from(format!("record-{i:05}-{}", "x".repeat((i % 50) as usize))))
        .collect()
}

async fn all(log: &Log) -> Vec<Record> {
    log.read(log.start(), usize::MAX, usize::MAX)
        .await
        .expect("read")
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn appends_read_back_across_segments_from_any_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small()).expect("open");
    let expected = payloads(0..300);
    for chunk in expected.chunks(7) {
        log.append(chunk.to_vec()).await.expect("append");
    }
    assert!(
        segment_files(dir.path()).len() > 5,
        "rolled into several segments"
    );
    assert_eq!(log.end(), 300);
    for from in [0u64, 1, 57, 150, 299] {
        let records = log.read(from, 20, usize::MAX).await.expect("read");
        assert_eq!(records.first().map(|r| r.offset), Some(from));
        for r in &records {
            assert_eq!(r.payload, expected[r.offset as usize]);
        }
        assert_eq!(records.len(), 20.min(300 - from as usize));
    }
    assert!(
        log.read(300, 10, usize::MAX)
            .await
            .expect("read")
            .is_empty()
    );
    let limited = log.read(0, 1000, 100).await.expect("read");
    assert!(
        limited.len() < 10,
        "max_bytes bounds the read: {}",
        limited.len()
    );
    log.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_get_contiguous_unique_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small()).expect("open");
    let tasks: Vec<_> = (0..50u32)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move {
                (
                    i,
                    log.append(payloads(i * 4..i * 4 + 4))
                        .await
                        .expect("append"),
                )
            })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        let (i, appended) = t.await.expect("join");
        assert!(appended.durable);
        let records = log
            .read(appended.first_offset, 4, usize::MAX)
            .await
            .expect("read");
        assert_eq!(
            records
                .iter()
                .map(|r| r.payload.clone())
                .collect::<Vec<_>>(),
            payloads(i * 4..i * 4 + 4)
        );
        seen.extend(appended.first_offset..appended.first_offset + appended.count);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..200).collect::<Vec<u64>>());
}

#[tokio::test]
async fn reopening_keeps_everything_and_continues_the_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = Log::open(dir.path(), small()).expect("open");
        log.append(payloads(0..100)).await.expect("append");
        log.close().await.expect("close");
    }
    let log = Log::open(dir.path(), small()).expect("reopen");
    assert_eq!(log.end(), 100);
    let appended = log.append(payloads(100..101)).await.expect("append");
    assert_eq!(appended.first_offset, 100);
    let records = all(&log).await;
    assert_eq!(
        records
            .iter()
            .map(|r| r.payload.clone())
            .collect::<Vec<_>>(),
        payloads(0..101)
    );
}

#[tokio::test]
async fn a_torn_tail_is_truncated() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = Log::open(dir.path(), LogOptions::default()).expect("open");
        log.append(payloads(0..10)).await.expect("append");
        log.close().await.expect("close");
    }
    let active = segment_files(dir.path()).pop().expect("segment");
    let full = std::fs::metadata(&active).expect("meta").len();
    // A crash mid-write: half of a frame, then nothing.
    let mut frame = Vec::new();
    frame::encode(10, 1, b"never acknowledged", &mut frame);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&active)
        .expect("open")
        .write_all(&frame[..frame.len() / 2])
        .expect("write");
    let log = Log::open(dir.path(), LogOptions::default()).expect("recovers");
    assert_eq!(log.end(), 10);
    assert_eq!(
        std::fs::metadata(&active).expect("meta").len(),
        full,
        "the torn bytes are gone"
    );
    assert_eq!(
        log.append(payloads(10..11))
            .await
            .expect("append")
            .first_offset,
        10
    );
    assert_eq!(all(&log).await.len(), 11);
}

#[tokio::test]
async fn corruption_in_the_middle_is_reported_not_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = Log::open(dir.path(), LogOptions::default()).expect("open");
        log.append(payloads(0..10)).await.expect("append");
        log.close().await.expect("close");
    }
    let active = segment_files(dir.path()).pop().expect("segment");
    let mut bytes = std::fs::read(&active).expect("read");
    bytes[40] ^= 0xff; // inside the first record's payload
    std::fs::write(&active, &bytes).expect("write");
    match Log::open(dir.path(), LogOptions::default()) {
        Err(LogError::Corrupt(why)) => assert!(why.contains("valid records follow"), "{why}"),
        other => panic!("expected corruption to be reported, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(&active).expect("read"),
        bytes,
        "nothing was truncated"
    );
}

#[tokio::test]
async fn damaged_sealed_segments_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = Log::open(dir.path(), small()).expect("open");
        log.append(payloads(0..100)).await.expect("append");
        log.close().await.expect("close");
    }
    let first = segment_files(dir.path()).remove(0);
    std::fs::remove_file(first.with_extension("idx")).expect("force a scan");
    let mut bytes = std::fs::read(&first).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&first, &bytes).expect("write");
    assert!(matches!(
        Log::open(dir.path(), small()),
        Err(LogError::Corrupt(_))
    ));
}

#[tokio::test]
async fn retention_by_size_and_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = LogOptions {
        retention: Retention {
            max_bytes: Some(3000),
            max_age: None,
        },
        ..small()
    };
    let log = Log::open(dir.path(), options).expect("open");
    for chunk in payloads(0..300).chunks(10) {
        log.append(chunk.to_vec()).await.expect("append");
    }
    let before = log.size();
    assert!(log.enforce_retention(0).expect("retention") > 0);
    assert!(log.size() <= 3000 + 1024, "{} of {before}", log.size());
    let start = log.start();
    assert!(start > 0);
    assert!(
        matches!(log.read(0, 1, usize::MAX).await, Err(LogError::Trimmed { requested: 0, start: s }) if s == start)
    );
    assert_eq!(all(&log).await.first().map(|r| r.offset), Some(start));

    let aged_dir = tempfile::tempdir().expect("tempdir");
    let aged = Log::open(
        aged_dir.path(),
        LogOptions {
            retention: Retention {
                max_age: Some(Duration::from_secs(60)),
                max_bytes: None,
            },
            ..small()
        },
    )
    .expect("open");
    for chunk in payloads(0..100).chunks(10) {
        aged.append(chunk.to_vec()).await.expect("append");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_millis() as u64;
    assert_eq!(
        aged.enforce_retention(now).expect("retention"),
        0,
        "nothing is a minute old"
    );
    let deleted = aged.enforce_retention(now + 61_000).expect("retention");
    assert!(deleted > 0);
    assert_eq!(aged.start(), aged.end() - all(&aged).await.len() as u64);
}

#[tokio::test]
async fn readers_learn_of_new_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), LogOptions::default()).expect("open");
    let mut end = log.watch_end();
    let writer = log.clone();
    tokio::spawn(async move { writer.append(payloads(0..3)).await });
    end.wait_for(|e| *e >= 3).await.expect("notified");
    assert_eq!(log.read(0, 10, usize::MAX).await.expect("read").len(), 3);
}

#[tokio::test]
async fn async_durability_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(
        dir.path(),
        LogOptions {
            durability: Durability::Async {
                flush_interval: Duration::from_millis(10),
            },
            ..LogOptions::default()
        },
    )
    .expect("open");
    let appended = log.append(payloads(0..2)).await.expect("append");
    assert!(!appended.durable);
    assert_eq!(log.read(0, 10, usize::MAX).await.expect("read").len(), 2);
}

#[tokio::test]
async fn oversized_records_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), LogOptions::default()).expect("open");
    let big = Bytes::from(vec![0u8; frame::MAX_PAYLOAD + 1]);
    assert!(matches!(
        log.append(vec![big]).await,
        Err(LogError::TooLarge(_))
    ));
    assert_eq!(log.end(), 0);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Cutting the active segment anywhere (a crash mid-write) loses only the records
    /// whose frames were cut, keeps every earlier one intact, and never panics.
    #[test]
    fn recovery_after_a_cut_keeps_every_complete_record(n in 1u32..40, cut_back in 0usize..400) {
        runtime().block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let options = LogOptions { segment_bytes: 1 << 30, ..LogOptions::default() };
            {
                let log = Log::open(dir.path(), options.clone()).expect("open");
                for p in payloads(0..n) {
                    log.append(vec![p]).await.expect("append");
                }
                log.close().await.expect("close");
            }
            let active = segment_files(dir.path()).pop().expect("segment");
            let len = std::fs::metadata(&active).expect("meta").len();
            let cut = len.saturating_sub(cut_back as u64);
            std::fs::OpenOptions::new().write(true).open(&active).expect("open").set_len(cut).expect("cut");
            let log = Log::open(dir.path(), options).expect("a cut is always recoverable");
            let records = all(&log).await;
            let expected = payloads(0..n);
            // Exactly the frames wholly before the cut survive.
            let mut end = 0u64;
            let mut complete = 0;
            for p in &expected {
                end += frame::frame_len(p.len()) as u64;
                if end <= cut { complete += 1; }
            }
            prop_assert_eq!(records.len(), complete);
            for r in &records {
                prop_assert_eq!(&r.payload, &expected[r.offset as usize]);
            }
            Ok(())
        })?;
    }

    /// Any single damaged byte is either repaired as a torn tail (then everything
    /// read back is an intact prefix) or reported; never a panic, never a wrong record.
    #[test]
    fn damage_is_repaired_or_reported(n in 1u32..30, at in 0usize..4000, value: u8) {
        runtime().block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let options = LogOptions { segment_bytes: 1 << 30, ..LogOptions::default() };
            {
                let log = Log::open(dir.path(), options.clone()).expect("open");
                log.append(payloads(0..n)).await.expect("append");
                log.close().await.expect("close");
            }
            let active = segment_files(dir.path()).pop().expect("segment");
            let mut bytes = std::fs::read(&active).expect("read");
            let at = at % bytes.len();
            if bytes[at] == value {
                return Ok(());
            }
            bytes[at] = value;
            std::fs::write(&active, &bytes).expect("write");
            match Log::open(dir.path(), options) {
                Ok(log) => {
                    let expected = payloads(0..n);
                    let records = all(&log).await;
                    prop_assert!(records.len() < n as usize, "the damaged record can't survive");
                    for r in &records {
                        prop_assert_eq!(&r.payload, &expected[r.offset as usize]);
                    }
                }
                Err(LogError::Corrupt(_)) => {}
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
            Ok(())
        })?;
    }
}
