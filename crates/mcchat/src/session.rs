//! One peer in one room: the joined socket, this run's instance id and sequence numbers, who
//! is in the room, and the counters for what was dropped.
//!
//! The front ends (terminal, pipe, listen, send) all drive a [`Session`]; it does the socket
//! I/O and leaves the showing to them.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result};
use std::collections::VecDeque;

use mcchat_core::presence::{Change, HEARTBEAT_INTERVAL, Roster};
use mcchat_core::ratelimit::LogLimiter;
use mcchat_core::repair::{self, Delivery, Nack, RepairConfig, SendBuffer, SplitMix64};
use mcchat_core::room::{Room, RoomSource};
use mcchat_core::socket::{self, Iface, MulticastConfig};
use mcchat_core::wire::{self, DropCounts, Header, InstanceId, Kind, MAX_DATAGRAM, Meta};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::cli::NetArgs;
use crate::via::Via;

/// A message as the front ends show it, owned so it can cross threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Received {
    /// What kind of message.
    pub(crate) kind: Kind,
    /// The room named in the datagram (always this session's room).
    pub(crate) room: String,
    /// Who sent it.
    pub(crate) sender: String,
    /// The text, not yet sanitised.
    pub(crate) text: String,
    /// The sender's timestamp, or the arrival time for bare datagrams (ms since the epoch).
    pub(crate) ts_ms: u64,
    /// When it arrived here (ms since the epoch): what the terminal shows, since a sender's
    /// clock may be wrong.
    pub(crate) recv_ms: u64,
    /// The datagram's source address; `None` for this peer's own messages.
    pub(crate) from: Option<SocketAddr>,
    /// The sender's instance id, if tagged.
    pub(crate) instance: Option<InstanceId>,
    /// The sender's sequence number, if tagged.
    pub(crate) seq: Option<u64>,
    /// Whether it arrived as a retransmission (a repair), not the first sending.
    pub(crate) repair: bool,
}

/// Something for a front end to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// A message or action.
    Message(Received),
    /// Somebody came or went.
    Presence(Change),
    /// `count` messages from `sender` could not be repaired.
    Lost { sender: String, count: u64 },
}

/// What a sender keeps of each message to repair it: kind, timestamp, text.
type Sent = (Kind, u64, String);

/// Messages kept for repair, and for how long by default (`mcchat join --repair-window`):
/// long enough to repair an outage of several seconds once a tail probe gets through.
const SEND_BUFFER: usize = 1024;
const SEND_BUFFER_AGE: Duration = Duration::from_secs(30);
/// How soon after a message the first tail-probe heartbeat goes out; each next one waits
/// twice as long.
const TAIL_PROBE: Duration = Duration::from_millis(200);
/// ... but at least once a second.
const TAIL_PROBE_MAX: Duration = Duration::from_secs(1);
/// Tail-probe heartbeats after a burst: 0.2, 0.6, 1.4, then every second up to 10.4 s.
const TAIL_PROBES: u8 = 12;
/// Repairs answered per NACK, and per second over all NACKs.
const MAX_REPAIRS_PER_NACK: usize = 128;
const REPAIRS_PER_SECOND: u32 = 2000;
/// One loss seen by many receivers is repaired once within this.
const REPAIR_INTERVAL: Duration = Duration::from_millis(20);

/// How a session reaches its room.
enum Transport {
    /// Joined to the group itself.
    Direct { socket: UdpSocket, iface: String },
    /// Through mcchatd, by unicast.
    Via(Via),
}

/// A room, joined directly or through mcchatd.
pub(crate) struct Session {
    transport: Transport,
    room: Room,
    name: String,
    /// Whether this session takes part in presence (join, heartbeats, leave): `join` does,
    /// `listen` and `send` do not.
    presence: bool,
    instance: InstanceId,
    seq: u64,
    out: String,
    roster: Roster,
    drops: DropCounts,
    drop_log: LogLimiter,
    error_log: LogLimiter,
    heartbeat_due: Instant,
    /// Gap detection, NACKs and in-order release for every sender heard.
    repair: repair::Receiver<Received>,
    /// This peer's recent messages, to answer NACKs.
    sent: SendBuffer<Sent>,
    /// Back-off jitter for NACKs, seeded from the instance id (itself from the OS).
    jitter: SplitMix64,
    /// Events ready to hand out (a repair can release several at once).
    pending: VecDeque<Event>,
    /// Heartbeats still to send soon after a burst, so a loss at its tail is found quickly.
    tail_probes: u8,
    /// Retransmissions allowed per second.
    repair_budget: LogLimiter,
}

pub(crate) use mcchat_core::wire::now_ms;

/// Whether a socket error means the socket itself is unusable. Everything else (no route
/// after a Wi-Fi roam, a firewall's EPERM, a full buffer) passes: chat carries on.
pub(crate) fn is_fatal(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .filter_map(std::io::Error::raw_os_error)
        .any(|n| {
            [
                nix::errno::Errno::EBADF,
                nix::errno::Errno::ENOTSOCK,
                nix::errno::Errno::EFAULT,
            ]
            .iter()
            .any(|e| *e as i32 == n)
        })
}

impl Session {
    /// Opens and joins `room`'s group directly.
    pub(crate) fn open(room: Room, net: &NetArgs, name: Option<String>) -> Result<Self> {
        let iface = match &net.iface {
            Some(spec) => Iface::resolve(spec)?,
            None => Iface::system_default(),
        };
        let config = MulticastConfig {
            ttl: net.ttl.or(room.ttl).unwrap_or(socket::DEFAULT_TTL),
            loopback: true,
            iface,
        };
        let joined = socket::open(room.group, &config)?;
        let local = joined.socket.local_addr().ok();
        tracing::debug!(
            group = %room.group,
            local = ?local,
            iface = %config.iface.label,
            ttl = config.ttl,
            multicast_all_cleared = joined.capabilities.multicast_all_cleared,
            recv_buffer = ?joined.capabilities.recv_buffer,
            "socket ready"
        );
        if !joined.capabilities.multicast_all_cleared {
            tracing::debug!("IP_MULTICAST_ALL not supported; relying on the room-name check");
        }
        let socket = UdpSocket::from_std(joined.socket)
            .with_context(|| format!("failed to register the socket for {}", room.group))?;
        let transport = Transport::Direct {
            socket,
            iface: config.iface.label,
        };
        Self::new(transport, room, name)
    }

    /// Reaches `room` through mcchatd at `daemon`; subscribes first when `subscribe` (join,
    /// listen), so that this returns only once the daemon relays the room to us.
    pub(crate) async fn open_via(
        room: Room,
        daemon: SocketAddr,
        name: Option<String>,
        subscribe: bool,
    ) -> Result<Self> {
        let via = Via::connect(daemon).await?;
        let mut session = Self::new(Transport::Via(via), room, name)?;
        if subscribe {
            let room_name = session.room.name.to_string();
            let sender = session.sender_for_control();
            if let Transport::Via(via) = &mut session.transport {
                via.subscribe(&room_name, &sender).await?;
            }
        }
        Ok(session)
    }

    fn new(transport: Transport, room: Room, name: Option<String>) -> Result<Self> {
        let instance =
            InstanceId::random().context("failed to get random bytes for the instance id")?;
        Ok(Self {
            transport,
            room,
            presence: name.is_some(),
            name: name.unwrap_or_default(),
            instance,
            seq: 0,
            out: String::with_capacity(MAX_DATAGRAM),
            roster: Roster::default(),
            drops: DropCounts::default(),
            drop_log: LogLimiter::default(),
            error_log: LogLimiter::default(),
            heartbeat_due: Instant::now() + HEARTBEAT_INTERVAL,
            repair: repair::Receiver::new(RepairConfig::default()),
            sent: SendBuffer::new(SEND_BUFFER, SEND_BUFFER_AGE, REPAIR_INTERVAL),
            jitter: SplitMix64(instance.0),
            pending: VecDeque::new(),
            tail_probes: 0,
            repair_budget: LogLimiter::new(REPAIRS_PER_SECOND, Duration::from_secs(1)),
        })
    }

    /// The sender name on control datagrams: ours, or a placeholder for a listener.
    fn sender_for_control(&self) -> String {
        if self.name.is_empty() {
            "listener".to_owned()
        } else {
            self.name.clone()
        }
    }

    /// One line saying where this session is, for the user.
    pub(crate) fn describe(&self) -> String {
        match &self.transport {
            Transport::Direct { iface, .. } => {
                let how = match self.room.source {
                    RoomSource::Configured => "from rooms.toml",
                    RoomSource::Derived => "derived from the room name",
                };
                format!(
                    "{} on {} ({how}) via {iface}",
                    self.room.name, self.room.group
                )
            }
            Transport::Via(via) => {
                format!("{} through mcchatd at {}", self.room.name, via.daemon())
            }
        }
    }

    /// The room.
    pub(crate) fn room(&self) -> &Room {
        &self.room
    }

    /// Who is in the room, this peer included, sorted by name.
    pub(crate) fn members(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .roster
            .members()
            .into_iter()
            .map(|m| m.name.clone())
            .collect();
        names.push(self.name.clone());
        names.sort();
        names
    }

    /// Dropped datagrams by reason.
    pub(crate) fn drops(&self) -> &DropCounts {
        &self.drops
    }

    async fn send_datagram(&mut self) -> std::io::Result<()> {
        match &self.transport {
            Transport::Direct { socket, .. } => {
                socket.send_to(self.out.as_bytes(), self.room.group).await?;
            }
            Transport::Via(via) => via.send(self.out.as_bytes()).await?,
        }
        Ok(())
    }

    /// Sends `text` as `kind`, split into several datagrams if it does not fit in one.
    /// Returns what was sent, for the front end to show.
    pub(crate) async fn send(&mut self, kind: Kind, text: &str) -> Result<Vec<Received>> {
        // The widest header this text may ever be sent with: its repair, which adds a tag.
        let widest = Header {
            extra: &[repair::REPAIR_TAG],
            ..self.header(kind, u64::MAX, u64::MAX)
        };
        let overhead = wire::overhead(&widest, self.room.name.as_str(), &self.name)?;
        let pieces = if text.is_empty() {
            vec![text]
        } else {
            wire::split_text(text, overhead)
        };
        let mut sent = Vec::with_capacity(pieces.len());
        for piece in pieces {
            // Only chat text takes a sequence number; control datagrams carry the latest one,
            // so a receiver can tell from a heartbeat that it missed the tail of a burst.
            if matches!(kind, Kind::Message | Kind::Action) {
                self.seq += 1;
            }
            let ts_ms = now_ms();
            let header = self.header(kind, self.seq, ts_ms);
            wire::encode(
                &header,
                self.room.name.as_str(),
                &self.name,
                piece,
                &mut self.out,
            )
            .with_context(|| format!("cannot send to room {}", self.room.name))?;
            if matches!(kind, Kind::Message | Kind::Action) {
                self.sent.push(
                    self.seq,
                    (kind, ts_ms, piece.to_owned()),
                    std::time::Instant::now(),
                );
                // Heartbeats 0.2, 0.6, 1.4 s and then every second for 10 s after the last
                // message carry its sequence number: receivers that lost the tail of a burst
                // (or were cut off for a few seconds) find out then, not 15 s later.
                if self.presence {
                    self.tail_probes = TAIL_PROBES;
                    self.heartbeat_due = self.heartbeat_due.min(Instant::now() + TAIL_PROBE);
                }
            }
            self.send_datagram()
                .await
                .with_context(|| format!("failed to send to room {}", self.room.name))?;
            sent.push(Received {
                kind,
                room: self.room.name.to_string(),
                sender: self.name.clone(),
                text: piece.to_owned(),
                ts_ms,
                recv_ms: ts_ms,
                from: None,
                instance: Some(self.instance),
                seq: Some(self.seq),
                repair: false,
            });
        }
        Ok(sent)
    }

    /// Sends a NACK for `nack`, and answers the ones addressed to us with repairs.
    async fn send_nack(&mut self, nack: &Nack) -> Result<()> {
        let seqs = repair::format_ranges(&nack.ranges);
        let target = nack.instance.to_string();
        let header = Header {
            meta: Meta {
                instance: Some(self.instance),
                seq: Some(self.seq),
                ts_ms: Some(now_ms()),
                kind: Kind::Nack,
            },
            extra: &[("for", &target), ("seqs", &seqs)],
        };
        let sender = self.sender_for_control();
        wire::encode(&header, self.room.name.as_str(), &sender, "", &mut self.out)?;
        self.send_datagram().await?;
        Ok(())
    }

    /// Answers a NACK: repairs if it asks for our messages, else holds back our own NACK
    /// for the same numbers (suppression).
    async fn on_nack(&mut self, frame: &wire::Frame<'_>) -> Result<()> {
        let Some(nack) = Nack::from_frame(frame) else {
            return Ok(());
        };
        let now = std::time::Instant::now();
        if nack.instance != self.instance {
            let Self { repair, jitter, .. } = self;
            repair.on_nack_seen(&nack, now, &mut || jitter.fraction());
            return Ok(());
        }
        let ranges = nack.ranges;
        let repairs: Vec<(u64, Sent)> = self
            .sent
            .repairs(&ranges, now)
            .into_iter()
            .take(MAX_REPAIRS_PER_NACK)
            .map(|(seq, m)| (seq, m.clone()))
            .collect();
        for (seq, (kind, ts, text)) in repairs {
            // A budget over all NACKs, so a confused or hostile receiver cannot make this
            // peer flood the room with retransmissions.
            if self.repair_budget.check(now).is_none() {
                break;
            }
            let header = Header {
                meta: Meta {
                    instance: Some(self.instance),
                    seq: Some(seq),
                    ts_ms: Some(ts),
                    kind,
                },
                extra: &[repair::REPAIR_TAG],
            };
            let name = self.name.clone();
            // Cannot fail for what `send` split (it left room for the tag); if it ever
            // did, that one repair is skipped rather than the session ended.
            if let Err(e) = wire::encode(
                &header,
                self.room.name.as_str(),
                &name,
                &text,
                &mut self.out,
            ) {
                tracing::debug!(error = %e, seq, "cannot encode a repair");
                continue;
            }
            if let Err(e) = self.send_datagram().await {
                self.transient(anyhow::Error::new(e).context("failed to send a repair"))?;
            }
        }
        Ok(())
    }

    fn lost_event(&self, instance: InstanceId, count: u64) -> Event {
        let sender = self
            .roster
            .name_of(instance)
            .map_or_else(|| format!("sender {instance}"), str::to_owned);
        Event::Lost { sender, count }
    }

    fn header(&self, kind: Kind, seq: u64, ts_ms: u64) -> Header<'static> {
        Header {
            meta: Meta {
                instance: Some(self.instance),
                seq: Some(seq),
                ts_ms: Some(ts_ms),
                kind,
            },
            extra: &[],
        }
    }

    /// Queues messages from mcchatd's history to be shown before anything live, and counts
    /// them as seen: a live copy or repair of one of them is a duplicate, and a gap is only
    /// looked for after the last one of each sender.
    pub(crate) fn preload(&mut self, messages: Vec<Received>) {
        let now = std::time::Instant::now();
        let mut latest: std::collections::HashMap<InstanceId, u64> =
            std::collections::HashMap::new();
        for m in &messages {
            if let (Some(i), Some(seq)) = (m.instance, m.seq) {
                let e = latest.entry(i).or_insert(seq);
                *e = (*e).max(seq);
            }
        }
        let Self { repair, jitter, .. } = self;
        for (instance, seq) in latest {
            if !repair.knows(instance) {
                repair.on_latest(instance, seq, now, &mut || jitter.fraction());
            }
        }
        self.pending
            .extend(messages.into_iter().map(Event::Message));
    }

    /// How long this peer's messages stay available for repair.
    pub(crate) fn set_repair_window(&mut self, window: Duration) {
        self.sent = SendBuffer::new(SEND_BUFFER, window, REPAIR_INTERVAL);
    }

    /// Says hello to the room (a `join`), if this session takes part in presence.
    pub(crate) async fn enter(&mut self) -> Result<()> {
        if self.presence {
            self.send(Kind::Join, "").await?;
        }
        Ok(())
    }

    /// Says goodbye (a `leave`) and ends a subscription through mcchatd.
    pub(crate) async fn leave(&mut self) -> Result<()> {
        let left = if self.presence {
            self.send(Kind::Leave, "").await.map(|_| ())
        } else {
            Ok(())
        };
        let room = self.room.name.to_string();
        let sender = self.sender_for_control();
        if let Transport::Via(via) = &mut self.transport {
            via.unsubscribe(&room, &sender).await;
        }
        left
    }

    /// When [`Session::tick`] should next run.
    pub(crate) fn heartbeat_due(&self) -> Instant {
        match &self.transport {
            Transport::Via(via) => self.heartbeat_due.min(via.renew_due()),
            Transport::Direct { .. } => self.heartbeat_due,
        }
    }

    /// Periodic work: a heartbeat (with presence), renewing a subscription through mcchatd,
    /// and expiring silent members. Returns who timed out. Transient network errors are
    /// logged, not returned: the session carries on.
    pub(crate) async fn tick(&mut self) -> Result<Vec<Event>> {
        let now = Instant::now();
        if now >= self.heartbeat_due {
            self.heartbeat_due = if self.tail_probes > 0 {
                self.tail_probes -= 1;
                let step = TAIL_PROBE * 2u32.pow(u32::from(TAIL_PROBES - self.tail_probes));
                now + step.min(TAIL_PROBE_MAX)
            } else {
                now + HEARTBEAT_INTERVAL
            };
            if self.presence
                && let Err(e) = self.send(Kind::Heartbeat, "").await
            {
                self.transient(e)?;
            }
        }
        let room = self.room.name.to_string();
        let sender = self.sender_for_control();
        if let Transport::Via(via) = &mut self.transport
            && now >= via.renew_due()
            && let Err(e) = via.renew(&room, &sender).await
        {
            let e = anyhow::Error::new(e).context("failed to renew the subscription");
            self.transient(e)?;
        }
        // Repair releases go through `pending`, in order with what recv already holds.
        self.repair_tick().await?;
        Ok(self
            .roster
            .expire(std::time::Instant::now())
            .into_iter()
            .map(Event::Presence)
            .collect())
    }

    /// Repair timers: what giving up on old gaps releases is queued for [`Session::recv`]
    /// first, in order and before any await (so a cancelled caller loses nothing); then the
    /// NACKs that are due are sent.
    async fn repair_tick(&mut self) -> Result<()> {
        let Self { repair, jitter, .. } = self;
        let (nacks, deliveries) = repair.poll(std::time::Instant::now(), &mut || jitter.fraction());
        for d in deliveries {
            let event = self.delivery(d);
            self.pending.push_back(event);
        }
        for nack in &nacks {
            // A long list of gaps goes out in several NACKs, each well under a datagram.
            for chunk in nack.ranges.chunks(32) {
                let part = Nack {
                    instance: nack.instance,
                    ranges: chunk.to_vec(),
                };
                if let Err(e) = self.send_nack(&part).await {
                    self.transient(e)?;
                }
            }
        }
        Ok(())
    }

    fn delivery(&self, d: Delivery<Received>) -> Event {
        match d {
            Delivery::Message(m) => Event::Message(m),
            Delivery::Lost { instance, count } => self.lost_event(instance, count),
        }
    }

    /// Logs a transient error (rate limited) and swallows it; returns a fatal one.
    fn transient(&mut self, e: anyhow::Error) -> Result<()> {
        if is_fatal(&e) {
            return Err(e);
        }
        if let Some(suppressed) = self.error_log.check(std::time::Instant::now()) {
            tracing::warn!(error = %format!("{e:#}"), suppressed, "network error; carrying on");
        }
        Ok(())
    }

    /// Waits for the next datagram worth showing. Malformed and foreign datagrams are counted
    /// and skipped here, transient socket errors logged; only a fatal one, or mcchatd ending
    /// the subscription, ends the wait with an error.
    pub(crate) async fn recv(&mut self) -> Result<Event> {
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            // Repair timers run while waiting: a gap found here must be NACKed in
            // milliseconds, whatever the front end's own timers are.
            let repair_due = self.repair.next_deadline().map(Instant::from_std);
            let r = tokio::select! {
                r = async {
                    match &self.transport {
                        Transport::Direct { socket, .. } => socket.recv_from(&mut buf).await,
                        Transport::Via(via) => via.recv(&mut buf).await,
                    }
                } => r,
                () = sleep_until_opt(repair_due) => {
                    self.repair_tick().await?;
                    continue;
                }
            };
            let (len, from) = match r {
                Ok(r) => r,
                Err(e) => {
                    let e = anyhow::Error::new(e)
                        .context(format!("failed to receive in room {}", self.room.name));
                    self.transient(e)?;
                    continue;
                }
            };
            let recv_ms = now_ms();
            // A datagram longer than the buffer is truncated to it, which still reads as
            // oversize.
            let frame = match wire::decode(&buf[..len])
                .and_then(|f| f.check_room(self.room.name.as_str()).map(|()| f))
            {
                Ok(f) => f,
                Err(reason) => {
                    let count = self.drops.add(reason);
                    if let Some(suppressed) = self.drop_log.check(std::time::Instant::now()) {
                        tracing::debug!(%from, %reason, count, suppressed, len, "dropped datagram");
                    }
                    continue;
                }
            };
            if frame.meta.instance == Some(self.instance) {
                continue; // our own, looped back
            }
            let kind = frame.meta.kind;
            if kind.is_relay_control() {
                let room = self.room.name.to_string();
                let sender = self.sender_for_control();
                if let Transport::Via(via) = &mut self.transport {
                    via.on_control(&frame, &room, &sender).await?;
                }
                continue;
            }
            let is_repair = frame.tags.get(repair::REPAIR_TAG.0).is_some();
            let received = Received {
                kind,
                room: frame.room.to_owned(),
                sender: frame.sender.to_owned(),
                text: frame.text.to_owned(),
                ts_ms: frame.meta.ts_ms.unwrap_or(recv_ms),
                recv_ms,
                from: Some(from),
                instance: frame.meta.instance,
                seq: frame.meta.seq,
                repair: is_repair,
            };
            let Some(instance) = frame.meta.instance else {
                // A bare datagram: shown as it comes; it cannot be repaired.
                if matches!(kind, Kind::Message | Kind::Action) {
                    return Ok(Event::Message(received));
                }
                continue;
            };
            let now = std::time::Instant::now();
            // mcchatd repeats a departed sender's leave (as a repair) so tail loss is found;
            // that is not news about who is here.
            let change = if is_repair && kind == Kind::Leave {
                None
            } else {
                self.roster.observe(instance, frame.sender, kind, now)
            };
            if let Some(change) = change {
                if matches!(change, Change::Joined(_)) && self.presence {
                    // Answer a newcomer soon, with jitter so a full room does not answer
                    // at once, so its /who is complete without waiting a whole interval.
                    let jitter = Duration::from_millis(u64::from(getrandom_u16() % 500));
                    self.heartbeat_due = self.heartbeat_due.min(Instant::now() + jitter);
                }
                self.pending.push_back(Event::Presence(change));
            }
            let Self { repair, jitter, .. } = self;
            let mut jitter = || jitter.fraction();
            match (kind, frame.meta.seq) {
                (Kind::Nack, _) => self.on_nack(&frame).await?,
                (Kind::Message | Kind::Action, Some(_)) if !repair.knows(instance) && is_repair => {
                    // A repair for someone else, from a sender we have not followed: it is
                    // history, not where this sender stands.
                }
                (Kind::Message | Kind::Action, Some(seq)) => {
                    if !repair.knows(instance) && started_recently(seq, received.ts_ms, recv_ms) {
                        // Its join was lost, but it started moments ago: follow it from its
                        // first message, so what was lost before this one is repaired too.
                        repair.on_latest(instance, 0, now, &mut jitter);
                    }
                    let deliveries = repair.on_message(instance, seq, received, now, &mut jitter);
                    for d in deliveries {
                        let event = self.delivery(d);
                        self.pending.push_back(event);
                    }
                }
                (Kind::Message | Kind::Action, None) => {
                    self.pending.push_back(Event::Message(received));
                }
                (Kind::Join | Kind::Heartbeat | Kind::Leave, Some(latest)) => {
                    repair.on_latest(instance, latest, now, &mut jitter);
                }
                _ => {}
            }
        }
    }

    /// Logs a one-line summary of dropped datagrams, if any.
    pub(crate) fn log_drops(&self) {
        if self.drops.total() > 0 {
            let by_reason: Vec<String> = self
                .drops
                .nonzero()
                .map(|(r, n)| format!("{r}={n}"))
                .collect();
            tracing::info!(
                room = %self.room.name,
                total = self.drops.total(),
                reasons = %by_reason.join(" "),
                "dropped datagrams"
            );
        }
    }
}

/// Whether a sender first heard through message `seq`, sent at `ts_ms`, started so recently
/// that everything it sent is still in its repair buffer: a low sequence number, sent within
/// the last few seconds (by clocks a LAN keeps within that).
fn started_recently(seq: u64, ts_ms: u64, now_ms: u64) -> bool {
    seq <= 64 && now_ms.abs_diff(ts_ms) < 4_000
}

/// Sleeps until `due`, or forever if there is none.
async fn sleep_until_opt(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn getrandom_u16() -> u16 {
    InstanceId::random().map_or(0, |id| id.0 as u16)
}
