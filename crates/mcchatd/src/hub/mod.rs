//! The hub: everything mcchatd decides, with no I/O, as quinn-proto and hickory-dns's servers
//! are built. It owns the rooms and their members by port, admission, the relay-control
//! protocol (cookie, `sub`, `unsub`, `closed`), the repair cache, history policy, group
//! membership and the counters. Ports (the relay sockets, the joined groups) hand it what
//! arrived with [`Hub::on_input`]; it answers with [`Output`]s for the driver to carry out.
//! Time comes in as [`Now`]; randomness (the cookie key, the relay id) at construction.
//! It never awaits and never reads a clock, so every rule is unit-tested on injected time.
//!
//! The path of one datagram through it is told in docs/ARCHITECTURE.md.

pub(crate) mod admission;
mod control;
mod membership;
mod repairs;
pub(crate) mod routing;
pub(crate) mod site;
#[cfg(test)]
mod site_tests;
mod snapshot;
#[cfg(test)]
mod tests;
mod view;
pub(crate) mod web;
#[cfg(test)]
mod web_tests;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::IpNet;
use mcchat_core::peer::Now;
use mcchat_core::ratelimit::LogLimiter;
use mcchat_core::repair::{Nack, REPAIR_TAG};
use mcchat_core::room::{Room, RoomName, RoomSource};
use mcchat_core::tags;
use mcchat_core::wire::{self, Frame, Kind};

use crate::cache::{Outgoing, RepairCache};
use crate::cookie::CookieJar;
use crate::counters::{Counters, Drop};
use crate::history::{Policy, Retention};
use crate::settings::Settings;
use crate::subs::{Member, Subscriptions};
use admission::{Admission, Bucket};
use membership::Membership;
use routing::{PortKind, forwards};

/// The hop-by-hop tag on everything the hub sends to a group: `relay=ID`. Heard back with its
/// own ID, a datagram is the hub's own forward (multicast loopback) and is dropped.
pub(crate) const RELAY_TAG: &str = "relay";

/// How often the hub sweeps leases, idle buckets and old cache entries.
const TICK: Duration = Duration::from_secs(1);
/// How often rooms whose join failed are tried again.
const JOIN_RETRY: Duration = Duration::from_secs(10);

/// A unicast member: the address it sends from, and the local address its requests arrived
/// on (answers leave from there, or a client's connected socket would drop them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct UdpDest {
    pub(crate) addr: SocketAddr,
    pub(crate) src: Option<IpAddr>,
}

/// Where a datagram entered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Port {
    /// The relay port; `local` is the address the datagram was sent to, when known;
    /// `unicast` is false if it was sent to a group or the limited broadcast address.
    Relay {
        local: Option<IpAddr>,
        unicast: bool,
    },
    /// A joined group, by room and by the membership it was heard in.
    Group { room: RoomName, generation: u64 },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Output {
    /// Send to a room's group (from the relay socket of its family) with this TTL.
    ToGroup {
        group: SocketAddr,
        ttl: u32,
        data: Bytes,
    },
    /// Send to one unicast member.
    ToUdp { to: UdpDest, data: Bytes },
    /// Send one datagram to many unicast members (a room's subscribers) but `except`.
    FanOut {
        to: Arc<[UdpDest]>,
        except: Option<SocketAddr>,
        data: Bytes,
    },
    /// Join a room's group; report how it went with [`Hub::join_done`]. Datagrams heard there
    /// come in as [`Port::Group`] with this generation.
    Join {
        room: RoomName,
        group: SocketAddr,
        generation: u64,
    },
    /// Leave the membership of that generation.
    Leave { room: RoomName, generation: u64 },
    /// Store a chat datagram in history, received at `recv_ms`, as row `offset`.
    Record {
        data: Bytes,
        recv_ms: u64,
        offset: u64,
    },
    /// Send one frame to these web connections.
    ToWeb {
        to: Arc<[web::ConnId]>,
        frame: Arc<crate::web::protocol::WebFrame>,
    },
    /// A web connection is in a room: tell it, with its history.
    WebJoined {
        conn: web::ConnId,
        joined: web::Joined,
    },
    /// Tell a web connection what it asked for cannot be done; `close`: and close it.
    WebRefused {
        conn: web::ConnId,
        refusal: web::Refusal,
        close: bool,
    },
    /// Read a room's recent history for its new view ([`web::WebInput::Preload`]).
    WebPreload { room: RoomName },
    /// Publish to the other sites on `room`'s subject; `id` (`instance:seq`) lets the
    /// stream drop copies.
    ToSite {
        room: RoomName,
        data: Bytes,
        id: Option<String>,
    },
    /// The rooms the site link carries from now on (subscriptions and leases).
    SiteRooms(Vec<RoomName>),
}

/// The random parts of a hub, drawn by the driver.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seed {
    /// The HMAC key of the cookies.
    pub(crate) cookie_key: [u8; 64],
    /// This daemon's id in `relay` tags.
    pub(crate) relay_id: u32,
    /// Seeds the web clients' instance ids and engines.
    pub(crate) web: u64,
    /// Names this run's offsets when there is no history (with history, its epoch does).
    pub(crate) epoch: u64,
}

/// What a reload changed that only a restart applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Reconfigured {
    /// Keys whose new values wait for a restart.
    pub(crate) need_restart: Vec<&'static str>,
}

/// See the module documentation.
pub(crate) struct Hub {
    settings: Settings,
    relay_id: String,
    admission: Admission,
    cookies: CookieJar,
    subs: Subscriptions,
    groups: Membership,
    cache: RepairCache,
    repairs: repairs::RepairBudgets,
    /// Whether history is on (the driver opened it).
    recording: bool,
    policy: Policy,
    counters: Counters,
    web: web::Web,
    sites: site::Sites,
    out: VecDeque<Output>,
    /// [`Output::Record`]s, apart: the driver gets them before anything else, so that a
    /// message is with the history writer before anyone is sent it (a client that saw it
    /// finds it in history).
    records: VecDeque<Output>,
    /// Scratch for datagrams the hub writes.
    text: String,
    scratch: Vec<u8>,
    next_tick: Instant,
    next_join_retry: Instant,
    started: Instant,
    /// The wall clock (Unix seconds) when the hub started: cookie times count from it on the
    /// monotonic clock, so a step of the wall clock cannot expire or invalidate them.
    cookie_epoch: u64,
    drop_log: LogLimiter,
}

/// History retention for every room, from the settings.
pub(crate) fn history_policy(settings: &Settings) -> Policy {
    let d = &settings.daemon;
    let default = Retention {
        count: d.history_count,
        age: d.history_age,
    };
    let rooms = settings
        .registry
        .rooms()
        .map(|r| {
            let keep = Retention {
                count: r.history_count().unwrap_or(default.count),
                age: r.history_age().unwrap_or(default.age),
            };
            (r.name().to_string(), keep)
        })
        .collect();
    Policy {
        rooms,
        default,
        max_bytes: d.history_max_bytes,
    }
}

/// Whether a datagram is a retransmission.
fn is_repair(frame: &Frame<'_>) -> bool {
    frame.tags.get(REPAIR_TAG.0).is_some()
}

impl Hub {
    /// A hub for `settings`; `journal` is history's, if it is open; `connected` are the
    /// host's subnets (for `allow = ["connected"]`).
    pub(crate) fn new(
        settings: Settings,
        journal: Option<crate::history::Journal>,
        connected: Vec<IpNet>,
        seed: Seed,
        now: Now,
    ) -> Self {
        let d = &settings.daemon;
        let recording = journal.is_some();
        let (epoch, last_offset) = journal.map_or((seed.epoch, 0), |j| (j.epoch, j.last_id));
        let mut hub = Self {
            admission: Admission::new(d, connected),
            cookies: CookieJar::with_key(seed.cookie_key),
            subs: Subscriptions::new(crate::subs::Limits::new(d)),
            groups: Membership::default(),
            cache: RepairCache::new(d.repair_cache_bytes, d.repair_window),
            repairs: repairs::RepairBudgets::default(),
            relay_id: format!("{:08x}", seed.relay_id),
            recording,
            policy: history_policy(&settings),
            counters: Counters::default(),
            web: web::Web::new(epoch, last_offset, seed.web),
            sites: site::Sites::new(&settings.sites),
            out: VecDeque::new(),
            records: VecDeque::new(),
            text: String::with_capacity(wire::MAX_DATAGRAM),
            scratch: Vec::with_capacity(wire::MAX_DATAGRAM),
            next_tick: now.mono + TICK,
            next_join_retry: now.mono + JOIN_RETRY,
            started: now.mono,
            cookie_epoch: now.unix_ms / 1000,
            drop_log: LogLimiter::default(),
            settings,
        };
        hub.reconcile();
        hub
    }

    /// The next thing for the driver to do, if any: every queued record first.
    pub(crate) fn poll_output(&mut self) -> Option<Output> {
        self.records.pop_front().or_else(|| self.out.pop_front())
    }

    /// When [`Hub::poll`] next has work.
    pub(crate) fn next_deadline(&self) -> Instant {
        [self.cache.next_deadline(), self.web.next_deadline()]
            .into_iter()
            .flatten()
            .fold(self.next_tick, Instant::min)
    }

    /// Timers: standby repairs and leave repeats, lapsed leases, idle buckets, join retries.
    pub(crate) fn poll(&mut self, now: Now) {
        let repairs = self.cache.poll(now.mono);
        self.send_repairs(repairs, now.mono);
        self.poll_web(now);
        if now.mono < self.next_tick {
            return;
        }
        self.next_tick = now.mono + TICK;
        self.close_idle_views();
        self.tick_sites(now.mono);
        self.cache.expire(now.mono);
        self.admission.forget_idle(now.mono);
        let cookie_time = self.cookie_time(now);
        self.cookies.forget_expired(cookie_time);
        let window = self.repair_window();
        self.repairs.forget_idle(now.mono, window);
        let lapsed = self.subs.expire(now.mono);
        if !lapsed.is_empty() {
            for l in &lapsed {
                tracing::info!(room = %l.room, addr = %l.addr, name = %l.name, "subscription expired");
            }
            self.counters.expired += lapsed.len() as u64;
            self.reconcile();
        }
        if now.mono >= self.next_join_retry {
            self.next_join_retry = now.mono + JOIN_RETRY;
            // Rooms kept joined (keep, history) whose join failed, e.g. the interface was
            // not up yet at start, are tried again.
            self.groups.clear_failures();
            self.reconcile();
        }
    }

    /// The host's subnets changed.
    pub(crate) fn set_connected(&mut self, connected: Vec<IpNet>) {
        self.admission.set_connected(connected);
        self.close_disallowed();
    }

    /// Ends the subscriptions of sources the allow list no longer admits (after a reload or
    /// a change of the host's subnets), telling them why.
    pub(super) fn close_disallowed(&mut self) {
        let gone: Vec<(RoomName, Member)> = self
            .subs
            .all()
            .filter(|(_, m)| !self.admission.allowed(m.dest.addr.ip()))
            .map(|(r, m)| (r.clone(), m))
            .collect();
        if gone.is_empty() {
            return;
        }
        for (room, member) in gone {
            let addr = member.dest.addr;
            self.subs.unsubscribe(&room, addr);
            tracing::info!(%room, %addr, "subscription ended: source no longer allowed");
            self.tell_closed(&room, &[member], "not allowed");
        }
        self.reconcile();
    }

    /// The time cookies are issued and checked at: Unix seconds as of the start, advanced by
    /// the monotonic clock.
    pub(super) fn cookie_time(&self, now: Now) -> u64 {
        self.cookie_epoch + now.mono.saturating_duration_since(self.started).as_secs()
    }

    /// Subscriptions now.
    pub(crate) fn subscribers(&self) -> usize {
        self.subs.total()
    }

    /// This hub's `relay` tag value.
    pub(crate) fn relay_id(&self) -> &str {
        &self.relay_id
    }

    /// The host's subnets as last set.
    pub(crate) fn connected(&self) -> &[IpNet] {
        self.admission.connected()
    }

    /// A datagram arrived at `port` from `from`.
    pub(crate) fn on_input(&mut self, port: Port, from: SocketAddr, data: &[u8], now: Now) {
        let from = mcchat_core::socket::canonical(from);
        match port {
            Port::Relay { local, unicast } => {
                self.counters.received_unicast += 1;
                // Sent to a group or a broadcast address, the relay socket still hears it (a
                // room on the relay port, a broadcast): not for the daemon to relay or answer.
                if !unicast || local.is_some_and(|l| self.admission.is_broadcast(l)) {
                    return self.count_drop(Drop::NotUnicast, from, now.mono);
                }
                self.on_unicast(
                    UdpDest {
                        addr: from,
                        src: local,
                    },
                    data,
                    now,
                );
            }
            Port::Group { room, generation } => {
                self.counters.received_multicast += 1;
                self.on_group(&room, generation, from, data, now);
            }
        }
    }

    fn count_drop(&mut self, why: Drop, from: SocketAddr, now: Instant) {
        let count = self.counters.drop(why);
        if let Some(suppressed) = self.drop_log.check(now) {
            tracing::debug!(%from, reason = why.name(), count, suppressed, "dropped");
        }
    }

    /// The driver could not send `n` datagrams.
    pub(crate) fn send_failed(&mut self, n: u64) {
        *self
            .counters
            .dropped
            .entry(Drop::SendFailed.name())
            .or_insert(0) += n;
    }

    /// A room by name under the current rules: configured, or derived while ad-hoc rooms
    /// are on.
    fn room(&self, name: &str) -> Option<Room> {
        let room = self.settings.registry.resolve(name).ok()?;
        (room.source() == RoomSource::Configured || self.settings.daemon.adhoc_rooms)
            .then_some(room)
    }

    fn ttl(&self, room: &Room) -> u32 {
        room.ttl().unwrap_or(self.settings.daemon.ttl)
    }

    /// A datagram on the relay port.
    fn on_unicast(&mut self, from: UdpDest, data: &[u8], now: Now) {
        if let Err(why) = self.admission.check_source(from.addr) {
            return self.count_drop(why, from.addr, now.mono);
        }
        let frame = match wire::decode(data) {
            Ok(f) => f,
            Err(reason) => return self.count_drop(Drop::Malformed(reason), from.addr, now.mono),
        };
        match frame.meta.kind {
            Kind::Subscribe | Kind::Unsubscribe => self.on_control(&frame, data.len(), from, now),
            Kind::Challenge | Kind::Subscribed | Kind::Closed => {
                self.count_drop(Drop::UnexpectedKind, from.addr, now.mono);
            }
            _ => self.relay_unicast(&frame, data, from, now),
        }
    }

    /// A chat datagram (or NACK) from a unicast client: to the group and the other
    /// subscribers, as the routing table says.
    fn relay_unicast(&mut self, frame: &Frame<'_>, data: &[u8], from: UdpDest, now: Now) {
        if frame.tags.get(RELAY_TAG).is_some() {
            // A daemon's forward (ours or another's) at the relay port: clients never send the
            // tag, so this is a loop somewhere (two daemons, a room on the relay port); never
            // relay it.
            return self.count_drop(Drop::RelayTagged, from.addr, now.mono);
        }
        // A valid cookie proves the source sent this itself (PROTOCOL.md 4.3): it has its own
        // share. Without one it may be forged, and shares the small unproven budget.
        let proven = self.cookie_ok(frame, from, now, true);
        let admitted = if proven {
            self.admission
                .take(Bucket::Relay, from.addr.ip(), now.mono)
                .then_some(())
                .ok_or(Drop::RateLimited)
        } else {
            self.admission.take_unproven(from.addr.ip(), now.mono)
        };
        if let Err(why) = admitted {
            return self.count_drop(why, from.addr, now.mono);
        }
        if !proven {
            self.counters.relayed_unproven += 1;
        }
        let Some(room) = self.room(frame.room) else {
            return self.count_drop(Drop::UnknownRoom, from.addr, now.mono);
        };
        // This leg's cookie ends here (repairs.rs says why).
        let stripped = repairs::without_cookie(data, frame);
        let data: &[u8] = &stripped;
        // A datagram with no room for the `relay` tag could not go to the group without
        // coming back unrecognised; rather than reach some members and not others (the LAN
        // would ask for it in vain), it goes nowhere. mcchat never writes one (HOP_RESERVE).
        let mut tagged = std::mem::take(&mut self.scratch);
        if tags::add_hop_tag(data, RELAY_TAG, &self.relay_id, &mut tagged).is_err() {
            self.scratch = tagged;
            return self.count_drop(Drop::NoRoomForRelayTag, from.addr, now.mono);
        }
        // One copy, shared by history and every subscriber.
        let shared = Bytes::copy_from_slice(data);
        if frame.meta.kind == Kind::Nack {
            // A subscriber's NACK: answered from the cache when it holds all of it and the
            // budgets allow; otherwise it goes on to the sender as well (repairs.rs).
            if let Some(nack) = Nack::from_frame(frame) {
                self.nack_for_web(&nack, data, now);
                if self.answer_nack(room.name(), &nack, from, proven, now) {
                    self.scratch = tagged;
                    return;
                }
            }
        } else {
            self.cache
                .observe(room.name(), &frame.meta, is_repair(frame), data, now.mono);
            self.note_chat(room.name(), frame, from.addr, &shared, now);
            self.export(room.name(), frame, data, PortKind::Udp, false);
        }
        if forwards(PortKind::Udp, PortKind::Group) {
            self.counters.relayed_to_group += 1;
            self.out.push_back(Output::ToGroup {
                group: room.group(),
                ttl: self.ttl(&room),
                data: Bytes::copy_from_slice(&tagged),
            });
        }
        self.scratch = tagged;
        if forwards(PortKind::Udp, PortKind::Udp) {
            self.fan_out(room.name(), shared, Some(from.addr));
        }
    }

    /// Sends what the hub made itself (a repair, a leave repeat) to `room`'s group with this
    /// hub's `relay` tag; skipped if it has no room for the tag.
    fn send_own_to_group(&mut self, room: &Room, data: &[u8], now: Instant) {
        if tags::add_hop_tag(data, RELAY_TAG, &self.relay_id, &mut self.scratch).is_err() {
            *self
                .counters
                .dropped
                .entry(Drop::NoRoomForRelayTag.name())
                .or_insert(0) += 1;
            if let Some(suppressed) = self.drop_log.check(now) {
                tracing::debug!(room = %room.name(), suppressed, "repair too long for the relay tag");
            }
            return;
        }
        self.out.push_back(Output::ToGroup {
            group: room.group(),
            ttl: self.ttl(room),
            data: Bytes::copy_from_slice(&self.scratch),
        });
    }

    fn fan_out(&mut self, room: &RoomName, data: Bytes, except: Option<SocketAddr>) {
        let Some(to) = self.subs.fanout(room) else {
            return;
        };
        let n = to.len() - usize::from(except.is_some_and(|e| to.iter().any(|d| d.addr == e)));
        if n == 0 {
            return;
        }
        self.counters.relayed_to_subscribers += n as u64;
        self.out.push_back(Output::FanOut { to, except, data });
    }

    /// A datagram heard on a joined group.
    fn on_group(
        &mut self,
        room: &RoomName,
        generation: u64,
        from: SocketAddr,
        data: &[u8],
        now: Now,
    ) {
        if self.groups.generation(room) != Some(generation) {
            return self.count_drop(Drop::StaleGroup, from, now.mono);
        }
        let frame = match wire::decode(data).and_then(|f| f.check_room(room.as_str()).map(|()| f)) {
            Ok(f) => f,
            Err(reason) => return self.count_drop(Drop::Malformed(reason), from, now.mono),
        };
        let relay = frame.tags.get(RELAY_TAG);
        if relay.as_deref() == Some(self.relay_id.as_str()) {
            // Our own forward, heard back through multicast loopback.
            self.counters.own_forwards_ignored += 1;
            return;
        }
        let relayed = relay.is_some();
        if frame.meta.kind.is_relay_control() {
            return self.count_drop(Drop::UnexpectedKind, from, now.mono);
        }
        let shared = Bytes::copy_from_slice(data);
        if frame.meta.kind == Kind::Nack {
            if let Some(nack) = Nack::from_frame(&frame) {
                self.nack_for_web(&nack, data, now);
                let repairs = self
                    .cache
                    .on_nack(room, nack.instance, &nack.ranges, now.mono);
                self.send_repairs(repairs, now.mono);
            }
        } else {
            self.cache
                .observe(room, &frame.meta, is_repair(&frame), data, now.mono);
            self.note_chat(room, &frame, from, &shared, now);
            if frame.tags.get(site::SITE_TAG).is_some() {
                self.heard_from_site(room, &frame, now.mono);
            } else {
                self.export(room, &frame, data, PortKind::Group, relayed);
            }
        }
        if forwards(PortKind::Group, PortKind::Group) {
            // Never true (routing.rs says why); asked so that the table is the one authority.
            if let Some(r) = self.room(room.as_str()) {
                self.send_own_to_group(&r, data, now.mono);
            }
        }
        if forwards(PortKind::Group, PortKind::Udp) {
            self.fan_out(room, shared, None);
        }
    }

    /// What the repair cache produced: to the room's group, and leave repeats to its
    /// subscribers too.
    fn send_repairs(&mut self, repairs: Vec<Outgoing>, now: Instant) {
        for o in repairs {
            let Some(room) = self.room(o.room.as_str()) else {
                continue;
            };
            // Leave repeats are few (a fixed schedule per sender that left); repairs are
            // what NACKs ask for, weighed against the overall budget.
            if !o.to_subscribers {
                // As sent: with the relay tag (`@relay=ID ` at most: 3 bytes and the two).
                let sent = o.data.len() + RELAY_TAG.len() + self.relay_id.len() + 3;
                if !self.repair_fits(sent, now) {
                    self.cache.not_sent(&o);
                    continue;
                }
                self.cache.count_sent(false);
            }
            self.send_own_to_group(&room, &o.data, now);
            if o.to_subscribers {
                self.fan_out(room.name(), o.data, None);
            }
        }
    }

    /// A chat datagram (or presence) of `room`, from anywhere, for the room's view: the
    /// view of a room that keeps history opens with its first message, and records what it
    /// delivers (web/hub.rs); a room with web members has one too.
    fn note_chat(
        &mut self,
        room: &RoomName,
        frame: &Frame<'_>,
        from: SocketAddr,
        data: &Bytes,
        now: Now,
    ) {
        if !self.web.has_view(room) {
            let chat = matches!(frame.meta.kind, Kind::Message | Kind::Action);
            if !chat || !self.records(room) {
                return;
            }
            let Some(r) = self.room(room.as_str()) else {
                return;
            };
            self.open_view(&r, now);
        }
        self.feed_view(room, frame.meta, data, from, now);
    }

    /// Whether `room`'s messages are kept in history.
    fn records(&self, room: &RoomName) -> bool {
        if !self.recording || self.policy.for_room(room.as_str()).count == 0 {
            return false;
        }
        // Rooms not in the file are kept only while someone subscribes: anyone allowed to
        // relay could otherwise fill the disk with room names of their own.
        self.settings.registry.configured(room.as_str()).is_some()
            || self.subs.has_subscribers(room)
            || self.web.has_members(room)
    }
}
