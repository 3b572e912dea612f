//! The admission journal of a SQLite store: an admitted request's usage record is first one
//! line appended to a local file, and reaches the database once, complete, when the request
//! ends, in a group with others. A crash leaves lines whose records never reached the
//! database; the next start ([`ingest`]) writes those as `interrupted`.
//!
//! The journal is as durable as the SQLite database beside it: both are local files written
//! without `fsync` (the database runs WAL with `synchronous=NORMAL`), so both survive the
//! process being killed and neither promises more across a power cut. PostgreSQL is shared
//! by replicas whose disks may not come back, so there the record is written to the database
//! at admission instead (see `UsageWriter`).
//!
//! The journal is a directory of segments. A process holds each of its segments locked (an
//! advisory `flock`) until it deletes it, so a process starting beside a running one never
//! ingests a live segment. A segment is deleted once it is full and every record it
//! admitted is in the database.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::usage::UsageStart;
use crate::{Result, StoreError, now_ms};

/// A segment is closed, and a new one begun, past this size.
const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;

/// The open journal of one process.
pub(crate) struct Journal {
    dir: PathBuf,
    segment_bytes: u64,
    /// Names this process's segments apart from an earlier run's.
    stem: String,
    state: Mutex<State>,
}

struct State {
    /// The segment being written.
    seq: u64,
    bytes: u64,
    /// Records admitted and not yet in the database, by request id, with their segment.
    open: foldhash::HashMap<Arc<str>, (Box<UsageStart>, u64)>,
    /// The current segment and the full ones not yet deleted.
    segments: HashMap<u64, Segment>,
}

struct Segment {
    /// Kept open, and so locked, until the segment is deleted; shared with the admissions
    /// writing to it outside the journal's lock.
    file: Arc<File>,
    path: PathBuf,
    /// How many of its records are not yet in the database.
    open: usize,
}

impl Journal {
    /// Starts a new segment in `dir` (created if missing).
    pub(crate) fn open(dir: &Path) -> Result<Journal> {
        Journal::with_segments_of(dir, SEGMENT_BYTES)
    }

    fn with_segments_of(dir: &Path, segment_bytes: u64) -> Result<Journal> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        let stem = format!("{}-{}", now_ms(), std::process::id());
        let segment = new_segment(dir, &stem, 0)?;
        let state =
            State { seq: 0, bytes: 0, open: Default::default(), segments: HashMap::from([(0, segment)]) };
        Ok(Journal { dir: dir.to_path_buf(), segment_bytes, stem, state: Mutex::new(state) })
    }

    /// Appends an admission; once this returns, a crash cannot lose the record.
    ///
    /// The line is written outside the lock, so that admissions on other threads don't wait
    /// on this one's system call (they did, a futex sleep and wake-up each). Its segment is
    /// reserved first: counted open, it can't be deleted before the line is in it.
    pub(crate) fn admit(&self, start: UsageStart) -> Result<()> {
        // Sized for a typical line, so the buffer isn't regrown while it is written.
        let mut line = Vec::with_capacity(512);
        write_line(&mut line, &start).map_err(|e| StoreError::Invalid(e.to_string()))?;
        line.push(b'\n');
        let (seq, file) = {
            let mut state = self.state.lock().map_err(|_| poisoned())?;
            if state.open.contains_key(&start.request_id) {
                return Err(taken(&start.request_id));
            }
            let seq = state.seq;
            let segment = state.segments.get_mut(&seq).ok_or_else(poisoned)?;
            segment.open += 1;
            let reserved = (seq, segment.file.clone());
            state.bytes += line.len() as u64;
            // A segment that can't be begun now is tried again at the next admission; the
            // current one takes the line meanwhile.
            if state.bytes > self.segment_bytes
                && let Err(e) = self.rotate(&mut state)
            {
                tracing::warn!(error = %e, "could not begin a new usage journal segment");
            }
            reserved
        };
        // One write of a whole line, appended (`O_APPEND`): a kill can't leave half of it, and
        // appenders on other threads can't interleave with it.
        let written = (&*file).write_all(&line);
        let mut state = self.state.lock().map_err(|_| poisoned())?;
        match written {
            // A duplicate admitted meanwhile keeps the id; this line is skipped at ingestion.
            Ok(()) if !state.open.contains_key(&start.request_id) => {
                state.open.insert(start.request_id.clone(), (Box::new(start), seq));
                Ok(())
            }
            Ok(()) => {
                release(&mut state, seq);
                Err(taken(&start.request_id))
            }
            Err(e) => {
                release(&mut state, seq);
                Err(io_error(&segment_path(&self.dir, &self.stem, seq), e))
            }
        }
    }

    /// Takes an admitted record out of the open set, to be completed; `None` when this
    /// journal did not admit it.
    pub(crate) fn take(&self, request_id: &str) -> Option<(Box<UsageStart>, u64)> {
        self.state.lock().ok()?.open.remove(request_id)
    }

    /// Notes that the records admitted in these segments are in the database; closed
    /// segments left with none open are deleted.
    pub(crate) fn committed(&self, segments: impl IntoIterator<Item = u64>) {
        let Ok(mut state) = self.state.lock() else { return };
        for seq in segments {
            release(&mut state, seq);
        }
    }

    fn rotate(&self, state: &mut State) -> Result<()> {
        let old = state.seq;
        let seq = old + 1;
        state.segments.insert(seq, new_segment(&self.dir, &self.stem, seq)?);
        state.seq = seq;
        state.bytes = 0;
        // The old segment goes at once if nothing it admitted is still open.
        if state.segments.get(&old).is_some_and(|s| s.open == 0) {
            delete(state.segments.remove(&old));
        }
        Ok(())
    }
}

/// Counts a record of segment `seq` as no longer open; a closed segment left with none open
/// is deleted.
fn release(state: &mut State, seq: u64) {
    let current = state.seq;
    let Some(segment) = state.segments.get_mut(&seq) else { return };
    segment.open = segment.open.saturating_sub(1);
    if segment.open == 0 && seq != current {
        delete(state.segments.remove(&seq));
    }
}

/// An admission as a journal line: the JSON that serde writes for a [`UsageStart`] (and reads
/// back in [`leftovers`]), byte for byte, with its keys written as they are instead of each
/// being scanned for characters to escape (a fifth of the line's cost).
fn write_line(line: &mut Vec<u8>, start: &UsageStart) -> serde_json::Result<()> {
    let mut text = |key: &str, value: Option<&str>| {
        line.extend_from_slice(key.as_bytes());
        match value {
            Some(value) => serde_json::to_writer(&mut *line, value),
            None => {
                line.extend_from_slice(b"null");
                Ok(())
            }
        }
    };
    text("{\"request_id\":", Some(&start.request_id))?;
    text(",\"instance\":", Some(&start.instance))?;
    text(",\"tenant_id\":", start.tenant_id.as_deref())?;
    text(",\"project_id\":", start.project_id.as_deref())?;
    text(",\"key_id\":", start.key_id.as_deref())?;
    text(",\"route\":", Some(&start.route))?;
    text(",\"model\":", Some(&start.model))?;
    line.extend_from_slice(if start.stream { b",\"stream\":true" } else { b",\"stream\":false" });
    line.extend_from_slice(b",\"started_at\":");
    line.extend_from_slice(itoa::Buffer::new().format(start.started_at).as_bytes());
    line.push(b'}');
    Ok(())
}

/// The file of segment `seq` of the run named `stem`.
fn segment_path(dir: &Path, stem: &str, seq: u64) -> PathBuf {
    dir.join(format!("{stem}-{seq:06}.journal"))
}

fn new_segment(dir: &Path, stem: &str, seq: u64) -> Result<Segment> {
    let path = segment_path(dir, stem, seq);
    let file =
        OpenOptions::new().create_new(true).append(true).open(&path).map_err(|e| io_error(&path, e))?;
    file.try_lock().map_err(|e| StoreError::Invalid(format!("cannot lock {}: {e}", path.display())))?;
    Ok(Segment { file: Arc::new(file), path, open: 0 })
}

/// Deletes a segment whose records are all in the database.
fn delete(segment: Option<Segment>) {
    let Some(segment) = segment else { return };
    if let Err(e) = std::fs::remove_file(&segment.path) {
        tracing::warn!(path = %segment.path.display(), error = %e, "could not delete a spent journal segment");
    }
}

/// The admissions left in `dir` by earlier runs (segments no running process holds), and
/// those segments' paths, to be deleted once the records are in the database.
pub(crate) fn leftovers(dir: &Path) -> Result<(Vec<UsageStart>, Vec<PathBuf>)> {
    let mut starts = Vec::new();
    let mut paths = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((starts, paths)),
        Err(e) => return Err(io_error(dir, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| io_error(dir, e))?.path();
        if path.extension().is_none_or(|x| x != "journal") {
            continue;
        }
        let file = File::open(&path).map_err(|e| io_error(&path, e))?;
        // A segment another process holds is live: it is that process's to complete.
        if file.try_lock().is_err() {
            continue;
        }
        for line in std::io::BufReader::new(&file).lines() {
            let line = line.map_err(|e| io_error(&path, e))?;
            // A line the crash cut short belongs to a request that was never admitted.
            if let Ok(start) = serde_json::from_str::<UsageStart>(&line) {
                starts.push(start);
            }
        }
        paths.push(path);
    }
    Ok((starts, paths))
}

fn taken(request_id: &str) -> StoreError {
    StoreError::Conflict(format!("request id '{request_id}' is taken"))
}

fn io_error(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Invalid(format!("usage journal {}: {e}", path.display()))
}

fn poisoned() -> StoreError {
    StoreError::Invalid("the usage journal's lock is poisoned".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(id: &str) -> UsageStart {
        UsageStart { request_id: id.into(), route: "/v1/chat/completions".into(), ..Default::default() }
    }

    fn segments(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn a_line_is_what_serde_writes_for_the_admission() {
        let full = UsageStart {
            request_id: "req_0193".into(),
            instance: "host-1 \"a\"".into(),
            tenant_id: Some("ten_\u{e9}\u{1f600}\n\t\\".into()),
            project_id: Some("prj_1".into()),
            key_id: Some("key_\u{1}".into()),
            route: "/v1/chat/completions".into(),
            model: "m</script>".into(),
            stream: true,
            started_at: 1_764_000_000_123,
        };
        let bare = UsageStart { started_at: -5, ..start("r1") };
        for start in [full, bare] {
            let mut line = Vec::new();
            write_line(&mut line, &start).unwrap();
            assert_eq!(String::from_utf8(line).unwrap(), serde_json::to_string(&start).unwrap());
        }
    }

    #[test]
    fn spent_segments_are_deleted_and_open_ones_survive_for_the_next_start() {
        let dir = std::env::temp_dir().join(format!("ferry-journal-{}", uuid::Uuid::new_v4().simple()));
        let journal = Journal::with_segments_of(&dir, 1000).unwrap();
        for i in 0..40 {
            journal.admit(start(&format!("r{i}"))).unwrap();
        }
        assert!(matches!(journal.admit(start("r3")), Err(StoreError::Conflict(_))));
        assert!(segments(&dir) > 3, "small segments rotate");
        // Every record but r5 reaches the database: only r5's segment and the current one stay.
        let done: Vec<u64> =
            (0..40).filter(|i| *i != 5).map(|i| journal.take(&format!("r{i}")).unwrap().1).collect();
        journal.committed(done);
        assert!(journal.take("r0").is_none(), "taken once");
        assert_eq!(segments(&dir), 2);
        // While this journal lives its segments are locked; after it, the next start reads the
        // two segments left (whose records already written are skipped when ingested).
        assert!(leftovers(&dir).unwrap().0.is_empty());
        drop(journal);
        let (starts, paths) = leftovers(&dir).unwrap();
        let ids: Vec<&str> = starts.iter().map(|s| &*s.request_id).collect();
        assert!(ids.contains(&"r5") && ids.contains(&"r39") && !ids.contains(&"r20"), "{ids:?}");
        assert_eq!(paths.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_admissions_each_leave_one_whole_line_across_rotations() {
        let dir = std::env::temp_dir().join(format!("ferry-journal-{}", uuid::Uuid::new_v4().simple()));
        let journal = Journal::with_segments_of(&dir, 4000).unwrap();
        std::thread::scope(|s| {
            for t in 0..8 {
                let journal = &journal;
                s.spawn(move || {
                    for i in 0..250 {
                        journal.admit(start(&format!("t{t}-{i}"))).unwrap();
                    }
                });
            }
        });
        assert!(matches!(journal.admit(start("t0-0")), Err(StoreError::Conflict(_))));
        // Half reach the database; the segments holding the other half must survive.
        let done: Vec<u64> = (0..8)
            .flat_map(|t| (0..125).map(move |i| format!("t{t}-{i}")))
            .map(|id| journal.take(&id).unwrap().1)
            .collect();
        journal.committed(done);
        drop(journal);
        let (starts, _) = leftovers(&dir).unwrap();
        let mut ids: Vec<String> = starts.into_iter().map(|s| s.request_id.to_string()).collect();
        ids.sort();
        ids.dedup();
        let open: Vec<String> = (0..8).flat_map(|t| (125..250).map(move |i| format!("t{t}-{i}"))).collect();
        assert!(open.iter().all(|id| ids.binary_search(id).is_ok()), "an open record's line was lost");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
