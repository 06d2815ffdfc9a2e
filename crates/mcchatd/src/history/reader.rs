//! Queries: each reads on its own connection, after the writer has flushed what the relay
//! loop handed over before it.

use super::*;

/// Reads history on its own connection, after the writer has flushed.
#[derive(Debug, Clone)]
pub struct Reader {
    pub(super) path: PathBuf,
    pub(super) shared: Arc<Shared>,
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
                    seq: r.get::<_, Option<i64>>(5)?.map(seq_from_sql),
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
