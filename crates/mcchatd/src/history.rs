//! Room history in SQLite, so a restart loses nothing and a late joiner can catch up.
//!
//! One writer thread owns the write connection: the relay loop hands it the received
//! datagrams (decoded there, off the relay loop) over a bounded channel and never waits for
//! the disk; the thread commits whatever has queued in
//! one transaction (WAL mode, so a commit is one append and readers never block it). A query
//! first sends a flush through the same channel, so it sees every message the relay loop
//! handled before it, then reads on its own connection. Records are gathered for up to
//! [`GATHER`] before a commit, so a busy room costs one transaction per few milliseconds.
//!
//! Durability: WAL with `synchronous = NORMAL`. A committed transaction survives the process
//! being killed at any point (it is in the WAL file); a power cut may lose the last commits
//! before a checkpoint, never corrupt the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mcchat_core::wire::now_ms;
use rusqlite::{Connection, OpenFlags, params};
use serde::Serialize;
use tokio::sync::oneshot;

/// Records queued for the writer at most; beyond it new ones are dropped and counted (the
/// disk is far behind: up to about 20 MiB of datagrams waiting).
const QUEUE: usize = 16_384;
/// Records committed in one transaction at most.
const BATCH: usize = 4096;
/// How long the writer lets records gather before it commits them.
const GATHER: Duration = Duration::from_millis(5);
/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
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

enum Cmd {
    /// A datagram as received: decoded on the writer thread, so the relay loop pays only a
    /// copy for history.
    Datagram(Box<[u8]>, u64),
    Flush(oneshot::Sender<()>),
    /// Commit what is queued and end (readers may still hold senders).
    Stop,
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
    tx: Option<SyncSender<Cmd>>,
    writer: Option<JoinHandle<()>>,
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
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let policy = Arc::new(Mutex::new(policy));
        let writer_policy = Arc::clone(&policy);
        let thread_path = path.clone();
        let writer = std::thread::Builder::new()
            .name("history".into())
            .spawn(move || Writer::new(conn, thread_path, writer_policy).run(&rx))
            .map_err(HistoryError::Thread)?;
        Ok(Self {
            path,
            policy,
            tx: Some(tx),
            writer: Some(writer),
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
    /// `recv_ms` is when it arrived. Returns false if it was dropped.
    pub fn store_datagram(&mut self, data: &[u8], recv_ms: u64) -> bool {
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(Cmd::Datagram(data.into(), recv_ms)).is_ok());
        if !sent {
            self.stats.dropped += 1;
        }
        sent
    }

    /// New retention rules (on reload).
    pub fn set_policy(&self, policy: Policy) {
        // Shared rather than queued: a full queue can neither lose it nor block the caller.
        *self
            .policy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = policy;
    }

    /// A handle for queries, usable from other tasks.
    pub fn reader(&self) -> Reader {
        Reader {
            path: self.path.clone(),
            tx: self.tx.clone(),
        }
    }

    /// Commits what is queued and stops the writer.
    pub fn close(&mut self) {
        if let Some(tx) = self.tx.take() {
            // Waits for queue space: the writer is draining it, so this ends.
            let _ = tx.send(Cmd::Stop);
        }
        if let Some(w) = self.writer.take()
            && w.join().is_err()
        {
            tracing::error!("the history writer panicked");
        }
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.close();
    }
}

/// Reads history on its own connection, after the writer has flushed.
#[derive(Debug, Clone)]
pub struct Reader {
    path: PathBuf,
    tx: Option<SyncSender<Cmd>>,
}

impl Reader {
    /// The messages `q` asks for, oldest first.
    pub async fn query(&self, q: Query) -> Result<Vec<Record>, HistoryError> {
        let (done, flushed) = oneshot::channel();
        let tx = self.tx.clone().ok_or(HistoryError::Stopped)?;
        // The writer may be busy with a large batch: wait for queue space off the runtime.
        let queued = tokio::task::spawn_blocking(move || tx.send(Cmd::Flush(done)).is_ok())
            .await
            .map_err(|_| HistoryError::Stopped)?;
        if !queued {
            return Err(HistoryError::Stopped);
        }
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

struct Writer {
    conn: Connection,
    path: PathBuf,
    policy: Arc<Mutex<Policy>>,
    pruned: Instant,
    failures: u64,
}

impl Writer {
    fn new(conn: Connection, path: PathBuf, policy: Arc<Mutex<Policy>>) -> Self {
        Self {
            conn,
            path,
            policy,
            pruned: Instant::now(),
            failures: 0,
        }
    }

    fn run(mut self, rx: &Receiver<Cmd>) {
        self.prune();
        loop {
            let first = match rx.recv_timeout(PRUNE_EVERY) {
                Ok(cmd) => cmd,
                Err(RecvTimeoutError::Timeout) => {
                    self.prune();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            // Group commit: after the first record, let the queue fill for a moment, so a
            // stream of messages costs one wake-up and one transaction per few milliseconds,
            // not one each (and the relay loop's sends find no sleeper to wake). A query's
            // flush or a stop is served at once.
            if matches!(first, Cmd::Datagram(..)) {
                std::thread::sleep(GATHER);
            }
            let mut batch = Vec::new();
            let mut flushes = Vec::new();
            let mut stop = false;
            let mut next = Some(first);
            while let Some(cmd) = next {
                match cmd {
                    Cmd::Datagram(data, recv_ms) => batch.extend(Record::decode(&data, recv_ms)),
                    Cmd::Flush(done) => flushes.push(done),
                    Cmd::Stop => stop = true,
                }
                if stop || batch.len() >= BATCH {
                    break;
                }
                next = rx.try_recv().ok();
            }
            self.commit(&batch);
            for done in flushes {
                let _ = done.send(());
            }
            if stop {
                break;
            }
            if self.pruned.elapsed() >= PRUNE_EVERY {
                self.prune();
            }
        }
        self.prune();
        // Fold the WAL into the database on a clean stop, so the directory holds one file.
        let _ = self.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
    }

    fn commit(&mut self, batch: &[Record]) {
        if batch.is_empty() {
            return;
        }
        let result = (|| -> rusqlite::Result<()> {
            let tx = self.conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT OR IGNORE INTO messages
                     (room, kind, sender, text, instance, seq, ts_ms, recv_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                for r in batch {
                    insert.execute(params![
                        r.room,
                        r.kind,
                        r.sender,
                        r.text,
                        r.id,
                        r.seq.map(to_sql),
                        r.ts_ms.map(to_sql),
                        to_sql(r.recv_ms),
                    ])?;
                }
            }
            tx.commit()
        })();
        if let Err(error) = result {
            self.failures += 1;
            tracing::error!(
                path = %self.path.display(),
                %error,
                records = batch.len(),
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
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        h.close(); // with a reader still alive: must not wait for it
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
        h.close();
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
}
