//! One room across sites (docs/PROTOCOL.md 8): real mcchatd daemons bridged through Debian's
//! nats-server, started here inside the test namespace. Two sites on one `lo` are told apart
//! by their rooms files (the same room name on different groups, so no multicast crosses);
//! the first test uses the LAN of namespaces instead, a site on each side of a router that
//! has no multicast route for the room's group.
//!
//! Every wait is on a line a process printed; the caps only turn a hang into a failure.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{Lan, Pace, Proc, TempDir, WAIT, logged_addr, relay_addr, require_netns, run};

/// A nats-server with JetStream, its store in a directory of its own (kept across restarts).
struct Nats {
    ns: Option<String>,
    args: Vec<String>,
    proc: Option<Proc>,
    _dir: TempDir,
}

impl Nats {
    /// A server on `port` (listening on every address of its namespace), with `extra` flags.
    fn start(ns: Option<&str>, name: &str, port: u16, extra: &[String]) -> Self {
        let dir = TempDir::new();
        let mut args: Vec<String> = [
            "-js",
            "-sd",
            &dir.path().display().to_string(),
            "-n",
            name,
            "-a",
            if ns.is_some() { "0.0.0.0" } else { "127.0.0.1" },
            "-p",
            &port.to_string(),
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        args.extend(extra.iter().cloned());
        let mut n = Self {
            ns: ns.map(str::to_owned),
            args,
            proc: None,
            _dir: dir,
        };
        n.run();
        n
    }

    fn run(&mut self) {
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nats-server"]);
                c
            }
            None => Command::new("nats-server"),
        };
        cmd.args(&self.args);
        let p = Proc::spawn("nats-server", cmd);
        p.expect_err("Server is ready");
        self.proc = Some(p);
    }

    fn kill(&mut self) {
        self.proc = None;
    }

    fn restart(&mut self) {
        self.kill();
        self.run();
    }
}

/// A rooms file of one site: `rooms` as (name, group, port).
fn rooms_file(dir: &TempDir, site: &str, rooms: &[(&str, &str, u16)], sites: &str) -> String {
    let mut text = format!("[sites]\n{sites}\n");
    for (name, group, port) in rooms {
        text.push_str(&format!(
            "\n[rooms.\"{name}\"]\ngroup = \"{group}\"\nport = {port}\n"
        ));
    }
    dir.write(&format!("{site}.toml"), &text)
}

/// An mcchatd of `site` on 127.0.0.1, bridged through `nats`, once its reader of every one
/// of `rooms` is running.
fn site_daemon(rooms: &str, site: &str, nats: &[String], bridged: &[&str], extra: &[&str]) -> Proc {
    let mut args = vec![
        "--rooms",
        rooms,
        "--listen",
        "127.0.0.1:0",
        "--status-socket",
        "",
        "--site",
        site,
    ];
    for n in nats {
        args.extend(["--nats", n.as_str()]);
    }
    args.extend_from_slice(extra);
    let d = Proc::daemon(None, &args);
    reading(&d, bridged);
    d
}

/// Waits until `d` reads each of `rooms` from the stream.
fn reading(d: &Proc, rooms: &[&str]) {
    for room in rooms {
        d.expect_err_where(&format!("reading {room}"), |l| {
            l.contains("site link: reading the room's stream")
                && l.contains(&format!("room={room} "))
        });
    }
}

fn status(d: &Proc) -> serde_json::Value {
    let (st, out, err) = run(
        &["status", "--via", &relay_addr(d).to_string(), "--json"],
        &[],
    );
    assert!(st.success(), "{err}");
    serde_json::from_str(&out).expect("status json")
}

/// Waits until `d`'s status satisfies `ok` (status is polled: it has no line to wait for).
fn status_until(
    d: &Proc,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(d);
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {}", s["site"]);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn injecting(s: &serde_json::Value, room: &str) -> bool {
    s["site"]["injecting"]
        .as_array()
        .is_some_and(|a| a.iter().any(|r| r == room))
}

/// A peer of one site that sends what it is told.
fn sender(rooms: &str, room: &str, name: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["--rooms", rooms, "join", room, "--name", name];
    args.extend_from_slice(extra);
    Proc::mcchat(name, None, &args, &[]).ready()
}

/// A listener of one site.
fn listener(label: &str, rooms: &str, room: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["--rooms", rooms, "listen", room, "--json"];
    args.extend_from_slice(extra);
    Proc::mcchat(label, None, &args, &[]).listening()
}

/// The texts of each sender's messages a listener printed, in order.
fn by_sender(p: &Proc) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in p.stdout() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["kind"] == "message" {
            out.entry(v["sender"].as_str().unwrap_or("").to_owned())
                .or_default()
                .push(v["text"].as_str().unwrap_or("").to_owned());
        }
    }
    out
}

/// How many "lost" lines (messages reported lost) a listener printed, in all.
fn lost(p: &Proc) -> u64 {
    p.stdout()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "lost")
        .filter_map(|v| v["text"].as_str()?.split(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn texts(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i:04}")).collect()
}

/// Waits until `p` printed every one of `want` (each a whole JSON string value).
fn expect_all(p: &Proc, want: &[String]) {
    for w in want {
        p.expect_out(&format!("\"{w}\""));
    }
}

/// A web client: a WebSocket to the daemon's page, in `room` as `name`.
struct WebClient {
    ws: tungstenite::WebSocket<TcpStream>,
    chats: Vec<(String, String)>,
}

impl WebClient {
    fn join(addr: SocketAddr, room: &str, name: &str) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(WAIT)).expect("read timeout");
        let (ws, _) =
            tungstenite::client(format!("ws://{addr}/ws"), stream).expect("websocket handshake");
        let mut c = Self {
            ws,
            chats: Vec::new(),
        };
        c.send(&serde_json::json!({"type": "join", "room": room, "name": name}));
        c.until(|v| v["type"] == "joined");
        c
    }

    fn send(&mut self, v: &serde_json::Value) {
        self.ws
            .send(tungstenite::Message::text(v.to_string()))
            .expect("send");
    }

    fn say(&mut self, text: &str) {
        self.send(&serde_json::json!({"type": "message", "message": text}));
    }

    /// Reads frames until one satisfies `ok` (chat frames are kept).
    fn until(&mut self, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        loop {
            let m = self.ws.read().expect("a frame before the cap");
            let Ok(text) = m.to_text() else { continue };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
                continue;
            };
            if v["type"] == "chat" {
                self.chats.push((
                    v["sender"].as_str().unwrap_or("").to_owned(),
                    v["text"].as_str().unwrap_or("").to_owned(),
                ));
            }
            if ok(&v) {
                return v;
            }
        }
    }

    fn from(&self, sender: &str) -> Vec<String> {
        self.chats
            .iter()
            .filter(|(s, _)| s == sender)
            .map(|(_, t)| t.clone())
            .collect()
    }
}

/// Two LANs of namespace hosts on either side of a router with no multicast route for the
/// room's group, joined only through a nats-server on the router: a peer at each site, and
/// a `--via` client at the first, chat; each message reaches every other member once, in
/// order, and each site's history holds the other's messages once.
#[test]
fn two_lans_chat_through_nats_only() {
    require_netns();
    let lan = Lan::up();
    let dir = TempDir::new();
    // 239.77.0.0/16 is outside what lan.sh's router forwards: no multicast crosses at all.
    let rooms = rooms_file(&dir, "both", &[("lab.3", "239.77.1.1", 7701)], "");
    let _nats = Nats::start(Some(&lan.ns("r")), "hub", 4222, &[]);
    let d_paris = Proc::daemon(
        Some(&lan.ns("h1")),
        &[
            "--rooms",
            &rooms,
            "--listen",
            "198.51.100.1:5554",
            "--status-socket",
            "",
            "--site",
            "paris",
            "--nats",
            "nats://198.51.100.254:4222",
        ],
    );
    let d_london = Proc::daemon(
        Some(&lan.ns("h4")),
        &[
            "--rooms",
            &rooms,
            "--listen",
            "203.0.113.4:5554",
            "--status-socket",
            "",
            "--site",
            "london",
            "--nats",
            "nats://203.0.113.254:4222",
        ],
    );
    for d in [&d_paris, &d_london] {
        reading(d, &["lab.3"]);
        d.expect_err("injecting this room from other sites");
    }
    let in_ns = |label: &str, host: &str, args: &[&str]| {
        let mut a = vec!["--rooms", rooms.as_str()];
        a.extend_from_slice(args);
        Proc::mcchat(label, Some(&lan.ns(host)), &a, &[])
    };
    let rx_paris = in_ns("rx-paris", "h3", &["listen", "lab.3", "--json"]).listening();
    let rx_via = in_ns(
        "rx-via",
        "h3",
        &["listen", "lab.3", "--json", "--via", "198.51.100.1"],
    )
    .listening();
    let rx_london = in_ns("rx-london", "h4", &["listen", "lab.3", "--json"]).listening();
    let mut alice = in_ns("alice", "h2", &["join", "lab.3", "--name", "alice"]).ready();
    let mut bob = in_ns("bob", "h4", &["join", "lab.3", "--name", "bob"]).ready();
    let mut carol = in_ns(
        "carol",
        "h3",
        &["join", "lab.3", "--name", "carol", "--via", "198.51.100.1"],
    )
    .ready();
    const N: usize = 30;
    for i in 0..N {
        alice.say(&format!("a{:04}", i + 1));
        bob.say(&format!("b{:04}", i + 1));
        carol.say(&format!("c{:04}", i + 1));
    }
    let (a, b, c) = (texts("a", N), texts("b", N), texts("c", N));
    for rx in [&rx_paris, &rx_via, &rx_london] {
        expect_all(rx, &a);
        expect_all(rx, &b);
        expect_all(rx, &c);
    }
    for rx in [&rx_paris, &rx_via, &rx_london] {
        let got = by_sender(rx);
        assert_eq!(got.get("alice"), Some(&a), "{}: once, in order", rx.label);
        assert_eq!(got.get("bob"), Some(&b), "{}: once, in order", rx.label);
        assert_eq!(got.get("carol"), Some(&c), "{}: once, in order", rx.label);
        assert_eq!(lost(rx), 0, "{}", rx.label);
    }
    // Each site's history has the other site's messages, once.
    let history = |host: &str, daemon: &str| {
        let mut p = in_ns(
            "history",
            host,
            &[
                "history", "lab.3", "--via", daemon, "--json", "--limit", "1000",
            ],
        );
        assert!(p.wait().success(), "{:?}", p.stderr_lines());
        by_sender(&p)
    };
    let h = history("h4", "203.0.113.4");
    assert_eq!((h.get("alice"), h.get("carol")), (Some(&a), Some(&c)));
    let h = history("h2", "198.51.100.1");
    assert_eq!(h.get("bob"), Some(&b));
    drop((d_paris, d_london));
}

/// Rooms for one site on `lo`: each test and site has groups and ports of its own.
fn lo_rooms(dir: &TempDir, site: &str, base: u16, names: &[&str], sites: &str) -> String {
    let groups: Vec<(String, u16)> = (0..names.len())
        .map(|i| {
            let n = u16::try_from(i).unwrap_or(0);
            (format!("239.255.{}.{}", base % 250, 10 + n), base * 10 + n)
        })
        .collect();
    let rooms: Vec<(&str, &str, u16)> = names
        .iter()
        .zip(&groups)
        .map(|(n, (g, p))| (*n, g.as_str(), *p))
        .collect();
    rooms_file(dir, site, &rooms, sites)
}

/// Paris and london on `lo`, with room1 each (groups of their own from `base`) and `sites`
/// in their `[sites]`, their daemons bridged through these servers, each reading room1.
fn two_sites(
    dir: &TempDir,
    base: u16,
    sites: &str,
    paris_nats: &[String],
    london_nats: &[String],
) -> (String, String, Proc, Proc) {
    let paris = lo_rooms(dir, "paris", base, &["room1"], sites);
    let london = lo_rooms(dir, "london", base + 1, &["room1"], sites);
    let dp = site_daemon(&paris, "paris", paris_nats, &["room1"], &[]);
    let dl = site_daemon(&london, "london", london_nats, &["room1"], &[]);
    (paris, london, dp, dl)
}

/// `--via` and web clients at either site, and room names that a careless subject mapping
/// would merge or misroute (`a.b`, `a_2Eb`, `a-b`): every message reaches its own room at
/// the other site, once, and no other room.
#[test]
fn via_and_web_clients_at_either_site_and_names_that_could_collide() {
    require_netns();
    let dir = TempDir::new();
    let nats = Nats::start(None, "n1", 24301, &[]);
    let url = vec!["nats://127.0.0.1:24301".to_owned()];
    let names = ["a.b", "a_2Eb", "a-b"];
    let paris = lo_rooms(&dir, "paris", 2431, &names, "");
    let london = lo_rooms(&dir, "london", 2432, &names, "");
    let dp = site_daemon(&paris, "paris", &url, &names, &["--web", "127.0.0.1:0"]);
    let dl = site_daemon(&london, "london", &url, &names, &["--web", "127.0.0.1:0"]);
    let web = |d: &Proc| logged_addr(d, "web page and WebSocket on HTTP");
    let (wp, wl) = (web(&dp), web(&dl));
    let paris_via = relay_addr(&dp).to_string();
    let london_via = relay_addr(&dl).to_string();
    for d in [&dp, &dl] {
        status_until(d, "leases", |s| names.iter().all(|r| injecting(s, r)));
    }
    // Listeners on every room at both sites, directly and through the daemon.
    let mut rx = Vec::new();
    for (site, rooms, via) in [
        ("paris", &paris, &paris_via),
        ("london", &london, &london_via),
    ] {
        for room in names {
            rx.push((
                site,
                room,
                listener(&format!("{site}-{room}"), rooms, room, &[]),
            ));
            rx.push((
                site,
                room,
                listener(&format!("{site}-{room}-via"), rooms, room, &["--via", via]),
            ));
        }
    }
    let mut web_paris = WebClient::join(wp, "a.b", "wendy");
    let mut web_london = WebClient::join(wl, "a.b", "walt");
    // One sender per room and site: each says its room's name.
    let mut senders = Vec::new();
    for (site, rooms, via) in [
        ("paris", &paris, &paris_via),
        ("london", &london, &london_via),
    ] {
        for room in names {
            let name = format!("{site}-{}", room.replace('.', "d"));
            let extra: &[&str] = if site == "london" {
                &["--via", via]
            } else {
                &[]
            };
            let mut p = sender(rooms, room, &name, extra);
            for i in 1..=5 {
                p.say(&format!("{room} {site} {i}"));
            }
            senders.push(p);
        }
    }
    for i in 1..=5 {
        web_paris.say(&format!("from wendy {i}"));
        web_london.say(&format!("from walt {i}"));
    }
    for (_, room, p) in &rx {
        for site in ["paris", "london"] {
            for i in 1..=5 {
                p.expect_out(&format!("\"{room} {site} {i}\""));
            }
        }
    }
    let walt = texts_of("from walt", 5);
    let wendy = texts_of("from wendy", 5);
    for (site, room, p) in &rx {
        if *room == "a.b" {
            expect_all(p, &walt);
            expect_all(p, &wendy);
        }
        let got = by_sender(p);
        for (sender, texts) in &got {
            if sender == "walt" || sender == "wendy" {
                assert_eq!(*room, "a.b");
                continue;
            }
            let from = if sender.starts_with("paris") {
                "paris"
            } else {
                "london"
            };
            let want: Vec<String> = (1..=5).map(|i| format!("{room} {from} {i}")).collect();
            assert_eq!(
                texts, &want,
                "{site} {room} from {sender}: once, in order, and only its room's"
            );
        }
        assert_eq!(
            got.len(),
            2 + if *room == "a.b" { 2 } else { 0 },
            "{site} {room}: {got:?}"
        );
    }
    // The browsers: each sees the other site's browser, once, in order.
    web_paris.until(|v| v["type"] == "chat" && v["text"] == "from walt 5");
    web_london.until(|v| v["type"] == "chat" && v["text"] == "from wendy 5");
    assert_eq!(web_paris.from("walt"), walt);
    assert_eq!(web_london.from("wendy"), wendy);
    drop(nats);
}

fn texts_of(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix} {i}")).collect()
}

/// Two daemons bridging one LAN: every receiver gets each of the other site's messages
/// once; the one that injects is killed mid-stream, and the other takes over with nothing
/// lost.
#[test]
fn two_daemons_on_one_lan_inject_once_and_one_takes_over() {
    require_netns();
    let dir = TempDir::new();
    let _nats = Nats::start(None, "n1", 24311, &[]);
    let url = vec!["nats://127.0.0.1:24311".to_owned()];
    let lease = "lease = \"2s\"";
    let paris = lo_rooms(&dir, "paris", 2441, &["room1"], lease);
    let london = lo_rooms(&dir, "london", 2442, &["room1"], lease);
    let mut pa = Some(site_daemon(&paris, "paris", &url, &["room1"], &[]));
    let mut pb = Some(site_daemon(&paris, "paris", &url, &["room1"], &[]));
    let dl = site_daemon(&london, "london", &url, &["room1"], &[]);
    let holder = |d: &Option<Proc>| d.as_ref().is_some_and(|d| injecting(&status(d), "room1"));
    let deadline = Instant::now() + WAIT;
    while !(holder(&pa) || holder(&pb)) {
        assert!(Instant::now() < deadline, "nobody injects");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!(holder(&pa) && holder(&pb)), "exactly one injects");
    let rx = listener("rx-paris", &paris, "room1", &[]);
    let rx_london = listener("rx-london", &london, "room1", &[]);
    let mut bob = sender(&london, "room1", "bob", &[]);
    let mut alice = sender(&paris, "room1", "alice", &[]);
    const N: usize = 200;
    let pace = Pace::new(Duration::from_millis(10));
    for i in 0..N {
        pace.until(i as u64);
        bob.say(&format!("b{:04}", i + 1));
        alice.say(&format!("a{:04}", i + 1));
        if i == N / 3 {
            // The holder dies without giving its lease back.
            let victim = if holder(&pa) { &mut pa } else { &mut pb };
            let d = victim.take().expect("holder");
            d.signal(nix::sys::signal::Signal::SIGKILL);
            drop(d);
        }
    }
    let (a, b) = (texts("a", N), texts("b", N));
    expect_all(&rx, &b);
    expect_all(&rx_london, &a);
    let got = by_sender(&rx);
    assert_eq!(got.get("bob"), Some(&b), "paris: bob's once, in order");
    assert_eq!(lost(&rx), 0);
    let got = by_sender(&rx_london);
    assert_eq!(got.get("alice"), Some(&a), "london: alice's once, in order");
    let survivor = pa.as_ref().or(pb.as_ref()).expect("one left");
    let s = status(survivor);
    assert!(injecting(&s, "room1"), "took over: {}", s["site"]);
    drop(dl);
}

/// nats-server restarted during a burst of 1,000 messages: at the far site every message is
/// delivered once, or reported lost, and counted.
#[test]
fn nats_restarted_during_a_burst_loses_nothing_silently() {
    require_netns();
    let dir = TempDir::new();
    let mut nats = Nats::start(None, "n1", 24321, &[]);
    let url = vec!["nats://127.0.0.1:24321".to_owned()];
    let (paris, london, dp, dl) = two_sites(&dir, 2451, "", &url, &url);
    status_until(&dl, "lease", |s| injecting(s, "room1"));
    let rx = listener("rx-london", &london, "room1", &[]);
    let mut alice = sender(&paris, "room1", "alice", &[]);
    const N: usize = 1000;
    let pace = Pace::new(Duration::from_millis(2));
    for i in 0..N {
        pace.until(i as u64);
        alice.say(&format!("m{:04}", i + 1));
        if i == N / 2 {
            nats.restart();
        }
    }
    let want = texts("m", N);
    // Each message arrives or is reported lost; wait for the last one, then for the counts
    // to add up.
    let deadline = Instant::now() + WAIT * 2;
    loop {
        let got = by_sender(&rx).remove("alice").unwrap_or_default();
        if got.len() as u64 + lost(&rx) >= N as u64 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = by_sender(&rx).remove("alice").unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    assert!(got.iter().all(|t| seen.insert(t.clone())), "each once");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order");
    assert_eq!(
        got.len() as u64 + lost(&rx),
        N as u64,
        "delivered {} + reported lost {}",
        got.len(),
        lost(&rx)
    );
    eprintln!(
        "restart during the burst: {} of {N} delivered, {} reported lost",
        got.len(),
        lost(&rx)
    );
    assert!(want.iter().filter(|w| got.contains(w)).count() == got.len());
    drop((dp, dl));
}

/// A three-node NATS cluster; the node the sending site is connected to is killed mid-chat.
/// The site reconnects to another node and nothing is lost.
#[test]
fn a_cluster_node_dies_and_the_site_carries_on_without_loss() {
    require_netns();
    let dir = TempDir::new();
    let ports = [24331u16, 24332, 24333];
    let cluster = [26331u16, 26332, 26333];
    let routes = cluster
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes: Vec<Option<Nats>> = (0..3)
        .map(|i| {
            let extra = [
                "--cluster_name".to_owned(),
                "mcchat".to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{}", cluster[i]),
                "--routes".to_owned(),
                routes.clone(),
            ];
            Some(Nats::start(None, &format!("n{i}"), ports[i], &extra))
        })
        .collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect();
    let replicated = "replicas = 3";

    // Paris is given the first node; london the others.
    let (paris, london, dp, dl) = two_sites(&dir, 2461, replicated, &urls[..1], &urls[1..]);
    status_until(&dl, "lease", |s| injecting(s, "room1"));
    let rx = listener("rx-london", &london, "room1", &[]);
    let mut alice = sender(&paris, "room1", "alice", &[]);
    const N: usize = 300;
    let pace = Pace::new(Duration::from_millis(10));
    for i in 0..N {
        pace.until(i as u64);
        alice.say(&format!("m{:04}", i + 1));
        if i == N / 3 {
            nodes[0] = None; // the node paris is connected to
        }
    }
    let want = texts("m", N);
    // The cluster elects new leaders for the stream and the bucket first (6-11 s seen
    // here): a longer cap than one line's.
    for w in &want {
        assert!(
            rx.out_within(&format!("\"{w}\""), 4 * WAIT).is_some(),
            "{w} never arrived:\n{}",
            rx.stdout().join("\n")
        );
    }
    let got = by_sender(&rx).remove("alice").unwrap_or_default();
    assert_eq!(got, want, "once, in order, nothing lost");
    let s = status_until(&dp, "reconnected", |s| s["site"]["connected"] == true);
    assert_ne!(s["site"]["server"], "127.0.0.1:24331", "{}", s["site"]);
    drop((dp, dl, nodes));
}

/// A site's link is down for longer than the stream's duplicate window, then back: what it
/// missed comes from the stream, once (or would be reported lost, once).
#[test]
fn a_link_down_longer_than_the_duplicate_window_is_repaired_once() {
    require_netns();
    let dir = TempDir::new();
    let _nats = Nats::start(None, "n1", 24341, &[]);
    // London reaches NATS through a proxy that is stopped for a while: its link goes down.
    let proxy = || {
        // One connection (no fork): stopping socat cuts it.
        let mut cmd = Command::new("socat");
        cmd.args([
            "-d",
            "-d",
            "TCP-LISTEN:24342,bind=127.0.0.1,reuseaddr",
            "TCP:127.0.0.1:24341",
        ]);
        let p = Proc::spawn("socat", cmd);
        p.expect_err("listening on");
        p
    };
    let mut link = Some(proxy());
    let window = "duplicate_window = \"2s\"";
    let (paris, london, dp, dl) = two_sites(
        &dir,
        2471,
        window,
        &["nats://127.0.0.1:24341".to_owned()],
        &["nats://127.0.0.1:24342".to_owned()],
    );
    status_until(&dl, "lease", |s| injecting(s, "room1"));
    let rx = listener("rx-london", &london, "room1", &[]);
    let mut alice = sender(&paris, "room1", "alice", &[]);
    const N: usize = 60;
    for i in 0..N {
        if i == 20 {
            link = None;
            status_until(&dl, "link down", |s| s["site"]["connected"] == false);
        }
        if i == 40 {
            // Down for longer than the duplicate window.
            std::thread::sleep(Duration::from_secs(3));
            link = Some(proxy());
        }
        alice.say(&format!("m{:04}", i + 1));
        std::thread::sleep(Duration::from_millis(20));
    }
    let want = texts("m", N);
    expect_all(&rx, &want);
    let got = by_sender(&rx).remove("alice").unwrap_or_default();
    assert_eq!(got, want, "once, in order");
    assert_eq!(lost(&rx), 0);
    let s = status(&dl);
    assert!(
        s["site"]["disconnects"].as_u64() >= Some(1),
        "{}",
        s["site"]
    );
    drop((link, dp, dl));
}

/// A misconfigured daemon re-publishes everything it hears, as is, as its own site, with its
/// tags stripped, or with the hop count raised: nothing is shown twice anywhere, and no
/// daemon publishes more than what was said at its site.
#[test]
fn a_loop_attempt_shows_nothing_twice_and_traffic_does_not_grow() {
    require_netns();
    let dir = TempDir::new();
    let _nats = Nats::start(None, "n1", 24351, &[]);
    let url = vec!["nats://127.0.0.1:24351".to_owned()];
    let (paris, london, dp, dl) = two_sites(&dir, 2481, "", &url, &url);
    for d in [&dp, &dl] {
        status_until(d, "lease", |s| injecting(s, "room1"));
    }
    let (rogue_ready, ready) = std::sync::mpsc::channel();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rogue = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || rogue("nats://127.0.0.1:24351", &rogue_ready, &stop))
    };
    ready.recv_timeout(WAIT).expect("the rogue subscribed");
    let rx_p = listener("rx-paris", &paris, "room1", &[]);
    let rx_l = listener("rx-london", &london, "room1", &[]);
    let mut alice = sender(&paris, "room1", "alice", &[]);
    let mut bob = sender(&london, "room1", "bob", &[]);
    const N: usize = 50;
    for i in 0..N {
        alice.say(&format!("a{:04}", i + 1));
        bob.say(&format!("b{:04}", i + 1));
    }
    let (a, b) = (texts("a", N), texts("b", N));
    for rx in [&rx_p, &rx_l] {
        expect_all(rx, &a);
        expect_all(rx, &b);
    }
    // What the rogue sent has arrived too: both daemons dropped its copies.
    let copies = 4 * 2 * N as u64;
    for d in [&dp, &dl] {
        status_until(d, "the rogue's copies", |s| {
            s["site"]["duplicates"].as_u64().unwrap_or(0)
                + s["site"]["own"].as_u64().unwrap_or(0)
                + s["counters"]["dropped"]["site_no_origin"]
                    .as_u64()
                    .unwrap_or(0)
                + s["counters"]["dropped"]["site_hops"].as_u64().unwrap_or(0)
                >= copies / 2
        });
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let republished = rogue.join().expect("rogue");
    assert!(
        republished >= copies,
        "the rogue re-published {republished}"
    );
    for rx in [&rx_p, &rx_l] {
        let got = by_sender(rx);
        assert_eq!(got.get("alice"), Some(&a), "{}: once", rx.label);
        assert_eq!(got.get("bob"), Some(&b), "{}: once", rx.label);
    }
    // Each daemon published what its site said (messages and presence), not the copies.
    for d in [&dp, &dl] {
        let s = status(d);
        let published = s["site"]["published"].as_u64().unwrap_or(0);
        assert!(published < 2 * N as u64, "{}", s["site"]);
    }
}

/// The rogue: subscribes to every room and re-publishes each message four ways. Returns how
/// many it published.
fn rogue(
    url: &str,
    ready: &std::sync::mpsc::Sender<()>,
    stop: &std::sync::atomic::AtomicBool,
) -> u64 {
    use futures_util::StreamExt as _;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = async_nats::ConnectOptions::new()
            .no_echo()
            .connect(url)
            .await
            .expect("rogue connects");
        let mut sub = client
            .subscribe("mcchat.v1.room.>")
            .await
            .expect("rogue subscribes");
        client.flush().await.expect("flush");
        let _ = ready.send(());
        let mut n = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await
            else {
                continue;
            };
            let text = String::from_utf8_lossy(&m.payload).into_owned();
            let Some((tags, rest)) = text.strip_prefix('@').and_then(|t| t.split_once(' ')) else {
                continue;
            };
            let e2e: Vec<&str> = tags
                .split(';')
                .filter(|t| !t.starts_with("site=") && !t.starts_with("hops="))
                .collect();
            let e2e = e2e.join(";");
            for copy in [
                text.clone(),
                format!("@site=rogue;hops=2;{e2e} {rest}"),
                format!("@{e2e} {rest}"),
                format!("@site=rogue;hops=9;{e2e} {rest}"),
            ] {
                let _ = client.publish(m.subject.clone(), copy.into()).await;
                n += 1;
            }
        }
        let _ = client.flush().await;
        n
    })
}

/// The layout the README recommends: a hub with JetStream, and one leaf node per site
/// without it. Each site's daemon talks only to its leaf; the sites chat both ways, and the
/// leases and the stream (at the hub) work through the leaves.
#[test]
fn sites_on_leaf_nodes_of_a_hub_share_its_jetstream() {
    require_netns();
    let dir = TempDir::new();
    let store = dir.path().join("hub-store");
    let hub_conf = dir.write(
        "hub.conf",
        &format!(
            "server_name: hub\nlisten: 127.0.0.1:24361\njetstream {{\n  store_dir: \"{}\"\n  domain: hub\n}}\nleafnodes {{\n  listen: 127.0.0.1:27422\n}}\n",
            store.display()
        ),
    );
    let leaf = |name: &str, port: u16| {
        dir.write(
            &format!("{name}.conf"),
            &format!(
                "server_name: {name}\nlisten: 127.0.0.1:{port}\nleafnodes {{\n  remotes = [ {{ url: \"nats-leaf://127.0.0.1:27422\" }} ]\n}}\n"
            ),
        )
    };
    let server = |conf: &str, ready: &str| {
        let mut cmd = Command::new("nats-server");
        cmd.args(["-c", conf]);
        let p = Proc::spawn("nats-server", cmd);
        p.expect_err(ready);
        p
    };
    let _hub = server(&hub_conf, "Server is ready");
    let (lp, ll) = (leaf("leafp", 24362), leaf("leafl", 24363));
    // A leaf is of use once its connection to the hub is up.
    let _leaf_p = server(&lp, "Leafnode connection created");
    let _leaf_l = server(&ll, "Leafnode connection created");
    let (paris, london, dp, dl) = two_sites(
        &dir,
        2491,
        "domain = \"hub\"",
        &["nats://127.0.0.1:24362".to_owned()],
        &["nats://127.0.0.1:24363".to_owned()],
    );
    for d in [&dp, &dl] {
        let s = status_until(d, "lease", |s| injecting(s, "room1"));
        assert_eq!(s["site"]["jetstream"], true, "{}", s["site"]);
    }
    let rx_p = listener("rx-paris", &paris, "room1", &[]);
    let rx_l = listener("rx-london", &london, "room1", &[]);
    let mut alice = sender(&paris, "room1", "alice", &[]);
    let mut bob = sender(&london, "room1", "bob", &[]);
    const N: usize = 20;
    for i in 0..N {
        alice.say(&format!("a{:04}", i + 1));
        bob.say(&format!("b{:04}", i + 1));
    }
    let (a, b) = (texts("a", N), texts("b", N));
    expect_all(&rx_l, &a);
    expect_all(&rx_p, &b);
    assert_eq!(by_sender(&rx_l).get("alice"), Some(&a));
    assert_eq!(by_sender(&rx_p).get("bob"), Some(&b));
}

/// An mcchatd of `site` bridged through `nats`, not waited on for its link (it may never
/// have one).
fn unlinked_daemon(rooms: &str, site: &str, nats: &str) -> Proc {
    Proc::daemon(
        None,
        &[
            "--rooms",
            rooms,
            "--listen",
            "127.0.0.1:0",
            "--status-socket",
            "",
            "--site",
            site,
            "--nats",
            nats,
        ],
    )
}

/// A daemon whose login (`sites`) the server refuses: never connected, and status says why.
fn refused_login(dir: &TempDir, base: u16, sites: &str, nats: &str) {
    let rooms = lo_rooms(dir, "rome", base, &["room1"], sites);
    let d = unlinked_daemon(&rooms, "rome", nats);
    let s = status_until(&d, "the login's error", |s| {
        !s["site"]["last_error"].is_null()
    });
    assert_eq!(s["site"]["connected"], false, "{}", s["site"]);
    let error = s["site"]["last_error"]
        .as_str()
        .unwrap_or("")
        .to_lowercase();
    assert!(error.contains("auth"), "{error}");
}

/// A daemon started while its NATS server is not there serves its LAN at once, and links
/// up when the server comes, logging in with the token the server asks for; a daemon with
/// the wrong token says so in `mcchat status`.
#[test]
fn a_daemon_serves_its_lan_while_nats_is_down_and_links_up_with_its_token() {
    require_netns();
    let dir = TempDir::new();
    let token = "token = \"s3cret-t0ken\"";
    let paris = lo_rooms(&dir, "paris", 2501, &["room1"], token);
    let london = lo_rooms(&dir, "london", 2502, &["room1"], token);
    let url = "nats://127.0.0.1:24371".to_owned();
    let dp = unlinked_daemon(&paris, "paris", &url);
    let via = relay_addr(&dp).to_string();
    // The LAN is served meanwhile: a --via client and a peer chat through the daemon.
    let rx_via = listener("rx-via", &paris, "room1", &["--via", &via]);
    let mut alice = sender(&paris, "room1", "alice", &[]);
    alice.say("before nats");
    rx_via.expect_out("\"before nats\"");
    assert_eq!(status(&dp)["site"]["connected"], false);
    let _nats = Nats::start(
        None,
        "n1",
        24371,
        &["--auth".to_owned(), "s3cret-t0ken".to_owned()],
    );
    reading(&dp, &["room1"]);
    let dl = site_daemon(
        &london,
        "london",
        std::slice::from_ref(&url),
        &["room1"],
        &[],
    );
    status_until(&dl, "lease", |s| injecting(s, "room1"));
    status_until(&dp, "lease", |s| injecting(s, "room1"));
    let rx = listener("rx-paris", &paris, "room1", &[]);
    let mut bob = sender(&london, "room1", "bob", &[]);
    bob.say("after nats");
    rx.expect_out("\"after nats\"");
    rx_via.expect_out("\"after nats\"");
    // The wrong token: connected never, and the reason in status.
    refused_login(&dir, 2503, "token = \"wrong\"", &url);
}

/// Runs `openssl ARGS` in `dir`, which must succeed.
fn openssl(dir: &TempDir, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir.path())
        .output()
        .expect("openssl (scripts/deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server that asks for TLS and a user with a password: a daemon given the CA and the
/// login links up (JetStream and its lease); one with the wrong password says why.
#[test]
fn a_daemon_logs_in_with_a_user_and_password_over_tls() {
    require_netns();
    let dir = TempDir::new();
    // A CA, and a server certificate for 127.0.0.1 signed by it.
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=mcchat test CA",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    dir.write(
        "ext.cnf",
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    );
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    );
    let path = |f: &str| dir.path().join(f).display().to_string();
    let _nats = Nats::start(
        None,
        "n1",
        24381,
        &[
            "--tls",
            "--tlscert",
            &path("srv.pem"),
            "--tlskey",
            &path("srv.key"),
            "--user",
            "mcchat",
            "--pass",
            "s3cret",
        ]
        .map(str::to_owned),
    );
    let url = vec!["tls://127.0.0.1:24381".to_owned()];
    let login = |password: &str| {
        format!(
            "user = \"mcchat\"\npassword = \"{password}\"\ntls = {{ required = true, ca = \"{}\" }}",
            path("ca.pem")
        )
    };
    let paris = lo_rooms(&dir, "paris", 2511, &["room1"], &login("s3cret"));
    let dp = site_daemon(&paris, "paris", &url, &["room1"], &[]);
    let s = status_until(&dp, "lease", |s| injecting(s, "room1"));
    assert_eq!(
        (&s["site"]["connected"], &s["site"]["jetstream"]),
        (&serde_json::json!(true), &serde_json::json!(true)),
        "{}",
        s["site"]
    );
    refused_login(&dir, 2512, &login("wrong"), &url[0]);
}
