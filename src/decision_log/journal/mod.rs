//! An append-only journal of opaque payloads with sequence numbers: the decision log's
//! durable acknowledgement ("Decision log v2"). Standalone; nothing serves from it yet.
//!
//! Layout: `DIR/<first_seq:020>.seg` segments, each preallocated to
//! [`JournalOptions::segment_size`] and headed by 64 bytes (see [`format`]); frames
//! `len u32 LE | crc32 u32 LE | seq u64 LE | payload` follow back to back, and a zero length
//! marks the end of data in the preallocated tail. A group of records is one `pwrite` and one
//! `fdatasync`. On open, a torn tail of the last segment is cut; anything else that fails to
//! verify is [`JournalError::Corrupt`].
//!
//! Recovery reads each segment it scans whole into memory (one segment at a time: 64 MiB by
//! default) and scans only from the caller's checkpoint on; older segments have their headers
//! checked. The journal is single-writer (`&mut self`); readers borrow it.

mod format;
mod spares;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use format::{FRAME_HEADER, HEADER_LEN, Header, ScanEnd, Verdict};

/// Where a record is: its seq, the segment (named by its first seq) and the byte offset of
/// its frame in that segment's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub seq: u64,
    pub segment: u64,
    pub offset: u64,
}

/// One record as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub position: Position,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct JournalOptions {
    /// Preallocated size of a segment file, header included. A group larger than this gets a
    /// segment of its own, sized to fit.
    pub segment_size: u64,
    /// [`Journal::probe`] fails while the file system has fewer free bytes than this
    /// (statvfs). 0 disables the check.
    pub min_free_bytes: u64,
    /// The seq of the first record of a journal created now (a migrated log continues its
    /// numbering); ignored when segments exist.
    pub first_seq: u64,
    /// fdatasync every group before `append` returns. Off, a group is written to the page
    /// cache and synced by [`Journal::sync`] (and at every rotation).
    pub sync_each_group: bool,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            segment_size: 64 << 20,
            min_free_bytes: 0,
            first_seq: 1,
            sync_each_group: true,
        }
    }
}

/// The torn tail cut off on open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub segment: PathBuf,
    /// Where the valid data ends (and the next append goes).
    pub offset: u64,
    /// Non-zero bytes from `offset` on that were dropped.
    pub bytes_dropped: u64,
}

/// What [`Journal::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Every record after the checkpoint, in order.
    pub records: Vec<Record>,
    pub torn: Option<TornTail>,
    /// The seq the next appended record gets.
    pub next_seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{op} {} at offset {offset}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("journal corrupt: {} at offset {offset}: {what}", segment.display())]
    Corrupt {
        segment: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("journal poisoned by a failed write to {} at offset {offset}; probe() first", segment.display())]
    Poisoned { segment: PathBuf, offset: u64 },
    #[error("payload {index} of the group: {what}")]
    InvalidPayload { index: usize, what: String },
    #[error("no record at {position:?}: {what}")]
    BadPosition { position: Position, what: String },
    #[error("{} has {free} bytes free, fewer than the {needed} required", dir.display())]
    LowSpace {
        dir: PathBuf,
        free: u64,
        needed: u64,
    },
}

type Result<T> = std::result::Result<T, JournalError>;

fn io_err(op: &'static str, path: &Path, offset: u64) -> impl FnOnce(io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io {
        op,
        path,
        offset,
        source,
    }
}

struct Segment {
    path: PathBuf,
    file: File,
    capacity: u64,
}

/// A region written by a group whose write or sync failed: it must be zeroed (and that synced)
/// before anything else is appended, or its frames could resurface on the next open.
#[derive(Debug, Clone, Copy)]
struct Dirty {
    segment: u64,
    offset: u64,
    len: u64,
}

/// A preallocated file made ahead of need, renamed into the next segment at rotation.
struct Spare {
    path: PathBuf,
    file: File,
    capacity: u64,
}

pub struct Journal {
    dir: PathBuf,
    options: JournalOptions,
    /// By first seq; the last one is the active segment.
    segments: BTreeMap<u64, Segment>,
    /// End of valid data in the active segment.
    tail: u64,
    next_seq: u64,
    /// The newest record, if any.
    last: Option<Position>,
    poisoned: Option<Dirty>,
    /// A segment file the probe made (where a full disk shows).
    spare: Option<Spare>,
    /// Segment files made ahead, zero-filled; the writer's journal has them (see `spares`).
    spares: Option<spares::Spares>,
    buf: Vec<u8>,
    #[cfg(test)]
    fail_next_sync: bool,
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir, 0))
}

/// Makes `file` `len` bytes long with its blocks allocated: fallocate, or where the file
/// system has none, zeros written (so a full disk shows here, not at a later append).
fn preallocate(file: &File, path: &Path, len: u64) -> Result<()> {
    if fallocate(file, path, len)? {
        return Ok(());
    }
    let have = file.metadata().map_err(io_err("stat", path, 0))?.len();
    write_zeros(file, have, len, |_| Ok(()))
        .map_err(|(at, e)| io_err("preallocate (write zeros)", path, at)(e))
}

/// fallocate of `len` bytes from the start; false where the file system has none.
fn fallocate(file: &File, path: &Path, len: u64) -> Result<bool> {
    // SAFETY: fallocate on an open descriptor we own; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
        _ => Err(io_err("fallocate", path, 0)(err)),
    }
}

/// Writes zeros over `[from, to)` of `file`, a MiB at a time, calling `after` with the
/// offset reached after each write (to sync, or to stop early with an error). A failure
/// gives the offset it happened at.
fn write_zeros(
    file: &File,
    from: u64,
    to: u64,
    mut after: impl FnMut(u64) -> io::Result<()>,
) -> std::result::Result<(), (u64, io::Error)> {
    let zeros = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at).map_err(|e| (at, e))?;
        at += n as u64;
        after(at).map_err(|e| (at, e))?;
    }
    Ok(())
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and recovers it. `checkpoint` is the newest
    /// record the caller already has (None: from the oldest segment); every record after it
    /// is returned. A torn tail is cut and reported; any other damage fails the open.
    pub fn open(
        dir: impl AsRef<Path>,
        options: JournalOptions,
        checkpoint: Option<Position>,
    ) -> Result<(Journal, Recovered)> {
        let mut records = Vec::new();
        let (journal, torn) = Self::open_with(dir, options, checkpoint, |r| records.push(r))?;
        let next_seq = journal.next_seq;
        Ok((
            journal,
            Recovered {
                records,
                torn,
                next_seq,
            },
        ))
    }

    /// [`Journal::open`], streaming the records after `checkpoint` to `each` instead of
    /// collecting them.
    pub fn open_with(
        dir: impl AsRef<Path>,
        options: JournalOptions,
        checkpoint: Option<Position>,
        mut each: impl FnMut(Record),
    ) -> Result<(Journal, Option<TornTail>)> {
        let dir = dir.as_ref().to_path_buf();
        assert!(
            options.segment_size > HEADER_LEN + FRAME_HEADER as u64,
            "segment_size too small"
        );
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir, 0))?;
        let mut ids = Vec::new();
        let mut removed_tmp = false;
        for entry in fs::read_dir(&dir).map_err(io_err("read directory", &dir, 0))? {
            let entry = entry.map_err(io_err("read directory", &dir, 0))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                fs::remove_file(entry.path()).map_err(io_err("remove", &entry.path(), 0))?;
                removed_tmp = true;
            } else if let Some(stem) = name.strip_suffix(".seg")
                && stem.len() == 20
                && let Ok(id) = stem.parse::<u64>()
            {
                ids.push(id);
            }
        }
        if removed_tmp {
            sync_dir(&dir)?;
        }
        ids.sort_unstable();
        let mut journal = Journal {
            dir,
            options,
            segments: BTreeMap::new(),
            tail: HEADER_LEN,
            next_seq: 1,
            last: None,
            poisoned: None,
            spare: None,
            spares: None,
            buf: Vec::new(),
            #[cfg(test)]
            fail_next_sync: false,
        };
        if ids.is_empty() {
            if let Some(position) = checkpoint {
                return Err(JournalError::BadPosition {
                    position,
                    what: "the journal is empty".into(),
                });
            }
            let (first, capacity) = (
                journal.options.first_seq.max(1),
                journal.options.segment_size,
            );
            journal.add_segment(first, 0, capacity)?;
            journal.next_seq = first;
            return Ok((journal, None));
        }
        // Headers: valid, named right, and linked to the segment before.
        let mut headers = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            let path = journal.dir.join(segment_name(id));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err("open", &path, 0))?;
            let mut b = [0u8; HEADER_LEN as usize];
            let corrupt = |what: String| JournalError::Corrupt {
                segment: path.clone(),
                offset: 0,
                what,
            };
            file.read_exact_at(&mut b, 0)
                .map_err(|e| corrupt(format!("header unreadable: {e}")))?;
            let h = Header::decode(&b).map_err(corrupt)?;
            if h.first_seq != id {
                return Err(corrupt(format!("header says first seq {}", h.first_seq)));
            }
            if i > 0 && h.prev_first_seq != ids[i - 1] {
                return Err(corrupt(format!(
                    "the segment before this one was {}, which is missing",
                    segment_name(h.prev_first_seq)
                )));
            }
            headers.push(h);
            journal.segments.insert(
                id,
                Segment {
                    path,
                    file,
                    capacity: h.capacity,
                },
            );
        }
        let (start, mut offset, mut expected) = match checkpoint {
            None => (0, HEADER_LEN, ids[0]),
            Some(cp) => match ids.iter().position(|&id| id == cp.segment) {
                Some(i) => (i, cp.offset, cp.seq),
                None => {
                    return Err(JournalError::BadPosition {
                        position: cp,
                        what: "no such segment (removed by retention?)".into(),
                    });
                }
            },
        };
        let mut torn = None;
        let mut checkpoint_seen = checkpoint.is_none();
        for i in start..ids.len() {
            let id = ids[i];
            let seg = &journal.segments[&id];
            let path = seg.path.clone();
            let corrupt = |offset: u64, what: String| JournalError::Corrupt {
                segment: path.clone(),
                offset,
                what,
            };
            if i > start {
                if id != expected {
                    return Err(corrupt(
                        0,
                        format!("segment starts at seq {id}, but seq {expected} comes next"),
                    ));
                }
                offset = HEADER_LEN;
            }
            let mut b = Vec::new();
            {
                use std::io::Read;
                (&seg.file)
                    .read_to_end(&mut b)
                    .map_err(io_err("read", &path, 0))?;
            }
            let capacity = headers[i].capacity;
            if offset < HEADER_LEN || offset > b.len() as u64 {
                return Err(corrupt(offset, "checkpoint offset outside the file".into()));
            }
            let last = &mut journal.last;
            let (end, next) = format::scan(&b, offset as usize, expected, |seq, off, payload| {
                let position = Position {
                    seq,
                    segment: id,
                    offset: off,
                };
                *last = Some(position);
                if checkpoint_seen {
                    each(Record {
                        position,
                        payload: payload.to_vec(),
                    });
                } else {
                    // The first frame scanned is the checkpoint itself.
                    checkpoint_seen = true;
                }
            });
            expected = next;
            let valid_end = match end {
                ScanEnd::Clean { offset } => offset,
                ScanEnd::Bad {
                    offset,
                    what,
                    maybe_torn,
                } => {
                    if i + 1 != ids.len() {
                        return Err(corrupt(offset, format!("{what} (not the last segment)")));
                    }
                    match format::classify_tail(
                        &b,
                        offset as usize,
                        &what,
                        maybe_torn,
                        expected,
                        capacity,
                    ) {
                        Verdict::Corrupt(what) => return Err(corrupt(offset, what)),
                        Verdict::Torn { dropped } => {
                            if dropped > 0 {
                                torn = Some(TornTail {
                                    segment: path.clone(),
                                    offset,
                                    bytes_dropped: dropped,
                                });
                            }
                            offset
                        }
                    }
                }
            };
            if !checkpoint_seen {
                let cp = checkpoint.expect("checkpoint");
                return Err(corrupt(
                    cp.offset,
                    format!("the checkpoint record (seq {}) is not there", cp.seq),
                ));
            }
            if i + 1 == ids.len() {
                // Cut whatever follows the valid end, and give the file back its full size.
                let file = &journal.segments[&id].file;
                if (b.len() as u64) != capacity || !format::all_zero(&b[valid_end as usize..]) {
                    file.set_len(valid_end)
                        .map_err(io_err("truncate", &path, valid_end))?;
                    preallocate(file, &path, capacity)?;
                    file.sync_data()
                        .map_err(io_err("fdatasync", &path, valid_end))?;
                }
                journal.tail = valid_end;
            }
        }
        journal.next_seq = expected;
        Ok((journal, torn))
    }

    /// From now on, makes each next segment ahead, zero-filled, on a thread of its own (see
    /// `spares`): for the journal a writer appends to, not for one opened to read.
    pub fn make_segments_ahead(&mut self) {
        let spares = spares::Spares::start(self.dir.clone());
        spares.request(self.options.segment_size);
        self.spares = Some(spares);
    }

    /// Creates segment `first_seq` (from a spare if one big enough is ready: the probe's,
    /// else the one made ahead) and makes it active. On failure nothing is left behind and
    /// the active segment is unchanged.
    fn add_segment(&mut self, first_seq: u64, prev_first_seq: u64, capacity: u64) -> Result<()> {
        let path = self.dir.join(segment_name(first_seq));
        let probed = self.spare.take_if(|s| s.capacity >= capacity);
        let ready = probed.or_else(|| self.spares.as_ref()?.take(capacity));
        let (tmp, file, capacity) = match ready {
            Some(s) => (s.path, s.file, s.capacity),
            None => {
                let tmp = self.dir.join(format!("{}.tmp", segment_name(first_seq)));
                let file = self.make_file(&tmp, capacity)?;
                (tmp, file, capacity)
            }
        };
        let header = Header {
            first_seq,
            prev_first_seq,
            capacity,
        };
        let result = (|| {
            file.write_all_at(&header.encode(), 0)
                .map_err(io_err("write header", &tmp, 0))?;
            file.sync_data().map_err(io_err("fdatasync", &tmp, 0))?;
            fs::rename(&tmp, &path).map_err(io_err("rename", &tmp, 0))?;
            sync_dir(&self.dir)
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        self.segments.insert(
            first_seq,
            Segment {
                path,
                file,
                capacity,
            },
        );
        self.tail = HEADER_LEN;
        if let Some(spares) = &self.spares {
            spares.request(self.options.segment_size);
        }
        Ok(())
    }

    fn make_file(&self, tmp: &Path, capacity: u64) -> Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)
            .map_err(io_err("create", tmp, 0))?;
        if let Err(e) = preallocate(&file, tmp, capacity) {
            drop(file);
            let _ = fs::remove_file(tmp);
            return Err(e);
        }
        Ok(file)
    }

    fn active(&self) -> (u64, &Segment) {
        let (&id, seg) = self.segments.iter().next_back().expect("an active segment");
        (id, seg)
    }

    /// Appends a group: every frame in ONE write and ONE fdatasync, then the positions.
    /// Fails without writing anything on an empty payload. A failed write or sync poisons the
    /// journal until [`Journal::probe`] succeeds; a failed rotation (e.g. no space for the new
    /// segment) does not: the group fails, and a later append may succeed.
    pub fn append<P: AsRef<[u8]>>(&mut self, payloads: &[P]) -> Result<Vec<Position>> {
        if let Some(d) = self.poisoned {
            return Err(JournalError::Poisoned {
                segment: self.segments[&d.segment].path.clone(),
                offset: d.offset,
            });
        }
        if payloads.is_empty() {
            return Ok(Vec::new());
        }
        let mut total = 0u64;
        for (index, p) in payloads.iter().enumerate() {
            let len = p.as_ref().len();
            if len == 0 || len > u32::MAX as usize {
                return Err(JournalError::InvalidPayload {
                    index,
                    what: format!("length {len} (must be 1..=u32::MAX)"),
                });
            }
            total += format::frame_len(len);
        }
        let (id, seg) = self.active();
        if self.tail + total > seg.capacity {
            if !self.options.sync_each_group {
                // What the old segment holds must be durable before the next one starts.
                self.sync(id)?;
            }
            let capacity = self.options.segment_size.max(HEADER_LEN + total);
            self.add_segment(self.next_seq, id, capacity)?;
        }
        let id = self.active().0;
        self.buf.clear();
        let mut positions = Vec::with_capacity(payloads.len());
        for (i, p) in payloads.iter().enumerate() {
            let seq = self.next_seq + i as u64;
            positions.push(Position {
                seq,
                segment: id,
                offset: self.tail + self.buf.len() as u64,
            });
            format::encode_frame(&mut self.buf, seq, p.as_ref());
        }
        let seg = &self.segments[&id];
        let written = seg
            .file
            .write_all_at(&self.buf, self.tail)
            .map_err(io_err("write", &seg.path, self.tail))
            .and_then(|()| {
                if self.options.sync_each_group {
                    self.sync(id)
                } else {
                    Ok(())
                }
            });
        if let Err(e) = written {
            self.poisoned = Some(Dirty {
                segment: id,
                offset: self.tail,
                len: total,
            });
            return Err(e);
        }
        self.tail += total;
        self.next_seq += payloads.len() as u64;
        self.last = positions.last().copied();
        Ok(positions)
    }

    fn sync(&mut self, id: u64) -> Result<()> {
        let seg = &self.segments[&id];
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_sync) {
            return Err(io_err("fdatasync", &seg.path, self.tail)(io::Error::other(
                "injected",
            )));
        }
        seg.file
            .sync_data()
            .map_err(io_err("fdatasync", &seg.path, self.tail))
    }

    /// Proves the journal can take a group of `bytes` (frames included) again, and clears the
    /// poison of a failed write:
    /// 1. the region a failed group wrote is zeroed and synced (its frames must never
    ///    resurface);
    /// 2. the newest record is re-read and checked (seq, CRC), and the bytes at the tail are
    ///    zero: the file is what the journal believes;
    /// 3. if the group fits the active segment, `bytes` zeros are written where it would go
    ///    and fdatasynced (a real write and sync at that place; zeros, so a crash midway
    ///    leaves nothing to recover); if not, the next segment is made now (preallocated,
    ///    kept as the spare), which is where a full disk fails;
    /// 4. with `min_free_bytes` set, statvfs must show that much free.
    pub fn probe(&mut self, bytes: usize) -> Result<()> {
        if let Some(d) = self.poisoned {
            let seg = &self.segments[&d.segment];
            seg.file
                .write_all_at(&vec![0u8; d.len as usize], d.offset)
                .map_err(io_err("zero failed group", &seg.path, d.offset))?;
            seg.file
                .sync_data()
                .map_err(io_err("fdatasync", &seg.path, d.offset))?;
            self.poisoned = None;
        }
        if let Some(last) = self.last {
            self.read_at(last)?;
        }
        let (id, seg) = self.active();
        let mut head = [0u8; FRAME_HEADER];
        let n = (seg.capacity - self.tail).min(FRAME_HEADER as u64) as usize;
        seg.file
            .read_exact_at(&mut head[..n], self.tail)
            .map_err(io_err("read", &seg.path, self.tail))?;
        if !format::all_zero(&head) {
            return Err(JournalError::Corrupt {
                segment: seg.path.clone(),
                offset: self.tail,
                what: "data past the tail the journal holds".into(),
            });
        }
        let bytes = bytes as u64;
        if self.tail + bytes <= seg.capacity {
            seg.file
                .write_all_at(&vec![0u8; bytes as usize], self.tail)
                .map_err(io_err("probe write", &seg.path, self.tail))?;
            seg.file
                .sync_data()
                .map_err(io_err("probe fdatasync", &seg.path, self.tail))?;
        } else {
            let capacity = self.options.segment_size.max(HEADER_LEN + bytes);
            if self.spare.as_ref().is_none_or(|s| s.capacity < capacity) {
                self.spare = None;
                let path = self.dir.join("spare.seg.tmp");
                let file = self.make_file(&path, capacity)?;
                file.sync_data().map_err(io_err("fdatasync", &path, 0))?;
                self.spare = Some(Spare {
                    path,
                    file,
                    capacity,
                });
            }
        }
        let _ = id;
        if self.options.min_free_bytes > 0 {
            let free = free_bytes(&self.dir)?;
            if free < self.options.min_free_bytes {
                return Err(JournalError::LowSpace {
                    dir: self.dir.clone(),
                    free,
                    needed: self.options.min_free_bytes,
                });
            }
        }
        Ok(())
    }

    /// fdatasyncs the active segment: what `append` wrote without `sync_each_group` is
    /// durable once this returns. A failure poisons nothing already synced, but the caller
    /// must not count the unsynced groups as durable.
    pub fn sync_active(&mut self) -> Result<()> {
        let id = self.active().0;
        self.sync(id)
    }

    /// The active segment's file: the writer checks it is still the file it writes.
    pub fn active_path(&self) -> &Path {
        &self.active().1.path
    }

    /// True after a failed write or sync, until [`Journal::probe`] succeeds.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// The seq the next appended record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The first seq of every segment, oldest first; the last is the active one.
    pub fn segment_starts(&self) -> Vec<u64> {
        self.segments.keys().copied().collect()
    }

    /// The first seq still kept (the oldest segment's first seq).
    pub fn anchor(&self) -> u64 {
        *self.segments.keys().next().expect("a segment")
    }

    /// The newest record's position, if any.
    pub fn last(&self) -> Option<Position> {
        self.last
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads and verifies the record at `position`.
    pub fn read_at(&self, position: Position) -> Result<Record> {
        let bad = |what: &str| JournalError::BadPosition {
            position,
            what: what.into(),
        };
        let seg = self
            .segments
            .get(&position.segment)
            .ok_or_else(|| bad("no such segment"))?;
        if position.seq >= self.next_seq || position.offset < HEADER_LEN {
            return Err(bad("not a record of this journal"));
        }
        match read_frame(seg, position.offset)? {
            Some((seq, payload)) if seq == position.seq => Ok(Record { position, payload }),
            Some((seq, _)) => Err(bad(&format!("the frame there has seq {seq}"))),
            None => Err(bad("no frame there")),
        }
    }

    /// Iterates from the record at `position` (inclusive) to the newest.
    pub fn iter_from(&self, position: Position) -> Records<'_> {
        Records {
            journal: self,
            segment: position.segment,
            offset: position.offset,
            expected: position.seq,
            skip_below: position.seq,
            done: false,
        }
    }

    /// Iterates from the record with `seq` (or the anchor, if `seq` is older) to the newest.
    pub fn iter_from_seq(&self, seq: u64) -> Records<'_> {
        let (&segment, _) = self
            .segments
            .range(..=seq.max(self.anchor()))
            .next_back()
            .expect("a segment");
        Records {
            journal: self,
            segment,
            offset: HEADER_LEN,
            expected: segment,
            skip_below: seq,
            done: false,
        }
    }

    /// Removes whole segments whose records all precede `seq`, never the active one. Returns
    /// how many were removed.
    pub fn remove_before(&mut self, seq: u64) -> Result<usize> {
        let ids: Vec<u64> = self.segments.keys().copied().collect();
        let mut removed = 0;
        for w in ids.windows(2) {
            if w[1] > seq {
                break;
            }
            let seg = self.segments.remove(&w[0]).expect("segment");
            fs::remove_file(&seg.path).map_err(io_err("remove", &seg.path, 0))?;
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }
}

/// Reads the journal in `dir` without changing anything (a stopped server's files, or a live
/// one's up to a seq it has made durable): every record from the oldest segment on, in order,
/// each frame verified (CRC, seq), until `each` returns false. A torn tail is reported, not
/// cut; anything else that fails to verify is [`JournalError::Corrupt`], naming the segment
/// and offset. Returns the torn tail, if any.
pub fn read_only(dir: &Path, mut each: impl FnMut(Record) -> bool) -> Result<Option<TornTail>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("read directory", dir, 0))? {
        let name = entry
            .map_err(io_err("read directory", dir, 0))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if let Some(stem) = name.strip_suffix(".seg")
            && stem.len() == 20
            && let Ok(id) = stem.parse::<u64>()
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    let mut expected = ids.first().copied().unwrap_or(1);
    let mut stopped = false;
    for (i, &id) in ids.iter().enumerate() {
        let path = dir.join(segment_name(id));
        let corrupt = |offset: u64, what: String| JournalError::Corrupt {
            segment: path.clone(),
            offset,
            what,
        };
        let b = fs::read(&path).map_err(io_err("read", &path, 0))?;
        let h = Header::decode(&b).map_err(|w| corrupt(0, w))?;
        if h.first_seq != id || id != expected {
            return Err(corrupt(
                0,
                format!(
                    "segment starts at seq {}, but seq {expected} comes next",
                    h.first_seq
                ),
            ));
        }
        let (end, next) = format::scan(&b, HEADER_LEN as usize, expected, |seq, off, payload| {
            if !stopped {
                let position = Position {
                    seq,
                    segment: id,
                    offset: off,
                };
                stopped = !each(Record {
                    position,
                    payload: payload.to_vec(),
                });
            }
        });
        if stopped {
            return Ok(None);
        }
        expected = next;
        if let ScanEnd::Bad {
            offset,
            what,
            maybe_torn,
        } = end
        {
            if i + 1 != ids.len() {
                return Err(corrupt(offset, format!("{what} (not the last segment)")));
            }
            return match format::classify_tail(
                &b,
                offset as usize,
                &what,
                maybe_torn,
                expected,
                h.capacity,
            ) {
                Verdict::Corrupt(what) => Err(corrupt(offset, what)),
                Verdict::Torn { dropped } => Ok((dropped > 0).then(|| TornTail {
                    segment: path.clone(),
                    offset,
                    bytes_dropped: dropped,
                })),
            };
        }
    }
    Ok(None)
}

fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io_err("statvfs", dir, 0)(io::Error::other(e)))?;
    // SAFETY: a valid NUL-terminated path and a zeroed out-struct that statvfs fills.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io_err("statvfs", dir, 0)(io::Error::last_os_error()));
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Reads the frame at `offset`: None at the end of data (zero length, or no room for a frame).
fn read_frame(seg: &Segment, offset: u64) -> Result<Option<(u64, Vec<u8>)>> {
    if offset + FRAME_HEADER as u64 > seg.capacity {
        return Ok(None);
    }
    let mut head = [0u8; FRAME_HEADER];
    seg.file
        .read_exact_at(&mut head, offset)
        .map_err(io_err("read", &seg.path, offset))?;
    let len = format::u32_at(&head, 0);
    if len == 0 {
        return Ok(None);
    }
    let corrupt = |what: String| JournalError::Corrupt {
        segment: seg.path.clone(),
        offset,
        what,
    };
    if offset + format::frame_len(len as usize) > seg.capacity {
        return Err(corrupt(format!(
            "frame of {len} bytes runs past the segment"
        )));
    }
    let seq = format::u64_at(&head, 8);
    let mut payload = vec![0u8; len as usize];
    seg.file
        .read_exact_at(&mut payload, offset + FRAME_HEADER as u64)
        .map_err(io_err("read", &seg.path, offset))?;
    if format::frame_crc(len, seq, &payload) != format::u32_at(&head, 4) {
        return Err(corrupt("CRC mismatch".into()));
    }
    Ok(Some((seq, payload)))
}

/// Records in seq order, verified as they are read; ends at the journal's tail.
pub struct Records<'a> {
    journal: &'a Journal,
    segment: u64,
    offset: u64,
    expected: u64,
    skip_below: u64,
    done: bool,
}

impl Iterator for Records<'_> {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let j = self.journal;
            let Some(seg) = j.segments.get(&self.segment) else {
                self.done = true;
                return Some(Err(JournalError::BadPosition {
                    position: Position {
                        seq: self.expected,
                        segment: self.segment,
                        offset: self.offset,
                    },
                    what: "no such segment".into(),
                }));
            };
            let active = j.active().0 == self.segment;
            let frame = if active && self.offset >= j.tail {
                Ok(None)
            } else {
                read_frame(seg, self.offset)
            };
            match frame {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(None) => {
                    if active {
                        self.done = true;
                        return None;
                    }
                    let next = j.segments.range(self.segment + 1..).next().map(|(&k, _)| k);
                    match next {
                        Some(k) if k == self.expected => {
                            self.segment = k;
                            self.offset = HEADER_LEN;
                        }
                        other => {
                            self.done = true;
                            return Some(Err(JournalError::Corrupt {
                                segment: seg.path.clone(),
                                offset: self.offset,
                                what: format!(
                                    "data ends before seq {}; next segment starts at {other:?}",
                                    self.expected
                                ),
                            }));
                        }
                    }
                }
                Ok(Some((seq, payload))) => {
                    if seq != self.expected {
                        self.done = true;
                        return Some(Err(JournalError::Corrupt {
                            segment: seg.path.clone(),
                            offset: self.offset,
                            what: format!("seq {seq} where {} was expected", self.expected),
                        }));
                    }
                    let position = Position {
                        seq,
                        segment: self.segment,
                        offset: self.offset,
                    };
                    self.offset += format::frame_len(payload.len());
                    self.expected += 1;
                    if seq >= self.skip_below {
                        return Some(Ok(Record { position, payload }));
                    }
                }
            }
        }
        None
    }
}
