//! mcchatd's WebSocket gateway from outside: the real binary, connections from this process
//! (so each side has its own descriptors), counted back through `mcchat status`.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::util::{TempDir, local_daemon, require_netns, run};

/// The web address a daemon logged when it bound.
fn web_addr(d: &crate::util::Proc) -> SocketAddr {
    crate::util::logged_addr(d, "web page and WebSocket on HTTP")
}

/// A WebSocket opened by hand: the upgrade request, and the status line of the answer.
fn open(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .expect("write");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head);
    (s, text.lines().next().unwrap_or("").to_owned())
}

#[test]
fn ten_thousand_idle_connections_are_accepted_and_the_next_refused() {
    require_netns();
    let dir = TempDir::new();
    let rooms = dir.write(
        "rooms.toml",
        "[web]\nmax_connections = 10000\n\n[rooms.room1]\ngroup = \"239.255.98.1\"\nport = 25981\n",
    );
    let (d, relay) = local_daemon(&["--rooms", &rooms, "--web", "127.0.0.1:0", "--no-history"]);
    let web = web_addr(&d);
    let mut conns = Vec::with_capacity(10_000);
    for i in 0..10_000 {
        let (s, status) = open(web);
        assert!(status.contains(" 101 "), "connection {i}: {status}");
        conns.push(s);
    }
    let (_extra, status) = open(web);
    assert!(status.contains(" 503 "), "the 10,001st: {status}");
    // The daemon counts them all, and still answers.
    let (st, out, err) = run(&["status", "--via", &relay.to_string(), "--json"], &[]);
    assert!(st.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["web_clients"], 10_000, "{out:.300}");
    drop(conns);
    // Closed on this side; the daemon sees each close in its own time: wait until it has.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, out, _) = run(&["status", "--via", &relay.to_string(), "--json"], &[]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        if v["web_clients"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connections not let go: {out:.300}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (s, status) = open(web);
    assert!(status.contains(" 101 "), "after they closed: {status}");
    drop(s);
}
