//! The `[daemon]` table of `rooms.toml`: mcchatd's settings, validated like the rooms.
//!
//! It lives here, beside the rooms, so that every binary reads one file the same way: `mcchat`
//! accepts (and checks) a file with a `[daemon]` table even though it never uses it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::room::{parse_age, parse_history_count};

/// The relay port mcchatd listens on by default.
pub const DEFAULT_RELAY_PORT: u16 = 5554;

/// Where mcchatd's local status socket is by default (systemd's `RuntimeDirectory=mcchat`).
pub const DEFAULT_STATUS_SOCKET: &str = "/run/mcchat/mcchatd.sock";

/// Who may use the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allow {
    /// 127.0.0.0/8 and ::1.
    Loopback,
    /// Every subnet of the daemon's own interfaces, read when it starts or reloads.
    Connected,
    /// A CIDR block.
    Net(IpNet),
}

impl Allow {
    /// Whether `ip` matches, given the connected subnets.
    pub fn matches(&self, ip: IpAddr, connected: &[IpNet]) -> bool {
        match self {
            Self::Loopback => ip.is_loopback(),
            Self::Connected => connected.iter().any(|n| n.contains(&ip)),
            Self::Net(net) => net.contains(&ip),
        }
    }
}

/// mcchatd's settings after validation. Flags override these in the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSettings {
    /// Addresses of the relay sockets (UDP) and of the status listener (TCP, same port).
    pub listen: Vec<SocketAddr>,
    /// Networks allowed to relay and subscribe.
    pub allow: Vec<Allow>,
    /// Whether rooms not in the file are relayed on their derived groups.
    pub adhoc_rooms: bool,
    /// Seconds a subscription lasts unless renewed.
    pub lease_secs: u32,
    /// Most subscriptions at once, over all rooms.
    pub max_subscribers: usize,
    /// Most rooms with subscribers (or joined) at once.
    pub max_rooms: usize,
    /// Datagrams per second one source may have relayed (token bucket rate).
    pub relay_rate: u32,
    /// Burst for `relay_rate`.
    pub relay_burst: u32,
    /// Subscribe and unsubscribe requests per second from one source.
    pub subscribe_rate: u32,
    /// Burst for `subscribe_rate`.
    pub subscribe_burst: u32,
    /// The local status socket; `None` when disabled with `status_socket = ""`.
    pub status_socket: Option<PathBuf>,
    /// TTL / hop limit of datagrams the daemon sends to groups.
    pub ttl: u32,
    /// Interface for group membership and sending; `None` for the system's choice.
    pub iface: Option<String>,
    /// Bytes of recent messages kept to repair for senders that have gone (0: off).
    pub repair_cache_bytes: usize,
    /// How long a message stays in the repair cache.
    pub repair_window: Duration,
    /// Where the history database lives. `None`: the service's state directory
    /// (`$STATE_DIRECTORY`), else `$XDG_STATE_HOME/mcchat`. Empty: no history.
    pub state_dir: Option<PathBuf>,
    /// Messages kept per room unless the room says otherwise (0: none).
    pub history_count: u64,
    /// Age after which messages leave history unless the room says otherwise.
    pub history_age: Duration,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            listen: vec![
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), DEFAULT_RELAY_PORT),
                SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), DEFAULT_RELAY_PORT),
            ],
            allow: vec![Allow::Loopback, Allow::Connected],
            adhoc_rooms: true,
            lease_secs: 60,
            max_subscribers: 10_000,
            max_rooms: 256,
            relay_rate: 200,
            relay_burst: 400,
            subscribe_rate: 10,
            subscribe_burst: 20,
            status_socket: Some(PathBuf::from(DEFAULT_STATUS_SOCKET)),
            ttl: 1,
            iface: None,
            repair_cache_bytes: 16 << 20,
            repair_window: Duration::from_secs(30),
            state_dir: None,
            history_count: 10_000,
            history_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// The TOML type of every `[daemon]` key, for errors that name the key.
pub(crate) const KEY_TYPES: &[(&str, &str)] = &[
    ("listen", "array"),
    ("allow", "array"),
    ("adhoc_rooms", "boolean"),
    ("lease_secs", "integer"),
    ("max_subscribers", "integer"),
    ("max_rooms", "integer"),
    ("relay_rate", "integer"),
    ("relay_burst", "integer"),
    ("subscribe_rate", "integer"),
    ("subscribe_burst", "integer"),
    ("status_socket", "string"),
    ("ttl", "integer"),
    ("iface", "string"),
    ("repair_cache_bytes", "integer"),
    ("repair_window_secs", "integer"),
    ("state_dir", "string"),
    ("history_count", "integer"),
    ("history_age", "string"),
];

/// The `[daemon]` table as written; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDaemon {
    listen: Option<Vec<String>>,
    allow: Option<Vec<String>>,
    adhoc_rooms: Option<bool>,
    lease_secs: Option<i64>,
    max_subscribers: Option<i64>,
    max_rooms: Option<i64>,
    relay_rate: Option<i64>,
    relay_burst: Option<i64>,
    subscribe_rate: Option<i64>,
    subscribe_burst: Option<i64>,
    status_socket: Option<String>,
    ttl: Option<i64>,
    iface: Option<String>,
    repair_cache_bytes: Option<i64>,
    repair_window_secs: Option<i64>,
    state_dir: Option<String>,
    history_count: Option<i64>,
    history_age: Option<String>,
}

fn ranged(key: &str, v: Option<i64>, lo: i64, hi: i64, default: i64) -> Result<i64, String> {
    let v = v.unwrap_or(default);
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(format!("key `{key}`: {v} is out of range; use {lo}-{hi}"))
    }
}

/// Parses one `allow` entry: `loopback`, `connected` or a CIDR block.
pub fn parse_allow(s: &str) -> Result<Allow, String> {
    match s {
        "loopback" => Ok(Allow::Loopback),
        "connected" => Ok(Allow::Connected),
        _ => s
            .parse::<IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
            .map(|n| Allow::Net(n.trunc()))
            .map_err(|_| {
                format!("{s:?} is not `loopback`, `connected` or a network such as 192.0.2.0/24")
            }),
    }
}

impl RawDaemon {
    /// Checks every key; the error names the key.
    pub(crate) fn validate(self) -> Result<DaemonSettings, String> {
        let d = DaemonSettings::default();
        let listen = match self.listen {
            None => d.listen,
            Some(list) if list.is_empty() => {
                return Err(
                    "key `listen`: give at least one address such as \"0.0.0.0:5554\"".into(),
                );
            }
            Some(list) => list
                .iter()
                .map(|s| {
                    s.parse::<SocketAddr>().map_err(|_| {
                        format!(
                            "key `listen`: {s:?} is not an address:port such as \"0.0.0.0:5554\" \
                             or \"[::]:5554\""
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let allow = match self.allow {
            None => d.allow,
            Some(list) => list
                .iter()
                .map(|s| parse_allow(s).map_err(|e| format!("key `allow`: {e}")))
                .collect::<Result<_, _>>()?,
        };
        let int = |key, v, lo, hi, def: usize| -> Result<usize, String> {
            // The ranges below are far inside usize on every platform mcchat builds for.
            ranged(key, v, lo, hi, def as i64).map(|v| v as usize)
        };
        let status_socket = match self.status_socket {
            None => d.status_socket,
            Some(s) if s.is_empty() => None,
            Some(s) => Some(PathBuf::from(s)),
        };
        Ok(DaemonSettings {
            listen,
            allow,
            adhoc_rooms: self.adhoc_rooms.unwrap_or(d.adhoc_rooms),
            lease_secs: int(
                "lease_secs",
                self.lease_secs,
                5,
                3600,
                d.lease_secs as usize,
            )? as u32,
            max_subscribers: int(
                "max_subscribers",
                self.max_subscribers,
                1,
                1_000_000,
                d.max_subscribers,
            )?,
            max_rooms: int("max_rooms", self.max_rooms, 1, 100_000, d.max_rooms)?,
            relay_rate: int(
                "relay_rate",
                self.relay_rate,
                1,
                1_000_000,
                d.relay_rate as usize,
            )? as u32,
            relay_burst: int(
                "relay_burst",
                self.relay_burst,
                1,
                1_000_000,
                d.relay_burst as usize,
            )? as u32,
            subscribe_rate: int(
                "subscribe_rate",
                self.subscribe_rate,
                1,
                1_000_000,
                d.subscribe_rate as usize,
            )? as u32,
            subscribe_burst: int(
                "subscribe_burst",
                self.subscribe_burst,
                1,
                1_000_000,
                d.subscribe_burst as usize,
            )? as u32,
            status_socket,
            ttl: int("ttl", self.ttl, 1, 255, d.ttl as usize)? as u32,
            iface: self.iface.filter(|s| !s.is_empty()),
            repair_cache_bytes: int(
                "repair_cache_bytes",
                self.repair_cache_bytes,
                0,
                1 << 30,
                d.repair_cache_bytes,
            )?,
            repair_window: Duration::from_secs(int(
                "repair_window_secs",
                self.repair_window_secs,
                1,
                3600,
                d.repair_window.as_secs() as usize,
            )? as u64),
            state_dir: self.state_dir.map(PathBuf::from),
            history_count: match self.history_count {
                None => d.history_count,
                Some(n) => {
                    parse_history_count(n).map_err(|e| format!("key `history_count`: {e}"))?
                }
            },
            history_age: match self.history_age {
                None => d.history_age,
                Some(s) => parse_age(&s).map_err(|e| format!("key `history_age`: {e}"))?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_rules_parse_and_match() {
        let connected: Vec<IpNet> = vec!["198.51.100.0/24".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(
            parse_allow("loopback")
                .unwrap()
                .matches(ip("127.0.0.9"), &[])
        );
        assert!(parse_allow("loopback").unwrap().matches(ip("::1"), &[]));
        assert!(
            parse_allow("connected")
                .unwrap()
                .matches(ip("198.51.100.7"), &connected)
        );
        assert!(
            !parse_allow("connected")
                .unwrap()
                .matches(ip("203.0.113.7"), &connected)
        );
        let net = parse_allow("203.0.113.9/24").unwrap();
        assert_eq!(net, Allow::Net("203.0.113.0/24".parse().unwrap()));
        assert!(net.matches(ip("203.0.113.200"), &[]));
        assert!(
            parse_allow("2001:db8::1")
                .unwrap()
                .matches(ip("2001:db8::1"), &[])
        );
        assert!(parse_allow("everyone").is_err());
    }
}
