//! What the relay has done, for `mcchat status` and logs.

use std::collections::BTreeMap;

use mcchat_core::control;
use mcchat_core::wire::DropReason;

/// Why the daemon dropped a datagram or request. Every drop is counted under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Drop {
    /// Malformed (see the wire codec's reasons).
    Malformed(DropReason),
    /// The source is not in an allowed network.
    NotAllowed,
    /// The source went over its rate.
    RateLimited,
    /// A room not in the file while ad-hoc rooms are off.
    UnknownRoom,
    /// A subscribe without a valid cookie too short to answer with one.
    RequestTooSmall,
    /// Refused: the subscriber cap was reached.
    TooManySubscribers,
    /// Refused: the room cap was reached.
    TooManyRooms,
    /// A kind only the daemon sends (`cookie`, `subok`, `closed`) came from a client, or
    /// relay control came from a group.
    UnexpectedKind,
    /// The kernel refused a send.
    SendFailed,
    /// An unsubscribe without a valid cookie.
    BadCookie,
    /// One source holds its share of subscriptions already.
    TooManyFromSource,
    /// Port 0, or an unspecified, multicast or broadcast source.
    BadSource,
    /// A datagram from a group the daemon has since left or re-joined.
    StaleGroup,
    /// A datagram carrying a `relay` tag at the relay port: a daemon's forward (a loop).
    RelayTagged,
    /// A datagram the relay socket heard that was sent to a group or a broadcast address.
    NotUnicast,
    /// A datagram from a source with no valid cookie, over the budget all such sources
    /// share (`unproven_rate`).
    UnprovenOverBudget,
    /// A datagram too long to take the `relay` tag, so it cannot be sent to a group without
    /// coming back unrecognised.
    NoRoomForRelayTag,
    /// From another site: a message without the `site` tag of its origin.
    SiteNoOrigin,
    /// From another site: a `hops` tag missing, malformed, or over the limit (a loop).
    SiteHops,
    /// From another site: a room this daemon does not bridge, or a subject not naming the
    /// datagram's room.
    SiteNotBridged,
    /// From another site, while this daemon does not inject the room: more waiting for the
    /// injecting daemon than the bound (or older than it), the oldest dropped.
    SitePendingFull,
}

impl Drop {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Malformed(r) => r.name(),
            Self::NotAllowed => "not_allowed",
            Self::RateLimited => "rate_limited",
            Self::UnknownRoom => "unknown_room",
            Self::RequestTooSmall => "request_too_small",
            Self::TooManySubscribers => "too_many_subscribers",
            Self::TooManyRooms => "too_many_rooms",
            Self::UnexpectedKind => "unexpected_kind",
            Self::SendFailed => "send_failed",
            Self::BadCookie => "bad_cookie",
            Self::TooManyFromSource => "too_many_from_source",
            Self::BadSource => "bad_source",
            Self::StaleGroup => "stale_group",
            Self::RelayTagged => "relay_tagged",
            Self::NotUnicast => "not_unicast",
            Self::NoRoomForRelayTag => "no_room_for_relay_tag",
            Self::UnprovenOverBudget => "unproven_over_budget",
            Self::SiteNoOrigin => "site_no_origin",
            Self::SiteHops => "site_hops",
            Self::SiteNotBridged => "site_not_bridged",
            Self::SitePendingFull => "site_pending_full",
        }
    }
}

/// Counters since start. Kept apart from [`control::Counters`] so that counting a drop
/// never allocates (the reasons are `&'static str` here); status converts.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counters {
    /// Datagrams received on the relay port.
    pub(crate) received_unicast: u64,
    /// Datagrams received from groups.
    pub(crate) received_multicast: u64,
    /// Datagrams sent to a group for a unicast client.
    pub(crate) relayed_to_group: u64,
    /// Datagrams sent to subscribers (one per subscriber).
    pub(crate) relayed_to_subscribers: u64,
    /// The daemon's own forwards heard back from a group, and ignored.
    pub(crate) own_forwards_ignored: u64,
    /// Cookie challenges sent.
    pub(crate) challenges: u64,
    /// New subscriptions.
    pub(crate) subscribed: u64,
    /// Renewals.
    pub(crate) renewed: u64,
    /// Subscriptions ended by the client.
    pub(crate) unsubscribed: u64,
    /// Subscriptions whose lease ran out.
    pub(crate) expired: u64,
    /// NACKs at the relay port that proved no subscription (no valid cookie): not answered
    /// from the cache, passed on to the room.
    pub(crate) nacks_unproven: u64,
    /// Datagrams relayed for sources that proved no address (no valid cookie), under the
    /// budget they share.
    pub(crate) relayed_unproven: u64,
    /// Web connections accepted, and refused by the allow list.
    pub(crate) web_connections: u64,
    pub(crate) web_refused: u64,
    /// Datagrams web clients' engines sent (messages, presence, repairs).
    pub(crate) relayed_from_web: u64,
    /// Frames encoded for web clients (each once, for every client of its room).
    pub(crate) web_frames: u64,
    /// Messages web clients were told are lost (`gap` frames' counts).
    pub(crate) web_gaps: u64,
    /// Drops by reason.
    pub(crate) dropped: BTreeMap<&'static str, u64>,
}

impl Counters {
    /// Counts a drop; returns the new count for its reason.
    pub(crate) fn drop(&mut self, why: Drop) -> u64 {
        let n = self.dropped.entry(why.name()).or_insert(0);
        *n += 1;
        *n
    }
}

impl From<Counters> for control::Counters {
    fn from(c: Counters) -> Self {
        Self {
            received_unicast: c.received_unicast,
            received_multicast: c.received_multicast,
            relayed_to_group: c.relayed_to_group,
            relayed_to_subscribers: c.relayed_to_subscribers,
            own_forwards_ignored: c.own_forwards_ignored,
            challenges: c.challenges,
            subscribed: c.subscribed,
            renewed: c.renewed,
            unsubscribed: c.unsubscribed,
            expired: c.expired,
            nacks_unproven: c.nacks_unproven,
            relayed_unproven: c.relayed_unproven,
            web_connections: c.web_connections,
            web_refused: c.web_refused,
            relayed_from_web: c.relayed_from_web,
            web_frames: c.web_frames,
            web_gaps: c.web_gaps,
            dropped: c
                .dropped
                .into_iter()
                .map(|(why, n)| (why.to_owned(), n))
                .collect(),
        }
    }
}
