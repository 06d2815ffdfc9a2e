//! mcchatd's settings: the `[daemon]` table of `rooms.toml`, validated here. mcchat-core's
//! registry keeps the table as written, so `mcchat` reads the same file without knowing
//! these keys.
//!
//! The keys and their TOML types are those of `RawDaemon` (`deny_unknown_fields`), so
//! there is no second list to keep in step. Every value a flag can also set is checked by
//! one function that the file and the flag both call: a [`Limit`] for each integer
//! ([`LEASE_SECS`], [`MAX_SUBSCRIBERS`], [`TTL`], ...), [`parse_listen`], [`parse_allow`],
//! [`iface`] and [`path_or_off`]. `settings` layers the flags over the result.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use mcchat_core::config::from_table;
use mcchat_core::control::{DEFAULT_RELAY_PORT, DEFAULT_STATUS_SOCKET};
use mcchat_core::room::{Registry, parse_age, parse_history_count};
use serde::Deserialize;

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

/// mcchatd's settings after validation. Flags override these (`settings`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSettings {
    /// Addresses of the relay sockets (UDP) and of the status listener (TCP, same port).
    pub listen: Vec<SocketAddr>,
    /// Networks allowed to relay and subscribe.
    pub allow: Vec<Allow>,
    /// Whether rooms not in the file are relayed on their derived groups.
    pub adhoc_rooms: bool,
    /// Seconds a subscription lasts unless renewed ([`LEASE_SECS`]).
    pub lease_secs: u32,
    /// Most subscriptions at once, over all rooms ([`MAX_SUBSCRIBERS`]).
    pub max_subscribers: usize,
    /// Most rooms with subscribers at once ([`MAX_ROOMS`]).
    pub max_rooms: usize,
    /// Datagrams per second one source may have relayed (token bucket rate).
    pub relay_rate: u32,
    /// Burst for `relay_rate`.
    pub relay_burst: u32,
    /// Datagrams per second relayed for all sources together that have not proven their
    /// address with a cookie (`nc`, scripts): anyone can forge those from any address.
    pub unproven_rate: u32,
    /// Burst for `unproven_rate`.
    pub unproven_burst: u32,
    /// Subscriptions one source (an IPv4 address, an IPv6 /64's address, this host) holds.
    pub max_subscriptions_per_source: usize,
    /// Rooms not in the file one source may hold subscriptions in.
    pub max_adhoc_rooms_per_source: usize,
    /// Subscribe and unsubscribe requests per second from one source.
    pub subscribe_rate: u32,
    /// Burst for `subscribe_rate`.
    pub subscribe_burst: u32,
    /// The local status socket; `None` when disabled with `status_socket = ""`.
    pub status_socket: Option<PathBuf>,
    /// TTL / hop limit of datagrams the daemon sends to groups ([`TTL`]).
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
    /// Bytes the history database may use over all rooms: past it the oldest messages go,
    /// whichever room they are in.
    pub history_max_bytes: u64,
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
            unproven_rate: 50,
            unproven_burst: 100,
            max_subscriptions_per_source: 64,
            max_adhoc_rooms_per_source: 16,
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
            history_max_bytes: 1 << 30,
        }
    }
}

/// The `[daemon]` table broke a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: [daemon]: {problem}")]
pub struct DaemonError {
    /// The file.
    pub origin: String,
    /// What is wrong, naming the key, with the remedy.
    pub problem: String,
}

/// A value of a setting that is not allowed, from the file or from a flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// A flag's value is not an integer (in the file, TOML's types are checked first).
    #[error("{0:?} is not a whole number")]
    NotAnInteger(String),
    /// Outside the setting's range.
    #[error("{value} is out of range; use {lo}-{hi}")]
    OutOfRange {
        /// What was given.
        value: i64,
        /// The least allowed.
        lo: i64,
        /// The most allowed.
        hi: i64,
    },
    /// A `listen` address without a port, or no address at all.
    #[error("{0:?} is not an address:port such as \"0.0.0.0:5554\" or \"[::]:5554\"")]
    NotAnAddress(String),
    /// An `allow` entry that is none of the three forms.
    #[error("{0:?} is not `loopback`, `connected` or a network such as 192.0.2.0/24")]
    NotAnAllowRule(String),
}

/// An integer setting: its `[daemon]` key and its range. The file's value and the value of
/// the flag that shadows the key go through the same [`Limit::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The key in `[daemon]`.
    pub key: &'static str,
    /// The least allowed value.
    pub lo: i64,
    /// The most allowed value.
    pub hi: i64,
}

/// `lease_secs` and `--lease-secs`.
pub const LEASE_SECS: Limit = Limit::new("lease_secs", 5, 3600);
/// `max_subscribers` and `--max-subscribers`.
pub const MAX_SUBSCRIBERS: Limit = Limit::new("max_subscribers", 1, 1_000_000);
/// `max_rooms`.
pub const MAX_ROOMS: Limit = Limit::new("max_rooms", 1, 100_000);
/// `relay_rate`.
pub const RELAY_RATE: Limit = Limit::new("relay_rate", 1, 1_000_000);
/// `relay_burst`.
pub const RELAY_BURST: Limit = Limit::new("relay_burst", 1, 1_000_000);
/// `unproven_rate`.
pub const UNPROVEN_RATE: Limit = Limit::new("unproven_rate", 1, 1_000_000);
/// `unproven_burst`.
pub const UNPROVEN_BURST: Limit = Limit::new("unproven_burst", 1, 1_000_000);
/// `max_subscriptions_per_source`.
pub const MAX_SUBSCRIPTIONS_PER_SOURCE: Limit =
    Limit::new("max_subscriptions_per_source", 1, 1_000_000);
/// `max_adhoc_rooms_per_source`.
pub const MAX_ADHOC_ROOMS_PER_SOURCE: Limit = Limit::new("max_adhoc_rooms_per_source", 0, 100_000);
/// `history_max_bytes`: at least 1 MiB (the empty database and one commit), at most 1 PiB.
pub const HISTORY_MAX_BYTES: Limit = Limit::new("history_max_bytes", 1 << 20, 1 << 50);
/// `subscribe_rate`.
pub const SUBSCRIBE_RATE: Limit = Limit::new("subscribe_rate", 1, 1_000_000);
/// `subscribe_burst`.
pub const SUBSCRIBE_BURST: Limit = Limit::new("subscribe_burst", 1, 1_000_000);
/// `ttl` and `--ttl`.
pub const TTL: Limit = Limit::new("ttl", 1, 255);
/// `repair_cache_bytes` (0 turns the cache off).
pub const REPAIR_CACHE_BYTES: Limit = Limit::new("repair_cache_bytes", 0, 1 << 30);
/// `repair_window_secs`.
pub const REPAIR_WINDOW_SECS: Limit = Limit::new("repair_window_secs", 1, 3600);

impl Limit {
    pub(crate) const fn new(key: &'static str, lo: i64, hi: i64) -> Self {
        Self { key, lo, hi }
    }

    /// `value` if it is in range, as the setting's type.
    pub fn check<T: TryFrom<i64>>(self, value: i64) -> Result<T, ValueError> {
        let out_of_range = ValueError::OutOfRange {
            value,
            lo: self.lo,
            hi: self.hi,
        };
        if !(self.lo..=self.hi).contains(&value) {
            return Err(out_of_range);
        }
        // Every range above fits the type its setting is read into.
        T::try_from(value).map_err(|_| out_of_range)
    }

    /// A flag's text, checked like the file's value.
    pub fn parse<T: TryFrom<i64>>(self, text: &str) -> Result<T, ValueError> {
        let value = text
            .trim()
            .parse::<i64>()
            .map_err(|_| ValueError::NotAnInteger(text.to_owned()))?;
        self.check(value)
    }

    /// A clap value parser for the flag that shadows this key.
    pub fn flag<T: TryFrom<i64>>(
        self,
    ) -> impl Fn(&str) -> Result<T, ValueError> + Clone + Send + Sync + 'static {
        move |text| self.parse(text)
    }

    /// The file's value, or `default` when the key is absent; the error names the key.
    fn read<T: TryFrom<i64>>(self, value: Option<i64>, default: T) -> Result<T, String> {
        match value {
            None => Ok(default),
            Some(v) => self
                .check(v)
                .map_err(|e| format!("key `{}`: {e}", self.key)),
        }
    }
}

/// One `listen` address (`--listen` too): an IP address and a port.
pub fn parse_listen(text: &str) -> Result<SocketAddr, ValueError> {
    text.parse()
        .map_err(|_| ValueError::NotAnAddress(text.to_owned()))
}

/// One `allow` entry (`--allow` too): `loopback`, `connected` or a CIDR block (a bare
/// address is its own /32 or /128).
pub fn parse_allow(text: &str) -> Result<Allow, ValueError> {
    match text {
        "loopback" => Ok(Allow::Loopback),
        "connected" => Ok(Allow::Connected),
        _ => text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map(|n| Allow::Net(n.trunc()))
            .map_err(|_| ValueError::NotAnAllowRule(text.to_owned())),
    }
}

/// `iface` and `--iface`: empty means the system's choice.
pub fn iface(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

/// `status_socket` and `--status-socket`: the path, or `None` for "" (off).
pub fn path_or_off(path: PathBuf) -> Option<PathBuf> {
    (!path.as_os_str().is_empty()).then_some(path)
}

/// The `[daemon]` table as written; every key optional. Its fields are the list of keys and
/// their TOML types (integers are read as `i64` so that a value out of range gets the range
/// in its error, not serde's).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    listen: Option<Vec<String>>,
    allow: Option<Vec<String>>,
    adhoc_rooms: Option<bool>,
    lease_secs: Option<i64>,
    max_subscribers: Option<i64>,
    max_rooms: Option<i64>,
    relay_rate: Option<i64>,
    relay_burst: Option<i64>,
    unproven_rate: Option<i64>,
    unproven_burst: Option<i64>,
    max_subscriptions_per_source: Option<i64>,
    max_adhoc_rooms_per_source: Option<i64>,
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
    history_max_bytes: Option<i64>,
}

impl DaemonSettings {
    /// The settings from the registry's `[daemon]` table (defaults where it or a key is
    /// absent). `origin` names the file in errors.
    pub fn from_registry(registry: &Registry, origin: &str) -> Result<Self, DaemonError> {
        let problem = |problem: String| DaemonError {
            origin: origin.to_owned(),
            problem,
        };
        let Some(table) = registry.daemon_table() else {
            return Ok(Self::default());
        };
        let raw: RawDaemon = from_table(table).map_err(|e| problem(e.to_string()))?;
        raw.validate().map_err(problem)
    }
}

impl RawDaemon {
    /// Checks every key; the error names the key.
    fn validate(self) -> Result<DaemonSettings, String> {
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
                .map(|s| parse_listen(s).map_err(|e| format!("key `listen`: {e}")))
                .collect::<Result<_, _>>()?,
        };
        let allow = match self.allow {
            None => d.allow,
            Some(list) => list
                .iter()
                .map(|s| parse_allow(s).map_err(|e| format!("key `allow`: {e}")))
                .collect::<Result<_, _>>()?,
        };
        Ok(DaemonSettings {
            listen,
            allow,
            adhoc_rooms: self.adhoc_rooms.unwrap_or(d.adhoc_rooms),
            lease_secs: LEASE_SECS.read(self.lease_secs, d.lease_secs)?,
            max_subscribers: MAX_SUBSCRIBERS.read(self.max_subscribers, d.max_subscribers)?,
            max_rooms: MAX_ROOMS.read(self.max_rooms, d.max_rooms)?,
            relay_rate: RELAY_RATE.read(self.relay_rate, d.relay_rate)?,
            relay_burst: RELAY_BURST.read(self.relay_burst, d.relay_burst)?,
            unproven_rate: UNPROVEN_RATE.read(self.unproven_rate, d.unproven_rate)?,
            unproven_burst: UNPROVEN_BURST.read(self.unproven_burst, d.unproven_burst)?,
            max_subscriptions_per_source: MAX_SUBSCRIPTIONS_PER_SOURCE.read(
                self.max_subscriptions_per_source,
                d.max_subscriptions_per_source,
            )?,
            max_adhoc_rooms_per_source: MAX_ADHOC_ROOMS_PER_SOURCE.read(
                self.max_adhoc_rooms_per_source,
                d.max_adhoc_rooms_per_source,
            )?,
            subscribe_rate: SUBSCRIBE_RATE.read(self.subscribe_rate, d.subscribe_rate)?,
            subscribe_burst: SUBSCRIBE_BURST.read(self.subscribe_burst, d.subscribe_burst)?,
            status_socket: match self.status_socket {
                None => d.status_socket,
                Some(s) => path_or_off(PathBuf::from(s)),
            },
            ttl: TTL.read(self.ttl, d.ttl)?,
            iface: self.iface.as_deref().and_then(iface),
            repair_cache_bytes: REPAIR_CACHE_BYTES
                .read(self.repair_cache_bytes, d.repair_cache_bytes)?,
            repair_window: Duration::from_secs(
                REPAIR_WINDOW_SECS.read(self.repair_window_secs, d.repair_window.as_secs())?,
            ),
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
            history_max_bytes: HISTORY_MAX_BYTES
                .read(self.history_max_bytes, d.history_max_bytes)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::Cli;

    fn settings(text: &str) -> Result<DaemonSettings, String> {
        let registry = Registry::from_toml(text, "rooms.toml").map_err(|e| e.to_string())?;
        DaemonSettings::from_registry(&registry, "rooms.toml").map_err(|e| e.to_string())
    }

    fn err(text: &str) -> String {
        settings(text).unwrap_err()
    }

    /// The error clap gives for `mcchatd FLAG VALUE`, without its usage lines.
    fn flag_err(flag: &str, value: &str) -> String {
        let e = Cli::try_parse_from(["mcchatd", flag, value]).unwrap_err();
        e.to_string().lines().next().unwrap_or_default().to_owned()
    }

    #[test]
    fn allow_rules_parse_and_match() {
        let connected: Vec<IpNet> = vec!["198.51.100.0/24".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let rule = |s: &str| parse_allow(s).unwrap();
        assert!(rule("loopback").matches(ip("127.0.0.9"), &[]));
        assert!(rule("loopback").matches(ip("::1"), &[]));
        assert!(rule("connected").matches(ip("198.51.100.7"), &connected));
        assert!(!rule("connected").matches(ip("203.0.113.7"), &connected));
        let net = rule("203.0.113.9/24");
        assert_eq!(net, Allow::Net("203.0.113.0/24".parse().unwrap()));
        assert!(net.matches(ip("203.0.113.200"), &[]));
        assert!(rule("2001:db8::1").matches(ip("2001:db8::1"), &[]));
        assert_eq!(
            parse_allow("everyone"),
            Err(ValueError::NotAnAllowRule("everyone".into()))
        );
    }

    #[test]
    fn the_table_is_validated() {
        let d = settings(
            "[daemon]\nlisten = [\"127.0.0.1:6000\"]\nallow = [\"loopback\", \"192.0.2.0/24\"]\n\
             lease_secs = 30\nadhoc_rooms = false\nstatus_socket = \"\"\niface = \"\"\n\
             history_count = 50\nhistory_age = \"12h\"\nstate_dir = \"/srv/mc\"\n\
             [rooms.a]\ngroup = \"239.1.1.1\"\nport = 7\nkeep = true",
        )
        .unwrap();
        assert_eq!(d.listen, vec!["127.0.0.1:6000".parse().unwrap()]);
        assert_eq!(d.lease_secs, 30);
        assert!(!d.adhoc_rooms);
        assert_eq!(d.status_socket, None);
        assert_eq!(d.iface, None, "\"\" is the system's choice");
        assert_eq!(d.allow.len(), 2);
        assert_eq!(d.history_count, 50);
        assert_eq!(d.history_age, Duration::from_secs(12 * 3600));
        assert_eq!(d.state_dir, Some(PathBuf::from("/srv/mc")));
        assert_eq!(settings("").unwrap(), DaemonSettings::default());
        assert_eq!(settings("[daemon]").unwrap(), DaemonSettings::default());
        let plain = DaemonSettings::default();
        assert_eq!((plain.history_count, plain.state_dir), (10_000, None));
    }

    #[test]
    fn errors_name_the_file_the_table_and_the_key() {
        let cases = [
            (
                "[daemon]\nbogus = 1",
                "rooms.toml: [daemon]: unknown field `bogus`, expected one of `listen`, `allow`, \
                 `adhoc_rooms`, `lease_secs`, `max_subscribers`, `max_rooms`, `relay_rate`, \
                 `relay_burst`, `unproven_rate`, `unproven_burst`, \
                 `max_subscriptions_per_source`, `max_adhoc_rooms_per_source`, `subscribe_rate`, `subscribe_burst`, `status_socket`, `ttl`, \
                 `iface`, `repair_cache_bytes`, `repair_window_secs`, `state_dir`, \
                 `history_count`, `history_age`, `history_max_bytes`; remove or correct the key",
            ),
            (
                "[daemon]\nlease_secs = \"60\"",
                "rooms.toml: [daemon]: key `lease_secs`: expected an integer, found a string",
            ),
            (
                "[daemon]\nadhoc_rooms = 1",
                "rooms.toml: [daemon]: key `adhoc_rooms`: expected a boolean, found an integer",
            ),
            (
                "[daemon]\nlisten = \"127.0.0.1:5554\"",
                "rooms.toml: [daemon]: key `listen`: expected an array, found a string",
            ),
            (
                "[daemon]\nallow = [\"loopback\", 10]",
                "rooms.toml: [daemon]: key `allow[1]`: expected a string, found an integer",
            ),
            (
                "[daemon]\nhistory_age = 30",
                "rooms.toml: [daemon]: key `history_age`: expected a string, found an integer",
            ),
            (
                "[daemon]\nallow = [\"everyone\"]",
                "rooms.toml: [daemon]: key `allow`: \"everyone\" is not `loopback`, `connected` \
                 or a network such as 192.0.2.0/24",
            ),
            (
                "[daemon]\nlisten = [\"5554\"]",
                "rooms.toml: [daemon]: key `listen`: \"5554\" is not an address:port such as \
                 \"0.0.0.0:5554\" or \"[::]:5554\"",
            ),
            (
                "[daemon]\nlisten = []",
                "rooms.toml: [daemon]: key `listen`: give at least one address such as \
                 \"0.0.0.0:5554\"",
            ),
            (
                "[daemon]\nhistory_age = \"0s\"",
                "rooms.toml: [daemon]: key `history_age`: \"0s\" is zero; give a positive \
                 duration such as \"30d\"",
            ),
            (
                "[daemon]\nhistory_count = -1",
                "rooms.toml: [daemon]: key `history_count`: -1 is out of range; use \
                 0-100000000 (0 keeps none)",
            ),
            ("daemon = 1", "rooms.toml: [daemon]: must be a table"),
        ];
        for (text, want) in cases {
            assert_eq!(err(text), want, "for {text:?}");
        }
    }

    const LIMITS: [Limit; 10] = [
        LEASE_SECS,
        MAX_SUBSCRIBERS,
        MAX_ROOMS,
        RELAY_RATE,
        RELAY_BURST,
        SUBSCRIBE_RATE,
        SUBSCRIBE_BURST,
        TTL,
        REPAIR_CACHE_BYTES,
        REPAIR_WINDOW_SECS,
    ];

    /// Every integer key takes its bounds and refuses one past each, with the range in the
    /// error.
    #[test]
    fn every_integer_key_has_its_range_in_the_file() {
        for limit in LIMITS {
            let key = limit.key;
            for ok in [limit.lo, limit.hi] {
                assert!(
                    settings(&format!("[daemon]\n{key} = {ok}")).is_ok(),
                    "{key} = {ok}"
                );
            }
            for bad in [limit.lo - 1, limit.hi + 1] {
                assert_eq!(
                    err(&format!("[daemon]\n{key} = {bad}")),
                    format!(
                        "rooms.toml: [daemon]: key `{key}`: {bad} is out of range; use {}-{}",
                        limit.lo, limit.hi
                    )
                );
            }
        }
        // The ones tests elsewhere depend on, written out.
        assert_eq!(
            err("[daemon]\nlease_secs = 1"),
            "rooms.toml: [daemon]: key `lease_secs`: 1 is out of range; use 5-3600"
        );
        assert_eq!(
            err("[daemon]\nrepair_cache_bytes = -5"),
            "rooms.toml: [daemon]: key `repair_cache_bytes`: -5 is out of range; use \
             0-1073741824"
        );
    }

    /// The flags that shadow an integer key check with the same [`Limit`]: the same range,
    /// the same words.
    #[test]
    fn flags_have_the_file_s_ranges() {
        let flagged = [
            ("--lease-secs", LEASE_SECS),
            ("--max-subscribers", MAX_SUBSCRIBERS),
            ("--ttl", TTL),
        ];
        for (flag, limit) in flagged {
            for ok in [limit.lo, limit.hi] {
                let cli = Cli::try_parse_from(["mcchatd", flag, &ok.to_string()]);
                assert!(cli.is_ok(), "{flag} {ok}: {cli:?}");
            }
            for bad in [limit.lo - 1, limit.hi + 1] {
                let e = flag_err(flag, &bad.to_string());
                let want = format!(": {bad} is out of range; use {}-{}", limit.lo, limit.hi);
                assert!(
                    e.starts_with(&format!("error: invalid value '{bad}' for '{flag} <"))
                        && e.ends_with(&want),
                    "{flag} {bad}: {e}"
                );
                let file = err(&format!("[daemon]\n{} = {bad}", limit.key));
                assert!(file.ends_with(&want), "{file}");
            }
        }
        assert_eq!(
            flag_err("--max-subscribers", "0"),
            "error: invalid value '0' for '--max-subscribers <N>': 0 is out of range; use \
             1-1000000",
            "was accepted before the flag shared the file's check"
        );
        assert_eq!(
            flag_err("--lease-secs", "soon"),
            "error: invalid value 'soon' for '--lease-secs <SECS>': \"soon\" is not a whole \
             number"
        );
        let parsed =
            Cli::try_parse_from(["mcchatd", "--max-subscribers", "7", "--ttl", "3"]).unwrap();
        assert_eq!((parsed.max_subscribers, parsed.ttl), (Some(7), Some(3)));
    }

    #[test]
    fn listen_and_allow_flags_have_the_file_s_words() {
        assert_eq!(
            flag_err("--listen", "5554"),
            "error: invalid value '5554' for '--listen <ADDR:PORT>': \"5554\" is not an \
             address:port such as \"0.0.0.0:5554\" or \"[::]:5554\""
        );
        assert_eq!(
            flag_err("--allow", "everyone"),
            "error: invalid value 'everyone' for '--allow <NET>': \"everyone\" is not \
             `loopback`, `connected` or a network such as 192.0.2.0/24"
        );
    }
}
