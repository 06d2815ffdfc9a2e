//! Retention in bounded steps: each room keeps at most its `count` newest messages and none
//! older than its `age`, and no transaction deletes more than a few chunks of rows.
//!
//! Why bounded: the count used to be applied only by a run every 30 s, in one `DELETE`. After
//! a burst (the benchmark's 120,000 messages a second for 15 s) that one statement deleted
//! about a million rows: seconds of the writer's time, a WAL of hundreds of MiB and the
//! kernel's writeback of it, which took the cores from the relay loop although the writer runs
//! under SCHED_IDLE (the relay's p99 at 10,000 msg/s was 3 ms with it and 0.5 ms with that run
//! left out, on a two-core machine). Now the count is kept at every commit: a room over its
//! count loses, in the same transaction, as many of its oldest rows as the commit added plus
//! at most [`CHUNK`] of an older excess (a lowered count, an old file). So a room never holds
//! more than its count and one commit, and the table stays as small as the policy says.
//!
//! The byte cap (`history_max_bytes`) is kept the same way: while the database's pages in use
//! are more than the cap, a commit deletes the oldest messages of any room, as many as it
//! added plus [`CHUNK`], so its size stays at the cap (the pages freed are reused).
//!
//! The age rule is applied the same way at every commit, to the rooms it touched. Both rules
//! in rooms that receive nothing (an old file, a lowered count) are left to the periodic
//! [`Rows::pass`], at most [`CHUNK`] rows per room and rule per pass; while something is left
//! the writer runs another pass after its next wait instead of in 30 s.

use std::collections::{HashMap, HashSet};

use rusqlite::{Connection, OptionalExtension as _, Transaction, params};

use super::by_time;
use super::space::{free_bytes, used_bytes};
use super::{Policy, Retention, to_sql};

/// Rows one rule deletes at most per room in one transaction, beyond what the commit added.
pub(super) const CHUNK: u64 = 1024;

/// Every room's row count, kept exact so that applying the count costs no scan.
#[derive(Debug, Default)]
pub(super) struct Rows {
    counts: HashMap<String, u64>,
    /// `counts` holds every room of the table (false until the first count succeeds).
    loaded: bool,
    /// A pass left rows that the rules delete: run the next one soon.
    backlog: bool,
}

/// What a transaction's retention did, for [`Rows::apply`] once it is committed.
#[derive(Debug, Default)]
pub(super) struct Update {
    /// Rooms' row counts after it.
    counts: Vec<(String, u64)>,
    /// Rows it deleted.
    deleted: u64,
    /// Whether it left rows that the rules delete.
    backlog: bool,
    /// A full pass: its `backlog` is the whole answer (a commit's only adds to it).
    replaces_backlog: bool,
}

/// What one commit inserted, for [`Rows::after_insert`].
#[derive(Debug, Default)]
pub(super) struct Added<'a> {
    /// Rows inserted per room.
    rows: HashMap<&'a str, u64>,
    /// Rooms where an insert skipped a duplicate: how many of its rows were new is not known
    /// per room, so these are counted again.
    unsure: HashSet<&'a str>,
    /// The rows tried for the unsure rooms (an upper bound of what they gained).
    attempted: HashMap<&'a str, u64>,
}

impl<'a> Added<'a> {
    /// One `INSERT OR IGNORE` of rows in `rooms` (one entry per row) changed `changed` rows.
    /// All new, or all of one room (a busy room's repeats): exact. Otherwise the rooms are
    /// counted again, and their rows count as gained for the bound on what this commit
    /// deletes.
    pub(super) fn statement(
        &mut self,
        rooms: impl IntoIterator<Item = &'a str> + Clone,
        changed: usize,
    ) {
        let attempted = rooms.clone().into_iter().count();
        let mut others = rooms.clone().into_iter();
        let first = others.next();
        if attempted == changed {
            for room in rooms {
                *self.rows.entry(room).or_default() += 1;
            }
        } else if let Some(room) = first.filter(|f| others.all(|r| r == *f)) {
            *self.rows.entry(room).or_default() += changed as u64;
        } else {
            for room in rooms {
                self.unsure.insert(room);
                *self.attempted.entry(room).or_default() += 1;
            }
        }
    }

    fn rooms(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.rows.keys().copied().chain(
            self.unsure
                .iter()
                .copied()
                .filter(|r| !self.rows.contains_key(r)),
        )
    }
}

fn count_room(tx: &Connection, room: &str) -> rusqlite::Result<u64> {
    tx.prepare_cached("SELECT count(*) FROM messages WHERE room = ?1")?
        .query_row([room], |r| r.get::<_, i64>(0))
        .map(|n| u64::try_from(n).unwrap_or(0))
}

/// Deletes the `n` oldest messages of `room`; returns how many went.
///
/// As a range up to the `n`th oldest id, found first, rather than `id IN (SELECT ... LIMIT
/// n)`: the subquery's ids go into a temporary b-tree before any row is deleted. A room at
/// its count deletes as many rows as it stores, and this cut the writer's CPU there by a
/// tenth (criterion `history/cpu/10k_per_s_at_count`: 2,785 ns a record, then 2,530).
fn delete_oldest(tx: &Transaction<'_>, room: &str, n: u64) -> rusqlite::Result<u64> {
    let Some(offset) = n.checked_sub(1) else {
        return Ok(0);
    };
    let last: Option<i64> = tx
        .prepare_cached(
            "SELECT id FROM messages INDEXED BY messages_by_room
             WHERE room = ?1 ORDER BY id LIMIT 1 OFFSET ?2",
        )?
        .query_row(params![room, to_sql(offset)], |r| r.get(0))
        .optional()?;
    let deleted = match last {
        Some(last) => tx
            .prepare_cached(
                "DELETE FROM messages INDEXED BY messages_by_room WHERE room = ?1 AND id <= ?2",
            )?
            .execute(params![room, last])?,
        // Fewer than `n`: all of them.
        None => tx
            .prepare_cached("DELETE FROM messages INDEXED BY messages_by_room WHERE room = ?1")?
            .execute(params![room])?,
    };
    Ok(deleted as u64)
}

/// Deletes at most `n` messages of `room` received before `oldest_ms`, oldest first; returns
/// how many went. The rows before the boundary that `by_time` finds are those; at most `n`
/// of them, up to the `n`th.
fn delete_older(tx: &Transaction<'_>, room: &str, oldest_ms: u64, n: u64) -> rusqlite::Result<u64> {
    let oldest = to_sql(oldest_ms);
    let end = by_time::first_at_or_after(tx, room, oldest, 0, i64::MAX - 1)?;
    let Some(offset) = n.checked_sub(1).filter(|_| end > 0) else {
        return Ok(0);
    };
    let last: i64 = tx
        .prepare_cached(
            "SELECT id FROM messages INDEXED BY messages_by_room
             WHERE room = ?1 AND id < ?2 ORDER BY id LIMIT 1 OFFSET ?3",
        )?
        .query_row(params![room, end, to_sql(offset)], |r| r.get(0))
        .optional()?
        .unwrap_or(end - 1);
    // The time too: after a clock step, a newer row may lie below the boundary.
    let deleted = tx
        .prepare_cached(
            "DELETE FROM messages INDEXED BY messages_by_room
             WHERE room = ?1 AND id <= ?2 AND recv_ms < ?3",
        )?
        .execute(params![room, last, oldest])?;
    Ok(deleted as u64)
}

/// Deletes at most `n` of the oldest messages over all rooms; returns how many each room lost.
fn delete_oldest_anywhere(tx: &Transaction<'_>, n: u64) -> rusqlite::Result<HashMap<String, u64>> {
    let mut stmt = tx.prepare_cached(
        "DELETE FROM messages WHERE id IN (SELECT id FROM messages ORDER BY id LIMIT ?1)
         RETURNING room",
    )?;
    let mut rows = stmt.query([to_sql(n)])?;
    let mut lost = HashMap::new();
    while let Some(row) = rows.next()? {
        *lost.entry(row.get::<_, String>(0)?).or_default() += 1;
    }
    Ok(lost)
}

impl Rows {
    /// While the database uses more than `max_bytes`, deletes the oldest messages of any room,
    /// at most `n`, into `update` (whose counts are those after the room rules).
    fn trim_bytes(
        &self,
        tx: &Transaction<'_>,
        max_bytes: u64,
        n: u64,
        update: &mut Update,
    ) -> rusqlite::Result<()> {
        if used_bytes(tx)? <= max_bytes {
            return Ok(());
        }
        let lost = delete_oldest_anywhere(tx, n)?;
        let deleted: u64 = lost.values().sum();
        update.deleted += deleted;
        // Still over after a full step: more next time.
        update.backlog |= deleted == n && used_bytes(tx)? > max_bytes;
        for (room, gone) in lost {
            match update.counts.iter_mut().find(|(r, _)| *r == room) {
                Some((_, count)) => *count = count.saturating_sub(gone),
                None => {
                    let count = self.counts.get(&room).copied().unwrap_or(0);
                    update.counts.push((room, count.saturating_sub(gone)));
                }
            }
        }
        Ok(())
    }

    /// Counts every room's rows (one scan of an index), unless that is done. Call it outside
    /// a transaction that inserts, so the counts do not include its rows twice.
    pub(super) fn load(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        if self.loaded {
            return Ok(());
        }
        let mut stmt = conn.prepare_cached("SELECT room, count(*) FROM messages GROUP BY room")?;
        let counts = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                ))
            })?
            .collect::<Result<_, _>>()?;
        self.counts = counts;
        self.loaded = true;
        Ok(())
    }

    /// Whether a pass left work for the next one.
    pub(super) fn backlog(&self) -> bool {
        self.backlog
    }

    /// After a commit's inserts, in its transaction: counts what was added and deletes each
    /// touched room's rows past their age and beyond its count, each rule at most the rows
    /// the room gained plus [`CHUNK`]. The counts change only when the caller
    /// [`apply`](Self::apply)s the result after the commit succeeded, so a failed commit (a
    /// full disk) leaves them true and costs no recount. [`load`](Self::load) must have run.
    pub(super) fn after_insert(
        &self,
        tx: &Transaction<'_>,
        added: &Added<'_>,
        policy: &Policy,
        now_ms: u64,
    ) -> rusqlite::Result<Update> {
        let mut update = Update::default();
        for room in added.rooms() {
            let gained = added.rows.get(room).copied().unwrap_or(0)
                + added.attempted.get(room).copied().unwrap_or(0);
            let mut count = match self.counts.get(room) {
                Some(c) if !added.unsure.contains(room) => c + gained,
                _ => count_room(tx, room)?,
            };
            let Retention { count: keep, age } = policy.for_room(room);
            let oldest = now_ms.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
            let aged = delete_older(tx, room, oldest, gained + CHUNK)?;
            count -= aged.min(count);
            update.deleted += aged;
            update.backlog |= aged == gained + CHUNK;
            if count > keep {
                let gone = delete_oldest(tx, room, (count - keep).min(gained + CHUNK))?;
                count -= gone.min(count);
                update.deleted += gone;
                update.backlog |= count > keep;
            }
            update.counts.push((room.to_owned(), count));
        }
        let gained: u64 = added.rows.values().chain(added.attempted.values()).sum();
        self.trim_bytes(tx, policy.max_bytes, gained + CHUNK, &mut update)?;
        Ok(update)
    }

    /// One pass over every room: the age rule, then the count, each at most [`CHUNK`] rows per
    /// room. As [`after_insert`](Self::after_insert), the result is applied after the commit;
    /// then [`backlog`](Self::backlog) says whether any rule left rows to delete.
    /// [`load`](Self::load) must have run.
    pub(super) fn pass(
        &self,
        tx: &Transaction<'_>,
        policy: &Policy,
        now_ms: u64,
    ) -> rusqlite::Result<Update> {
        let mut update = Update {
            replaces_backlog: true,
            ..Update::default()
        };
        for (room, &count) in &self.counts {
            let Retention { count: keep, age } = policy.for_room(room);
            let oldest = now_ms.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
            let aged = delete_older(tx, room, oldest, CHUNK)?;
            let over = count.saturating_sub(aged).saturating_sub(keep);
            let asked = over.min(CHUNK);
            let trimmed = if over > 0 {
                delete_oldest(tx, room, asked)?
            } else {
                0
            };
            let count = if trimmed < asked {
                // Fewer rows than counted (the file was changed behind the writer's back):
                // count again rather than ask for a backlog that is not there.
                count_room(tx, room)?
            } else {
                count.saturating_sub(aged + trimmed)
            };
            update.deleted += aged + trimmed;
            update.backlog |= aged == CHUNK || count > keep;
            update.counts.push((room.clone(), count));
        }
        self.trim_bytes(tx, policy.max_bytes, CHUNK, &mut update)?;
        Ok(update)
    }

    /// On a full disk, with the reserve given up: deletes the oldest messages of any room
    /// until `free` bytes of pages are free for the next inserts, counting those free
    /// already (so a disk that stays full does not cost more messages at each failure), or
    /// none are left; in steps of [`CHUNK`] / 4 (applied after the commit like the rest).
    pub(super) fn emergency(&self, tx: &Transaction<'_>, free: u64) -> rusqlite::Result<Update> {
        let mut update = Update::default();
        let wanted = free.saturating_sub(free_bytes(tx)?);
        let target = used_bytes(tx)?.saturating_sub(wanted);
        loop {
            let before = update.deleted;
            self.trim_bytes(tx, target, CHUNK / 4, &mut update)?;
            if update.deleted == before {
                break;
            }
        }
        update.backlog = false;
        Ok(update)
    }

    /// Takes in what a committed transaction did.
    pub(super) fn apply(&mut self, update: Update) -> u64 {
        for (room, count) in update.counts {
            if count == 0 {
                self.counts.remove(&room);
            } else {
                self.counts.insert(room, count);
            }
        }
        if update.replaces_backlog {
            self.backlog = update.backlog;
        } else {
            self.backlog |= update.backlog;
        }
        update.deleted
    }

    #[cfg(test)]
    pub(super) fn count(&self, room: &str) -> Option<u64> {
        self.counts.get(room).copied()
    }
}
