//! Other sites in the hub: what is published, what is injected, by whom, and what is
//! dropped; no NATS, injected time (docs/PROTOCOL.md 8).

use std::time::Duration;

use mcchat_core::wire;

use super::site::{HOPS_TAG, SITE_TAG};
use super::tests::{LOCAL_A, ROOMS, T, room, to_group_text as to_group, with_cookie};
use super::web::WebInput;
use super::*;

fn rooms() -> String {
    format!("{ROOMS}\n[sites]\nsite = \"paris\"\nnats = [\"nats://127.0.0.1:4222\"]\n")
}

fn hub() -> T {
    let mut t = T::new(&rooms(), false);
    let out = t.drain();
    t.finish_joins(&out);
    t
}

/// What `out` publishes to other sites: (room, datagram, message id).
fn published(out: &[Output]) -> Vec<(String, String, Option<String>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::ToSite { room, data, id } => Some((
                room.to_string(),
                String::from_utf8_lossy(data).into_owned(),
                id.clone(),
            )),
            _ => None,
        })
        .collect()
}

fn from_site(t: &mut T, name: &str, data: &str) -> Vec<Output> {
    let now = t.now();
    t.hub.on_site(&room(name), data.as_bytes(), now);
    t.drain()
}

fn lease(t: &mut T, name: &str, held: bool) -> Vec<Output> {
    lease_of(t, name, held, 1)
}

fn lease_of(t: &mut T, name: &str, held: bool, epoch: u64) -> Vec<Output> {
    let now = t.now();
    t.hub.site_lease(&room(name), held, epoch, now);
    t.drain()
}

const PEER: &str = "127.0.0.1:40000";
const ALICE: &str = "00000000000000a1";
const BOB: &str = "00000000000000b0";

#[test]
fn bridged_rooms_are_kept_joined_and_announced() {
    let t = hub();
    let joined: Vec<&str> = {
        let mut j: Vec<&str> = t.hub.groups.groups().map(|(r, _)| r.as_str()).collect();
        j.sort_unstable();
        j
    };
    // room1 keeps no history and is not `keep`: joined because it is bridged.
    assert_eq!(joined, ["history", "kept", "room1"]);
    let announced: Vec<&str> = t
        .hub
        .sites()
        .rooms()
        .0
        .iter()
        .map(RoomName::as_str)
        .collect();
    assert_eq!(announced, ["history", "kept", "room1"]);
    // Without [sites], room1 is not joined and nothing is announced.
    let plain = T::new(ROOMS, false);
    assert!(!plain.hub.groups.is_joined(&room("room1")));
    assert!(plain.hub.sites().rooms().0.is_empty());
}

#[test]
fn what_the_lan_says_is_published_once_with_its_origin() {
    let mut t = hub();
    let msg = format!("@id={ALICE};seq=1;ts=5 room1|alice|hi");
    let out = t.group("room1", PEER, msg.as_bytes());
    assert_eq!(
        published(&out),
        [(
            "room1".to_owned(),
            format!("@site=paris;hops=1;id={ALICE};seq=1;ts=5 room1|alice|hi"),
            Some(format!("{ALICE}:1"))
        )]
    );
    // A repair is published as the same end-to-end bytes (the far side drops the copy).
    let repair = format!("@repair=1;id={ALICE};seq=1;ts=5 room1|alice|hi");
    let out = t.group("room1", PEER, repair.as_bytes());
    assert_eq!(
        published(&out)[0].1,
        format!("@site=paris;hops=1;id={ALICE};seq=1;ts=5 room1|alice|hi")
    );
    // Not published: another daemon's forward (that daemon publishes it), a message from
    // another site, a NACK.
    for not in [
        format!("@relay=deadbeef;id={ALICE};seq=2 room1|alice|via"),
        format!("@relay=deadbeef;site=london;hops=1;id={BOB};seq=1 room1|bob|yo"),
        format!("@site=london;hops=1;id={BOB};seq=2 room1|bob|yo"),
        format!("@id={ALICE};kind=nack;for={BOB};seqs=1 room1|alice|"),
    ] {
        let out = t.group("room1", PEER, not.as_bytes());
        assert!(published(&out).is_empty(), "{not}");
    }
    // A bare datagram has no id to tell copies apart: only the lease holder publishes it.
    let out = t.group("room1", PEER, b"room1|nc|hello");
    assert!(published(&out).is_empty());
    lease(&mut t, "room1", true);
    let out = t.group("room1", PEER, b"room1|nc|hello");
    assert_eq!(
        published(&out),
        [(
            "room1".to_owned(),
            "@site=paris;hops=1 room1|nc|hello".to_owned(),
            None
        )]
    );
}

#[test]
fn the_lease_holder_injects_what_other_sites_say_and_nothing_goes_back() {
    let mut t = hub();
    let m1 = format!("@site=london;hops=1;id={BOB};seq=1 room1|bob|one");
    let m2 = format!("@site=london;hops=1;id={BOB};seq=2 room1|bob|two");
    // Without the lease: nothing reaches the LAN from this daemon.
    let out = from_site(&mut t, "room1", &m1);
    assert!(to_group(&out).is_empty() && published(&out).is_empty());
    // The lease won: what waited goes out, with this daemon's relay tag and the foreign
    // origin kept (so no daemon of this LAN publishes it again).
    let out = lease(&mut t, "room1", true);
    let sent = to_group(&out);
    assert_eq!(sent, [format!("@relay=0a0b0c0d;{}", &m1[1..])]);
    let out = from_site(&mut t, "room1", &m2);
    assert_eq!(to_group(&out), [format!("@relay=0a0b0c0d;{}", &m2[1..])]);
    assert!(published(&out).is_empty(), "never re-published");
    // Its own forward heard back on the group is not published either.
    let out = t.group("room1", PEER, to_group(&out)[0].as_bytes());
    assert!(published(&out).is_empty());

    // Dropped: a copy, this site's own, a loop, no origin, the wrong subject.
    let dups = t.hub.sites().duplicates;
    assert!(to_group(&from_site(&mut t, "room1", &m2)).is_empty());
    assert_eq!(t.hub.sites().duplicates, dups + 1);
    let own = format!("@site=paris;hops=1;id={ALICE};seq=9 room1|alice|mine");
    assert!(to_group(&from_site(&mut t, "room1", &own)).is_empty());
    assert_eq!(t.hub.sites().own, 1);
    for (bad, reason) in [
        (
            format!("@site=lyon;hops=4;id={BOB};seq=3 room1|bob|loop"),
            "site_hops",
        ),
        (
            format!("@site=lyon;id={BOB};seq=4 room1|bob|x"),
            "site_hops",
        ),
        (format!("@id={BOB};seq=5 room1|bob|x"), "site_no_origin"),
        (
            format!("@site=lyon;hops=1;id={BOB};kind=nack;for={ALICE};seqs=1 room1|bob|"),
            "unexpected_kind",
        ),
    ] {
        let before = t.counter(reason);
        assert!(
            to_group(&from_site(&mut t, "room1", &bad)).is_empty(),
            "{bad}"
        );
        assert_eq!(t.counter(reason), before + 1, "{bad}");
    }
    let on_room2 = format!("@site=lyon;hops=1;id={BOB};seq=6 room1|bob|x");
    let out = from_site(&mut t, "history", &on_room2);
    assert!(
        to_group(&out).is_empty(),
        "a subject that is not the datagram's room"
    );
    // An ad-hoc room is not bridged unless asked.
    let adhoc = format!("@site=lyon;hops=1;id={BOB};seq=7 elsewhere|bob|x");
    from_site(&mut t, "elsewhere", &adhoc);
    assert_eq!(t.counter("site_not_bridged"), 1);
}

#[test]
fn a_daemon_without_the_lease_keeps_what_the_lan_has_not_heard_for_its_takeover() {
    let mut t = hub();
    let m = |seq: u32| format!("@site=london;hops=1;id={BOB};seq={seq} room1|bob|m{seq}");
    for seq in 1..=3 {
        from_site(&mut t, "room1", &m(seq));
    }
    // The holder (another daemon) injects 1 and 2; this one hears them on the group.
    for seq in 1..=2 {
        let heard = format!("@relay=deadbeef;{}", &m(seq)[1..]);
        let out = t.group("room1", PEER, heard.as_bytes());
        assert!(published(&out).is_empty());
    }
    // The holder stops; this daemon wins the lease and sends only what the LAN lacks.
    let out = lease(&mut t, "room1", true);
    assert_eq!(to_group(&out), [format!("@relay=0a0b0c0d;{}", &m(3)[1..])]);
    // What waits is forgotten after a while: a lease won much later sends nothing old.
    lease(&mut t, "room1", false);
    from_site(&mut t, "room1", &m(4));
    t.poll(Duration::from_secs(40));
    assert!(to_group(&lease(&mut t, "room1", true)).is_empty());
}

#[test]
fn what_via_and_web_clients_say_is_published_and_other_sites_reach_them() {
    let mut t = hub();
    let client = "127.0.0.1:41000";
    let cookie = t.subscribe("room1", client, LOCAL_A);
    let msg = format!("@id={ALICE};seq=1 room1|alice|via");
    let out = t.unicast(client, LOCAL_A, &with_cookie(&msg, &cookie));
    let p = published(&out);
    assert_eq!(p.len(), 1);
    assert_eq!(
        p[0].1,
        format!("@site=paris;hops=1;id={ALICE};seq=1 room1|alice|via"),
        "the cookie is this leg's only"
    );
    // A browser's message.
    let now = t.now();
    let addr = "127.0.0.1".parse().expect("ip");
    t.hub.on_web(7, WebInput::Open { addr }, now);
    let join = WebInput::Join {
        room: "room1".into(),
        name: "ann".into(),
    };
    t.hub.on_web(7, join, now);
    let joined = t.drain();
    assert!(
        published(&joined)
            .iter()
            .any(|(_, d, _)| d.starts_with("@site=paris;hops=1;") && d.contains("kind=join")),
        "its arrival, for the other sites' rosters"
    );
    let say = WebInput::Say {
        text: "hello".into(),
        action: false,
    };
    t.hub.on_web(7, say, now);
    let out = t.drain();
    let p = published(&out);
    assert_eq!(p.len(), 1);
    let f = wire::decode(p[0].1.as_bytes()).expect("decodes");
    assert_eq!((f.sender, f.text), ("ann", "hello"));
    assert_eq!(f.tags.get(SITE_TAG).as_deref(), Some("paris"));
    assert_eq!(f.tags.get(HOPS_TAG).as_deref(), Some("1"));
    assert!(f.tags.get(RELAY_TAG).is_none());

    // Another site's message reaches the subscriber and the browser once.
    lease(&mut t, "room1", true);
    let out = from_site(
        &mut t,
        "room1",
        &format!("@site=london;hops=1;id={BOB};seq=1 room1|bob|yo"),
    );
    let fanned = out
        .iter()
        .filter(|o| matches!(o, Output::FanOut { .. }))
        .count();
    assert_eq!(fanned, 1);
    let shown: Vec<&str> = out
        .iter()
        .filter_map(|o| match o {
            Output::ToWeb { frame, .. } => Some(frame.json.as_str()),
            _ => None,
        })
        .filter(|f| f.contains(r#""text":"yo""#))
        .collect();
    assert_eq!(shown.len(), 1, "{shown:?}");
}

#[test]
fn the_injecting_daemon_repairs_a_remote_sender_on_its_lan() {
    let mut t = hub();
    lease(&mut t, "room1", true);
    let m1 = format!("@site=london;hops=1;id={BOB};seq=1 room1|bob|one");
    from_site(&mut t, "room1", &m1);
    // A LAN peer missed it and asks; bob (at london) cannot hear the NACK, so after the
    // standby the daemon's cache answers, keeping the foreign origin.
    let nack = format!("@id={ALICE};seq=3;kind=nack;for={BOB};seqs=1 room1|alice|");
    let out = t.group("room1", PEER, nack.as_bytes());
    assert!(published(&out).is_empty(), "NACKs stay on their LAN");
    let out = t.poll(Duration::from_secs(2));
    let repairs: Vec<String> = to_group(&out)
        .into_iter()
        .filter(|d| d.contains("repair="))
        .collect();
    assert_eq!(repairs.len(), 1, "{out:?}");
    let f = wire::decode(repairs[0].as_bytes()).expect("decodes");
    assert_eq!((f.text, f.meta.seq), ("one", Some(1)));
    assert_eq!(f.tags.get(SITE_TAG).as_deref(), Some("london"));
    // And it is not published back to the sites when heard again.
    let out = t.group("room1", PEER, repairs[0].as_bytes());
    assert!(published(&out).is_empty());
}

#[test]
fn an_older_tasks_word_on_a_lease_never_overrides_a_newer_one() {
    let mut t = hub();
    let m = |seq: u32| format!("@site=london;hops=1;id={BOB};seq={seq} room1|bob|m{seq}");
    // Task 2 won the lease; task 1's late "given up" (sent on its way out) is ignored.
    lease_of(&mut t, "room1", true, 2);
    lease_of(&mut t, "room1", false, 1);
    assert_eq!(to_group(&from_site(&mut t, "room1", &m(1))).len(), 1);
    // Task 3 says it holds nothing yet: not injected, kept for its takeover.
    lease_of(&mut t, "room1", false, 3);
    assert!(to_group(&from_site(&mut t, "room1", &m(2))).is_empty());
    assert_eq!(to_group(&lease_of(&mut t, "room1", true, 3)).len(), 1);
}

#[test]
fn messages_without_a_key_are_not_kept_for_a_takeover() {
    let mut t = hub();
    // Presence and a bare message, while another daemon injects: not repeated on takeover.
    from_site(
        &mut t,
        "room1",
        &format!("@site=london;hops=1;id={BOB};seq=4;kind=hb room1|bob|"),
    );
    from_site(&mut t, "room1", "@site=london;hops=1 room1|nc|hello");
    assert!(to_group(&lease(&mut t, "room1", true)).is_empty());
    // Injected once held.
    let out = from_site(&mut t, "room1", "@site=london;hops=1 room1|nc|again");
    assert_eq!(to_group(&out).len(), 1);
}
