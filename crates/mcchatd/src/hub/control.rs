//! The relay-control protocol (docs/PROTOCOL.md 4.2): return-routability cookies, `sub`,
//! `unsub`, `subok` and `closed`.

use std::time::Duration;

use bytes::Bytes;
use mcchat_core::peer::Now;
use mcchat_core::room::{RoomName, RoomSource};
use mcchat_core::tags;
use mcchat_core::wire::{self, Frame, Header, Kind, Meta};

use super::admission::Bucket;
use super::{Hub, Output, UdpDest};
use crate::counters::Drop;
use crate::subs::{Member, Subscribed};

/// The sender name in datagrams the daemon itself writes.
pub(crate) const DAEMON_NAME: &str = "mcchatd";

impl Hub {
    /// Writes a daemon datagram for `room` into `self.text`; false if it cannot be encoded.
    pub(super) fn control(
        &mut self,
        kind: Kind,
        room: &str,
        extra: &[(&str, &str)],
        text: &str,
    ) -> bool {
        let header = Header {
            meta: Meta {
                kind,
                ..Meta::default()
            },
            extra,
        };
        wire::encode(&header, room, DAEMON_NAME, text, &mut self.text).is_ok()
    }

    /// Sends what [`Hub::control`] wrote to `to`.
    fn reply(&mut self, to: UdpDest) {
        let data = Bytes::copy_from_slice(self.text.as_bytes());
        self.out.push_back(Output::ToUdp { to, data });
    }

    /// Tells each of `to` that `room` closed, and why, with its nonce.
    pub(super) fn tell_closed(&mut self, room: &RoomName, to: &[Member], why: &str) {
        // One datagram for all without a nonce (older clients), one each for the rest.
        let mut bare: Option<Bytes> = None;
        for member in to {
            let data = match (&member.nonce, &bare) {
                (None, Some(d)) => d.clone(),
                (nonce, _) => {
                    let extra: Vec<(&str, &str)> =
                        nonce.iter().map(|n| (tags::NONCE, &**n)).collect();
                    if !self.control(Kind::Closed, room.as_str(), &extra, why) {
                        continue;
                    }
                    let d = Bytes::copy_from_slice(self.text.as_bytes());
                    if nonce.is_none() {
                        bare = Some(d.clone());
                    }
                    d
                }
            };
            self.out.push_back(Output::ToUdp {
                to: member.dest,
                data,
            });
        }
    }

    /// Whether `frame` carries a cookie valid for `from`. With `remember` (datagrams to
    /// relay: a sender's all carry the same cookie) a cookie that passes is not checked again;
    /// requests are not remembered, since a subscriber renews every 20 s or so and 10,000
    /// listening subscribers would each hold an entry (about 140 bytes) for nothing.
    pub(super) fn cookie_ok(
        &mut self,
        frame: &Frame<'_>,
        from: UdpDest,
        now: Now,
        remember: bool,
    ) -> bool {
        let time = self.cookie_time(now);
        let Some(cookie) = frame.tags.get(tags::COOKIE) else {
            return false;
        };
        if remember {
            self.cookies.verify_recent(&cookie, from.addr, time)
        } else {
            self.cookies.verify(&cookie, from.addr, time)
        }
    }

    /// A `sub` or `unsub`.
    pub(super) fn on_control(
        &mut self,
        frame: &Frame<'_>,
        request_len: usize,
        from: UdpDest,
        now: Now,
    ) {
        // Requests with a valid cookie come from the address itself; only they may use its
        // renewal bucket, so a spoofer cannot drain it and lapse a victim.
        let verified = self.cookie_ok(frame, from, now, false);
        let bucket = if verified {
            Bucket::Verified
        } else {
            Bucket::Unverified
        };
        if !self.admission.take(bucket, from.addr.ip(), now.mono) {
            return self.count_drop(Drop::RateLimited, from.addr, now.mono);
        }
        if frame.meta.kind == Kind::Subscribe {
            self.on_subscribe(frame, request_len, from, verified, now);
        } else {
            self.on_unsubscribe(frame, from, verified, now);
        }
    }

    fn on_subscribe(
        &mut self,
        frame: &Frame<'_>,
        request_len: usize,
        from: UdpDest,
        verified: bool,
        now: Now,
    ) {
        let Some(room) = self.room(frame.room) else {
            return self.count_drop(Drop::UnknownRoom, from.addr, now.mono);
        };
        // The client's nonce, echoed in every answer (a malformed one is not echoed: the
        // client then ignores the answers, as it would a forgery's).
        let nonce_tag = frame.tags.get(tags::NONCE);
        let nonce = nonce_tag.as_deref().filter(|n| tags::is_nonce(n));
        if !verified {
            // Return-routability first: answer with a cookie, never with more bytes than the
            // request carried, so a spoofed source cannot be used for amplification.
            let cookie = self.cookies.issue(from.addr, self.cookie_time(now));
            let mut extra = vec![(tags::COOKIE, cookie.as_str())];
            extra.extend(nonce.map(|n| (tags::NONCE, n)));
            if !self.control(Kind::Challenge, room.name().as_str(), &extra, "") {
                return;
            }
            if self.text.len() > request_len {
                return self.count_drop(Drop::RequestTooSmall, from.addr, now.mono);
            }
            self.counters.challenges += 1;
            return self.reply(from);
        }
        let lease = Duration::from_secs(u64::from(self.settings.daemon.lease_secs));
        let adhoc = room.source() != RoomSource::Configured;
        let outcome = self
            .subs
            .subscribe(room.name(), adhoc, from, frame.sender, now.mono, lease);
        match outcome {
            Subscribed::Added { first } => {
                self.counters.subscribed += 1;
                tracing::info!(room = %room.name(), from = %from.addr, name = frame.sender, "subscribed");
                if first {
                    // A first subscriber is worth a join attempt now, even in the backoff of
                    // an earlier failure: it is told `closed` at once if it fails again.
                    self.groups.retry_now(room.name());
                    self.reconcile();
                }
            }
            Subscribed::Renewed => self.counters.renewed += 1,
            Subscribed::TooManySubscribers
            | Subscribed::TooManyRooms
            | Subscribed::TooManyFromSource => {
                let why = match outcome {
                    Subscribed::TooManyRooms => Drop::TooManyRooms,
                    Subscribed::TooManyFromSource => Drop::TooManyFromSource,
                    _ => Drop::TooManySubscribers,
                };
                self.count_drop(why, from.addr, now.mono);
                // `closed` is also the answer to a subscription refused.
                let member = Member {
                    dest: from,
                    nonce: nonce.map(Box::from),
                };
                return self.tell_closed(room.name(), &[member], why.name());
            }
        }
        self.subs.set_nonce(room.name(), from.addr, nonce);
        // A fresh cookie with every `subok`, so the client's is never older than one renewal
        // interval and its renewals and `unsub` always draw on the verified bucket.
        let lease = self.settings.daemon.lease_secs.to_string();
        let cookie = self.cookies.issue(from.addr, self.cookie_time(now));
        let mut extra = vec![("lease", lease.as_str()), (tags::COOKIE, cookie.as_str())];
        extra.extend(nonce.map(|n| (tags::NONCE, n)));
        if self.control(Kind::Subscribed, room.name().as_str(), &extra, "") {
            self.reply(from);
        }
    }

    fn on_unsubscribe(&mut self, frame: &Frame<'_>, from: UdpDest, verified: bool, now: Now) {
        if !verified {
            // Without the cookie anyone could end anyone's subscription.
            return self.count_drop(Drop::BadCookie, from.addr, now.mono);
        }
        // The codec checked the room name already.
        let Ok(room) = RoomName::new(frame.room) else {
            return self.count_drop(
                Drop::Malformed(wire::DropReason::BadRoom),
                from.addr,
                now.mono,
            );
        };
        if self.subs.unsubscribe(&room, from.addr) {
            self.counters.unsubscribed += 1;
            tracing::info!(%room, from = %from.addr, "unsubscribed");
            self.reconcile();
        }
    }

    /// Shutting down: every web client says goodbye, every subscriber is told, and every
    /// group left.
    pub(crate) fn shutdown(&mut self, now: Now) {
        self.web_leave_all(now);
        let all: Vec<(RoomName, Member)> = self.subs.all().map(|(r, m)| (r.clone(), m)).collect();
        for (room, member) in all {
            self.tell_closed(&room, &[member], "mcchatd is stopping");
        }
        for (room, generation) in self.groups.leave_all() {
            self.out.push_back(Output::Leave { room, generation });
        }
    }
}
