//! A room's view: one listening [`PeerEngine`] per room with web members or history,
//! fed everything the hub hears of the room. What it delivers (once, in per-sender order,
//! gaps NACKed and repaired, or given up as a `gap`) is numbered (the offset), recorded if
//! the room keeps history, and encoded once for the room's browsers (docs/PROTOCOL.md 7.3).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mcchat_core::control::HistoryRecord;
use mcchat_core::peer::{Effect, Event, Now, PeerConfig, PeerEngine, Received};
use mcchat_core::presence::Change;
use mcchat_core::room::RoomName;
use mcchat_core::wire::{InstanceId, Kind, Meta};

use super::web::ConnId;
use super::{Hub, Output};
use crate::web::protocol::{self, ChatFrame, WebFrame};

/// Datagrams a view keeps while its history is being read.
const PRELOAD_BACKLOG: usize = 4096;

/// Presence frames per room at most one per this; the changes in between go in one.
const PRESENCE_EVERY: Duration = Duration::from_millis(250);
/// Changes one presence frame lists at most (the members list is complete anyway).
const PRESENCE_CHANGES: usize = 64;

/// Held messages' datagrams a view keeps at most (the receiver bounds what it holds; this
/// bounds the copies).
const HELD_MAX: usize = 16_384;

/// One room's listening engine (its view) and its web members. Rooms that keep history
/// have one too, members or not: history is recorded from what the view delivers, so it is
/// in per-sender order, without duplicates, and its gaps are asked for like a peer's.
pub(super) struct View {
    pub(super) engine: PeerEngine,
    pub(super) members: Vec<ConnId>,
    /// `members` as sent, rebuilt after a change.
    pub(super) fanout: Option<Arc<[ConnId]>>,
    /// The datagrams of messages the view holds (waiting for a gap's repair), to be recorded
    /// when it delivers them.
    held: HashMap<(InstanceId, u64), Bytes>,
    /// The offset of the room's last delivered message: everything of the room up to it has
    /// been delivered or given up.
    pub(super) last: u64,
    /// History for the view was asked for and has not come.
    preloading: bool,
    /// What the room brought meanwhile, fed to the view after its history (so a sender's
    /// first live message does not hide what it said while nobody was listening).
    backlog: Vec<(Meta, Bytes, SocketAddr)>,
    /// Presence changes not yet sent, when the next frame of them is due, and when the last
    /// went.
    presence: Vec<(String, &'static str)>,
    pub(super) presence_due: Option<Instant>,
    presence_sent: Option<Instant>,
}

impl View {
    /// The frame of the presence changes so far.
    pub(super) fn presence_frame(&mut self, room: &RoomName, now: Instant) -> WebFrame {
        let frame = protocol::presence_frame(room.as_str(), &self.presence, &self.engine.members());
        self.presence.clear();
        self.presence_due = None;
        self.presence_sent = Some(now);
        frame
    }

    pub(super) fn fanout(&mut self) -> Arc<[ConnId]> {
        Arc::clone(
            self.fanout
                .get_or_insert_with(|| self.members.iter().copied().collect()),
        )
    }
}

impl Hub {
    /// Opens `room`'s view: a listening engine, preloaded from history when there is one.
    pub(super) fn open_view(&mut self, room: &mcchat_core::room::Room, now: Now) {
        let name = room.name().clone();
        let mut config = PeerConfig::new(name.as_str(), "", room.group());
        config.presence = false;
        let instance = InstanceId(self.web.rng.next_u64());
        let seed = self.web.rng.next_u64();
        self.web.views.insert(
            name.clone(),
            View {
                engine: PeerEngine::new(config, instance, seed, now),
                members: Vec::new(),
                fanout: None,
                held: HashMap::new(),
                last: self.web.offset,
                preloading: self.recording,
                backlog: Vec::new(),
                presence: Vec::new(),
                presence_due: None,
                presence_sent: None,
            },
        );
        if self.recording {
            self.out
                .push_back(Output::WebPreload { room: name.clone() });
        }
        tracing::debug!(room = %name, "room view opened");
    }

    /// A datagram of `room` (chat, presence; `meta` as the hub decoded it) for its view, if
    /// it has one: what the view delivers is numbered, recorded if the room keeps history,
    /// and sent to its browsers.
    pub(super) fn feed_view(
        &mut self,
        room: &RoomName,
        meta: Meta,
        data: &Bytes,
        from: SocketAddr,
        now: Now,
    ) {
        let Some(view) = self.web.views.get_mut(room) else {
            return;
        };
        if view.preloading {
            if view.backlog.len() < PRELOAD_BACKLOG {
                view.backlog.push((meta, data.clone(), from));
                return;
            }
            // History is too slow to come: go on without it.
            tracing::warn!(%room, "room view: history did not come in time; live from here");
            self.web_preload(room, Vec::new(), now);
            return self.feed_view(room, meta, data, from, now);
        }
        let key = meta.instance.zip(meta.seq);
        let bare_chat =
            meta.instance.is_none() && matches!(meta.kind, Kind::Message | Kind::Action);
        if bare_chat && view.members.is_empty() {
            // A bare message cannot be ordered or repaired: with no browser to show it to,
            // it is numbered and recorded without the engine (what `nc` and the relay
            // benchmark send).
            self.web.offset += 1;
            view.last = self.web.offset;
            let offset = self.web.offset;
            if self.records(room) {
                self.records.push_back(Output::Record {
                    data: data.clone(),
                    recv_ms: now.unix_ms,
                    offset,
                });
            }
            return;
        }
        let held = view.engine.receiver_load().2;
        view.engine.on_datagram(data, from, now);
        let arrival = data.clone();
        let delivered = self.drain_view(room, key, Some(&arrival), false, now);
        if let (Some(k), false) = (key, delivered)
            && let Some(view) = self.web.views.get_mut(room)
            && view.engine.receiver_load().2 > held
            && view.held.len() < HELD_MAX
        {
            view.held.insert(k, arrival);
        }
    }

    /// Turns what `room`'s view produced into records, frames and datagrams; says whether
    /// the arrival `key` it was just fed was delivered. While `preload` is set, messages
    /// from history are neither recorded again nor sent on (browsers get their scrollback
    /// from the port).
    pub(super) fn drain_view(
        &mut self,
        room: &RoomName,
        key: Option<(InstanceId, u64)>,
        arrival: Option<&Bytes>,
        preload: bool,
        now: Now,
    ) -> bool {
        let mut delivered = false;
        let mut sends = Vec::new();
        let mut frames = Vec::new();
        let mut records = Vec::new();
        let records_room = self.records(room);
        {
            let Some(view) = self.web.views.get_mut(room) else {
                return false;
            };
            while let Some(effect) = view.engine.poll_effect() {
                match effect {
                    Effect::Send { bytes, .. } => sends.push(bytes),
                    Effect::Show(Event::Message(m)) => {
                        let k = m.instance.zip(m.seq);
                        let data = match k {
                            Some(k) if Some(k) == key => {
                                delivered = true;
                                arrival.cloned()
                            }
                            Some(k) => view.held.remove(&k),
                            // A bare datagram is shown as it comes.
                            None => arrival.cloned(),
                        };
                        if preload && data.is_none() {
                            continue; // from history itself
                        }
                        self.web.offset += 1;
                        view.last = self.web.offset;
                        if let (true, Some(data)) = (records_room, data) {
                            records.push((data, self.web.offset));
                        }
                        if !view.members.is_empty() {
                            frames.push(chat_frame(room, &m, view.last));
                        }
                    }
                    Effect::Show(Event::Presence(change)) => {
                        if view.members.is_empty() {
                            continue;
                        }
                        let change = match change {
                            Change::Joined(n) => (n, "join"),
                            Change::Left(n) => (n, "leave"),
                            Change::TimedOut(n) => (n, "timeout"),
                        };
                        // At most one presence frame per room per PRESENCE_EVERY: a
                        // thousand browsers coming back at once would otherwise be a
                        // million frames.
                        if view.presence.len() < PRESENCE_CHANGES {
                            view.presence.push(change);
                        }
                        if view.presence_due.is_none() {
                            view.presence_due = Some(
                                view.presence_sent
                                    .map_or(now.mono, |t| t + PRESENCE_EVERY)
                                    .max(now.mono),
                            );
                        }
                        if view.presence_due.is_some_and(|t| t <= now.mono) {
                            frames.push(view.presence_frame(room, now.mono));
                        }
                    }
                    Effect::Show(Event::Lost { sender, count }) => {
                        if view.engine.receiver_load().2 == 0 {
                            view.held.clear();
                        }
                        self.counters.web_gaps += count;
                        if !view.members.is_empty() {
                            frames.push(protocol::gap_frame(room.as_str(), &sender, count));
                        }
                    }
                    Effect::Show(_) => {}
                }
            }
        }
        for (data, offset) in records {
            self.records.push_back(Output::Record {
                data,
                recv_ms: now.unix_ms,
                offset,
            });
        }
        if !frames.is_empty()
            && let Some(view) = self.web.views.get_mut(room)
        {
            let to = view.fanout();
            for frame in frames {
                self.counters.web_frames += 1;
                self.out.push_back(Output::ToWeb {
                    to: Arc::clone(&to),
                    frame: Arc::new(frame),
                });
            }
        }
        for bytes in sends {
            // The view's NACKs: to the LAN and the subscribers, whose senders answer them.
            self.entered_from_web(room, &bytes, now);
        }
        delivered
    }

    pub(super) fn web_preload(&mut self, room: &RoomName, records: Vec<HistoryRecord>, now: Now) {
        let Some(view) = self.web.views.get_mut(room) else {
            return;
        };
        if !view.preloading {
            return;
        }
        view.preloading = false;
        let messages = records.into_iter().map(Received::from).collect();
        view.engine.preload(messages, now);
        let backlog = std::mem::take(&mut view.backlog);
        self.drain_view(room, None, None, true, now);
        for (meta, data, from) in backlog {
            self.feed_view(room, meta, &data, from, now);
        }
    }

    /// Views no one needs any more: no web members, and the room keeps no history.
    pub(super) fn close_idle_views(&mut self) {
        let idle: Vec<RoomName> = self
            .web
            .views
            .iter()
            .filter(|(r, v)| v.members.is_empty() && !self.records(r))
            .map(|(r, _)| r.clone())
            .collect();
        for room in idle {
            self.web.views.remove(&room);
            tracing::debug!(%room, "room view closed");
        }
    }
}

/// The frame of one delivered message.
fn chat_frame(room: &RoomName, m: &Received, offset: u64) -> WebFrame {
    protocol::chat_frame(&ChatFrame {
        room: room.as_str(),
        sender: &m.sender,
        text: &m.text,
        action: m.kind == Kind::Action,
        id: m.instance.zip(m.seq),
        ts: m.ts_ms,
        offset,
        history: false,
    })
}
