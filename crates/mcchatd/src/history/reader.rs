//! Queries: each reads on its own connection, after the writer has flushed what the relay
//! loop handed over before it.

use super::*;

/// Reads history on its own connection, after the writer has flushed.
#[derive(Debug, Clone)]
pub struct Reader {
    pub(super) path: PathBuf,
    pub(super) shared: Arc<Shared>,
}

/// Messages in one page of an answer. At most two pages of an answer are in memory at once
/// (one being written, one read ahead), whatever its length.
pub const PAGE: usize = 256;

/// The pages of one answer, oldest first, as the reading thread produces them.
pub type Pages = tokio::sync::mpsc::Receiver<Result<Vec<Record>, HistoryError>>;

impl Reader {
    /// The messages `q` asks for, oldest first, all at once (for short answers and tests).
    pub async fn query(&self, q: Query) -> Result<Vec<Record>, HistoryError> {
        let mut pages = self.pages(q).await?;
        let mut out = Vec::new();
        while let Some(page) = pages.recv().await {
            out.extend(page?);
        }
        Ok(out)
    }

    /// The messages `q` asks for, oldest first, in pages of at most [`PAGE`], read on a
    /// blocking thread only as fast as they are taken: an answer of any length to a slow
    /// client holds two pages of memory, and no database snapshot (each page is a read of
    /// its own, bounded by the newest message when the query began).
    pub async fn pages(&self, q: Query) -> Result<Pages, HistoryError> {
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
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = read(&path, &q, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok(rx)
    }
}

/// Reads the answer to `q` page by page into `tx`, until it is done or `tx`'s receiver is
/// gone.
fn read(
    path: &Path,
    q: &Query,
    tx: &tokio::sync::mpsc::Sender<Result<Vec<Record>, HistoryError>>,
) -> Result<(), HistoryError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err(path))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(db_err(path))?;
    let limit = q.max_messages();
    // `since` becomes a lower bound on the row id: where the room's messages go from
    // received before it to at or after it (by_time.rs). Rows are numbered in the order
    // received, so the scans below stay on the (room, id) index and read only what they
    // return (plus what `grep` skips), however large the room.
    let after = q.after.map_or(0, |a| to_sql(a.saturating_add(1)));
    let first_id: i64 = match q.since_ms {
        None => after,
        Some(since) => {
            by_time::first_at_or_after(&conn, &q.room, to_sql(since), after, i64::MAX - 1)
                .map_err(db_err(path))?
        }
    };
    let before = q.before.map_or(i64::MAX, |b| to_sql(b).saturating_sub(1));
    let since = to_sql(q.since_ms.unwrap_or(0));
    // The newest `limit` matching: from the id of the limit-th newest (or the first) to the
    // newest now, so messages stored while the answer is written are not in it.
    let (start, end): (i64, i64) = conn
        .query_row(
            "SELECT
               coalesce((SELECT id FROM messages INDEXED BY messages_by_room
                 WHERE room = ?1 AND id >= ?2 AND id <= ?6 AND recv_ms >= ?4
                   AND (?3 IS NULL OR instr(lower(text), lower(?3)) > 0)
                 ORDER BY id DESC LIMIT 1 OFFSET ?5), ?2),
               coalesce((SELECT max(id) FROM messages WHERE room = ?1 AND id <= ?6), -1)",
            params![
                q.room,
                first_id,
                q.grep,
                since,
                i64::from(limit) - 1,
                before
            ],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(db_err(path))?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, room, kind, sender, text, instance, seq, ts_ms, recv_ms
             FROM messages INDEXED BY messages_by_room
             WHERE room = ?1 AND id >= ?2 AND id <= ?3 AND recv_ms >= ?5
               AND (?4 IS NULL OR instr(lower(text), lower(?4)) > 0)
             ORDER BY id LIMIT ?6",
        )
        .map_err(db_err(path))?;
    let (mut cursor, mut left) = (start, u64::from(limit));
    while left > 0 {
        let size = (PAGE as u64).min(left);
        let mut last = cursor;
        let page = stmt
            .query_map(
                params![q.room, cursor, end, q.grep, since, to_sql(size)],
                |r| {
                    last = r.get(0)?;
                    Ok(Record {
                        room: r.get(1)?,
                        kind: r.get(2)?,
                        sender: r.get(3)?,
                        text: r.get(4)?,
                        id: r.get(5)?,
                        seq: r.get::<_, Option<i64>>(6)?.map(seq_from_sql),
                        ts_ms: r.get::<_, Option<i64>>(7)?.map(from_sql),
                        recv_ms: from_sql(r.get(8)?),
                        offset: Some(from_sql(last)),
                    })
                },
            )
            .map_err(db_err(path))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db_err(path))?;
        let n = page.len() as u64;
        if n > 0 && tx.blocking_send(Ok(page)).is_err() {
            // The client went away.
            return Ok(());
        }
        if n < size {
            return Ok(());
        }
        left -= n;
        cursor = last + 1;
    }
    Ok(())
}
