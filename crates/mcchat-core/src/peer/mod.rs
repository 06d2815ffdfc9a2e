//! One peer in one room as a pure state machine, as quinn-proto builds a QUIC connection: the
//! [`PeerEngine`] takes datagrams, the user's lines and the time, and queues [`Effect`]s
//! (datagrams to send, events to show). It does no I/O, reads no clock and draws no random
//! numbers of its own (the seed comes in), and never awaits; a driver loop feeds it and
//! performs what it queues. So a `select!` arm cancelled in the driver can never leave a
//! repair or NACK half done, and the tests run minutes of timers in microseconds.
//!
//! - this file: the engine (decoding, presence, repair on both sides, the budgets);
//! - `heartbeat`: when presence heartbeats and tail probes go out;
//! - `relay`: the client side of mcchatd's subscription protocol (`--via`).

mod heartbeat;
mod relay;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::presence::{Change, MEMBER_TIMEOUT, Roster};
use crate::ratelimit::LogLimiter;
use crate::repair::{
    self, ByteBudget, Delivery, Nack, Receiver, RepairConfig, RepairStats, SendBuffer, SplitMix64,
};
use crate::tags;
use crate::wire::{self, DropCounts, EncodeError, Header, InstanceId, Kind, MAX_DATAGRAM, Meta};

use heartbeat::Heartbeat;
use relay::RelayClient;

/// The time, as the engine needs it: monotonic for timers, the wall clock for `ts` tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// For every timer and deadline.
    pub mono: Instant,
    /// Milliseconds since the Unix epoch: what `ts` tags carry and messages are shown with.
    pub unix_ms: u64,
}

/// A message as the front ends show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// What kind of message.
    pub kind: Kind,
    /// The room named in the datagram (always the engine's room).
    pub room: String,
    /// Who sent it.
    pub sender: String,
    /// The text, not yet sanitised.
    pub text: String,
    /// The sender's timestamp, or the arrival time for bare datagrams (ms since the epoch).
    pub ts_ms: u64,
    /// When it arrived here (ms since the epoch): what the terminal shows, since a sender's
    /// clock may be wrong.
    pub recv_ms: u64,
    /// The datagram's source address; `None` for this peer's own messages and history.
    pub from: Option<SocketAddr>,
    /// The sender's instance id, if tagged.
    pub instance: Option<InstanceId>,
    /// The sender's sequence number, if tagged.
    pub seq: Option<u64>,
    /// Whether it arrived as a retransmission (a repair), not the first sending.
    pub repair: bool,
}

impl From<crate::control::HistoryRecord> for Received {
    /// A stored message as the engine takes it (history shown before anything live, a view
    /// preloaded from it).
    fn from(r: crate::control::HistoryRecord) -> Self {
        Self {
            kind: if r.kind == Kind::Action.name() {
                Kind::Action
            } else {
                Kind::Message
            },
            room: r.room,
            sender: r.sender,
            text: r.text,
            ts_ms: r.ts_ms.unwrap_or(r.recv_ms),
            recv_ms: r.recv_ms,
            from: None,
            instance: r.id.as_deref().and_then(InstanceId::parse),
            seq: r.seq,
            repair: false,
        }
    }
}

/// Something for a front end to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message or action.
    Message(Received),
    /// Somebody came or went.
    Presence(Change),
    /// `count` messages from `sender` could not be repaired (`sender` may name several).
    Lost {
        /// Who (a name, an instance, or "N senders").
        sender: String,
        /// How many messages.
        count: u64,
    },
    /// The relay confirmed the subscription for the first time (for a one-shot sender with
    /// `--via`: the daemon's first cookie came, so what it says is relayed as proven).
    Subscribed,
    /// The engine cannot go on (the relay ended the subscription or never answered): the
    /// driver ends with this as its error.
    Ended(String),
}

/// What the engine asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send `bytes` as one datagram to `to`.
    Send {
        /// The room's group, or the daemon with `--via`.
        to: SocketAddr,
        /// The datagram.
        bytes: Vec<u8>,
    },
    /// Show an event.
    Show(Event),
}

/// How an engine takes part in its room.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The room's name.
    pub room: String,
    /// The sender name; empty for a listener, which sends as `listener`.
    pub name: String,
    /// Takes part in presence (join, heartbeats, leave): `join` does, `listen` and `send`
    /// do not.
    pub presence: bool,
    /// Shows this peer's own messages (the terminal does; a pipe does not).
    pub echo_own: bool,
    /// Where datagrams go: the room's group, or the daemon's relay port.
    pub dest: SocketAddr,
    /// Subscribes through mcchatd at `dest` (`--via` with `join` or `listen`).
    pub subscribe: bool,
    /// Proves its address to mcchatd at `dest` without subscribing (`--via` with `send`):
    /// one round trip for a cookie, so the daemon relays it under its own budget.
    pub prove: bool,
    /// How long own messages stay available for repair.
    pub repair_window: Duration,
    /// The receiver's knobs and budgets.
    pub repair: RepairConfig,
    /// Repairs of own messages per second (lower through mcchatd, whose per-source rate
    /// they must leave room in).
    pub repairs_per_second: u32,
}

/// Bytes kept free in datagrams to mcchatd for the cookie [`PeerEngine::send`] puts in front
/// (`cookie=TIME.MAC;`: 8 bytes, at most 16 hex digits of time and 24 of MAC), so that no
/// message of a `--via` sender, or repair of one, goes unproven for want of room.
const COOKIE_RESERVE: usize = 8 + 16 + 1 + 24;

/// Own messages kept for repair: the last this many (what receivers follow, too).
pub const SEND_BUFFER: usize = 1024;
/// ... for this long by default (`mcchat join --repair-window`): long enough to repair an
/// outage of several seconds once a tail probe gets through.
pub const REPAIR_WINDOW: Duration = Duration::from_secs(30);
/// Repairs answered per NACK, and per second over all NACKs.
pub const MAX_REPAIRS_PER_NACK: usize = 128;
/// Repairs per second over all NACKs.
pub const REPAIRS_PER_SECOND: u32 = 2000;
/// One loss seen by many receivers is repaired once within this.
pub const REPAIR_INTERVAL: Duration = Duration::from_millis(20);
/// Repair bytes allowed per repair window: twice what is held for repair, but at least
/// this, so a peer that said little can still repair it on a bad link.
pub const MIN_REPAIR_BYTES: usize = 64 * 1024;
/// Loss notices shown one by one per call; the rest are summed in one (a flood of made-up
/// senders given up at once is one line, not thousands).
const LOST_NOTICES: usize = 8;
/// What the repair tag adds in front of a tagged datagram: `repair=1;`.
const REPAIR_TAG_BYTES: usize = repair::REPAIR_TAG.0.len() + repair::REPAIR_TAG.1.len() + 2;
/// Loss notices of senders heard only through presence: one per this, the rest summed.
pub const UNHEARD_LOST_EVERY: Duration = Duration::from_secs(10);
/// How often silent members are looked for.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

impl PeerConfig {
    /// A config with the defaults for the rest.
    pub fn new(room: &str, name: &str, dest: SocketAddr) -> Self {
        Self {
            room: room.to_owned(),
            name: name.to_owned(),
            presence: !name.is_empty(),
            echo_own: false,
            dest,
            subscribe: false,
            prove: false,
            repair_window: REPAIR_WINDOW,
            repair: RepairConfig::default(),
            repairs_per_second: REPAIRS_PER_SECOND,
        }
    }
}

/// What a sender keeps of each message to repair it: kind, timestamp, text.
type Sent = (Kind, u64, String);

/// Counters of the sending side, for `/stats` and the tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Datagrams sent (all kinds).
    pub sent: u64,
    /// Repairs sent for this peer's own messages.
    pub repairs_sent: u64,
    /// Bytes of those repairs.
    pub repair_bytes: u64,
    /// Repairs refused by the rate or byte budget.
    pub repairs_refused: u64,
    /// Heartbeats sent.
    pub heartbeats: u64,
}

/// One peer in one room (see the module docs).
#[derive(Debug)]
pub struct PeerEngine {
    config: PeerConfig,
    instance: InstanceId,
    seq: u64,
    rng: SplitMix64,
    out: String,
    effects: VecDeque<Effect>,
    roster: Roster,
    expire_due: Instant,
    receiver: Receiver<Received>,
    sent: SendBuffer<Sent>,
    repair_rate: LogLimiter,
    repair_bytes: ByteBudget,
    heartbeat: Heartbeat,
    relay: Option<RelayClient>,
    drops: DropCounts,
    drop_log: LogLimiter,
    stats: PeerStats,
    /// Loss notices shown in the current call, and those summed.
    lost_shown: usize,
    lost_more: (u64, u64),
    /// Losses of senders heard only through presence, summed: (senders, messages), and when
    /// the next such notice may be shown.
    unheard_lost: (u64, u64),
    unheard_next: Option<Instant>,
    /// When a newcomer last brought the next heartbeat forward.
    early_heartbeat: Option<Instant>,
}

impl PeerEngine {
    /// An engine for `config`, as instance `instance`, with its random numbers drawn from
    /// `seed`.
    pub fn new(config: PeerConfig, instance: InstanceId, seed: u64, now: Now) -> Self {
        // The subscription's nonce, from a stream of its own so the engine's draws stay as
        // they are; unpredictable as the seed is.
        let nonce = format!(
            "{:016x}",
            SplitMix64(seed ^ 0x6e6f_6e63_655f_6d63).next_u64()
        );
        let relay = (config.subscribe || config.prove)
            .then(|| RelayClient::new(config.dest, nonce, config.subscribe));
        let repairs_per_second = config.repairs_per_second;
        Self {
            receiver: Receiver::new(config.repair),
            sent: SendBuffer::new(SEND_BUFFER, config.repair_window, REPAIR_INTERVAL),
            config,
            instance,
            seq: 0,
            rng: SplitMix64(seed),
            out: String::with_capacity(MAX_DATAGRAM),
            effects: VecDeque::new(),
            roster: Roster::new(MEMBER_TIMEOUT),
            expire_due: now.mono + EXPIRE_EVERY,
            repair_rate: LogLimiter::new(repairs_per_second, Duration::from_secs(1)),
            repair_bytes: ByteBudget::default(),
            heartbeat: Heartbeat::new(now.mono),
            relay,
            drops: DropCounts::default(),
            drop_log: LogLimiter::default(),
            stats: PeerStats::default(),
            lost_shown: 0,
            lost_more: (0, 0),
            unheard_lost: (0, 0),
            unheard_next: None,
            early_heartbeat: None,
        }
    }

    /// This run's instance id.
    pub fn instance(&self) -> InstanceId {
        self.instance
    }

    /// The next effect to perform, oldest first.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// Whether this engine talks to mcchatd before anything else (`--via`): it subscribes
    /// (`join`, `listen`) or proves its address (`send`); [`Event::Subscribed`] says when.
    pub fn subscribes(&self) -> bool {
        self.relay.is_some()
    }

    /// Whether the relay has confirmed the subscription (always false without `--via`).
    pub fn subscribed(&self) -> bool {
        self.relay.as_ref().is_some_and(RelayClient::subscribed)
    }

    /// Who is in the room, this peer included (if it takes part in presence), by name.
    pub fn members(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .roster
            .members()
            .into_iter()
            .map(|m| m.name.clone())
            .collect();
        if self.config.presence {
            names.push(self.config.name.clone());
        }
        names.sort();
        names
    }

    /// Dropped datagrams by reason.
    pub fn drops(&self) -> &DropCounts {
        &self.drops
    }

    /// The sending side's counters.
    pub fn stats(&self) -> PeerStats {
        self.stats
    }

    /// The receiving side's counters.
    pub fn repair_stats(&self) -> RepairStats {
        self.receiver.stats()
    }

    /// What the receiver holds: (senders followed, missing numbers, held bytes).
    pub fn receiver_load(&self) -> (usize, usize, usize) {
        (
            self.receiver.senders(),
            self.receiver.missing(),
            self.receiver.held_bytes(),
        )
    }

    fn control_sender(&self) -> &str {
        if self.config.name.is_empty() {
            "listener"
        } else {
            &self.config.name
        }
    }

    fn send_out(&mut self) {
        let bytes = self.out.as_bytes().to_vec();
        self.send(bytes);
    }

    /// Sends `bytes`; through mcchatd with the cookie in front (hop-by-hop), which proves
    /// that this address sent it: the daemon answers NACKs from its cache only then, and
    /// relays a proven source under its own budget rather than the small one of all
    /// unproven sources (PROTOCOL.md 4.3). Without room for the tag it goes bare.
    fn send(&mut self, bytes: Vec<u8>) {
        if let Some(cookie) = self.relay.as_ref().and_then(RelayClient::proof) {
            let mut tagged = Vec::with_capacity(bytes.len() + cookie.len() + 9);
            if tags::add_hop_tag(&bytes, tags::COOKIE, cookie, &mut tagged).is_ok() {
                return self.send_raw(tagged);
            }
        }
        self.send_raw(bytes);
    }

    fn send_raw(&mut self, bytes: Vec<u8>) {
        self.stats.sent += 1;
        self.effects.push_back(Effect::Send {
            to: self.config.dest,
            bytes,
        });
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

    /// Starts the subscription through mcchatd (with `--via`), unless it has started:
    /// [`Event::Subscribed`] or [`Event::Ended`] tells how it went.
    pub fn subscribe(&mut self, now: Now) {
        if let Some(relay) = &mut self.relay
            && relay.idle()
        {
            relay.subscribe(now.mono);
        }
        self.relay_requests();
    }

    /// Starts taking part: a `join` (with presence) and the subscription (with `--via`, if
    /// [`PeerEngine::subscribe`] has not started it).
    pub fn enter(&mut self, now: Now) {
        if self.config.presence {
            // Cannot fail: an empty join of a valid room and name.
            let _ = self.say(Kind::Join, "", now);
        }
        self.subscribe(now);
    }

    /// Says goodbye: a `leave` (with presence) and the end of the subscription.
    pub fn leave(&mut self, now: Now) {
        if self.config.presence {
            let _ = self.say(Kind::Leave, "", now);
        }
        if let Some(relay) = &mut self.relay {
            relay.unsubscribe();
        }
        self.relay_requests();
    }

    /// Sends `text` as `kind`, split into several datagrams if it does not fit in one.
    pub fn say(&mut self, kind: Kind, text: &str, now: Now) -> Result<(), EncodeError> {
        let chat = matches!(kind, Kind::Message | Kind::Action);
        let mut rest = text;
        loop {
            // Only chat text takes a sequence number; control datagrams carry the latest one,
            // so a receiver can tell from a heartbeat that it missed the tail of a burst.
            let seq = if chat { self.seq + 1 } else { self.seq };
            let header = self.header(kind, seq, now.unix_ms);
            // Each piece against its own header (seq may gain a digit), within the datagram
            // less the hop-by-hop reserve: its repair, or a relay, adds tags in front.
            let overhead = wire::overhead(&header, &self.config.room, &self.config.name)?
                + if self.relay.is_some() {
                    COOKIE_RESERVE
                } else {
                    0
                };
            let (piece, tail) = wire::split_first(rest, overhead);
            rest = tail;
            wire::encode(
                &header,
                &self.config.room,
                &self.config.name,
                piece,
                &mut self.out,
            )?;
            self.seq = seq;
            if chat {
                let bytes = self.out.len() + REPAIR_TAG_BYTES;
                self.sent
                    .push(seq, (kind, now.unix_ms, piece.to_owned()), bytes, now.mono);
                if self.config.presence {
                    self.heartbeat.after_message(now.mono);
                }
            }
            self.send_out();
            if chat && self.config.echo_own {
                self.effects
                    .push_back(Effect::Show(Event::Message(Received {
                        kind,
                        room: self.config.room.clone(),
                        sender: self.config.name.clone(),
                        text: piece.to_owned(),
                        ts_ms: now.unix_ms,
                        recv_ms: now.unix_ms,
                        from: None,
                        instance: Some(self.instance),
                        seq: Some(seq),
                        repair: false,
                    })));
            }
            if rest.is_empty() {
                return Ok(());
            }
        }
    }

    /// Messages from mcchatd's history, shown before anything live and counted as seen: a
    /// live copy or repair of one of them is a duplicate, and gaps are looked for only after
    /// the last one of each sender (tentatively: see [`Receiver::on_history`]).
    pub fn preload(&mut self, messages: Vec<Received>, now: Now) {
        // Senders already followed (heard while subscribing): their history goes through the
        // receiver like a repair, so nothing is shown twice or out of order.
        let followed: HashSet<InstanceId> = messages
            .iter()
            .filter_map(|m| m.instance)
            .filter(|i| self.receiver.knows(*i))
            .collect();
        let mut by_sender: HashMap<InstanceId, Vec<u64>> = HashMap::new();
        for m in &messages {
            if let (Some(i), Some(seq)) = (m.instance, m.seq)
                && !followed.contains(&i)
            {
                by_sender.entry(i).or_default().push(seq);
            }
        }
        for (instance, seqs) in by_sender {
            let out = self.receiver.on_history(instance, &seqs, now.mono);
            self.deliver(out, now.mono);
        }
        for m in messages {
            match (m.instance, m.seq) {
                (Some(i), Some(seq)) if followed.contains(&i) => {
                    let bytes = m.text.len() + m.sender.len();
                    let out =
                        self.receiver
                            .on_message(i, seq, m, bytes, true, now.mono, &mut self.rng);
                    self.deliver(out, now.mono);
                }
                _ => self.effects.push_back(Effect::Show(Event::Message(m))),
            }
        }
        self.flush_lost(now.mono);
    }

    /// A datagram from `from`.
    pub fn on_datagram(&mut self, bytes: &[u8], from: SocketAddr, now: Now) {
        let frame = match wire::decode(bytes)
            .and_then(|f| f.check_room(&self.config.room).map(|()| f))
        {
            Ok(f) => f,
            Err(reason) => {
                let count = self.drops.add(reason);
                if let Some(suppressed) = self.drop_log.check(now.mono) {
                    tracing::debug!(%from, %reason, count, suppressed, len = bytes.len(), "dropped datagram");
                }
                return;
            }
        };
        if frame.meta.instance == Some(self.instance) {
            return; // our own, looped back
        }
        let kind = frame.meta.kind;
        if kind.is_relay_control() {
            if let Some(relay) = &mut self.relay
                && let Some(event) = relay.on_control(&frame, &self.config.room, now.mono)
            {
                self.effects.push_back(Effect::Show(event));
            }
            self.relay_requests();
            return;
        }
        let is_repair = frame.tags.get(repair::REPAIR_TAG.0).is_some();
        // Only chat is kept and shown: heartbeats and NACKs (what a flood is made of) are
        // never copied out of the datagram.
        let received = || Received {
            kind,
            room: frame.room.to_owned(),
            sender: frame.sender.to_owned(),
            text: frame.text.to_owned(),
            ts_ms: frame.meta.ts_ms.unwrap_or(now.unix_ms),
            recv_ms: now.unix_ms,
            from: Some(from),
            instance: frame.meta.instance,
            seq: frame.meta.seq,
            repair: is_repair,
        };
        let Some(instance) = frame.meta.instance else {
            // A bare datagram: shown as it comes; it cannot be repaired.
            if matches!(kind, Kind::Message | Kind::Action) {
                self.effects
                    .push_back(Effect::Show(Event::Message(received())));
            }
            return;
        };
        // A repair is not news about who is here: it may come from mcchatd's cache after
        // the sender left, and mcchatd repeats a departed sender's leave (as a repair) so
        // tail loss is found.
        let change = if is_repair {
            None
        } else {
            self.roster
                .observe(instance, frame.sender, kind, frame.meta.seq, now.mono)
        };
        if let Some(change) = change {
            if matches!(change, Change::Joined(_)) && self.config.presence {
                // Answer a newcomer soon, with jitter so a full room does not answer at once,
                // so its /who is complete without waiting a whole interval.
                let jitter = Duration::from_millis(self.rng.next_u64() % 500);
                // At most one early heartbeat a second: forged joins cannot make this peer
                // heartbeat at their rate.
                if self
                    .early_heartbeat
                    .is_none_or(|t| now.mono.saturating_duration_since(t) >= Duration::from_secs(1))
                {
                    self.early_heartbeat = Some(now.mono);
                    self.heartbeat.soon(now.mono + jitter);
                }
            }
            self.effects
                .push_back(Effect::Show(Event::Presence(change)));
        }
        let bytes_len = bytes.len();
        match (kind, frame.meta.seq) {
            (Kind::Nack, _) => {
                if let Some(nack) = Nack::from_frame(&frame) {
                    self.on_nack(&nack, now);
                }
            }
            (Kind::Message | Kind::Action, Some(seq)) => {
                let received = received();
                if !is_repair
                    && !self.receiver.knows(instance)
                    && started_recently(seq, received.ts_ms, now.unix_ms)
                {
                    // Its join was lost, but it started moments ago: follow it from its first
                    // message, so what was lost before this one is repaired too.
                    let out = self.receiver.follow_from(instance, 1, now.mono);
                    self.deliver(out, now.mono);
                }
                let out = self.receiver.on_message(
                    instance,
                    seq,
                    received,
                    bytes_len,
                    is_repair,
                    now.mono,
                    &mut self.rng,
                );
                self.deliver(out, now.mono);
            }
            (Kind::Message | Kind::Action, None) => {
                self.effects
                    .push_back(Effect::Show(Event::Message(received())));
            }
            (Kind::Join | Kind::Heartbeat, Some(latest)) => {
                let out = self
                    .receiver
                    .on_latest(instance, latest, now.mono, &mut self.rng);
                self.deliver(out, now.mono);
            }
            (Kind::Leave, Some(latest)) => {
                if !is_repair || self.receiver.knows(instance) {
                    let out = self
                        .receiver
                        .on_latest(instance, latest, now.mono, &mut self.rng);
                    self.deliver(out, now.mono);
                }
                // Its state is freed once its last gaps are repaired or given up.
                self.receiver.forget(instance);
            }
            (Kind::Leave, None) => self.receiver.forget(instance),
            _ => {}
        }
        self.flush_lost(now.mono);
    }

    /// Answers a NACK: repairs if it asks for our messages, else holds back our own NACK for
    /// the same numbers (suppression).
    fn on_nack(&mut self, nack: &Nack, now: Now) {
        if nack.instance != self.instance {
            self.receiver.on_nack_seen(nack, now.mono, &mut self.rng);
            return;
        }
        let Self {
            sent,
            repair_rate,
            repair_bytes,
            stats,
            config,
            ..
        } = self;
        // Budgets over all NACKs, so a confused or hostile receiver cannot make this peer
        // flood the room: a rate, and bytes weighed against what this peer holds.
        let held = sent.bytes(now.mono);
        let cap = (2 * held).max(MIN_REPAIR_BYTES);
        let window = config.repair_window.max(Duration::from_secs(1));
        repair_bytes.expire(now.mono, window);
        let repairs: Vec<(u64, Sent)> = sent
            .repairs(&nack.ranges, now.mono, MAX_REPAIRS_PER_NACK, |bytes| {
                let ok = repair_bytes.fits(bytes, cap) && repair_rate.check(now.mono).is_some();
                if ok {
                    repair_bytes.spend(bytes, now.mono, window);
                } else {
                    stats.repairs_refused += 1;
                }
                ok
            })
            .into_iter()
            .map(|(seq, m)| (seq, m.clone()))
            .collect();
        for (seq, (kind, ts, text)) in repairs {
            let header = Header {
                meta: Meta {
                    instance: Some(self.instance),
                    seq: Some(seq),
                    ts_ms: Some(ts),
                    kind,
                },
                extra: &[],
            };
            // The original again, with the repair tag in front (a hop-by-hop tag). Cannot fail
            // for what `say` split (it left the hop-by-hop reserve free); if it ever did, that
            // one repair is skipped rather than the peer stopped.
            let (key, value) = repair::REPAIR_TAG;
            let mut bytes = Vec::with_capacity(self.out.len() + REPAIR_TAG_BYTES);
            if let Err(e) = wire::encode(
                &header,
                &self.config.room,
                &self.config.name,
                &text,
                &mut self.out,
            ) {
                tracing::debug!(error = %e, seq, "cannot encode a repair");
                continue;
            }
            if let Err(e) = tags::add_hop_tag(self.out.as_bytes(), key, value, &mut bytes) {
                tracing::debug!(error = %e, seq, "cannot tag a repair");
                continue;
            }
            self.stats.repairs_sent += 1;
            self.stats.repair_bytes += bytes.len() as u64;
            self.send(bytes);
        }
    }

    /// Timer work due at `now`: NACKs, gaps given up, heartbeats, silent members, renewals.
    pub fn poll(&mut self, now: Now) {
        let (nacks, out) = self.receiver.poll(now.mono, &mut self.rng);
        self.deliver(out, now.mono);
        for nack in &nacks {
            self.send_nack(nack, now);
        }
        if self.config.presence && self.heartbeat.due(now.mono) {
            self.stats.heartbeats += 1;
            let _ = self.say(Kind::Heartbeat, "", now);
            self.heartbeat.fired(now.mono);
        }
        if now.mono >= self.expire_due {
            self.expire_due = now.mono + EXPIRE_EVERY;
            for (instance, change) in self.roster.expire(now.mono) {
                self.receiver.forget(instance);
                self.effects
                    .push_back(Effect::Show(Event::Presence(change)));
            }
        }
        if let Some(relay) = &mut self.relay
            && let Some(event) = relay.poll(now.mono)
        {
            self.effects.push_back(Effect::Show(event));
        }
        self.relay_requests();
        self.flush_lost(now.mono);
    }

    /// When [`PeerEngine::poll`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let heartbeat = self.config.presence.then(|| self.heartbeat.next());
        let expire = (!self.roster.is_empty()).then_some(self.expire_due);
        let relay = self.relay.as_ref().and_then(RelayClient::next_deadline);
        let unheard = (self.unheard_lost.0 > 0)
            .then_some(self.unheard_next)
            .flatten();
        [
            heartbeat,
            expire,
            relay,
            unheard,
            self.receiver.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Encodes the relay requests the client state machine asked for.
    fn relay_requests(&mut self) {
        let Some(relay) = &mut self.relay else {
            return;
        };
        let requests = relay.take_requests();
        let cookie = relay.request_cookie().map(str::to_owned);
        let nonce = relay.nonce().to_owned();
        let sender = self.control_sender().to_owned();
        for kind in requests {
            if wire::relay_request(
                kind,
                &self.config.room,
                &sender,
                cookie.as_deref(),
                Some(&nonce),
                wire::MIN_RELAY_REQUEST,
                &mut self.out,
            )
            .is_ok()
            {
                // Requests carry their cookie in their own place.
                self.send_raw(self.out.as_bytes().to_vec());
            }
        }
    }

    fn send_nack(&mut self, nack: &Nack, now: Now) {
        let seqs = repair::format_ranges(&nack.ranges);
        let target = nack.instance.to_string();
        let header = Header {
            meta: Meta {
                instance: Some(self.instance),
                seq: Some(self.seq),
                ts_ms: Some(now.unix_ms),
                kind: Kind::Nack,
            },
            extra: &[("for", &target), ("seqs", &seqs)],
        };
        let sender = self.control_sender().to_owned();
        if wire::encode(&header, &self.config.room, &sender, "", &mut self.out).is_err() {
            return;
        }
        // Through mcchatd it carries the cookie (`send`): a forged NACK, which cannot, is not
        // answered from the daemon's cache, so it cannot aim the answer at this subscriber.
        self.send_out();
    }

    fn deliver(&mut self, out: Vec<Delivery<Received>>, now: Instant) {
        for d in out {
            match d {
                Delivery::Message(m) => self.effects.push_back(Effect::Show(Event::Message(m))),
                // A sender none of whose messages arrived (it may be one of thousands made
                // up by a flood): at most one such notice per interval; the rest are summed.
                Delivery::Lost {
                    count,
                    heard: false,
                    instance,
                } => {
                    let quiet = self.unheard_next.is_none_or(|t| now >= t);
                    if quiet && self.unheard_lost.0 == 0 {
                        self.unheard_next = Some(now + UNHEARD_LOST_EVERY);
                        self.show_lost(instance, count);
                    } else {
                        self.unheard_lost.0 += 1;
                        self.unheard_lost.1 = self.unheard_lost.1.saturating_add(count);
                    }
                }
                Delivery::Lost {
                    instance, count, ..
                } if self.lost_shown < LOST_NOTICES => {
                    self.lost_shown += 1;
                    self.show_lost(instance, count);
                }
                Delivery::Lost { count, .. } => {
                    self.lost_more.0 += 1;
                    self.lost_more.1 = self.lost_more.1.saturating_add(count);
                }
            }
        }
    }

    fn show_lost(&mut self, instance: InstanceId, count: u64) {
        let sender = self
            .roster
            .name_of(instance)
            .map_or_else(|| format!("sender {instance}"), str::to_owned);
        self.effects
            .push_back(Effect::Show(Event::Lost { sender, count }));
    }

    /// Ends a call: the loss notices beyond [`LOST_NOTICES`] as one, and those of senders
    /// heard only through presence once their interval has passed.
    fn flush_lost(&mut self, now: Instant) {
        let (senders, count) = std::mem::take(&mut self.lost_more);
        if senders > 0 {
            self.effects.push_back(Effect::Show(Event::Lost {
                sender: format!("{senders} other senders"),
                count,
            }));
        }
        self.lost_shown = 0;
        if self.unheard_lost.0 > 0 && self.unheard_next.is_none_or(|t| now >= t) {
            let (senders, count) = std::mem::take(&mut self.unheard_lost);
            self.unheard_next = Some(now + UNHEARD_LOST_EVERY);
            self.effects.push_back(Effect::Show(Event::Lost {
                sender: format!("{senders} senders heard only through presence"),
                count,
            }));
        }
    }
}

/// Whether a sender first heard through message `seq`, sent at `ts_ms`, started so recently
/// that everything it sent is still in its repair buffer: a low sequence number, sent within
/// the last few seconds (by clocks a LAN keeps within that).
fn started_recently(seq: u64, ts_ms: u64, now_ms: u64) -> bool {
    seq <= 64 && now_ms.abs_diff(ts_ms) < 4_000
}

#[cfg(test)]
mod tests;
