//! Segment files: scanning (with recovery), the sparse index, and reading.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::LogError;
use super::frame::{self, Record};

/// One segment as readers see it.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    /// Offset of its first record.
    pub(crate) base: u64,
    pub(crate) file: Arc<File>,
    pub(crate) path: PathBuf,
    /// (offset, file position) every `index_interval` bytes, ascending.
    pub(crate) index: Vec<(u64, u64)>,
    /// Bytes of complete, durable frames.
    pub(crate) size: u64,
    /// Offset after its last record.
    pub(crate) next_offset: u64,
    /// Timestamp of its last record (0 if empty).
    pub(crate) last_timestamp: u64,
}

pub(crate) fn log_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

pub(crate) fn index_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.idx"))
}

/// What scanning a segment found.
#[derive(Debug)]
pub(crate) struct Scan {
    pub(crate) index: Vec<(u64, u64)>,
    pub(crate) next_offset: u64,
    pub(crate) valid_size: u64,
    pub(crate) last_timestamp: u64,
    /// Where the valid frames end, if before the end of the file: (position, why).
    pub(crate) damage: Option<(u64, String)>,
    pub(crate) file_size: u64,
}

/// Reads every frame of a segment, checking checksums and that offsets run on from
/// `base`.
pub(crate) fn scan(file: &File, base: u64, index_interval: u64) -> Result<Scan, LogError> {
    let file_size = file.metadata()?.len();
    let mut reader = ChunkReader::new(file, 0, file_size);
    let mut scan = Scan {
        index: Vec::new(),
        next_offset: base,
        valid_size: 0,
        last_timestamp: 0,
        damage: None,
        file_size,
    };
    let mut since_index = index_interval;
    loop {
        match reader.next_frame()? {
            FrameAt::End => break,
            FrameAt::Frame(record, position, len) => {
                if record.offset != scan.next_offset {
                    scan.damage = Some((
                        position,
                        format!(
                            "record at position {position} has offset {}, expected {}",
                            record.offset, scan.next_offset
                        ),
                    ));
                    break;
                }
                if since_index >= index_interval {
                    scan.index.push((record.offset, position));
                    since_index = 0;
                }
                since_index += len as u64;
                scan.next_offset += 1;
                scan.valid_size = position + len as u64;
                scan.last_timestamp = record.timestamp_ms;
            }
            FrameAt::Invalid(position, why) => {
                scan.damage = Some((position, why));
                break;
            }
            FrameAt::Truncated(position) => {
                scan.damage = Some((position, "incomplete frame at the end of the file".into()));
                break;
            }
        }
    }
    Ok(scan)
}

/// Whether a valid frame with an offset at or after `expected` starts anywhere after
/// `from`: then the damage is in the middle of the log, not a torn tail.
pub(crate) fn valid_frame_after(
    file: &File,
    from: u64,
    expected: u64,
) -> Result<Option<u64>, LogError> {
    let size = file.metadata()?.len();
    let mut buf = vec![
        0u8;
        usize::try_from(size.saturating_sub(from))
            .unwrap_or(usize::MAX)
            .min(256 << 20)
    ];
    file.read_exact_at(&mut buf, from)?;
    for start in 1..buf.len() {
        let candidate = &buf[start..];
        // Cheap filter before the checksum: a plausible offset field.
        let Some(offset_bytes) = candidate.get(8..16) else {
            break;
        };
        let offset = u64::from_le_bytes(
            offset_bytes
                .try_into()
                .map_err(|_| LogError::Corrupt("short".into()))?,
        );
        if offset < expected || offset > expected.saturating_add(1 << 32) {
            continue;
        }
        if let Ok(Some(_)) = frame::decode(candidate) {
            return Ok(Some(from + start as u64));
        }
    }
    Ok(None)
}

/// Index file: `TLIX`, version 1, count, (offset, position)*, next_offset,
/// last_timestamp, size, then CRC-32C of all before it. Written when a segment is
/// sealed; rebuilt by scanning if missing or damaged.
pub(crate) fn write_index(dir: &Path, segment: &Segment) -> Result<(), LogError> {
    let mut buf = Vec::with_capacity(32 + segment.index.len() * 16);
    buf.extend_from_slice(b"TLIX");
    buf.extend_from_slice(&1u32.to_le_bytes());
    buf.extend_from_slice(&(segment.index.len() as u64).to_le_bytes());
    for (offset, position) in &segment.index {
        buf.extend_from_slice(&offset.to_le_bytes());
        buf.extend_from_slice(&position.to_le_bytes());
    }
    buf.extend_from_slice(&segment.next_offset.to_le_bytes());
    buf.extend_from_slice(&segment.last_timestamp.to_le_bytes());
    buf.extend_from_slice(&segment.size.to_le_bytes());
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    let tmp = index_path(dir, segment.base).with_extension("idx.tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(&buf)?;
    file.sync_all()?;
    std::fs::rename(&tmp, index_path(dir, segment.base))?;
    Ok(())
}

/// What an index file records of its sealed segment.
#[derive(Debug)]
pub(crate) struct Indexed {
    pub(crate) index: Vec<(u64, u64)>,
    pub(crate) next_offset: u64,
    pub(crate) last_timestamp: u64,
    pub(crate) size: u64,
}

/// The index file of segment `base`, if present and sound.
pub(crate) fn read_index(dir: &Path, base: u64) -> Option<Indexed> {
    let buf = std::fs::read(index_path(dir, base)).ok()?;
    let (body, crc) = buf.split_at_checked(buf.len().checked_sub(4)?)?;
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?)
        || body.get(..8)? != b"TLIX\x01\x00\x00\x00"
    {
        return None;
    }
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?))
    };
    let count = usize::try_from(word(8)?).ok()?;
    let mut index = Vec::with_capacity(count.min(1 << 20));
    for i in 0..count {
        index.push((word(16 + i * 16)?, word(24 + i * 16)?));
    }
    let tail = 16 + count * 16;
    if body.len() != tail + 24 {
        return None;
    }
    Some(Indexed {
        index,
        next_offset: word(tail)?,
        last_timestamp: word(tail + 8)?,
        size: word(tail + 16)?,
    })
}

/// Reads records of `segment` from `from`, up to `max_records` / about `max_bytes`,
/// not past `committed`.
pub(crate) fn read(
    segment: &Segment,
    from: u64,
    committed: u64,
    max_records: usize,
    max_bytes: usize,
    out: &mut Vec<Record>,
) -> Result<usize, LogError> {
    let start = match segment.index.partition_point(|(offset, _)| *offset <= from) {
        0 => 0,
        i => segment.index[i - 1].1,
    };
    let mut reader = ChunkReader::new(&segment.file, start, segment.size);
    let mut bytes = 0;
    while out.len() < max_records && bytes < max_bytes {
        match reader.next_frame()? {
            FrameAt::End => break,
            FrameAt::Frame(record, _, len) => {
                if record.offset >= committed {
                    break;
                }
                if record.offset >= from {
                    bytes += len;
                    out.push(record);
                }
            }
            FrameAt::Invalid(position, why) => {
                return Err(LogError::Corrupt(format!(
                    "{}: position {position}: {why}",
                    segment.path.display()
                )));
            }
            FrameAt::Truncated(position) => {
                return Err(LogError::Corrupt(format!(
                    "{}: position {position}: frame runs past the durable end",
                    segment.path.display()
                )));
            }
        }
    }
    Ok(bytes)
}

enum FrameAt {
    End,
    /// A record, its position and frame length.
    Frame(Record, u64, usize),
    /// Bytes at this position are not a frame.
    Invalid(u64, String),
    /// A frame starts here but the file ends before it does.
    Truncated(u64),
}

/// Reads frames sequentially with positioned reads, in chunks.
struct ChunkReader<'a> {
    file: &'a File,
    /// File position of `buf[consumed]`.
    position: u64,
    end: u64,
    buf: Vec<u8>,
    consumed: usize,
}

const CHUNK: usize = 256 << 10;

impl<'a> ChunkReader<'a> {
    fn new(file: &'a File, position: u64, end: u64) -> Self {
        Self {
            file,
            position,
            end,
            buf: Vec::new(),
            consumed: 0,
        }
    }

    /// Ensures at least `need` unread bytes are buffered, or as many as the file has.
    fn fill(&mut self, need: usize) -> Result<(), LogError> {
        let available = self.buf.len() - self.consumed;
        if available >= need {
            return Ok(());
        }
        self.buf.drain(..self.consumed);
        self.consumed = 0;
        let buffered_end = self.position + self.buf.len() as u64;
        let want = (need - self.buf.len()).max(CHUNK) as u64;
        let take = want.min(self.end.saturating_sub(buffered_end));
        if take == 0 {
            return Ok(());
        }
        let old = self.buf.len();
        self.buf.resize(old + take as usize, 0);
        self.file
            .read_exact_at(&mut self.buf[old..], buffered_end)?;
        Ok(())
    }

    fn next_frame(&mut self) -> Result<FrameAt, LogError> {
        self.fill(frame::HEADER_LEN)?;
        let here = self.position;
        if self.buf.len() == self.consumed {
            return Ok(FrameAt::End);
        }
        loop {
            match frame::decode(&self.buf[self.consumed..]) {
                Ok(Some((record, len))) => {
                    self.consumed += len;
                    self.position += len as u64;
                    return Ok(FrameAt::Frame(record, here, len));
                }
                Ok(None) => {
                    let available = self.buf.len() - self.consumed;
                    let need = match self.buf.get(self.consumed..self.consumed + 4) {
                        Some(len) => {
                            8 + u32::from_le_bytes(len.try_into().unwrap_or_default()) as usize
                        }
                        None => frame::HEADER_LEN,
                    };
                    self.fill(need)?;
                    if self.buf.len() - self.consumed == available {
                        return Ok(FrameAt::Truncated(here));
                    }
                }
                Err(e) => return Ok(FrameAt::Invalid(here, e.to_string())),
            }
        }
    }
}
