//! `mcchat history`, and the catch-up `mcchat join` shows before the live conversation:
//! a room's recent messages as mcchatd stored them.

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Result;

use crate::cli::{HistoryArgs, JoinArgs};
use mcchat_core::control::HistoryQuery;
use mcchat_core::peer::Event;
use mcchat_core::wire::now_ms;

use crate::daemon::{self, Endpoint};
use crate::display;
use crate::driver::{Peer, now};
use crate::output::Stdout;

/// How long `mcchat history` waits for the daemon to connect, and then for each part of
/// its answer (not for all of it: a long history over a slow link takes what it takes).
const TIMEOUT: Duration = Duration::from_secs(10);
/// A long read shows its progress every this many messages, once it has taken this long.
const PROGRESS_EVERY: u64 = 1000;
const PROGRESS_AFTER: Duration = Duration::from_secs(1);
/// What `join` shows when it finds a daemon and was not told otherwise.
const JOIN_DEFAULT: u32 = 20;
/// How long `join` waits for history before it goes on without: it must not hold up the
/// conversation for a daemon that is slow or gone.
const JOIN_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) async fn run(args: &HistoryArgs) -> Result<()> {
    let endpoint = Endpoint::new(args.via.as_deref(), args.socket.clone());
    let since_ms = args.since.map(|d| {
        let ago = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        now_ms().saturating_sub(ago)
    });
    let query = HistoryQuery {
        room: args.room.to_string(),
        since_ms,
        grep: args.grep.clone(),
        limit: Some(args.limit),
        ..HistoryQuery::new(args.room.as_str())
    };
    let mut out = Stdout::new();
    let color = !args.json && out.is_terminal() && std::env::var_os("NO_COLOR").is_none();
    // Progress on long reads, where it cannot mix with the messages: stderr a terminal,
    // stdout not (a file, a pipe).
    let progress = !out.is_terminal() && std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let mut shown = 0u64;
    // Printed as it streams in: an answer of any length, with bounded memory.
    daemon::history_each(&endpoint, &query, TIMEOUT, |m| {
        let event = Event::Message(m);
        let line = if args.json {
            display::json_line(&event, args.room.as_str(), now_ms())
        } else {
            display::event_line(&event, now_ms(), color)
        };
        out.line(&line)?;
        shown += 1;
        if progress && shown.is_multiple_of(PROGRESS_EVERY) && started.elapsed() >= PROGRESS_AFTER {
            crate::note(&format!("{shown} messages so far"));
        }
        Ok(())
    })
    .await?;
    if shown == 0 {
        crate::note(&format!("no messages in {}'s history match", args.room));
    } else if progress && started.elapsed() >= PROGRESS_AFTER {
        crate::note(&format!("{shown} messages"));
    }
    Ok(())
}

/// Puts the room's last messages in front of `session`'s live ones, if a daemon has them.
/// Quiet when no daemon answers, unless `--history` asked for it.
pub(crate) async fn catch_up(peer: &mut Peer, args: &JoinArgs) {
    let wanted = args.history.unwrap_or(JOIN_DEFAULT);
    if wanted == 0 {
        return;
    }
    let endpoint = Endpoint::new(args.net.via.as_deref(), args.socket.clone());
    if let Endpoint::Unix(path) = &endpoint
        && args.history.is_none()
        && !path.exists()
    {
        return;
    }
    let query = HistoryQuery {
        limit: Some(wanted),
        ..HistoryQuery::new(args.room.as_str())
    };
    match daemon::history(&endpoint, &query, JOIN_TIMEOUT).await {
        Ok(messages) => {
            if !messages.is_empty() {
                crate::note(&format!(
                    "{} earlier messages from mcchatd's history",
                    messages.len()
                ));
            } else if args.history.is_some() {
                // Asked for by name: an empty answer is said, not left to be guessed.
                crate::note(&format!(
                    "no earlier messages in mcchatd's history of {}",
                    args.room
                ));
            }
            peer.engine_mut().preload(messages, now());
        }
        Err(e) if args.history.is_some() => {
            crate::note(&format!("no history: {e:#}"));
        }
        Err(e) => tracing::debug!(error = %format!("{e:#}"), "no history"),
    }
}
