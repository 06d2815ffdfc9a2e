//! The joined-group port: one task per joined group, receiving what the group carries and
//! handing it to the driver. Its only state is the socket; it stops (and the membership is
//! dropped with the socket) when its token is cancelled, in a receive or in a send alike.

use std::net::SocketAddr;

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

/// Joins `group` for `room` and starts its receive task, which sends what it hears to `tx`
/// until `stop` is cancelled.
pub(crate) fn spawn(
    room: RoomName,
    group: SocketAddr,
    generation: u64,
    config: &MulticastConfig,
    tx: mpsc::Sender<GroupDatagram>,
    stop: CancellationToken,
    tracker: &TaskTracker,
) -> Result<()> {
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
