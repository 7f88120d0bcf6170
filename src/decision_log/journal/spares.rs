//! Segments made ahead: a thread of their own, at low priority, makes the next segment's
//! file and fills it with zeros, synced, before the active segment is full; rotation renames
//! it into place.
//!
//! Why zeros rather than fallocate alone: fallocate leaves unwritten extents, and the first
//! write into each unwritten block changes the file's extents, so that block's fdatasync
//! writes the inode as well (a second I/O on this ext4; a log write on journaling file
//! systems). A group of 4 KiB or more starts a new block at every sync, and paid it every
//! time: fdatasync p50 ~305 µs against ~200 µs into written blocks here (BENCHMARKS.md).
//! Filling 64 MiB at rotation itself would stall the group that rotates, so it is done
//! ahead, in bounded steps, each synced before the next, so that the disk's queue never holds
//! more than a step of it in front of the journal's own syncs.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::Spare;

/// The file a spare is made in; like every `.tmp` in the directory, removed on open.
const NAME: &str = "zeroed.seg.tmp";
/// Zeros written between syncs.
const STEP: u64 = 4 << 20;

/// The maker thread and the spare it has ready.
pub(super) struct Spares {
    ready: Arc<Mutex<Option<Spare>>>,
    requests: Option<Sender<u64>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Spares {
    /// Starts the maker for the journal in `dir`; it makes nothing until asked.
    pub fn start(dir: PathBuf) -> Spares {
        let ready = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (requests, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("journal-spares".into())
            .spawn({
                let (ready, stop) = (ready.clone(), stop.clone());
                move || run(&dir, &rx, &ready, &stop)
            })
            .ok();
        if thread.is_none() {
            tracing::warn!("could not start the thread that makes journal segments ahead");
        }
        Spares {
            ready,
            requests: thread.is_some().then_some(requests),
            stop,
            thread,
        }
    }

    /// Asks for a spare of `capacity` bytes, unless one is ready (a request made while one
    /// is being made is served once that one is taken).
    pub fn request(&self, capacity: u64) {
        if let Some(tx) = &self.requests {
            let _ = tx.send(capacity);
        }
    }

    /// The ready spare, if there is one of at least `capacity` bytes.
    pub fn take(&self, capacity: u64) -> Option<Spare> {
        self.ready
            .lock()
            .expect("spares poisoned")
            .take_if(|s| s.capacity >= capacity)
    }

    #[cfg(test)]
    pub fn is_ready(&self) -> bool {
        self.ready.lock().expect("spares poisoned").is_some()
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.requests = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(s) = self.ready.lock().expect("spares poisoned").take() {
            let _ = fs::remove_file(&s.path);
        }
    }
}

fn run(dir: &Path, requests: &Receiver<u64>, ready: &Mutex<Option<Spare>>, stop: &AtomicBool) {
    crate::decision_log::set_nice(19);
    while let Ok(capacity) = requests.recv() {
        if ready.lock().expect("spares poisoned").is_some() {
            continue;
        }
        let path = dir.join(NAME);
        match make(&path, capacity, stop) {
            Ok(file) => {
                *ready.lock().expect("spares poisoned") = Some(Spare {
                    path,
                    file,
                    capacity,
                });
            }
            Err(e) => {
                let _ = fs::remove_file(&path);
                if !stop.load(Ordering::Relaxed) {
                    // The next rotation makes its segment itself, where a full disk
                    // fails the group as it always has.
                    tracing::warn!(error = %e, "could not make the next journal segment ahead");
                }
            }
        }
    }
}

/// A file of `capacity` zeros, its blocks allocated and written, and synced.
fn make(path: &Path, capacity: u64, stop: &AtomicBool) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    // Allocated first where the file system can, so that a full disk shows at once rather
    // than after a partial fill.
    super::fallocate(&file, path, capacity).map_err(std::io::Error::other)?;
    super::write_zeros(&file, 0, capacity, |at| {
        if stop.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("stopped"));
        }
        if at % STEP == 0 || at == capacity {
            file.sync_data()?;
        }
        Ok(())
    })
    .map_err(|(_, e)| e)?;
    Ok(file)
}
