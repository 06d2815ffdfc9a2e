//! One peer in one room: the joined socket, this run's instance id and sequence numbers, who
//! is in the room, and the counters for what was dropped.
//!
//! The front ends (terminal, pipe, listen, send) all drive a [`Session`]; it does the socket
//! I/O and leaves the showing to them.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use mcchat_core::presence::{Change, HEARTBEAT_INTERVAL, Roster};
use mcchat_core::ratelimit::LogLimiter;
use mcchat_core::room::{Room, RoomSource};
use mcchat_core::socket::{self, Iface, MulticastConfig};
use mcchat_core::wire::{self, DropCounts, Header, InstanceId, Kind, MAX_DATAGRAM, Meta};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::cli::NetArgs;

/// A message as the front ends show it, owned so it can cross threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Received {
    /// What kind of message.
    pub(crate) kind: Kind,
    /// The room named in the datagram (always this session's room).
    pub(crate) room: String,
    /// Who sent it.
    pub(crate) sender: String,
    /// The text, not yet sanitised.
    pub(crate) text: String,
    /// The sender's timestamp, or the arrival time for bare datagrams (ms since the epoch).
    pub(crate) ts_ms: u64,
    /// The datagram's source address; `None` for this peer's own messages.
    pub(crate) from: Option<SocketAddr>,
    /// The sender's instance id, if tagged.
    pub(crate) instance: Option<InstanceId>,
    /// The sender's sequence number, if tagged.
    pub(crate) seq: Option<u64>,
}

/// Something for a front end to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// A message or action.
    Message(Received),
    /// Somebody came or went.
    Presence(Change),
}

/// A joined room.
pub(crate) struct Session {
    socket: UdpSocket,
    room: Room,
    iface: String,
    name: String,
    instance: InstanceId,
    seq: u64,
    out: String,
    roster: Roster,
    drops: DropCounts,
    drop_log: LogLimiter,
    heartbeat_due: Instant,
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Session {
    /// Opens and joins `room`'s group. `name` is `None` for a listener that never sends.
    pub(crate) fn open(room: Room, net: &NetArgs, name: Option<String>) -> Result<Self> {
        let iface = match &net.iface {
            Some(spec) => Iface::resolve(spec)?,
            None => Iface::system_default(),
        };
        let config = MulticastConfig {
            ttl: net.ttl.or(room.ttl).unwrap_or(socket::DEFAULT_TTL),
            loopback: true,
            iface,
        };
        let joined = socket::open(room.group, &config)?;
        tracing::debug!(
            group = %room.group,
            iface = %config.iface.label,
            ttl = config.ttl,
            multicast_all_cleared = joined.capabilities.multicast_all_cleared,
            recv_buffer = ?joined.capabilities.recv_buffer,
            "socket ready"
        );
        if !joined.capabilities.multicast_all_cleared {
            tracing::debug!("IP_MULTICAST_ALL not supported; relying on the room-name check");
        }
        let socket = UdpSocket::from_std(joined.socket)
            .with_context(|| format!("failed to register the socket for {}", room.group))?;
        let instance =
            InstanceId::random().context("failed to get random bytes for the instance id")?;
        Ok(Self {
            socket,
            room,
            iface: config.iface.label,
            name: name.unwrap_or_default(),
            instance,
            seq: 0,
            out: String::with_capacity(MAX_DATAGRAM),
            roster: Roster::default(),
            drops: DropCounts::default(),
            drop_log: LogLimiter::default(),
            heartbeat_due: Instant::now() + HEARTBEAT_INTERVAL,
        })
    }

    /// One line saying where this session is, for the user.
    pub(crate) fn describe(&self) -> String {
        let how = match self.room.source {
            RoomSource::Configured => "from rooms.toml",
            RoomSource::Derived => "derived from the room name",
        };
        format!(
            "joined {} on {} ({how}) via {}",
            self.room.name, self.room.group, self.iface
        )
    }

    /// The room.
    pub(crate) fn room(&self) -> &Room {
        &self.room
    }

    /// Who is in the room, this peer included, sorted by name.
    pub(crate) fn members(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .roster
            .members()
            .into_iter()
            .map(|m| m.name.clone())
            .collect();
        names.push(self.name.clone());
        names.sort();
        names
    }

    /// Dropped datagrams by reason.
    pub(crate) fn drops(&self) -> &DropCounts {
        &self.drops
    }

    /// Sends `text` as `kind`, split into several datagrams if it does not fit in one.
    /// Returns what was sent, for the front end to show.
    pub(crate) async fn send(&mut self, kind: Kind, text: &str) -> Result<Vec<Received>> {
        let widest = self.header(kind, u64::MAX, u64::MAX);
        let overhead = wire::overhead(&widest, self.room.name.as_str(), &self.name)?;
        let pieces = if text.is_empty() {
            vec![text]
        } else {
            wire::split_text(text, overhead)
        };
        let mut sent = Vec::with_capacity(pieces.len());
        for piece in pieces {
            // Only chat text takes a sequence number; control datagrams carry the latest one,
            // so a receiver can tell from a heartbeat that it missed the tail of a burst.
            if matches!(kind, Kind::Message | Kind::Action) {
                self.seq += 1;
            }
            let ts_ms = now_ms();
            let header = self.header(kind, self.seq, ts_ms);
            wire::encode(
                &header,
                self.room.name.as_str(),
                &self.name,
                piece,
                &mut self.out,
            )
            .with_context(|| format!("cannot send to room {}", self.room.name))?;
            self.socket
                .send_to(self.out.as_bytes(), self.room.group)
                .await
                .with_context(|| format!("failed to send to {}", self.room.group))?;
            sent.push(Received {
                kind,
                room: self.room.name.to_string(),
                sender: self.name.clone(),
                text: piece.to_owned(),
                ts_ms,
                from: None,
                instance: Some(self.instance),
                seq: Some(self.seq),
            });
        }
        Ok(sent)
    }

    fn header(&self, kind: Kind, seq: u64, ts_ms: u64) -> Header<'static> {
        Header {
            meta: Meta {
                instance: Some(self.instance),
                seq: Some(seq),
                ts_ms: Some(ts_ms),
                kind,
            },
            extra: &[],
        }
    }

    /// When [`Session::tick`] should next run.
    pub(crate) fn heartbeat_due(&self) -> Instant {
        self.heartbeat_due
    }

    /// Sends a heartbeat and expires silent members; returns who timed out.
    pub(crate) async fn tick(&mut self) -> Result<Vec<Event>> {
        self.send(Kind::Heartbeat, "").await?;
        self.heartbeat_due = Instant::now() + HEARTBEAT_INTERVAL;
        Ok(self
            .roster
            .expire(std::time::Instant::now())
            .into_iter()
            .map(Event::Presence)
            .collect())
    }

    /// Waits for the next datagram worth showing. Malformed and foreign datagrams are counted
    /// and skipped here; only socket errors end the wait with an error.
    pub(crate) async fn recv(&mut self) -> Result<Event> {
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        loop {
            let (len, from) = match self.socket.recv_from(&mut buf).await {
                Ok(r) => r,
                // An ICMP error for an earlier send, reported on this socket: not fatal.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("failed to receive on {}", self.room.group));
                }
            };
            // A datagram longer than the buffer is truncated to it, which still reads as
            // oversize.
            let frame = match wire::decode(&buf[..len])
                .and_then(|f| f.check_room(self.room.name.as_str()).map(|()| f))
            {
                Ok(f) => f,
                Err(reason) => {
                    let count = self.drops.add(reason);
                    if let Some(suppressed) = self.drop_log.check(std::time::Instant::now()) {
                        tracing::debug!(%from, %reason, count, suppressed, len, "dropped datagram");
                    }
                    continue;
                }
            };
            if frame.meta.instance == Some(self.instance) {
                continue; // our own, looped back
            }
            let kind = frame.meta.kind;
            if let Some(instance) = frame.meta.instance {
                let change =
                    self.roster
                        .observe(instance, frame.sender, kind, std::time::Instant::now());
                if kind == Kind::Join && !self.name.is_empty() {
                    // Answer a newcomer soon, with jitter so a full room does not answer at
                    // once, so its /who is complete without waiting a whole interval.
                    let jitter = Duration::from_millis(u64::from(getrandom_u16() % 500));
                    self.heartbeat_due = self.heartbeat_due.min(Instant::now() + jitter);
                }
                if let Some(change) = change {
                    return Ok(Event::Presence(change));
                }
            }
            match kind {
                Kind::Message | Kind::Action => {}
                Kind::Join | Kind::Leave | Kind::Heartbeat | Kind::Unknown => continue,
            }
            return Ok(Event::Message(Received {
                kind,
                room: frame.room.to_owned(),
                sender: frame.sender.to_owned(),
                text: frame.text.to_owned(),
                ts_ms: frame.meta.ts_ms.unwrap_or_else(now_ms),
                from: Some(from),
                instance: frame.meta.instance,
                seq: frame.meta.seq,
            }));
        }
    }

    /// Logs a one-line summary of dropped datagrams, if any.
    pub(crate) fn log_drops(&self) {
        if self.drops.total() > 0 {
            let by_reason: Vec<String> = self
                .drops
                .nonzero()
                .map(|(r, n)| format!("{r}={n}"))
                .collect();
            tracing::info!(
                room = %self.room.name,
                total = self.drops.total(),
                reasons = %by_reason.join(" "),
                "dropped datagrams"
            );
        }
    }
}

fn getrandom_u16() -> u16 {
    InstanceId::random().map_or(0, |id| id.0 as u16)
}
