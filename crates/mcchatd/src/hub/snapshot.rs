//! The hub's part of the status document, and reloads.

use std::time::Instant;

use mcchat_core::room::{RoomName, RoomSource};

use super::{Hub, Reconfigured, history_policy};
use crate::settings::Settings;
use mcchat_core::control::{self, RoomStatus, Status, SubscriberStatus};

impl Hub {
    /// The status document as the hub knows it (`listen` and `history` are the driver's: it
    /// holds the sockets and the history handle).
    pub(crate) fn snapshot(&self, now: Instant) -> Status {
        let names: std::collections::BTreeSet<&RoomName> = self
            .settings
            .registry
            .rooms()
            .map(|r| r.name())
            .chain(self.subs.rooms())
            .chain(self.groups.groups().map(|(r, _)| r))
            .chain(self.web.wanted_rooms())
            .collect();
        let web: std::collections::HashMap<&RoomName, usize> = self.web.rooms().collect();
        let rooms = names
            .iter()
            .filter_map(|n| {
                let room = self.settings.registry.resolve(n.as_str()).ok()?;
                let mut subscribers: Vec<SubscriberStatus> = self
                    .subs
                    .subs(n)
                    .map(|(addr, sub)| SubscriberStatus {
                        addr: Some(addr.to_string()),
                        name: sub.name.clone(),
                        expires_in_secs: sub.expires.saturating_duration_since(now).as_secs(),
                    })
                    .collect();
                subscribers.sort_by(|a, b| a.addr.cmp(&b.addr));
                Some(RoomStatus {
                    name: n.to_string(),
                    group: room.group().to_string(),
                    configured: room.source() == RoomSource::Configured,
                    keep: room.keep(),
                    joined: self.groups.is_joined(n),
                    subscribers,
                    web_clients: web.get(n).copied().unwrap_or(0) as u64,
                })
            })
            .collect();
        let mut joined_groups: Vec<String> =
            self.groups.groups().map(|(_, g)| g.to_string()).collect();
        joined_groups.sort();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: now.saturating_duration_since(self.started).as_secs(),
            rooms_file: self.settings.origin.to_string(),
            // The sockets' part: the driver knows them as bound.
            listen: Vec::new(),
            subscribers: self.subs.total() as u64,
            joined_groups,
            rooms,
            counters: self.counters.clone().into(),
            repair_cache: control::RepairCacheStats {
                repairs_over_budget: self.repairs.refused,
                ..self.cache.stats().into()
            },
            history: None,
            web_clients: self.web.clients() as u64,
            site: None,
        }
    }

    /// A reloaded configuration: new limits, rules and rooms. Rooms that vanished or moved
    /// to another group have their subscribers told (`closed`, "room removed"); groups are
    /// joined and left to match. `listen`, `status_socket`, `iface` and `state_dir`
    /// keep their running values until a restart (they belong to sockets and files the
    /// driver opened); the answer names those that changed.
    pub(crate) fn reconfigure(&mut self, mut new: Settings, now: Instant) -> Reconfigured {
        let old = &self.settings.daemon;
        let d = &mut new.daemon;
        let mut need_restart = Vec::new();
        if d.listen != old.listen {
            need_restart.push("listen");
            d.listen.clone_from(&old.listen);
        }
        if d.status_socket != old.status_socket {
            need_restart.push("status_socket");
            d.status_socket.clone_from(&old.status_socket);
        }
        if d.iface != old.iface {
            need_restart.push("iface");
            d.iface.clone_from(&old.iface);
        }
        if d.state_dir != old.state_dir {
            need_restart.push("state_dir");
            d.state_dir.clone_from(&old.state_dir);
        }
        if new.sites != self.settings.sites {
            // The link's server, credentials and site name are the connection's own.
            need_restart.push("sites");
            new.sites.clone_from(&self.settings.sites);
        }
        let d = &new.daemon;
        self.admission.reconfigure(d);
        self.subs.set_limits(crate::subs::Limits::new(d));
        self.cache
            .set_bounds(d.repair_cache_bytes, d.repair_window, now);
        self.policy = history_policy(&new);
        let before: Vec<(RoomName, std::net::SocketAddr)> = self
            .subs
            .rooms()
            .filter_map(|n| self.room(n.as_str()).map(|r| (r.name().clone(), r.group())))
            .collect();
        self.settings = new;
        for (name, group) in before {
            if self.room(name.as_str()).map(|r| r.group()) != Some(group) {
                let dropped = self.subs.close_room(&name);
                tracing::info!(room = %name, subscribers = dropped.len(), "room closed: removed by reload");
                self.tell_closed(&name, &dropped, "room removed");
            }
        }
        self.reconcile();
        self.close_disallowed();
        Reconfigured { need_restart }
    }

    /// The retention rules now in force (for the history writer).
    pub(crate) fn policy(&self) -> &crate::history::Policy {
        &self.policy
    }

    /// The settings now in force.
    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }
}
