//! The web gateway in-process: a Rust WebSocket client (tokio-tungstenite) against the daemon
//! on 127.0.0.1:0, beside a LAN peer on the room's group (real sockets, in the test
//! namespace).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::net::{TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::*;
use crate::test_support::settings;
use mcchat_core::wire::{self, Kind};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Each test its own room1 group (nextest runs them at once in one namespace).
fn rooms(n: u8, web: &str) -> String {
    format!(
        r#"
[daemon]
listen = ["127.0.0.1:0"]
status_socket = ""
state_dir = ""
relay_rate = 100000
relay_burst = 100000
unproven_rate = 100000
unproven_burst = 100000

[web]
listen = ["127.0.0.1:0"]
{web}

[rooms.room1]
group = "239.255.93.{n}"
port = {port}

[rooms.room2]
group = "239.255.94.{n}"
port = {port}
"#,
        port = 25930 + u16::from(n)
    )
}

struct Daemon {
    web: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
    /// The web connections run on their own threads, as in mcchatd.
    _threads: crate::web::runtime::WebRuntime,
}

fn start(text: String) -> Daemon {
    assert!(
        std::env::var_os("MCCHAT_TEST_NETNS").is_some(),
        "this test opens sockets: run it with scripts/test.sh"
    );
    let settings = settings(&text);
    let bound = bind(&settings).expect("bind");
    let web = bound.web_addrs()[0];
    let shutdown = CancellationToken::new();
    let (_reload, reload_rx) = mpsc::channel(1);
    let loaded = text.clone();
    let threads = crate::web::runtime::WebRuntime::start().expect("web threads");
    let control = Control {
        shutdown: shutdown.clone(),
        reload: reload_rx,
        loader: Arc::new(move || Ok(crate::test_support::settings(&loaded))),
        wall: Wall::System,
        web: threads.handle(),
    };
    let task = tokio::spawn(serve(settings, bound, control));
    Daemon {
        web,
        shutdown,
        task,
        _threads: threads,
    }
}

impl Daemon {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

async fn connect(d: &Daemon, query: &str) -> Ws {
    let url = format!("ws://{}/ws{query}", d.web);
    tokio_tungstenite::connect_async(url)
        .await
        .expect("connect")
        .0
}

/// A client whose socket has a small receive buffer (4 KiB), so that the daemon's frames
/// back up in its queue soon when it does not read.
async fn connect_small(d: &Daemon) -> Ws {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = sock.connect(d.web).await.expect("connect");
    tokio_tungstenite::client_async(format!("ws://{}/ws", d.web), MaybeTlsStream::Plain(stream))
        .await
        .expect("handshake")
        .0
}

async fn send(ws: &mut Ws, json: &str) {
    ws.send(Message::text(json)).await.expect("send");
}

/// The next text frame (skipping pings), within 5 s.
async fn next_text(ws: &mut Ws) -> String {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("open")
            .expect("frame");
        match m {
            Message::Text(t) => return t.to_string(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

async fn next_json(ws: &mut Ws) -> Value {
    serde_json::from_str(&next_text(ws).await).expect("json")
}

/// The number at the start of a chat line from `writer`, if `v` is one.
fn numbered(v: &Value) -> Option<usize> {
    if v["type"] != "chat" || v["sender"] != "writer" {
        return None;
    }
    v["text"].as_str()?.split(' ').next()?.parse().ok()
}

/// A client that sends faster than it reads its own messages back is slowed down, not let go
/// as too slow, and its room's other members get everything: its next frame is read only
/// while few frames wait for it (PROTOCOL 7).
#[tokio::test]
async fn a_client_that_sends_without_reading_is_slowed_down_not_let_go() {
    let d = start(rooms(8, "rate = 100000\nburst = 100000"));
    // The writer: a small receive buffer, and it reads nothing until the daemon has stopped
    // reading it.
    let writer = in_room1(connect_small(&d).await, "writer").await;
    let mut reader = in_room1(connect(&d, "").await, "reader").await;
    // As many lines as buffers cannot hold (as in the test of a client that stops reading).
    const N: usize = 20_000;
    let (mut tx, mut echoes) = writer.split();
    let text = "z".repeat(200);
    let sending = tokio::spawn(async move {
        for i in 0..N {
            tx.send(Message::text(format!(
                r#"{{"type":"message","message":"{i} {text}"}}"#
            )))
            .await
            .expect("send");
        }
    });
    // The reader takes what comes until nothing has for a second.
    let mut next = 0usize;
    while next < N {
        let Ok(m) = tokio::time::timeout(Duration::from_secs(1), reader.next()).await else {
            break;
        };
        let Some(Ok(Message::Text(t))) = m else {
            panic!("the reader was closed: {m:?}");
        };
        let v: Value = serde_json::from_str(t.as_str()).expect("json");
        if let Some(n) = numbered(&v) {
            assert_eq!(n, next, "once and in order");
            next += 1;
        }
    }
    assert!(
        next < N,
        "all {N} lines went through with the writer reading nothing: nothing was slowed down"
    );
    // Now the writer reads its own lines back: all of them, so it was never let go.
    let draining = tokio::spawn(async move {
        let mut echoed = 0usize;
        while echoed < N {
            match tokio::time::timeout(Duration::from_secs(10), echoes.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("json");
                    if numbered(&v).is_some() {
                        echoed += 1;
                    }
                }
                Ok(Some(Ok(Message::Close(c)))) => panic!("the writer was let go: {c:?}"),
                Ok(Some(Ok(_))) => {}
                other => panic!("the writer's connection ended: {other:?}"),
            }
        }
        echoed
    });
    while next < N {
        let v = next_of(&mut reader, "chat").await;
        if let Some(n) = numbered(&v) {
            assert_eq!(n, next, "once and in order");
            next += 1;
        }
    }
    sending.await.expect("every line sent");
    assert_eq!(draining.await.expect("the writer read back"), N);
    d.stop().await;
}

/// The next frame of `kind`, skipping others (presence, say).
async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let v = next_json(ws).await;
        if v["type"] == kind {
            return v;
        }
    }
}

/// The next live chat frame (skipping scrollback from history).
async fn next_live(ws: &mut Ws) -> Value {
    loop {
        let c = next_of(ws, "chat").await;
        if c.get("history").is_none() {
            return c;
        }
    }
}

/// `ws` joined to room1 as `name`.
async fn in_room1(mut ws: Ws, name: &str) -> Ws {
    let frame = format!(r#"{{"type":"join","room":"room1","name":"{name}"}}"#);
    join(&mut ws, &frame).await;
    ws
}

async fn join(ws: &mut Ws, frame: &str) -> Value {
    send(ws, frame).await;
    next_of(ws, "joined").await
}

/// A peer on room1's group: joined, sending with the multicast interface on lo.
fn group(n: u8) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(239, 255, 93, n), 25930 + u16::from(n)))
}

async fn lan_peer(n: u8) -> UdpSocket {
    let SocketAddr::V4(g) = group(n) else {
        unreachable!()
    };
    let (addr, ip) = (SocketAddr::V4(g), *g.ip());
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .expect("socket");
    s.set_reuse_address(true).expect("reuse");
    s.bind(&addr.into()).expect("bind");
    s.join_multicast_v4(&ip, &Ipv4Addr::LOCALHOST)
        .expect("join");
    s.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).expect("if");
    s.set_multicast_loop_v4(true).expect("loop");
    s.set_nonblocking(true).expect("nonblocking");
    UdpSocket::from_std(s.into()).expect("tokio")
}

/// The next chat datagram the LAN peer hears (skipping presence and heartbeats).
async fn lan_next_chat(peer: &UdpSocket) -> String {
    let mut buf = [0u8; 1500];
    loop {
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
            .await
            .expect("a datagram within 5 s")
            .expect("recv");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if let Ok(f) = wire::decode(&buf[..n])
            && f.meta.kind == Kind::Message
        {
            return text;
        }
    }
}

#[tokio::test]
async fn browsers_in_both_seed_shapes_and_a_lan_peer_chat_once_in_order() {
    let d = start(rooms(1, ""));
    let peer = lan_peer(1).await;
    let mut a = connect(&d, "").await;
    let mut b = connect(&d, "").await;
    let mut t = connect(&d, "?format=text").await;
    let mut other = connect(&d, "").await;
    let ja = join(&mut a, r#"{"type":"join","room":"room1","name":"ann"}"#).await;
    assert_eq!(ja["room"], "room1");
    assert_eq!(ja["recovered"], false);
    let jb = join(&mut b, r#"{"type":"join","payload":{"roomId":"room1"}}"#).await;
    assert_eq!(jb["payload"]["roomId"], "room1");
    send(&mut t, r#"{"type":"join","room":"room1","name":"tx"}"#).await;
    join(&mut other, r#"{"type":"join","room":"room2","name":"zed"}"#).await;

    // A browser speaks: the LAN hears one datagram of its own instance, every browser of
    // room1 one frame, the text client a line.
    send(&mut a, r#"{"type":"message","message":"hi from ann"}"#).await;
    let dgram = lan_next_chat(&peer).await;
    let f = wire::decode(dgram.as_bytes()).expect("decodes");
    assert_eq!(
        (f.sender, f.text, f.meta.seq),
        ("ann", "hi from ann", Some(1))
    );
    let id = format!("{}:1", f.meta.instance.expect("tagged"));
    for ws in [&mut a, &mut b] {
        let c = next_of(ws, "chat").await;
        assert_eq!(c["text"], "hi from ann");
        assert_eq!(c["id"], id.as_str());
    }
    assert_eq!(next_text(&mut t).await, "ann: hi from ann");

    // The seed's chat shape, from b.
    send(
        &mut b,
        r#"{"type":"chat","payload":{"message":"<img src=x onerror=alert(1)>"}}"#,
    )
    .await;
    let c = next_of(&mut a, "chat").await;
    assert_eq!(c["text"], "<img src=x onerror=alert(1)>");
    assert_eq!(c["payload"]["message"], "<img src=x onerror=alert(1)>");

    // The LAN speaks, out of order and twice: the browsers see 1, 2, 3, once each.
    let lan =
        |seq: u64, text: &str| format!("@id=00000000000000c1;seq={seq};ts=1 room1|carol|{text}");
    let to = group(1);
    for (seq, text) in [(1, "first"), (3, "third"), (1, "first"), (2, "second")] {
        peer.send_to(lan(seq, text).as_bytes(), to)
            .await
            .expect("send");
    }
    let _ = next_of(&mut b, "chat").await; // its own, from above
    for ws in [&mut a, &mut b] {
        let mut got = Vec::new();
        let mut offsets = Vec::new();
        for _ in 0..3 {
            let c = next_of(ws, "chat").await;
            got.push(c["text"].as_str().unwrap_or("").to_owned());
            offsets.push(c["offset"].as_u64().unwrap_or(0));
        }
        assert_eq!(got, ["first", "second", "third"]);
        assert!(offsets.is_sorted(), "{offsets:?}");
    }
    // Nothing of room1 reached room2, and the duplicate was not shown twice.
    send(&mut other, r#"{"type":"ping"}"#).await;
    let v = next_json(&mut other).await;
    assert!(v["type"] == "pong" || v["type"] == "presence", "{v}");
    send(&mut a, r#"{"type":"message","message":"last"}"#).await;
    assert_eq!(next_of(&mut b, "chat").await["text"], "last");
    d.stop().await;
}

#[tokio::test]
async fn every_error_has_a_code_and_abuse_is_closed() {
    let d = start(rooms(2, "rate = 1000\nburst = 1000"));
    let mut ws = connect(&d, "").await;
    let cases = [
        ("nope", "bad_json"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (r#"{"type":"join"}"#, "bad_request"),
        (r#"{"type":"message","message":"early"}"#, "not_joined"),
        (r#"{"type":"history"}"#, "no_history"),
        (r#"{"type":"join","room":"bad|room"}"#, "bad_room"),
        (r#"{"type":"join","room":"room1","name":"a|b"}"#, "bad_name"),
    ];
    for (frame, code) in cases {
        send(&mut ws, frame).await;
        let v = next_of(&mut ws, "error").await;
        assert_eq!(v["code"], code, "{frame}: {v}");
        assert!(!v["message"].as_str().unwrap_or("").is_empty());
    }
    ws.send(Message::binary(vec![1, 2, 3])).await.expect("send");
    assert_eq!(next_of(&mut ws, "error").await["code"], "binary");
    // A text longer than a datagram is split, not refused; a frame over 16 KiB closes.
    join(&mut ws, r#"{"type":"join","room":"room1","name":"ann"}"#).await;
    send(&mut ws, r#"{"type":"message","message":""}"#).await;
    assert_eq!(next_of(&mut ws, "error").await["code"], "bad_message");
    let long = "x".repeat(3000);
    send(
        &mut ws,
        &format!(r#"{{"type":"message","message":"{long}"}}"#),
    )
    .await;
    let mut got = String::new();
    while got.len() < long.len() {
        got.push_str(
            next_of(&mut ws, "chat").await["text"]
                .as_str()
                .expect("text"),
        );
    }
    assert_eq!(got, long);
    let _ = ws.send(Message::text("y".repeat(17 * 1024))).await;
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Close(c)))) => break c,
            Ok(Some(Ok(_))) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(closed.map(|c| u16::from(c.code)), Some(1009));

    // Repeated abuse: closed with 1008 after the allowance.
    let mut ws = connect(&d, "").await;
    for _ in 0..25 {
        if ws.send(Message::text("{")).await.is_err() {
            break;
        }
    }
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Close(c)))) => break c.map(|c| u16::from(c.code)),
            Ok(Some(Ok(_))) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(1008));
    d.stop().await;
}

#[tokio::test]
async fn the_rate_limit_drops_and_says_so() {
    let d = start(rooms(3, "rate = 1\nburst = 3"));
    let mut ws = connect(&d, "").await;
    join(&mut ws, r#"{"type":"join","room":"room1","name":"ann"}"#).await;
    for i in 0..6 {
        send(
            &mut ws,
            &format!(r#"{{"type":"message","message":"m{i}"}}"#),
        )
        .await;
    }
    // The burst (3, the join took one) goes through; the rest are refused, each said.
    let mut chats = 0;
    let mut limited = 0;
    while chats + limited < 6 {
        let v = next_json(&mut ws).await;
        match v["type"].as_str() {
            Some("chat") => chats += 1,
            Some("error") => {
                assert_eq!(v["code"], "rate_limited");
                limited += 1;
            }
            _ => {}
        }
    }
    assert_eq!((chats, limited), (2, 4));
    d.stop().await;
}

#[tokio::test]
async fn a_foreign_origin_is_refused_and_the_served_one_accepted() {
    let d = start(rooms(4, r#"origins = ["http://chat.example"]"#));
    let url = format!("ws://{}/ws", d.web);
    let mut req = url.clone().into_client_request().expect("request");
    req.headers_mut()
        .insert("origin", "http://evil.example".parse().expect("header"));
    let err = tokio_tungstenite::connect_async(req)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("403"), "{err}");
    for origin in [
        format!("http://{}", d.web),
        "http://chat.example".to_owned(),
    ] {
        let mut req = url.clone().into_client_request().expect("request");
        req.headers_mut()
            .insert("origin", origin.parse().expect("header"));
        tokio_tungstenite::connect_async(req)
            .await
            .expect("accepted");
    }
    d.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_the_others_get_everything() {
    let d = start(rooms(5, "rate = 10000\nburst = 100000"));
    // The slow one: a small receive buffer, and it never reads.
    let mut slow = connect_small(&d).await;
    send(&mut slow, r#"{"type":"join","room":"room1","name":"slow"}"#).await;
    let mut reader = in_room1(connect(&d, "").await, "reader").await;
    let writer = in_room1(connect(&d, "").await, "writer").await;
    // The writer reads its own echoes too (or it would be the slow one).
    let (mut writer, mut echoes) = writer.split();
    let drain = tokio::spawn(async move {
        while let Some(Ok(m)) = echoes.next().await {
            if let Message::Close(c) = m {
                panic!("the writer was closed: {c:?}");
            }
            if let Message::Text(t) = &m
                && t.contains("\"error\"")
            {
                panic!("the writer was refused: {t}");
            }
        }
    });
    const N: usize = 20_000;
    let text = "z".repeat(200);
    let send_all = async {
        for i in 0..N {
            writer
                .send(Message::text(format!(
                    r#"{{"type":"message","message":"{i} {text}"}}"#
                )))
                .await
                .expect("send");
        }
    };
    let read_all = async {
        let mut next = 0usize;
        while next < N {
            let v = next_of(&mut reader, "chat").await;
            if v["sender"] != "writer" {
                continue;
            }
            let n: usize = v["text"]
                .as_str()
                .and_then(|t| t.split(' ').next())
                .and_then(|n| n.parse().ok())
                .expect("numbered");
            assert_eq!(n, next, "once and in order");
            next += 1;
        }
    };
    tokio::join!(send_all, read_all);
    // The slow client was let go: reading it now ends in "too slow" (1013).
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
            Ok(Some(Ok(Message::Close(c)))) => break c.map(|c| u16::from(c.code)),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => break None,
            Err(_) => panic!("the slow client was never closed"),
        }
    };
    assert_eq!(code, Some(1013));
    d.stop().await;
    drain.abort();
}

async fn http_get(d: &Daemon, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = TcpStream::connect(d.web).await.expect("connect");
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            d.web
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test]
async fn the_page_is_served_whole_with_nothing_from_elsewhere() {
    let d = start(rooms(6, ""));
    let page = http_get(&d, "/").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page:.200}");
    assert!(page.contains("text/html") && page.contains("<title>mcchat</title>"));
    assert!(page.contains("content-security-policy"));
    let body = page.split("\r\n\r\n").nth(1).unwrap_or("");
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "no CDN, no fonts"
    );
    assert!(!body.contains("innerHTML"), "network text goes in as text");
    assert!(http_get(&d, "/healthz").await.ends_with("ok\n"));
    assert!(
        http_get(&d, "/rooms.json")
            .await
            .ends_with(r#"["room1","room2"]"#)
    );
    d.stop().await;
}

#[tokio::test]
async fn a_page_that_comes_back_with_since_gets_exactly_what_it_missed() {
    let dir = std::env::temp_dir().join(format!("mcchatd-web-since-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = rooms(7, "").replace(
        "state_dir = \"\"",
        &format!("state_dir = \"{}\"", dir.display()),
    );
    let d = start(text);
    let peer = lan_peer(7).await;
    let lan = |seq: u64| format!("@id=00000000000000d7;seq={seq};ts=1 room1|carol|m{seq}");
    let mut ws = connect(&d, "").await;
    let j = join(&mut ws, r#"{"type":"join","room":"room1","name":"ann"}"#).await;
    assert_eq!(j["history"], true);
    let epoch = j["epoch"].as_u64().expect("epoch");
    for seq in 1..=3 {
        peer.send_to(lan(seq).as_bytes(), group(7))
            .await
            .expect("send");
    }
    let mut last = 0;
    for seq in 1..=3 {
        let c = next_of(&mut ws, "chat").await;
        assert_eq!(c["text"], format!("m{seq}"));
        last = c["offset"].as_u64().expect("offset");
    }
    drop(ws);
    // While it is away the room goes on; a second page sees the messages arrive, so they are
    // in the daemon (and in history) before the first comes back.
    let mut watcher = connect(&d, "").await;
    join(&mut watcher, r#"{"type":"join","room":"room1","name":"w"}"#).await;
    for seq in 4..=5 {
        peer.send_to(lan(seq).as_bytes(), group(7))
            .await
            .expect("send");
        assert_eq!(next_live(&mut watcher).await["text"], format!("m{seq}"));
    }
    let mut ws = connect(&d, "").await;
    let back = format!(
        r#"{{"type":"join","room":"room1","name":"ann","since":{{"epoch":{epoch},"offset":{last}}}}}"#
    );
    let j = join(&mut ws, &back).await;
    assert_eq!(j["recovered"], true, "{j}");
    for seq in 4..=5 {
        let c = next_of(&mut ws, "chat").await;
        assert_eq!(
            (c["text"].as_str(), c["history"].as_bool()),
            (Some(format!("m{seq}").as_str()), Some(true))
        );
    }
    // Nothing else from history: the next frame is live.
    peer.send_to(lan(6).as_bytes(), group(7))
        .await
        .expect("send");
    let c = next_of(&mut ws, "chat").await;
    assert_eq!((c["text"].as_str(), c.get("history")), (Some("m6"), None));
    // Another epoch is not recoverable: a fresh scrollback instead.
    let mut other = connect(&d, "").await;
    let stale = r#"{"type":"join","room":"room1","name":"x","since":{"epoch":1,"offset":1}}"#;
    assert_eq!(join(&mut other, stale).await["recovered"], false);
    d.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
