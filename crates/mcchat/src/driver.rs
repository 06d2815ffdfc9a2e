//! The one driver loop every front end (terminal, pipe, `listen`) runs: it feeds the pure
//! [`PeerEngine`] datagrams from the [`Transport`], the user's lines and the time, and performs
//! what the engine queues: datagrams go out here, events go to the bounded [`Output`].
//!
//! Every `select!` arm is cancel-safe (a socket receive, a channel receive, a sleep, a
//! signal), and sends are awaited only outside the `select!`, so nothing the engine decided
//! is ever half done.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use mcchat_core::peer::{Effect, Event, Now, PeerConfig, PeerEngine};
use mcchat_core::ratelimit::LogLimiter;
use mcchat_core::room::Room;
use mcchat_core::wire::{self, InstanceId, Kind, MAX_DATAGRAM};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::cli::NetArgs;
use crate::output::StdoutClosed;
use crate::transport::Transport;
use crate::writer::{Line, Output};

/// Datagrams taken per wake-up before the engine's effects are performed: a flood costs
/// bounded work per turn of the loop, and the timers and the user still get their turn.
const BATCH: usize = 64;

/// NACK datagrams per second through mcchatd: well under its per-source rate (PROTOCOL.md
/// 4.3), so a flood of gaps cannot crowd out this peer's own messages.
const VIA_NACKS_PER_SECOND: u32 = 64;
/// Repairs of own messages per second through mcchatd, for the same reason: forged NACKs
/// relayed by the daemon must not use up this peer's allowance there.
const VIA_REPAIRS_PER_SECOND: u32 = 100;

/// What a front end hands the loop.
#[derive(Debug)]
pub(crate) enum Input {
    /// Say this (a message or an action).
    Say(Kind, String),
    /// Show who is here.
    Who,
    /// Show the counters.
    Stats,
    /// Show this line (a reply the front end made itself).
    Note(String),
    /// The terminal failed: leave, and end with this error.
    Failed(String),
}

/// The time now, as the engine takes it (tokio's clock, so paused time works in tests).
pub(crate) fn now() -> Now {
    Now {
        mono: Instant::now().into_std(),
        unix_ms: wire::now_ms(),
    }
}

/// Whether a socket error means the socket itself is unusable. Everything else (no route
/// after a Wi-Fi roam, a firewall's EPERM, a full buffer) passes: chat carries on.
pub(crate) fn is_fatal(e: &std::io::Error) -> bool {
    e.raw_os_error().is_some_and(|n| {
        [
            nix::errno::Errno::EBADF,
            nix::errno::Errno::ENOTSOCK,
            nix::errno::Errno::EFAULT,
        ]
        .iter()
        .any(|e| *e as i32 == n)
    })
}

/// How a peer opens its room.
pub(crate) struct Mode {
    /// The sender name (`None`: a listener or a one-shot sender, no presence).
    pub(crate) name: Option<String>,
    /// Whether presence is on (join) even without echo.
    pub(crate) presence: bool,
    /// Subscribe through mcchatd (with `--via`).
    pub(crate) subscribe: bool,
    /// Show own messages (the terminal).
    pub(crate) echo_own: bool,
    /// How long own messages stay available for repair.
    pub(crate) repair_window: Duration,
}

/// A peer: its engine and its transport.
pub(crate) struct Peer {
    engine: PeerEngine,
    transport: Transport,
    room: Room,
    /// Events that came before the front end's output existed (while subscribing).
    early: Vec<Event>,
    error_log: LogLimiter,
}

impl Peer {
    /// Opens `room` directly, or through mcchatd with `--via`.
    pub(crate) async fn open(room: Room, net: &NetArgs, mode: Mode) -> Result<Self> {
        let transport = match &net.via {
            Some(spec) => Transport::via(crate::via::resolve(spec).await?).await?,
            None => Transport::direct(&room, net)?,
        };
        let instance =
            InstanceId::random().context("failed to get random bytes for the instance id")?;
        let seed = InstanceId::random()
            .context("failed to get random bytes for the jitter seed")?
            .0;
        let name = mode.name.unwrap_or_default();
        let mut config = PeerConfig::new(room.name().as_str(), &name, transport.dest(&room));
        config.presence = mode.presence && !name.is_empty();
        config.echo_own = mode.echo_own;
        let via = matches!(transport, Transport::Via { .. });
        config.subscribe = mode.subscribe && via;
        // A one-shot sender proves its address first (one round trip), so mcchatd relays it
        // under its own budget, not the small one all unproven sources share.
        config.prove = !mode.subscribe && via;
        config.repair_window = mode.repair_window;
        if via {
            // mcchatd relays at most 200 datagrams a second per source: NACKs must leave
            // room for this peer's own messages, heartbeats and renewals.
            config.repair.nacks_per_second = VIA_NACKS_PER_SECOND;
            config.repairs_per_second = VIA_REPAIRS_PER_SECOND;
        }
        Ok(Self {
            engine: PeerEngine::new(config, instance, seed, now()),
            transport,
            room,
            early: Vec::new(),
            error_log: LogLimiter::default(),
        })
    }

    pub(crate) fn room(&self) -> &Room {
        &self.room
    }

    pub(crate) fn engine_mut(&mut self) -> &mut PeerEngine {
        &mut self.engine
    }

    /// One line saying where this peer is.
    pub(crate) fn describe(&self) -> String {
        self.transport.describe(&self.room)
    }

    /// Subscribes through mcchatd (or, for a one-shot sender, proves its address to it), if
    /// this peer uses one, and returns once the daemon answers, or with the engine's reason
    /// if it never does.
    pub(crate) async fn connect(&mut self) -> Result<()> {
        if !self.engine.subscribes() {
            return Ok(());
        }
        self.engine.subscribe(now());
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        loop {
            let mut subscribed = false;
            for event in self.perform().await? {
                match event {
                    Event::Subscribed => subscribed = true,
                    Event::Ended(why) => return Err(anyhow!(why)),
                    // Whatever came with or after the confirmation is shown once the front
                    // end's output exists.
                    other => self.early.push(other),
                }
            }
            if subscribed {
                return Ok(());
            }
            self.turn(&mut buf).await?;
        }
    }

    /// Says hello (a `join`, with presence) and sends it at once.
    pub(crate) async fn enter(&mut self) -> Result<()> {
        self.engine.enter(now());
        let events = self.perform().await?;
        self.early.extend(events);
        Ok(())
    }

    /// Says `text` and sends it at once (`mcchat send`).
    pub(crate) async fn say_now(&mut self, kind: Kind, text: &str) -> Result<()> {
        self.engine
            .say(kind, text, now())
            .with_context(|| format!("cannot send to room {}", self.room.name()))?;
        self.perform().await?;
        Ok(())
    }

    /// One wait: a datagram (and those queued behind it) or the engine's deadline.
    async fn turn(&mut self, buf: &mut [u8]) -> Result<()> {
        let due = self.engine.next_deadline().map(Instant::from_std);
        tokio::select! {
            r = self.transport.recv(buf) => self.received(r, buf)?,
            () = sleep_until_opt(due) => self.engine.poll(now()),
        }
        Ok(())
    }

    /// Feeds a received datagram, and up to [`BATCH`] - 1 more already queued, to the engine.
    fn received(
        &mut self,
        first: std::io::Result<(usize, SocketAddr)>,
        buf: &mut [u8],
    ) -> Result<()> {
        let mut r = first;
        for taken in 1..=BATCH {
            match r {
                // A datagram longer than the buffer is truncated to it, which still reads as
                // oversize.
                Ok((len, from)) => self.engine.on_datagram(&buf[..len], from, now()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => {
                    self.transient(e, "failed to receive")?;
                    return Ok(());
                }
            }
            if taken == BATCH {
                break; // the rest waits for the next turn, still queued in the socket
            }
            r = self.transport.try_recv(buf);
        }
        Ok(())
    }

    /// Performs the engine's effects: sends them, and returns the events to show.
    async fn perform(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        while let Some(effect) = self.engine.poll_effect() {
            match effect {
                Effect::Send { to, bytes } => {
                    if let Err(e) = self.transport.send(to, &bytes).await {
                        self.transient(e, "failed to send")?;
                    }
                }
                Effect::Show(event) => events.push(event),
            }
        }
        Ok(events)
    }

    /// Logs a transient socket error (rate limited) and carries on; returns a fatal one.
    fn transient(&mut self, e: std::io::Error, what: &str) -> Result<()> {
        if is_fatal(&e) {
            return Err(
                anyhow::Error::new(e).context(format!("{what} in room {}", self.room.name()))
            );
        }
        if let Some(suppressed) = self.error_log.check(now().mono) {
            tracing::warn!(error = %e, suppressed, room = %self.room.name(), "{what}; carrying on");
        }
        Ok(())
    }

    /// Runs the room until `shutdown` fires, the input ends, the output fails or the engine
    /// ends; then leaves (a `leave`, and the end of a subscription), whatever the reason.
    pub(crate) async fn run(
        &mut self,
        mut input: Option<mpsc::Receiver<Input>>,
        out: &mut Output,
        shutdown: impl Future<Output = Result<()>>,
        notes_on_stderr: bool,
    ) -> Result<()> {
        tokio::pin!(shutdown);
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        for event in std::mem::take(&mut self.early) {
            out.show(Line::Event(event));
        }
        let result: Result<()> = loop {
            let events = match self.perform().await {
                Ok(e) => e,
                Err(e) => break Err(e),
            };
            let mut ended = None;
            for event in events {
                match event {
                    Event::Ended(why) => ended = Some(why),
                    Event::Subscribed => {}
                    other => out.show(Line::Event(other)),
                }
            }
            if let Some(why) = ended {
                break Err(anyhow!(why));
            }
            let due = self.engine.next_deadline().map(Instant::from_std);
            tokio::select! {
                r = &mut shutdown => break r,
                e = out.failed() => break Err(e),
                line = recv_opt(&mut input) => match line {
                    None => break Ok(()),
                    Some(Input::Failed(e)) => break Err(anyhow!("terminal input failed: {e}")),
                    Some(line) => self.on_input(line, out, notes_on_stderr),
                },
                r = self.transport.recv(&mut buf) => {
                    if let Err(e) = self.received(r, &mut buf) {
                        break Err(e);
                    }
                }
                () = sleep_until_opt(due) => self.engine.poll(now()),
            }
        };
        // Goodbye, whatever ended the loop (a closed stdout too): the others learn it now,
        // not 50 s later.
        self.engine.leave(now());
        let left = self.perform().await;
        self.log_drops();
        if let Err(e) = &result
            && e.is::<StdoutClosed>()
        {
            return left.map(|_| ()).and(result);
        }
        result?;
        left.context("failed to send the leave message")?;
        Ok(())
    }

    fn on_input(&mut self, input: Input, out: &mut Output, notes_on_stderr: bool) {
        let reply = match input {
            Input::Say(kind, text) => match self.engine.say(kind, &text, now()) {
                Ok(()) => None,
                Err(e) => Some(format!("mcchat: not sent: {e}")),
            },
            Input::Who => {
                let names: Vec<String> = self
                    .engine
                    .members()
                    .iter()
                    .map(|n| mcchat_core::sanitize::for_terminal(n).into_owned())
                    .collect();
                Some(format!(
                    "in {} ({}): {}",
                    self.room.name(),
                    names.len(),
                    names.join(", ")
                ))
            }
            Input::Stats => Some(self.stats_line(out)),
            Input::Note(text) => Some(text),
            Input::Failed(_) => None,
        };
        if let Some(line) = reply {
            if notes_on_stderr {
                crate::note(line.trim_start_matches("mcchat: "));
            } else {
                out.show(Line::Text(line));
            }
        }
    }

    fn stats_line(&self, out: &Output) -> String {
        let d = self.engine.drops();
        let detail: Vec<String> = d.nonzero().map(|(r, n)| format!("{r}={n}")).collect();
        let r = self.engine.repair_stats();
        let s = self.engine.stats();
        let (senders, missing, held) = self.engine.receiver_load();
        format!(
            "dropped datagrams: {} {}\nrepair: {} repaired, {} lost, {} duplicates, {} NACKs sent \
             ({} suppressed, {} deferred); {} repairs sent ({} bytes, {} refused)\n\
             following {senders} senders, {missing} missing, {held} bytes held; \
             {} lines not shown (output too slow)",
            d.total(),
            detail.join(" "),
            r.repaired,
            r.lost,
            r.duplicates,
            r.nacks_sent,
            r.nacks_suppressed,
            r.nacks_deferred,
            s.repairs_sent,
            s.repair_bytes,
            s.repairs_refused,
            out.skipped(),
        )
    }

    /// Logs a one-line summary of dropped datagrams, if any.
    fn log_drops(&self) {
        let drops = self.engine.drops();
        if drops.total() > 0 {
            let by_reason: Vec<String> = drops.nonzero().map(|(r, n)| format!("{r}={n}")).collect();
            tracing::info!(
                room = %self.room.name(),
                total = drops.total(),
                reasons = %by_reason.join(" "),
                "dropped datagrams"
            );
        }
        // What repair did, for whoever reads the log of a run that lost something.
        let r = self.engine.repair_stats();
        if r.nacks_sent > 0 || r.repaired > 0 || r.lost > 0 {
            let (senders, missing, held) = self.engine.receiver_load();
            tracing::info!(
                room = %self.room.name(),
                repaired = r.repaired,
                lost = r.lost,
                duplicates = r.duplicates,
                nacks_sent = r.nacks_sent,
                senders,
                missing,
                held,
                "repair summary"
            );
        }
    }
}

/// Sleeps until `due`, or forever if there is none.
async fn sleep_until_opt(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The next input, or never if there is no input (`listen`).
async fn recv_opt(input: &mut Option<mpsc::Receiver<Input>>) -> Option<Input> {
    match input {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
