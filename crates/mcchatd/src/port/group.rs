//! The joined-group port: one task per joined group, receiving what the group carries and
//! handing it to the driver. Its only state is the socket; it stops (and the membership is
//! dropped with the socket) when its token is cancelled, in a receive or in a send alike.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use bytes::{Bytes, BytesMut};
use mcchat_core::room::RoomName;
use mcchat_core::socket::{self, MulticastConfig};
use mcchat_core::wire::MAX_DATAGRAM;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A datagram heard on a joined group.
#[derive(Debug)]
pub(crate) struct GroupDatagram {
    pub(crate) room: RoomName,
    /// The membership it was heard in (see `hub::Port::Group`).
    pub(crate) generation: u64,
    pub(crate) from: SocketAddr,
    pub(crate) data: Bytes,
}

/// Receive buffer: room for several datagrams, so a burst costs one allocation per few.
const BUFFER: usize = 16 * (MAX_DATAGRAM + 1);

/// The hub's own forwards, recognised by their first bytes: what the hub sends to a group
/// starts with its `relay` tag (hop-by-hop tags come first, PROTOCOL 2.8), so its multicast
/// loopback echo is dropped here, with no copy, no queueing and no decoding. That is half of
/// all group traffic in a room the daemon relays into; the hub checks the tag again for
/// anything that gets past (the tag elsewhere in the list).
#[derive(Debug)]
pub(crate) struct OwnForwards {
    prefix: Box<[u8]>,
    /// How many were dropped here.
    pub(crate) dropped: AtomicU64,
}

impl OwnForwards {
    /// For the relay id `id` (its `relay` tag value).
    pub(crate) fn new(id: &str) -> Self {
        Self {
            prefix: format!("@{}={id}", crate::hub::RELAY_TAG)
                .into_bytes()
                .into(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether `data` begins with this hub's relay tag (followed by the end of the tag).
    pub(crate) fn matches(&self, data: &[u8]) -> bool {
        data.strip_prefix(&*self.prefix)
            .is_some_and(|rest| matches!(rest.first(), Some(b';' | b' ')))
    }
}

/// What every group port shares: where datagrams go, the own-forward filter, and the
/// tracker that shutdown waits on.
#[derive(Debug, Clone)]
pub(crate) struct Feed {
    pub(crate) tx: mpsc::Sender<GroupDatagram>,
    pub(crate) own: Arc<OwnForwards>,
    pub(crate) tracker: TaskTracker,
}

/// Joins `group` for `room` and starts its receive task, which sends what it hears to the
/// feed until `stop` is cancelled.
pub(crate) fn spawn(
    room: RoomName,
    group: SocketAddr,
    generation: u64,
    config: &MulticastConfig,
    feed: &Feed,
    stop: CancellationToken,
) -> Result<()> {
    let Feed { tx, own, tracker } = feed.clone();
    let joined = socket::open(group, config)?;
    let sock = UdpSocket::from_std(joined.socket)?;
    tracker.spawn(async move {
        let mut buf = BytesMut::with_capacity(BUFFER);
        loop {
            if buf.capacity() < MAX_DATAGRAM + 1 {
                buf.reserve(BUFFER);
            }
            let r = tokio::select! {
                () = stop.cancelled() => break,
                r = sock.recv_buf_from(&mut buf) => r,
            };
            match r {
                Ok(_) if own.matches(&buf) => {
                    own.dropped.fetch_add(1, Ordering::Relaxed);
                    buf.clear();
                }
                Ok((_, from)) => {
                    let d = GroupDatagram {
                        room: room.clone(),
                        generation,
                        from,
                        data: buf.split().freeze(),
                    };
                    let sent = tokio::select! {
                        () = stop.cancelled() => break,
                        s = tx.send(d) => s,
                    };
                    if sent.is_err() {
                        break;
                    }
                }
                Err(error) => {
                    buf.clear();
                    tracing::debug!(%error, room = %room, "group receive error");
                }
            }
        }
        drop(sock);
        tracing::info!(room = %room, %group, "left group");
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_forwards_are_recognised_by_their_first_tag_only() {
        let own = OwnForwards::new("0a0b0c0d");
        assert!(own.matches(b"@relay=0a0b0c0d;id=1 r|a|b"));
        assert!(own.matches(b"@relay=0a0b0c0d r|a|b"));
        assert!(!own.matches(b"@relay=0a0b0c0de r|a|b"), "a longer id");
        assert!(
            !own.matches(b"@relay=99999999;id=1 r|a|b"),
            "another daemon"
        );
        assert!(!own.matches(b"r|a|@relay=0a0b0c0d "), "text is not a tag");
        assert!(!own.matches(b"@relay=0a0b0c0d"));
    }
}
