//! Disk space, the byte cap's companion: pages that retention frees are given back to the
//! file system in steps (incremental vacuum), history never fills its disk itself, and a
//! reserve file keeps room for retention on a disk that something else fills.
//!
//! Why a reserve: with the disk full, SQLite cannot even delete (a delete writes pages to the
//! WAL first), and a checkpoint must first copy the WAL's new pages into the database, which
//! grows it. So history would never free itself and every commit would fail. The writer
//! keeps a reserve file next to the database (an eighth of the file system, between
//! [`RESERVE_MIN`] and [`RESERVE_MAX`]), and keeps what the WAL can hold below three quarters
//! of it: SQLite's automatic checkpoint comes at half the reserve (4 MiB at most, about
//! SQLite's default), and one transaction takes at most an eighth of it in records (its
//! pages, with the indexes, about twice that). When a commit fails for want of space, the writer deletes the reserve, checkpoints
//! and cuts the WAL back to nothing (room that the reserve covers), deletes the oldest
//! messages, and from then on holds the database at the size it has then (the pages it freed
//! are reused by the next commits, so it needs no more of the disk).
//!
//! That is the last resort. Before it, the writer looks at the free space after each commit,
//! and once less than twice the reserve is free besides it holds the database at its size:
//! history does not fill the disk itself. (After a hold the files still grow by about a
//! reserve: one transaction's pages before its deletes free as many, and the
//! WAL up to its checkpoint.) Either hold is lifted, and `history_max_bytes` applies again,
//! once the reserve is there and three times its size is free besides.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

/// The reserve at most (a file system of 64 MiB or more).
pub(super) const RESERVE_MAX: u64 = 8 << 20;
/// The reserve at least (a file system under 8 MiB).
pub(super) const RESERVE_MIN: u64 = 1 << 20;
/// SQLite's default page size, taken until the database's own is read.
const PAGE: u64 = 4096;

/// What history plans for on its file system (the module documentation says why).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Budget {
    /// The reserve file's size, and the free space history leaves besides.
    pub(super) reserve: u64,
    /// WAL pages at which SQLite checkpoints.
    pub(super) checkpoint_pages: u64,
    /// Record bytes per transaction at most.
    pub(super) transaction_bytes: usize,
}

impl Budget {
    /// The budget on a file system of `total` bytes, for a database of `page`-byte pages.
    pub(super) fn for_disk(total: u64, page: u64) -> Self {
        let reserve = (total / 8).clamp(RESERVE_MIN, RESERVE_MAX);
        Self {
            reserve,
            checkpoint_pages: (reserve / 2 / page.max(512)).max(16),
            transaction_bytes: usize::try_from(reserve / 8).unwrap_or(usize::MAX),
        }
    }
}

/// Free pages the database may hold before some are given back to the file system: below it
/// they are simply reused by the next inserts.
const VACUUM_AT: u64 = 1024;
/// Pages given back at most per retention pass (16 MiB at 4 KiB pages), and at most the
/// budget's checkpoint pages (`after_pass`).
const VACUUM_STEP: u64 = 4096;

/// See the module documentation.
#[derive(Debug)]
pub(super) struct Space {
    reserve: PathBuf,
    /// The database's WAL file, cut back when the disk is full.
    wal: PathBuf,
    budget: Budget,
    /// While the disk is full or nearly: the bytes in use then, held instead of the
    /// configured cap (when lower).
    full_cap: Option<u64>,
    /// Free pages were left after the last step of giving them back.
    vacuum_left: bool,
}

fn pragma(conn: &Connection, name: &str) -> rusqlite::Result<u64> {
    conn.pragma_query_value(None, name, |r| r.get::<_, i64>(0))
        .map(|v| u64::try_from(v).unwrap_or(0))
}

/// Bytes the database's pages in use take (its pages less the free ones): what the byte cap
/// is measured against. Within a transaction, as of its changes so far.
pub(super) fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let (pages, free, size) = (
        pragma(conn, "page_count")?,
        pragma(conn, "freelist_count")?,
        pragma(conn, "page_size")?,
    );
    Ok(pages.saturating_sub(free).saturating_mul(size))
}

/// Bytes the database's free pages take: room for inserts without growing the file.
pub(super) fn free_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    Ok(pragma(conn, "freelist_count")?.saturating_mul(pragma(conn, "page_size")?))
}

/// Whether `e` says the disk (or the file system's quota) is full.
pub(super) fn is_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// Bytes free for an unprivileged writer on the file system holding `dir`, and the file
/// system's size.
#[allow(
    clippy::useless_conversion,
    reason = "fsblkcnt_t and c_ulong are narrower than u64 on some targets"
)]
fn available(dir: &Path) -> Option<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    let frag = u64::from(s.fragment_size());
    Some((
        u64::from(s.blocks_available()).saturating_mul(frag),
        u64::from(s.blocks()).saturating_mul(frag),
    ))
}

/// What [`Space::on_full`] gave to retention.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Freed {
    /// The reserve file's bytes (0 if there was none).
    pub(super) reserve: u64,
    /// The WAL's bytes, if it could be cut back (no reader held it).
    pub(super) wal: Option<u64>,
}

impl Space {
    /// The space of the database at `db`.
    pub(super) fn new(db: &Path) -> Self {
        let beside = |suffix: &str| {
            let mut p = db.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        };
        Self {
            reserve: beside(".reserve"),
            wal: beside("-wal"),
            budget: Budget::for_disk(u64::MAX, PAGE),
            full_cap: None,
            vacuum_left: false,
        }
    }

    /// At the writer's start: a database made before incremental vacuum is converted (one
    /// `VACUUM`, once; the relay runs meanwhile, and messages that do not fit in the queue
    /// are counted as dropped), the budget is set from the file system's size (and the
    /// WAL's checkpoint with it), and the reserve is made if the disk has room for it.
    pub(super) fn prepare(&mut self, conn: &Connection, path: &Path) {
        match pragma(conn, "auto_vacuum") {
            Ok(2) => {}
            Ok(_) => {
                let started = std::time::Instant::now();
                let converted = conn
                    .pragma_update(None, "auto_vacuum", "INCREMENTAL")
                    .and_then(|()| conn.execute_batch("VACUUM"));
                match converted {
                    Ok(()) => tracing::info!(
                        path = %path.display(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "history converted to give freed space back to the disk"
                    ),
                    Err(error) => tracing::warn!(
                        path = %path.display(),
                        %error,
                        "cannot convert history to incremental vacuum; freed space stays in the file"
                    ),
                }
            }
            Err(error) => tracing::warn!(path = %path.display(), %error, "cannot read auto_vacuum"),
        }
        if let Some((_, total)) = available(self.dir()) {
            let page = pragma(conn, "page_size").unwrap_or(PAGE);
            self.budget = Budget::for_disk(total, page);
        }
        let pages = i64::try_from(self.budget.checkpoint_pages).unwrap_or(1000);
        let limit = i64::try_from(self.budget.reserve).unwrap_or(8 << 20);
        // The WAL is cut back to the reserve after a checkpoint, so that one that grew while
        // readers held it off does not stay larger than the reserve can pay for.
        let set = conn
            .pragma_update(None, "wal_autocheckpoint", pages)
            .and_then(|()| conn.pragma_update(None, "journal_size_limit", limit));
        if let Err(error) = set {
            tracing::warn!(path = %path.display(), %error, "cannot set the WAL's checkpoint and limit");
        }
        self.make_reserve();
    }

    /// What history plans for on its disk (after [`Space::prepare`]).
    pub(super) fn budget(&self) -> Budget {
        self.budget
    }

    /// Makes the reserve file if it is missing and the disk has room for it (and as much
    /// again); returns whether it is there.
    fn make_reserve(&mut self) -> bool {
        if self.reserve.exists() {
            return true;
        }
        let bytes = self.budget.reserve;
        if available(self.dir()).is_none_or(|(free, _)| free < 2 * bytes) {
            return false;
        }
        let made = (|| -> std::io::Result<()> {
            let f = std::fs::File::create(&self.reserve)?;
            // Allocated, not sized: a sparse file would reserve nothing. (posix_fallocate
            // writes zeros itself where the file system cannot allocate.)
            let len = i64::try_from(bytes).unwrap_or(i64::MAX);
            nix::fcntl::posix_fallocate(&f, 0, len).map_err(std::io::Error::from)
        })();
        if let Err(error) = made {
            let _ = std::fs::remove_file(&self.reserve);
            tracing::debug!(path = %self.reserve.display(), %error, "cannot make the history reserve");
            return false;
        }
        true
    }

    /// After each commit: holds the database at its size once less than two reserves are
    /// free. Returns the bytes held at, the first time.
    pub(super) fn after_commit(&mut self, conn: &Connection) -> Option<u64> {
        if self.full_cap.is_some() {
            return None;
        }
        let (free, _) = available(self.dir())?;
        if free >= 2 * self.budget.reserve {
            return None;
        }
        self.hold(conn);
        self.full_cap
    }

    fn dir(&self) -> &Path {
        self.reserve.parent().unwrap_or(Path::new("."))
    }

    /// The cap in force: the configured one, or lower while the disk is full or nearly.
    pub(super) fn cap(&self, configured: u64) -> u64 {
        self.full_cap.map_or(configured, |c| c.min(configured))
    }

    /// Whether the disk filled (or nearly) and the database is held at its size.
    pub(super) fn full(&self) -> bool {
        self.full_cap.is_some()
    }

    /// A commit failed for want of space: the reserve goes and the WAL is cut back, so that
    /// retention can write. The caller then deletes the oldest messages and calls
    /// [`Space::hold`].
    pub(super) fn on_full(&mut self, conn: &Connection) -> Freed {
        let reserve = std::fs::metadata(&self.reserve).map_or(0, |m| m.len());
        let reserve = if std::fs::remove_file(&self.reserve).is_ok() {
            reserve
        } else {
            0
        };
        let wal = std::fs::metadata(&self.wal).map_or(0, |m| m.len());
        // (busy, frames in the log, frames checkpointed): busy when a reader holds the log.
        let cut = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            })
            .is_ok_and(|busy| busy == 0);
        Freed {
            reserve,
            wal: cut.then_some(wal),
        }
    }

    /// Holds the database at the bytes it uses now (after the emergency deletes), or lower if
    /// it is held lower already.
    pub(super) fn hold(&mut self, conn: &Connection) {
        if let Ok(used) = used_bytes(conn) {
            self.full_cap = Some(self.full_cap.map_or(used, |held| held.min(used)));
        }
    }

    /// Whether a step of giving pages back is due (the next pass should come soon).
    pub(super) fn busy(&self) -> bool {
        self.vacuum_left
    }

    /// After a retention pass: gives back up to [`VACUUM_STEP`] free pages while there are
    /// more than [`VACUUM_AT`], and once the disk has room again, makes the reserve and lifts
    /// the hold. Returns the bytes given back. (Also while held: the [`VACUUM_AT`] pages kept,
    /// 4 MiB, are more than the next commits need, and a cap lowered below the hold is given
    /// back to the disk.)
    pub(super) fn after_pass(&mut self, conn: &Connection) -> rusqlite::Result<u64> {
        if self.full_cap.is_some()
            && self.make_reserve()
            && available(self.dir()).is_some_and(|(free, _)| free >= 3 * self.budget.reserve)
        {
            self.full_cap = None;
            tracing::info!("the disk has room again: history's cap is history_max_bytes again");
        }
        self.vacuum_left = false;
        let free = pragma(conn, "freelist_count")?;
        if free <= VACUUM_AT {
            return Ok(0);
        }
        // Each page moved is written to the WAL first: a step may take no more of it than the
        // budget lets the WAL grow before a checkpoint, or on a small disk it would use up
        // the room the reserve keeps for deletes.
        let step = free.min(VACUUM_STEP).min(self.budget.checkpoint_pages);
        // Each step of the statement gives back one page: run it to the end.
        let mut stmt = conn.prepare(&format!("PRAGMA incremental_vacuum({step})"))?;
        let mut rows = stmt.query([])?;
        while rows.next()?.is_some() {}
        drop(rows);
        drop(stmt);
        self.vacuum_left = pragma(conn, "freelist_count")? > VACUUM_AT;
        Ok(step.saturating_mul(pragma(conn, "page_size")?))
    }
}
