//! Chat across hosts of a LAN of network namespaces (scripts/lan.sh): h1, h2, h3 on one
//! bridged segment, a multicast-forwarding router, and h4 on a second segment.

use crate::util::{Lan, Proc, require_netns, unique};

fn peer(lan: &Lan, host: &str, room: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["join", room, "--name", host];
    args.extend_from_slice(extra);
    Proc::mcchat(host, Some(&lan.ns(host)), &args, &[]).ready()
}

fn listener(lan: &Lan, host: &str, room: &str) -> Proc {
    Proc::mcchat(host, Some(&lan.ns(host)), &["listen", room], &[]).listening()
}

#[test]
fn three_hosts_chat_on_one_segment() {
    require_netns();
    let lan = Lan::up();
    let room = unique("lan");
    let mut h1 = peer(&lan, "h1", &room, &[]);
    let mut h2 = peer(&lan, "h2", &room, &[]);
    let mut h3 = peer(&lan, "h3", &room, &["--iface", "eth0"]);
    h1.expect_out("-- h3 joined");
    h2.expect_out("-- h3 joined");
    h1.say("from one");
    h2.say("from two");
    h3.say("from three");
    for (p, others) in [
        (&h1, ["h2", "h3"]),
        (&h2, ["h1", "h3"]),
        (&h3, ["h1", "h2"]),
    ] {
        for o in others {
            let line = p.expect_out(&format!("{o}: from "));
            assert!(!line.contains(&p.label), "{line}");
        }
    }
    h1.close_stdin();
    assert!(h1.wait().success());
    h2.expect_out("-- h1 left");
    h3.expect_out("-- h1 left");
}

/// Datagrams from the source host carry the host's address on the segment.
#[test]
fn source_address_is_the_hosts() {
    require_netns();
    let lan = Lan::up();
    let room = unique("src");
    let l = Proc::mcchat("h2", Some(&lan.ns("h2")), &["listen", &room, "--json"], &[]).listening();
    let st = Proc::mcchat(
        "h1",
        Some(&lan.ns("h1")),
        &[
            "send",
            &room,
            "--name",
            "h1",
            "where from",
            "--iface",
            "198.51.100.1",
        ],
        &[],
    )
    .wait();
    assert!(st.success());
    let line = l.expect_out("where from");
    assert!(line.contains("\"from\":\"198.51.100.1:"), "{line}");
}

/// The router forwards multicast (smcroute), so TTL is what keeps chat on the segment: a
/// TTL-1 message stays on h1's segment, a TTL-2 one crosses to h4.
#[test]
fn ttl_1_never_crosses_the_router() {
    require_netns();
    let lan = Lan::up();
    // A configured room, since the router forwards the configured groups.
    let room = "room1";
    let h2 = listener(&lan, "h2", room);
    let h4 = listener(&lan, "h4", room);
    let send = |ttl: &str, text: &str| {
        let st = Proc::mcchat(
            "h1",
            Some(&lan.ns("h1")),
            &["send", room, "--name", "h1", "--ttl", ttl, text],
            &[],
        )
        .wait();
        assert!(st.success());
    };
    send("1", "ttl one");
    send("2", "ttl two");
    h2.expect_out("h1: ttl one");
    h2.expect_out("h1: ttl two");
    h4.expect_out("h1: ttl two");
    // Both took the same path in order; the TTL-1 one would have arrived first.
    assert!(
        !h4.stdout().iter().any(|l| l.contains("ttl one")),
        "{:?}",
        h4.stdout()
    );
    // And the default is TTL 1.
    let st = Proc::mcchat(
        "h1",
        Some(&lan.ns("h1")),
        &["send", room, "--name", "h1", "default"],
        &[],
    )
    .wait();
    assert!(st.success());
    send("2", "marker");
    h2.expect_out("h1: default");
    h4.expect_out("h1: marker");
    assert!(
        !h4.stdout().iter().any(|l| l.contains("default")),
        "{:?}",
        h4.stdout()
    );
}

/// The shipped IPv6 room works between hosts, and its hop limit keeps it on the segment
/// unless raised.
#[test]
fn ipv6_room_across_hosts_and_hop_limit() {
    require_netns();
    let lan = Lan::up();
    let room = "room6";
    let h2 = listener(&lan, "h2", room);
    let h4 = listener(&lan, "h4", room);
    for (hops, text) in [("1", "hop one"), ("2", "hop two")] {
        let st = Proc::mcchat(
            "h1",
            Some(&lan.ns("h1")),
            &[
                "send", room, "--name", "h1", "--ttl", hops, "--iface", "eth0", text,
            ],
            &[],
        )
        .wait();
        assert!(st.success());
    }
    h2.expect_out("h1: hop one");
    h2.expect_out("h1: hop two");
    h4.expect_out("h1: hop two");
    assert!(
        !h4.stdout().iter().any(|l| l.contains("hop one")),
        "{:?}",
        h4.stdout()
    );
}

/// Drops a share of the room's datagrams arriving at `host`, with nftables (netem is not
/// available here); returns how to read how many it dropped.
fn lossy(lan: &Lan, host: &str, percent: u32) -> impl Fn() -> u64 {
    let ns = lan.ns(host);
    let nft = move |args: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "nft"])
            .args(args.split_whitespace())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nft {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    nft("add table inet mcloss");
    nft("add chain inet mcloss in { type filter hook input priority 0 ; }");
    nft(&format!(
        "add rule inet mcloss in udp dport 5555 numgen random mod 100 < {percent} counter drop"
    ));
    move || {
        let listing = nft("list table inet mcloss");
        listing
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

/// Messages lost on one receiver's link are repaired: it ends with every message exactly once,
/// in order, while the other receiver needed no repair.
#[test]
fn loss_on_a_receivers_link_is_repaired() {
    require_netns();
    let lan = Lan::up();
    let dropped = lossy(&lan, "h3", 30);
    let room = "room1";
    let clean =
        Proc::mcchat("h2", Some(&lan.ns("h2")), &["listen", room, "--json"], &[]).listening();
    let lossy_rx =
        Proc::mcchat("h3", Some(&lan.ns("h3")), &["listen", room, "--json"], &[]).listening();
    let mut sender = peer(&lan, "h1", room, &[]);
    const N: usize = 300;
    for i in 1..=N {
        sender.say(&format!("m{i:04}"));
    }
    let last = format!("m{N:04}");
    clean.expect_out(&last);
    lossy_rx.expect_out(&last);
    let texts = |p: &Proc| -> Vec<String> {
        p.stdout()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["kind"] == "message")
            .map(|v| v["text"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    // Wait until every one is in (repairs may still be under way when the last arrives).
    let want: Vec<String> = (1..=N).map(|i| format!("m{i:04}")).collect();
    for i in 1..=N {
        lossy_rx.expect_out(&format!("\"m{i:04}\""));
    }
    assert!(dropped() > 20, "loss really happened: {}", dropped());
    assert_eq!(texts(&lossy_rx), want, "exactly once, in order");
    assert_eq!(texts(&clean), want);
    assert!(
        !lossy_rx
            .stdout()
            .iter()
            .any(|l| l.contains("\"kind\":\"lost\""))
    );
    sender.close_stdin();
    assert!(sender.wait().success());
}
