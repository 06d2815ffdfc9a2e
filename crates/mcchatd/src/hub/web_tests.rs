//! Web clients in the hub: no sockets, injected time (docs/PROTOCOL.md 7).

use std::time::Duration;

use mcchat_core::wire;

use super::tests::{ROOMS, T, room, to_group_text as to_group};
use super::web::WebInput;
use super::*;

fn web(t: &mut T, conn: u64, input: WebInput) -> Vec<Output> {
    let now = t.now();
    t.hub.on_web(conn, input, now);
    let out = t.drain();
    t.finish_joins(&out);
    out
}

fn open_and_join(t: &mut T, conn: u64, room: &str, name: &str) -> Vec<Output> {
    let addr = "127.0.0.1".parse().expect("ip");
    web(t, conn, WebInput::Open { addr });
    web(
        t,
        conn,
        WebInput::Join {
            room: room.into(),
            name: name.into(),
        },
    )
}

/// The frames (JSON) sent to web clients in `out`, with their recipients.
fn frames(out: &[Output]) -> Vec<(Vec<u64>, String)> {
    out.iter()
        .filter_map(|o| match o {
            Output::ToWeb { to, frame } => Some((to.to_vec(), frame.json.as_str().to_owned())),
            _ => None,
        })
        .collect()
}

fn say(t: &mut T, conn: u64, text: &str) -> Vec<Output> {
    web(
        t,
        conn,
        WebInput::Say {
            text: text.into(),
            action: false,
        },
    )
}

#[test]
fn a_browser_speaks_to_the_group_its_room_and_history_in_one_step() {
    let mut t = T::new(ROOMS, true);
    let out = open_and_join(&mut t, 1, "history", "ann");
    let joined = out.iter().find_map(|o| match o {
        Output::WebJoined { conn: 1, joined } => Some(joined.clone()),
        _ => None,
    });
    let joined = joined.expect("joined");
    assert_eq!(
        (joined.room.as_str(), joined.epoch, joined.history),
        ("history", 5, true)
    );
    // Its presence went to the LAN, and its own room shows it arriving.
    assert!(
        to_group(&out)
            .iter()
            .any(|d| d.contains("kind=join") && d.ends_with("history|ann|"))
    );
    assert!(
        frames(&out)
            .iter()
            .any(|(to, f)| to == &[1] && f.contains(r#""event":"join""#))
    );

    let out = say(&mut t, 1, "hi");
    let sent = to_group(&out);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let f = wire::decode(sent[0].as_bytes()).expect("decodes");
    assert_eq!((f.sender, f.text, f.meta.seq), ("ann", "hi", Some(1)));
    assert!(f.tags.get(RELAY_TAG).is_some(), "marked as the hub's own");
    let offsets: Vec<u64> = out
        .iter()
        .filter_map(|o| match o {
            Output::Record { offset, .. } => Some(*offset),
            _ => None,
        })
        .collect();
    assert_eq!(offsets, [joined.offset + 1]);
    let shown = frames(&out);
    assert_eq!(shown.len(), 1);
    assert!(
        shown[0].1.contains(r#""text":"hi""#)
            && shown[0]
                .1
                .contains(&format!(r#""offset":{}"#, joined.offset + 1))
    );
}

#[test]
fn a_nack_for_a_browsers_message_is_repaired_by_its_engine() {
    let mut t = T::new(ROOMS, false);
    open_and_join(&mut t, 1, "room1", "ann");
    let out = say(&mut t, 1, "hi");
    let f = wire::decode(to_group(&out)[0].as_bytes()).map(|f| f.meta.instance);
    let instance = f.expect("decodes").expect("tagged");
    let nack = format!("@id=00000000000000b0;kind=nack;for={instance};seqs=1 room1|bob|");
    // Past the interval in which one loss is repaired once.
    t.at(Duration::from_millis(100));
    let out = t.group("room1", "192.0.2.50:5555", nack.as_bytes());
    let repairs: Vec<String> = to_group(&out)
        .into_iter()
        .filter(|d| d.contains("repair=1") && d.ends_with("room1|ann|hi"))
        .collect();
    assert_eq!(repairs.len(), 1, "{:?}", to_group(&out));
    // The repair cache saw it go out: its standby does not send a second one.
    let later: Vec<String> = to_group(&t.poll(Duration::from_millis(400)))
        .into_iter()
        .filter(|d| d.contains("repair=1"))
        .collect();
    assert!(later.is_empty(), "{later:?}");
}

#[test]
fn browsers_see_the_room_once_in_order_and_what_cannot_be_repaired_as_a_gap() {
    let mut t = T::new(ROOMS, false);
    open_and_join(&mut t, 1, "room1", "ann");
    open_and_join(&mut t, 2, "room1", "bob");
    let lan = |seq: u64| format!("@id=00000000000000c1;seq={seq};ts=1 room1|carol|m{seq}");
    let mut shown = Vec::new();
    for seq in [1, 3, 1] {
        shown.extend(frames(&t.group(
            "room1",
            "192.0.2.50:5555",
            lan(seq).as_bytes(),
        )));
    }
    let texts: Vec<&str> = shown
        .iter()
        .filter(|(_, f)| f.contains(r#""type":"chat""#))
        .map(|(to, f)| {
            assert_eq!(to, &[1, 2], "one frame for both");
            if f.contains("\"m1\"") { "m1" } else { "m3" }
        })
        .collect();
    assert_eq!(
        texts,
        ["m1"],
        "3 waits for 2; the duplicate of 1 is not shown"
    );
    // The view asks for 2 on the LAN, then gives it up and says so.
    let mut nacks = 0;
    let mut gap = None;
    for ms in (100..=20_000).step_by(100) {
        let out = t.poll(Duration::from_millis(ms));
        nacks += to_group(&out)
            .iter()
            .filter(|d| d.contains("kind=nack") && d.contains("for=00000000000000c1"))
            .count();
        let f = frames(&out);
        if let Some(g) = f.iter().find(|(_, f)| f.contains(r#""type":"gap""#)) {
            gap = Some(g.1.clone());
            assert!(
                f.iter().any(|(_, f)| f.contains("\"m3\"")),
                "3 follows the gap"
            );
            break;
        }
    }
    assert!(nacks >= 1, "the view asked for 2");
    let gap = gap.expect("a gap frame");
    assert!(gap.contains(r#""count":1"#), "{gap}");
}

#[test]
fn a_browser_from_outside_the_allow_list_is_refused_and_closed() {
    let mut t = T::new(ROOMS, false);
    let out = web(
        &mut t,
        7,
        WebInput::Open {
            addr: "203.0.113.5".parse().expect("ip"),
        },
    );
    assert!(matches!(
        out.as_slice(),
        [Output::WebRefused { conn: 7, close: true, refusal }] if refusal.code == "not_allowed"
    ));
    let out = web(
        &mut t,
        7,
        WebInput::Join {
            room: "room1".into(),
            name: "x".into(),
        },
    );
    assert!(out.is_empty(), "a refused connection is nobody: {out:?}");
}

#[test]
fn a_browser_keeps_its_group_joined_sends_heartbeats_and_says_goodbye() {
    let mut t = T::new(ROOMS, false);
    let out = open_and_join(&mut t, 1, "room1", "ann");
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Join { room: r, .. } if *r == room("room1")))
    );
    let mut heartbeats = 0;
    for s in 1..=60 {
        heartbeats += to_group(&t.poll(Duration::from_secs(s)))
            .iter()
            .filter(|d| d.contains("kind=hb"))
            .count();
    }
    assert!(
        (1..=60).contains(&heartbeats),
        "heartbeats in a minute: {heartbeats}"
    );
    let out = web(&mut t, 1, WebInput::Closed);
    assert!(
        to_group(&out).iter().any(|d| d.contains("kind=leave")),
        "{out:?}"
    );
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Leave { room: r, .. } if *r == room("room1")))
    );
    assert_eq!(t.hub.snapshot(t.now().mono).web_clients, 0);
}

#[test]
fn bad_names_and_rooms_are_refused_with_a_reason() {
    let mut t = T::new(ROOMS, false);
    web(
        &mut t,
        1,
        WebInput::Open {
            addr: "127.0.0.1".parse().expect("ip"),
        },
    );
    for (room, name, code) in [
        ("room1", "a|b", "bad_name"),
        ("room1", "", "bad_name"),
        ("bad|room", "ann", "bad_room"),
    ] {
        let out = web(
            &mut t,
            1,
            WebInput::Join {
                room: room.into(),
                name: name.into(),
            },
        );
        assert!(
            matches!(out.as_slice(), [Output::WebRefused { close: false, refusal, .. }] if refusal.code == code),
            "{room} {name}: {out:?}"
        );
    }
}
