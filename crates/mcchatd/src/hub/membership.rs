//! Group membership: which rooms' groups the daemon is in. The hub decides (joins and leaves
//! are [`Output`]s); the driver opens and closes the sockets and reports a failed join back.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use mcchat_core::room::RoomName;

use super::{Hub, Output};

/// One membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Joined {
    group: SocketAddr,
    /// Bumped on every join, so datagrams a left membership's port still had queued are
    /// told apart from the new one's.
    generation: u64,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Membership {
    joined: HashMap<RoomName, Joined>,
    /// Rooms whose last join failed (said once until a join works).
    failed: HashSet<RoomName>,
    /// Rooms not to try again until the next retry.
    backoff: HashSet<RoomName>,
    generation: u64,
}

impl Membership {
    /// The generation of `room`'s current membership.
    pub(crate) fn generation(&self, room: &RoomName) -> Option<u64> {
        self.joined.get(room).map(|j| j.generation)
    }

    pub(crate) fn is_joined(&self, room: &RoomName) -> bool {
        self.joined.contains_key(room)
    }

    /// The joined groups, for status.
    pub(crate) fn groups(&self) -> impl Iterator<Item = (&RoomName, SocketAddr)> {
        self.joined.iter().map(|(r, j)| (r, j.group))
    }

    /// Forgets failures, so the next reconcile tries again.
    pub(crate) fn clear_failures(&mut self) {
        self.backoff.clear();
    }

    /// Lets the next reconcile try `room` again at once.
    pub(crate) fn retry_now(&mut self, room: &RoomName) {
        self.backoff.remove(room);
    }

    /// Every membership, ended.
    pub(crate) fn leave_all(&mut self) -> Vec<(RoomName, u64)> {
        self.joined
            .drain()
            .map(|(room, j)| (room, j.generation))
            .collect()
    }
}

impl Hub {
    /// The rooms whose groups the daemon should be in: those with subscribers or web clients, the
    /// configured rooms marked `keep`, and, while history is on, the configured rooms that
    /// keep history (so their history is complete).
    fn wanted(&self) -> HashMap<RoomName, SocketAddr> {
        let mut wanted: HashMap<RoomName, SocketAddr> = self
            .settings
            .registry
            .rooms()
            .filter(|r| {
                r.keep()
                    || (self.recording && self.policy.for_room(r.name().as_str()).count > 0)
                    // Bridged: the LAN's peers hear other sites only through the group.
                    || self.bridges(r.name())
            })
            .map(|r| (r.name().clone(), r.group()))
            .collect();
        for name in self.subs.rooms().chain(self.web.wanted_rooms()) {
            if let Some(room) = self.room(name.as_str()) {
                wanted.insert(room.name().clone(), room.group());
            }
        }
        wanted
    }

    /// Joins the groups that are wanted and leaves the rest (as outputs).
    pub(super) fn reconcile(&mut self) {
        let wanted = self.wanted();
        let stale: Vec<RoomName> = self
            .groups
            .joined
            .iter()
            .filter(|(name, j)| wanted.get(*name) != Some(&j.group))
            .map(|(name, _)| name.clone())
            .collect();
        for room in stale {
            if let Some(j) = self.groups.joined.remove(&room) {
                self.cache.forget_room(&room);
                self.out.push_back(Output::Leave {
                    room,
                    generation: j.generation,
                });
            }
        }
        let mut missing: Vec<(RoomName, SocketAddr)> = wanted
            .into_iter()
            .filter(|(name, _)| {
                !self.groups.joined.contains_key(name) && !self.groups.backoff.contains(name)
            })
            .collect();
        missing.sort();
        for (room, group) in missing {
            self.groups.generation += 1;
            let generation = self.groups.generation;
            self.groups
                .joined
                .insert(room.clone(), Joined { group, generation });
            self.out.push_back(Output::Join {
                room,
                group,
                generation,
            });
        }
        self.announce_site_rooms();
    }

    /// How the driver's join of `room`'s group for the membership `generation` went. On
    /// failure its subscribers are told (`closed`), and the join is tried again within 10 s
    /// if the room is still wanted.
    pub(crate) fn join_done(
        &mut self,
        room: &RoomName,
        generation: u64,
        result: Result<(), String>,
    ) {
        if self.groups.generation(room) != Some(generation) {
            return;
        }
        let Err(error) = result else {
            if self.groups.failed.remove(room) {
                tracing::info!(%room, "joined group after failures");
            }
            return;
        };
        self.groups.joined.remove(room);
        self.groups.backoff.insert(room.clone());
        self.cache.forget_room(room);
        self.announce_site_rooms();
        // Said once per room until a join works, however often it is retried.
        if self.groups.failed.insert(room.clone()) {
            tracing::error!(%room, %error, "cannot join group; retrying every 10 s");
        }
        let dropped = self.subs.close_room(room);
        if !dropped.is_empty() {
            tracing::info!(%room, subscribers = dropped.len(), "room closed: cannot join its group");
            self.tell_closed(
                room,
                &dropped,
                &format!("mcchatd cannot join the group: {error}"),
            );
        }
    }
}
