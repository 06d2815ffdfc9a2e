//! Disk space, the byte cap's companion: pages that retention frees are given back to the
//! file system in steps (incremental vacuum), and a reserve file keeps room for retention
//! itself on a full disk.
//!
//! Why a reserve: with the disk full, SQLite cannot even delete (a delete writes pages to the
//! WAL first), so history would never free itself and every commit would fail. The writer
//! keeps [`RESERVE_BYTES`] in a file of its own next to the database; when a commit fails
//! for want of space it deletes that file, deletes the oldest messages with the room it
//! gave, and from then on holds the database at the size it has then (the pages it freed
//! are reused by the next commits, so it needs no more of the disk). When the disk has room
//! again the reserve is made anew and the configured cap applies again.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

/// The reserve: room for a few retention transactions and the WAL they write.
pub(super) const RESERVE_BYTES: u64 = 8 << 20;
/// Free pages the database may hold before some are given back to the file system: below it
/// they are simply reused by the next inserts.
const VACUUM_AT: u64 = 1024;
/// Pages given back at most per retention pass (16 MiB at 4 KiB pages).
const VACUUM_STEP: u64 = 4096;

/// See the module documentation.
#[derive(Debug)]
pub(super) struct Space {
    reserve: PathBuf,
    /// While the disk is full: the bytes in use when it filled, held instead of the
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

/// Whether `e` says the disk (or the file system's quota) is full.
pub(super) fn is_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// Bytes free for an unprivileged writer on the file system holding `dir`.
#[allow(
    clippy::useless_conversion,
    reason = "fsblkcnt_t and c_ulong are narrower than u64 on some targets"
)]
fn available(dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size())))
}

impl Space {
    /// The space of the database at `db`.
    pub(super) fn new(db: &Path) -> Self {
        let mut reserve = db.as_os_str().to_owned();
        reserve.push(".reserve");
        Self {
            reserve: PathBuf::from(reserve),
            full_cap: None,
            vacuum_left: false,
        }
    }

    /// At the writer's start: a database made before incremental vacuum is converted (one
    /// `VACUUM`, once; the relay runs meanwhile, and messages that do not fit in the queue
    /// are counted as dropped), and the reserve is made if the disk has room for it.
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
        self.make_reserve();
    }

    /// Makes the reserve file if it is missing and the disk has room for it (and as much
    /// again); returns whether it is there.
    fn make_reserve(&mut self) -> bool {
        if self.reserve.exists() {
            return true;
        }
        let dir = self.reserve.parent().unwrap_or(Path::new("."));
        if available(dir).is_none_or(|free| free < 2 * RESERVE_BYTES) {
            return false;
        }
        let made = (|| -> std::io::Result<()> {
            let f = std::fs::File::create(&self.reserve)?;
            // Allocated, not sized: a sparse file would reserve nothing. (posix_fallocate
            // writes zeros itself where the file system cannot allocate.)
            let len = i64::try_from(RESERVE_BYTES).unwrap_or(i64::MAX);
            nix::fcntl::posix_fallocate(&f, 0, len).map_err(std::io::Error::from)
        })();
        if let Err(error) = made {
            let _ = std::fs::remove_file(&self.reserve);
            tracing::debug!(path = %self.reserve.display(), %error, "cannot make the history reserve");
            return false;
        }
        true
    }

    /// The cap in force: the configured one, or lower while the disk is full.
    pub(super) fn cap(&self, configured: u64) -> u64 {
        self.full_cap.map_or(configured, |c| c.min(configured))
    }

    /// Whether the disk filled and the database is held at its size.
    pub(super) fn full(&self) -> bool {
        self.full_cap.is_some()
    }

    /// A commit failed for want of space: the reserve goes, so that retention can write.
    /// The caller then deletes the oldest messages and calls [`Space::hold`].
    pub(super) fn on_full(&mut self) -> bool {
        std::fs::remove_file(&self.reserve).is_ok()
    }

    /// Holds the database at the bytes it uses now (after the emergency deletes).
    pub(super) fn hold(&mut self, conn: &Connection) {
        if let Ok(used) = used_bytes(conn) {
            self.full_cap = Some(used);
        }
    }

    /// Whether a step of giving pages back is due (the next pass should come soon).
    pub(super) fn busy(&self) -> bool {
        self.vacuum_left
    }

    /// After a retention pass: gives back up to [`VACUUM_STEP`] free pages while there are
    /// more than [`VACUUM_AT`] (not while the disk is full: then they are kept for the next
    /// inserts), and once the disk has room again, makes the reserve and lifts the hold.
    /// Returns the bytes given back.
    pub(super) fn after_pass(&mut self, conn: &Connection) -> rusqlite::Result<u64> {
        if self.full_cap.is_some() && self.make_reserve() {
            self.full_cap = None;
            tracing::info!("the disk has room again: history's cap is history_max_bytes again");
        }
        self.vacuum_left = false;
        if self.full_cap.is_some() {
            return Ok(0);
        }
        let free = pragma(conn, "freelist_count")?;
        if free <= VACUUM_AT {
            return Ok(0);
        }
        let step = free.min(VACUUM_STEP);
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
