//! Room history: mcchatd stores what it relays or hears in SQLite; `mcchat history` reads it,
//! and `mcchat join` shows the last messages before the live ones.

use std::net::SocketAddr;

use nix::sys::signal::Signal;

use std::time::Duration;

use crate::util::{
    Pace, Proc, TempDir, WAIT, cookie_for, local_daemon, relay_addr, require_netns, run, unique,
    with_cookie,
};

/// The texts of `mcchat history --json` for `room`.
fn history(addr: SocketAddr, room: &str, extra: &[&str]) -> Vec<String> {
    let a = addr.to_string();
    let mut args = vec!["history", room, "--via", &a, "--json"];
    args.extend_from_slice(extra);
    let (st, out, err) = run(&args, &[]);
    assert!(st.success(), "{err}");
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["room"], room, "{l}");
            v["text"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn texts(range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(|i| format!("msg {i:02}")).collect()
}

/// A daemon with history on, a `--via` listener in `room` (with it the daemon joins the room's
/// group), and `n` messages from a peer on the group, all of them in the daemon's history. Each test has a room of
/// its own: the tests share one network namespace.
fn room_with_messages(room: &str, d_args: &[&str], n: usize) -> (Proc, SocketAddr, Proc) {
    let d = Proc::daemon(None, d_args);
    let addr = relay_addr(&d);
    let watcher = Proc::mcchat(
        "watcher",
        None,
        &["listen", room, "--via", &addr.to_string()],
        &[],
    )
    .listening();
    let mut alice = Proc::mcchat("alice", None, &["join", room, "--name", "alice"], &[]);
    alice = alice.ready();
    for line in texts(1..=n) {
        alice.say(&line);
    }
    watcher.expect_out(&format!("alice: msg {n:02}"));
    alice.close_stdin();
    assert!(alice.wait().success());
    // Relayed is not yet stored: the daemon records from its view of the room, which holds
    // a message until the ones before it are there (repaired, or given up after 4 s). Ready
    // when its history has all `n`; each try is a process of its own.
    let t0 = std::time::Instant::now();
    while history(addr, room, &[]).len() < n {
        assert!(t0.elapsed() < WAIT, "history never held the {n} messages");
    }
    (d, addr, watcher)
}

/// A late joiner sees the last N messages, once each and in order, then the live ones;
/// `mcchat history` filters by count, text and age.
#[test]
fn late_joiner_gets_the_last_messages() {
    require_netns();
    let dir = TempDir::new();
    let sock = dir.path().join("mcchatd.sock").display().to_string();
    let room = unique("late");
    let room = room.as_str();
    let (d, addr, _watcher) = room_with_messages(
        room,
        &["--listen", "127.0.0.1:0", "--status-socket", &sock],
        30,
    );

    // Through the relay, asking for 10.
    let mut bob = Proc::mcchat(
        "bob",
        None,
        &[
            "join",
            room,
            "--name",
            "bob",
            "--via",
            &addr.to_string(),
            "--history",
            "10",
        ],
        &[],
    )
    .ready();
    bob.expect_err("10 earlier messages from mcchatd's history");
    bob.expect_out("alice: msg 30");
    // Joined directly, with the default (20) from the local daemon's socket.
    let mut carol = Proc::mcchat(
        "carol",
        None,
        &["join", room, "--name", "carol", "--socket", &sock],
        &[],
    )
    .ready();
    carol.expect_out("alice: msg 30");
    bob.say("live after history");
    carol.expect_out("bob: live after history");
    bob.close_stdin();
    assert!(bob.wait().success());
    carol.close_stdin();
    assert!(carol.wait().success());
    let shown = |p: &Proc| -> Vec<String> {
        p.stdout()
            .iter()
            .filter_map(|l| l.split_once("alice: ").map(|(_, t)| t.to_owned()))
            .collect()
    };
    assert_eq!(shown(&bob), texts(21..=30));
    assert_eq!(shown(&carol), texts(11..=30));
    let carol_out = carol.stdout();
    let pos = |needle: &str| carol_out.iter().position(|l| l.contains(needle)).unwrap();
    assert!(pos("alice: msg 30") < pos("bob: live after history"));

    assert_eq!(history(addr, room, &[]).len(), 31, "30 + bob's");
    assert_eq!(
        history(addr, room, &["--limit", "3"]),
        ["msg 29", "msg 30", "live after history"]
    );
    assert_eq!(
        history(addr, room, &["--grep", "MSG 1"]),
        texts(10..=19),
        "case-insensitive substring"
    );
    assert_eq!(history(addr, room, &["--since", "1h"]).len(), 31);
    assert!(history(addr, &unique("empty"), &[]).is_empty());
    // Text output over the Unix socket.
    let (st, out, err) = run(&["history", room, "--socket", &sock, "--limit", "1"], &[]);
    assert!(st.success(), "{err}");
    assert!(out.trim_end().ends_with("bob: live after history"), "{out}");
    drop(d);
}

/// History survives a clean restart, and a `kill -9` in the middle of a stream of writes
/// loses nothing that was committed (everything a query had returned).
#[test]
fn history_survives_restart_and_kill_9() {
    require_netns();
    let state = TempDir::new();
    let state_dir = state.path().display().to_string();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--status-socket",
        "",
        "--state-dir",
        &state_dir,
    ];
    let room = unique("kill");
    let room = room.as_str();
    let (mut d, addr, _watcher) = room_with_messages(room, &args, 50);
    assert_eq!(history(addr, room, &["--limit", "1000"]), texts(1..=50));
    d.signal(Signal::SIGTERM);
    assert!(d.wait().success());

    let d = Proc::daemon(None, &args);
    let addr = relay_addr(&d);
    assert_eq!(
        history(addr, room, &["--limit", "1000"]),
        texts(1..=50),
        "kept over a restart"
    );
    // A stream of 3000 messages; the daemon is killed while it writes them.
    let watcher = Proc::mcchat(
        "watcher2",
        None,
        &["listen", room, "--via", &addr.to_string()],
        &[],
    )
    .listening();
    let mut flood = Proc::mcchat("flood", None, &["join", room, "--name", "flood"], &[]).ready();
    // Paced at about 1000 msg/s, so the writer is still busy when the kill comes.
    let pace = Pace::new(Duration::from_millis(10));
    for i in 1..=500u64 {
        flood.say(&format!("flood {i:04}"));
        if i % 10 == 0 {
            pace.until(i / 10);
        }
    }
    watcher.expect_out("flood: flood 0500");
    let committed = history(addr, room, &["--limit", "10000"]);
    let want: Vec<String> = texts(1..=50)
        .into_iter()
        .chain((1..=500).map(|i| format!("flood {i:04}")))
        .collect();
    assert_eq!(
        committed, want,
        "a query sees everything the daemon had received"
    );
    // More messages go on arriving while the history is written, and the kill comes.
    let pace = Pace::new(Duration::from_millis(10));
    for i in 501..=3000u64 {
        flood.say(&format!("flood {i:04}"));
        if i == 1000 {
            d.signal(Signal::SIGKILL);
        }
        if i % 10 == 0 {
            pace.until((i - 500) / 10);
        }
    }
    drop(d);
    flood.close_stdin();
    assert!(flood.wait().success());

    let d = Proc::daemon(None, &args);
    let addr = relay_addr(&d);
    let after = history(addr, room, &["--limit", "10000"]);
    eprintln!(
        "{} messages committed before the kill -9, {} in history after the restart",
        committed.len(),
        after.len()
    );
    assert!(
        after.len() >= committed.len(),
        "{} after, {} committed before the kill",
        after.len(),
        committed.len()
    );
    assert_eq!(
        after[..committed.len()],
        committed[..],
        "nothing committed lost, in order"
    );
    assert_eq!(after[..50], texts(1..=50)[..]);
    drop(d);
}

/// A daemon with history off says so, and a bad request gets an error that says what to
/// send, not a hang or a status document.
#[test]
fn history_off_and_bad_requests_are_clear_errors() {
    require_netns();
    let d = Proc::daemon(
        None,
        &[
            "--listen",
            "127.0.0.1:0",
            "--status-socket",
            "",
            "--no-history",
        ],
    );
    let addr = relay_addr(&d);
    let (st, _, err) = run(&["history", "room1", "--via", &addr.to_string()], &[]);
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("history is off on this daemon"), "{err}");
    use std::io::{Read as _, Write as _};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.write_all(b"{\"history\":{\"room\":1}}\n").unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert!(
        v["error"].as_str().unwrap().starts_with("bad request"),
        "{answer}"
    );
    // `join` with no daemon behind the socket goes on without history, quietly.
    let mut solo = Proc::mcchat(
        "solo",
        None,
        &[
            "join",
            "room1",
            "--name",
            "solo",
            "--socket",
            "/nonexistent/mcchatd.sock",
        ],
        &[],
    )
    .ready();
    solo.close_stdin();
    assert!(solo.wait().success());
    assert!(!solo.stderr_lines().iter().any(|l| l.contains("history")));
}

/// Issue 11: the daemon's 2 s write timeout cut a normal history answer to a slow reader (a
/// 4 Mbit/s reader got 1.1 of 2.1 MB), and answers were built whole in memory. Now they
/// stream page by page, timed out only for lack of progress: a reader taking about a
/// second per MB gets all 10,000 messages, in order, and so does `mcchat history`.
#[test]
fn a_slow_via_reader_gets_a_complete_history_of_10000_messages() {
    use std::io::{Read as _, Write as _};
    require_netns();
    const N: u64 = 10_000;
    let dir = TempDir::new();
    let state = dir.path().join("state");
    let rooms = dir.write(
        "rooms.toml",
        "[daemon]\nrelay_rate = 1000000\nrelay_burst = 1000000\n\n\
         [rooms.longroom]\ngroup = \"239.255.77.77\"\nport = 5577\n",
    );
    let (_d, addr) = local_daemon(&["--rooms", &rooms, "--state-dir", state.to_str().unwrap()]);
    // 10,000 messages of about 250 bytes from a proven sender; what a full socket buffer
    // lost is sent again (history stores each (id, seq) once) until all are stored.
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let cookie = cookie_for(&sender, "longroom", addr);
    let text = "h".repeat(200);
    let mut stored = Vec::new();
    for _round in 0..5 {
        let pace = Pace::new(Duration::from_micros(50));
        let have: std::collections::HashSet<u64> = stored.iter().copied().collect();
        for (i, seq) in (1..=N).filter(|s| !have.contains(s)).enumerate() {
            pace.until(i as u64);
            let msg = format!("@id=00000000000000cc;seq={seq};ts=1 longroom|bob|{seq} {text}");
            let _ = sender.send_to(&with_cookie(msg.as_bytes(), &cookie), addr);
        }
        stored = history(addr, "longroom", &["--limit", "10000"])
            .iter()
            .map(|t| t.split(' ').next().unwrap().parse().unwrap())
            .collect();
        if stored.len() as u64 == N {
            break;
        }
    }
    assert_eq!(
        stored,
        (1..=N).collect::<Vec<_>>(),
        "mcchat history reads it all"
    );
    // The slow reader: about 1 MB a second, in 16 KiB reads.
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.write_all(b"{\"history\":{\"room\":\"longroom\",\"limit\":10000}}\n")
        .unwrap();
    let mut doc = Vec::new();
    let mut buf = [0u8; 16 << 10];
    let started = std::time::Instant::now();
    let pace = Pace::new(Duration::from_millis(16));
    for i in 0.. {
        pace.until(i);
        let n = tcp.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        doc.extend_from_slice(&buf[..n]);
    }
    let took = started.elapsed();
    let answer: serde_json::Value = serde_json::from_slice(&doc).unwrap();
    let seqs: Vec<u64> = answer["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    eprintln!("{} bytes read slowly in {took:.1?}", doc.len());
    assert!(
        took > Duration::from_secs(2),
        "the reader was slow: {took:?}"
    );
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>());
}
