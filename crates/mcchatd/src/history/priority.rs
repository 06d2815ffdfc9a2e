//! The history writer's CPU priority: out of the relay's way while it keeps up, never starved
//! when it does not.
//!
//! While it keeps up, the writer runs under SCHED_IDLE (Linux): it gets a core only when
//! nothing else wants one, and a relay or client thread that wakes takes the core from it at
//! once (a nice value alone lets it keep a core for its time slice, milliseconds: the relay's
//! p99). But SCHED_IDLE also yields to every other process on the host: with two CPU-bound
//! jobs on a two-core machine the writer got no core for over ten seconds and 90,000 messages
//! were not stored. So a writer that falls behind (it takes half its queue or more at once)
//! leaves SCHED_IDLE for nice [`WRITER_NICE`], about a tenth of a core against a busy
//! neighbour, and goes back once it has caught up (it takes a few records at a time again).
//! So does a writer that someone waits for (a query's flush, a stop, or records that have
//! waited a second: what a kill would lose), whatever it took: under SCHED_IDLE beside two
//! busy processes each commit of a thousand records took over a second, and a query waited
//! as long for each. It needs one turn under SCHED_IDLE to raise itself, and goes back once
//! no one waits and it has caught up.
//!
//! Leaving SCHED_IDLE for nice 10 needs RLIMIT_NICE of at least 10 (mcchatd.service sets
//! `LimitNICE=+10`) or CAP_SYS_NICE. Without either a writer under SCHED_IDLE could never
//! leave it, so it runs at nice 10 throughout.

/// The writer's nice value (Linux, per thread) when it does not run under SCHED_IDLE: about
/// a tenth of the CPU a nice-0 thread gets when both want it, and all of it when that thread
/// is idle.
pub(super) const WRITER_NICE: i32 = 10;

/// Where the writer runs now (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Level {
    /// SCHED_IDLE: it keeps up.
    Idle,
    /// Nice [`WRITER_NICE`]: behind, or SCHED_IDLE could not be left again.
    Nice,
    /// Whatever the thread was started with (not Linux, or nothing could be changed).
    Unchanged,
}

/// The writer's priority, changed by the writer itself as it falls behind and catches up.
#[derive(Debug)]
pub(super) struct Priority {
    level: Level,
    /// Whether SCHED_IDLE can be left again (RLIMIT_NICE or CAP_SYS_NICE allow nice 10).
    can_leave_idle: bool,
    /// Takes of at least this many records mean "behind".
    behind_at: usize,
    /// Takes of at most this many mean "caught up".
    caught_up_at: usize,
}

impl Priority {
    /// Lowers the calling thread (the writer, as it starts): SCHED_IDLE if it can be left
    /// again, else nice 10. `queue` is how many records the queue holds at most.
    pub(super) fn lowered(queue: usize) -> Self {
        let can_leave_idle = can_leave_idle();
        let mut p = Self {
            level: Level::Unchanged,
            can_leave_idle,
            behind_at: queue / 2,
            caught_up_at: (queue / 64).max(1),
        };
        p.set(if can_leave_idle {
            Level::Idle
        } else {
            Level::Nice
        });
        if !can_leave_idle && p.level == Level::Nice {
            tracing::debug!(
                nice = WRITER_NICE,
                "the history writer runs at nice 10, not SCHED_IDLE: RLIMIT_NICE below 10 and \
                 no CAP_SYS_NICE (mcchatd.service sets LimitNICE=+10)"
            );
        }
        p
    }

    /// The writer took `taken` records at once, and someone waits for their commit (`waited`:
    /// a query's flush, a stop, or records that have waited too long) or not: behind, waited
    /// for or caught up, it changes level.
    pub(super) fn took(&mut self, taken: usize, waited: bool) {
        if !self.can_leave_idle {
            return;
        }
        if self.level == Level::Idle && (taken >= self.behind_at || waited) {
            tracing::debug!(
                taken,
                waited,
                "history writer behind: nice 10 until it catches up"
            );
            self.set(Level::Nice);
        } else if self.level == Level::Nice && taken <= self.caught_up_at && !waited {
            tracing::debug!(taken, "history writer caught up: SCHED_IDLE again");
            self.set(Level::Idle);
        }
    }

    /// Where the writer runs now.
    #[cfg(test)]
    pub(super) fn level(&self) -> Level {
        self.level
    }

    #[cfg(target_os = "linux")]
    fn set(&mut self, level: Level) {
        use thread_priority::{
            NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
            set_thread_priority_and_policy, thread_native_id,
        };
        let policy = match level {
            Level::Idle => NormalThreadSchedulePolicy::Idle,
            Level::Nice => NormalThreadSchedulePolicy::Other,
            Level::Unchanged => return,
        };
        // The crate sets the policy, then nice 19 (its "minimum" for a normal policy) on the
        // calling thread; nice 10 is set here after it. A thread that was never under
        // SCHED_IDLE only raises its nice value (always allowed; 19 then 10 would not be).
        let set = if self.level == Level::Unchanged && level == Level::Nice {
            Ok(())
        } else {
            set_thread_priority_and_policy(
                thread_native_id(),
                ThreadPriority::Min,
                ThreadSchedulePolicy::Normal(policy),
            )
            .map_err(|e| format!("{e:?}"))
        };
        let nice = match level {
            Level::Nice => {
                rustix::process::setpriority_process(Some(rustix::thread::gettid()), WRITER_NICE)
                    .map_err(|e| e.to_string())
            }
            _ => Ok(()),
        };
        match (set, nice) {
            (Ok(()), Ok(())) => self.level = level,
            (set, nice) => {
                tracing::debug!(
                    ?set,
                    ?nice,
                    ?level,
                    "cannot change the history writer's priority"
                );
                if level == Level::Nice {
                    // Still under SCHED_IDLE, or at nice 19: never try again.
                    self.can_leave_idle = false;
                }
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn set(&mut self, _level: Level) {
        tracing::debug!("the history writer runs at the relay's priority on this system");
    }
}

/// Whether a thread may go from SCHED_IDLE to nice [`WRITER_NICE`]. The kernel allows that
/// exactly when it would let the thread lower its nice value to 10 (RLIMIT_NICE, or
/// CAP_SYS_NICE in the host's user namespace), so that is what is tried, on a thread of its
/// own that then ends.
#[cfg(target_os = "linux")]
fn can_leave_idle() -> bool {
    std::thread::Builder::new()
        .name("history-probe".into())
        .spawn(|| {
            let tid = Some(rustix::thread::gettid());
            rustix::process::setpriority_process(tid, WRITER_NICE + 1).is_ok()
                && rustix::process::setpriority_process(tid, WRITER_NICE).is_ok()
        })
        .ok()
        .and_then(|t| t.join().ok())
        .unwrap_or(false)
}

#[cfg(not(target_os = "linux"))]
fn can_leave_idle() -> bool {
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The calling thread's scheduling policy (0: SCHED_OTHER, 5: SCHED_IDLE) and nice value.
    fn sched() -> (u32, i32) {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Fields after the command's closing parenthesis start at the 3rd: nice is the 19th,
        // the policy the 41st.
        let (_, rest) = stat.rsplit_once(')').unwrap();
        let f: Vec<&str> = rest.split_whitespace().collect();
        (f[38].parse().unwrap(), f[16].parse().unwrap())
    }

    #[test]
    fn a_writer_behind_leaves_sched_idle_until_it_catches_up() {
        std::thread::spawn(|| {
            let mut p = Priority::lowered(16_384);
            if !can_leave_idle() {
                // Nowhere to come back from: nice 10 throughout.
                assert_eq!(p.level(), Level::Nice);
                assert_eq!(sched(), (0, WRITER_NICE));
                p.took(16_384, true);
                assert_eq!(sched(), (0, WRITER_NICE));
                return;
            }
            assert_eq!(p.level(), Level::Idle);
            assert_eq!(sched().0, 5, "SCHED_IDLE while it keeps up");
            p.took(4096, false);
            assert_eq!(sched().0, 5, "a full batch is not behind");
            p.took(8192, false);
            assert_eq!(p.level(), Level::Nice);
            assert_eq!(sched(), (0, WRITER_NICE), "behind: nice 10");
            p.took(1000, false);
            assert_eq!(p.level(), Level::Nice, "not yet caught up");
            p.took(10, false);
            assert_eq!(p.level(), Level::Idle);
            assert_eq!(sched().0, 5, "caught up: SCHED_IDLE again");
            // Waited for: out of SCHED_IDLE for a few records, and back only when no one
            // waits any more.
            p.took(10, true);
            assert_eq!(p.level(), Level::Nice);
            assert_eq!(sched(), (0, WRITER_NICE), "waited for: nice 10");
            p.took(0, true);
            assert_eq!(p.level(), Level::Nice, "still waited for");
            p.took(0, false);
            assert_eq!(p.level(), Level::Idle);
            assert_eq!(sched().0, 5);
            p.took(16_384, false);
            assert_eq!(
                sched(),
                (0, WRITER_NICE),
                "and out of it as often as it falls behind"
            );
        })
        .join()
        .unwrap();
    }
}
