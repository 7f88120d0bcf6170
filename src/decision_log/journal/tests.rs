use std::fs;
use std::path::{Path, PathBuf};

use super::format::{self, HEADER_LEN};
use super::*;

fn opts(segment_size: u64) -> JournalOptions {
    JournalOptions {
        segment_size,
        ..JournalOptions::default()
    }
}

/// A payload that never holds a zero byte nor 0xFF, so a flipped byte (x ^ 0xFF) never reads 0.
fn payload(tag: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((tag as usize * 31 + i) % 254 + 1) as u8)
        .collect()
}

fn group(first_tag: u64, n: usize, len: usize) -> Vec<Vec<u8>> {
    (0..n as u64).map(|i| payload(first_tag + i, len)).collect()
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(segment_name(id))
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn all(j: &Journal) -> Vec<Record> {
    j.iter_from_seq(0).collect::<Result<Vec<_>>>().unwrap()
}

#[test]
fn round_trip_groups_reopen_and_read_at() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, rec) = Journal::open(dir.path(), opts(1 << 20), None).unwrap();
    assert_eq!(rec.records, vec![]);
    assert_eq!(rec.next_seq, 1);
    let mut written = Vec::new();
    let mut tag = 0;
    for (n, len) in [(1, 10), (5, 300), (32, 280), (3, 1), (100, 50), (1, 70_000)] {
        let g = group(tag, n, len);
        tag += n as u64;
        let pos = j.append(&g).unwrap();
        assert_eq!(pos.len(), n);
        for (p, payload) in pos.into_iter().zip(g) {
            written.push(Record {
                position: p,
                payload,
            });
        }
    }
    let seqs: Vec<u64> = written.iter().map(|r| r.position.seq).collect();
    assert_eq!(seqs, (1..=written.len() as u64).collect::<Vec<_>>());
    assert_eq!(all(&j), written);
    drop(j);

    let (j, rec) = Journal::open(dir.path(), opts(1 << 20), None).unwrap();
    assert_eq!(rec.torn, None);
    assert_eq!(rec.records, written);
    assert_eq!(rec.next_seq, written.len() as u64 + 1);
    for r in &written {
        assert_eq!(&j.read_at(r.position).unwrap(), r);
    }
    let mut wrong = written[3].position;
    wrong.seq += 1;
    assert!(matches!(
        j.read_at(wrong),
        Err(JournalError::BadPosition { .. })
    ));
    assert_eq!(
        j.iter_from(written[40].position)
            .map(|r| r.unwrap())
            .collect::<Vec<_>>(),
        written[40..]
    );
    drop(j);

    // From a checkpoint: only what follows it.
    let cp = written[9].position;
    let (mut j, rec) = Journal::open(dir.path(), opts(1 << 20), Some(cp)).unwrap();
    assert_eq!(rec.records, written[10..]);
    // And appends go on from there.
    let p = j.append(&[b"next".as_slice()]).unwrap();
    assert_eq!(p[0].seq, written.len() as u64 + 1);
    // A checkpoint that is not a record fails.
    drop(j);
    let bogus = Position {
        offset: cp.offset + 1,
        ..cp
    };
    assert!(Journal::open(dir.path(), opts(1 << 20), Some(bogus)).is_err());
}

#[test]
fn empty_payloads_are_refused_and_empty_groups_are_no_ops() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(dir.path(), opts(1 << 16), None).unwrap();
    let none: [&[u8]; 0] = [];
    assert_eq!(j.append(&none).unwrap(), vec![]);
    let err = j.append(&[b"a".as_slice(), b"".as_slice()]).unwrap_err();
    assert!(matches!(err, JournalError::InvalidPayload { index: 1, .. }));
    assert_eq!(j.append(&[b"a".as_slice()]).unwrap()[0].seq, 1);
}

#[test]
fn rotation_retention_and_reading_from_the_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(1024);
    let (mut j, _) = Journal::open(dir.path(), o.clone(), None).unwrap();
    let mut written = Vec::new();
    for i in 0..40 {
        let g = group(i * 3, 3, 100);
        for (p, payload) in j.append(&g).unwrap().into_iter().zip(g) {
            written.push(Record {
                position: p,
                payload,
            });
        }
    }
    // A group bigger than a whole segment gets a segment of its own, sized to fit.
    let big = group(1000, 2, 1500);
    let big_pos = j.append(&big).unwrap();
    assert_eq!(big_pos[0].offset, HEADER_LEN);
    assert!(
        fs::metadata(seg_path(dir.path(), big_pos[0].segment))
            .unwrap()
            .len()
            >= 3000
    );
    for (p, payload) in big_pos.into_iter().zip(big) {
        written.push(Record {
            position: p,
            payload,
        });
    }
    let after = j.append(&group(2000, 1, 10)).unwrap();
    assert_ne!(after[0].segment, written.last().unwrap().position.segment);
    written.push(Record {
        position: after[0],
        payload: payload(2000, 10),
    });
    let segments = segment_files(dir.path());
    assert!(segments.len() > 10, "{segments:?}");
    // Every segment file is preallocated to its capacity.
    for s in &segments[..segments.len() - 2] {
        assert_eq!(fs::metadata(dir.path().join(s)).unwrap().len(), 1024);
    }
    drop(j);

    let (mut j, rec) = Journal::open(dir.path(), o.clone(), None).unwrap();
    assert_eq!(rec.records, written);
    assert_eq!(all(&j), written);
    assert_eq!(j.anchor(), 1);

    // Retention: only whole segments whose records all precede the seq.
    let cut = 50;
    let removed = j.remove_before(cut).unwrap();
    assert!(removed > 0);
    let anchor = j.anchor();
    assert!(anchor <= cut && anchor > 1, "anchor {anchor}");
    let kept = all(&j);
    assert_eq!(kept[0].position.seq, anchor);
    assert_eq!(kept, written[anchor as usize - 1..]);
    assert_eq!(
        j.iter_from_seq(cut).next().unwrap().unwrap().position.seq,
        cut
    );
    // Never the active segment, even when asked for everything.
    j.remove_before(u64::MAX).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    let last = written.last().unwrap().clone();
    assert_eq!(all(&j), vec![last.clone()]);
    drop(j);
    let (mut j, rec) = Journal::open(dir.path(), o.clone(), None).unwrap();
    assert_eq!(rec.records, vec![last.clone()]);
    assert_eq!(j.anchor(), last.position.seq);
    let p = j.append(&group(3000, 1, 10)).unwrap();
    assert_eq!(p[0].seq, last.position.seq + 1);
}

/// Writes earlier groups across a few segments, then a last group of three records; returns
/// the records, and the byte range of the last group in the last segment.
fn journal_with_last_group(dir: &Path) -> (Vec<Record>, u64, u64, u64) {
    let (mut j, _) = Journal::open(dir, opts(4096), None).unwrap();
    let mut written = Vec::new();
    for i in 0..12 {
        let g = group(i * 4, 4, 290);
        for (p, payload) in j.append(&g).unwrap().into_iter().zip(g) {
            written.push(Record {
                position: p,
                payload,
            });
        }
    }
    let g = group(100, 3, 300);
    let pos = j.append(&g).unwrap();
    let start = pos[0].offset;
    let end = pos[2].offset + format::frame_len(300);
    for (p, payload) in pos.iter().zip(g) {
        written.push(Record {
            position: *p,
            payload,
        });
    }
    (written, pos[0].segment, start, end)
}

#[test]
fn torn_tail_at_every_byte_offset_of_the_last_group() {
    let base = tempfile::tempdir().unwrap();
    let src = base.path().join("src");
    let (written, seg, start, end) = journal_with_last_group(&src);
    let last_group = &written[written.len() - 3..];
    let earlier = written.len() - 3;
    let mut n = 0;
    for cut in start..end {
        for zeroed in [false, true] {
            n += 1;
            let dir = base.path().join(format!("c{n}"));
            copy_dir(&src, &dir);
            let path = seg_path(&dir, seg);
            if zeroed {
                let f = OpenOptions::new().write(true).open(&path).unwrap();
                f.write_all_at(&vec![0u8; (end - cut) as usize], cut)
                    .unwrap();
            } else {
                let f = OpenOptions::new().write(true).open(&path).unwrap();
                f.set_len(cut).unwrap();
            }
            let ctx = format!("cut at {cut} (group {start}..{end}), zeroed {zeroed}");
            let (mut j, rec) =
                Journal::open(&dir, opts(4096), None).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            // Records whose frame ends at or before the cut survive; nothing else.
            let survivors = last_group
                .iter()
                .filter(|r| r.position.offset + format::frame_len(300) <= cut)
                .count();
            assert_eq!(rec.records, written[..earlier + survivors], "{ctx}");
            let at_boundary = cut == start || last_group.iter().any(|r| r.position.offset == cut);
            match &rec.torn {
                None => assert!(at_boundary, "{ctx}: no cut reported"),
                Some(t) => {
                    assert!(!at_boundary, "{ctx}: {t:?}");
                    assert_eq!(t.segment, path, "{ctx}");
                    assert!(t.bytes_dropped > 0, "{ctx}");
                    let valid_end = last_group
                        .get(survivors)
                        .map(|r| r.position.offset)
                        .unwrap();
                    assert_eq!(t.offset, valid_end, "{ctx}");
                }
            }
            assert_eq!(fs::metadata(&path).unwrap().len(), 4096, "{ctx}");
            let p = j.append(&group(500, 2, 300)).unwrap();
            assert_eq!(p[0].seq, (earlier + survivors) as u64 + 1, "{ctx}");
            drop(j);
            let (_, again) = Journal::open(&dir, opts(4096), None).unwrap();
            assert_eq!(again.torn, None, "{ctx}");
            assert_eq!(again.records.len(), earlier + survivors + 2, "{ctx}");
            assert_eq!(
                again.records[..earlier + survivors],
                written[..earlier + survivors]
            );
            fs::remove_dir_all(&dir).unwrap();
        }
    }
}

fn flip(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xFF], at).unwrap();
}

fn expect_corrupt(dir: &Path, segment: &Path, offset: u64, ctx: &str) {
    match Journal::open(dir, opts(4096), None) {
        Err(JournalError::Corrupt {
            segment: s,
            offset: o,
            what,
        }) => {
            assert_eq!((s.as_path(), o), (segment, offset), "{ctx}: {what}");
        }
        Err(e) => panic!("{ctx}: expected Corrupt, got {e}"),
        Ok((_, rec)) => panic!("{ctx}: opened, torn {:?}", rec.torn),
    }
}

#[test]
fn a_flipped_byte_in_an_acknowledged_record_is_corruption() {
    let base = tempfile::tempdir().unwrap();
    let src = base.path().join("src");
    let (written, _, _, _) = journal_with_last_group(&src);
    let last_seg = written.last().unwrap().position.segment;
    // An earlier record of the last segment, one in an older segment, and the very last one.
    let in_last = written
        .iter()
        .find(|r| r.position.segment == last_seg)
        .unwrap()
        .position;
    let in_older = written[1].position;
    assert_ne!(in_older.segment, last_seg);
    let newest = written.last().unwrap().position;
    let mut n = 0;
    for (p, len) in [(in_last, 290u64), (in_older, 290), (newest, 300)] {
        // len low byte (lengthens the last frame into the zeroed tail), len high byte, CRC,
        // seq, and payload first, middle and last byte.
        for at in [0, 3, 5, 8, 15, 16, 16 + len / 2, 16 + len - 1] {
            n += 1;
            let dir = base.path().join(format!("f{n}"));
            copy_dir(&src, &dir);
            let path = seg_path(&dir, p.segment);
            flip(&path, p.offset + at);
            expect_corrupt(&dir, &path, p.offset, &format!("seq {} byte {at}", p.seq));
        }
    }
    // A damaged header.
    let dir = base.path().join("header");
    copy_dir(&src, &dir);
    let path = seg_path(&dir, last_seg);
    flip(&path, 20);
    expect_corrupt(&dir, &path, 0, "header");
}

#[test]
fn seq_continuity_and_missing_segments() {
    let base = tempfile::tempdir().unwrap();
    let src = base.path().join("src");
    let (written, _, _, end) = journal_with_last_group(&src);
    let mut ids: Vec<u64> = written.iter().map(|r| r.position.segment).collect();
    ids.dedup();
    assert!(ids.len() >= 4);

    // A missing middle segment.
    let dir = base.path().join("missing");
    copy_dir(&src, &dir);
    fs::remove_file(seg_path(&dir, ids[1])).unwrap();
    expect_corrupt(&dir, &seg_path(&dir, ids[2]), 0, "missing segment");

    // A frame with a valid CRC but a seq that skips one.
    let dir = base.path().join("gap");
    copy_dir(&src, &dir);
    let path = seg_path(&dir, *ids.last().unwrap());
    let mut b = Vec::new();
    format::encode_frame(&mut b, written.len() as u64 + 2, b"skips a seq");
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&b, end)
        .unwrap();
    expect_corrupt(&dir, &path, end, "seq gap");

    // Garbage after the end of data (not a frame at all) is corruption, not a torn tail.
    let dir = base.path().join("garbage");
    copy_dir(&src, &dir);
    let path = seg_path(&dir, *ids.last().unwrap());
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(b"junk", end + 100)
        .unwrap();
    expect_corrupt(&dir, &path, end, "junk after the end");
}

#[test]
fn a_failed_sync_poisons_until_probe_and_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(dir.path(), opts(1 << 16), None).unwrap();
    j.append(&group(0, 3, 100)).unwrap();
    j.fail_next_sync = true;
    // The failed group is larger than the one after it: its frames must not resurface.
    assert!(matches!(
        j.append(&group(10, 8, 200)),
        Err(JournalError::Io {
            op: "fdatasync",
            ..
        })
    ));
    assert!(j.is_poisoned());
    assert!(matches!(
        j.append(&group(20, 1, 10)),
        Err(JournalError::Poisoned { .. })
    ));
    j.probe(4096).unwrap();
    assert!(!j.is_poisoned());
    let p = j.append(&group(30, 2, 50)).unwrap();
    assert_eq!(p[0].seq, 4);
    drop(j);
    let (_, rec) = Journal::open(dir.path(), opts(1 << 16), None).unwrap();
    assert_eq!(rec.torn, None);
    let payloads: Vec<Vec<u8>> = rec.records.into_iter().map(|r| r.payload).collect();
    let mut want = group(0, 3, 100);
    want.extend(group(30, 2, 50));
    assert_eq!(payloads, want);
}

#[test]
fn probe_past_the_segment_makes_the_next_segment_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(dir.path(), opts(4096), None).unwrap();
    j.append(&group(0, 10, 300)).unwrap();
    j.probe(100).unwrap();
    assert!(!dir.path().join("spare.seg.tmp").exists());
    j.probe(2000).unwrap();
    assert!(dir.path().join("spare.seg.tmp").exists());
    let p = j.append(&group(10, 5, 300)).unwrap();
    assert_eq!(p[0].segment, 11);
    assert!(!dir.path().join("spare.seg.tmp").exists());
    assert_eq!(
        segment_files(dir.path()),
        vec![segment_name(1), segment_name(11)]
    );
    drop(j);
    let (_, rec) = Journal::open(dir.path(), opts(4096), None).unwrap();
    assert_eq!(rec.records.len(), 15);
}

#[test]
fn probe_checks_free_space_and_open_removes_leftover_tmp_files() {
    let dir = tempfile::tempdir().unwrap();
    let o = JournalOptions {
        segment_size: 4096,
        min_free_bytes: u64::MAX,
        ..JournalOptions::default()
    };
    let (mut j, _) = Journal::open(dir.path(), o, None).unwrap();
    j.append(&group(0, 2, 100)).unwrap();
    assert!(matches!(j.probe(100), Err(JournalError::LowSpace { .. })));
    // A segment being made when the process died is removed, not read.
    fs::write(
        dir.path().join("00000000000000000003.seg.tmp"),
        b"half made",
    )
    .unwrap();
    drop(j);
    let (_, rec) = Journal::open(dir.path(), opts(4096), None).unwrap();
    assert_eq!(rec.records.len(), 2);
    assert_eq!(segment_files(dir.path()), vec![segment_name(1)]);
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_rotation_on_a_full_disk_fails_cleanly_and_a_retry_succeeds() {
    let base = tempfile::tempdir().unwrap();
    let Some(fs_) = Tmpfs::mount(&base.path().join("mnt"), "1m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let dir = fs_.0.join("journal");
    let o = opts(400 << 10);
    let (mut j, _) = Journal::open(&dir, o.clone(), None).unwrap();
    // Eat most of what is left so the next 400 KiB segment cannot be made.
    let filler = fs_.0.join("filler");
    fs::write(&filler, vec![1u8; 500 << 10]).unwrap();
    let mut written = Vec::new();
    let err = loop {
        let g = group(written.len() as u64, 32, 300);
        match j.append(&g) {
            Ok(_) => written.extend(g),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&err, JournalError::Io { op: "fallocate", source, .. }
            if source.raw_os_error() == Some(libc::ENOSPC)),
        "{err}"
    );
    assert!(!j.is_poisoned());
    assert_eq!(segment_files(&dir), vec![segment_name(1)]);
    // A probe for a group that needs a new segment fails the same way, and so does a retry.
    assert!(j.probe(20_000).is_err());
    assert!(j.append(&group(9999, 32, 300)).is_err());
    // Space comes back: the retry succeeds and everything survives a reopen.
    fs::remove_file(&filler).unwrap();
    j.probe(20_000).unwrap();
    let g = group(written.len() as u64, 32, 300);
    let p = j.append(&g).unwrap();
    assert_eq!(p[0].seq, written.len() as u64 + 1);
    written.extend(g);
    drop(j);
    let (_, rec) = Journal::open(&dir, o, None).unwrap();
    assert_eq!(rec.torn, None);
    let got: Vec<Vec<u8>> = rec.records.into_iter().map(|r| r.payload).collect();
    assert_eq!(got, written);
}

fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Figures for the integrator, not a timed assertion:
/// `cargo test --release --lib journal::tests::measure -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure() {
    use std::time::Instant;
    let dir =
        tempfile::tempdir_in(std::env::var("JOURNAL_BENCH_DIR").unwrap_or(".".into())).unwrap();
    let groups = 2000u64;
    let g = group(0, 32, 300);
    // Encode only: what the journal does on the CPU before the write.
    let mut buf = Vec::new();
    let t = thread_cpu();
    for i in 0..groups {
        buf.clear();
        for (k, p) in g.iter().enumerate() {
            format::encode_frame(&mut buf, i * 32 + k as u64 + 1, p);
        }
    }
    let encode = (thread_cpu() - t) / (groups as u32 * 32);
    // Whole append: encode + pwrite + fdatasync.
    let (mut j, _) = Journal::open(dir.path(), JournalOptions::default(), None).unwrap();
    let mut syncs = Vec::new();
    let (t, w) = (thread_cpu(), Instant::now());
    for _ in 0..groups {
        let s = Instant::now();
        j.append(&g).unwrap();
        syncs.push(s.elapsed());
    }
    let append_cpu = (thread_cpu() - t) / (groups as u32 * 32);
    let append_wall = w.elapsed() / groups as u32;
    // fdatasync alone after a 4 KiB overwrite.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("sync.bin"))
        .unwrap();
    preallocate(&f, dir.path(), 1 << 20).unwrap();
    let mut lat = Vec::new();
    for i in 0..1000u64 {
        f.write_all_at(&[i as u8; 4096], (i % 256) * 4096).unwrap();
        let s = Instant::now();
        f.sync_data().unwrap();
        lat.push(s.elapsed());
    }
    lat.sort();
    syncs.sort();
    eprintln!(
        "per record (groups of 32 x 300 B): encode CPU {encode:?}; append CPU (encode+pwrite+fdatasync) {append_cpu:?}; \
         append wall per group {append_wall:?} (p50 {:?}, p99 {:?}); fdatasync 4 KiB p50 {:?} p99 {:?}",
        syncs[syncs.len() / 2],
        syncs[syncs.len() * 99 / 100],
        lat[500],
        lat[990]
    );
}

/// The extents of `path` as `filefrag` (e2fsprogs; `.ci/deps` installs it) prints them,
/// through FIEMAP, the file synced first.
fn extents(path: &Path) -> String {
    let out = ["filefrag", "/usr/sbin/filefrag", "/sbin/filefrag"]
        .iter()
        .find_map(|f| {
            std::process::Command::new(f)
                .args(["-s", "-v"])
                .arg(path)
                .output()
                .ok()
        })
        .expect("filefrag (e2fsprogs) runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn segments_made_ahead_are_written_through_so_appends_leave_their_extents_alone() {
    // Beside the sources rather than in /tmp, which may be a tmpfs (no extents to see).
    let dir = tempfile::Builder::new()
        .prefix(".journal-extents")
        .tempdir_in(".")
        .unwrap();
    let (mut j, _) = Journal::open(dir.path(), opts(256 << 10), None).unwrap();
    // The segment made at open is fallocated: its blocks are unwritten until appended to,
    // which filefrag can see (so the check below can fail).
    let first = extents(&seg_path(dir.path(), 1));
    assert!(first.contains("unwritten"), "{first}");

    j.make_segments_ahead();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !j.spares.as_ref().unwrap().is_ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "no segment made ahead"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut written = Vec::new();
    while j.segment_starts().len() < 2 {
        let g = group(written.len() as u64, 8, 1_000);
        j.append(&g).unwrap();
        written.extend(g);
    }
    let active = extents(j.active_path());
    assert!(!active.contains("unwritten"), "{active}");

    // Every record reads back across the rotation, and a spare left over is not a segment.
    drop(j);
    let (j, rec) = Journal::open(dir.path(), opts(256 << 10), None).unwrap();
    let payloads: Vec<Vec<u8>> = rec.records.into_iter().map(|r| r.payload).collect();
    assert_eq!(payloads, written);
    assert_eq!(j.segment_starts().len(), 2);
    assert!(
        segment_files(dir.path())
            .iter()
            .all(|f| f.ends_with(".seg"))
    );
}
