//! The driver: the one loop that connects the hub to its ports. It reads the time, takes what
//! the relay sockets, the joined groups, the status listeners, signals and the hub's deadline
//! bring, hands it to the hub, and carries out what the hub returns: sends, joins, leaves and
//! history records. It decides nothing itself.
//!
//! The seam for tests: [`bind`] opens every socket of a [`Settings`] (port 0 works), and
//! [`serve`] runs the daemon on them until its shutdown token is cancelled, with time from
//! tokio (so tests can pause it) and the wall clock from a [`Wall`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Allow;
use anyhow::{Context as _, Result};
use ipnet::IpNet;
use mcchat_core::peer::Now;
use mcchat_core::room::RoomName;
use mcchat_core::socket::{self, MulticastConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::history::History;
use crate::hub::{Hub, Output, Port, Seed};
use crate::notify;
use crate::port::group::{self, GroupDatagram, OwnForwards};
use crate::port::udp::{RecvBatch, RelaySocket};
use crate::settings::{self, Settings};
use crate::status::{self, Services, StatusRequest};
use mcchat_core::control::HistoryStatus;

mod bind;
mod reload;
mod sends;
mod site;
#[cfg(test)]
mod tests;
mod web;
#[cfg(test)]
mod web_tests;

pub use crate::settings::check_config;
use bind::multicast_config;
pub(crate) use bind::{Bound, bind};

/// Group datagrams handled per wake-up before the loop looks at its other inputs again.
const GROUP_BATCH: usize = 64;
/// How long shutdown may take in all: telling subscribers, the tasks, and history.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_millis(900);
/// How often the host's subnets are read again (for `allow = ["connected"]`).
const NETS_EVERY: Duration = Duration::from_secs(10);

/// The wall clock, for cookies and history timestamps: the system's, or (in tests) one that
/// starts at a given time and runs with tokio's (pausable) clock.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wall {
    /// The system's clock.
    System,
    /// `unix_ms` at the moment the daemon starts, then advancing with tokio's time.
    #[cfg_attr(not(test), allow(dead_code))]
    From(u64),
}

/// What drives a running daemon from outside: its shutdown, reloads, and how a reload
/// reads the configuration again.
pub(crate) struct Control {
    /// Cancelled: the daemon stops (within [`SHUTDOWN_GRACE`] and a little).
    pub(crate) shutdown: CancellationToken,
    /// Each message: read the configuration again (SIGHUP).
    pub(crate) reload: mpsc::Receiver<()>,
    /// Reads the configuration (the rooms file and the flags), off the relay loop.
    pub(crate) loader: reload::Loader,
    pub(crate) wall: Wall,
    /// Where the web connections run ([`crate::web::runtime`]); `None`: on the driver's own
    /// runtime (tests that pause its time).
    pub(crate) web: Option<tokio::runtime::Handle>,
}

/// The allow list and the connected subnets, read by the status listeners.
type SharedNets = Arc<std::sync::RwLock<(Vec<Allow>, Vec<IpNet>)>>;

/// Whether the allow list (as the loop last set it) admits a peer: for the status and web
/// listeners, which check before a request reaches the hub.
fn allow_check(nets: &SharedNets) -> impl Fn(SocketAddr) -> bool + Send + Sync + 'static {
    let nets = Arc::clone(nets);
    move |peer: SocketAddr| {
        let nets = nets
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        crate::hub::admission::allows(&nets.0, &nets.1, peer.ip())
    }
}

fn random_seed() -> Result<Seed> {
    let mut cookie_key = [0u8; 64];
    let mut id = [0u8; 4];
    let mut more = [0u8; 16];
    getrandom::fill(&mut cookie_key)
        .and_then(|()| getrandom::fill(&mut id))
        .and_then(|()| getrandom::fill(&mut more))
        .map_err(|e| anyhow::anyhow!("failed to get random bytes for the cookie key: {e}"))?;
    let [a, b] = [&more[..8], &more[8..]].map(|h| {
        let mut w = [0u8; 8];
        w.copy_from_slice(h);
        u64::from_le_bytes(w)
    });
    Ok(Seed {
        cookie_key,
        relay_id: u32::from_be_bytes(id),
        web: a,
        // 53 bits, so that a browser's JSON number holds it exactly.
        epoch: b >> 11,
    })
}

/// Opens history where the settings say. A location the operator chose must work; the
/// default one failing (no home directory, read-only) only turns history off, with a warning.
fn open_history(settings: &Settings, policy: &crate::history::Policy) -> Result<Option<History>> {
    let Some((dir, chosen)) = settings::state_dir(&settings.daemon) else {
        tracing::info!("history is off");
        return Ok(None);
    };
    match History::open(&dir, policy.clone()) {
        Ok(h) => {
            tracing::info!(path = %h.path().display(), "history on");
            Ok(Some(h))
        }
        Err(e) if chosen => Err(anyhow::Error::new(e).context(format!(
            "cannot keep history in {}; fix the directory, or set state_dir = \"\" (--no-history) to run without history",
            dir.display()
        ))),
        Err(error) => {
            tracing::warn!(%error, "history is off: the default state directory is not usable; set state_dir");
            Ok(None)
        }
    }
}

/// The loop's state: the hub and the ports.
struct Driver {
    hub: Hub,
    relay4: Option<RelaySocket>,
    relay6: Option<RelaySocket>,
    /// The TTL each relay socket sends multicast with now.
    ttl4: u32,
    ttl6: u32,
    mcast: MulticastConfig,
    joined: HashMap<RoomName, (u64, CancellationToken)>,
    /// What the group ports share (own forwards they dropped count toward the hub's).
    feed: group::Feed,
    history: Option<History>,
    records: crate::history::Batch,
    /// The link to other sites, when bridging.
    site: Option<crate::sites::link::Link>,
    /// Web connections' queues, by connection.
    web: HashMap<crate::hub::web::ConnId, mpsc::Sender<crate::web::ToConn>>,
    /// Where preloaded history for a room's view comes back.
    web_events: mpsc::Sender<crate::web::WebEvent>,
    /// Scratch for one fan-out's destinations.
    dests: Vec<(SocketAddr, Option<IpAddr>)>,
    /// Group datagrams of this flush not yet sent (sends.rs).
    to_groups: sends::GroupSends,
    shared_nets: SharedNets,
    token: CancellationToken,
    tracker: TaskTracker,
    wall: Wall,
    start: tokio::time::Instant,
    /// "The writer is behind": one line per 10 s, with the running total, since a burst that
    /// outruns the disk would otherwise log ten lines a second for as long as it lasts.
    history_log: mcchat_core::ratelimit::LogLimiter,
    send_log: mcchat_core::ratelimit::LogLimiter,
}

/// Runs the daemon on `bound` until `control.shutdown` is cancelled.
pub(crate) async fn serve(settings: Settings, bound: Bound, mut control: Control) -> Result<()> {
    let mcast = multicast_config(&settings)?;
    let nets = socket::local_networks().context("failed to list this host's addresses")?;
    let policy = crate::hub::history_policy(&settings);
    let history = open_history(&settings, &policy)?;
    let (group_tx, mut group_rx) = mpsc::channel(1024);
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    let shared_nets: SharedNets = Arc::new(std::sync::RwLock::new((
        settings.daemon.allow.clone(),
        nets.subnets.clone(),
    )));
    let (mut relay4, mut relay6) = (None, None);
    for sock in bound.relay {
        if sock.local_addr().is_ipv4() {
            relay4 = Some(sock);
        } else {
            relay6 = Some(sock);
        }
    }
    let start = tokio::time::Instant::now();
    let ttl = settings.daemon.ttl;
    let (web_tx, mut web_rx) = mpsc::channel::<crate::web::WebEvent>(4096);
    let web_settings = settings.web.clone();
    let web_rooms: Vec<String> = settings
        .registry
        .rooms()
        .map(|r| r.name().to_string())
        .collect();
    let hub = Hub::new(
        settings,
        history.as_ref().map(History::journal),
        nets.subnets,
        random_seed()?,
        now(control.wall, start),
    );
    let own = Arc::new(OwnForwards::new(hub.relay_id()));
    let mut driver = Driver {
        hub,
        relay4,
        relay6,
        ttl4: ttl,
        ttl6: ttl,
        mcast,
        joined: HashMap::new(),
        feed: group::Feed {
            tx: group_tx,
            own,
            tracker: tracker.clone(),
        },
        history,
        records: crate::history::Batch::new(),
        site: None,
        web: HashMap::new(),
        web_events: web_tx.clone(),
        dests: Vec::new(),
        to_groups: sends::GroupSends::default(),
        shared_nets,
        token: token.clone(),
        tracker: tracker.clone(),
        wall: control.wall,
        start,
        history_log: mcchat_core::ratelimit::LogLimiter::new(1, Duration::from_secs(10)),
        send_log: mcchat_core::ratelimit::LogLimiter::default(),
    };

    let (status_tx, mut status_rx) = mpsc::channel::<StatusRequest>(16);
    let services = Services {
        status: status_tx,
        history: driver.history.as_ref().map(History::reader),
    };
    let slots = status::Slots::new();
    for listener in bound.tcp {
        let is_allowed = allow_check(&driver.shared_nets);
        tracker.spawn(status::serve_tcp(
            listener,
            services.clone(),
            is_allowed,
            slots.clone(),
            token.child_token(),
            tracker.clone(),
        ));
    }
    let unix_path = bound.unix.as_ref().map(|(_, p)| p.clone());
    if let Some((listener, _)) = bound.unix {
        tracker.spawn(status::serve_unix(
            listener,
            services.clone(),
            slots.clone(),
            token.child_token(),
            tracker.clone(),
        ));
    }
    if !bound.web.is_empty() {
        let is_allowed = allow_check(&driver.shared_nets);
        let state = Arc::new(crate::web::WebState::new(
            web_tx,
            services.history.clone(),
            web_settings,
            web_rooms,
            Box::new(is_allowed),
            token.child_token(),
        ));
        for listener in bound.web {
            let at = listener
                .local_addr()
                .map_or_else(|_| "?".to_owned(), |a| a.to_string());
            let listener = listener.into_std().with_context(|| {
                format!("failed to hand the web listener on TCP {at} to the web threads")
            })?;
            let web = crate::web::serve(listener, Arc::clone(&state), token.child_token());
            match &control.web {
                Some(rt) => tracker.spawn_on(web, rt),
                None => tracker.spawn(web),
            };
        }
    } else {
        drop(web_tx);
    }
    drop(services);
    let mut site_rx = driver.start_site_link();
    driver.flush().await;
    let rooms = driver.hub.settings().registry.rooms().count();
    tracing::info!(rooms, origin = %driver.hub.settings().origin, "mcchatd ready");
    notify::ready(&format!("relaying {rooms} configured rooms"));

    let mut reloads = reload::Reloads::new(Arc::clone(&control.loader));
    let mut batch4 = RecvBatch::new();
    let mut batch6 = RecvBatch::new();
    let mut nets_tick = tokio::time::interval(NETS_EVERY);
    nets_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    nets_tick.reset();
    let watchdog = notify::watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    // One timer, moved only when the hub's deadline moves (not one per wake-up).
    let timer =
        tokio::time::sleep_until(tokio::time::Instant::from_std(driver.hub.next_deadline()));
    tokio::pin!(timer);
    loop {
        let deadline = tokio::time::Instant::from_std(driver.hub.next_deadline());
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        tokio::select! {
            () = control.shutdown.cancelled() => break,
            Some(()) = control.reload.recv() => reloads.request(&token, &tracker),
            Some(result) = reloads.results.recv() => {
                driver.reload(result);
                reloads.done(&token, &tracker);
            }
            r = recv_on(driver.relay4.as_ref(), &mut batch4) => driver.on_relay(r, &batch4),
            r = recv_on(driver.relay6.as_ref(), &mut batch6) => driver.on_relay(r, &batch6),
            Some(d) = group_rx.recv() => {
                driver.on_group(d);
                for _ in 1..GROUP_BATCH {
                    let Ok(d) = group_rx.try_recv() else { break };
                    driver.on_group(d);
                }
            }
            Some(ev) = web_rx.recv() => {
                driver.on_web(ev);
                for _ in 1..GROUP_BATCH {
                    let Ok(ev) = web_rx.try_recv() else { break };
                    driver.on_web(ev);
                }
            }
            Some(ev) = recv_site(&mut site_rx) => {
                driver.on_site(ev);
                for _ in 1..GROUP_BATCH {
                    let Some(Ok(ev)) = site_rx.as_mut().map(mpsc::Receiver::try_recv) else { break };
                    driver.on_site(ev);
                }
            }
            Some(req) = status_rx.recv() => {
                let _ = req.reply.send(driver.status_json(req.local));
            }
            () = &mut timer => {
                let now = driver.now();
                driver.hub.poll(now);
            }
            _ = nets_tick.tick() => driver.refresh_networks(),
            _ = watchdog_tick.tick(), if watchdog.is_some() => notify::watchdog(),
        }
        // A wake-up's sends can be many (a batch times 10,000 subscribers): a stop does not
        // wait for them; what is left goes out within the shutdown's bound, or not at all.
        tokio::select! {
            () = driver.flush() => {}
            () = control.shutdown.cancelled() => break,
        }
    }

    notify::stopping();
    tracing::info!(subscribers = driver.hub.subscribers(), "shutting down");
    driver.shutdown().await;
    status::unlink(unix_path);
    tracing::info!("stopped");
    Ok(())
}

/// Runs the daemon for `cli` until SIGTERM/SIGINT or `token` is cancelled.
pub async fn run(cli: crate::cli::Cli, token: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let settings = settings::load(&cli)?;
    let mut hup = signal(SignalKind::hangup()).context("failed to install a SIGHUP handler")?;
    let mut term =
        signal(SignalKind::terminate()).context("failed to install a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("failed to install a SIGINT handler")?;
    let bound = bind(&settings)?;
    let (reload_tx, reload) = mpsc::channel(4);
    let shutdown = token.child_token();
    let signals = {
        let shutdown = shutdown.clone();
        async move {
            loop {
                let name = tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = hup.recv() => {
                        let _ = reload_tx.try_send(());
                        continue;
                    }
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                tracing::info!(signal = name, "stopping");
                shutdown.cancel();
                return;
            }
        }
    };
    let signals = tokio::spawn(signals);
    let web = if bound.web.is_empty() {
        None
    } else {
        Some(crate::web::runtime::WebRuntime::start().context("failed to start the web threads")?)
    };
    let control = Control {
        shutdown: shutdown.clone(),
        reload,
        loader: Arc::new(move || settings::load(&cli)),
        wall: Wall::System,
        web: web
            .as_ref()
            .and_then(crate::web::runtime::WebRuntime::handle),
    };
    let result = serve(settings, bound, control).await;
    drop(web);
    shutdown.cancel();
    let _ = signals.await;
    result
}

async fn recv_site(
    rx: &mut Option<mpsc::Receiver<crate::sites::link::SiteEvent>>,
) -> Option<crate::sites::link::SiteEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_on(sock: Option<&RelaySocket>, batch: &mut RecvBatch) -> std::io::Result<usize> {
    match sock {
        Some(s) => s.recv(batch).await,
        None => std::future::pending().await,
    }
}

fn now(wall: Wall, start: tokio::time::Instant) -> Now {
    let mono = tokio::time::Instant::now();
    let unix_ms = match wall {
        Wall::System => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        Wall::From(at) => at.saturating_add(
            u64::try_from(mono.saturating_duration_since(start).as_millis()).unwrap_or(u64::MAX),
        ),
    };
    Now {
        mono: mono.into_std(),
        unix_ms,
    }
}

impl Driver {
    fn now(&self) -> Now {
        now(self.wall, self.start)
    }

    /// One batch from a relay socket into the hub. Errors are ICMP reports of earlier sends
    /// (the socket layer skips them) or transient: the next wake-up tries again.
    fn on_relay(&mut self, r: std::io::Result<usize>, batch: &RecvBatch) {
        match r {
            Ok(_) => {
                let now = self.now();
                for d in batch.iter() {
                    self.hub.on_input(
                        Port::Relay {
                            local: d.local,
                            unicast: d.unicast,
                        },
                        d.from,
                        d.data,
                        now,
                    );
                }
            }
            Err(error) => {
                if self.send_log.check(self.now().mono).is_some() {
                    tracing::debug!(%error, "relay socket receive error");
                }
            }
        }
    }

    fn on_group(&mut self, d: GroupDatagram) {
        let now = self.now();
        let port = Port::Group {
            room: d.room,
            generation: d.generation,
        };
        self.hub.on_input(port, d.from, &d.data, now);
    }

    /// Carries out everything the hub has queued: its records come first, and are handed to
    /// the history writer before anything is sent.
    async fn flush(&mut self) {
        while let Some(out) = self.hub.poll_output() {
            if !matches!(out, Output::Record { .. }) {
                self.hand_over_records();
            }
            // Group sends gather until something else is to be done (sends.rs).
            if !matches!(out, Output::ToGroup { .. } | Output::Record { .. }) {
                self.send_to_groups().await;
            }
            match out {
                Output::ToGroup { group, ttl, data } => {
                    self.queue_to_group(group, ttl, data).await;
                    continue;
                }
                Output::ToUdp { to, data } => self.send_udp(&[to], None, &data).await,
                Output::FanOut { to, except, data } => self.send_udp(&to, except, &data).await,
                Output::Join {
                    room,
                    group,
                    generation,
                } => {
                    let stop = self.token.child_token();
                    let result = group::spawn(
                        room.clone(),
                        group,
                        generation,
                        &self.mcast,
                        &self.feed,
                        stop.clone(),
                    );
                    match result {
                        Ok(()) => {
                            tracing::info!(%room, %group, "joined group");
                            if let Some((_, old)) =
                                self.joined.insert(room.clone(), (generation, stop))
                            {
                                old.cancel();
                            }
                            self.hub.join_done(&room, generation, Ok(()));
                        }
                        Err(e) => self.hub.join_done(&room, generation, Err(format!("{e:#}"))),
                    }
                }
                Output::Leave { room, generation } => {
                    if self
                        .joined
                        .get(&room)
                        .is_some_and(|(g, _)| *g == generation)
                        && let Some((_, stop)) = self.joined.remove(&room)
                    {
                        stop.cancel();
                    }
                }
                Output::Record {
                    data,
                    recv_ms,
                    offset,
                } => self.records.push_at(&data, recv_ms, Some(offset)),
                Output::ToWeb { to, frame } => self.send_web(&to, &frame),
                Output::WebJoined { conn, joined } => self.web_joined(conn, joined),
                Output::WebRefused {
                    conn,
                    refusal,
                    close,
                } => self.web_refused(conn, refusal, close),
                Output::WebPreload { room } => self.web_preload(room),
                Output::ToSite { room, data, id } => self.to_site(&room, data, id),
                Output::SiteRooms(rooms) => self.site_rooms(rooms),
            }
        }
        self.hand_over_records();
        self.send_to_groups().await;
    }

    /// Hands the records queued so far to the history writer.
    pub(super) fn hand_over_records(&mut self) {
        if !self.records.is_empty()
            && let Some(h) = &mut self.history
        {
            // One hand-over per wake-up as a rule (records come first in a flush); never
            // blocks (a full queue drops and counts).
            let queued = self.records.len();
            let stored = h.store_batch(&mut self.records);
            if stored < queued
                && let Some(suppressed) = self
                    .history_log
                    .check(tokio::time::Instant::now().into_std())
            {
                let dropped = h.stats().dropped;
                tracing::warn!(
                    dropped,
                    suppressed,
                    "history writer is behind; messages not stored"
                );
            }
        }
        self.records.clear();
    }

    /// One datagram to unicast members, each from the local address it subscribed on.
    /// SIGHUP: re-read the configuration; keep running on the old one if it is bad.
    /// Applies a reload's result (reload.rs read it).
    fn reload(&mut self, result: Result<Settings>) {
        match result {
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "reload failed; keeping the running configuration");
            }
            Ok(new) => {
                let changed = self.hub.reconfigure(new, self.now().mono);
                if !changed.need_restart.is_empty() {
                    tracing::warn!(keys = ?changed.need_restart, "these changes take effect on restart");
                }
                if let Some(h) = &self.history {
                    h.set_policy(self.hub.policy().clone());
                }
                self.share_nets();
                let s = self.hub.settings();
                tracing::info!(rooms = s.registry.rooms().count(), origin = %s.origin, "reloaded");
            }
        }
        notify::ready("reloaded");
    }

    /// Addresses change (DHCP, Wi-Fi, VPN): the allow list's `connected` follows within 10 s.
    fn refresh_networks(&mut self) {
        if let Ok(nets) = socket::local_networks() {
            self.hub.set_connected(nets.subnets);
            self.share_nets();
        }
    }

    fn share_nets(&self) {
        *self
            .shared_nets
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (
            self.hub.settings().daemon.allow.clone(),
            self.hub.connected().to_vec(),
        );
    }

    /// The status document; subscribers' addresses only for the local socket (`local`).
    fn status_json(&self, local: bool) -> String {
        let mut status = self.hub.snapshot(self.now().mono);
        if !local {
            for sub in status
                .rooms
                .iter_mut()
                .flat_map(|r| r.subscribers.iter_mut())
            {
                sub.addr = None;
            }
        }
        status.counters.own_forwards_ignored += self
            .feed
            .own
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        // As bound: the port the system chose for port 0, not the `:0` asked for.
        status.listen = [&self.relay4, &self.relay6]
            .into_iter()
            .flatten()
            .map(|s| s.local_addr().to_string())
            .collect();
        status.site = self.site_status();
        status.history = self.history.as_ref().map(|h| HistoryStatus {
            path: h.path().display().to_string(),
            dropped: h.stats().dropped,
        });
        serde_json::to_string(&status).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Tells every subscriber the daemon is going, leaves every group, stops the tasks and
    /// closes history, all within [`SHUTDOWN_GRACE`].
    async fn shutdown(&mut self) {
        let started = tokio::time::Instant::now();
        let now = self.now();
        self.hub.shutdown(now);
        let budget = SHUTDOWN_GRACE / 3;
        if tokio::time::timeout(budget, self.flush()).await.is_err() {
            tracing::warn!("could not tell every subscriber in time");
        }
        self.token.cancel();
        self.joined.clear();
        self.tracker.close();
        if tokio::time::timeout(budget, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop in time");
        }
        if let Some(mut h) = self.history.take() {
            let left = SHUTDOWN_GRACE.saturating_sub(started.elapsed());
            // Off the runtime: the writer's last commit may touch the disk.
            let closed = tokio::task::spawn_blocking(move || h.close(left)).await;
            if !matches!(closed, Ok(true)) {
                tracing::warn!(
                    "history did not finish its last commit in time; what was committed is safe"
                );
            }
        }
    }
}
