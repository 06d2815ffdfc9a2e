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
//! is CPU to spare.
//!
//! Durability: WAL with `synchronous = NORMAL`. A committed transaction survives the process
//! being killed at any point (it is in the WAL file); a power cut may lose the last commits
//! before a checkpoint, never corrupt the file. A stop ([`History::close`]) commits what is
//! queued if its deadline allows and otherwise gives up on the rest, so shutdown stays
//! bounded even when the disk is slow.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mcchat_core::wire::{self, Kind, now_ms};
use rusqlite::{Connection, OpenFlags, Transaction, params};
use serde::Serialize;
use tokio::sync::oneshot;

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
const COLUMNS: usize = 8;
/// How long the writer lets records gather before it commits them. A commit costs about as
/// much CPU as 50 rows: at 10,000 messages a second, 20 ms makes it 200 rows (5 ms, 25% more
/// CPU per message). A killed process loses at most the messages of this last moment.
const GATHER: Duration = Duration::from_millis(20);
/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// The writer's nice value (Linux, per thread): 10 gives it about a tenth of the CPU the relay
/// loop (nice 0) gets when both want it, and all of it when the relay loop is idle.
const WRITER_NICE: i32 = 10;
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
    /// Where each datagram ends in `bytes`, and when it was received.
    ends: Vec<(usize, u64)>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a received datagram; `recv_ms` is when it arrived.
    pub fn push(&mut self, data: &[u8], recv_ms: u64) {
        self.bytes.extend_from_slice(data);
        self.ends.push((self.bytes.len(), recv_ms));
    }

    /// Datagrams in the batch.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    /// Datagram `i` and when it was received.
    fn get(&self, i: usize) -> (&[u8], u64) {
        let start = i.checked_sub(1).map_or(0, |p| self.ends[p].0);
        let (end, recv_ms) = self.ends[i];
        (&self.bytes[start..end], recv_ms)
    }

    /// How many of `other`'s datagrams, from the first, fit beside these within the queue's
    /// bounds.
    fn room_for(&self, other: &Self) -> usize {
        let records = QUEUE.saturating_sub(self.len()).min(other.len());
        let budget = QUEUE_BYTES.saturating_sub(self.bytes.len());
        // Ends grow, so the datagrams that fit are a prefix.
        other.ends[..records].partition_point(|&(end, _)| end <= budget)
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
        self.ends
            .extend(other.ends[..n].iter().map(|&(end, at)| (base + end, at)));
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
}

fn db_err(path: &Path) -> impl FnOnce(rusqlite::Error) -> HistoryError + '_ {
    move |source| HistoryError::Db {
        path: path.to_owned(),
        source,
    }
}

/// SQLite stores integers as i64; sequence numbers and times fit (they are far below 2^63),
/// and anything larger is clamped rather than wrapped.
fn to_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_sql(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Opens (creating if needed) the database in `dir` and its schema.
fn open_db(path: &Path) -> Result<Connection, HistoryError> {
    let err = db_err(path);
    let conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(db_err(path))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(db_err(path))?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(db_err(path))?;
    // After a checkpoint the WAL file is cut back to this, so a burst cannot leave it large.
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
         CREATE INDEX IF NOT EXISTS messages_by_time ON messages (room, recv_ms);",
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
                lower_priority();
                Writer::new(conn, thread_path, writer_policy).run(&writer_shared);
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
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
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

/// Marks the writer's end, however it ends (a panic too): pending queries fail rather than
/// wait, and [`History::close`] stops waiting.
struct Ended<'a> {
    shared: &'a Shared,
    /// Dropped after `drop` below has run: its disconnection tells `close`.
    _signal: mpsc::Sender<()>,
}

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        let mut q = self.shared.lock();
        q.ended = true;
        q.flushes.clear();
        let abandoned = q.records.len() + self.shared.in_hand.load(Ordering::Relaxed);
        q.records = Batch::default();
        drop(q);
        if abandoned > 0 {
            tracing::warn!(
                abandoned,
                "history stopped before these messages could be stored"
            );
        }
    }
}

/// Lowers the calling thread's CPU priority (best effort: history only falls behind sooner
/// without it). On Linux the writer runs under SCHED_IDLE: it gets a core only when nothing
/// else wants it, and a relay or client thread that wakes takes the core from it at once (a
/// nice value alone lets it keep a core for its time slice, milliseconds: the relay's p99).
/// The queue rides out the time it waits. Where SCHED_IDLE is refused, nice 10.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::{
            NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
            set_thread_priority_and_policy, thread_native_id,
        };
        let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
        if let Err(error) =
            set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle)
        {
            tracing::debug!(
                ?error,
                "SCHED_IDLE refused for the history writer; nice instead"
            );
            let tid = rustix::thread::gettid();
            if let Err(error) = rustix::process::setpriority_process(Some(tid), WRITER_NICE) {
                tracing::debug!(%error, nice = WRITER_NICE, "cannot lower the history writer's priority");
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    tracing::debug!("the history writer runs at the relay's priority on this system");
}

/// Reads history on its own connection, after the writer has flushed.
#[derive(Debug, Clone)]
pub struct Reader {
    path: PathBuf,
    shared: Arc<Shared>,
}

impl Reader {
    /// The messages `q` asks for, oldest first.
    pub async fn query(&self, q: Query) -> Result<Vec<Record>, HistoryError> {
        let (done, flushed) = oneshot::channel();
        {
            // Queued beside the records, never refused for space: a full queue only means
            // the flush waits for the writer to get through it.
            let mut queue = self.shared.lock();
            if !queue.open() {
                return Err(HistoryError::Stopped);
            }
            queue.flushes.push(done);
        }
        self.shared.wake.notify_one();
        flushed.await.map_err(|_| HistoryError::Stopped)?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || read(&path, &q))
            .await
            .map_err(|_| HistoryError::Stopped)?
    }
}

fn read(path: &Path, q: &Query) -> Result<Vec<Record>, HistoryError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err(path))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(db_err(path))?;
    let limit = q.max_messages();
    // `since` becomes a lower bound on the row id: the first message received at or after
    // it, found on the time index. Rows are numbered in the order received, so the scan
    // below stays on the (room, id) index and reads only what it returns (plus what `grep`
    // skips), however large the room.
    let first_id: i64 = match q.since_ms {
        None => 0,
        Some(since) => conn
            .query_row(
                "SELECT coalesce(
                   (SELECT id FROM messages INDEXED BY messages_by_time
                    WHERE room = ?1 AND recv_ms >= ?2 ORDER BY recv_ms LIMIT 1),
                   9223372036854775807)",
                params![q.room, to_sql(since)],
                |r| r.get(0),
            )
            .map_err(db_err(path))?,
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT room, kind, sender, text, instance, seq, ts_ms, recv_ms
             FROM messages INDEXED BY messages_by_room
             WHERE room = ?1 AND id >= ?2 AND recv_ms >= ?5
               AND (?3 IS NULL OR instr(lower(text), lower(?3)) > 0)
             ORDER BY id DESC LIMIT ?4",
        )
        .map_err(db_err(path))?;
    let rows = stmt
        .query_map(
            params![
                q.room,
                first_id,
                q.grep,
                i64::from(limit),
                to_sql(q.since_ms.unwrap_or(0))
            ],
            |r| {
                Ok(Record {
                    room: r.get(0)?,
                    kind: r.get(1)?,
                    sender: r.get(2)?,
                    text: r.get(3)?,
                    id: r.get(4)?,
                    seq: r.get::<_, Option<i64>>(5)?.map(from_sql),
                    ts_ms: r.get::<_, Option<i64>>(6)?.map(from_sql),
                    recv_ms: from_sql(r.get(7)?),
                })
            },
        )
        .map_err(db_err(path))?;
    let mut out = rows.collect::<Result<Vec<_>, _>>().map_err(db_err(path))?;
    out.reverse();
    Ok(out)
}

/// Waits on the writer's condition variable for at most `timeout`.
fn wait_timeout<'a>(
    shared: &'a Shared,
    q: MutexGuard<'a, Queue>,
    timeout: Duration,
) -> MutexGuard<'a, Queue> {
    shared
        .wake
        .wait_timeout(q, timeout)
        .unwrap_or_else(PoisonError::into_inner)
        .0
}

/// Inserts `rows` with `sql`, the statement for exactly that many.
fn insert(tx: &Transaction<'_>, sql: &str, rows: &[Row<'_>]) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(sql)?;
    for (n, row) in rows.iter().enumerate() {
        row.bind(&mut stmt, n)?;
    }
    stmt.raw_execute()?;
    Ok(())
}

/// One message, decoded from its datagram and borrowing from it, ready to bind.
struct Row<'a> {
    room: &'a str,
    kind: &'static str,
    sender: &'a str,
    text: &'a str,
    /// The instance id in hex, as `Record::id` has it.
    instance: Option<[u8; 16]>,
    seq: Option<i64>,
    ts_ms: Option<i64>,
    recv_ms: i64,
}

impl<'a> Row<'a> {
    /// The row for a chat datagram (`msg` or `me`); `None` for anything else.
    fn decode(data: &'a [u8], recv_ms: u64) -> Option<Self> {
        let frame = wire::decode(data).ok()?;
        if !matches!(frame.meta.kind, Kind::Message | Kind::Action) {
            return None;
        }
        Some(Self {
            room: frame.room,
            kind: frame.meta.kind.name(),
            sender: frame.sender,
            text: frame.text,
            instance: frame.meta.instance.map(|i| hex16(i.0)),
            seq: frame.meta.seq.map(to_sql),
            ts_ms: frame.meta.ts_ms.map(to_sql),
            recv_ms: to_sql(recv_ms),
        })
    }

    /// Binds this row as the `n`th (from 0) of a multi-row INSERT.
    fn bind(&self, stmt: &mut rusqlite::Statement<'_>, n: usize) -> rusqlite::Result<()> {
        let at = n * COLUMNS;
        stmt.raw_bind_parameter(at + 1, self.room)?;
        stmt.raw_bind_parameter(at + 2, self.kind)?;
        stmt.raw_bind_parameter(at + 3, self.sender)?;
        stmt.raw_bind_parameter(at + 4, self.text)?;
        let instance = self
            .instance
            .as_ref()
            .and_then(|h| std::str::from_utf8(h).ok());
        stmt.raw_bind_parameter(at + 5, instance)?;
        stmt.raw_bind_parameter(at + 6, self.seq)?;
        stmt.raw_bind_parameter(at + 7, self.ts_ms)?;
        stmt.raw_bind_parameter(at + 8, self.recv_ms)
    }
}

/// `v` in 16 lowercase hex digits, as [`wire::InstanceId`] displays it, without allocating.
fn hex16(v: u64) -> [u8; 16] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, d) in out.iter_mut().enumerate() {
        *d = DIGITS[usize::try_from((v >> (60 - 4 * i)) & 0xf).unwrap_or(0)];
    }
    out
}

/// `INSERT OR IGNORE` of `rows` rows (deduplicated by the unique index on room, instance
/// and seq).
fn insert_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT OR IGNORE INTO messages
         (room, kind, sender, text, instance, seq, ts_ms, recv_ms) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?,?,?,?)");
    }
    sql
}

struct Writer {
    conn: Connection,
    path: PathBuf,
    policy: Arc<Mutex<Policy>>,
    pruned: Instant,
    failures: u64,
    /// The statements for [`ROWS`] rows, in that order.
    inserts: Vec<String>,
}

impl Writer {
    fn new(conn: Connection, path: PathBuf, policy: Arc<Mutex<Policy>>) -> Self {
        Self {
            conn,
            path,
            policy,
            pruned: Instant::now(),
            failures: 0,
            inserts: ROWS.iter().map(|&n| insert_sql(n)).collect(),
        }
    }

    fn run(mut self, shared: &Shared) {
        self.prune();
        let mut taken = Batch::new();
        let mut flushes = Vec::new();
        let stop = loop {
            let stop = self.wait(shared, &mut taken, &mut flushes);
            let committed = self.commit_all(shared, &taken);
            if taken.bytes.capacity() > KEEP_BYTES {
                taken = Batch::new();
            } else {
                taken.clear();
            }
            if committed {
                for done in flushes.drain(..) {
                    let _ = done.send(());
                }
            } else {
                // Not everything they wait for is stored: they fail (as queries after a stop).
                flushes.clear();
            }
            if let Some(until) = stop {
                // Go on while there is more queued and time to commit it.
                if !committed || shared.lock().records.is_empty() {
                    break until;
                }
                continue;
            }
            if self.pruned.elapsed() >= PRUNE_EVERY {
                self.prune();
            }
        };
        // Fold the WAL into the database on a clean stop, so the directory holds one file;
        // waiting for readers no longer than the stop allows.
        let left = stop.saturating_duration_since(Instant::now());
        if !left.is_zero() && self.conn.busy_timeout(left).is_ok() {
            let _ = self.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
        }
    }

    /// Waits for work, then takes what is queued into `taken` and `flushes`; returns the
    /// stop's deadline if there is one. Records are let gather for [`GATHER`] (a query's
    /// flush or a stop ends that at once), so a stream of messages costs one wake-up and
    /// one transaction per few milliseconds, not one each.
    fn wait(
        &mut self,
        shared: &Shared,
        taken: &mut Batch,
        flushes: &mut Vec<oneshot::Sender<()>>,
    ) -> Option<Instant> {
        let mut q = shared.lock();
        let mut gathered_until = None;
        loop {
            if q.stop.is_some() || !q.flushes.is_empty() || q.records.len() >= BATCH {
                break;
            }
            let now = Instant::now();
            if !q.records.is_empty() {
                let until = *gathered_until.get_or_insert(now + GATHER);
                if now >= until {
                    break;
                }
                q = wait_timeout(shared, q, until - now);
                continue;
            }
            let prune_at = self.pruned + PRUNE_EVERY;
            if now >= prune_at {
                drop(q);
                self.prune();
                q = shared.lock();
                continue;
            }
            q.idle = true;
            q = wait_timeout(shared, q, prune_at - now);
            q.idle = false;
        }
        std::mem::swap(&mut q.records, taken);
        flushes.append(&mut q.flushes);
        shared.in_hand.store(taken.len(), Ordering::Relaxed);
        q.stop
    }

    /// Commits `taken` in transactions of up to [`BATCH`]; returns false if a stop's
    /// deadline passed before all of it was (the rest is given up).
    fn commit_all(&mut self, shared: &Shared, taken: &Batch) -> bool {
        let mut start = 0;
        while start < taken.len() {
            if shared
                .lock()
                .stop
                .is_some_and(|until| Instant::now() >= until)
            {
                return false;
            }
            let end = (start + BATCH).min(taken.len());
            self.commit(taken, start..end);
            start = end;
            shared.in_hand.store(taken.len() - start, Ordering::Relaxed);
        }
        true
    }

    /// Stores the chat messages among `batch`'s datagrams `range`, in one transaction.
    fn commit(&mut self, batch: &Batch, range: Range<usize>) {
        let records = range.len();
        let inserts = &self.inserts;
        let result = (|| -> rusqlite::Result<()> {
            let tx = self.conn.transaction()?;
            let mut rows = Vec::with_capacity(ROWS[0]);
            for i in range {
                let (data, recv_ms) = batch.get(i);
                rows.extend(Row::decode(data, recv_ms));
                if rows.len() == ROWS[0] {
                    insert(&tx, &inserts[0], &rows)?;
                    rows.clear();
                }
            }
            let mut rest = &rows[..];
            for (&n, sql) in ROWS.iter().zip(inserts).skip(1) {
                while rest.len() >= n {
                    insert(&tx, sql, &rest[..n])?;
                    rest = &rest[n..];
                }
            }
            tx.commit()
        })();
        if let Err(error) = result {
            self.failures += 1;
            tracing::error!(
                path = %self.path.display(),
                %error,
                records,
                failures = self.failures,
                "cannot write history; these messages are not stored"
            );
        }
    }

    /// Applies retention: by age, then by count, room by room.
    fn prune(&mut self) {
        self.pruned = Instant::now();
        let now = now_ms();
        let policy = self
            .policy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let result = (|| -> rusqlite::Result<usize> {
            let rooms: Vec<String> = {
                let mut stmt = self
                    .conn
                    .prepare_cached("SELECT DISTINCT room FROM messages")?;
                stmt.query_map([], |r| r.get(0))?
                    .collect::<Result<_, _>>()?
            };
            let tx = self.conn.transaction()?;
            let mut deleted = 0;
            for room in rooms {
                let keep = policy.for_room(&room);
                let oldest =
                    now.saturating_sub(u64::try_from(keep.age.as_millis()).unwrap_or(u64::MAX));
                deleted += tx.execute(
                    "DELETE FROM messages WHERE room = ?1 AND recv_ms < ?2",
                    params![room, to_sql(oldest)],
                )?;
                deleted += tx.execute(
                    "DELETE FROM messages WHERE room = ?1 AND id <= coalesce(
                       (SELECT id FROM messages WHERE room = ?1 ORDER BY id DESC
                        LIMIT 1 OFFSET ?2), -1)",
                    params![room, to_sql(keep.count)],
                )?;
            }
            tx.commit()?;
            Ok(deleted)
        })();
        match result {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "history retention applied"),
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "history retention failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deadline for a close that is expected to finish: generous, so a slow test machine
    /// does not fail it.
    const LONG: Duration = Duration::from_secs(60);

    /// A message from alice's instance `aa` with `seq`, as the relay loop hands it over.
    fn datagram(room: &str, seq: u64, text: &str) -> Vec<u8> {
        format!("@id=00000000000000aa;seq={seq};ts=1 {room}|alice|{text}").into_bytes()
    }

    fn policy(count: u64) -> Policy {
        Policy {
            rooms: HashMap::new(),
            default: Retention {
                count,
                age: Duration::from_secs(3600),
            },
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("mcchatd-history-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn query(room: &str) -> Query {
        Query {
            room: room.into(),
            since_ms: None,
            grep: None,
            limit: Some(MAX_QUERY),
        }
    }

    #[tokio::test]
    async fn stores_once_reads_in_order_and_survives_reopening() {
        let dir = temp_dir("basic");
        let mut h = History::open(&dir, policy(1000)).unwrap();
        for seq in 1..=5 {
            assert!(h.store_datagram(&datagram("room1", seq, &format!("Hello {seq}")), now_ms()));
        }
        assert!(
            h.store_datagram(&datagram("room1", 3, "a repair of 3"), now_ms()),
            "queued..."
        );
        let now = now_ms();
        assert!(h.store_datagram(b"@id=00000000000000bb;seq=1;kind=me room1|bob|waves", now));
        assert!(
            h.store_datagram(b"@kind=hb room1|bob|", now),
            "queued, but not a chat message"
        );
        assert!(h.store_datagram(b"room1|alice|bare", now));
        assert!(h.store_datagram(b"room1|alice|bare", now));
        assert!(h.store_datagram(&datagram("room2", 1, "elsewhere"), now));
        let got = h.reader().query(query("room1")).await.unwrap();
        let texts: Vec<&str> = got.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "Hello 1", "Hello 2", "Hello 3", "Hello 4", "Hello 5", "waves", "bare", "bare"
            ],
            "...but stored once; bare datagrams cannot be told apart and are all kept"
        );
        let mut q = query("room1");
        q.grep = Some("HELLO 4".into());
        assert_eq!(h.reader().query(q).await.unwrap().len(), 1);
        let mut q = query("room1");
        q.limit = Some(2);
        let last: Vec<String> = h
            .reader()
            .query(q)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.text)
            .collect();
        assert_eq!(last, ["bare", "bare"]);
        let mut q = query("room1");
        q.since_ms = Some(now_ms() + 60_000);
        assert!(h.reader().query(q).await.unwrap().is_empty());
        let reader = h.reader();
        assert!(
            h.close(LONG),
            "with a reader still alive: must not wait for it"
        );
        assert!(matches!(
            reader.query(query("room1")).await,
            Err(HistoryError::Stopped)
        ));
        let h = History::open(&dir, policy(1000)).unwrap();
        assert_eq!(h.reader().query(query("room1")).await.unwrap().len(), 8);
        drop(h);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn retention_keeps_the_newest_per_room() {
        let dir = temp_dir("retention");
        let mut h = History::open(&dir, policy(1000)).unwrap();
        for seq in 1..=50 {
            h.store_datagram(&datagram("room1", seq, &seq.to_string()), now_ms());
        }
        h.store_datagram(&datagram("room2", 1, "old"), 1);
        h.store_datagram(&datagram("room2", 2, "new"), now_ms());
        h.reader().query(query("room1")).await.unwrap();
        assert!(h.close(LONG));
        let h = History::open(&dir, policy(10)).unwrap();
        let got = h.reader().query(query("room1")).await.unwrap();
        let seqs: Vec<u64> = got.iter().filter_map(|r| r.seq).collect();
        assert_eq!(seqs, (41..=50).collect::<Vec<_>>());
        let got = h.reader().query(query("room2")).await.unwrap();
        assert_eq!(got.len(), 1, "older than an hour: gone");
        assert_eq!(got[0].text, "new");
        drop(h);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_batch_is_queued_at_once_and_emptied() {
        let dir = temp_dir("batch");
        let mut h = History::open(&dir, policy(1000)).unwrap();
        let mut batch = Batch::new();
        for seq in 1..=100 {
            batch.push(&datagram("room1", seq, &format!("m{seq}")), now_ms());
        }
        batch.push(b"@kind=hb room1|bob|", now_ms());
        batch.push(b"not a datagram at all", now_ms());
        batch.push(&datagram("room1", 7, "a repair of 7"), now_ms());
        assert_eq!(h.store_batch(&mut batch), 103, "all queued, decoded later");
        assert!(batch.is_empty(), "emptied for the next wake-up");
        batch.push(&datagram("room1", 101, "m101"), now_ms());
        assert_eq!(
            h.store_batch(&mut batch),
            1,
            "the emptied batch is reusable"
        );
        let got = h.reader().query(query("room1")).await.unwrap();
        let texts: Vec<String> = got.into_iter().map(|r| r.text).collect();
        let want: Vec<String> = (1..=101).map(|s| format!("m{s}")).collect();
        assert_eq!(texts, want, "chat messages only, once each, in order");
        assert_eq!(h.stats().dropped, 0);
        drop(h);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_batch_is_admitted_up_to_the_queue_bounds() {
        let mut queue = Batch::new();
        let mut offered = Batch::new();
        let big = vec![b'x'; 1000];
        for _ in 0..QUEUE {
            offered.push(&big, 1);
        }
        assert_eq!(
            queue.room_for(&offered),
            QUEUE_BYTES / 1000,
            "bounded by bytes: {QUEUE} datagrams of 1000 bytes are more than {QUEUE_BYTES}"
        );
        let mut small = Batch::new();
        for _ in 0..QUEUE + 10 {
            small.push(b"x", 1);
        }
        assert_eq!(queue.room_for(&small), QUEUE, "bounded by records");
        queue.take_from(&mut small, 3);
        offered.clear();
        offered.push(b"ab", 2);
        offered.push(b"cde", 3);
        assert_eq!(queue.room_for(&offered), 2);
        queue.take_from(&mut offered, 2);
        let got: Vec<(&[u8], u64)> = (0..queue.len()).map(|i| queue.get(i)).collect();
        assert_eq!(
            got,
            [
                (&b"x"[..], 1),
                (b"x", 1),
                (b"x", 1),
                (b"ab", 2),
                (b"cde", 3)
            ]
        );
    }

    #[tokio::test]
    async fn close_commits_what_is_queued() {
        let dir = temp_dir("drain");
        let mut h = History::open(&dir, policy(100_000)).unwrap();
        for seq in 1..=5000 {
            assert!(h.store_datagram(&datagram("room1", seq, "queued"), now_ms()));
        }
        assert!(h.close(LONG), "no query flushed them: the stop does");
        assert!(!h.store_datagram(&datagram("room1", 5001, "late"), now_ms()));
        assert_eq!(h.stats().dropped, 1, "refused once closing");
        let h = History::open(&dir, policy(100_000)).unwrap();
        assert_eq!(h.reader().query(query("room1")).await.unwrap().len(), 5000);
        drop(h);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A full queue and a writer stuck on a locked database: storing never waits, and close
    /// gives up at its deadline rather than waiting for the disk.
    #[tokio::test]
    async fn close_is_bounded_with_a_full_queue_and_a_locked_database() {
        let dir = temp_dir("bounded");
        let mut h = History::open(&dir, policy(100_000)).unwrap();
        let reader = h.reader();
        // Holds the write lock: the writer's commits wait for it (busy_timeout, 5 s).
        let blocker = Connection::open(dir.join(FILE_NAME)).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut seq = 0;
        let mut batch = Batch::new();
        for _ in 0..3 * QUEUE {
            seq += 1;
            batch.push(&datagram("room1", seq, "held back"), now_ms());
        }
        assert_eq!(
            h.store_batch(&mut batch),
            QUEUE,
            "the queue's bound, no more"
        );
        assert_eq!(h.stats().dropped, 2 * u64::try_from(QUEUE).unwrap());
        // The writer has taken at most one queue's worth: the queue fills again.
        let mut refused = 0;
        for _ in 0..2 * QUEUE {
            seq += 1;
            if !h.store_datagram(&datagram("room1", seq, "held back"), now_ms()) {
                refused += 1;
            }
        }
        assert!(refused >= QUEUE, "{refused} refused");
        assert!(!h.close(Duration::from_millis(300)), "the writer is stuck");
        // Released only now: close returned while the database was still locked.
        blocker.execute_batch("ROLLBACK").unwrap();
        assert!(!h.store_datagram(&datagram("room1", 0, "late"), now_ms()));
        assert!(matches!(
            reader.query(query("room1")).await,
            Err(HistoryError::Stopped)
        ));
        assert!(h.close(LONG), "once unblocked it ends, without a panic");
        let h = History::open(&dir, policy(100_000)).unwrap();
        let stored = h.reader().query(query("room1")).await.unwrap().len();
        assert!(
            stored <= BATCH,
            "{stored} stored: at most the transaction under way at the deadline"
        );
        drop(h);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The writer's nice value, read from /proc (Linux), once it has started.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_writer_runs_at_a_lower_priority() {
        let dir = temp_dir("nice");
        let h = History::open(&dir, policy(10)).unwrap();
        // Answered by the writer, so it has set its priority by now.
        h.reader().query(query("room1")).await.unwrap();
        let mut policies = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let task = task.unwrap().path();
            let comm = std::fs::read_to_string(task.join("comm")).unwrap();
            if comm.trim_end() == "history" {
                let stat = std::fs::read_to_string(task.join("stat")).unwrap();
                // Fields after the command's closing parenthesis start at the 3rd; the
                // scheduling policy is the 41st (5: SCHED_IDLE).
                let (_, rest) = stat.rsplit_once(')').unwrap();
                policies.push(rest.split_whitespace().nth(38).unwrap().to_owned());
            }
        }
        assert_eq!(policies, ["5"], "the writer runs under SCHED_IDLE");
        drop(h);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
