//! One bridged room on the NATS link: its reader (the room's subject, from the stream) and
//! its injection lease. Each task has an epoch; every lease event carries it, so the hub
//! never takes an old task's word over a newer one's.

use std::time::Duration;

use async_nats::jetstream::{consumer, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt as _;
use mcchat_core::room::RoomName;
use mcchat_core::wire::MAX_DATAGRAM;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::link::{Nats, Shared, SiteEvent, backoff, update};
use super::subject;

/// A reader's consumer: forgotten by the server this long after its reader went; pulls of
/// this many messages (and bytes), each open this long, with an idle heartbeat this often
/// (two missed and the reader is made again).
const READER_IDLE: Duration = Duration::from_secs(30);
const READER_BATCH: usize = 512;
const READER_BATCH_BYTES: usize = READER_BATCH * MAX_DATAGRAM;
const READER_EXPIRES: Duration = Duration::from_secs(5);
const READER_HEARTBEAT: Duration = Duration::from_secs(1);

pub(super) struct RoomTask {
    pub(super) room: RoomName,
    pub(super) epoch: u64,
    pub(super) subject: String,
    pub(super) lease_key: String,
    pub(super) lease: Duration,
    pub(super) owner: String,
    pub(super) events: mpsc::Sender<SiteEvent>,
    pub(super) state: Shared,
    pub(super) connections: watch::Receiver<u64>,
    pub(super) stop: CancellationToken,
}

impl RoomTask {
    pub(super) async fn run(self, nats: Nats) {
        // Whatever an earlier task of the room said, this one holds nothing yet.
        self.tell_lease(false).await;
        match &nats.js {
            Some((stream, leases)) => {
                tokio::join!(self.read_stream(stream), self.hold_lease(leases));
            }
            None => {
                // Core NATS only: no other daemon can be known of; this one injects.
                self.tell_lease(true).await;
                self.read_core(&nats.client).await;
                self.released();
            }
        }
    }

    /// Sends `ev` to the driver unless the task is stopped first; false if it was (or the
    /// driver is gone).
    async fn send(&self, ev: SiteEvent) -> bool {
        tokio::select! {
            () = self.stop.cancelled() => false,
            r = self.events.send(ev) => r.is_ok(),
        }
    }

    /// Hands a message to the driver, unless its subject is not the room's (the reader
    /// asked for that one only) or it is longer than any datagram (the hub would drop it);
    /// false once the task is stopping.
    async fn deliver(&self, subject: &str, data: Bytes) -> bool {
        if subject::room_of(subject).as_ref() != Some(&self.room) || data.len() > MAX_DATAGRAM {
            update(&self.state, |s| s.refused += 1);
            return true;
        }
        self.send(SiteEvent::Message {
            room: self.room.clone(),
            data,
        })
        .await
    }

    async fn tell_lease(&self, held: bool) {
        self.send(SiteEvent::Lease {
            room: self.room.clone(),
            held,
            epoch: self.epoch,
        })
        .await;
    }

    /// Tells the driver the lease is given up, on the way out: never waits (the driver may
    /// be shutting down; a later task of the room says so first anyway).
    fn released(&self) {
        let _ = self.events.try_send(SiteEvent::Lease {
            room: self.room.clone(),
            held: false,
            epoch: self.epoch,
        });
    }

    async fn pause(&self, attempt: usize) -> bool {
        tokio::select! {
            () = self.stop.cancelled() => false,
            () = tokio::time::sleep(backoff(attempt)) => true,
        }
    }

    async fn read_core(&self, client: &async_nats::Client) {
        let mut attempt = 0;
        loop {
            let sub = tokio::select! {
                () = self.stop.cancelled() => return,
                s = client.subscribe(self.subject.clone()) => s,
            };
            let mut sub = match sub {
                Ok(s) => {
                    tracing::info!(room = %self.room, "site link: reading the room's subject (core NATS)");
                    s
                }
                Err(error) => {
                    tracing::debug!(%error, "site link: cannot subscribe; retrying");
                    if !self.pause(attempt).await {
                        return;
                    }
                    attempt += 1;
                    continue;
                }
            };
            loop {
                let m = tokio::select! {
                    () = self.stop.cancelled() => return,
                    m = sub.next() => m,
                };
                let Some(m) = m else { break };
                attempt = 0;
                if !self.deliver(&m.subject, m.payload).await {
                    return;
                }
            }
        }
    }

    /// Reads the room's subject from the stream, in order, from the first message after
    /// the reader started, and after any failure again from the last stream sequence seen.
    ///
    /// An ordered reader of our own: one ephemeral consumer, no acks, in memory, made again
    /// whenever a delivery is missing (its consumer sequence skips), its idle heartbeat stops
    /// (its server, or the stream's leader, went), the connection came back (a restarted
    /// server has forgotten it), or anything fails. (async-nats's ordered consumer notices a
    /// lost consumer only after two 15 s heartbeats.)
    async fn read_stream(&self, stream: &stream::Stream) {
        let mut connections = self.connections.clone();
        // Where the reader starts: after the stream's last message when it first starts, so
        // that a resume before anything arrived still starts from there.
        let mut last: Option<u64> = None;
        let mut attempt = 0;
        loop {
            if last.is_none() {
                let info = tokio::select! {
                    () = self.stop.cancelled() => return,
                    i = stream.get_info() => i,
                };
                match info {
                    Ok(i) => last = Some(i.state.last_sequence),
                    Err(error) => {
                        tracing::debug!(%error, "site link: cannot read the stream's state; retrying");
                        if !self.pause(attempt).await {
                            return;
                        }
                        attempt += 1;
                        continue;
                    }
                }
            }
            let after = last.unwrap_or(0);
            let made = async {
                stream
                    .create_consumer(consumer::pull::Config {
                        filter_subject: self.subject.clone(),
                        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                            start_sequence: after + 1,
                        },
                        ack_policy: consumer::AckPolicy::None,
                        memory_storage: true,
                        num_replicas: 1,
                        inactive_threshold: READER_IDLE,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .stream()
                    .max_messages_per_batch(READER_BATCH)
                    .max_bytes_per_batch(READER_BATCH_BYTES)
                    .expires(READER_EXPIRES)
                    .heartbeat(READER_HEARTBEAT)
                    .messages()
                    .await
                    .map_err(|e| e.to_string())
            };
            let made = tokio::select! {
                () = self.stop.cancelled() => return,
                m = made => m,
            };
            let mut messages = match made {
                Ok(m) => m,
                Err(error) => {
                    tracing::debug!(%error, "site link: cannot read the stream; retrying");
                    if !self.pause(attempt).await {
                        return;
                    }
                    attempt += 1;
                    continue;
                }
            };
            let mut delivered = 0u64;
            connections.borrow_and_update();
            // The readiness signal of a room's reader (tests wait for it).
            tracing::info!(room = %self.room, after, "site link: reading the room's stream");
            loop {
                let m = tokio::select! {
                    () = self.stop.cancelled() => return,
                    Ok(()) = connections.changed() => break,
                    m = messages.next() => m,
                };
                let Some(Ok(m)) = m else {
                    if let Some(Err(error)) = m {
                        tracing::debug!(%error, "site link: stream reader resuming");
                    }
                    break;
                };
                let Ok(info) = m.info() else { break };
                if info.consumer_sequence != delivered + 1 {
                    break; // a delivery went missing: read again from the last one seen
                }
                delivered = info.consumer_sequence;
                last = Some(info.stream_sequence);
                attempt = 0;
                let m = m.message;
                if !self.deliver(&m.subject, m.payload).await {
                    return;
                }
            }
            // Every resume is counted, and waits its back-off: a reader that keeps failing
            // does not spin.
            update(&self.state, |s| s.resumes += 1);
            if !self.pause(attempt).await {
                return;
            }
            attempt += 1;
        }
    }

    /// Wins the room's lease when it is free, renews it every third of its life, and tells
    /// the driver each change. The lease is taken as held until `lease` (less a margin)
    /// after the last renewal was *sent*: by then the server may have let it go, and another
    /// daemon may hold it. On stop, a held lease is given back so that another daemon takes
    /// over at once.
    async fn hold_lease(&self, leases: &kv::Store) {
        let every = self.lease / 3;
        let good_for = self.lease - self.lease / 6;
        let value = Bytes::from(self.owner.clone());
        // The revision held, and when the request that won or renewed it was sent.
        let mut held: Option<(u64, Instant)> = None;
        loop {
            let sent = Instant::now();
            let attempt = async {
                match held {
                    None => match leases.create(&self.lease_key, value.clone()).await {
                        Ok(rev) => Some(rev),
                        // A create that timed out may have won: adopt our own value.
                        Err(_) => match leases.entry(&self.lease_key).await {
                            Ok(Some(e)) if e.value == value => Some(e.revision),
                            _ => None,
                        },
                    },
                    Some((rev, _)) => {
                        match leases.update(&self.lease_key, value.clone(), rev).await {
                            Ok(rev) => Some(rev),
                            // Renewal failed: expired (create again), taken over, or unreachable.
                            Err(_) => match leases.entry(&self.lease_key).await {
                                Ok(Some(e)) if e.value == value => leases
                                    .update(&self.lease_key, value.clone(), e.revision)
                                    .await
                                    .ok(),
                                Ok(None) => {
                                    leases.create(&self.lease_key, value.clone()).await.ok()
                                }
                                _ => None,
                            },
                        }
                    }
                }
            };
            // While held, no attempt outlasts the lease's remaining life.
            let budget = match held {
                Some((_, at)) => good_for
                    .saturating_sub(sent.saturating_duration_since(at))
                    .min(every),
                None => every,
            };
            let result = tokio::select! {
                () = self.stop.cancelled() => break,
                r = tokio::time::timeout(budget, attempt) => r.ok().flatten(),
            };
            let was_held = held.is_some();
            match result {
                Some(rev) => held = Some((rev, sent)),
                None => {
                    if held.is_some_and(|(_, at)| {
                        Instant::now().saturating_duration_since(at) >= good_for
                    }) {
                        held = None;
                    }
                }
            }
            match (was_held, held.is_some()) {
                (false, true) => self.tell_lease(true).await,
                (true, false) => self.tell_lease(false).await,
                _ => {}
            }
            let next = match (result.is_some(), held) {
                (true, Some((_, at))) => at + every,
                // Failed while still ours: soon again, within what is left of it.
                (false, Some(_)) => Instant::now() + every / 4,
                (_, None) => Instant::now() + every,
            };
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = tokio::time::sleep_until(next) => {}
            }
        }
        if let Some((rev, _)) = held {
            let _ = tokio::time::timeout(
                super::link::RELEASE_WITHIN,
                leases.delete_expect_revision(&self.lease_key, Some(rev)),
            )
            .await;
            self.released();
        }
    }
}
