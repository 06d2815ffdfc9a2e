//! The NATS port: the daemon's link to other sites. It only moves bytes, as the relay
//! sockets do: what the hub publishes goes out on the room's subject, what the rooms'
//! subjects bring comes back to the driver, and the room's injection lease is won, renewed
//! and given back. Every decision about what crosses is the hub's (hub/site.rs).
//!
//! - **Connection**: async-nats, retrying from the start (the daemon serves its LAN while
//!   NATS is down), with jittered exponential back-off, `no_echo`, and pings every 5 s so a
//!   dead path is noticed within about 10 s.
//! - **JetStream**, when the server has it: one stream (`MCCHAT`) over every room's subject,
//!   file storage, bounded age, a duplicate window; each bridged room is read through an
//!   ordered consumer, which notices a gap in what it was given (a reconnect, a slow
//!   consumer) and asks again from the last stream sequence it saw, so a site that lost part
//!   of the stream fetches it, in order. Leases live in the key-value bucket
//!   `mcchat_leases`, one key per site and room, with the lease's TTL.
//! - **Core NATS only** (no JetStream at the server): rooms are plain subscriptions, and this
//!   daemon injects every room (it cannot know of another); a loss between sites is then
//!   reported by the LAN's peers as lost, not fetched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use mcchat_core::room::RoomName;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::config::{Credentials, SitesSettings};
use super::publish::{Publish, Publisher};
use super::room::RoomTask;
use super::subject;

/// The JetStream stream of every room's messages.
pub(crate) const STREAM: &str = "MCCHAT";
/// The key-value bucket of injection leases.
pub(crate) const LEASES: &str = "mcchat_leases";
/// Publishes waiting for the link at most; past this they are dropped and counted (the
/// far sites' peers see the gap and report it).
const PUBLISH_QUEUE: usize = 8192;
/// How often a core-only link asks again whether the server has JetStream.
const JETSTREAM_RECHECK: Duration = Duration::from_secs(30);
/// How long shutdown gives the leases back and flushes what is queued.
pub(super) const RELEASE_WITHIN: Duration = Duration::from_millis(150);

/// What the link brought.
#[derive(Debug)]
pub(crate) enum SiteEvent {
    /// A message on `room`'s subject.
    Message { room: RoomName, data: Bytes },
    /// This daemon holds `room`'s injection lease now, or no longer, says the room's task
    /// of `epoch` (later tasks have higher ones).
    Lease {
        room: RoomName,
        held: bool,
        epoch: u64,
    },
}

/// The link's state, for status.
#[derive(Debug, Clone, Default)]
pub(crate) struct LinkState {
    pub(crate) connected: bool,
    pub(crate) server: Option<String>,
    pub(crate) jetstream: bool,
    pub(crate) disconnects: u64,
    pub(crate) last_error: Option<String>,
    pub(crate) publish_dropped: u64,
    /// Times a room's reader resumed from the stream after a gap or a lost connection.
    pub(crate) resumes: u64,
    /// Messages from NATS refused before the hub: longer than a datagram, or on a subject
    /// not the room's.
    pub(crate) refused: u64,
}

pub(super) type Shared = Arc<Mutex<LinkState>>;

/// Counts connections to NATS: a room's reader starts again from its last stream sequence
/// after each reconnection (a restarted server has forgotten the readers' consumers, and the
/// ordered consumer does not always notice).
type Connections = watch::Sender<u64>;

pub(super) fn update(state: &Shared, f: impl FnOnce(&mut LinkState)) {
    f(&mut state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner));
}

/// The driver's handle on the link.
pub(crate) struct Link {
    publish: mpsc::Sender<Publish>,
    rooms: watch::Sender<Vec<RoomName>>,
    state: Shared,
}

impl Link {
    /// Queues `data` for `room`'s subject; never waits (a full queue drops and counts).
    pub(crate) fn publish(&self, room: &RoomName, data: Bytes, id: Option<String>) {
        let p = Publish {
            subject: subject::subject(room),
            data,
            id,
        };
        if self.publish.try_send(p).is_err() {
            update(&self.state, |s| s.publish_dropped += 1);
        }
    }

    /// The rooms to carry from now on.
    pub(crate) fn set_rooms(&self, rooms: Vec<RoomName>) {
        self.rooms.send_replace(rooms);
    }

    pub(crate) fn state(&self) -> LinkState {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Starts the link for `settings`; `owner` (the daemon's relay id) is the value of the
/// leases it holds. Events go to `events`; everything stops when `token` is cancelled.
pub(crate) fn spawn(
    settings: SitesSettings,
    owner: String,
    events: mpsc::Sender<SiteEvent>,
    token: CancellationToken,
    tracker: &TaskTracker,
) -> Link {
    let (publish, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
    let (rooms, rooms_rx) = watch::channel(Vec::new());
    let state = Shared::default();
    let link = Link {
        publish,
        rooms,
        state: Arc::clone(&state),
    };
    let task = LinkTask {
        settings,
        owner,
        events,
        state,
        token,
        tracker: tracker.clone(),
        connections: watch::channel(0).0,
        epochs: std::sync::atomic::AtomicU64::new(0),
    };
    tracker.spawn(task.run(publish_rx, rooms_rx));
    link
}

/// Jittered exponential back-off: about 100 ms doubling to 5 s, each ±25 %.
pub(super) fn backoff(attempt: usize) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5000);
    let mut r = [0u8; 2];
    let jitter = if getrandom::fill(&mut r).is_ok() {
        u64::from(u16::from_le_bytes(r)) % (base / 2 + 1)
    } else {
        0
    };
    Duration::from_millis(base - base / 4 + jitter)
}

struct LinkTask {
    settings: SitesSettings,
    owner: String,
    events: mpsc::Sender<SiteEvent>,
    state: Shared,
    token: CancellationToken,
    tracker: TaskTracker,
    connections: Connections,
    /// The last room task's epoch.
    epochs: std::sync::atomic::AtomicU64,
}

/// What the rooms' tasks share: the client, and JetStream if the server has it.
#[derive(Clone)]
pub(super) struct Nats {
    pub(super) client: async_nats::Client,
    pub(super) js: Option<(stream::Stream, kv::Store)>,
}

impl LinkTask {
    async fn options(&self) -> Result<async_nats::ConnectOptions, String> {
        let state = Arc::clone(&self.state);
        let connections = self.connections.clone();
        let mut o = async_nats::ConnectOptions::new()
            .name(format!("mcchatd {}", self.settings.site))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .ping_interval(Duration::from_secs(5))
            // A core subscription's queue, bounded in messages (each at most a datagram).
            .subscription_capacity(4096)
            .connection_timeout(Duration::from_secs(3))
            .reconnect_delay_callback(backoff)
            .event_callback(move |event| {
                let state = Arc::clone(&state);
                let connections = connections.clone();
                async move { on_event(&state, &connections, &event) }
            });
        o = match &self.settings.credentials {
            Credentials::None => o,
            Credentials::File(path) => o.credentials_file(path).await.map_err(|e| {
                format!(
                    "cannot read the NATS credentials file {}: {e}",
                    path.display()
                )
            })?,
            Credentials::Token(t) => o.token(t.clone()),
            Credentials::User { user, password } => {
                o.user_and_password(user.clone(), password.clone())
            }
        };
        let tls = &self.settings.tls;
        if tls.required {
            o = o.require_tls(true);
        }
        if let Some(ca) = &tls.ca {
            o = o.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            o = o.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(o)
    }

    async fn run(
        self,
        mut publish: mpsc::Receiver<Publish>,
        mut rooms: watch::Receiver<Vec<RoomName>>,
    ) {
        let client = match self.options().await {
            Ok(o) => o.connect(self.settings.nats.clone()).await,
            Err(e) => {
                tracing::error!(error = %e, "site link off");
                update(&self.state, |s| s.last_error = Some(e));
                return;
            }
        };
        let client = match client {
            Ok(c) => c,
            Err(error) => {
                tracing::error!(%error, "site link off: cannot start the NATS client");
                update(&self.state, |s| s.last_error = Some(error.to_string()));
                return;
            }
        };
        let mut nats = tokio::select! {
            () = self.token.cancelled() => return,
            n = self.setup(&client) => n,
        };
        let mut recheck = tokio::time::interval(JETSTREAM_RECHECK);
        recheck.reset();
        let mut publisher = self.publisher(&nats);
        let mut tasks: HashMap<RoomName, CancellationToken> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        rooms.mark_changed();
        loop {
            tokio::select! {
                biased;
                () = self.token.cancelled() => break,
                changed = rooms.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let want = rooms.borrow_and_update().clone();
                    self.carry(&nats, &mut tasks, &want);
                }
                () = publisher.confirm_oldest() => {}
                p = publish.recv(), if publisher.ready() => {
                    let Some(p) = p else { break };
                    // What else is queued goes out in the same wake-up; a client that
                    // cannot take it (NATS down, its buffer full) never holds up a stop.
                    let batch = async {
                        publisher.send(p).await;
                        for _ in 0..256 {
                            let Ok(p) = publish.try_recv() else { break };
                            publisher.send(p).await;
                        }
                    };
                    let stopped = tokio::select! {
                        () = self.token.cancelled() => true,
                        () = batch => false,
                    };
                    if stopped {
                        break;
                    }
                }
                _ = tick.tick() => self.refresh(&nats.client),
                _ = recheck.tick(), if nats.js.is_none() => {
                    // A leaf cut off from its hub at start has JetStream again once the hub
                    // is back: the rooms' tasks start again on it, with leases.
                    let found = tokio::select! {
                        () = self.token.cancelled() => break,
                        r = self.try_jetstream(&nats.client) => r,
                    };
                    if let Ok(js) = found {
                        nats = self.with_jetstream(&nats.client, js);
                        for (_, stop) in tasks.drain() {
                            stop.cancel();
                        }
                        publisher = self.publisher(&nats);
                        let want = rooms.borrow().clone();
                        self.carry(&nats, &mut tasks, &want);
                    }
                }
            }
        }
        for (_, stop) in tasks.drain() {
            stop.cancel();
        }
        // What is still queued goes out if it can within the bound; not waited for further.
        let _ = tokio::time::timeout(RELEASE_WITHIN, async {
            while let Ok(p) = publish.try_recv() {
                publisher.send(p).await;
            }
            let _ = nats.client.flush().await;
        })
        .await;
    }

    fn publisher(&self, nats: &Nats) -> Publisher {
        let js = nats
            .js
            .as_ref()
            .map(|_| context(&nats.client, self.settings.domain.as_deref()));
        Publisher::new(&nats.client, js, Arc::clone(&self.state))
    }

    fn refresh(&self, client: &async_nats::Client) {
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        let info = client.server_info();
        update(&self.state, |s| {
            s.connected = connected;
            if !info.host.is_empty() {
                s.server = Some(format!("{}:{}", info.host, info.port));
            }
        });
    }

    /// JetStream's stream and lease bucket, made if missing; tried until the server answers.
    /// A server without JetStream gives a core-only link (checked again every
    /// [`JETSTREAM_RECHECK`] by the link's loop).
    async fn setup(&self, client: &async_nats::Client) -> Nats {
        let mut attempt = 0;
        // "No JetStream" answers in a row: a cluster electing its leaders says so for a
        // moment too, and both daemons of a LAN going core-only would both inject.
        let mut unavailable_answers = 0;
        loop {
            match self.try_jetstream(client).await {
                Ok(js) => return self.with_jetstream(client, js),
                Err((unavailable, error)) => {
                    let connected =
                        client.connection_state() == async_nats::connection::State::Connected;
                    unavailable_answers = if unavailable && connected {
                        unavailable_answers + 1
                    } else {
                        0
                    };
                    if unavailable_answers >= 3 {
                        tracing::warn!(%error, "site link: the NATS server has no JetStream; core NATS only until it has: this daemon injects every bridged room (run one per LAN), and losses between sites are reported, not fetched");
                        update(&self.state, |st| st.last_error = Some(error));
                        return Nats {
                            client: client.clone(),
                            js: None,
                        };
                    }
                    if attempt == 0 {
                        tracing::warn!(%error, "site link: NATS not ready; retrying");
                    }
                    update(&self.state, |st| st.last_error = Some(error));
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }

    fn with_jetstream(&self, client: &async_nats::Client, js: (stream::Stream, kv::Store)) -> Nats {
        tracing::info!(stream = STREAM, "site link: JetStream ready");
        update(&self.state, |st| st.jetstream = true);
        Nats {
            client: client.clone(),
            js: Some(js),
        }
    }

    /// One try at the stream and the bucket; the error says whether JetStream is missing.
    async fn try_jetstream(
        &self,
        client: &async_nats::Client,
    ) -> Result<(stream::Stream, kv::Store), (bool, String)> {
        let js = context(client, self.settings.domain.as_deref());
        let s = &self.settings;
        let stream = js
            .get_or_create_stream(stream::Config {
                name: STREAM.to_owned(),
                subjects: vec![subject::ALL.to_owned()],
                storage: stream::StorageType::File,
                max_age: s.max_age,
                duplicate_window: s.duplicate_window,
                num_replicas: s.replicas,
                discard: stream::DiscardPolicy::Old,
                // The stream refuses what no peer would take (a datagram is at most 1200).
                max_message_size: 4096,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                (
                    matches!(
                        e.kind(),
                        jetstream::context::CreateStreamErrorKind::JetStreamUnavailable
                    ),
                    e.to_string(),
                )
            })?;
        // The bucket's stream made by hand, as the key-value convention (ADR-8) lays it
        // out: async-nats 0.51's create_key_value cannot read nats-server 2.9's answer
        // (Debian's), while opening a bucket works on every version.
        js.get_or_create_stream(stream::Config {
            name: format!("KV_{LEASES}"),
            subjects: vec![format!("$KV.{LEASES}.>")],
            max_messages_per_subject: 1,
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            max_age: s.lease,
            duplicate_window: s.lease,
            storage: stream::StorageType::File,
            num_replicas: s.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| (false, e.to_string()))?;
        let leases = js
            .get_key_value(LEASES)
            .await
            .map_err(|e| (false, e.to_string()))?;
        Ok((stream, leases))
    }

    /// Starts the rooms' tasks that are wanted and stops the others.
    fn carry(
        &self,
        nats: &Nats,
        tasks: &mut HashMap<RoomName, CancellationToken>,
        want: &[RoomName],
    ) {
        tasks.retain(|room, stop| {
            let keep = want.contains(room);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for room in want {
            if tasks.contains_key(room) {
                continue;
            }
            let stop = self.token.child_token();
            tasks.insert(room.clone(), stop.clone());
            let epoch = 1 + self
                .epochs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let r = RoomTask {
                room: room.clone(),
                epoch,
                subject: subject::subject(room),
                lease_key: format!("{}.{}", self.settings.site, subject::token(room.as_str())),
                lease: self.settings.lease,
                owner: self.owner.clone(),
                events: self.events.clone(),
                state: Arc::clone(&self.state),
                connections: self.connections.subscribe(),
                stop,
            };
            let span = tracing::info_span!("site", room = %room);
            self.tracker.spawn(r.run(nats.clone()).instrument(span));
        }
    }
}

/// The JetStream API, of `domain` if set (a hub's JetStream seen from its leaf nodes).
fn context(client: &async_nats::Client, domain: Option<&str>) -> jetstream::Context {
    match domain {
        Some(d) => jetstream::with_domain(client.clone(), d),
        None => jetstream::new(client.clone()),
    }
}

fn on_event(state: &Shared, connections: &Connections, event: &async_nats::Event) {
    match event {
        async_nats::Event::Connected => {
            connections.send_modify(|n| *n += 1);
            tracing::info!("site link: connected to NATS");
            update(state, |s| s.connected = true);
        }
        async_nats::Event::Disconnected => {
            tracing::warn!("site link: disconnected from NATS; reconnecting");
            update(state, |s| {
                s.connected = false;
                s.disconnects += 1;
            });
        }
        other => {
            tracing::info!(event = %other, "site link");
            let text = other.to_string();
            update(state, |s| s.last_error = Some(text));
        }
    }
}
