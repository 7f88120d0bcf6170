//! The bytes on disk: segment header, frames, and the scan that tells a torn tail from
//! corruption. Pure functions over byte slices; no I/O.

/// Segment magic: "RSJRNL" then CR LF, so a text-mode copy that mangles line ends shows.
pub(super) const MAGIC: [u8; 8] = *b"RSJRNL\r\n";
pub(super) const VERSION: u32 = 1;
/// The header is padded to 64 bytes; frames start here.
pub(super) const HEADER_LEN: u64 = 64;
/// len (4) + crc (4) + seq (8).
pub(super) const FRAME_HEADER: usize = 16;
/// The smallest unit a disk writes; an unwritten one reads back as zeros in a preallocated file.
pub(super) const SECTOR: usize = 512;

/// The segment header: magic, version, where the segment starts and how big it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub first_seq: u64,
    /// `first_seq` of the segment created before this one (0 for the first ever), so a missing
    /// middle segment shows from the headers alone.
    pub prev_first_seq: u64,
    /// The size the file was preallocated to.
    pub capacity: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        // 12..16 reserved, zero.
        b[16..24].copy_from_slice(&self.first_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.prev_first_seq.to_le_bytes());
        b[32..40].copy_from_slice(&self.capacity.to_le_bytes());
        let crc = crc32fast::hash(&b[0..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_LEN as usize {
            return Err(format!(
                "header is {} bytes, expected {HEADER_LEN}",
                b.len()
            ));
        }
        if b[0..8] != MAGIC {
            return Err("bad magic".into());
        }
        let crc = u32_at(b, 40);
        if crc32fast::hash(&b[0..40]) != crc {
            return Err("header CRC mismatch".into());
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(format!(
                "format version {version}, this build reads {VERSION}"
            ));
        }
        let h = Header {
            first_seq: u64_at(b, 16),
            prev_first_seq: u64_at(b, 24),
            capacity: u64_at(b, 32),
        };
        if h.first_seq == 0 || h.capacity < HEADER_LEN {
            return Err(format!("implausible header {h:?}"));
        }
        Ok(h)
    }
}

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// CRC-32 (IEEE) over the length field, the seq field and the payload, in that order.
pub(super) fn frame_crc(len: u32, seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Appends one frame to `buf`.
pub(super) fn encode_frame(buf: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let len = payload.len() as u32;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&frame_crc(len, seq, payload).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(payload);
}

pub(super) fn frame_len(payload_len: usize) -> u64 {
    (FRAME_HEADER + payload_len) as u64
}

/// Decodes the frame at `off` if it is whole and its CRC holds: (len, seq, payload).
pub(super) fn valid_frame_at(b: &[u8], off: usize) -> Option<(u32, u64, &[u8])> {
    if off + FRAME_HEADER > b.len() {
        return None;
    }
    let len = u32_at(b, off);
    let end = off + FRAME_HEADER + len as usize;
    if len == 0 || end > b.len() {
        return None;
    }
    let seq = u64_at(b, off + 8);
    let payload = &b[off + FRAME_HEADER..end];
    (frame_crc(len, seq, payload) == u32_at(b, off + 4)).then_some((len, seq, payload))
}

/// How a scan of one segment ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ScanEnd {
    /// The data ends at `offset`: a zero length field with only zeros after it, or the end
    /// of the file exactly at a frame boundary.
    Clean { offset: u64 },
    /// The frame at `offset` is bad. `maybe_torn` is false when the failure can never be a
    /// torn write (a valid CRC with the wrong seq; non-zero bytes after an end mark).
    Bad {
        offset: u64,
        what: String,
        maybe_torn: bool,
    },
}

/// Walks the frames of one segment image from `off`, expecting `expected` as the next seq,
/// and calls `each(seq, offset, payload)` for every valid frame. Returns how it ended and the
/// next expected seq.
pub(super) fn scan(
    b: &[u8],
    mut off: usize,
    mut expected: u64,
    mut each: impl FnMut(u64, u64, &[u8]),
) -> (ScanEnd, u64) {
    loop {
        let rest = &b[off.min(b.len())..];
        if rest.is_empty() {
            return (ScanEnd::Clean { offset: off as u64 }, expected);
        }
        let bad = |what: String, maybe_torn: bool| ScanEnd::Bad {
            offset: off as u64,
            what,
            maybe_torn,
        };
        if rest.len() < FRAME_HEADER {
            if all_zero(rest) {
                return (ScanEnd::Clean { offset: off as u64 }, expected);
            }
            return (
                bad(
                    format!(
                        "frame header cut short by the end of the file ({} bytes)",
                        rest.len()
                    ),
                    true,
                ),
                expected,
            );
        }
        let len = u32_at(rest, 0);
        if len == 0 {
            if all_zero(rest) {
                return (ScanEnd::Clean { offset: off as u64 }, expected);
            }
            return (
                bad(
                    "non-zero bytes after a zero length (end of data)".into(),
                    false,
                ),
                expected,
            );
        }
        let end = FRAME_HEADER + len as usize;
        if end > rest.len() {
            return (
                bad(
                    format!("frame of {len} bytes runs past the end of the file"),
                    true,
                ),
                expected,
            );
        }
        let seq = u64_at(rest, 8);
        let payload = &rest[FRAME_HEADER..end];
        if frame_crc(len, seq, payload) != u32_at(rest, 4) {
            return (
                bad(format!("CRC mismatch in a frame of {len} bytes"), true),
                expected,
            );
        }
        if seq != expected {
            return (
                bad(format!("seq {seq} where {expected} was expected"), false),
                expected,
            );
        }
        each(seq, off as u64, payload);
        expected += 1;
        off += end;
    }
}

pub(super) fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// The first offset after `from` where a valid frame with a seq in `expected..` starts, if any.
/// Used to tell a torn tail (nothing valid after the bad frame) from damage in the middle.
pub(super) fn valid_frame_after(b: &[u8], from: usize, expected: u64) -> Option<(usize, u64)> {
    let mut p = from;
    while p + FRAME_HEADER < b.len() {
        // Cheap filters before the CRC: a non-zero length that fits, and a seq that could come
        // next (at most one frame per 17 bytes of what is left).
        let len = u32_at(b, p) as usize;
        if len != 0 && p + FRAME_HEADER + len <= b.len() {
            let seq = u64_at(b, p + 8);
            let most = expected + ((b.len() - from) / (FRAME_HEADER + 1)) as u64;
            if (expected..=most).contains(&seq)
                && let Some((_, seq, _)) = valid_frame_at(b, p)
            {
                return Some((p, seq));
            }
        }
        p += 1;
    }
    None
}

/// The verdict on a bad frame at the end of the last segment.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Cut at the bad frame's offset; `dropped` non-zero bytes from there on.
    Torn {
        dropped: u64,
    },
    Corrupt(String),
}

/// Decides whether the bad frame at `off` of the LAST segment is a torn write. `b` is the
/// whole file, `capacity` the size it was preallocated to.
pub(super) fn classify_tail(
    b: &[u8],
    off: usize,
    what: &str,
    maybe_torn: bool,
    expected: u64,
    capacity: u64,
) -> Verdict {
    if !maybe_torn {
        return Verdict::Corrupt(what.to_string());
    }
    if let Some((p, seq)) = valid_frame_after(b, off + 1, expected) {
        return Verdict::Corrupt(format!(
            "{what}, followed by a valid frame (seq {seq}) at offset {p}"
        ));
    }
    let dropped = b[off..].iter().rposition(|&x| x != 0).map_or(0, |i| i + 1) as u64;
    let len = u32_at_clipped(b, off) as usize;
    let claimed_end = off + FRAME_HEADER + len;
    if claimed_end > b.len() || off + FRAME_HEADER > b.len() {
        // Runs past the end of the file: torn only if the file is shorter than it was made.
        if (b.len() as u64) < capacity {
            return Verdict::Torn { dropped };
        }
        return Verdict::Corrupt(format!(
            "{what}, in a segment at its full size of {capacity} bytes (a damaged length)"
        ));
    }
    if !all_zero(&b[claimed_end..]) {
        return Verdict::Corrupt(format!("{what}, with non-zero bytes after it"));
    }
    let frame = &b[off..claimed_end];
    let zero_sector = (off.next_multiple_of(SECTOR)..claimed_end)
        .step_by(SECTOR)
        .any(|s| s + SECTOR <= claimed_end && all_zero(&b[s..s + SECTOR]));
    let zero_end = frame.last() == Some(&0);
    if !(zero_sector || zero_end) {
        return Verdict::Corrupt(what.to_string());
    }
    if let Some(n) = shorter_valid_length(frame) {
        return Verdict::Corrupt(format!(
            "{what}: the frame is valid with length {n}, so its length field is damaged"
        ));
    }
    Verdict::Torn { dropped }
}

fn u32_at_clipped(b: &[u8], off: usize) -> u32 {
    let mut four = [0u8; 4];
    let n = b.len().saturating_sub(off).min(4);
    four[..n].copy_from_slice(&b[off..off + n]);
    u32::from_le_bytes(four)
}

/// A frame that ends in zeros may be a complete frame whose length field was damaged upward
/// into the zeroed tail. It is, if some shorter length `n` (with only zeros after it) makes
/// the stored CRC hold.
fn shorter_valid_length(frame: &[u8]) -> Option<usize> {
    let crc = u32_at(frame, 4);
    let seq = frame[8..16].to_vec();
    let payload = &frame[FRAME_HEADER..];
    let first_zero = payload.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
    let mut prefix = crc32fast::Hasher::new();
    prefix.update(&payload[..first_zero.max(1).min(payload.len())]);
    let mut n = first_zero.max(1);
    loop {
        if n >= payload.len() {
            return None;
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&(n as u32).to_le_bytes());
        h.update(&seq);
        h.combine(&prefix);
        if h.finalize() == crc {
            return Some(n);
        }
        prefix.update(&payload[n..n + 1]);
        n += 1;
    }
}
