//! What the driver sends on the relay sockets: datagrams to groups, gathered per flush into
//! as few system calls as the socket allows, and fan-outs to unicast members.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;

use super::Driver;
use crate::hub::UdpDest;
use crate::port::mmsg;
use crate::port::udp::{RelaySocket, SendReport};

/// Group datagrams the hub has asked for in this flush and the driver has not yet sent: one
/// address family and TTL at a time (both are the socket's, set before the batch goes out),
/// at most [`mmsg::MAX`]. Any other output sends them first, so the order of outputs holds.
#[derive(Debug, Default)]
pub(super) struct GroupSends {
    /// Family (IPv4?) and TTL of what `items` holds.
    key: Option<(bool, u32)>,
    items: Vec<(SocketAddr, Bytes)>,
}

impl Driver {
    /// Queues a datagram to a room's group; sends what was queued first if it cannot go out
    /// in the same call (another family or TTL, or a full batch).
    pub(super) async fn queue_to_group(&mut self, group: SocketAddr, ttl: u32, data: Bytes) {
        let key = (group.is_ipv4(), ttl);
        if self.to_groups.key != Some(key) || self.to_groups.items.len() >= mmsg::MAX {
            self.send_to_groups().await;
        }
        self.to_groups.key = Some(key);
        self.to_groups.items.push((group, data));
    }

    /// Sends the queued group datagrams.
    pub(super) async fn send_to_groups(&mut self) {
        let Some((ipv4, ttl)) = self.to_groups.key.take() else {
            return;
        };
        let mut items = std::mem::take(&mut self.to_groups.items);
        self.use_ttl(ipv4, ttl);
        match self.socket_for(ipv4) {
            Some(sock) => {
                let report = sock.send_batch(&items).await;
                self.note_report(&report);
            }
            None => self.hub.send_failed(items.len() as u64),
        }
        items.clear();
        self.to_groups.items = items;
    }

    pub(super) fn socket_for(&self, ipv4: bool) -> Option<&RelaySocket> {
        if ipv4 {
            self.relay4.as_ref()
        } else {
            self.relay6.as_ref()
        }
    }

    /// Sends multicast with `ttl` from then on; a syscall only when it changes.
    fn use_ttl(&mut self, ipv4: bool, ttl: u32) {
        let (current, sock) = if ipv4 {
            (&mut self.ttl4, self.relay4.as_ref())
        } else {
            (&mut self.ttl6, self.relay6.as_ref())
        };
        if *current == ttl {
            return;
        }
        if let Some(sock) = sock {
            match sock.set_multicast_ttl(ttl) {
                Ok(()) => *current = ttl,
                Err(error) => tracing::warn!(%error, ttl, "cannot set the multicast TTL"),
            }
        }
    }

    /// Sends `data` to each of `to` but `except`, from the address each one wrote to.
    pub(super) async fn send_udp(
        &mut self,
        to: &[UdpDest],
        except: Option<SocketAddr>,
        data: &[u8],
    ) {
        for ipv4 in [true, false] {
            let mut dests = std::mem::take(&mut self.dests);
            dests.clear();
            dests.extend(
                to.iter()
                    .filter(|d| d.addr.is_ipv4() == ipv4 && Some(d.addr) != except)
                    .map(|d| (d.addr, d.src)),
            );
            if !dests.is_empty() {
                self.send_many(ipv4, &dests, data).await;
            }
            self.dests = dests;
        }
    }

    async fn send_many(&mut self, ipv4: bool, dests: &[(SocketAddr, Option<IpAddr>)], data: &[u8]) {
        let Some(sock) = self.socket_for(ipv4) else {
            self.hub.send_failed(dests.len() as u64);
            return;
        };
        let report = sock.send_many(dests, data).await;
        self.note_report(&report);
    }

    /// Counts a send's failures, and logs the first (one line per 10 s at most).
    fn note_report(&mut self, report: &SendReport) {
        if report.failed > 0 {
            self.hub.send_failed(report.failed as u64);
            if let Some((to, error)) = &report.first_error
                && let Some(suppressed) = self.send_log.check(self.now().mono)
            {
                tracing::warn!(%to, %error, failed = report.failed, suppressed, "send failed");
            }
        }
    }
}
