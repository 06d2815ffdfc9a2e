//! The relay loop: one task that owns all state, fed by the relay sockets, by one receive task
//! per joined group, by status requests, a one-second tick and signals.
//!
//! Unicast to multicast: a message datagram on the relay port goes, unchanged, once to its
//! room's group and to the room's other subscribers. Multicast to unicast: a datagram heard on
//! a joined group goes to the room's subscribers. The daemon's own forwards, heard back from
//! the group through multicast loopback, are recognised by their source (one of this host's
//! addresses and the relay port) and ignored, so nothing loops and nobody sees a message twice.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use ipnet::IpNet;
use mcchat_core::daemon::Allow;
use mcchat_core::ratelimit::LogLimiter;
use mcchat_core::repair::{Nack, REPAIR_TAG};
use mcchat_core::room::{Room, RoomName, RoomSource};
use mcchat_core::socket::{self, Iface, MulticastConfig};
use mcchat_core::wire::{self, Frame, Header, Kind, MAX_DATAGRAM, Meta, now_ms};
use tokio::net::UdpSocket;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::{Outgoing, RepairCache};
use crate::cli::Cli;
use crate::cookie::CookieJar;
use crate::counters::{Counters, Drop};
use crate::history::{History, Policy, Retention};
use crate::limiter::Limiter;
use crate::notify;
use crate::settings::{self, Settings};
use crate::status::{
    self, HistoryStatus, RoomStatus, Services, Status, StatusRequest, SubscriberStatus,
};
use crate::subs::{Subscribed, Subscriptions};

/// The sender name in datagrams the daemon itself writes.
pub(crate) const DAEMON_NAME: &str = "mcchatd";

/// Datagrams handled per wake-up of a relay socket before the loop looks at its other
/// inputs again (fairness against batching).
const RECV_BATCH: usize = 64;

/// How long shutdown may take before the daemon exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(700);

/// A datagram heard on a joined group.
struct GroupDatagram {
    room: RoomName,
    generation: u64,
    from: SocketAddr,
    data: Vec<u8>,
}

/// A joined group: its receive task stops (and the membership is dropped) when `stop` is
/// cancelled.
struct Joined {
    group: SocketAddr,
    generation: u64,
    stop: CancellationToken,
}

/// The allow list and the connected subnets, read by the status listeners.
type SharedNets = Arc<std::sync::RwLock<(Vec<Allow>, Vec<IpNet>)>>;

/// What ended the loop.
enum Exit {
    Signal(&'static str),
    Cancelled,
}

struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

/// The relay and all its state.
struct Relay {
    cli: Cli,
    settings: Settings,
    relay4: Option<Arc<UdpSocket>>,
    relay6: Option<Arc<UdpSocket>>,
    relay_ports: HashSet<u16>,
    /// This host's addresses, shared with the group receive tasks, which drop the daemon's
    /// own forwards (heard back through multicast loopback) before they reach this loop.
    local_addrs: Arc<std::sync::RwLock<HashSet<IpAddr>>>,
    /// How many of them the group tasks dropped.
    own_forwards: Arc<std::sync::atomic::AtomicU64>,
    connected: Arc<Vec<IpNet>>,
    subs: Subscriptions,
    cookies: CookieJar,
    relay_limit: Limiter,
    /// Subscribe requests without a valid cookie, per source address.
    sub_limit: Limiter,
    /// Requests with a valid cookie (renewals, unsubscribes), per source address.
    renew_limit: Limiter,
    /// Bumped on every join, so datagrams a left group's task still had queued are told
    /// apart from the new membership's.
    generation: u64,
    /// The TTL each relay socket currently sends multicast with.
    ttl4: u32,
    ttl6: u32,
    /// When the host's addresses were last read.
    nets_read: Instant,
    /// The allow list and connected subnets, shared with the status listeners.
    shared_nets: SharedNets,
    /// Subscribers to tell that their room closed, from the last reconcile.
    pending_closed: Vec<(RoomName, Vec<SocketAddr>, String)>,
    joined: HashMap<RoomName, Joined>,
    /// Rooms whose last join failed (logged once until one works).
    join_failed: HashSet<RoomName>,
    /// Rooms relayed or subscribed to, so status can show ad-hoc rooms too.
    counters: Counters,
    /// Recent messages, to repair for senders that have gone and for subscribers.
    cache: RepairCache,
    /// Room history; `None` when off.
    history: Option<History>,
    /// What history keeps of each room.
    policy: Policy,
    history_log: LogLimiter,
    drop_log: LogLimiter,
    started: Instant,
    group_tx: mpsc::Sender<GroupDatagram>,
    group_rx: mpsc::Receiver<GroupDatagram>,
    token: CancellationToken,
    tracker: TaskTracker,
    out: String,
}

/// Whether a datagram is a retransmission.
fn is_repair(frame: &Frame<'_>) -> bool {
    frame.tags.get(REPAIR_TAG.0).is_some()
}

/// Sleeps until `due`, or forever if there is none.
async fn sleep_until_opt(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// History retention for every room, from the settings.
fn history_policy(settings: &Settings) -> Policy {
    let d = &settings.daemon;
    let default = Retention {
        count: d.history_count,
        age: d.history_age,
    };
    let rooms = settings
        .registry
        .rooms()
        .map(|r| {
            let keep = Retention {
                count: r.history_count.unwrap_or(default.count),
                age: r.history_age.unwrap_or(default.age),
            };
            (r.name.to_string(), keep)
        })
        .collect();
    Policy { rooms, default }
}

/// Opens history where the settings say. A location the operator chose must work; the
/// default one failing (no home directory, read-only) only turns history off, with a warning.
fn open_history(settings: &Settings, policy: &Policy) -> Result<Option<History>> {
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

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Whether `from` is one of the relay sockets: a relay port on one of this host's addresses.
fn is_own(
    relay_ports: &HashSet<u16>,
    local_addrs: &std::sync::RwLock<HashSet<IpAddr>>,
    from: SocketAddr,
) -> bool {
    let from = canonical(from);
    relay_ports.contains(&from.port())
        && local_addrs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&from.ip())
}

/// Whether `ip` may use the relay.
fn allowed(allow: &[Allow], connected: &[IpNet], ip: IpAddr) -> bool {
    allow.iter().any(|a| a.matches(ip, connected))
}

fn multicast_config(settings: &Settings) -> Result<MulticastConfig> {
    let iface = match &settings.daemon.iface {
        Some(spec) => Iface::resolve(spec)?,
        None => Iface::system_default(),
    };
    Ok(MulticastConfig {
        ttl: settings.daemon.ttl,
        loopback: true,
        iface,
    })
}

/// Runs the daemon until SIGTERM/SIGINT or `token` is cancelled.
pub async fn run(cli: Cli, token: CancellationToken) -> Result<()> {
    let settings = settings::load(&cli)?;
    let signals = Signals {
        hup: signal(SignalKind::hangup()).context("failed to install a SIGHUP handler")?,
        term: signal(SignalKind::terminate()).context("failed to install a SIGTERM handler")?,
        int: signal(SignalKind::interrupt()).context("failed to install a SIGINT handler")?,
    };
    let mcast = multicast_config(&settings)?;
    let mut relay4 = None;
    let mut relay6 = None;
    let mut relay_ports = HashSet::new();
    let mut tcp = Vec::new();
    for addr in &settings.daemon.listen {
        let sock = socket::open_relay(*addr, &mcast)?;
        let sock = UdpSocket::from_std(sock)
            .with_context(|| format!("failed to register the relay socket {addr}"))?;
        let bound = sock.local_addr().unwrap_or(*addr);
        relay_ports.insert(bound.port());
        let listener = socket::tcp_listener(bound)
            .and_then(tokio::net::TcpListener::from_std)
            .with_context(|| format!("failed to listen for status on TCP {bound}"))?;
        tracing::info!(%bound, "relaying on UDP, status on TCP");
        tcp.push(listener);
        let slot = if bound.is_ipv4() {
            &mut relay4
        } else {
            &mut relay6
        };
        if slot.is_some() {
            anyhow::bail!(
                "two listen addresses of one family ({bound}); give one IPv4 and one IPv6 address"
            );
        }
        *slot = Some(Arc::new(sock));
    }
    let nets = socket::local_networks().context("failed to list this host's addresses")?;
    let policy = history_policy(&settings);
    let history = open_history(&settings, &policy)?;
    let (group_tx, group_rx) = mpsc::channel(1024);
    let tracker = TaskTracker::new();
    let d = &settings.daemon;
    let mut relay = Relay {
        relay4,
        relay6,
        relay_ports,
        local_addrs: Arc::new(std::sync::RwLock::new(
            nets.addresses.iter().copied().collect(),
        )),
        own_forwards: Arc::default(),
        connected: Arc::new(nets.subnets.clone()),
        subs: Subscriptions::new(d.max_subscribers, d.max_rooms),
        cookies: CookieJar::random().context("failed to get random bytes for the cookie key")?,
        relay_limit: Limiter::new(d.relay_rate, d.relay_burst),
        sub_limit: Limiter::new(d.subscribe_rate, d.subscribe_burst),
        renew_limit: Limiter::new(d.subscribe_rate, d.subscribe_burst),
        generation: 0,
        ttl4: d.ttl,
        ttl6: d.ttl,
        nets_read: Instant::now(),
        shared_nets: Arc::new(std::sync::RwLock::new((
            d.allow.clone(),
            nets.subnets.clone(),
        ))),
        pending_closed: Vec::new(),
        joined: HashMap::new(),
        join_failed: HashSet::new(),
        counters: Counters::default(),
        cache: RepairCache::new(d.repair_cache_bytes, d.repair_window),
        history,
        policy,
        history_log: LogLimiter::default(),
        drop_log: LogLimiter::default(),
        started: Instant::now(),
        group_tx,
        group_rx,
        token: token.clone(),
        tracker: tracker.clone(),
        out: String::with_capacity(MAX_DATAGRAM),
        settings,
        cli,
    };
    let (status_tx, status_rx) = mpsc::channel::<StatusRequest>(16);
    let services = Services {
        status: status_tx,
        history: relay.history.as_ref().map(History::reader),
    };
    let slots = status::slots();
    for listener in tcp {
        let nets = Arc::clone(&relay.shared_nets);
        let is_allowed = move |peer: SocketAddr| {
            let nets = nets
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            allowed(&nets.0, &nets.1, canonical(peer).ip())
        };
        tracker.spawn(status::serve_tcp(
            listener,
            services.clone(),
            is_allowed,
            Arc::clone(&slots),
            token.child_token(),
            tracker.clone(),
        ));
    }
    let unix_path = relay.settings.daemon.status_socket.clone();
    let mut unix_bound = None;
    if let Some(path) = &unix_path {
        match status::bind_unix(path) {
            Ok(listener) => {
                tracing::info!(path = %path.display(), "status on Unix socket");
                unix_bound = Some(path.clone());
                tracker.spawn(status::serve_unix(
                    listener,
                    services.clone(),
                    Arc::clone(&slots),
                    token.child_token(),
                    tracker.clone(),
                ));
            }
            Err(error) => tracing::warn!(
                path = %path.display(),
                %error,
                "status socket not available; use `mcchat status --via HOST` or set status_socket"
            ),
        }
    }
    drop(services);
    relay.reconcile();
    let rooms = relay.settings.registry.rooms().count();
    tracing::info!(rooms, origin = %relay.settings.origin, "mcchatd ready");
    notify::ready(&format!("relaying {rooms} configured rooms"));

    let exit = relay.run_loop(signals, status_rx).await;
    notify::stopping();
    let why = match exit {
        Exit::Signal(s) => s,
        Exit::Cancelled => "cancelled",
    };
    tracing::info!(
        signal = why,
        subscribers = relay.subs.total(),
        "shutting down"
    );
    relay.shutdown().await;
    if let Some(h) = &mut relay.history {
        h.close(crate::history::CLOSE_DEADLINE);
    }
    status::unlink(unix_bound);
    tracing::info!("stopped");
    Ok(())
}

async fn recv_on(sock: Option<&UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

impl Relay {
    async fn run_loop(
        &mut self,
        mut signals: Signals,
        mut status_rx: mpsc::Receiver<StatusRequest>,
    ) -> Exit {
        let mut buf4 = vec![0u8; MAX_DATAGRAM + 1];
        let mut buf6 = vec![0u8; MAX_DATAGRAM + 1];
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let watchdog = notify::watchdog_interval();
        let mut watchdog_tick =
            tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
        let relay4 = self.relay4.clone();
        let relay6 = self.relay6.clone();
        loop {
            let cache_due = self.cache.next_deadline();
            tokio::select! {
                () = self.token.cancelled() => return Exit::Cancelled,
                _ = signals.term.recv() => return Exit::Signal("SIGTERM"),
                _ = signals.int.recv() => return Exit::Signal("SIGINT"),
                _ = signals.hup.recv() => self.reload().await,
                r = recv_on(relay4.as_deref(), &mut buf4) => {
                    self.on_relay_recv(r, relay4.as_ref(), &mut buf4).await;
                }
                r = recv_on(relay6.as_deref(), &mut buf6) => {
                    self.on_relay_recv(r, relay6.as_ref(), &mut buf6).await;
                }
                Some(d) = self.group_rx.recv() => {
                    self.on_group(d).await;
                    for _ in 1..RECV_BATCH {
                        let Ok(d) = self.group_rx.try_recv() else { break };
                        self.on_group(d).await;
                    }
                }
                Some(req) = status_rx.recv() => {
                    let _ = req.send(self.status_json());
                }
                () = sleep_until_opt(cache_due) => {
                    let out = self.cache.poll(Instant::now());
                    self.send_repairs(out).await;
                }
                _ = tick.tick() => self.expire().await,
                _ = watchdog_tick.tick(), if watchdog.is_some() => notify::watchdog(),
            }
        }
    }

    /// Handles one received datagram, then whatever else is already queued on the same
    /// socket (up to a bound), so a burst costs one wake-up rather than one per datagram.
    async fn on_relay_recv(
        &mut self,
        r: std::io::Result<(usize, SocketAddr)>,
        sock: Option<&Arc<UdpSocket>>,
        buf: &mut [u8],
    ) {
        let mut next = r;
        for handled in 1.. {
            match next {
                Ok((len, from)) => {
                    let len = len.min(buf.len());
                    self.on_unicast(&buf[..len], canonical(from)).await;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                // ICMP errors for earlier sends surface here; they are not the socket's end.
                Err(error) => {
                    if self.drop_log.check(Instant::now()).is_some() {
                        tracing::debug!(%error, "relay socket receive error");
                    }
                }
            }
            // Read the next one only if it will be handled: a datagram read is never dropped.
            let Some(sock) = sock.filter(|_| handled < RECV_BATCH) else {
                return;
            };
            next = sock.try_recv_from(buf);
        }
    }

    /// Whether `from` is one of this daemon's relay sockets.
    fn is_own(&self, from: SocketAddr) -> bool {
        is_own(&self.relay_ports, &self.local_addrs, from)
    }

    fn set_local_addrs(&mut self, addrs: Vec<IpAddr>) {
        *self
            .local_addrs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = addrs.into_iter().collect();
    }

    fn count_drop(&mut self, why: Drop, from: SocketAddr) {
        let count = self.counters.drop(why);
        if let Some(suppressed) = self.drop_log.check(Instant::now()) {
            tracing::debug!(%from, reason = why.name(), count, suppressed, "dropped");
        }
    }

    /// Resolves a room name under the current rules, or says why not.
    fn room(&self, name: &str) -> Option<Room> {
        let room = self.settings.registry.resolve(name).ok()?;
        (room.source == RoomSource::Configured || self.settings.daemon.adhoc_rooms).then_some(room)
    }

    fn socket_for(&self, addr: SocketAddr) -> Option<&Arc<UdpSocket>> {
        if addr.is_ipv4() {
            self.relay4.as_ref()
        } else {
            self.relay6.as_ref()
        }
    }

    async fn send(&mut self, data: &[u8], to: SocketAddr) -> bool {
        let Some(sock) = self.socket_for(to) else {
            self.count_drop(Drop::NoSocketForFamily, to);
            return false;
        };
        match sock.send_to(data, to).await {
            Ok(_) => true,
            Err(error) => {
                let count = self.counters.drop(Drop::SendFailed);
                if let Some(suppressed) = self.drop_log.check(Instant::now()) {
                    tracing::warn!(%to, %error, count, suppressed, "send failed");
                }
                false
            }
        }
    }

    /// A datagram on the relay port.
    async fn on_unicast(&mut self, data: &[u8], from: SocketAddr) {
        self.counters.received_unicast += 1;
        if from.port() == 0 || from.ip().is_unspecified() || from.ip().is_multicast() {
            return self.count_drop(Drop::BadSource, from);
        }
        if self.is_own(from) {
            // Our own relay socket (another daemon on this host, or a loop): never relay it.
            return self.count_drop(Drop::BadSource, from);
        }
        if !allowed(&self.settings.daemon.allow, &self.connected, from.ip()) {
            self.count_drop(Drop::NotAllowed, from);
            return;
        }
        let frame = match wire::decode(data) {
            Ok(f) => f,
            Err(reason) => return self.count_drop(Drop::Malformed(reason), from),
        };
        let now = Instant::now();
        match frame.meta.kind {
            Kind::Subscribe | Kind::Unsubscribe => {
                // Requests with a valid cookie come from the address itself; only they may
                // use its renewal bucket, so a spoofer cannot drain it and lapse a victim.
                let verified = self.cookie_ok(&frame, from);
                let limiter = if verified {
                    &mut self.renew_limit
                } else {
                    &mut self.sub_limit
                };
                if !limiter.allow(from.ip(), now) {
                    return self.count_drop(Drop::RateLimited, from);
                }
                if frame.meta.kind == Kind::Subscribe {
                    self.on_subscribe(&frame, data.len(), from).await;
                } else {
                    self.on_unsubscribe(&frame, from).await;
                }
            }
            Kind::Challenge | Kind::Subscribed | Kind::Closed => {
                self.count_drop(Drop::UnexpectedKind, from);
            }
            _ => {
                if !self.relay_limit.allow(from.ip(), now) {
                    return self.count_drop(Drop::RateLimited, from);
                }
                let Some(room) = self.room(frame.room) else {
                    return self.count_drop(Drop::UnknownRoom, from);
                };
                if frame.meta.kind == Kind::Nack {
                    // A subscriber's NACK: answered from the cache when it holds all of it;
                    // otherwise it goes on to the sender as well. Only subscribers (whose
                    // address the cookie proved) are answered: a NACK is small and its answer
                    // is not, so a forged source must get nothing back.
                    let subscribed = self.subs.subscribers(&room.name).any(|a| a == from);
                    if subscribed && let Some(nack) = Nack::from_frame(&frame) {
                        let (found, complete) =
                            self.cache.answer(&room.name, nack.instance, &nack.ranges);
                        for data in found {
                            self.send(&data, from).await;
                        }
                        if complete {
                            return;
                        }
                    }
                } else {
                    self.cache
                        .observe(&room.name, &frame.meta, is_repair(&frame), data, now);
                    self.record(&room.name, &frame, data);
                }
                self.use_ttl(
                    room.group.is_ipv6(),
                    room.ttl.unwrap_or(self.settings.daemon.ttl),
                );
                if self.send(data, room.group).await {
                    self.counters.relayed_to_group += 1;
                }
                let subscribers: Vec<SocketAddr> = self
                    .subs
                    .subscribers(&room.name)
                    .filter(|a| *a != from)
                    .collect();
                self.fan_out(data, &subscribers).await;
            }
        }
    }

    /// Sends multicast with `ttl` from then on (a room's own `ttl`, else the daemon's); a
    /// syscall only when it changes.
    fn use_ttl(&mut self, ipv6: bool, ttl: u32) {
        let (current, sock) = if ipv6 {
            (&mut self.ttl6, self.relay6.as_ref())
        } else {
            (&mut self.ttl4, self.relay4.as_ref())
        };
        if *current == ttl {
            return;
        }
        if let Some(sock) = sock {
            match socket::set_multicast_ttl(sock.as_ref(), ipv6, ttl) {
                Ok(()) => *current = ttl,
                Err(error) => tracing::warn!(%error, ttl, "cannot set the multicast TTL"),
            }
        }
    }

    async fn fan_out(&mut self, data: &[u8], to: &[SocketAddr]) {
        for addr in to {
            if self.send(data, *addr).await {
                self.counters.relayed_to_subscribers += 1;
            }
        }
    }

    /// Writes a daemon datagram for `room` into `self.out`.
    fn control(&mut self, kind: Kind, room: &str, extra: &[(&str, &str)], text: &str) -> bool {
        let header = Header {
            meta: Meta {
                kind,
                ..Meta::default()
            },
            extra,
        };
        wire::encode(&header, room, DAEMON_NAME, text, &mut self.out).is_ok()
    }

    async fn reply(&mut self, to: SocketAddr) {
        self.send_out(&[to]).await;
    }

    /// Sends the datagram in `self.out` (written by [`Relay::control`]) to each of `to`.
    async fn send_out(&mut self, to: &[SocketAddr]) {
        let out = std::mem::take(&mut self.out);
        for addr in to {
            self.send(out.as_bytes(), *addr).await;
        }
        self.out = out;
    }

    fn cookie_ok(&self, frame: &Frame<'_>, from: SocketAddr) -> bool {
        frame
            .tags
            .get("cookie")
            .is_some_and(|c| self.cookies.verify(&c, from, now_secs()))
    }

    async fn on_subscribe(&mut self, frame: &Frame<'_>, request_len: usize, from: SocketAddr) {
        let Some(room) = self.room(frame.room) else {
            return self.count_drop(Drop::UnknownRoom, from);
        };
        if !self.cookie_ok(frame, from) {
            // Return-routability first: answer with a cookie, never with more bytes than the
            // request carried, so a spoofed source cannot be used for amplification.
            let cookie = self.cookies.issue(from, now_secs());
            if !self.control(
                Kind::Challenge,
                room.name.as_str(),
                &[("cookie", &cookie)],
                "",
            ) {
                return;
            }
            if self.out.len() > request_len {
                return self.count_drop(Drop::RequestTooSmall, from);
            }
            self.counters.challenges += 1;
            return self.reply(from).await;
        }
        let lease = Duration::from_secs(u64::from(self.settings.daemon.lease_secs));
        let outcome = self
            .subs
            .subscribe(&room.name, from, frame.sender, Instant::now(), lease);
        match outcome {
            Subscribed::Added { first } => {
                self.counters.subscribed += 1;
                tracing::info!(room = %room.name, %from, name = frame.sender, "subscribed");
                if first {
                    self.reconcile();
                    self.flush_closed().await;
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
                self.count_drop(why, from);
                if self.control(Kind::Closed, room.name.as_str(), &[], why.name()) {
                    self.reply(from).await;
                }
                return;
            }
        }
        // A join that failed in reconcile closed the room again: then there is nothing to
        // confirm (the subscriber was told).
        if !self.subs.subscribers(&room.name).any(|a| a == from) {
            return;
        }
        let lease = self.settings.daemon.lease_secs.to_string();
        if self.control(
            Kind::Subscribed,
            room.name.as_str(),
            &[("lease", &lease)],
            "",
        ) {
            self.reply(from).await;
        }
    }

    async fn on_unsubscribe(&mut self, frame: &Frame<'_>, from: SocketAddr) {
        if !self.cookie_ok(frame, from) {
            // Without the cookie anyone could end anyone's subscription.
            return self.count_drop(Drop::BadCookie, from);
        }
        // The codec checked the room name already.
        let Ok(room) = RoomName::new(frame.room) else {
            return self.count_drop(Drop::Malformed(wire::DropReason::BadRoom), from);
        };
        if self.subs.unsubscribe(&room, from) {
            self.counters.unsubscribed += 1;
            tracing::info!(%room, %from, "unsubscribed");
            self.reconcile();
            self.flush_closed().await;
        }
    }

    /// A datagram heard on a joined group.
    async fn on_group(&mut self, d: GroupDatagram) {
        self.counters.received_multicast += 1;
        let from = canonical(d.from);
        if self.joined.get(&d.room).map(|j| j.generation) != Some(d.generation) {
            return self.count_drop(Drop::StaleGroup, from);
        }
        if self.is_own(from) {
            self.own_forwards
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let frame =
            match wire::decode(&d.data).and_then(|f| f.check_room(d.room.as_str()).map(|()| f)) {
                Ok(f) => f,
                Err(reason) => return self.count_drop(Drop::Malformed(reason), from),
            };
        if frame.meta.kind.is_relay_control() {
            return self.count_drop(Drop::UnexpectedKind, from);
        }
        let now = Instant::now();
        if frame.meta.kind == Kind::Nack {
            if let Some(nack) = Nack::from_frame(&frame) {
                let out = self
                    .cache
                    .on_nack(&d.room, nack.instance, &nack.ranges, now);
                self.send_repairs(out).await;
            }
        } else {
            self.cache
                .observe(&d.room, &frame.meta, is_repair(&frame), &d.data, now);
            self.record(&d.room, &frame, &d.data);
        }
        let subscribers: Vec<SocketAddr> = self.subs.subscribers(&d.room).collect();
        self.fan_out(&d.data, &subscribers).await;
    }

    /// Sends what the repair cache produced: to the room's group, and leave repeats to its
    /// subscribers too.
    async fn send_repairs(&mut self, out: Vec<Outgoing>) {
        for o in out {
            let Some(room) = self.room(o.room.as_str()) else {
                continue;
            };
            self.use_ttl(
                room.group.is_ipv6(),
                room.ttl.unwrap_or(self.settings.daemon.ttl),
            );
            self.send(&o.data, room.group).await;
            if o.to_subscribers {
                let subscribers: Vec<SocketAddr> = self.subs.subscribers(&room.name).collect();
                self.fan_out(&o.data, &subscribers).await;
            }
        }
    }

    /// Queues a chat message for history, if its room keeps any.
    fn record(&mut self, room: &RoomName, frame: &Frame<'_>, data: &[u8]) {
        if !matches!(frame.meta.kind, Kind::Message | Kind::Action) {
            return;
        }
        let Some(history) = &mut self.history else {
            return;
        };
        if self.policy.for_room(room.as_str()).count == 0 {
            return;
        }
        // Rooms not in the file are kept only while someone subscribes: anyone allowed to
        // relay could otherwise fill the disk with room names of their own.
        let configured = self.settings.registry.configured(room.as_str()).is_some();
        if !configured && self.subs.subscribers(room).next().is_none() {
            return;
        }
        if !history.store_datagram(data, now_ms())
            && let Some(suppressed) = self.history_log.check(Instant::now())
        {
            tracing::warn!(
                dropped = history.stats().dropped,
                suppressed,
                "history writer is behind; messages not stored"
            );
        }
    }

    /// Lapses expired subscriptions and leaves groups nobody needs.
    async fn expire(&mut self) {
        let now = Instant::now();
        self.cache.expire(now);
        self.relay_limit.forget_idle(now);
        self.sub_limit.forget_idle(now);
        self.renew_limit.forget_idle(now);
        // Addresses change (DHCP, Wi-Fi, VPN): the allow list's `connected` and the
        // own-forward check follow within ten seconds.
        if now.duration_since(self.nets_read) >= Duration::from_secs(10) {
            self.nets_read = now;
            if let Ok(nets) = socket::local_networks() {
                self.set_local_addrs(nets.addresses);
                *self
                    .shared_nets
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    (self.settings.daemon.allow.clone(), nets.subnets.clone());
                self.connected = Arc::new(nets.subnets);
            }
            // Rooms kept joined (keep, history) whose join failed, e.g. the interface was not
            // up yet at start, are tried again.
            if self.wanted().keys().any(|r| !self.joined.contains_key(r)) {
                self.reconcile();
                self.flush_closed().await;
            }
        }
        let lapsed = self.subs.expire(now);
        if lapsed.is_empty() {
            return;
        }
        for l in &lapsed {
            tracing::info!(room = %l.room, addr = %l.addr, name = %l.name, "subscription expired");
        }
        self.counters.expired += lapsed.len() as u64;
        self.reconcile();
        self.flush_closed().await;
    }

    /// The rooms whose groups the daemon should be in: those with subscribers, the
    /// configured rooms marked `keep`, and, while history is on, the configured rooms that
    /// keep history.
    fn wanted(&self) -> HashMap<RoomName, SocketAddr> {
        let recording = self.history.is_some();
        let mut wanted: HashMap<RoomName, SocketAddr> = self
            .settings
            .registry
            .rooms()
            .filter(|r| r.keep || (recording && self.policy.for_room(r.name.as_str()).count > 0))
            .map(|r| (r.name.clone(), r.group))
            .collect();
        for name in self.subs.rooms() {
            if let Some(room) = self.room(name.as_str()) {
                wanted.insert(room.name, room.group);
            }
        }
        wanted
    }

    /// Joins the groups that are wanted and leaves the rest.
    fn reconcile(&mut self) {
        let wanted = self.wanted();
        let stale: Vec<RoomName> = self
            .joined
            .iter()
            .filter(|(name, j)| wanted.get(*name) != Some(&j.group))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(j) = self.joined.remove(&name) {
                j.stop.cancel();
                self.cache.forget_room(&name);
            }
        }
        for (name, group) in wanted {
            if self.joined.contains_key(&name) {
                continue;
            }
            if let Err(error) = self.join(&name, group) {
                let error = format!("{error:#}");
                // Said once per room until a join works, however often it is retried.
                if self.join_failed.insert(name.clone()) {
                    tracing::error!(room = %name, %group, %error, "cannot join group; retrying every 10 s");
                } else {
                    tracing::debug!(room = %name, %group, %error, "cannot join group");
                }
                let dropped = self.subs.close_room(&name);
                if !dropped.is_empty() {
                    self.pending_closed.push((
                        name,
                        dropped,
                        format!("mcchatd cannot join the group: {error}"),
                    ));
                }
            }
        }
    }

    /// Tells the subscribers of rooms that closed during the last reconcile.
    async fn flush_closed(&mut self) {
        for (room, addrs, why) in std::mem::take(&mut self.pending_closed) {
            tracing::info!(%room, subscribers = addrs.len(), reason = %why, "room closed");
            if self.control(Kind::Closed, room.as_str(), &[], &why) {
                self.send_out(&addrs).await;
            }
        }
    }

    fn join(&mut self, name: &RoomName, group: SocketAddr) -> Result<()> {
        let config = multicast_config(&self.settings)?;
        let joined = socket::open(group, &config)?;
        let sock = UdpSocket::from_std(joined.socket)?;
        let stop = self.token.child_token();
        let tx = self.group_tx.clone();
        let room = name.clone();
        self.generation += 1;
        let generation = self.generation;
        let task_stop = stop.clone();
        let relay_ports = self.relay_ports.clone();
        let local_addrs = Arc::clone(&self.local_addrs);
        let own_forwards = Arc::clone(&self.own_forwards);
        self.tracker.spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM + 1];
            loop {
                let r = tokio::select! {
                    () = task_stop.cancelled() => break,
                    r = sock.recv_from(&mut buf) => r,
                };
                match r {
                    Ok((_, from)) if is_own(&relay_ports, &local_addrs, from) => {
                        // The daemon's own forward, looped back: no copy, no queueing.
                        own_forwards.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok((len, from)) => {
                        let d = GroupDatagram {
                            room: room.clone(),
                            generation,
                            from,
                            data: buf[..len].to_vec(),
                        };
                        if tx.send(d).await.is_err() {
                            break;
                        }
                    }
                    Err(error) => tracing::debug!(%error, room = %room, "group receive error"),
                }
            }
            drop(sock);
            tracing::info!(room = %room, %group, "left group");
        });
        tracing::info!(room = %name, %group, "joined group");
        self.join_failed.remove(name);
        self.joined.insert(
            name.clone(),
            Joined {
                group,
                generation,
                stop,
            },
        );
        Ok(())
    }

    /// SIGHUP: re-read the rooms file; keep running on the old one if it is bad.
    async fn reload(&mut self) {
        notify::reloading();
        match settings::load(&self.cli) {
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "reload failed; keeping the running configuration");
            }
            Ok(new) => {
                if new.daemon.listen != self.settings.daemon.listen
                    || new.daemon.status_socket != self.settings.daemon.status_socket
                {
                    tracing::warn!("`listen` and `status_socket` changes take effect on restart");
                }
                if new.daemon.ttl != self.settings.daemon.ttl
                    || new.daemon.iface != self.settings.daemon.iface
                {
                    tracing::warn!("`ttl` and `iface` changes take effect on restart");
                }
                let d = &new.daemon;
                self.relay_limit.set_rate(d.relay_rate, d.relay_burst);
                self.sub_limit.set_rate(d.subscribe_rate, d.subscribe_burst);
                self.renew_limit
                    .set_rate(d.subscribe_rate, d.subscribe_burst);
                self.subs.set_limits(d.max_subscribers, d.max_rooms);
                self.cache
                    .set_bounds(d.repair_cache_bytes, d.repair_window, Instant::now());
                if d.state_dir != self.settings.daemon.state_dir {
                    tracing::warn!("`state_dir` changes take effect on restart");
                }
                self.policy = history_policy(&new);
                if let Some(h) = &self.history {
                    h.set_policy(self.policy.clone());
                }
                let old_rooms: HashMap<RoomName, SocketAddr> = self
                    .subs
                    .rooms()
                    .filter_map(|n| self.room(n.as_str()).map(|r| (r.name, r.group)))
                    .collect();
                let keep_ttl = (self.settings.daemon.ttl, self.settings.daemon.iface.clone());
                self.settings = new;
                (self.settings.daemon.ttl, self.settings.daemon.iface) = keep_ttl;
                if let Ok(nets) = socket::local_networks() {
                    self.set_local_addrs(nets.addresses);
                    self.connected = Arc::new(nets.subnets);
                }
                *self
                    .shared_nets
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = (
                    self.settings.daemon.allow.clone(),
                    self.connected.as_ref().clone(),
                );
                // Rooms that vanished or moved to another group: their subscribers are told.
                for (name, group) in old_rooms {
                    if self.room(name.as_str()).map(|r| r.group) != Some(group) {
                        let addrs = self.subs.close_room(&name);
                        self.pending_closed
                            .push((name, addrs, "room removed".to_owned()));
                    }
                }
                self.reconcile();
                self.flush_closed().await;
                tracing::info!(
                    rooms = self.settings.registry.rooms().count(),
                    origin = %self.settings.origin,
                    "reloaded"
                );
            }
        }
        notify::ready("reloaded");
    }

    /// Tells every subscriber the daemon is going, leaves every group, and waits (bounded)
    /// for the tasks to end.
    async fn shutdown(&mut self) {
        let all: Vec<(RoomName, SocketAddr)> =
            self.subs.all().map(|(r, a)| (r.clone(), a)).collect();
        let tell = async {
            for (room, addr) in all {
                if self.control(Kind::Closed, room.as_str(), &[], "mcchatd is stopping") {
                    self.send_out(&[addr]).await;
                }
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_GRACE / 2, tell).await;
        self.token.cancel();
        self.joined.clear();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE / 2, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop in time");
        }
    }

    fn status_json(&self) -> String {
        let now = Instant::now();
        let mut names: Vec<RoomName> = self
            .settings
            .registry
            .rooms()
            .map(|r| r.name.clone())
            .collect();
        for n in self.subs.rooms().chain(self.joined.keys()) {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names.sort();
        let rooms = names
            .iter()
            .filter_map(|n| {
                let room = self.settings.registry.resolve(n.as_str()).ok()?;
                let mut subscribers: Vec<SubscriberStatus> = self
                    .subs
                    .subs(n)
                    .map(|(addr, sub)| SubscriberStatus {
                        addr: addr.to_string(),
                        name: sub.name.clone(),
                        expires_in_secs: sub.expires.saturating_duration_since(now).as_secs(),
                    })
                    .collect();
                subscribers.sort_by(|a, b| a.addr.cmp(&b.addr));
                Some(RoomStatus {
                    name: n.to_string(),
                    group: room.group.to_string(),
                    configured: room.source == RoomSource::Configured,
                    keep: room.keep,
                    joined: self.joined.contains_key(n),
                    subscribers,
                })
            })
            .collect();
        let mut joined_groups: Vec<String> =
            self.joined.values().map(|j| j.group.to_string()).collect();
        joined_groups.sort();
        let status = Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_secs: self.started.elapsed().as_secs(),
            rooms_file: self.settings.origin.to_string(),
            listen: self
                .settings
                .daemon
                .listen
                .iter()
                .map(ToString::to_string)
                .collect(),
            subscribers: self.subs.total(),
            joined_groups,
            rooms,
            counters: Counters {
                own_forwards_ignored: self.own_forwards.load(std::sync::atomic::Ordering::Relaxed),
                ..self.counters.clone()
            },
            repair_cache: self.cache.stats(),
            history: self.history.as_ref().map(|h| HistoryStatus {
                path: h.path().display().to_string(),
                stats: h.stats(),
            }),
        };
        serde_json::to_string(&status).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// `--check-config`: a summary of what would run.
pub fn check_config(cli: &Cli) -> Result<String> {
    let s = settings::load(cli)?;
    let d = &s.daemon;
    let rooms: Vec<String> = s
        .registry
        .rooms()
        .map(|r| {
            format!(
                "{} {}{}",
                r.name,
                r.group,
                if r.keep { " keep" } else { "" }
            )
        })
        .collect();
    let status: Option<PathBuf> = d.status_socket.clone();
    let history = match settings::state_dir(d) {
        None => "off".to_owned(),
        Some((dir, _)) => format!(
            "{} (default: last {} messages, at most {} old, per room)",
            dir.join(crate::history::FILE_NAME).display(),
            d.history_count,
            humantime::format_duration(d.history_age),
        ),
    };
    Ok(format!(
        "{}: ok\nrooms: {}\nlisten: {}\nallow: {}\nadhoc rooms: {}, lease {} s, max {} subscribers in {} rooms, ttl {}\nstatus socket: {}\nrepair cache: {} bytes, {} s\nhistory: {}",
        s.origin,
        if rooms.is_empty() {
            "(none)".to_owned()
        } else {
            rooms.join(", ")
        },
        d.listen
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        d.allow
            .iter()
            .map(|a| match a {
                Allow::Loopback => "loopback".to_owned(),
                Allow::Connected => "connected".to_owned(),
                Allow::Net(n) => n.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" "),
        if d.adhoc_rooms { "on" } else { "off" },
        d.lease_secs,
        d.max_subscribers,
        d.max_rooms,
        d.ttl,
        status.map_or_else(|| "off".to_owned(), |p| p.display().to_string()),
        d.repair_cache_bytes,
        d.repair_window.as_secs(),
        history,
    ))
}
