//! Other sites as members of rooms (docs/PROTOCOL.md 8): what the hub publishes to NATS and
//! what it does with what comes from there. The link (sites/link.rs) only moves bytes; the
//! rules are here, with injected time, so they are unit-tested:
//!
//! - **Out**: what entered at this site (from the LAN, `--via` clients, web clients) is
//!   published, with its hop-by-hop tags replaced by `site=<this site>;hops=1` (the
//!   end-to-end bytes unchanged). Nothing that carries a `site` tag is published: it came
//!   from another site. A datagram another daemon of this LAN relayed (a `relay` tag) is
//!   that daemon's to publish. A datagram with no key to tell copies apart (a bare one, or
//!   presence) is published only by the daemon that holds the room's lease.
//! - **In**: dropped if its origin is this site, if its hop count is missing or over
//!   [`MAX_HOPS`], or if it was seen already (by `instance:seq`, in a window per sender as the
//!   peers keep). The daemon holding the room's injection lease sends it to the group (with
//!   its `relay` tag, keeping the foreign `site`), its subscribers and its view. The others
//!   hear it on the LAN from the holder, and keep it meanwhile: if the holder stops, the
//!   new holder injects what the LAN never heard.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mcchat_core::peer::Now;
use mcchat_core::room::RoomName;
use mcchat_core::tags;
use mcchat_core::wire::{self, Frame, InstanceId, Kind};

use super::routing::{PortKind, forwards};
use super::{Hub, Output};
use crate::counters::Drop;
use crate::sites::config::SitesSettings;

/// The hop-by-hop tag naming where a message entered the system of sites.
pub(crate) const SITE_TAG: &str = "site";
/// The hop-by-hop tag counting the bridges a message crossed.
pub(crate) const HOPS_TAG: &str = "hops";
/// More bridges than this and a message is dropped: only a loop gets there (daemons never
/// re-publish what came from NATS, so every message arrives with `hops=1`).
pub(crate) const MAX_HOPS: u32 = 3;

/// Sequence numbers per sender remembered for deduplication (as a peer's receive window).
const SEEN_WINDOW: u64 = 1024;
/// Senders remembered; past this the idle half is forgotten.
const SEEN_SENDERS: usize = 8192;
/// Messages kept per room for the injecting daemon's takeover, and for at least how long
/// (and twice the lease: a takeover after a crash comes within about 4/3 of it).
const PENDING_PER_ROOM: usize = 2048;
const PENDING_AGE: Duration = Duration::from_secs(30);

/// The last [`SEEN_WINDOW`] sequence numbers of each sender: whether `(instance, seq)` is new.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    senders: HashMap<InstanceId, Window>,
}

#[derive(Debug)]
struct Window {
    top: u64,
    bits: [u64; (SEEN_WINDOW / 64) as usize],
    used: Instant,
}

impl Window {
    fn slot(seq: u64) -> (usize, u64) {
        let i = seq % SEEN_WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }
}

impl Seen {
    /// Notes `(instance, seq)`; true if it was not seen before. A number more than the window
    /// below the sender's highest counts as seen (it cannot be told apart).
    pub(crate) fn insert(&mut self, instance: InstanceId, seq: u64, now: Instant) -> bool {
        if !self.senders.contains_key(&instance) && self.senders.len() >= SEEN_SENDERS {
            self.forget_idle();
        }
        let w = self.senders.entry(instance).or_insert_with(|| Window {
            top: seq,
            bits: [0; (SEEN_WINDOW / 64) as usize],
            used: now,
        });
        w.used = now;
        if seq > w.top {
            if seq - w.top >= SEEN_WINDOW {
                w.bits = [0; (SEEN_WINDOW / 64) as usize];
            } else {
                for s in w.top + 1..=seq {
                    let (i, b) = Window::slot(s);
                    w.bits[i] &= !b;
                }
            }
            w.top = seq;
        } else if w.top - seq >= SEEN_WINDOW {
            return false;
        }
        let (i, b) = Window::slot(seq);
        let new = w.bits[i] & b == 0;
        w.bits[i] |= b;
        new
    }

    /// Forgets the least recently heard half of the senders.
    fn forget_idle(&mut self) {
        let mut used: Vec<Instant> = self.senders.values().map(|w| w.used).collect();
        used.sort_unstable();
        let cut = used[used.len() / 2];
        self.senders.retain(|_, w| w.used > cut);
    }

    #[cfg(test)]
    pub(crate) fn senders(&self) -> usize {
        self.senders.len()
    }
}

/// A message from another site waiting for the injecting daemon to be heard sending it.
#[derive(Debug)]
struct Pending {
    at: Instant,
    key: Option<(InstanceId, u64)>,
    data: Bytes,
}

/// The hub's side of the bridge.
#[derive(Debug, Default)]
pub(crate) struct Sites {
    /// This daemon's site; empty: not bridging.
    site: String,
    pub(crate) seen: Seen,
    /// Rooms whose injection lease this daemon holds.
    held: HashSet<RoomName>,
    /// The epoch of the link's latest word on each room's lease (older words are ignored).
    lease_epochs: HashMap<RoomName, u64>,
    /// How long a message waits for the takeover at most.
    pending_age: Duration,
    /// Per room, what came from other sites while another daemon injects.
    pending: HashMap<RoomName, VecDeque<Pending>>,
    /// The rooms last handed to the link.
    announced: Vec<RoomName>,
    /// Counters for status.
    pub(crate) published: u64,
    pub(crate) received: u64,
    pub(crate) duplicates: u64,
    pub(crate) own: u64,
}

impl Sites {
    pub(crate) fn new(settings: &SitesSettings) -> Self {
        Self {
            site: if settings.enabled() {
                settings.site.clone()
            } else {
                String::new()
            },
            pending_age: PENDING_AGE.max(settings.lease * 2),
            ..Self::default()
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.site.is_empty()
    }

    /// The rooms bridged now (as last announced), and those injected by this daemon.
    pub(crate) fn rooms(&self) -> (&[RoomName], Vec<&RoomName>) {
        let mut held: Vec<&RoomName> = self.held.iter().collect();
        held.sort();
        (&self.announced, held)
    }

    pub(crate) fn holds(&self, room: &RoomName) -> bool {
        self.held.contains(room)
    }

    /// A foreign message heard on the LAN (another daemon injected it): it need not wait.
    fn heard(&mut self, room: &RoomName, key: (InstanceId, u64), now: Instant) {
        self.seen.insert(key.0, key.1, now);
        if let Some(q) = self.pending.get_mut(room)
            && let Some(i) = q.iter().position(|p| p.key == Some(key))
        {
            q.remove(i);
        }
    }

    /// Forgets waiting messages older than [`PENDING_AGE`]: the holder sent them long ago,
    /// or the LAN's peers have given them up.
    fn expire(&mut self, now: Instant) {
        let age = self.pending_age;
        for q in self.pending.values_mut() {
            while q
                .front()
                .is_some_and(|p| now.saturating_duration_since(p.at) > age)
            {
                q.pop_front();
            }
        }
        self.pending.retain(|_, q| !q.is_empty());
    }
}

/// What tells copies of a message apart: `(instance, seq)` of a message or action. Presence
/// (`join`, `hb`, `leave`) carries the sender's last `seq` too, so it has no key of its own:
/// it would pass for a copy of that message.
fn key(frame: &Frame<'_>) -> Option<(InstanceId, u64)> {
    matches!(frame.meta.kind, Kind::Message | Kind::Action)
        .then(|| frame.meta.instance.zip(frame.meta.seq))
        .flatten()
}

/// `data`'s end-to-end part, tagged as entering the sites at `site`.
fn for_sites(data: &[u8], site: &str, out: &mut Vec<u8>) -> Result<(), tags::TagError> {
    let e2e = tags::end_to_end(data);
    let mut hops = Vec::with_capacity(e2e.len() + 16);
    tags::add_hop_tag(&e2e, HOPS_TAG, "1", &mut hops)?;
    tags::add_hop_tag(&hops, SITE_TAG, site, out)
}

impl Hub {
    /// The bridge to other sites, for status.
    pub(crate) fn sites(&self) -> &Sites {
        &self.sites
    }

    /// Whether `room` is bridged to other sites.
    pub(super) fn bridges(&self, room: &RoomName) -> bool {
        self.sites.enabled()
            && self.settings.sites.bridges(
                room.as_str(),
                self.settings.registry.configured(room.as_str()).is_some(),
            )
    }

    /// The rooms the link should carry: bridged rooms the daemon is joined to (bridged
    /// configured rooms are kept joined; others while they have members).
    pub(super) fn announce_site_rooms(&mut self) {
        if !self.sites.enabled() {
            return;
        }
        let mut rooms: Vec<RoomName> = self
            .groups
            .groups()
            .map(|(r, _)| r.clone())
            .filter(|r| self.bridges(r))
            .collect();
        rooms.sort();
        if rooms != self.sites.announced {
            self.sites.announced.clone_from(&rooms);
            // Leases stay as the link last said: it gives up those of rooms it no longer
            // carries, and says so (a room dropped and carried again at once keeps its task).
            self.sites.pending.retain(|r, _| rooms.contains(r));
            self.out.push_back(Output::SiteRooms(rooms));
        }
    }

    /// What entered at this site at a port of kind `from`, for the other sites (the module
    /// documentation has the rules). `relayed`: it carries another daemon's `relay` tag.
    pub(super) fn export(
        &mut self,
        room: &RoomName,
        frame: &Frame<'_>,
        data: &[u8],
        from: PortKind,
        relayed: bool,
    ) {
        if !forwards(from, PortKind::Site) || !self.bridges(room) {
            return;
        }
        if matches!(frame.meta.kind, Kind::Nack) || frame.meta.kind.is_relay_control() {
            return;
        }
        if frame.tags.get(SITE_TAG).is_some() {
            return; // from another site: never published again
        }
        let key = key(frame);
        if from == PortKind::Group && (relayed || (key.is_none() && !self.sites.holds(room))) {
            return;
        }
        let mut out = Vec::with_capacity(data.len() + 24);
        if for_sites(data, &self.sites.site, &mut out).is_err() {
            *self
                .counters
                .dropped
                .entry(Drop::NoRoomForRelayTag.name())
                .or_insert(0) += 1;
            return;
        }
        self.sites.published += 1;
        self.out.push_back(Output::ToSite {
            room: room.clone(),
            data: Bytes::from(out),
            id: key.map(|(i, s)| format!("{i}:{s}")),
        });
    }

    /// A foreign message heard on a group: another daemon of this LAN injected it.
    pub(super) fn heard_from_site(&mut self, room: &RoomName, frame: &Frame<'_>, now: Instant) {
        if let Some(key) = key(frame) {
            self.sites.heard(room, key, now);
        }
    }

    /// A message from another site, on `room`'s subject.
    pub(crate) fn on_site(&mut self, room: &RoomName, data: &[u8], now: Now) {
        self.sites.received += 1;
        let frame = match wire::decode(data).and_then(|f| f.check_room(room.as_str()).map(|()| f)) {
            Ok(f) => f,
            Err(reason) => return self.site_drop(Drop::Malformed(reason), now.mono),
        };
        if frame.meta.kind == Kind::Nack || frame.meta.kind.is_relay_control() {
            return self.site_drop(Drop::UnexpectedKind, now.mono);
        }
        let Some(origin) = frame.tags.get(SITE_TAG) else {
            return self.site_drop(Drop::SiteNoOrigin, now.mono);
        };
        if origin == self.sites.site {
            // What this site published (this daemon or another of its LAN), back from NATS.
            self.sites.own += 1;
            return;
        }
        let hops = frame.tags.get(HOPS_TAG).and_then(|h| h.parse::<u32>().ok());
        if !hops.is_some_and(|h| (1..=MAX_HOPS).contains(&h)) {
            return self.site_drop(Drop::SiteHops, now.mono);
        }
        if !self.bridges(room) || !self.sites.announced.contains(room) {
            return self.site_drop(Drop::SiteNotBridged, now.mono);
        }
        let key = key(&frame);
        if let Some((i, s)) = key
            && !self.sites.seen.insert(i, s, now.mono)
        {
            self.sites.duplicates += 1;
            return;
        }
        // Only `site` and `hops` travel between sites; any other hop-by-hop tag (a `relay`
        // naming some daemon) is not for this LAN.
        let data = strip_foreign_hops(data);
        if self.sites.holds(room) {
            self.inject(room, &data, now);
        } else if key.is_some() {
            // Kept for a takeover. Messages without a key are not: the holder's copy could
            // not be matched on the LAN, and a takeover would repeat them all.
            let q = self.sites.pending.entry(room.clone()).or_default();
            if q.len() >= PENDING_PER_ROOM {
                q.pop_front();
                self.counters.drop(Drop::SitePendingFull);
            }
            q.push_back(Pending {
                at: now.mono,
                key,
                data: Bytes::copy_from_slice(&data),
            });
        }
    }

    fn site_drop(&mut self, why: Drop, now: Instant) {
        let count = self.counters.drop(why);
        if let Some(suppressed) = self.drop_log.check(now) {
            tracing::debug!(
                reason = why.name(),
                count,
                suppressed,
                "dropped from another site"
            );
        }
    }

    /// A message from another site, into this LAN: to the group (this daemon holds the
    /// room's lease), the subscribers and the room's view, as the routing table says.
    fn inject(&mut self, room: &RoomName, data: &[u8], now: Now) {
        let Some(r) = self.room(room.as_str()) else {
            return;
        };
        let Ok(frame) = wire::decode(data) else {
            return;
        };
        let shared = Bytes::copy_from_slice(data);
        self.cache.observe(room, &frame.meta, false, data, now.mono);
        if forwards(PortKind::Site, PortKind::Group) {
            self.counters.relayed_to_group += 1;
            self.send_own_to_group(&r, data, now.mono);
        }
        if forwards(PortKind::Site, PortKind::Udp) {
            self.fan_out(room, shared.clone(), None);
        }
        if forwards(PortKind::Site, PortKind::Web) {
            self.note_chat(room, &frame, super::web::WEB_SOURCE, &shared, now);
        }
    }

    /// The link won or lost `room`'s injection lease. Won: what other sites sent that the
    /// LAN has not heard from the previous holder goes out now, in order.
    pub(crate) fn site_lease(&mut self, room: &RoomName, held: bool, epoch: u64, now: Now) {
        let latest = self.sites.lease_epochs.entry(room.clone()).or_insert(0);
        if epoch < *latest {
            return; // an earlier task of the room, overtaken
        }
        *latest = epoch;
        if !held {
            if self.sites.held.remove(room) {
                tracing::info!(%room, "another daemon injects this room from other sites");
            }
            return;
        }
        if !self.sites.announced.contains(room) || !self.sites.held.insert(room.clone()) {
            return;
        }
        let waiting = self.sites.pending.remove(room).unwrap_or_default();
        tracing::info!(%room, waiting = waiting.len(), "injecting this room from other sites");
        let age = self.sites.pending_age;
        for p in waiting {
            if now.mono.saturating_duration_since(p.at) <= age {
                self.inject(room, &p.data, now);
            }
        }
    }

    /// The site side of the hub's tick.
    pub(super) fn tick_sites(&mut self, now: Instant) {
        self.sites.expire(now);
    }
}

/// `data` with every hop-by-hop tag but `site` and `hops` removed: its end-to-end part and
/// its origin.
pub(crate) fn strip_foreign_hops(data: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    tags::keeping_hop_tags(data, &[SITE_TAG, HOPS_TAG])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_keeps_a_window_per_sender() {
        let t = Instant::now();
        let mut s = Seen::default();
        let a = InstanceId(1);
        assert!(s.insert(a, 5, t));
        assert!(!s.insert(a, 5, t));
        assert!(s.insert(a, 3, t), "late but within the window");
        assert!(s.insert(a, 5 + SEEN_WINDOW, t));
        assert!(!s.insert(a, 5, t), "below the window counts as seen");
        assert!(s.insert(a, 6 + SEEN_WINDOW - 1 + 1, t));
        assert!(s.insert(InstanceId(2), 5, t), "another sender");
        // A jump clears the slots it passes over.
        let mut s = Seen::default();
        assert!(s.insert(a, 1, t));
        assert!(s.insert(a, 1 + SEEN_WINDOW / 2, t));
        assert!(s.insert(a, 1 + SEEN_WINDOW, t));
        assert!(!s.insert(a, 1 + SEEN_WINDOW / 2, t));
    }

    #[test]
    fn seen_is_bounded() {
        let t = Instant::now();
        let mut s = Seen::default();
        for i in 0..(SEEN_SENDERS as u64 * 3) {
            s.insert(InstanceId(i), 1, t + Duration::from_millis(i));
        }
        assert!(s.senders() <= SEEN_SENDERS);
    }

    #[test]
    fn tags_for_sites_keep_the_end_to_end_bytes() {
        let data = b"@repair=1;relay=0000abcd;id=00000000000000aa;seq=3 room1|alice|hi";
        let mut out = Vec::new();
        for_sites(data, "paris", &mut out).unwrap();
        assert_eq!(
            out,
            b"@site=paris;hops=1;id=00000000000000aa;seq=3 room1|alice|hi".to_vec()
        );
        assert_eq!(tags::end_to_end(&out), tags::end_to_end(data));
        let bare = b"room1|nc|hello";
        for_sites(bare, "paris", &mut out).unwrap();
        assert_eq!(out, b"@site=paris;hops=1 room1|nc|hello".to_vec());
        assert_eq!(
            &*strip_foreign_hops(b"@relay=1234abcd;site=x;hops=1;seq=1 r|a|b"),
            b"@site=x;hops=1;seq=1 r|a|b"
        );
    }
}
