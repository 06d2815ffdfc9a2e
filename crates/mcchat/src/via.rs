//! The client side of mcchatd's relay protocol (docs/PROTOCOL.md, section 4): subscribe with
//! a cookie round-trip, renew within the lease, unsubscribe on the way out. Chat datagrams go
//! to the daemon's relay port, which sends them on to the group.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use mcchat_core::daemon::DEFAULT_RELAY_PORT;
use mcchat_core::wire::{self, Frame, Kind};
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// Attempts, and the wait for an answer to each, before giving up on the daemon.
const ATTEMPTS: u32 = 3;
const ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Resolves `HOST[:PORT]` (the port defaults to 5554).
pub(crate) async fn resolve(spec: &str) -> Result<SocketAddr> {
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = spec.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_RELAY_PORT));
    }
    let with_port = if spec.contains(':') {
        spec.to_owned()
    } else {
        format!("{spec}:{DEFAULT_RELAY_PORT}")
    };
    tokio::net::lookup_host(&with_port)
        .await
        .with_context(|| format!("cannot resolve mcchatd address {spec:?}"))?
        .next()
        .with_context(|| format!("mcchatd address {spec:?} resolves to nothing"))
}

/// A unicast association with one mcchatd.
pub(crate) struct Via {
    socket: UdpSocket,
    daemon: SocketAddr,
    cookie: Option<String>,
    lease: Duration,
    renew_due: Instant,
    subscribed: bool,
    out: String,
}

impl Via {
    /// A socket connected to `daemon`, so only its datagrams are received.
    pub(crate) async fn connect(daemon: SocketAddr) -> Result<Self> {
        let local: SocketAddr = if daemon.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local)
            .await
            .context("failed to open a UDP socket")?;
        socket
            .connect(daemon)
            .await
            .with_context(|| format!("cannot reach mcchatd at {daemon}"))?;
        Ok(Self {
            socket,
            daemon,
            cookie: None,
            lease: Duration::from_secs(60),
            renew_due: far_future(),
            subscribed: false,
            out: String::new(),
        })
    }

    pub(crate) fn daemon(&self) -> SocketAddr {
        self.daemon
    }

    pub(crate) async fn send(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.socket.send(bytes).await.map(|_| ())
    }

    pub(crate) async fn recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        let n = self.socket.recv(buf).await?;
        Ok((n, self.daemon))
    }

    /// When the subscription should be renewed: a third of the lease, so two renewals can
    /// be lost before it lapses.
    pub(crate) fn renew_due(&self) -> Instant {
        if self.subscribed {
            self.renew_due
        } else {
            far_future()
        }
    }

    fn request(&mut self, kind: Kind, room: &str, sender: &str) -> Result<()> {
        wire::relay_request(
            kind,
            room,
            sender,
            self.cookie.as_deref(),
            wire::MIN_RELAY_REQUEST,
            &mut self.out,
        )?;
        Ok(())
    }

    async fn send_request(&mut self, kind: Kind, room: &str, sender: &str) -> Result<()> {
        self.request(kind, room, sender)?;
        self.socket
            .send(self.out.as_bytes())
            .await
            .with_context(|| format!("failed to send to mcchatd at {}", self.daemon))?;
        Ok(())
    }

    /// Subscribes to `room` and waits until the daemon confirms.
    pub(crate) async fn subscribe(&mut self, room: &str, sender: &str) -> Result<()> {
        let mut buf = vec![0u8; wire::MAX_DATAGRAM + 1];
        for _ in 0..ATTEMPTS {
            self.send_request(Kind::Subscribe, room, sender).await?;
            let deadline = Instant::now() + ANSWER_WAIT;
            while let Ok(r) = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await {
                // ECONNREFUSED: nothing listens there (yet); the next attempt may do better.
                let Ok(len) = r else { break };
                let Ok(frame) = wire::decode(&buf[..len]) else {
                    continue;
                };
                if frame.room != room || !frame.meta.kind.is_relay_control() {
                    continue;
                }
                self.on_control(&frame, room, sender).await?;
                if self.subscribed {
                    return Ok(());
                }
            }
        }
        bail!(
            "no answer from mcchatd at {} after {ATTEMPTS} tries: is it running, and does its \
             `allow` setting include this network?",
            self.daemon
        )
    }

    /// Renews the subscription (the answer arrives through [`Via::on_control`]).
    pub(crate) async fn renew(&mut self, room: &str, sender: &str) -> std::io::Result<()> {
        self.renew_due = Instant::now() + self.lease / 3;
        self.request(Kind::Subscribe, room, sender)
            .map_err(std::io::Error::other)?;
        self.socket.send(self.out.as_bytes()).await.map(|_| ())
    }

    /// Handles a daemon datagram: a challenge is answered, a confirmation noted, and a
    /// closed subscription is an error that ends the session.
    pub(crate) async fn on_control(
        &mut self,
        frame: &Frame<'_>,
        room: &str,
        sender: &str,
    ) -> Result<()> {
        match frame.meta.kind {
            Kind::Challenge => {
                let Some(cookie) = frame.tags.get("cookie") else {
                    return Ok(());
                };
                self.cookie = Some(cookie.into_owned());
                self.send_request(Kind::Subscribe, room, sender).await?;
            }
            Kind::Subscribed => {
                // Each confirmation carries a fresh cookie: keep the newest.
                if let Some(cookie) = frame.tags.get("cookie") {
                    self.cookie = Some(cookie.into_owned());
                }
                if let Some(secs) = frame.tags.get("lease").and_then(|l| l.parse::<u64>().ok()) {
                    self.lease = Duration::from_secs(secs.clamp(3, 3600));
                }
                if !self.subscribed {
                    tracing::debug!(daemon = %self.daemon, room, lease = ?self.lease, "subscribed");
                }
                self.subscribed = true;
                self.renew_due = Instant::now() + self.lease / 3;
            }
            Kind::Closed => {
                self.subscribed = false;
                let why = mcchat_core::sanitize::for_terminal(frame.text).into_owned();
                bail!(
                    "mcchatd at {} ended the subscription to {room}: {why}",
                    self.daemon
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// Ends the subscription; best effort, since the lease ends it anyway.
    pub(crate) async fn unsubscribe(&mut self, room: &str, sender: &str) {
        if self.subscribed && self.cookie.is_some() {
            let _ = self.send_request(Kind::Unsubscribe, room, sender).await;
            self.subscribed = false;
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn via_addresses_resolve() {
        assert_eq!(
            resolve("127.0.0.1").await.unwrap(),
            "127.0.0.1:5554".parse().unwrap()
        );
        assert_eq!(
            resolve("127.0.0.1:7").await.unwrap(),
            "127.0.0.1:7".parse().unwrap()
        );
        assert_eq!(resolve("::1").await.unwrap(), "[::1]:5554".parse().unwrap());
        assert_eq!(
            resolve("[::1]:7").await.unwrap(),
            "[::1]:7".parse().unwrap()
        );
    }
}
