//! The driver's side of the site link: what the link brings goes into the hub, what the hub
//! publishes and the rooms it carries go to the link, and status shows both.

use mcchat_core::control::SiteStatus;
use mcchat_core::room::RoomName;
use tokio::sync::mpsc;

use super::Driver;
use crate::sites::link::{self, SiteEvent};

impl Driver {
    /// Starts the link if the settings bridge; returns where its events come.
    pub(super) fn start_site_link(&mut self) -> Option<mpsc::Receiver<SiteEvent>> {
        let settings = self.hub.settings().sites.clone();
        if !settings.enabled() {
            return None;
        }
        let (tx, rx) = mpsc::channel(4096);
        tracing::info!(site = %settings.site, nats = ?settings.nats, "bridging rooms to other sites");
        self.site = Some(link::spawn(
            settings,
            self.hub.relay_id().to_owned(),
            tx,
            self.token.child_token(),
            &self.tracker,
        ));
        Some(rx)
    }

    pub(super) fn on_site(&mut self, ev: SiteEvent) {
        let now = self.now();
        match ev {
            SiteEvent::Message { room, data } => self.hub.on_site(&room, &data, now),
            SiteEvent::Lease { room, held, epoch } => self.hub.site_lease(&room, held, epoch, now),
        }
    }

    pub(super) fn to_site(&self, room: &RoomName, data: bytes::Bytes, id: Option<String>) {
        if let Some(link) = &self.site {
            link.publish(room, data, id);
        }
    }

    pub(super) fn site_rooms(&self, rooms: Vec<RoomName>) {
        if let Some(link) = &self.site {
            link.set_rooms(rooms);
        }
    }

    /// The link's part of status.
    pub(super) fn site_status(&self) -> Option<SiteStatus> {
        let link = self.site.as_ref()?.state();
        let sites = self.hub.sites();
        let (rooms, injecting) = sites.rooms();
        Some(SiteStatus {
            site: self.hub.settings().sites.site.clone(),
            connected: link.connected,
            server: link.server,
            jetstream: link.jetstream,
            rooms: rooms.iter().map(ToString::to_string).collect(),
            injecting: injecting.iter().map(ToString::to_string).collect(),
            published: sites.published,
            received: sites.received,
            duplicates: sites.duplicates,
            own: sites.own,
            publish_dropped: link.publish_dropped,
            resumes: link.resumes,
            refused: link.refused,
            disconnects: link.disconnects,
            last_error: link.last_error,
        })
    }
}
