//! Finding a room's rows by the time they were received, without an index on that time.
//!
//! Why no index: a third index, `(room, recv_ms)`, kept on every insert and every delete, cost
//! the writer an eighth of its CPU per message (criterion `history/cpu/burst`: 1,550 ns a
//! record with it, 1,344 without; `10k_per_s_at_count`, where each message stored deletes
//! one: 2,530 and 2,311). Rows are numbered in the order the daemon received them (the hub numbers each
//! record as it hands it over), so `recv_ms` rises with `id` as long as the wall clock does,
//! and the first row received at or after a time is found by bisecting the ids on the
//! `(room, id)` index: at most 64 seeks, one when the room's oldest row is already recent
//! enough (the usual case for the age rule at each commit).
//!
//! After the wall clock has stepped back, the order holds only piecewise and a bisection finds
//! *a* boundary, not the only one. Callers filter on `recv_ms` as well, so no row on the wrong
//! side of the time is ever returned or deleted; rows received around the step may be kept
//! longer by the age rule (the count still bounds them) or left out of a `since` query.

use rusqlite::{Connection, OptionalExtension as _, params};

/// Where, in id order within `from..=to`, the rows of `room` go from received before `ms` to
/// received at or after it: an id with such a row (or none) below it and such a row (or none)
/// at or after it. If every row is recent enough, `from`; if none is, one past the last row.
pub(super) fn first_at_or_after(
    conn: &Connection,
    room: &str,
    ms: i64,
    from: i64,
    to: i64,
) -> rusqlite::Result<i64> {
    let mut probe = conn.prepare_cached(
        "SELECT id, recv_ms FROM messages INDEXED BY messages_by_room
         WHERE room = ?1 AND id >= ?2 AND id <= ?3 ORDER BY id LIMIT 1",
    )?;
    // Rows below `lo` were received before `ms`; rows from `hi` on at or after it (`hi` past
    // `to` means none is known to be).
    let (mut lo, mut hi) = (from, to.saturating_add(1));
    // The first probe is the oldest row: recent enough, and there is nothing to bisect.
    let mut mid = lo;
    while lo < hi {
        let row: Option<(i64, i64)> = probe
            .query_row(params![room, mid, hi - 1], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        match row {
            None => hi = mid,
            Some((id, recv_ms)) if recv_ms >= ms => hi = id,
            Some((id, _)) => lo = id + 1,
        }
        mid = lo + (hi - lo) / 2;
    }
    Ok(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table with the schema's columns that matter here: rows of `room` with these ids and
    /// receive times.
    fn table(rows: &[(&str, i64, i64)]) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY, room TEXT NOT NULL,
                                    recv_ms INTEGER NOT NULL);
             CREATE INDEX messages_by_room ON messages (room, id);",
        )
        .unwrap();
        for (room, id, ms) in rows {
            conn.execute(
                "INSERT INTO messages (id, room, recv_ms) VALUES (?1, ?2, ?3)",
                params![id, room, ms],
            )
            .unwrap();
        }
        conn
    }

    #[test]
    fn finds_the_first_row_at_or_after_a_time_among_gaps_and_other_rooms() {
        // room1 at ids 10, 20, ..., 200 received at 1,000, 2,000, ...; room2 in between.
        let mut rows: Vec<(&str, i64, i64)> =
            (1..=20).map(|i| ("room1", i * 10, i * 1000)).collect();
        rows.extend((1..=20).map(|i| ("room2", i * 10 + 5, 50)));
        let conn = table(&rows);
        let find = |ms| first_at_or_after(&conn, "room1", ms, 0, i64::MAX - 1).unwrap();
        assert_eq!(find(0), 0, "all recent enough: from the start");
        assert_eq!(find(1000), 0);
        assert_eq!(find(1001), 11, "after id 10, the first row at 2,000 is 20");
        assert_eq!(find(7000), 61);
        assert_eq!(find(7500), 71);
        assert_eq!(find(20_000), 191);
        assert_eq!(find(20_001), 201, "none: past the last row");
        assert_eq!(
            first_at_or_after(&conn, "room3", 0, 0, i64::MAX - 1).unwrap(),
            0,
            "an empty room"
        );
        // Within bounds.
        assert_eq!(
            first_at_or_after(&conn, "room1", 7000, 100, 150).unwrap(),
            100
        );
        assert_eq!(first_at_or_after(&conn, "room1", 7000, 0, 40).unwrap(), 41);
    }

    #[test]
    fn after_the_clock_stepped_back_the_boundary_found_still_has_older_below_and_newer_above() {
        // Received at 1..=50 s, then the clock stepped back to 10 s and went on to 40 s.
        let mut rows: Vec<(&str, i64, i64)> = (1..=50).map(|i| ("r", i, i * 1000)).collect();
        rows.extend((1..=30).map(|i| ("r", 50 + i, (9 + i) * 1000)));
        let conn = table(&rows);
        for ms in [0, 5_000, 20_000, 45_000, 60_000] {
            let at = first_at_or_after(&conn, "r", ms, 0, i64::MAX - 1).unwrap();
            let row = |sql: &str| -> Option<i64> {
                conn.query_row(sql, [at], |r| r.get(0)).optional().unwrap()
            };
            let below = row("SELECT recv_ms FROM messages WHERE id < ?1 ORDER BY id DESC LIMIT 1");
            let above = row("SELECT recv_ms FROM messages WHERE id >= ?1 ORDER BY id LIMIT 1");
            assert!(
                below.is_none_or(|t| t < ms),
                "at {ms}: boundary {at}, below {below:?}"
            );
            assert!(
                above.is_none_or(|t| t >= ms),
                "at {ms}: boundary {at}, above {above:?}"
            );
        }
    }
}
