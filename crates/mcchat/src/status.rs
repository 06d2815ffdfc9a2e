//! `mcchat status`: reads mcchatd's status document (TCP on the relay port, or the local Unix
//! socket) and shows it as a table, or as the JSON it is.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;
use mcchat_core::control::Status;
use mcchat_core::sanitize::for_terminal;

use crate::cli::StatusArgs;
use crate::daemon::{self, Endpoint};
use crate::output::Stdout;

const TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn run(args: &StatusArgs) -> Result<()> {
    let endpoint = Endpoint::new(args.via.as_deref(), args.socket.clone());
    let (status, text) = daemon::status(&endpoint, TIMEOUT).await?;
    let mut out = Stdout::new();
    if args.json {
        // As the daemon wrote it: fields this mcchat does not know are passed on.
        return out.line(&text);
    }
    out.write_bytes(render(&status).as_bytes())
}

/// The document as a table. Every string is sanitised: the document carries names clients
/// chose.
fn render(v: &Status) -> String {
    let mut o = String::new();
    // Writing to a String cannot fail; results are ignored for that reason.
    let _ = writeln!(
        o,
        "mcchatd {} up {} s, rooms from {}, listening on {}, {} subscribers, {} web clients",
        for_terminal(&v.version),
        v.uptime_secs,
        for_terminal(&v.rooms_file),
        v.listen
            .iter()
            .map(|a| for_terminal(a))
            .collect::<Vec<_>>()
            .join(" "),
        v.subscribers,
        v.web_clients,
    );
    let _ = writeln!(
        o,
        "{:<20} {:<26} {:<6} {:<4} SUBSCRIBERS",
        "ROOM", "GROUP:PORT", "JOINED", "WEB"
    );
    for room in &v.rooms {
        let subs: Vec<String> = room
            .subscribers
            .iter()
            .map(|sub| match &sub.addr {
                Some(addr) => format!("{}@{}", for_terminal(&sub.name), for_terminal(addr)),
                None => for_terminal(&sub.name).into_owned(),
            })
            .collect();
        let _ = writeln!(
            o,
            "{:<20} {:<26} {:<6} {:<4} {}{}",
            for_terminal(&room.name),
            for_terminal(&room.group),
            if room.joined { "yes" } else { "no" },
            room.web_clients,
            subs.len(),
            if subs.is_empty() {
                String::new()
            } else {
                format!(" ({})", subs.join(", "))
            }
        );
    }
    let c = &v.counters;
    let _ = writeln!(
        o,
        "received {} unicast, {} multicast; relayed {} to groups, {} to subscribers; \
         {} subscribed, {} expired, {} challenges",
        c.received_unicast,
        c.received_multicast,
        c.relayed_to_group,
        c.relayed_to_subscribers,
        c.subscribed,
        c.expired,
        c.challenges,
    );
    let dropped: Vec<String> = c
        .dropped
        .iter()
        .map(|(why, n)| format!("{}={n}", for_terminal(why)))
        .collect();
    let r = &v.repair_cache;
    let _ = writeln!(
        o,
        "repair cache: {} messages, {} bytes; repaired {} to groups, {} to subscribers",
        r.messages, r.bytes, r.repairs_to_group, r.repairs_to_subscribers,
    );
    let _ = writeln!(
        o,
        "history: {}",
        match &v.history {
            None => "off".to_owned(),
            Some(h) => format!("{} ({} not stored)", for_terminal(&h.path), h.dropped),
        }
    );
    if let Some(site) = &v.site {
        let _ = writeln!(o, "{}", site_line(site));
    }
    let _ = writeln!(
        o,
        "dropped: {}",
        if dropped.is_empty() {
            "none".to_owned()
        } else {
            dropped.join(" ")
        }
    );
    o
}

/// The link to other sites, on one line.
fn site_line(s: &mcchat_core::control::SiteStatus) -> String {
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.iter()
                .map(|r| for_terminal(r))
                .collect::<Vec<_>>()
                .join(" ")
        }
    };
    format!(
        "site {}: {} {}{}; rooms {}; injecting {}; published {}, received {} ({} duplicates, {} own), {} not published, {} resumes, {} disconnects{}",
        for_terminal(&s.site),
        if s.connected {
            "connected to"
        } else {
            "not connected to"
        },
        s.server
            .as_deref()
            .map_or_else(|| "NATS".into(), for_terminal),
        if s.jetstream {
            " (JetStream)"
        } else {
            " (core NATS only)"
        },
        list(&s.rooms),
        list(&s.injecting),
        s.published,
        s.received,
        s.duplicates,
        s.own,
        s.publish_dropped,
        s.resumes,
        s.disconnects,
        s.last_error
            .as_deref()
            .map_or_else(String::new, |e| format!(
                "; last error: {}",
                for_terminal(e)
            )),
    )
}

#[cfg(test)]
mod tests {
    use mcchat_core::control::{
        Counters, HistoryStatus, RepairCacheStats, RoomStatus, SubscriberStatus,
    };

    use super::*;

    #[test]
    fn the_table_shows_every_part_and_sanitises_names() {
        let status = Status {
            version: "0.1.0".into(),
            uptime_secs: 42,
            rooms_file: "built-in rooms".into(),
            listen: vec!["127.0.0.1:5554".into(), "[::1]:5554".into()],
            subscribers: 1,
            joined_groups: vec!["239.255.77.1:5555".into()],
            rooms: vec![RoomStatus {
                name: "room1".into(),
                group: "239.255.77.1:5555".into(),
                configured: true,
                keep: false,
                joined: true,
                subscribers: vec![SubscriberStatus {
                    addr: Some("127.0.0.1:40000".into()),
                    name: "al\u{1b}[2Jice".into(),
                    expires_in_secs: 59,
                }],
                web_clients: 2,
            }],
            counters: Counters {
                received_unicast: 1,
                received_multicast: 2,
                relayed_to_group: 3,
                relayed_to_subscribers: 4,
                subscribed: 7,
                expired: 10,
                challenges: 6,
                dropped: [("bad_cookie".to_owned(), 11)].into(),
                ..Counters::default()
            },
            repair_cache: RepairCacheStats {
                messages: 13,
                bytes: 14,
                repairs_to_group: 16,
                repairs_to_subscribers: 17,
                ..RepairCacheStats::default()
            },
            history: Some(HistoryStatus {
                path: "/var/lib/mcchat/history.sqlite3".into(),
                dropped: 19,
            }),
            web_clients: 3,
            site: None,
        };
        let table = render(&status);
        let want = [
            "mcchatd 0.1.0 up 42 s, rooms from built-in rooms, listening on 127.0.0.1:5554 \
             [::1]:5554, 1 subscribers, 3 web clients",
            "ROOM                 GROUP:PORT                 JOINED WEB  SUBSCRIBERS",
            &format!(
                "room1                239.255.77.1:5555          yes    2    1 ({}@127.0.0.1:40000)",
                for_terminal("al\u{1b}[2Jice")
            ),
            "received 1 unicast, 2 multicast; relayed 3 to groups, 4 to subscribers; \
             7 subscribed, 10 expired, 6 challenges",
            "repair cache: 13 messages, 14 bytes; repaired 16 to groups, 17 to subscribers",
            "history: /var/lib/mcchat/history.sqlite3 (19 not stored)",
            "dropped: bad_cookie=11",
        ];
        assert_eq!(table.lines().collect::<Vec<_>>(), want);
        assert!(!table.contains('\u{1b}'), "{table:?}");
        let off = render(&Status {
            history: None,
            counters: Counters::default(),
            ..status.clone()
        });
        assert!(
            off.contains("\nhistory: off\n") && off.ends_with("dropped: none\n"),
            "{off}"
        );
        let site = mcchat_core::control::SiteStatus {
            site: "paris".into(),
            connected: true,
            server: Some("127.0.0.1:4222".into()),
            jetstream: true,
            rooms: vec!["room1".into(), "room2".into()],
            injecting: vec!["room1".into()],
            published: 5,
            received: 6,
            duplicates: 1,
            own: 2,
            publish_dropped: 0,
            resumes: 3,
            refused: 0,
            disconnects: 4,
            last_error: Some("x\u{1b}y".into()),
        };
        let with_site = render(&Status {
            site: Some(site),
            ..status
        });
        assert!(
            with_site.contains(&format!(
                "\nsite paris: connected to 127.0.0.1:4222 (JetStream); rooms room1 room2; injecting room1; published 5, received 6 (1 duplicates, 2 own), 0 not published, 3 resumes, 4 disconnects; last error: {}\n",
                for_terminal("x\u{1b}y")
            )),
            "{with_site}"
        );
    }
}
