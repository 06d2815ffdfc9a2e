//! The `mcchat` peer: chat in a room by joining its multicast group directly.
//!
//! - [`cli`]: the command line (clap derive).
//! - `session`: one joined room — socket, instance id, sequence numbers, roster, drop counters.
//! - `display`: the one place events become text or JSON (and network text is sanitised).
//! - `interactive`: the terminal front end (rustyline with an external printer).
//! - `pipe`: the line-oriented front end for `join` without a terminal.
//! - `output`: stdout that treats a closed pipe as a clean exit.
//! - `log`: where diagnostics go (stderr, or above the prompt on a terminal).
//! - `via`: the client side of mcchatd's relay protocol (`--via`).
//! - `daemon`: requests to mcchatd's status port (status, history).
//! - `status`: `mcchat status`, reading a daemon's status document.
//! - `history`: `mcchat history`, and the catch-up `join` shows first.
//!
//! `main.rs` only parses arguments, sets up logging and maps errors to exit codes.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod cli;
mod daemon;
mod display;
mod history;
mod interactive;
mod log;
mod output;
mod pipe;
mod session;
mod status;
mod via;

use std::io::IsTerminal as _;

use anyhow::{Context as _, Result, bail};
use clap::CommandFactory as _;
use mcchat_core::config::{self, Loaded};
use mcchat_core::wire::Kind;

use crate::cli::{Cli, Command};
pub use crate::log::{LogWriter, log_writer};
use crate::output::Stdout;
pub use crate::output::StdoutClosed;
use crate::session::{Session, now_ms};

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
            let mut session = open(room, &args.net, Some(name), false).await?;
            let text = args.text.join(" ");
            session.send(Kind::Message, &text).await?;
            Ok(())
        }
        Command::Listen(ref args) => {
            let loaded = load_rooms(&cli)?;
            let room = loaded.registry.resolve(args.room.as_str())?;
            let mut session = open(room, &args.net, None, true).await?;
            let shutdown = shutdown_signal()?;
            note(&format!("listening to {}", session.describe()));
            let result = listen(&mut session, args.json, shutdown).await;
            session.leave().await.ok();
            session.log_drops();
            result
        }
        Command::Join(ref args) => {
            let loaded = load_rooms(&cli)?;
            let room = loaded.registry.resolve(args.room.as_str())?;
            let name = resolve_name(args.name.clone())?;
            let mut session = open(room, &args.net, Some(name), true).await?;
            session.set_repair_window(std::time::Duration::from_secs(args.repair_window));
            history::catch_up(&mut session, args).await;
            if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
                interactive::run(session).await
            } else {
                pipe::run(session).await
            }
        }
    }
}

/// Opens the room directly, or through mcchatd with `--via` (subscribing if `subscribe`).
async fn open(
    room: mcchat_core::room::Room,
    net: &cli::NetArgs,
    name: Option<String>,
    subscribe: bool,
) -> Result<Session> {
    match &net.via {
        Some(spec) => {
            let daemon = via::resolve(spec).await?;
            Session::open_via(room, daemon, name, subscribe).await
        }
        None => Session::open(room, net, name),
    }
}

/// A status line for the user on stderr; a closed stderr is not worth failing for.
pub(crate) fn note(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "mcchat: {line}");
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
                r.name.to_string(),
                r.group.to_string(),
                r.ttl.map_or_else(|| "1".to_owned(), |t| t.to_string()),
                r.description.clone().unwrap_or_default(),
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

async fn listen(
    session: &mut Session,
    json: bool,
    shutdown: impl Future<Output = Result<()>>,
) -> Result<()> {
    let mut out = Stdout::new();
    let color = !json && out.is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tokio::pin!(shutdown);
    let room = session.room().name.to_string();
    let show = |out: &mut Stdout, event: &session::Event| {
        let line = if json {
            display::json_line(event, &room, now_ms())
        } else {
            display::event_line(event, now_ms(), color)
        };
        out.line(&line)
    };
    loop {
        let due = session.heartbeat_due();
        tokio::select! {
            r = &mut shutdown => return r,
            event = session.recv() => show(&mut out, &event?)?,
            () = tokio::time::sleep_until(due) => {
                for event in session.tick().await? {
                    show(&mut out, &event)?;
                }
            }
        }
    }
}

/// A future that resolves on SIGINT, SIGTERM or SIGHUP. The handlers are installed when this is
/// called, not when the future is first polled, so call it before announcing readiness: a
/// signal that arrives in between must not kill the process without its leave message.
fn shutdown_signal() -> Result<impl Future<Output = Result<()>>> {
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
