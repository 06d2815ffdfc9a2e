//! Room history in SQLite, so a restart loses nothing and a late joiner can catch up.
//!
//! One writer thread owns the write connection. The relay loop hands it the received
//! datagrams (decoded there, off the relay loop) through a bounded queue and never waits for
//! the disk: a hand-over is one uncontended lock and a copy into a shared buffer, with no
//! allocation per datagram and, while the writer is busy or gathering, no wake-up. The thread
//! commits whatever has queued in one transaction (WAL mode, so a commit is one append and
//! readers never block it), inserting many rows per statement. A query first queues a flush,
//! so it sees every message the relay loop handled before it, then reads on its own
//! connection. Records are gathered for up to [`GATHER`] before a commit, so a busy room
//! costs one transaction per few milliseconds.
//!
//! The writer runs at a lower CPU priority than the relay loop: on a small machine its
//! commits would otherwise take CPU from relaying, and the queue absorbs a burst until there
//! is CPU to spare. It is raised again while the writer is behind, so a busy host cannot
//! starve it (priority.rs).
//!
//! Durability: WAL with `synchronous = NORMAL`. A committed transaction survives the process
//! being killed at any point (it is in the WAL file); a power cut may lose the last commits
//! before a checkpoint, never corrupt the file. A stop ([`History::close`]) commits what is
//! queued if its deadline allows and otherwise gives up on the rest, so shutdown stays
//! bounded even when the disk is slow.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mcchat_core::wire::now_ms;
use rusqlite::{Connection, OpenFlags, params};
use serde::Serialize;
use tokio::sync::oneshot;

mod by_time;
mod priority;
mod reader;
mod retention;
mod space;
#[cfg(test)]
mod tests;
mod writer;

pub use reader::{PAGE, Pages, Reader};
use writer::{Ended, Writer};

/// Records queued for the writer at most; beyond it new ones are dropped and counted (the
/// disk is far behind). The writer may hold as many again that it has taken and is
/// committing.
const QUEUE: usize = 16_384;
/// Bytes of datagrams queued for the writer at most, with [`QUEUE`] (16,384 chat messages of
/// a typical 100-200 bytes are within it; of the largest size, 3,500 are).
const QUEUE_BYTES: usize = 4 << 20;
/// A buffer the writer has emptied is kept for reuse up to this size, and freed beyond it,
/// so a burst does not leave the idle daemon larger.
const KEEP_BYTES: usize = 256 << 10;
/// Records committed in one transaction at most (a stop's deadline is checked between them).
const BATCH: usize = 4096;
/// Rows per INSERT statement, largest first: a batch is inserted in as few statements as
/// these sizes allow, each one prepared once (SQLite's cost per statement execution is
/// several times its cost per extra row).
const ROWS: [usize; 4] = [64, 16, 4, 1];
/// Columns bound per row.
const COLUMNS: usize = 9;
/// How long the writer lets records gather before it commits them. A commit costs about 0.4
/// ms of CPU (its WAL frames and its share of checkpoints), as much as some 200 rows: at
/// 10,000 messages a second, gathering for 20 ms doubled the writer's CPU per message
/// (criterion `history/cpu/10k_per_s`: 2.2 µs a record at 100 ms against 3.6-4.1 at 20 ms).
/// A killed process loses at most the messages of this last moment; a stop commits them, and
/// a query commits first what it must see.
const GATHER: Duration = Duration::from_millis(100);
/// A record that has waited this long for the writer says the writer is not getting the CPU
/// it needs (priority.rs): ten times [`GATHER`].
const LATE_MS: u64 = 1000;
/// How often a retention pass runs: the age rule, and a count that commits have not yet
/// applied (see `retention`); sooner while a pass leaves work.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// How long dropping a [`History`] that was not closed waits for the writer.
const DROP_DEADLINE: Duration = Duration::from_millis(100);
/// Messages one query returns at most.
pub use mcchat_core::control::MAX_QUERY;
/// The file, under the state directory.
pub const FILE_NAME: &str = "history.sqlite3";

/// Why history could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("cannot create the state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("history database {path}: {source}")]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot start the history writer thread: {0}")]
    Thread(std::io::Error),
    #[error("the history writer has stopped")]
    Stopped,
    #[error("cannot draw the history database's epoch: {0}")]
    Random(String),
}

/// One stored message (the control contract's record, so a query's answer is what is stored).
pub use mcchat_core::control::HistoryRecord as Record;

/// What to keep of a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub count: u64,
    pub age: Duration,
}

/// Retention for every room: the configured ones, and a default for the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub rooms: HashMap<String, Retention>,
    pub default: Retention,
    /// Bytes the database may use over all rooms (`history_max_bytes`).
    pub max_bytes: u64,
}

impl Policy {
    pub fn for_room(&self, room: &str) -> Retention {
        self.rooms.get(room).copied().unwrap_or(self.default)
    }
}

/// A history request, as a client sends it (one JSON line on the status connection).
pub use mcchat_core::control::HistoryQuery as Query;

/// Datagrams for history, packed into one buffer: what the relay loop gathers in one
/// wake-up and hands over with [`History::store_batch`], one lock for all of them and no
/// allocation per datagram (the buffers are reused).
#[derive(Debug, Default)]
pub struct Batch {
    bytes: Vec<u8>,
    /// Where each datagram ends in `bytes`, when it was received, and the row id the hub gave
    /// it (its offset, PROTOCOL.md 7), if any.
    ends: Vec<(usize, u64, Option<u64>)>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a received datagram; `recv_ms` is when it arrived.
    pub fn push(&mut self, data: &[u8], recv_ms: u64) {
        self.push_at(data, recv_ms, None);
    }

    /// Adds a received datagram to be stored as row `id` (the hub numbers every message, so
    /// that a web client's offset is the row it will find in history).
    pub fn push_at(&mut self, data: &[u8], recv_ms: u64, id: Option<u64>) {
        self.bytes.extend_from_slice(data);
        self.ends.push((self.bytes.len(), recv_ms, id));
    }

    /// Datagrams in the batch.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// When the first datagram queued arrived (`recv_ms`), if any.
    fn first_received_ms(&self) -> Option<u64> {
        self.ends.first().map(|e| e.1)
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    /// Where a transaction from `start` ends: at most `records` datagrams, and no more of
    /// them than fit in `bytes` (one at least).
    fn end_of(&self, start: usize, records: usize, bytes: usize) -> usize {
        let last = start.saturating_add(records).min(self.len());
        if start >= last {
            return last;
        }
        let base = start.checked_sub(1).map_or(0, |p| self.ends[p].0);
        // The first end past the byte budget, kept when it is the first datagram.
        let over = self.ends[start..last].partition_point(|&(end, _, _)| end - base <= bytes);
        start + over.max(1)
    }

    /// Datagram `i`, when it was received, and its row id if it has one.
    fn get(&self, i: usize) -> (&[u8], u64, Option<u64>) {
        let start = i.checked_sub(1).map_or(0, |p| self.ends[p].0);
        let (end, recv_ms, id) = self.ends[i];
        (&self.bytes[start..end], recv_ms, id)
    }

    /// How many of `other`'s datagrams, from the first, fit beside these within the queue's
    /// bounds.
    fn room_for(&self, other: &Self) -> usize {
        let records = QUEUE.saturating_sub(self.len()).min(other.len());
        let budget = QUEUE_BYTES.saturating_sub(self.bytes.len());
        // Ends grow, so the datagrams that fit are a prefix.
        other.ends[..records].partition_point(|&(end, _, _)| end <= budget)
    }

    /// Moves the first `n` of `other`'s datagrams here (all of them into an empty batch by a
    /// swap of buffers, without copying).
    fn take_from(&mut self, other: &mut Self, n: usize) {
        if n == other.len() && self.is_empty() {
            std::mem::swap(self, other);
            return;
        }
        let base = self.bytes.len();
        let bytes = n.checked_sub(1).map_or(0, |l| other.ends[l].0);
        self.bytes.extend_from_slice(&other.bytes[..bytes]);
        self.ends.extend(
            other.ends[..n]
                .iter()
                .map(|&(end, at, id)| (base + end, at, id)),
        );
    }
}

/// What the relay loop, the readers and the writer share.
#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when the writer should look at the queue.
    wake: Condvar,
    /// Records the writer has taken and not yet committed (for the warning of a late stop).
    in_hand: AtomicUsize,
}

#[derive(Debug, Default)]
struct Queue {
    records: Batch,
    /// Queries waiting for what was queued before them to be committed.
    flushes: Vec<oneshot::Sender<()>>,
    /// Set by [`History::close`]: commit what is queued until then, then end.
    stop: Option<Instant>,
    /// The writer is waiting for work: whoever queues some must wake it. While it commits or
    /// gathers it is not, so a stream of datagrams costs no wake-ups.
    idle: bool,
    /// The writer has ended: nothing queued now would be served.
    ended: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues the first of `batch`'s datagrams that fit and empties it; returns how many
    /// were queued.
    fn admit(&self, batch: &mut Batch) -> usize {
        let mut q = self.lock();
        let n = if q.open() {
            q.records.room_for(batch)
        } else {
            0
        };
        if n > 0 {
            q.records.take_from(batch, n);
        }
        self.queued(q, n > 0);
        batch.clear();
        n
    }

    /// Queues one datagram if it fits; returns whether it did.
    fn admit_one(&self, data: &[u8], recv_ms: u64) -> bool {
        let mut q = self.lock();
        let fits = q.open()
            && q.records.len() < QUEUE
            && q.records.bytes.len() + data.len() <= QUEUE_BYTES;
        if fits {
            q.records.push(data, recv_ms);
        }
        self.queued(q, fits);
        fits
    }

    /// Unlocks the queue after records were added (if `added`), waking the writer if it
    /// waits for work.
    fn queued(&self, mut q: MutexGuard<'_, Queue>, added: bool) {
        let wake = added && std::mem::take(&mut q.idle);
        drop(q);
        if wake {
            self.wake.notify_one();
        }
    }
}

impl Queue {
    /// Whether records and flushes are still taken.
    fn open(&self) -> bool {
        self.stop.is_none() && !self.ended
    }
}

/// Counters, for status.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct HistoryStats {
    /// Records dropped because the writer was too far behind.
    pub dropped: u64,
}

/// The relay loop's handle on history.
#[derive(Debug)]
pub struct History {
    path: PathBuf,
    policy: Arc<Mutex<Policy>>,
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    /// Disconnected when the writer has ended.
    ended: mpsc::Receiver<()>,
    /// A close has already waited its deadline out: dropping waits no more (the stop's
    /// whole budget was spent; the process is exiting).
    gave_up: bool,
    stats: HistoryStats,
    journal: Journal,
}

/// What makes history's row ids usable as offsets (PROTOCOL.md 7): which database they number
/// (`epoch`, drawn when the database was made, so a new file never matches an old client's
/// offset), and the last one used when it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Journal {
    pub epoch: u64,
    pub last_id: u64,
}

/// Reads the database's epoch, drawing and storing it the first time, and its last row id.
fn journal(conn: &Connection, path: &Path) -> Result<Journal, HistoryError> {
    let mut fresh = [0u8; 8];
    getrandom::fill(&mut fresh).map_err(|e| HistoryError::Random(e.to_string()))?;
    // Only 53 bits, so that a browser's JSON number holds it exactly.
    let fresh = u64::from_le_bytes(fresh) >> 11;
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?1)",
        [to_sql(fresh)],
    )
    .map_err(db_err(path))?;
    let epoch: i64 = conn
        .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
            r.get(0)
        })
        .map_err(db_err(path))?;
    let last_id: i64 = conn
        .query_row("SELECT coalesce(max(id), 0) FROM messages", [], |r| {
            r.get(0)
        })
        .map_err(db_err(path))?;
    Ok(Journal {
        epoch: from_sql(epoch),
        last_id: from_sql(last_id),
    })
}

fn db_err(path: &Path) -> impl FnOnce(rusqlite::Error) -> HistoryError + '_ {
    move |source| HistoryError::Db {
        path: path.to_owned(),
        source,
    }
}

/// SQLite stores integers as i64; times fit (they are far below 2^63), and anything larger
/// is clamped rather than wrapped. (Sequence numbers use the whole range: [`seq_to_sql`].)
fn to_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_sql(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A sequence number as stored: its 64 bits as SQLite's signed integer, so that every value of
/// the whole u64 range is kept exactly (clamping would make distinct numbers above 2^63-1
/// collide in the unique index). Only equality matters for `seq`; nothing orders by it.
fn seq_to_sql(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

/// The inverse of [`seq_to_sql`].
fn seq_from_sql(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

/// Opens (creating if needed) the database in `dir` and its schema.
fn open_db(path: &Path) -> Result<Connection, HistoryError> {
    let err = db_err(path);
    let conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(db_err(path))?;
    // Freed pages can be given back to the disk (space.rs). Effective in a new database only,
    // and only before the journal mode is set; an older one is converted by the writer.
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
        .map_err(db_err(path))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(db_err(path))?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(db_err(path))?;
    // Statement journals in memory. Every multi-row INSERT opens one (its explicit rowid may
    // fail the integer check, so SQLite must be able to undo the statement alone), and by
    // default it spills past 64 KiB into a temporary file, created and deleted in every
    // transaction: a quarter of the writer's CPU at 10,000 messages a second.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(db_err(path))?;
    // Plans fixed when a statement is prepared. Otherwise a `LIMIT ?` bound to a new number
    // (retention's deletes, at every commit) makes SQLite prepare the statement again: a
    // tenth of the writer's CPU. With no ANALYZE statistics, no plan here depends on a value.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )
    .map_err(db_err(path))?;
    // After a checkpoint the WAL file is cut back to this, so a burst cannot leave it large
    // (the writer lowers it to its reserve on a small disk, space.rs).
    conn.pragma_update(None, "journal_size_limit", 8 << 20)
        .map_err(db_err(path))?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS messages (
            id INTEGER PRIMARY KEY,
            room TEXT NOT NULL,
            kind TEXT NOT NULL,
            sender TEXT NOT NULL,
            text TEXT NOT NULL,
            instance TEXT,
            seq INTEGER,
            ts_ms INTEGER,
            recv_ms INTEGER NOT NULL
         );
         CREATE UNIQUE INDEX IF NOT EXISTS messages_once
            ON messages (room, instance, seq) WHERE instance IS NOT NULL;
         CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room, id);
         -- Kept by versions before 2026-12-04; rows are found by time without it (by_time.rs).
         DROP INDEX IF EXISTS messages_by_time;
         CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
    )
    .map_err(db_err(path))?;
    Ok(conn)
}

impl History {
    /// Opens the history in `dir` and starts its writer.
    pub fn open(dir: &Path, policy: Policy) -> Result<Self, HistoryError> {
        std::fs::create_dir_all(dir).map_err(|source| HistoryError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let conn = open_db(&path)?;
        let journal = journal(&conn, &path)?;
        let shared = Arc::new(Shared::default());
        let (ended_tx, ended) = mpsc::channel();
        let policy = Arc::new(Mutex::new(policy));
        let writer_policy = Arc::clone(&policy);
        let writer_shared = Arc::clone(&shared);
        let thread_path = path.clone();
        let writer = std::thread::Builder::new()
            .name("history".into())
            .spawn(move || {
                let _ended = Ended {
                    shared: &writer_shared,
                    _signal: ended_tx,
                };
                let priority = priority::Priority::lowered(QUEUE);
                Writer::new(conn, thread_path, writer_policy, priority).run(&writer_shared);
            })
            .map_err(HistoryError::Thread)?;
        Ok(Self {
            path,
            policy,
            shared,
            writer: Some(writer),
            gave_up: false,
            ended,
            stats: HistoryStats::default(),
            journal,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database's epoch and its last row id when it was opened.
    pub fn journal(&self) -> Journal {
        self.journal
    }

    pub fn stats(&self) -> HistoryStats {
        self.stats
    }

    /// Queues a received chat datagram (decoded and stored by the writer); never blocks.
    /// `recv_ms` is when it arrived. Returns false if it was dropped (the queue is full, or
    /// history is closing). [`History::store_batch`] does the same for many at once.
    pub fn store_datagram(&mut self, data: &[u8], recv_ms: u64) -> bool {
        let stored = self.shared.admit_one(data, recv_ms);
        if !stored {
            self.stats.dropped += 1;
        }
        stored
    }

    /// Queues the datagrams of `batch` (those of one wake-up of the relay loop) at once and
    /// empties it, keeping its buffers for the next; never blocks. Returns how many were
    /// queued: the first ones, as many as the queue has room for; the rest are dropped and
    /// counted.
    pub fn store_batch(&mut self, batch: &mut Batch) -> usize {
        let offered = batch.len();
        if offered == 0 {
            return 0;
        }
        let stored = self.shared.admit(batch);
        self.stats.dropped += u64::try_from(offered - stored).unwrap_or(u64::MAX);
        stored
    }

    /// New retention rules (on reload).
    pub fn set_policy(&self, policy: Policy) {
        // Shared rather than queued: a full queue can neither lose it nor block the caller.
        *self.policy.lock().unwrap_or_else(PoisonError::into_inner) = policy;
    }

    /// A handle for queries, usable from other tasks.
    pub fn reader(&self) -> Reader {
        Reader {
            path: self.path.clone(),
            shared: Arc::clone(&self.shared),
        }
    }

    /// Stops the writer: it commits what is queued while `deadline` allows, then ends.
    /// Returns whether it ended (without panicking) within `deadline`; never waits longer, whatever the queue or
    /// the disk. If it did not, what was committed is safe (in the WAL), the rest is lost
    /// when the process exits, and a warning says how much. Storing and queries fail from
    /// the first call on; a later call waits again for the writer to end, without moving the
    /// first call's deadline for committing.
    pub fn close(&mut self, deadline: Duration) -> bool {
        let Some(writer) = self.writer.take() else {
            return true;
        };
        let until = Instant::now() + deadline;
        {
            let mut q = self.shared.lock();
            q.stop.get_or_insert(until);
        }
        self.shared.wake.notify_one();
        // The writer never sends: the channel disconnects when it ends (or panics).
        let ended = match self
            .ended
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
            Err(RecvTimeoutError::Timeout) => false,
        };
        if !ended {
            let queued = self.shared.lock().records.len();
            let committing = self.shared.in_hand.load(Ordering::Relaxed);
            tracing::warn!(
                path = %self.path.display(),
                queued,
                committing,
                "the history writer did not stop in {deadline:?} (disk slow or locked): \
                 messages committed so far are safe, these may be lost"
            );
            self.writer = Some(writer);
            self.gave_up = true;
            return false;
        }
        // It has ended: this join waits only for the thread's exit.
        let joined = writer.join().is_ok();
        if !joined {
            tracing::error!("the history writer panicked");
        }
        joined
    }
}

impl Drop for History {
    fn drop(&mut self) {
        if !self.gave_up {
            self.close(DROP_DEADLINE);
        }
    }
}
