//! The daemon in-process, on 127.0.0.1:0, as mini-redis and hickory-dns test their servers:
//! real sockets, tokio's paused clock for leases, an injected wall clock for cookies.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mcchat_core::wire::{self, Kind};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UdpSocket;

use super::*;
use crate::test_support::settings;

/// Opens sockets only inside the test namespace (scripts/test.sh); anywhere else the test
/// fails rather than pass without having run.
fn require_netns() {
    assert!(
        std::env::var_os("MCCHAT_TEST_NETNS").is_some(),
        "this test opens sockets: run it with scripts/test.sh"
    );
}

fn rooms(extra_daemon: &str, state_dir: &str) -> String {
    format!(
        r#"
[daemon]
listen = ["127.0.0.1:0"]
status_socket = ""
state_dir = "{state_dir}"
lease_secs = 60
relay_rate = 100000
relay_burst = 100000
unproven_rate = 100000
unproven_burst = 100000
{extra_daemon}

[rooms.room1]
group = "239.255.91.1"
port = 25901

[rooms.room2]
group = "239.255.91.2"
port = 25902
"#
    )
}

/// A running daemon and how to stop it.
struct Daemon {
    addr: SocketAddr,
    shutdown: CancellationToken,
    reload: mpsc::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
}

fn start(text: String, loader: reload::Loader) -> Daemon {
    let settings = settings(&text);
    let bound = bind(&settings).expect("bind");
    let addr = bound.relay_addrs()[0];
    let shutdown = CancellationToken::new();
    let (reload, reload_rx) = mpsc::channel(1);
    let control = Control {
        shutdown: shutdown.clone(),
        reload: reload_rx,
        loader,
        wall: Wall::From(1_800_000_000_000),
        web: None,
    };
    let task = tokio::spawn(serve(settings, bound, control));
    Daemon {
        addr,
        shutdown,
        reload,
        task,
    }
}

/// A daemon on `text`, reloading the same text.
fn start_plain(text: String) -> Daemon {
    require_netns();
    let t = text.clone();
    start(text, Arc::new(move || Ok(settings(&t))))
}

async fn status(addr: SocketAddr) -> serde_json::Value {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("status connect");
    s.write_all(b"status\n").await.expect("status request");
    let mut doc = String::new();
    s.read_to_string(&mut doc).await.expect("status read");
    serde_json::from_str(&doc).expect("status JSON")
}

/// A `--via` client's socket, connected to the daemon.
async fn client(daemon: SocketAddr) -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("client bind");
    sock.connect(daemon).await.expect("client connect");
    sock
}

async fn recv_kind(sock: &UdpSocket) -> (Kind, String, String) {
    let mut buf = vec![0u8; 2048];
    let n = sock.recv(&mut buf).await.expect("recv");
    let f = wire::decode(&buf[..n]).expect("decodes");
    let cookie = f
        .tags
        .get("cookie")
        .map(|c| c.into_owned())
        .unwrap_or_default();
    (f.meta.kind, cookie, f.text.to_owned())
}

/// Sends a relay request as mcchat does (padded), with `cookie` if given.
async fn send_request(sock: &UdpSocket, kind: Kind, room: &str, cookie: Option<&str>) {
    let mut req = String::new();
    wire::relay_request(
        kind,
        room,
        "t",
        cookie,
        None,
        wire::MIN_RELAY_REQUEST,
        &mut req,
    )
    .unwrap();
    sock.send(req.as_bytes()).await.unwrap();
}

async fn subscribe(sock: &UdpSocket, room: &str) -> String {
    send_request(sock, Kind::Subscribe, room, None).await;
    let (kind, cookie, _) = recv_kind(sock).await;
    assert_eq!(kind, Kind::Challenge);
    send_request(sock, Kind::Subscribe, room, Some(&cookie)).await;
    let (kind, cookie, _) = recv_kind(sock).await;
    assert_eq!(kind, Kind::Subscribed);
    assert!(!cookie.is_empty(), "subok carries a cookie");
    cookie
}

#[tokio::test(start_paused = true)]
async fn a_lease_lapses_on_paused_time() {
    let d = start_plain(rooms("", ""));
    let c = client(d.addr).await;
    subscribe(&c, "room1").await;
    let s = status(d.addr).await;
    assert_eq!(s["subscribers"], 1);
    assert_eq!(s["rooms"][0]["joined"], true);
    assert_eq!(
        s["listen"][0],
        d.addr.to_string(),
        "as bound, not 127.0.0.1:0"
    );
    tokio::time::sleep(Duration::from_secs(50)).await;
    assert_eq!(status(d.addr).await["subscribers"], 1, "within the lease");
    tokio::time::sleep(Duration::from_secs(11)).await;
    let s = status(d.addr).await;
    assert_eq!(s["subscribers"], 0);
    assert_eq!(s["counters"]["expired"], 1);
    assert_eq!(s["rooms"][0]["joined"], false, "the group was left");
    d.shutdown.cancel();
    d.task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn renewals_past_the_first_cookies_life_keep_the_subscription() {
    let d = start_plain(rooms("", ""));
    let c = client(d.addr).await;
    let mut cookie = subscribe(&c, "room1").await;
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_secs(20)).await;
        send_request(&c, Kind::Subscribe, "room1", Some(&cookie)).await;
        let (kind, fresh, _) = recv_kind(&c).await;
        assert_eq!(
            kind,
            Kind::Subscribed,
            "renewed with the last subok's cookie"
        );
        cookie = fresh;
    }
    // 140 s in: an unsub with the latest cookie works.
    send_request(&c, Kind::Unsubscribe, "room1", Some(&cookie)).await;
    let s = status(d.addr).await;
    assert_eq!(s["subscribers"], 0);
    assert_eq!(s["counters"]["unsubscribed"], 1);
    assert_eq!(s["counters"]["challenges"], 1, "never challenged again");
    d.shutdown.cancel();
    d.task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn reload_closes_a_removed_room_and_keeps_running_on_a_bad_file() {
    require_netns();
    let dir = tempfile_dir();
    let path = dir.join("rooms.toml");
    let text = rooms("adhoc_rooms = false", "");
    std::fs::write(&path, &text).unwrap();
    let p = path.clone();
    let loader: reload::Loader = Arc::new(move || {
        let text = std::fs::read_to_string(&p)?;
        let registry = mcchat_core::room::Registry::from_toml(&text, "rooms.toml")?;
        let daemon = crate::config::DaemonSettings::from_registry(&registry, "rooms.toml")?;
        Ok(Settings {
            registry,
            daemon,
            origin: mcchat_core::config::Origin {
                path: Some(p.clone()),
                found: mcchat_core::config::Found::Flag,
            },
            web: crate::web::config::WebSettings::default(),
            sites: crate::sites::config::SitesSettings::default(),
        })
    });
    let d = start(text.clone(), loader);
    let c = client(d.addr).await;
    subscribe(&c, "room2").await;
    // A broken file: the running configuration stays.
    std::fs::write(&path, "[rooms.room2\n").unwrap();
    d.reload.send(()).await.unwrap();
    assert_eq!(status(d.addr).await["subscribers"], 1);
    // room2 removed: its subscriber is told.
    std::fs::write(
        &path,
        text.replace(
            "[rooms.room2]\ngroup = \"239.255.91.2\"\nport = 25902\n",
            "",
        ),
    )
    .unwrap();
    d.reload.send(()).await.unwrap();
    let (kind, _, why) = recv_kind(&c).await;
    assert_eq!((kind, why.as_str()), (Kind::Closed, "room removed"));
    let s = status(d.addr).await;
    assert_eq!(s["subscribers"], 0);
    assert!(
        s["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["name"] != "room2")
    );
    d.shutdown.cancel();
    d.task.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> PathBuf {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).unwrap();
    let dir = std::env::temp_dir().join(format!("mcchatd-test-{}", u64::from_le_bytes(id)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Real time: the bound is the point. History on, its writer stuck behind a lock held by
/// another connection, its queue full of records; shutdown still ends within a second and
/// tells the subscriber.
#[tokio::test]
async fn shutdown_is_bounded_with_history_on_and_the_writer_stuck() {
    require_netns();
    let dir = tempfile_dir();
    let text = rooms("history_count = 100000", dir.to_str().unwrap());
    let t = text.clone();
    let d = start(text, Arc::new(move || Ok(settings(&t))));
    let c = client(d.addr).await;
    // In another room than the flood, so its socket buffer has room for `closed`.
    subscribe(&c, "room2").await;
    // Hold the database's write lock: every commit of the writer waits.
    let blocker = rusqlite::Connection::open(dir.join(crate::history::FILE_NAME)).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Until the queue is full (status says so): how many that takes depends on when the
    // writer took its first batch before it got stuck.
    let mut full = false;
    for seq in 1..=200_000u32 {
        let msg = format!("@id=00000000000000ab;seq={seq};ts=1 room1|bob|message {seq}");
        sender.send_to(msg.as_bytes(), d.addr).await.unwrap();
        if seq % 500 == 0 {
            // Let the daemon keep up (its socket buffer is finite).
            tokio::task::yield_now().await;
            let s = status(d.addr).await;
            if s["history"]["dropped"].as_u64().unwrap() > 0 {
                full = true;
                break;
            }
        }
    }
    assert!(full, "the history queue never filled");
    let started = std::time::Instant::now();
    d.shutdown.cancel();
    d.task.await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "shutdown took {took:?}");
    // The subscriber was told.
    let mut told = false;
    let mut buf = vec![0u8; 2048];
    while let Ok(n) = c.try_recv(&mut buf) {
        let f = wire::decode(&buf[..n]).unwrap();
        told |= f.meta.kind == Kind::Closed && f.text == "mcchatd is stopping";
    }
    assert!(told);
    drop(blocker);
    let _ = std::fs::remove_dir_all(dir);
}

/// PROTOCOL 4.4: over TCP, anyone the allow list admits may ask, so the status lists
/// subscribers by name only (their addresses are what a forger would need); the local socket
/// shows the addresses too.
#[tokio::test(start_paused = true)]
async fn subscriber_addresses_are_shown_on_the_local_socket_only() {
    let dir = tempfile_dir();
    let path = dir.join("status.sock");
    let text = rooms("", "").replace(
        r#"status_socket = """#,
        &format!("status_socket = {:?}", path.to_str().unwrap()),
    );
    let d = start_plain(text);
    let c = client(d.addr).await;
    subscribe(&c, "room1").await;
    let remote = status(d.addr).await;
    let sub = &remote["rooms"][0]["subscribers"][0];
    assert_eq!(sub["name"], "t", "{remote}");
    assert!(sub.get("addr").is_none(), "{remote}");
    let mut s = tokio::net::UnixStream::connect(&path)
        .await
        .expect("status socket");
    s.write_all(b"status\n").await.unwrap();
    let mut doc = String::new();
    s.read_to_string(&mut doc).await.unwrap();
    let local: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let addr = c.local_addr().unwrap().to_string();
    assert_eq!(
        local["rooms"][0]["subscribers"][0]["addr"],
        addr.as_str(),
        "{local}"
    );
    d.shutdown.cancel();
    d.task.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// A read of the configuration that hangs (a hung mount) does not stop relaying: it fails
/// after RELOAD_TIMEOUT; the next SIGHUP waits for it to end, then reads again and applies.
#[tokio::test(start_paused = true)]
async fn a_stuck_reload_times_out_and_the_loop_keeps_serving() {
    require_netns();
    let text = rooms("adhoc_rooms = false", "");
    let without_room2 = text.replace(
        "[rooms.room2]\ngroup = \"239.255.91.2\"\nport = 25902\n",
        "",
    );
    let (release, stuck) = std::sync::mpsc::channel::<()>();
    let stuck = std::sync::Mutex::new(Some(stuck));
    let loader: reload::Loader = Arc::new(move || {
        // The first read hangs until the test ends; later ones are quick.
        let first = stuck.lock().unwrap().take();
        if let Some(rx) = first {
            let _ = rx.recv();
        }
        Ok(settings(&without_room2))
    });
    let d = start(text, loader);
    let c = client(d.addr).await;
    subscribe(&c, "room2").await;
    d.reload.send(()).await.unwrap();
    // Served while the read hangs.
    assert_eq!(status(d.addr).await["subscribers"], 1);
    let c2 = client(d.addr).await;
    subscribe(&c2, "room1").await;
    tokio::time::advance(reload::RELOAD_TIMEOUT + Duration::from_secs(1)).await;
    // Timed out: the next reload waits for the stuck read to end (no second thread beside
    // it), then reads again and applies: room2's subscriber is told.
    d.reload.send(()).await.unwrap();
    assert_eq!(
        status(d.addr).await["subscribers"],
        2,
        "still serving, nothing applied"
    );
    drop(release);
    let (kind, _, why) = recv_kind(&c).await;
    assert_eq!((kind, why.as_str()), (Kind::Closed, "room removed"));
    d.shutdown.cancel();
    d.task.await.unwrap().unwrap();
}
