//! The group-committing writer of usage records ([`UsageWriter`]): one task gathers the
//! completions (and, on PostgreSQL, the admissions) that arrive while the previous group
//! commits, and commits them in one transaction.
//!
//! On a SQLite file the task writes through a connection of its own, typed for SQLite,
//! instead of the store's `Any` pool: sqlx's `Any` driver copies each text twice on its way
//! to SQLite (into its own value, then into SQLite's), and the records are most of what a
//! busy server writes.

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};

use super::{UsageFinish, UsageStart, insert_chunks, insert_records, insert_start, journal, update_finish};
use crate::{Result, Store, StoreError, now_ms};

/// A journaled request that ended: its whole record, and the journal segment that admitted it.
struct Completed {
    start: Box<UsageStart>,
    finish: UsageFinish,
    finished_at: i64,
    segment: u64,
}

enum WriteOp {
    /// An admission in the database (PostgreSQL), acknowledged once committed.
    Start(Box<UsageStart>, tokio::sync::oneshot::Sender<std::result::Result<(), String>>),
    /// The completion of a record admitted in the database.
    Finish(std::sync::Arc<str>, Box<UsageFinish>),
    /// A whole record admitted in the journal (SQLite).
    Complete(Box<Completed>),
    /// Acknowledged once everything queued before it is committed.
    Flush(tokio::sync::oneshot::Sender<()>),
}

impl WriteOp {
    /// Whether a caller waits for this op's commit.
    fn awaited(&self) -> bool {
        matches!(self, WriteOp::Start(..) | WriteOp::Flush(_))
    }
}

/// The handle of [`Store::usage_writer`] and [`Store::open_usage_writer`]; cheap to clone.
#[derive(Clone)]
pub struct UsageWriter {
    tx: tokio::sync::mpsc::UnboundedSender<WriteOp>,
    /// Wakes the writer early for an op someone waits on.
    urgent: std::sync::Arc<tokio::sync::Notify>,
    journal: Option<std::sync::Arc<journal::Journal>>,
}

impl UsageWriter {
    pub(super) fn spawn(store: Store, journal: Option<std::sync::Arc<journal::Journal>>) -> UsageWriter {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let urgent = std::sync::Arc::new(tokio::sync::Notify::new());
        tokio::spawn(write_groups(store, journal.clone(), rx, urgent.clone()));
        UsageWriter { tx, urgent, journal }
    }

    fn send_urgent(&self, op: WriteOp) -> Result<()> {
        self.tx.send(op).map_err(|_| StoreError::Invalid("the usage writer has stopped".into()))?;
        self.urgent.notify_one();
        Ok(())
    }

    /// Makes an admission durable: a journal line (SQLite), or a record committed in the
    /// database (PostgreSQL). Either way a crash after this returns cannot lose the record.
    pub async fn start(&self, start: UsageStart) -> Result<()> {
        if let Some(journal) = &self.journal {
            return journal.admit(start);
        }
        let (ack, done) = tokio::sync::oneshot::channel();
        self.send_urgent(WriteOp::Start(Box::new(start), ack))?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StoreError::Invalid(message)),
            Err(_) => Err(StoreError::Invalid("the usage writer has stopped".into())),
        }
    }

    /// Queues a completion (with its trace); it is committed with the next group (within
    /// [`GATHER`]).
    pub fn finish(&self, request_id: std::sync::Arc<str>, finish: UsageFinish) {
        let op = match self.journal.as_ref().and_then(|j| j.take(&request_id)) {
            Some((start, segment)) => {
                WriteOp::Complete(Box::new(Completed { start, finish, finished_at: now_ms(), segment }))
            }
            None => WriteOp::Finish(request_id, Box::new(finish)),
        };
        if self.tx.send(op).is_err() {
            tracing::error!("the usage writer has stopped; a completion record is lost until reconciliation");
        }
    }

    /// Returns once everything queued before it is committed (for a clean shutdown, and for
    /// readers that must see the latest records).
    pub async fn flush(&self) {
        let (ack, done) = tokio::sync::oneshot::channel();
        if self.send_urgent(WriteOp::Flush(ack)).is_ok() {
            let _ = done.await;
        }
    }
}

/// Most ops in one transaction.
const GROUP: usize = 4096;
/// How long completions nobody waits on gather before they are committed: long enough that a
/// busy server writes a few large transactions a second, short enough that a record is
/// readable just after its response.
pub const GATHER: std::time::Duration = std::time::Duration::from_millis(100);

/// Where groups are committed: the writer's own SQLite connection, or the store's pool
/// (PostgreSQL, and a SQLite database without a file, which a second connection would not see).
enum Sink {
    Sqlite(Box<SqliteConnection>),
    Pool,
}

impl Sink {
    async fn open(store: &Store) -> Sink {
        let file = match store.sqlite_file().await {
            Ok(Some(file)) => file,
            Ok(None) => return Sink::Pool,
            Err(e) => {
                tracing::warn!(error = %e, "the usage writer writes through the pool");
                return Sink::Pool;
            }
        };
        // The pool's settings (`Store::open`); the file exists and has its page size.
        let options = SqliteConnectOptions::new()
            .filename(&file)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(10));
        match SqliteConnection::connect_with(&options).await {
            Ok(conn) => Sink::Sqlite(Box::new(conn)),
            Err(e) => {
                tracing::warn!(error = %e, "the usage writer writes through the pool");
                Sink::Pool
            }
        }
    }
}

async fn write_groups(
    store: Store,
    journal: Option<std::sync::Arc<journal::Journal>>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<WriteOp>,
    urgent: std::sync::Arc<tokio::sync::Notify>,
) {
    let mut sink = Sink::open(&store).await;
    let mut group = Vec::with_capacity(GROUP);
    let mut backlog = false;
    while rx.recv_many(&mut group, GROUP).await > 0 {
        // Senders don't wake this task while it gathers; an awaited op does, through `urgent`.
        if !backlog && !group.iter().any(WriteOp::awaited) {
            tokio::select! {
                () = tokio::time::sleep(GATHER) => {}
                () = urgent.notified() => {}
            }
        }
        while group.len() < GROUP
            && let Ok(op) = rx.try_recv()
        {
            group.push(op);
        }
        // A full group leaves more behind: the next one goes without waiting.
        backlog = group.len() == GROUP;
        commit_group(&store, &mut sink, journal.as_deref(), &mut group).await;
    }
}

/// The group's records, by kind, in the order they are written.
#[derive(Default)]
struct Parts<'a> {
    starts: Vec<&'a UsageStart>,
    completes: Vec<super::Whole<'a>>,
    finishes: Vec<(&'a str, &'a UsageFinish)>,
}

/// Writes a group in one transaction: admissions first, so a completion in the same group
/// finds its record.
macro_rules! write_parts {
    ($conn:expr, $backend:expr, $parts:expr) => {{
        let mut tx = $conn.begin().await?;
        for start in &$parts.starts {
            insert_start(&mut *tx, start).await?;
        }
        for chunk in insert_chunks(&$parts.completes) {
            insert_records(&mut *tx, $backend, chunk, false).await?;
        }
        for (id, finish) in &$parts.finishes {
            update_finish(&mut *tx, id, finish).await?;
        }
        tx.commit().await?;
        Ok::<_, StoreError>(())
    }};
}

/// Commits a group in one transaction, then answers whoever waits. A failed group is retried
/// one op at a time (through the pool), so one bad record fails alone.
async fn commit_group(
    store: &Store,
    sink: &mut Sink,
    journal: Option<&journal::Journal>,
    group: &mut Vec<WriteOp>,
) {
    let mut parts = Parts::default();
    for op in group.iter() {
        match op {
            WriteOp::Start(start, _) => parts.starts.push(&**start),
            WriteOp::Complete(c) => parts.completes.push((&*c.start, Some(&c.finish), c.finished_at)),
            WriteOp::Finish(id, finish) => parts.finishes.push((&**id, &**finish)),
            WriteOp::Flush(_) => {}
        }
    }
    let together = match sink {
        Sink::Sqlite(conn) => async { write_parts!(conn, store.backend(), parts) }.await,
        Sink::Pool => async { write_parts!(store.pool(), store.backend(), parts) }.await,
    };
    drop(parts);
    let grouped_ok = together.is_ok();
    if let Err(e) = together {
        tracing::warn!(error = %e, ops = group.len(), "a usage group failed; writing its records one by one");
    }
    let mut committed = Vec::new();
    let mut flushes = Vec::new();
    for op in group.drain(..) {
        match op {
            WriteOp::Start(start, ack) => {
                let result = if grouped_ok { Ok(()) } else { insert_start(store.pool(), &start).await };
                let _ = ack.send(result.map_err(|e| e.to_string()));
            }
            WriteOp::Complete(c) => {
                let result = if grouped_ok {
                    Ok(1)
                } else {
                    insert_records(
                        store.pool(),
                        store.backend(),
                        &[(&*c.start, Some(&c.finish), c.finished_at)],
                        false,
                    )
                    .await
                };
                match result {
                    Ok(_) => committed.push(c.segment),
                    // The record is there already: the journal needn't keep it.
                    Err(StoreError::Conflict(e)) => {
                        tracing::error!(request_id = %c.start.request_id, error = %e, "could not write the usage record");
                        committed.push(c.segment);
                    }
                    // Left in the journal: the next start writes it as interrupted.
                    Err(e) => {
                        tracing::error!(request_id = %c.start.request_id, error = %e, "could not write the usage record")
                    }
                }
            }
            WriteOp::Finish(id, finish) => {
                if !grouped_ok && let Err(e) = update_finish(store.pool(), &id, &finish).await {
                    tracing::error!(request_id = %id, error = %e, "could not complete the usage record");
                }
            }
            WriteOp::Flush(ack) => flushes.push(ack),
        }
    }
    if let Some(journal) = journal {
        journal.committed(committed);
    }
    for ack in flushes {
        let _ = ack.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sqlite_file_is_written_through_the_writers_own_typed_connection() {
        let dir = std::env::temp_dir().join(format!("ferry-writer-{}", uuid::Uuid::new_v4().simple()));
        let store = Store::open(&dir.join("ferry.db").display().to_string()).await.unwrap();
        let Sink::Sqlite(mut conn) = Sink::open(&store).await else {
            panic!("the writer fell back to the pool")
        };
        // The same database: the pool's schema is there.
        let records: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM usage_records").fetch_one(&mut *conn).await.unwrap();
        assert_eq!(records, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
