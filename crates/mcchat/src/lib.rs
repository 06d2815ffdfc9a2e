//! The `mcchat` peer: chat in a room by joining its multicast group directly.
//!
//! - [`cli`]: the command line (clap derive).
//! - `driver`: the one loop every front end runs: the pure engine
//!   ([`mcchat_core::peer::PeerEngine`]) fed from a transport, the user and the clock.
//! - `transport`: the room's socket, joined directly or connected to mcchatd (`--via`).
//! - `writer`: output on its own thread behind a bounded queue, so a slow reader never
//!   stalls the loop (what it cannot take is counted and reported).
//! - `display`: the one place events become text or JSON (and network text is sanitised).
//! - `interactive`: the terminal front end (rustyline with an external printer).
//! - `pipe`: the line-oriented front end for `join` without a terminal.
//! - `output`: stdout that treats a closed pipe as a clean exit.
//! - `log`: where diagnostics go (stderr, or above the prompt on a terminal).
//! - `via`: where mcchatd is (`--via HOST[:PORT]`).
//! - `daemon`: requests to mcchatd's status port (status, history).
//! - `status`: `mcchat status`, reading a daemon's status document.
//! - `history`: `mcchat history`, and the catch-up `join` shows first.
//!
//! `main.rs` only parses arguments, sets up logging and maps errors to exit codes.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod cli;
mod daemon;
mod display;
mod driver;
mod history;
mod interactive;
mod log;
mod output;
mod pipe;
mod status;
mod transport;
mod via;
mod writer;

use std::io::IsTerminal as _;

use anyhow::{Context as _, Result, bail};
use clap::CommandFactory as _;
use mcchat_core::config::{self, Loaded};
use mcchat_core::wire::Kind;

use crate::cli::{Cli, Command};
use crate::driver::{Mode, Peer};
pub use crate::log::{LogWriter, flush as flush_logs, log_writer};
use crate::output::Stdout;
pub use crate::output::StdoutClosed;
use crate::writer::Output;

/// How long the output may take to write what is queued when a run ends.
const OUTPUT_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs one command to completion.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Completions { shell } => {
            let mut out = Stdout::new();
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "mcchat", &mut buf);
            out.write_bytes(&buf)
        }
        Command::Man => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut buf)
                .context("failed to render the man page")?;
            Stdout::new().write_bytes(&buf)
        }
        Command::Rooms => rooms(&load_rooms(&cli)?),
        Command::Status(ref args) => status::run(args).await,
        Command::History(ref args) => history::run(args).await,
        Command::Send(ref args) => {
            let loaded = load_rooms(&cli)?;
            let room = loaded.registry.resolve(args.room.as_str())?;
            let name = resolve_name(args.name.clone())?;
            let mode = Mode {
                name: Some(name),
                presence: false,
                subscribe: false,
                echo_own: false,
                repair_window: mcchat_core::peer::REPAIR_WINDOW,
            };
            let mut peer = Peer::open(room, &args.net, mode).await?;
            peer.connect().await?;
            peer.say_now(Kind::Message, &args.text.join(" ")).await
        }
        Command::Listen(ref args) => {
            let loaded = load_rooms(&cli)?;
            let room = loaded.registry.resolve(args.room.as_str())?;
            let mode = Mode {
                name: None,
                presence: false,
                subscribe: true,
                echo_own: false,
                repair_window: mcchat_core::peer::REPAIR_WINDOW,
            };
            // Installed first: a signal while subscribing must not kill the process without
            // its unsubscribe.
            let shutdown = shutdown_signal()?;
            let mut peer = Peer::open(room, &args.net, mode).await?;
            peer.connect().await?;
            note(&format!("listening to {}", peer.describe()));
            let mut out = stdout_writer(args.json, peer.room().name().to_string())?;
            let result = peer.run(None, &mut out, shutdown, true).await;
            finish(result, out)
        }
        Command::Join(ref args) => {
            let loaded = load_rooms(&cli)?;
            let room = loaded.registry.resolve(args.room.as_str())?;
            let name = resolve_name(args.name.clone())?;
            let terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
            let mode = Mode {
                name: Some(name),
                presence: true,
                subscribe: true,
                echo_own: terminal,
                repair_window: std::time::Duration::from_secs(args.repair_window),
            };
            // Installed first: a signal while subscribing or catching up must not kill the
            // process without its leave and unsubscribe.
            let shutdown = shutdown_signal()?;
            let mut peer = Peer::open(room, &args.net, mode).await?;
            peer.connect().await?;
            history::catch_up(&mut peer, args).await;
            if terminal {
                interactive::run(peer, shutdown).await
            } else {
                pipe::run(peer, shutdown).await
            }
        }
    }
}

/// The writer for `listen` and piped `join`: text or JSON lines on stdout.
pub(crate) fn stdout_writer(json: bool, room: String) -> Result<Output> {
    let mut out = Stdout::new();
    let color = !json && out.is_terminal() && std::env::var_os("NO_COLOR").is_none();
    Output::spawn(writer::QUEUE_BYTES, writer::QUEUE_LINES, move |line| {
        let now = mcchat_core::wire::now_ms();
        let text = if json {
            display::json_output_line(line, &room, now)
        } else {
            Some(display::text_line(line, now, color))
        };
        match text {
            Some(t) => out.line(&t),
            None => Ok(()),
        }
    })
}

/// Ends a run: the output drains (bounded in time), and a closed stdout is a clean exit.
pub(crate) fn finish(result: Result<()>, out: Output) -> Result<()> {
    let written = out.finish(OUTPUT_DRAIN);
    result?;
    match written {
        Err(e) if e.is::<StdoutClosed>() => Ok(()),
        other => other,
    }
}

/// A status line for the user on stderr (through the log queue: never blocks); a closed
/// stderr is not worth failing for.
pub(crate) fn note(line: &str) {
    log::emit(format!("mcchat: {line}\n"));
}

fn load_rooms(cli: &Cli) -> Result<Loaded> {
    let loaded = config::load(cli.rooms.as_deref())?;
    tracing::debug!(origin = %loaded.origin, "rooms loaded");
    Ok(loaded)
}

/// The sender name: the flag or `$MCCHAT_NAME` (clap already read both), else the login
/// name.
fn resolve_name(given: Option<String>) -> Result<String> {
    if let Some(name) = given {
        return Ok(name);
    }
    let login = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("LOGNAME").ok());
    let Some(login) = login else {
        bail!("cannot tell your login name; pass --name NAME or set MCCHAT_NAME");
    };
    cli::parse_name(&login)
        .map_err(|e| anyhow::anyhow!("your login name {e}; pass --name NAME or set MCCHAT_NAME"))
}

fn rooms(loaded: &Loaded) -> Result<()> {
    let mut out = Stdout::new();
    out.line(&format!("rooms from {}", loaded.origin))?;
    let rows: Vec<[String; 4]> = loaded
        .registry
        .rooms()
        .map(|r| {
            [
                r.name().to_string(),
                r.group().to_string(),
                r.ttl().map_or_else(|| "1".to_owned(), |t| t.to_string()),
                r.description().unwrap_or_default().to_owned(),
            ]
        })
        .collect();
    let header = ["ROOM", "GROUP:PORT", "TTL", "DESCRIPTION"].map(str::to_owned);
    let mut widths = [0usize; 3];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line = format!(
            "{:w0$}  {:w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            mcchat_core::sanitize::for_terminal(&row[3]),
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
        );
        out.line(line.trim_end())?;
    }
    out.line("other names get a group derived from the name (see docs/PROTOCOL.md)")?;
    Ok(())
}

/// A future that resolves on SIGINT, SIGTERM or SIGHUP. The handlers are installed when this is
/// called, not when the future is first polled, so call it before announcing readiness: a
/// signal that arrives in between must not kill the process without its leave message.
pub(crate) fn shutdown_signal() -> Result<impl Future<Output = Result<()>> + use<>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).context("failed to install a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("failed to install a SIGINT handler")?;
    // The terminal closing (SIGHUP) is leaving too.
    let mut hup = signal(SignalKind::hangup()).context("failed to install a SIGHUP handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::debug!("SIGTERM"),
            _ = int.recv() => tracing::debug!("SIGINT"),
            _ = hup.recv() => tracing::debug!("SIGHUP"),
        }
        Ok(())
    })
}
