//! Web clients as members of rooms (PROTOCOL.md 7). A browser in a room is a member like a
//! `--via` subscriber, with the guarantees of a peer:
//!
//! - **What it says** goes out through a [`PeerEngine`] of its own (its instance id, `seq`,
//!   send buffer, presence), whose datagrams enter the hub as from a web port: to the group,
//!   the subscribers and the room's view (so to every browser, its own included, in the
//!   room's order). NACKs for its instance are handed to that engine, which repairs them.
//! - **What it is shown** comes from the room's *view* (view.rs): one listening engine per
//!   room, fed every datagram of the room, whose deliveries are numbered, recorded and
//!   encoded once for all the room's browsers.
//!
//! This module holds the connections, their engines, and the requests they make (join,
//! say, leave, the history a new view is preloaded with).

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use mcchat_core::control::HistoryRecord;
use mcchat_core::peer::{Effect, Now, PeerConfig, PeerEngine};
use mcchat_core::repair::{Nack, SplitMix64};
use mcchat_core::room::RoomName;
use mcchat_core::wire::{self, InstanceId, Kind};

use super::view::View;
use super::{Hub, Output};

/// Messages of history a new view is preloaded with (its senders' last numbers).
pub(crate) const PRELOAD: u32 = 1024;

/// A web connection, numbered by the web port.
pub(crate) type ConnId = u64;

/// What a web connection did, as its port parsed it (web/protocol.rs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WebInput {
    /// It connected from `addr`.
    Open { addr: IpAddr },
    /// It asks to be in `room` as `name` (leaving the room it was in).
    Join { room: String, name: String },
    /// It says `text` in its room (`action`: as `/me`).
    Say { text: String, action: bool },
    /// It leaves its room (and stays connected).
    Leave,
    /// History the port read for a room's new view: the senders' last numbers, so a loss
    /// across a restart of the daemon is asked for like any other.
    Preload {
        room: RoomName,
        records: Vec<HistoryRecord>,
    },
    /// The connection ended.
    Closed,
}

/// What a connection is told when it is in a room; the port adds the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Joined {
    pub(crate) room: RoomName,
    pub(crate) name: String,
    /// Its sender's instance id.
    pub(crate) id: String,
    pub(crate) epoch: u64,
    /// The room's last offset: history up to here, live after.
    pub(crate) offset: u64,
    pub(crate) members: Vec<String>,
    /// Whether the room's messages are in history (recovery and scrollback).
    pub(crate) history: bool,
}

/// Why a connection is refused or closed (the port sends `code` and `message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

struct Client {
    addr: IpAddr,
    /// Its room and its sending engine, while it is in one.
    member: Option<(RoomName, Box<PeerEngine>)>,
    /// When its engine next wants polling (as filed in `timers`).
    due: Option<Instant>,
}

/// The web side of the hub: connections, their engines, the rooms' views.
pub(crate) struct Web {
    clients: HashMap<ConnId, Client>,
    pub(super) views: HashMap<RoomName, View>,
    /// Web clients' sending instances, for the NACKs that name them.
    instances: HashMap<InstanceId, ConnId>,
    /// Clients' engine deadlines.
    timers: BTreeSet<(Instant, ConnId)>,
    pub(super) rng: SplitMix64,
    pub(crate) epoch: u64,
    /// The last offset given to a message.
    pub(crate) offset: u64,
}

/// The source address a web client's datagrams are handed to the view with (it has none).
pub(super) const WEB_SOURCE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

impl Web {
    pub(crate) fn new(epoch: u64, last_offset: u64, seed: u64) -> Self {
        Self {
            clients: HashMap::new(),
            views: HashMap::new(),
            instances: HashMap::new(),
            timers: BTreeSet::new(),
            rng: SplitMix64(seed),
            epoch,
            offset: last_offset,
        }
    }

    /// Connections now.
    pub(crate) fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Web members per room, for status.
    pub(crate) fn rooms(&self) -> impl Iterator<Item = (&RoomName, usize)> {
        self.views.iter().map(|(r, v)| (r, v.members.len()))
    }

    pub(crate) fn has_view(&self, room: &RoomName) -> bool {
        self.views.contains_key(room)
    }

    /// Whether browsers are in `room` (a view can exist without: history keeps one).
    pub(crate) fn has_members(&self, room: &RoomName) -> bool {
        self.views.get(room).is_some_and(|v| !v.members.is_empty())
    }

    /// The rooms browsers are in.
    pub(crate) fn wanted_rooms(&self) -> impl Iterator<Item = &RoomName> {
        self.views
            .iter()
            .filter(|(_, v)| !v.members.is_empty())
            .map(|(r, _)| r)
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let clients = self.timers.first().map(|&(t, _)| t);
        let views = self
            .views
            .values()
            .flat_map(|v| [v.engine.next_deadline(), v.presence_due])
            .flatten()
            .min();
        [clients, views].into_iter().flatten().min()
    }

    /// The web client whose instance a NACK names.
    fn nacked(&self, instance: InstanceId) -> Option<ConnId> {
        self.instances.get(&instance).copied()
    }

    fn file_timer(&mut self, conn: ConnId) {
        let Some(c) = self.clients.get_mut(&conn) else {
            return;
        };
        let due = c.member.as_ref().and_then(|(_, e)| e.next_deadline());
        if c.due != due {
            if let Some(old) = c.due {
                self.timers.remove(&(old, conn));
            }
            if let Some(new) = due {
                self.timers.insert((new, conn));
            }
            c.due = due;
        }
    }
}

impl Hub {
    /// A web connection did something.
    pub(crate) fn on_web(&mut self, conn: ConnId, input: WebInput, now: Now) {
        match input {
            WebInput::Open { addr } => self.web_open(conn, addr),
            WebInput::Join { room, name } => self.web_join(conn, &room, &name, now),
            WebInput::Say { text, action } => self.web_say(conn, &text, action, now),
            WebInput::Leave => {
                self.web_leave(conn, now);
            }
            WebInput::Preload { room, records } => self.web_preload(&room, records, now),
            WebInput::Closed => {
                self.web_leave(conn, now);
                self.web.clients.remove(&conn);
            }
        }
    }

    fn web_refuse(&mut self, conn: ConnId, code: &'static str, message: String, close: bool) {
        self.out.push_back(Output::WebRefused {
            conn,
            refusal: Refusal { code, message },
            close,
        });
    }

    fn web_open(&mut self, conn: ConnId, addr: IpAddr) {
        let addr = mcchat_core::socket::canonical(SocketAddr::new(addr, 0)).ip();
        if !self.admission.allowed(addr) {
            self.counters.web_refused += 1;
            return self.web_refuse(
                conn,
                "not_allowed",
                format!("{addr} is not in this daemon's allow list"),
                true,
            );
        }
        self.counters.web_connections += 1;
        self.web.clients.insert(
            conn,
            Client {
                addr,
                member: None,
                due: None,
            },
        );
    }

    fn web_join(&mut self, conn: ConnId, room: &str, name: &str, now: Now) {
        if !self.web.clients.contains_key(&conn) {
            return;
        }
        let Some(room) = self.room(room) else {
            let why = match self.settings.registry.resolve(room) {
                Err(e) => e.to_string(),
                Ok(_) => format!("no room {room:?} here, and ad-hoc rooms are off"),
            };
            return self.web_refuse(conn, "bad_room", why, false);
        };
        let name = name.trim();
        if !wire::is_valid_sender(name) || name.is_empty() {
            return self.web_refuse(
                conn,
                "bad_name",
                format!(
                    "a name is 1 to {} characters, without '|' or control characters",
                    wire::MAX_SENDER_CHARS
                ),
                false,
            );
        }
        self.web_leave(conn, now);
        let name_str = room.name().clone();
        if !self.web.has_view(&name_str) {
            self.open_view(&room, now);
        }
        let first = !self.web.has_members(&name_str);
        let mut config = PeerConfig::new(name_str.as_str(), name, room.group());
        config.presence = true;
        let instance = InstanceId(self.web.rng.next_u64());
        let seed = self.web.rng.next_u64();
        let engine = Box::new(PeerEngine::new(config, instance, seed, now));
        let Some(view) = self.web.views.get_mut(&name_str) else {
            return;
        };
        view.members.push(conn);
        view.fanout = None;
        let (last, members) = (view.last, view.engine.members());
        let joined = Joined {
            room: name_str.clone(),
            name: name.to_owned(),
            id: instance.to_string(),
            epoch: self.web.epoch,
            offset: last,
            members,
            history: self.records(&name_str),
        };
        self.web.instances.insert(instance, conn);
        if let Some(c) = self.web.clients.get_mut(&conn) {
            tracing::info!(room = %name_str, %name, addr = %c.addr, conn, "web client joined");
            c.member = Some((name_str.clone(), engine));
        }
        self.out.push_back(Output::WebJoined { conn, joined });
        if first {
            self.reconcile();
        }
        self.with_client(conn, now, |e, now| e.enter(now));
    }

    /// Runs `f` on `conn`'s engine and routes what it produced.
    fn with_client(&mut self, conn: ConnId, now: Now, f: impl FnOnce(&mut PeerEngine, Now)) {
        let mut effects = Vec::new();
        let Some(room) = self
            .web
            .clients
            .get_mut(&conn)
            .and_then(|c| c.member.as_mut())
            .map(|(room, engine)| {
                f(engine, now);
                while let Some(e) = engine.poll_effect() {
                    effects.push(e);
                }
                room.clone()
            })
        else {
            return;
        };
        self.web.file_timer(conn);
        for e in effects {
            if let Effect::Send { bytes, .. } = e {
                self.entered_from_web(&room, &bytes, now);
            }
        }
    }

    fn web_say(&mut self, conn: ConnId, text: &str, action: bool, now: Now) {
        let kind = if action { Kind::Action } else { Kind::Message };
        let mut failed = None;
        self.with_client(conn, now, |e, now| {
            if let Err(err) = e.say(kind, text, now) {
                failed = Some(err.to_string());
            }
        });
        if let Some(why) = failed {
            self.web_refuse(conn, "bad_message", why, false);
        }
    }

    /// Takes `conn` out of its room, saying goodbye for it. Returns whether it was in one.
    fn web_leave(&mut self, conn: ConnId, now: Now) -> bool {
        self.with_client(conn, now, |e, now| e.leave(now));
        let Some(c) = self.web.clients.get_mut(&conn) else {
            return false;
        };
        let Some((room, engine)) = c.member.take() else {
            return false;
        };
        if let Some(due) = c.due.take() {
            self.web.timers.remove(&(due, conn));
        }
        self.web.instances.remove(&engine.instance());
        tracing::info!(%room, conn, "web client left");
        let empty = self.web.views.get_mut(&room).is_some_and(|v| {
            v.members.retain(|&m| m != conn);
            v.fanout = None;
            v.members.is_empty()
        });
        if empty {
            self.close_idle_views();
            self.reconcile();
        }
        true
    }

    /// A datagram a web client's engine sent: it entered at the web port, so it goes where
    /// the routing table sends what entered there.
    pub(super) fn entered_from_web(&mut self, room: &RoomName, data: &[u8], now: Now) {
        use super::routing::{PortKind, forwards};
        let Some(r) = self.room(room.as_str()) else {
            return;
        };
        let Ok(frame) = wire::decode(data) else {
            return;
        };
        self.counters.relayed_from_web += 1;
        let shared = Bytes::copy_from_slice(data);
        if frame.meta.kind != Kind::Nack {
            self.cache
                .observe(room, &frame.meta, super::is_repair(&frame), data, now.mono);
        }
        if forwards(PortKind::Web, PortKind::Group) {
            self.counters.relayed_to_group += 1;
            self.send_own_to_group(&r, data, now.mono);
        }
        if forwards(PortKind::Web, PortKind::Udp) {
            self.fan_out(room, shared.clone(), None);
        }
        if frame.meta.kind != Kind::Nack && forwards(PortKind::Web, PortKind::Web) {
            self.note_chat(room, &frame, WEB_SOURCE, &shared, now);
        }
        self.export(room, &frame, data, PortKind::Web, false);
    }

    /// A NACK heard anywhere: a web client's engine answers those for its instance.
    pub(super) fn nack_for_web(&mut self, nack: &Nack, data: &[u8], now: Now) {
        if let Some(conn) = self.web.nacked(nack.instance) {
            self.with_client(conn, now, |e, now| e.on_datagram(data, WEB_SOURCE, now));
        }
    }

    /// Web timers due at `now`: the clients' engines (heartbeats, repairs) and the views'
    /// (NACKs, gaps given up).
    pub(super) fn poll_web(&mut self, now: Now) {
        while let Some(&(due, conn)) = self.web.timers.first() {
            if due > now.mono {
                break;
            }
            self.web.timers.remove(&(due, conn));
            if let Some(c) = self.web.clients.get_mut(&conn) {
                c.due = None;
            }
            self.with_client(conn, now, |e, now| e.poll(now));
        }
        let due: Vec<RoomName> = self
            .web
            .views
            .iter()
            .filter(|(_, v)| v.engine.next_deadline().is_some_and(|t| t <= now.mono))
            .map(|(r, _)| r.clone())
            .collect();
        for room in due {
            if let Some(v) = self.web.views.get_mut(&room) {
                v.engine.poll(now);
            }
            self.drain_view(&room, None, None, false, now);
        }
        let presence: Vec<RoomName> = self
            .web
            .views
            .iter()
            .filter(|(_, v)| v.presence_due.is_some_and(|t| t <= now.mono))
            .map(|(r, _)| r.clone())
            .collect();
        for room in presence {
            if let Some(v) = self.web.views.get_mut(&room) {
                let frame = v.presence_frame(&room, now.mono);
                let to = v.fanout();
                self.counters.web_frames += 1;
                self.out.push_back(Output::ToWeb {
                    to,
                    frame: Arc::new(frame),
                });
            }
        }
    }

    /// Every web client leaves its room (shutdown): their `leave`s go out.
    pub(crate) fn web_leave_all(&mut self, now: Now) {
        let conns: Vec<ConnId> = self.web.clients.keys().copied().collect();
        for conn in conns {
            self.web_leave(conn, now);
        }
    }
}
