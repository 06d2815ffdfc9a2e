//! mcchatd and `mcchat --via`: the real daemon and the real peers over real sockets.

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use mcchat_core::room::{RoomName, derive_group};
use mcchat_core::wire::{self, Kind};
use nix::sys::signal::Signal;

use crate::handmade::{Raw, forge, in_netns, spoofed};
use crate::util::{Lan, Proc, TempDir, WAIT, daemon_bin, local_daemon, require_netns, run, unique};

fn status(addr: SocketAddr) -> serde_json::Value {
    let (st, out, err) = run(&["status", "--via", &addr.to_string(), "--json"], &[]);
    assert!(st.success(), "{err}");
    serde_json::from_str(&out).unwrap()
}

fn group_hex(group: SocketAddr) -> String {
    let SocketAddr::V4(g) = group else {
        panic!("{group}")
    };
    format!("{:08X}", u32::from_ne_bytes(g.ip().octets()))
}

fn igmp_has(group: SocketAddr) -> bool {
    std::fs::read_to_string("/proc/net/igmp")
        .unwrap()
        .contains(&group_hex(group))
}

#[test]
fn via_and_direct_peers_chat_both_ways_without_duplicates() {
    require_netns();
    let (_d, addr) = local_daemon(&[]);
    let via = addr.to_string();
    let room = unique("relay");
    let mut direct =
        Proc::mcchat("direct", None, &["join", &room, "--name", "direct"], &[]).ready();
    let mut remote = Proc::mcchat(
        "remote",
        None,
        &["join", &room, "--name", "remote", "--via", &via],
        &[],
    )
    .ready();
    let listener =
        Proc::mcchat("remote2", None, &["listen", &room, "--via", &via], &[]).listening();
    direct.expect_out("-- remote joined");
    direct.say("from the lan");
    remote.expect_out("direct: from the lan");
    listener.expect_out("direct: from the lan");
    remote.say("from afar");
    direct.expect_out("remote: from afar");
    listener.expect_out("remote: from afar");
    // Everyone leaves; then every line is in, and none is there twice.
    remote.close_stdin();
    assert!(remote.wait().success());
    direct.expect_out("-- remote left");
    listener.expect_out("-- remote left");
    direct.close_stdin();
    assert!(direct.wait().success());
    listener.expect_out("-- direct left");
    let count = |p: &Proc, needle: &str| p.stdout().iter().filter(|l| l.contains(needle)).count();
    assert_eq!(
        count(&remote, "direct: from the lan"),
        1,
        "{:?}",
        remote.stdout()
    );
    assert_eq!(
        count(&remote, "from afar"),
        0,
        "own message echoed: {:?}",
        remote.stdout()
    );
    assert_eq!(
        count(&direct, "remote: from afar"),
        1,
        "{:?}",
        direct.stdout()
    );
    assert_eq!(
        count(&listener, "direct: from the lan"),
        1,
        "{:?}",
        listener.stdout()
    );
    assert_eq!(
        count(&listener, "remote: from afar"),
        1,
        "{:?}",
        listener.stdout()
    );
    let s = status(addr);
    assert!(
        s["counters"]["own_forwards_ignored"].as_u64().unwrap() >= 1,
        "{s}"
    );
}

/// The kernel's view (/proc/net/igmp) follows the subscribers: joined with the first,
/// kept while any remains, left when the last unsubscribes or its lease runs out.
#[test]
fn group_membership_follows_subscribers() {
    require_netns();
    let (d, addr) = local_daemon(&["--lease-secs", "5"]);
    let room = unique("memb");
    let group = derive_group(&RoomName::new(&room).unwrap());
    assert!(!igmp_has(group), "not joined before anyone subscribes");
    let mut a = Raw::new("127.0.0.1", addr);
    a.subscribe(&room);
    d.expect_err(&format!("joined group room={room}"));
    assert!(igmp_has(group), "joined with the first subscriber");
    let mut b = Raw::new("127.0.0.1", addr);
    b.subscribe(&room);
    a.send(&a.request(Kind::Unsubscribe, &room, 0));
    d.expect_err(&format!("unsubscribed room={room}"));
    assert!(igmp_has(group), "still joined for the second subscriber");
    // b never renews: its 5 s lease runs out.
    d.expect_err(&format!("subscription expired room={room}"));
    d.expect_err(&format!("left group room={room}"));
    assert!(!igmp_has(group), "left when the last lease ran out");
}

#[test]
fn challenge_is_never_larger_than_the_request() {
    require_netns();
    let (_d, addr) = local_daemon(&[]);
    let room = unique("amp");
    let mut c = Raw::new("127.0.0.1", addr);
    // Too small to carry a challenge: no answer at all.
    let small = c.request(Kind::Subscribe, &room, 0);
    c.send(&small);
    let padded = c.request(Kind::Subscribe, &room, wire::MIN_RELAY_REQUEST);
    c.send(&padded);
    let challenge = c.expect(Kind::Challenge);
    assert!(
        challenge.len() <= padded.len(),
        "{} > {}",
        challenge.len(),
        padded.len()
    );
    assert!(c.nothing_queued(), "the small request was answered");
    // A forged cookie gets another challenge, no subscription.
    c.cookie = Some("1.000000000000000000000000".into());
    let forged = c.request(Kind::Subscribe, &room, wire::MIN_RELAY_REQUEST);
    c.send(&forged);
    let again = c.expect(Kind::Challenge);
    assert!(again.len() <= forged.len());
    let s = status(addr);
    assert_eq!(s["counters"]["dropped"]["request_too_small"], 1, "{s}");
    assert_eq!(s["subscribers"], 0, "{s}");
    assert_eq!(s["counters"]["challenges"], 2, "{s}");
    c.subscribe(&room);
    assert_eq!(status(addr)["subscribers"], 1);
}

#[test]
fn rate_limits_hold_per_source() {
    require_netns();
    let dir = TempDir::new();
    let rooms = dir.write("rooms.toml", "[daemon]\nrelay_rate = 1\nrelay_burst = 20\n");
    let (_d, addr) = local_daemon(&["--rooms", &rooms]);
    let room = unique("rate");
    let l = Proc::mcchat("listener", None, &["listen", &room], &[]).listening();
    let flood = UdpSocket::bind("127.0.0.2:0").unwrap();
    for i in 0..200 {
        flood
            .send_to(format!("{room}|flood|n{i}").as_bytes(), addr)
            .unwrap();
    }
    let marker = UdpSocket::bind("127.0.0.3:0").unwrap();
    marker
        .send_to(format!("{room}|ok|marker").as_bytes(), addr)
        .unwrap();
    l.expect_out("ok: marker");
    let got = l.stdout().iter().filter(|l| l.contains("flood: ")).count();
    // The burst of 20, plus a token for each second the sending took.
    assert!(
        (20..=25).contains(&got),
        "{got} of 200 flooded datagrams relayed"
    );
    let s = status(addr);
    let limited = s["counters"]["dropped"]["rate_limited"].as_u64().unwrap();
    assert!(limited >= 170, "{s}");
}

/// Issue 11: 38,920-46,960 of 50,000 datagrams forged from made-up sources were relayed in
/// under a second, each fanned out to every subscriber. Unproven sources now share one
/// budget (burst 100, 50/s), while `mcchat send --via`, which proves its address with one
/// round trip, is relayed under its own; a bare datagram from `nc` still reaches the room.
#[test]
fn forged_sources_share_one_small_budget_and_send_via_is_not_in_it() {
    require_netns();
    let (_d, addr) = local_daemon(&[]);
    let via = addr.to_string();
    let room = unique("unproven");
    let l = Proc::mcchat("listener", None, &["listen", &room, "--via", &via], &[]).listening();
    // A bare datagram, as `nc` sends it: relayed.
    let nc = UdpSocket::bind("127.0.0.9:0").unwrap();
    nc.send_to(format!("{room}|nc|hello from nc").as_bytes(), addr)
        .unwrap();
    l.expect_out("nc: hello from nc");
    // 50,000 forged from 250 made-up loopback sources (200 each, within each one's share).
    let socks: Vec<UdpSocket> = (0..250)
        .map(|i| UdpSocket::bind(format!("127.0.{}.{}:0", 30 + i / 250, 1 + i % 250)).unwrap())
        .collect();
    let started = Instant::now();
    for i in 0..50_000usize {
        let _ = socks[i % socks.len()].send_to(format!("{room}|forged|f{i}").as_bytes(), addr);
    }
    // Proven: relayed however the forged flood went.
    let (st, _, err) = run(
        &["send", &room, "--via", &via, "--name", "carol", "proven"],
        &[],
    );
    assert!(st.success(), "{err}");
    l.expect_out("carol: proven");
    let secs = started.elapsed().as_secs_f64();
    let forged = l.stdout().iter().filter(|x| x.contains("forged: ")).count();
    // The burst (less what nc used) and 50 a second since.
    let most = 100 + (50.0 * (secs + 1.0)).ceil() as usize;
    eprintln!("{forged} of 50,000 forged datagrams relayed in {secs:.2} s (at most {most})");
    assert!(forged <= most, "{forged} forged relayed in {secs:.2} s");
    let s = status(addr);
    let c = &s["counters"];
    let over = c["dropped"]["unproven_over_budget"].as_u64().unwrap_or(0);
    let received = c["received_unicast"].as_u64().unwrap();
    eprintln!(
        "received_unicast {received}, unproven_over_budget {over}, relayed_unproven {}",
        c["relayed_unproven"]
    );
    assert!(
        c["relayed_unproven"].as_u64().unwrap() <= most as u64 + 1,
        "{s}"
    );
    // Whatever the socket buffers dropped, what arrived was mostly refused.
    assert!(over + 1 + most as u64 >= received.saturating_sub(10), "{s}");
}

#[test]
fn malformed_flood_does_not_stop_service() {
    require_netns();
    let (_d, addr) = local_daemon(&[]);
    let room = unique("flood");
    let l = Proc::mcchat(
        "listener",
        None,
        &["listen", &room, "--via", &addr.to_string()],
        &[],
    )
    .listening();
    let bad = UdpSocket::bind("127.0.0.4:0").unwrap();
    let good = UdpSocket::bind("127.0.0.5:0").unwrap();
    let garbage: [&[u8]; 5] = [
        b"\xff\xfe",
        b"no fields",
        b"@x",
        b"room|\x07|t",
        &[b'y'; 1400],
    ];
    // Good datagrams all through the flood: service goes on during it, not just after.
    for i in 0..20_000 {
        let _ = bad.send_to(garbage[i % garbage.len()], addr);
        if i % 2000 == 0 {
            good.send_to(format!("{room}|good|during {i}").as_bytes(), addr)
                .unwrap();
        }
    }
    // The kernel may drop some of them while the daemon's socket is full; most get through.
    let mut seen = 0;
    for i in (0..20_000).step_by(2000) {
        if l.out_within(&format!("good: during {i}"), Duration::from_millis(500))
            .is_some()
        {
            seen += 1;
        }
    }
    assert!(
        seen >= 5,
        "only {seen} of 10 good datagrams relayed during the flood"
    );
    // And after it, every one (retried a bounded number of times in case the queue is full).
    let mut after = false;
    for i in 0..20 {
        good.send_to(format!("{room}|good|after {i}").as_bytes(), addr)
            .unwrap();
        if l.out_within(&format!("good: after {i}"), Duration::from_millis(500))
            .is_some()
        {
            after = true;
            break;
        }
    }
    assert!(after, "nothing relayed after the flood");
    let s = status(addr);
    let dropped: u64 = s["counters"]["dropped"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(dropped > 1000, "{s}");
}

#[test]
fn reload_adds_and_removes_rooms_and_keeps_the_old_file_on_error() {
    require_netns();
    let dir = TempDir::new();
    let port = 30000 + std::process::id() % 20000;
    let write = |text: &str| dir.write("rooms.toml", text);
    let rooms = write(&format!(
        "[rooms.olda]\ngroup = \"239.255.63.1\"\nport = {port}\n"
    ));
    let (mut d, addr) = local_daemon(&["--rooms", &rooms, "--no-adhoc-rooms"]);
    let mut c = Raw::new("127.0.0.1", addr);
    c.subscribe("olda");
    d.expect_err("joined group room=olda");
    write(&format!(
        "[rooms.newb]\ngroup = \"239.255.63.2\"\nport = {port}\nkeep = true\n"
    ));
    d.signal(Signal::SIGHUP);
    let closed = c.expect(Kind::Closed);
    assert!(String::from_utf8_lossy(&closed).ends_with("|room removed"));
    d.expect_err("left group room=olda");
    d.expect_err("joined group room=newb");
    d.expect_err("reloaded");
    let s = status(addr);
    assert_eq!(
        s["joined_groups"],
        serde_json::json!([format!("239.255.63.2:{port}")]),
        "{s}"
    );
    write("[rooms.broken]\ngroup = \"10.0.0.1\"\n");
    d.signal(Signal::SIGHUP);
    let line = d.expect_err("reload failed");
    assert!(
        line.contains("not a multicast address") || line.contains("missing field"),
        "{line}"
    );
    let s = status(addr);
    assert_eq!(
        s["joined_groups"],
        serde_json::json!([format!("239.255.63.2:{port}")]),
        "{s}"
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait().success());
    d.expect_err("stopped");
}

#[test]
fn shutdown_tells_subscribers_and_exits_0() {
    require_netns();
    let (mut d, addr) = local_daemon(&[]);
    let room = unique("stop");
    let mut c = Raw::new("127.0.0.1", addr);
    c.subscribe(&room);
    let started = Instant::now();
    d.signal(Signal::SIGTERM);
    let closed = c.expect(Kind::Closed);
    assert!(String::from_utf8_lossy(&closed).ends_with("|mcchatd is stopping"));
    assert!(d.wait().success());
    // Reported, not asserted: speed belongs in benchmarks.
    eprintln!("mcchatd stopped {:?} after SIGTERM", started.elapsed());
    d.expect_err(&format!("left group room={room}"));
}

#[test]
fn systemd_notifications_are_sent() {
    require_netns();
    let dir = TempDir::new();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut cmd = std::process::Command::new(daemon_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--status-socket", ""])
        .env("MCCHAT_ROOMS", crate::util::shipped_rooms())
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "200000");
    let mut d = Proc::spawn("mcchatd", cmd);
    let next = |want: &str| loop {
        let mut buf = [0u8; 512];
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("waiting for {want}: {e}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.lines().any(|l| l == want) {
            return msg;
        }
        assert!(
            msg.contains("WATCHDOG=1"),
            "unexpected {msg:?} while waiting for {want}"
        );
    };
    let ready = next("READY=1");
    assert!(ready.contains("STATUS="), "{ready}");
    d.expect_err("mcchatd ready");
    next("WATCHDOG=1");
    d.signal(Signal::SIGHUP);
    let reloading = next("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    next("READY=1");
    d.signal(Signal::SIGTERM);
    next("STOPPING=1");
    assert!(d.wait().success());
}

/// 10,000 subscribers (the default cap) are accepted and all get a message; one more is
/// refused.
/// Issue 11: one local user with many loopback addresses and ports took all 10,000
/// subscriptions in 8 s. This host counts as one source now: 64 subscriptions, then
/// `closed` (too_many_from_source).
#[test]
fn one_local_user_cannot_take_every_subscription() {
    require_netns();
    let dir = TempDir::new();
    let rooms = dir.write(
        "rooms.toml",
        "[daemon]\nsubscribe_rate = 100000\nsubscribe_burst = 100000\n",
    );
    let (_d, addr) = local_daemon(&["--rooms", &rooms]);
    let room = unique("local");
    for i in 0..64 {
        Raw::new(&format!("127.0.{}.{}", 20 + i / 250, 1 + i % 250), addr).subscribe(&room);
    }
    let closed = Raw::new("127.3.2.1", addr).refused(&room);
    assert!(
        String::from_utf8_lossy(&closed).ends_with("too_many_from_source"),
        "{}",
        String::from_utf8_lossy(&closed)
    );
    let s = status(addr);
    assert_eq!(s["counters"]["subscribed"], 64, "{s}");
    assert_eq!(s["counters"]["dropped"]["too_many_from_source"], 1, "{s}");
}

#[test]
fn ten_thousand_subscribers_are_served() {
    require_netns();
    const N: usize = 10_000;
    let (soft, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let want = (N as u64 + 1000).min(hard);
    if soft < want {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, want, hard)
            .unwrap();
    }
    assert!(
        want >= N as u64 + 100,
        "the hard open-file limit {hard} is too low for this test"
    );
    let dir = TempDir::new();
    let rooms = dir.write(
        "rooms.toml",
        "[daemon]\nsubscribe_rate = 100000\nsubscribe_burst = 100000\n\
         max_subscriptions_per_source = 10000\n",
    );
    let (_d, addr) = local_daemon(&["--rooms", &rooms]);
    let room = unique("many");
    // 10,000 subscribers from 200 loopback addresses: this host counts as one source, whose
    // cap of 64 the file lifts (one_local_user_cannot_take_every_subscription has it on).
    let mut clients: Vec<Raw> = (0..N)
        .map(|i| {
            Raw::new(
                &format!("127.0.{}.{}", 10 + i / 50 / 250, 1 + (i / 50) % 250),
                addr,
            )
        })
        .collect();
    // In batches of 100: the daemon's receive buffer (capped by net.core.rmem_max, 208 KiB by
    // default) is not what this test is about.
    for batch in clients.chunks_mut(100) {
        for c in batch.iter() {
            c.send(&c.request(Kind::Subscribe, &room, wire::MIN_RELAY_REQUEST));
        }
        for c in batch.iter_mut() {
            let ch = c.expect(Kind::Challenge);
            c.cookie = Some(
                wire::decode(&ch)
                    .unwrap()
                    .tags
                    .get("cookie")
                    .unwrap()
                    .into_owned(),
            );
        }
        for c in batch.iter() {
            c.send(&c.request(Kind::Subscribe, &room, 0));
        }
        for c in batch.iter() {
            c.expect(Kind::Subscribed);
        }
    }
    let refused = Raw::new("127.0.0.1", addr).refused(&room);
    assert!(String::from_utf8_lossy(&refused).ends_with("|too_many_subscribers"));
    let (st, _, err) = run(&["send", &room, "--name", "bulk", "to everyone"], &[]);
    assert!(st.success(), "{err}");
    for c in &clients {
        let d = c.recv();
        assert!(String::from_utf8_lossy(&d).ends_with("|bulk|to everyone"));
    }
    let s = status(addr);
    assert_eq!(s["subscribers"], N, "{}", s["counters"]);
}

/// Across the LAN: hosts that do not use multicast chat with those that do, and the allow
/// list decides who may use the relay.
#[test]
fn via_clients_across_the_lan_and_the_allow_list() {
    require_netns();
    let lan = Lan::up();
    let _d1 = Proc::daemon(Some(&lan.ns("h1")), &["--status-socket", ""]);
    let room = unique("lanrelay");
    let mut direct = Proc::mcchat(
        "h2",
        Some(&lan.ns("h2")),
        &["join", &room, "--name", "h2"],
        &[],
    )
    .ready();
    let mut remote = Proc::mcchat(
        "h3",
        Some(&lan.ns("h3")),
        &["join", &room, "--name", "h3", "--via", "198.51.100.1"],
        &[],
    )
    .ready();
    direct.expect_out("-- h3 joined");
    direct.say("hello h3");
    remote.expect_out("h2: hello h3");
    remote.say("hello h2");
    direct.expect_out("h3: hello h2");
    // h4 is on the other segment: not a connected subnet of h1, so not allowed.
    let mut h4 = Proc::mcchat(
        "h4",
        Some(&lan.ns("h4")),
        &["listen", &room, "--via", "198.51.100.1"],
        &[],
    );
    assert_eq!(h4.wait().code(), Some(1));
    h4.expect_err("no answer from mcchatd at 198.51.100.1:5554");
    // A daemon on h3 that allows segment B serves h4.
    let _d3 = Proc::daemon(
        Some(&lan.ns("h3")),
        &[
            "--status-socket",
            "",
            "--allow",
            "connected",
            "--allow",
            "203.0.113.0/24",
        ],
    );
    let far = Proc::mcchat(
        "h4",
        Some(&lan.ns("h4")),
        &["listen", &room, "--via", "198.51.100.3"],
        &[],
    )
    .listening();
    direct.say("reaching the far segment");
    far.expect_out("h2: reaching the far segment");
    remote.close_stdin();
    assert!(remote.wait().success());
    direct.expect_out("-- h3 left");
    direct.close_stdin();
    assert!(direct.wait().success());
    let count = |p: &Proc, needle: &str| p.stdout().iter().filter(|l| l.contains(needle)).count();
    assert_eq!(count(&remote, "h2: hello h3"), 1, "{:?}", remote.stdout());
    assert_eq!(
        count(&remote, "hello h2"),
        0,
        "own message echoed: {:?}",
        remote.stdout()
    );
    assert_eq!(count(&direct, "h3: hello h2"), 1, "{:?}", direct.stdout());
    assert_eq!(
        count(&far, "h2: reaching the far segment"),
        1,
        "{:?}",
        far.stdout()
    );
}

#[test]
fn status_over_the_unix_socket_json_logs_and_check_config() {
    require_netns();
    let dir = TempDir::new();
    let sock = dir.path().join("mcchatd.sock").display().to_string();
    let d = Proc::daemon(
        None,
        &[
            "--listen",
            "127.0.0.1:0",
            "--status-socket",
            &sock,
            "--log-format",
            "json",
        ],
    );
    let first = d.expect_err("relaying on UDP");
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v["level"], "INFO", "{first}");
    let (st, out, err) = run(&["status", "--socket", &sock], &[]);
    assert!(st.success(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("mcchatd 0.1.0 up "), "{out}");
    assert!(lines[1].starts_with("ROOM "), "{out}");
    // History is on (the test's own state directory), so configured rooms are joined to
    // record them even with no subscribers.
    assert!(
        out.contains("room1                239.255.77.1:5555          yes    0"),
        "{out}"
    );
    assert!(
        out.contains("history: /") && out.contains("history.sqlite3 (0 not stored)"),
        "{out}"
    );
    assert!(out.contains("dropped: none"), "{out}");
    drop(d);

    let check = |rooms: &str| {
        let mut cmd = std::process::Command::new(daemon_bin());
        cmd.args(["--check-config", "--rooms", rooms]);
        crate::util::output(cmd)
    };
    let (st, out, err) = check(&crate::util::shipped_rooms());
    assert!(st.success(), "{err}");
    assert!(
        out.contains(": ok\nrooms: room1 239.255.77.1:5555, room2"),
        "{out}"
    );
    assert!(out.ends_with("\nsites: off\n"), "{out}");
    let bridged = dir.write(
        "sites.toml",
        "[sites]\nsite = \"paris\"\nnats = [\"nats://127.0.0.1:4222\"]\n",
    );
    let (st, out, err) = check(&bridged);
    assert!(st.success(), "{err}");
    assert!(
        out.ends_with(
            "\nsites: site paris through nats://127.0.0.1:4222, rooms: every configured room\n"
        ),
        "{out}"
    );
    let bad = dir.write("bad.toml", "[daemon]\nlease_secs = 1\n");
    let (st, _, err) = check(&bad);
    assert_eq!(st.code(), Some(1));
    assert_eq!(
        err,
        format!("mcchatd: {bad}: [daemon]: key `lease_secs`: 1 is out of range; use 5-3600\n")
    );
}

/// scripts/install.sh stages the binaries, the unit, the rooms file, the man page and
/// completions, and checks the configuration it installed.
#[test]
fn install_script_stages_everything() {
    let dir = TempDir::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bin_dir = std::path::Path::new(crate::util::bin())
        .parent()
        .unwrap()
        .to_owned();
    let o = std::process::Command::new("bash")
        .arg(root.join("scripts/install.sh"))
        .arg("--no-build")
        .env("DESTDIR", dir.path())
        .env("BIN_DIR", &bin_dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "usr/local/bin/mcchat",
        "usr/local/bin/mcchatd",
        "etc/mcchat/rooms.toml",
        "usr/local/share/man/man1/mcchat.1",
        "usr/local/share/bash-completion/completions/mcchat",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} not installed");
    }
    let unit =
        std::fs::read_to_string(dir.path().join("etc/systemd/system/mcchatd.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/local/bin/mcchatd --rooms /etc/mcchat/rooms.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "WatchdogSec=30s",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line:?}");
    }
    // A second install keeps an edited rooms file.
    std::fs::write(dir.path().join("etc/mcchat/rooms.toml"), "# edited\n").unwrap();
    let o = std::process::Command::new("bash")
        .arg(root.join("scripts/install.sh"))
        .arg("--no-build")
        .env("DESTDIR", dir.path())
        .env("BIN_DIR", &bin_dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("etc/mcchat/rooms.toml")).unwrap(),
        "# edited\n"
    );
    assert!(dir.path().join("etc/mcchat/rooms.toml.dist").is_file());
}

/// An IPv6 room through the daemon: its IPv6 relay socket sends to the IPv6 group, and an
/// IPv6 client is served too.
#[test]
fn ipv6_rooms_and_clients_are_relayed() {
    require_netns();
    let d = Proc::daemon(
        None,
        &[
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "[::1]:0",
            "--status-socket",
            "",
            // History would keep room6 joined from the start; this test watches the join.
            "--no-history",
        ],
    );
    let addrs: Vec<SocketAddr> = ["127.0.0.1", "[::1]"]
        .iter()
        .map(|ip| {
            let line = d.expect_err(&format!("bound={ip}:"));
            line.rsplit("bound=")
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    let direct = Proc::mcchat("direct6", None, &["listen", "room6"], &[]).listening();
    // /proc/net/igmp6 counts the sockets in the group: the daemon adds one while it relays.
    let group = "ff15000000000000000000006d630001";
    let before = igmp6_users(group);
    let mut via6 = Proc::mcchat(
        "via6",
        None,
        &["listen", "room6", "--via", &addrs[1].to_string()],
        &[],
    )
    .listening();
    let (st, _, err) = run(
        &[
            "send",
            "room6",
            "--name",
            "v4client",
            "--via",
            &addrs[0].to_string(),
            "over v4 to a v6 group",
        ],
        &[],
    );
    assert!(st.success(), "{err}");
    direct.expect_out("v4client: over v4 to a v6 group");
    via6.expect_out("v4client: over v4 to a v6 group");
    d.expect_err("joined group room=room6");
    assert_eq!(igmp6_users(group), before + 1, "the daemon joined (igmp6)");
    via6.signal(Signal::SIGTERM);
    assert!(via6.wait().success());
    d.expect_err("left group room=room6");
    assert_eq!(igmp6_users(group), before, "the daemon left (igmp6)");
}

#[test]
fn subscribe_requests_are_rate_limited_per_source() {
    require_netns();
    let (_d, addr) = local_daemon(&[]);
    let room = unique("subrate");
    let c = Raw::new("127.0.0.6", addr);
    for _ in 0..60 {
        c.send(&c.request(Kind::Subscribe, &room, wire::MIN_RELAY_REQUEST));
    }
    // Another source is not affected.
    let mut other = Raw::new("127.0.0.7", addr);
    other.subscribe(&room);
    let s = status(addr);
    let limited = s["counters"]["dropped"]["rate_limited"].as_u64().unwrap();
    let challenged = s["counters"]["challenges"].as_u64().unwrap() - 1;
    // Burst 20 at 10/s: about 20 answered, the rest dropped.
    assert!((20..=30).contains(&challenged), "{s}");
    assert_eq!(limited + challenged, 60, "{s}");
}

fn igmp6_users(group: &str) -> u32 {
    std::fs::read_to_string("/proc/net/igmp6")
        .unwrap()
        .lines()
        .filter(|l| l.contains(group))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u32>().ok())
        .sum()
}

/// A subscribe with a forged source (h3's address, sent from h2) is answered at h3 with no
/// more bytes than it carried; one too short to carry the answer is not answered at all.
#[test]
fn spoofed_subscribe_is_never_amplified() {
    require_netns();
    let lan = Lan::up();
    let _d = Proc::daemon(Some(&lan.ns("h1")), &["--status-socket", ""]);
    let daemon: SocketAddr = "198.51.100.1:5554".parse().unwrap();
    let victim = in_netns(&lan.ns("h3"), || UdpSocket::bind("198.51.100.3:0").unwrap());
    victim.set_read_timeout(Some(WAIT)).unwrap();
    let victim_addr = victim.local_addr().unwrap();
    let raw = in_netns(&lan.ns("h2"), || {
        socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(255)),
        )
        .unwrap()
    });
    let forge = Raw::new("127.0.0.1", daemon);
    let small = forge.request(Kind::Subscribe, "room1", 0);
    let padded = forge.request(Kind::Subscribe, "room1", wire::MIN_RELAY_REQUEST);
    for payload in [&small, &padded] {
        let packet = spoofed(victim_addr, daemon, payload);
        raw.send_to(&packet, &SocketAddr::new(daemon.ip(), 0).into())
            .unwrap();
    }
    let mut buf = [0u8; 2048];
    let (n, from) = victim
        .recv_from(&mut buf)
        .expect("the challenge reaches the forged source");
    assert_eq!(from, daemon);
    assert!(
        n <= padded.len(),
        "{n} bytes answered to a {}-byte request",
        padded.len()
    );
    assert_eq!(wire::decode(&buf[..n]).unwrap().meta.kind, Kind::Challenge);
    victim.set_nonblocking(true).unwrap();
    assert!(
        victim.recv_from(&mut buf).is_err(),
        "the short request was answered"
    );
    // No subscription came of it: a spoofer cannot answer the challenge.
    let st = Proc::mcchat(
        "status",
        Some(&lan.ns("h2")),
        &["status", "--via", "198.51.100.1", "--json"],
        &[],
    );
    let mut st = st;
    assert!(st.wait().success());
    let s: serde_json::Value = serde_json::from_str(&st.stdout().join("")).unwrap();
    assert_eq!(s["subscribers"], 0, "{s}");
    assert_eq!(s["counters"]["dropped"]["request_too_small"], 1, "{s}");
}

/// A subscriber's NACK that carries its subscription's cookie is answered from the daemon's
/// repair cache, by unicast. The same NACK without the cookie gets nothing back, whether from
/// an address that is not subscribed or from the subscriber's own address, as a forger on the
/// LAN would send it: its source could be forged, and the answer is far larger than the
/// question.
#[test]
fn nacks_are_answered_from_the_cache_only_with_the_subscriptions_cookie() {
    require_netns();
    let (d, addr) = local_daemon(&[]);
    let room = unique("nack");
    let mut sub = Raw::new("127.0.0.1", addr);
    sub.subscribe(&room);
    d.expect_err(&format!("joined group room={room}"));
    let mut alice = Proc::mcchat("alice", None, &["join", &room, "--name", "alice"], &[]).ready();
    for text in ["one", "two", "three"] {
        alice.say(text);
    }
    let id = loop {
        let data = sub.recv();
        let f = wire::decode(&data).unwrap();
        if f.text == "three" {
            break f.meta.instance.unwrap();
        }
    };
    alice.close_stdin();
    assert!(alice.wait().success());
    let bare = format!("@kind=nack;for={id};seqs=1-3 {room}|raw|");
    let cookie = sub.cookie.clone().unwrap();
    let proven = format!("@cookie={cookie};kind=nack;for={id};seqs=1-3 {room}|raw|");
    let stranger = Raw::new("127.0.0.2", addr);
    // The bare ones first; the daemon handles datagrams in order, so by the time the
    // subscriber has its answer, any answer to them would be waiting too.
    stranger.send(bare.as_bytes());
    sub.send(bare.as_bytes());
    sub.send(proven.as_bytes());
    let mut repaired = Vec::new();
    while repaired.len() < 3 {
        let data = sub.recv();
        let f = wire::decode(&data).unwrap();
        assert!(f.tags.get("cookie").is_none(), "a cookie was passed on");
        if f.meta.kind == Kind::Message && f.tags.get("repair").as_deref() == Some("1") {
            assert_eq!(f.meta.instance, Some(id));
            repaired.push(f.text.to_owned());
        }
    }
    repaired.sort();
    assert_eq!(repaired, ["one", "three", "two"]);
    assert!(
        stranger.nothing_queued(),
        "a non-subscriber's NACK was answered"
    );
    assert!(
        sub.chat_queued().is_empty(),
        "a NACK without the cookie was answered"
    );
    let s = status(addr);
    assert_eq!(s["repair_cache"]["repairs_to_subscribers"], 3, "{s}");
    assert_eq!(s["counters"]["nacks_unproven"], 2, "{s}");
}

/// Issue 11's first row, the attack itself: NACKs forged with a subscriber's address and
/// port (from a raw socket) make the daemon send that subscriber nothing. Before, each was
/// answered from the repair cache, up to 128 messages, by unicast to the victim (x1430 in
/// bytes). The victim's own NACK, with its cookie, is still answered.
#[test]
fn nacks_forged_with_a_subscribers_address_reflect_nothing() {
    require_netns();
    let (d, addr) = local_daemon(&[]);
    let room = unique("reflect");
    let mut victim = Raw::new("127.0.0.1", addr);
    victim.subscribe(&room);
    d.expect_err(&format!("joined group room={room}"));
    let mut alice = Proc::mcchat("alice", None, &["join", &room, "--name", "alice"], &[]).ready();
    for i in 1..=20 {
        alice.say(&format!("{i:>200}"));
    }
    let id = loop {
        let f = victim.recv();
        let f = wire::decode(&f).unwrap();
        if f.text.trim_start() == "20" {
            break f.meta.instance.unwrap();
        }
    };
    alice.close_stdin();
    assert!(alice.wait().success());
    assert!(victim.chat_queued().is_empty());
    let nack = format!("@kind=nack;for={id};seqs=1-20 {room}|raw|");
    let victim_addr = victim.sock.local_addr().unwrap();
    let (mut sent, rounds) = (0, 20);
    for _ in 0..rounds {
        forge(victim_addr, addr, nack.as_bytes());
        sent += nack.len() + 8;
    }
    // The victim's own NACK for one message, after them: its answer comes after anything
    // the forged ones caused.
    let cookie = victim.cookie.clone().unwrap();
    let own = format!("@cookie={cookie};kind=nack;for={id};seqs=7 {room}|raw|");
    victim.send(own.as_bytes());
    let answer = victim.recv_chat();
    let f = wire::decode(&answer).unwrap();
    assert_eq!(
        (f.text.trim_start(), f.tags.get("repair").as_deref()),
        ("7", Some("1")),
        "the first datagram the victim gets is the answer to its own NACK"
    );
    assert!(
        victim.chat_queued().is_empty(),
        "nothing else reached the victim"
    );
    let s = status(addr);
    assert_eq!(s["counters"]["nacks_unproven"], rounds, "{s}");
    assert_eq!(s["repair_cache"]["repairs_to_subscribers"], 1, "{s}");
    // Received by the victim because of the attack: 0 bytes of `sent`.
    assert!(sent > 0);
}

/// Issue 11, on a LAN: an attacker on h2 forges 20,000 chat datagrams to the relay from
/// made-up addresses of the subnet (raw socket), and from the `--via` subscriber's own
/// address. Meanwhile the real clients are served: the subscriber on h3 keeps its
/// subscription, `mcchat send --via` from h3 reaches it, and status answers. What the
/// forgeries got relayed is the shared budget of unproven sources, whatever their number.
#[test]
fn a_forged_flood_from_another_host_gets_the_unproven_budget_and_clients_are_served() {
    require_netns();
    let lan = Lan::up();
    let _d = Proc::daemon(Some(&lan.ns("h1")), &["--status-socket", ""]);
    let daemon: SocketAddr = "198.51.100.1:5554".parse().unwrap();
    let room = unique("lanflood");
    let listener = Proc::mcchat(
        "h3",
        Some(&lan.ns("h3")),
        &["listen", &room, "--via", "198.51.100.1"],
        &[],
    )
    .listening();
    let raw = in_netns(&lan.ns("h2"), || {
        socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(255)),
        )
        .unwrap()
    });
    let started = Instant::now();
    for i in 0..20_000u32 {
        // Sources all over the subnet (h3's address among them), ports all over.
        let src = SocketAddr::from((
            [198, 51, 100, 3 + (i % 200) as u8],
            1024 + (i % 60_000) as u16,
        ));
        let payload = format!("{room}|forged|f{i}");
        let _ = raw.send_to(
            &spoofed(src, daemon, payload.as_bytes()),
            &SocketAddr::new(daemon.ip(), 0).into(),
        );
        if i == 10_000 {
            // Half-way: a real sender through the daemon, proven by its cookie.
            let mut carol = Proc::mcchat(
                "carol",
                Some(&lan.ns("h3")),
                &[
                    "send",
                    &room,
                    "--via",
                    "198.51.100.1",
                    "--name",
                    "carol",
                    "real",
                ],
                &[],
            );
            assert!(carol.wait().success(), "mcchat send --via during the flood");
        }
    }
    listener.expect_out("carol: real");
    let secs = started.elapsed().as_secs_f64();
    let mut st = Proc::mcchat(
        "status",
        Some(&lan.ns("h3")),
        &["status", "--via", "198.51.100.1", "--json"],
        &[],
    );
    assert!(st.wait().success(), "status is answered");
    let s: serde_json::Value = serde_json::from_str(&st.stdout().join("")).unwrap();
    assert_eq!(s["subscribers"], 1, "the subscription is kept: {s}");
    let forged = listener
        .stdout()
        .iter()
        .filter(|l| l.contains("forged: "))
        .count();
    let most = 100 + (50.0 * (secs + 1.0)).ceil() as usize;
    eprintln!(
        "{forged} of 20,000 forged datagrams reached the subscriber in {secs:.2} s (budget {most}); \
         counters {}",
        s["counters"]
    );
    assert!(forged <= most, "{forged} forged relayed in {secs:.2} s");
    assert!(
        s["counters"]["dropped"]["unproven_over_budget"]
            .as_u64()
            .unwrap_or(0)
            >= 10_000,
        "{s}"
    );
}
