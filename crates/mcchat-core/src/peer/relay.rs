//! The client side of mcchatd's relay protocol (PROTOCOL.md 4.2) as a state machine:
//! subscribe with a cookie round-trip, renew every third of the lease, unsubscribe on the
//! way out. A one-shot sender (`mcchat send --via`) only proves its address: it takes the
//! cookie of the first round trip and subscribes to nothing. Either way the engine puts the
//! cookie on everything it sends to the daemon, which relays a proven source under its own
//! budget instead of the small one all unproven sources share (PROTOCOL.md 4.3). It only
//! decides; the engine encodes the requests it asks for.
//!
//! Every request carries the subscription's random nonce, and an answer (`cookie`, `subok`,
//! `closed`) counts only if it echoes it: anyone on the LAN can forge a datagram from the
//! daemon's address, and one forged `closed` would end the client, or one `subok` with a
//! long lease make it stop renewing and go deaf.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::Event;
use crate::tags;
use crate::wire::{Frame, Kind};

/// Attempts, and the wait for an answer to each, before giving up on the daemon.
const ATTEMPTS: u32 = 3;
/// Renewals come every third of the lease, and at least this often: the daemon's cookies
/// are valid 120 s (PROTOCOL.md 4.2), and a subscriber's NACKs and renewals need a valid one.
const RENEW_AT_MOST: Duration = Duration::from_secs(100);
const ANSWER_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Subscribing {
        attempt: u32,
        answer_due: Instant,
    },
    Subscribed {
        renew_due: Instant,
    },
    /// Holds a cookie for its address and subscribes to nothing (a one-shot sender); a new
    /// one is asked for before it is too old.
    Proven {
        renew_due: Instant,
    },
}

/// A subscription to one room through one daemon.
#[derive(Debug)]
pub(super) struct RelayClient {
    daemon: SocketAddr,
    /// Echoed by the daemon's answers (module docs).
    nonce: String,
    /// Answers that did not echo the nonce, ignored.
    pub(super) ignored: u64,
    cookie: Option<String>,
    lease: Duration,
    state: State,
    /// Requests (sub, unsub) to send, in order.
    requests: Vec<Kind>,
    /// Subscribes (`join`, `listen`), or only proves its address (`send`).
    subscribe: bool,
}

impl RelayClient {
    /// A client of the daemon at `daemon`; `subscribe` false for one that only proves its
    /// address.
    pub(super) fn new(daemon: SocketAddr, nonce: String, subscribe: bool) -> Self {
        Self {
            subscribe,
            daemon,
            nonce,
            ignored: 0,
            cookie: None,
            lease: Duration::from_secs(60),
            state: State::Idle,
            requests: Vec::new(),
        }
    }

    pub(super) fn subscribed(&self) -> bool {
        matches!(self.state, State::Subscribed { .. })
    }

    /// The cookie its requests carry: none for one that only proves its address, whose every
    /// `sub` must be answered with a challenge (a `sub` with a cookie would subscribe it).
    pub(super) fn request_cookie(&self) -> Option<&str> {
        if self.subscribe {
            self.cookie.as_deref()
        } else {
            None
        }
    }

    /// The cookie to put on what the engine sends to the daemon, once it has one.
    pub(super) fn proof(&self) -> Option<&str> {
        match self.state {
            State::Idle => None,
            _ => self.cookie.as_deref(),
        }
    }

    /// Neither subscribing nor subscribed (never started, or ended).
    pub(super) fn idle(&self) -> bool {
        self.state == State::Idle
    }

    pub(super) fn nonce(&self) -> &str {
        &self.nonce
    }

    /// A third of the lease, so two renewals can be lost before it lapses; at most
    /// [`RENEW_AT_MOST`], so the cookie from the last `subok` is always valid.
    fn renew_every(&self) -> Duration {
        (self.lease / 3).min(RENEW_AT_MOST)
    }

    pub(super) fn take_requests(&mut self) -> Vec<Kind> {
        std::mem::take(&mut self.requests)
    }

    pub(super) fn subscribe(&mut self, now: Instant) {
        self.state = State::Subscribing {
            attempt: 1,
            answer_due: now + ANSWER_WAIT,
        };
        self.requests.push(Kind::Subscribe);
    }

    /// Ends the subscription; best effort, since the lease ends it anyway.
    pub(super) fn unsubscribe(&mut self) {
        if self.subscribed() && self.cookie.is_some() {
            self.requests.push(Kind::Unsubscribe);
        }
        self.state = State::Idle;
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Idle => None,
            State::Subscribing { answer_due, .. } => Some(answer_due),
            State::Subscribed { renew_due } | State::Proven { renew_due } => Some(renew_due),
        }
    }

    pub(super) fn poll(&mut self, now: Instant) -> Option<Event> {
        match self.state {
            State::Subscribing {
                attempt,
                answer_due,
            } if now >= answer_due => {
                if attempt >= ATTEMPTS {
                    self.state = State::Idle;
                    let ignored = if self.ignored > 0 {
                        format!(
                            " ({} answers ignored: they did not echo this client's nonce; \
                             is mcchatd older than this mcchat?)",
                            self.ignored
                        )
                    } else {
                        String::new()
                    };
                    return Some(Event::Ended(format!(
                        "no answer from mcchatd at {} after {ATTEMPTS} tries: is it running, \
                         and does its `allow` setting include this network?{ignored}",
                        self.daemon
                    )));
                }
                self.state = State::Subscribing {
                    attempt: attempt + 1,
                    answer_due: now + ANSWER_WAIT,
                };
                self.requests.push(Kind::Subscribe);
            }
            State::Subscribed { renew_due } if now >= renew_due => {
                self.state = State::Subscribed {
                    renew_due: now + self.renew_every(),
                };
                self.requests.push(Kind::Subscribe);
            }
            State::Proven { renew_due } if now >= renew_due => {
                // The cookie stays valid meanwhile; the next challenge replaces it.
                self.state = State::Proven {
                    renew_due: now + RENEW_AT_MOST,
                };
                self.requests.push(Kind::Subscribe);
            }
            _ => {}
        }
        None
    }

    /// A control datagram from the daemon: a challenge is answered, a confirmation noted,
    /// and a closed subscription ends the engine.
    pub(super) fn on_control(
        &mut self,
        frame: &Frame<'_>,
        room: &str,
        now: Instant,
    ) -> Option<Event> {
        if frame.tags.get(tags::NONCE).as_deref() != Some(self.nonce.as_str()) {
            self.ignored += 1;
            return None;
        }
        match frame.meta.kind {
            Kind::Challenge if self.state != State::Idle => {
                let cookie = frame.tags.get(tags::COOKIE)?;
                self.cookie = Some(cookie.into_owned());
                if self.subscribe {
                    self.requests.push(Kind::Subscribe);
                    return None;
                }
                let first = !matches!(self.state, State::Proven { .. });
                self.state = State::Proven {
                    renew_due: now + RENEW_AT_MOST,
                };
                if first {
                    tracing::debug!(daemon = %self.daemon, room, "address proven");
                }
                first.then_some(Event::Subscribed)
            }
            Kind::Subscribed if self.state != State::Idle => {
                // Each confirmation carries a fresh cookie: keep the newest.
                if let Some(cookie) = frame.tags.get(tags::COOKIE) {
                    self.cookie = Some(cookie.into_owned());
                }
                if let Some(secs) = frame.tags.get("lease").and_then(|l| l.parse::<u64>().ok()) {
                    self.lease = Duration::from_secs(secs.clamp(3, 3600));
                }
                let first = !self.subscribed();
                self.state = State::Subscribed {
                    renew_due: now + self.renew_every(),
                };
                if first {
                    tracing::debug!(daemon = %self.daemon, room, lease = ?self.lease, "subscribed");
                }
                first.then_some(Event::Subscribed)
            }
            Kind::Closed if self.state != State::Idle => {
                self.state = State::Idle;
                let why = crate::sanitize::for_terminal(frame.text).into_owned();
                Some(Event::Ended(format!(
                    "mcchatd at {} ended the subscription to {room}: {why}",
                    self.daemon
                )))
            }
            _ => None,
        }
    }
}
