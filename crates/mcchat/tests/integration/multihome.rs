//! mcchatd on a host with more than one address on its clients' network. A `--via` client's
//! socket is connected to the one address it was given, so it hears only datagrams from that
//! address: the daemon's answers and forwards must come from the address the client used,
//! whichever of the host's addresses that is (not the one the kernel would pick for a reply
//! from a wildcard socket). And a room whose port is the relay port, with a peer on the
//! daemon's own host, whose datagrams come from a local address and the relay port just as the
//! daemon's own forwards do.
//!
//! The LAN (scripts/lan.sh): mcchatd on h1, listening on the wildcards, with two IPv4 and two
//! IPv6 addresses on eth0 in a subnet of their own besides lan.sh's; the `--via` clients on h3
//! (an address of each family in that subnet; they use no multicast); a direct multicast peer
//! on h2, on the same bridge.

use crate::util::{Lan, Proc, TempDir, WAIT, json_messages, require_netns};

/// The daemon host's extra addresses. 10.77.0.1 is the subnet's primary address (the
/// kernel's source for replies into it), 10.77.0.2 a secondary one; the IPv6 ones are
/// equals, and the kernel's source for a reply is one of them.
const DAEMON_ADDRS: [&str; 4] = ["10.77.0.1/24", "10.77.0.2/24", "fd77::1/64", "fd77::2/64"];

/// The client host's addresses in the same subnets.
const CLIENT_ADDRS: [&str; 2] = ["10.77.0.3/24", "fd77::3/64"];

/// The LAN with the extra addresses on h1 (the daemon's host) and h3 (the clients').
fn multihome_lan() -> Lan {
    let lan = Lan::up();
    lan.add_addrs("h1", &DAEMON_ADDRS);
    lan.add_addrs("h3", &CLIENT_ADDRS);
    lan
}

/// mcchatd's default relay addresses, given explicitly since the wildcards are the point.
const WILDCARDS: [&str; 2] = ["0.0.0.0:5554", "[::]:5554"];

/// mcchatd on h1 relaying on `listen`, with `extra` flags. Started after the addresses are
/// added, so its connected subnets (the default allow list) include them.
fn daemon(lan: &Lan, listen: &[&str], extra: &[&str]) -> Proc {
    let mut args = vec!["--status-socket", ""];
    for l in listen {
        args.extend(["--listen", l]);
    }
    args.extend_from_slice(extra);
    Proc::daemon(Some(&lan.ns("h1")), &args)
}

/// Through the daemon at `addr` (one of h1's addresses), from h3: `send --via` reaches the
/// direct peer on h2; `listen --via` subscribes and hears the direct peer and the `join --via`
/// peer; `join --via` subscribes, hears the direct peer and is heard by it. Every message
/// exactly once, and no `--via` peer hears its own.
fn chat_via(addr: &str) {
    require_netns();
    let lan = multihome_lan();
    let d = daemon(&lan, &WILDCARDS, &[]);
    // History (on, in the test's own directory) keeps room1 joined from the start.
    d.expect_err("joined group room=room1");
    let room = "room1";
    let h3 = lan.ns("h3");
    let mut direct = Proc::mcchat(
        "h2 (direct)",
        Some(&lan.ns("h2")),
        &["join", room, "--name", "h2", "--history", "0"],
        &[],
    )
    .ready();

    // A one-shot send needs no answer from the daemon: only its forward to the group.
    let mut send = Proc::mcchat(
        &format!("h3 send --via {addr}"),
        Some(&h3),
        &[
            "send",
            room,
            "--name",
            "h3send",
            "--via",
            addr,
            "sent through the daemon",
        ],
        &[],
    );
    assert!(
        send.wait().success(),
        "mcchat send --via {addr} failed: {:?}",
        send.stderr_lines()
    );
    direct.expect_out("h3send: sent through the daemon");

    // Subscribing needs the daemon's answers (challenge, confirmation) to reach the client.
    let listener = Proc::mcchat(
        &format!("h3 listen --via {addr}"),
        Some(&h3),
        &["listen", room, "--json", "--via", addr],
        &[],
    )
    .listening();
    // --history 0: the daemon's history (over TCP) would replay the message sent above.
    let mut remote = Proc::mcchat(
        &format!("h3 join --via {addr}"),
        Some(&h3),
        &[
            "join",
            room,
            "--name",
            "h3",
            "--history",
            "0",
            "--via",
            addr,
        ],
        &[],
    )
    .ready();
    direct.expect_out("-- h3 joined");

    direct.say("from the lan");
    remote.expect_out("h2: from the lan");
    listener.expect_out("\"from the lan\"");
    remote.say("from afar");
    direct.expect_out("h3: from afar");
    listener.expect_out("\"from afar\"");

    // The --via peer leaves; the direct peer's last word, said once it has seen that, is the
    // listener's last line, so everything before it is in.
    remote.close_stdin();
    assert!(remote.wait().success(), "{:?}", remote.stderr_lines());
    direct.expect_out("-- h3 left");
    direct.say("last word");
    listener.expect_out("\"last word\"");
    direct.close_stdin();
    assert!(direct.wait().success(), "{:?}", direct.stderr_lines());

    let pair = |s: &str, t: &str| (s.to_owned(), t.to_owned());
    assert_eq!(
        json_messages(&listener),
        [
            pair("h2", "from the lan"),
            pair("h3", "from afar"),
            pair("h2", "last word"),
        ],
        "listen --via {addr}: each message exactly once, in order"
    );
    for (p, needle, want) in [
        (&direct, "h3send: sent through the daemon", 1),
        (&direct, "h3: from afar", 1),
        (&remote, "h2: from the lan", 1),
        // Its own message, echoed back by the daemon, would show here.
        (&remote, "from afar", 0),
        (&remote, "sent through the daemon", 0),
    ] {
        assert_eq!(
            p.count_out(needle),
            want,
            "{}: lines with {needle:?}: {:?}",
            p.label,
            p.stdout()
        );
    }
}

/// The subnet's primary address: the kernel's own choice of source for the daemon's replies.
#[test]
fn via_the_primary_ipv4_address() {
    chat_via("10.77.0.1");
}

/// A secondary address: a reply from the wildcard socket would leave from the primary one.
#[test]
fn via_a_secondary_ipv4_address() {
    chat_via("10.77.0.2");
}

/// Of IPv6 addresses that match the client's equally well, the kernel takes the one added last
/// (fd77::2) as the source of a reply from a wildcard socket; this is the other one.
#[test]
fn via_the_first_ipv6_address() {
    chat_via("fd77::1");
}

/// The kernel's own choice of source among the IPv6 addresses; given with the port, the other
/// form `--via` takes.
#[test]
fn via_the_second_ipv6_address() {
    chat_via("[fd77::2]:5554");
}

/// What `mcchat status --json` in `host`'s namespace says about the daemon at `daemon`.
fn daemon_status(lan: &Lan, host: &str, daemon: &str) -> serde_json::Value {
    let mut p = Proc::mcchat(
        "status",
        Some(&lan.ns(host)),
        &["status", "--via", daemon, "--json"],
        &[],
    );
    assert!(p.wait().success(), "{:?}", p.stderr_lines());
    serde_json::from_str(&p.stdout().concat()).unwrap()
}

/// A room whose port is the relay port, 5554, with mcchatd relaying on `listen`: a peer on
/// the daemon's own host (its datagrams come from one of the host's addresses and port 5554,
/// as the daemon's forwards do) and a `--via` peer on another host hear each other, each
/// message exactly once.
fn relay_port_room(listen: &[&str]) {
    require_netns();
    let lan = Lan::up();
    let dir = TempDir::new();
    let rooms = dir.write(
        "rooms.toml",
        "[rooms.relayport]\ngroup = \"239.255.77.9\"\nport = 5554\n\
         description = \"a room on mcchatd's relay port\"\n",
    );
    let d = daemon(&lan, listen, &["--rooms", &rooms]);
    // History keeps the configured room joined from the start, if it can be joined.
    let line = d.expect_err_any(&["joined group room=relayport", "cannot join group"]);
    assert!(
        line.contains("joined group"),
        "mcchatd cannot join the room on its own relay port: {line}"
    );
    let env = [("MCCHAT_ROOMS", rooms.as_str())];
    let room = "relayport";
    let mut local = Proc::mcchat(
        "h1 (the daemon's host, direct)",
        Some(&lan.ns("h1")),
        &["join", room, "--name", "local", "--history", "0"],
        &env,
    )
    .ready();
    let mut far = Proc::mcchat(
        "h3 join --via 198.51.100.1",
        Some(&lan.ns("h3")),
        &[
            "join",
            room,
            "--name",
            "far",
            "--history",
            "0",
            "--via",
            "198.51.100.1",
        ],
        &env,
    )
    .ready();

    // From the --via peer to the local one: the daemon forwards to the group.
    local.expect_out("-- far joined");
    far.say("from afar");
    local.expect_out("far: from afar");
    // From the local peer to the --via one: the daemon must relay what it hears from a local
    // address and the relay port when it is not its own forward.
    local.say("from the daemon host");
    if far
        .out_within("local: from the daemon host", WAIT)
        .is_none()
    {
        panic!(
            "the --via peer never got the local peer's message; mcchatd's counters: {}",
            daemon_status(&lan, "h3", "198.51.100.1")["counters"]
        );
    }

    far.close_stdin();
    assert!(far.wait().success(), "{:?}", far.stderr_lines());
    local.expect_out("-- far left");
    local.close_stdin();
    assert!(local.wait().success(), "{:?}", local.stderr_lines());
    for (p, needle, want) in [
        (&local, "far: from afar", 1),
        (&far, "local: from the daemon host", 1),
        (&far, "from afar", 0),
        (&local, "from the daemon host", 0),
    ] {
        assert_eq!(
            p.count_out(needle),
            want,
            "{}: lines with {needle:?}: {:?}",
            p.label,
            p.stdout()
        );
    }
}

/// The daemon on the wildcards (its default): the room's sockets, on 239.255.77.9:5554, share
/// the port with the relay socket on 0.0.0.0:5554.
#[test]
fn a_room_on_the_relay_port_with_a_peer_on_the_daemon_host() {
    relay_port_room(&WILDCARDS);
}

/// The daemon on one address: no wildcard shares the port with the room's sockets, so this
/// is only about telling the local peer's datagrams from the daemon's own forwards.
#[test]
fn a_room_on_the_relay_port_with_the_daemon_on_one_address() {
    relay_port_room(&["198.51.100.1:5554"]);
}
