//! The writer thread: takes what is queued, decodes it into rows and commits them; retention.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mcchat_core::ratelimit::LogLimiter;
use mcchat_core::wire::{self, Kind};
use rusqlite::{Connection, Transaction};
use tokio::sync::oneshot;

use super::priority::Priority;
use super::retention::{Added, Rows};
use super::space::{self, Space};
use super::*;

/// Marks the writer's end, however it ends (a panic too): pending queries fail rather than
/// wait, and [`History::close`] stops waiting.
pub(super) struct Ended<'a> {
    pub(super) shared: &'a Shared,
    /// Dropped after `drop` below has run: its disconnection tells `close`.
    pub(super) _signal: mpsc::Sender<()>,
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
/// Inserts `rows` with the statement `sql` (made for that many) and notes in `added` what
/// changed.
fn insert<'a>(
    tx: &Transaction<'_>,
    sql: &str,
    rows: &[Row<'a>],
    added: &mut Added<'a>,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(sql)?;
    for (n, row) in rows.iter().enumerate() {
        row.bind(&mut stmt, n)?;
    }
    let changed = stmt.raw_execute()?;
    added.statement(rows.iter().map(|r| r.room), changed);
    Ok(())
}

/// One message, decoded from its datagram and borrowing from it, ready to bind.
struct Row<'a> {
    /// The row id the hub gave it; `None` lets SQLite choose (tests, older callers).
    id: Option<i64>,
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
    fn decode(data: &'a [u8], recv_ms: u64, id: Option<u64>) -> Option<Self> {
        let frame = wire::decode(data).ok()?;
        if !matches!(frame.meta.kind, Kind::Message | Kind::Action) {
            return None;
        }
        Some(Self {
            id: id.map(to_sql),
            room: frame.room,
            kind: frame.meta.kind.name(),
            sender: frame.sender,
            text: frame.text,
            instance: frame.meta.instance.map(|i| hex16(i.0)),
            seq: frame.meta.seq.map(seq_to_sql),
            ts_ms: frame.meta.ts_ms.map(to_sql),
            recv_ms: to_sql(recv_ms),
        })
    }

    /// Binds this row as the `n`th (from 0) of a multi-row INSERT.
    fn bind(&self, stmt: &mut rusqlite::Statement<'_>, n: usize) -> rusqlite::Result<()> {
        let at = n * COLUMNS;
        stmt.raw_bind_parameter(at + 1, self.id)?;
        stmt.raw_bind_parameter(at + 2, self.room)?;
        stmt.raw_bind_parameter(at + 3, self.kind)?;
        stmt.raw_bind_parameter(at + 4, self.sender)?;
        stmt.raw_bind_parameter(at + 5, self.text)?;
        let instance = self
            .instance
            .as_ref()
            .and_then(|h| std::str::from_utf8(h).ok());
        stmt.raw_bind_parameter(at + 6, instance)?;
        stmt.raw_bind_parameter(at + 7, self.seq)?;
        stmt.raw_bind_parameter(at + 8, self.ts_ms)?;
        stmt.raw_bind_parameter(at + 9, self.recv_ms)
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
         (id, room, kind, sender, text, instance, seq, ts_ms, recv_ms) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?,?,?,?,?)");
    }
    sql
}

pub(super) struct Writer {
    conn: Connection,
    path: PathBuf,
    policy: Arc<Mutex<Policy>>,
    pruned: Instant,
    /// Row counts per room, for retention at every commit.
    rows: Rows,
    /// Rows retention passes deleted since the last log line about it.
    pruned_rows: u64,
    failures: u64,
    /// Records lost to failed commits since the last error line.
    lost: u64,
    /// Write errors are logged at most once a minute (each line says how many it stands for).
    error_log: LogLimiter,
    /// The statements for [`ROWS`] rows, in that order.
    inserts: Vec<String>,
    /// Giving freed pages back, and the reserve for a full disk.
    space: Space,
    /// Its CPU priority, raised while it is behind (priority.rs).
    priority: Priority,
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        path: PathBuf,
        policy: Arc<Mutex<Policy>>,
        priority: Priority,
    ) -> Self {
        Self {
            priority,
            conn,
            policy,
            pruned: Instant::now(),
            rows: Rows::default(),
            pruned_rows: 0,
            failures: 0,
            lost: 0,
            error_log: LogLimiter::new(1, Duration::from_secs(60)),
            inserts: ROWS.iter().map(|&n| insert_sql(n)).collect(),
            space: Space::new(&path),
            path,
        }
    }

    pub(super) fn run(mut self, shared: &Shared) {
        self.space.prepare(&self.conn, &self.path);
        self.prune();
        let mut taken = Batch::new();
        let mut flushes = Vec::new();
        let stop = loop {
            let stop = self.wait(shared, &mut taken, &mut flushes);
            // Waited for: by a query or a stop, or by records that have waited too long.
            let late = taken
                .first_received_ms()
                .is_some_and(|t| now_ms().saturating_sub(t) >= LATE_MS);
            self.priority
                .took(taken.len(), !flushes.is_empty() || stop.is_some() || late);
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
            if self.busy() || self.pruned.elapsed() >= PRUNE_EVERY {
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
            let prune_at = if self.busy() {
                self.pruned
            } else {
                self.pruned + PRUNE_EVERY
            };
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

    /// Commits `taken` in transactions of up to [`BATCH`] records and the budget's bytes
    /// (space.rs says why); returns false if a stop's
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
            let end = taken.end_of(start, BATCH, self.space.budget().transaction_bytes);
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
        let policy = self.policy();
        let result = (|| -> rusqlite::Result<()> {
            self.rows.load(&self.conn)?;
            let tx = self.conn.transaction()?;
            let mut rows = Vec::with_capacity(ROWS[0]);
            let mut added = Added::default();
            for i in range {
                let (data, recv_ms, id) = batch.get(i);
                rows.extend(Row::decode(data, recv_ms, id));
                if rows.len() == ROWS[0] {
                    insert(&tx, &inserts[0], &rows, &mut added)?;
                    rows.clear();
                }
            }
            let mut rest = &rows[..];
            for (&n, sql) in ROWS.iter().zip(inserts).skip(1) {
                while rest.len() >= n {
                    insert(&tx, sql, &rest[..n], &mut added)?;
                    rest = &rest[n..];
                }
            }
            let update = self.rows.after_insert(&tx, &added, &policy, now_ms())?;
            tx.commit()?;
            self.rows.apply(update);
            Ok(())
        })();
        match result {
            Ok(()) => {
                if let Some(cap) = self.space.after_commit(&self.conn) {
                    tracing::warn!(
                        path = %self.path.display(),
                        cap,
                        headroom = self.space.budget().reserve,
                        "the disk is nearly full: history holds at this size, deleting its oldest messages for new ones"
                    );
                }
            }
            Err(error) => {
                self.failures += 1;
                self.lost += records as u64;
                if space::is_full(&error) {
                    self.free_on_full_disk();
                }
                // A full disk fails every commit: one line a minute, with what it cost since.
                if let Some(suppressed) = self.error_log.check(Instant::now()) {
                    tracing::error!(
                        path = %self.path.display(),
                        %error,
                        records = self.lost,
                        failures = self.failures,
                        suppressed,
                        "cannot write history; these messages are not stored"
                    );
                    self.lost = 0;
                }
            }
        }
    }

    /// The retention rules now (copied: a reload must not wait for a commit), with the byte
    /// cap lowered while the disk is full.
    fn policy(&self) -> Policy {
        let mut policy = self
            .policy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        policy.max_bytes = self.space.cap(policy.max_bytes);
        policy
    }

    /// A retention pass or space given back is due soon rather than in [`PRUNE_EVERY`].
    fn busy(&self) -> bool {
        self.rows.backlog() || self.space.busy()
    }

    /// A write failed for want of space: the reserve goes, the oldest messages with it, and
    /// the database is held at its size (space.rs says why). The relay is not affected: it
    /// only ever queues.
    fn free_on_full_disk(&mut self) {
        let freed = self.space.on_full(&self.conn);
        let result = (|| -> rusqlite::Result<u64> {
            self.rows.load(&self.conn)?;
            let tx = self.conn.transaction()?;
            // Room for a transaction's pages (an eighth of the reserve in records, about
            // twice that with the indexes), and as much again.
            let update = self.rows.emergency(&tx, self.space.budget().reserve / 2)?;
            tx.commit()?;
            Ok(self.rows.apply(update))
        })();
        match result {
            Ok(deleted) => {
                let was_full = self.space.full();
                self.space.hold(&self.conn);
                if !was_full {
                    tracing::warn!(
                        path = %self.path.display(),
                        deleted,
                        reserve = freed.reserve,
                        wal = freed.wal,
                        cap = self.space.cap(u64::MAX),
                        "the disk is full: history deleted its oldest messages and holds at this size"
                    );
                }
            }
            Err(error) => {
                if let Some(suppressed) = self.error_log.check(Instant::now()) {
                    tracing::error!(
                        path = %self.path.display(),
                        %error,
                        reserve = freed.reserve,
                        wal = freed.wal,
                        suppressed,
                        "the disk is full and history cannot free space"
                    );
                }
            }
        }
    }

    /// One retention pass (by age, then by count; bounded, see `retention`).
    fn prune(&mut self) {
        self.pruned = Instant::now();
        let policy = self.policy();
        let result = (|| -> rusqlite::Result<u64> {
            self.rows.load(&self.conn)?;
            let tx = self.conn.transaction()?;
            let update = self.rows.pass(&tx, &policy, now_ms())?;
            tx.commit()?;
            let deleted = self.rows.apply(update);
            let given_back = self.space.after_pass(&self.conn)?;
            if given_back > 0 {
                tracing::debug!(
                    bytes = given_back,
                    "history gave freed space back to the disk"
                );
            }
            Ok(deleted)
        })();
        match result {
            Ok(deleted) => {
                self.pruned_rows += deleted;
                // One line when a pass, or a run of passes working off a backlog, is done.
                if self.pruned_rows > 0 && !self.rows.backlog() {
                    tracing::info!(deleted = self.pruned_rows, "history retention applied");
                    self.pruned_rows = 0;
                }
            }
            Err(error) => {
                if space::is_full(&error) {
                    self.free_on_full_disk();
                }
                if let Some(suppressed) = self.error_log.check(Instant::now()) {
                    tracing::warn!(path = %self.path.display(), %error, suppressed, "history retention failed");
                }
            }
        }
    }
}
