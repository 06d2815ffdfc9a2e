//! The routing table: which kind of port a relayed datagram goes to, decided by where it
//! entered the hub. This is the only place the rule is written; the unicast and the group
//! paths both ask it.
//!
//! Loops are prevented by this data (where a datagram entered, and the `relay` tag on what
//! the hub sends to a group), never by comparing source addresses: a WebSocket client or a
//! NATS link has no address to compare. The rule (docs/PROTOCOL.md 4.1 and 8.3): everything
//! that entered at this site goes everywhere but back where it came from (web clients
//! excepted: their room's view shows them their own messages in the room's order); what came
//! from a group never goes to a group; what came from another site never goes to the sites
//! again (each daemon publishes only what entered at its own site, so nothing loops).

/// A kind of port: where a datagram can enter and where it can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum PortKind {
    /// A joined multicast group (the LAN).
    Group,
    /// The relay port: unicast clients, subscribed (`--via`) or not (`nc`).
    Udp,
    /// Web clients (WebSocket connections), through their engines and their room's view.
    Web,
    /// Other sites, over the NATS link.
    Site,
}

impl PortKind {
    /// Every kind, for tests and tables.
    #[cfg(test)]
    pub(crate) const ALL: [Self; 4] = [Self::Group, Self::Udp, Self::Web, Self::Site];
}

/// Whether a chat datagram that entered at `from` is forwarded to the members of its room on
/// ports of kind `to`. The member it came from is never sent it back (the caller excludes
/// it: a member is identified by its port and address).
pub(crate) const fn forwards(from: PortKind, to: PortKind) -> bool {
    match (from, to) {
        // Several daemons (and the group itself) would loop: the LAN already has it.
        (PortKind::Group, PortKind::Group) => false,
        // The reason mcchatd exists: hosts that cannot use multicast hear the room.
        (PortKind::Group, PortKind::Udp) => true,
        // A unicast client speaks to the room: the LAN and the other subscribers.
        (PortKind::Udp, PortKind::Group | PortKind::Udp) => true,
        // Browsers hear the room from everywhere, their own messages included: the view
        // shows each in the room's order (a sender sees where its message landed).
        (PortKind::Group | PortKind::Udp | PortKind::Web | PortKind::Site, PortKind::Web) => true,
        // A browser speaks to the room: the LAN and the subscribers.
        (PortKind::Web, PortKind::Group | PortKind::Udp) => true,
        // What entered at this site goes to the other sites (site.rs: a datagram another
        // daemon of the LAN relayed, or that came from a site, is not this one's to publish).
        (PortKind::Group | PortKind::Udp | PortKind::Web, PortKind::Site) => true,
        // Another site's message reaches this LAN (from the daemon holding the room's
        // injection lease) and this daemon's subscribers.
        (PortKind::Site, PortKind::Group | PortKind::Udp) => true,
        // Never published again: with every daemon publishing only its own site's
        // messages, no message crosses more than one bridge, and nothing loops.
        (PortKind::Site, PortKind::Site) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pair() {
        let expected = [
            (PortKind::Group, PortKind::Group, false),
            (PortKind::Group, PortKind::Udp, true),
            (PortKind::Udp, PortKind::Group, true),
            (PortKind::Udp, PortKind::Udp, true),
            (PortKind::Group, PortKind::Web, true),
            (PortKind::Udp, PortKind::Web, true),
            (PortKind::Web, PortKind::Web, true),
            (PortKind::Web, PortKind::Group, true),
            (PortKind::Web, PortKind::Udp, true),
            (PortKind::Group, PortKind::Site, true),
            (PortKind::Udp, PortKind::Site, true),
            (PortKind::Web, PortKind::Site, true),
            (PortKind::Site, PortKind::Group, true),
            (PortKind::Site, PortKind::Udp, true),
            (PortKind::Site, PortKind::Web, true),
            (PortKind::Site, PortKind::Site, false),
        ];
        assert_eq!(expected.len(), PortKind::ALL.len() * PortKind::ALL.len());
        for from in PortKind::ALL {
            for to in PortKind::ALL {
                let want = expected
                    .iter()
                    .find(|(f, t, _)| *f == from && *t == to)
                    .map(|e| e.2);
                assert_eq!(Some(forwards(from, to)), want, "{from:?} -> {to:?}");
            }
        }
    }
}
