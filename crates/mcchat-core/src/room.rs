//! Rooms: their names, their groups, and the validated registry built from `rooms.toml`.
//!
//! Parsing happens in two steps, so that an invalid registry cannot be represented: the TOML
//! text becomes a raw serde struct per room, and [`Registry::from_toml`] turns those into
//! [`Room`]s, checking every rule once, with errors that name the file, the room and the key.
//! A [`Room`] can only be had from a [`Registry`]: its fields are private.
//! The `[daemon]` table is mcchatd's: the registry checks only that it is a table and keeps
//! it for mcchatd to validate, so `mcchat` reads a file with one without knowing its keys.
//! This module reads no files; [`crate::config`] finds and reads them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

use crate::config::from_table;

/// Longest room name, in bytes (room names are ASCII).
pub const MAX_ROOM_NAME: usize = 64;

/// The block derived groups are taken from: 239.255.128.0/17, the upper half of the IPv4
/// organisation-local scope (RFC 2365), so configured rooms in 239.255.0.0/17 never collide.
pub const DERIVED_BASE: Ipv4Addr = Ipv4Addr::new(239, 255, 128, 0);
/// First port of the derived range.
pub const DERIVED_PORT_BASE: u16 = 20000;
/// How many ports the derived range spans.
pub const DERIVED_PORT_SPAN: u16 = 10000;

/// A room name: 1 to 64 of `A-Z a-z 0-9 . _ -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(String);

impl RoomName {
    /// Whether `name` follows the room-name rules.
    pub fn is_valid(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= MAX_ROOM_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    }

    /// Checks `name` against the rules.
    pub fn new(name: &str) -> Result<Self, RoomError> {
        if Self::is_valid(name) {
            Ok(Self(name.to_owned()))
        } else {
            Err(RoomError::BadName(name.to_owned()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a room name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoomError {
    /// The name breaks the rules.
    #[error("invalid room name {0:?}: use 1-{MAX_ROOM_NAME} characters from A-Z a-z 0-9 . _ -")]
    BadName(String),
}

/// Where a room's group came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomSource {
    /// A `[rooms.NAME]` table.
    Configured,
    /// [`derive_group`], for a name not in the file.
    Derived,
}

/// A room, ready to join. Only a [`Registry`] makes one, so every `Room` has passed its
/// checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    name: RoomName,
    group: SocketAddr,
    ttl: Option<u32>,
    description: Option<String>,
    keep: bool,
    history_count: Option<u64>,
    history_age: Option<Duration>,
    source: RoomSource,
}

impl Room {
    /// The room's name.
    pub fn name(&self) -> &RoomName {
        &self.name
    }

    /// Its multicast group and port: always a multicast address with a non-zero port.
    pub fn group(&self) -> SocketAddr {
        self.group
    }

    /// A TTL / hop limit for this room (1-255), overriding the default of 1.
    pub fn ttl(&self) -> Option<u32> {
        self.ttl
    }

    /// Free text for `mcchat rooms`.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// mcchatd stays joined to this room's group even with no subscribers.
    pub fn keep(&self) -> bool {
        self.keep
    }

    /// History kept by mcchatd: at most this many messages (0: none), overriding the
    /// `[daemon]` default.
    pub fn history_count(&self) -> Option<u64> {
        self.history_count
    }

    /// History kept by mcchatd: messages at most this old, overriding the `[daemon]` default.
    pub fn history_age(&self) -> Option<Duration> {
        self.history_age
    }

    /// Configured or derived.
    pub fn source(&self) -> RoomSource {
        self.source
    }
}

/// The group and port for a room name that is not in the file.
///
/// FNV-1a (32-bit) over the name's bytes gives `h`; the group is `239.255.128.0 + (h & 0x7fff)`
/// and the port is `20000 + (h >> 15) % 10000`. The function is part of the protocol: two
/// machines must meet on the same group, so it never changes.
pub fn derive_group(name: &RoomName) -> SocketAddr {
    let h = fnv1a32(name.as_str().as_bytes());
    let ip = Ipv4Addr::from(u32::from(DERIVED_BASE) | (h & 0x7fff));
    // The modulus keeps the value below 10000, so it fits in u16.
    let port = DERIVED_PORT_BASE + ((h >> 15) % u32::from(DERIVED_PORT_SPAN)) as u16;
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// FNV-1a, 32-bit (<http://www.isthe.com/chongo/tech/comp/fnv/>).
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h: u32, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// A config file failed to load. Every message names the file and, where it applies, the
/// room and the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Not valid TOML.
    #[error("{origin}:{line}:{column}: {message}")]
    Syntax {
        /// The file.
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the TOML parser said.
        message: String,
    },
    /// A top-level key that is not `rooms`, `daemon`, `web` or `sites`.
    #[error(
        "{origin}: unknown key {key:?} at the top level (expected `rooms`, `daemon`, `web` or `sites`)"
    )]
    UnknownTopLevel {
        /// The file.
        origin: String,
        /// The key.
        key: String,
    },
    /// `rooms` is not a table of tables.
    #[error("{origin}: `rooms` must be a table of `[rooms.NAME]` tables")]
    RoomsNotTable {
        /// The file.
        origin: String,
    },
    /// `daemon`, `web` or `sites` is not a table (their keys are mcchatd's to check).
    #[error("{origin}: [{key}]: must be a table")]
    DaemonNotTable {
        /// The file.
        origin: String,
        /// `daemon`, `web` or `sites`.
        key: String,
    },
    /// A room table broke a rule.
    #[error("{origin}: room {room:?}: {problem}")]
    Room {
        /// The file.
        origin: String,
        /// The room.
        room: String,
        /// What is wrong, naming the key.
        problem: String,
    },
    /// Two rooms on one group and port.
    #[error(
        "{origin}: rooms {first:?} and {second:?} both use {group}; give each room its own group:port"
    )]
    DuplicateGroup {
        /// The file.
        origin: String,
        /// The first room.
        first: String,
        /// The second room.
        second: String,
        /// The shared group and port.
        group: SocketAddr,
    },
}

/// One `[rooms.NAME]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoom {
    group: String,
    port: i64,
    #[serde(default)]
    ttl: Option<i64>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    keep: bool,
    #[serde(default)]
    history_count: Option<i64>,
    #[serde(default)]
    history_age: Option<String>,
}

/// The validated contents of a rooms file: the configured rooms, and the `[daemon]` table as
/// written (mcchatd validates it).
#[derive(Debug, Clone, PartialEq)]
pub struct Registry {
    rooms: BTreeMap<RoomName, Room>,
    daemon: Option<toml::Table>,
    web: Option<toml::Table>,
    sites: Option<toml::Table>,
}

impl Registry {
    /// Parses and validates `rooms.toml` text. `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Syntax {
                origin: origin.to_owned(),
                line,
                column,
                message: e.message().trim().to_owned(),
            }
        })?;
        let mut rooms = BTreeMap::new();
        let mut daemon = None;
        let mut web = None;
        let mut sites = None;
        for (key, value) in table {
            if matches!(key.as_str(), "daemon" | "web" | "sites") {
                let toml::Value::Table(t) = value else {
                    return Err(ConfigError::DaemonNotTable {
                        origin: origin.to_owned(),
                        key,
                    });
                };
                match key.as_str() {
                    "daemon" => daemon = Some(t),
                    "web" => web = Some(t),
                    _ => sites = Some(t),
                }
                continue;
            }
            if key != "rooms" {
                return Err(ConfigError::UnknownTopLevel {
                    origin: origin.to_owned(),
                    key,
                });
            }
            let toml::Value::Table(entries) = value else {
                return Err(ConfigError::RoomsNotTable {
                    origin: origin.to_owned(),
                });
            };
            for (name, value) in entries {
                let room = room_from_value(&name, value).map_err(|problem| ConfigError::Room {
                    origin: origin.to_owned(),
                    room: name.clone(),
                    problem,
                })?;
                rooms.insert(room.name.clone(), room);
            }
        }
        let registry = Self {
            rooms,
            daemon,
            web,
            sites,
        };
        registry.check_unique(origin)?;
        Ok(registry)
    }

    fn check_unique(&self, origin: &str) -> Result<(), ConfigError> {
        let mut seen: BTreeMap<SocketAddr, &RoomName> = BTreeMap::new();
        for room in self.rooms.values() {
            if let Some(first) = seen.insert(room.group, &room.name) {
                return Err(ConfigError::DuplicateGroup {
                    origin: origin.to_owned(),
                    first: first.to_string(),
                    second: room.name.to_string(),
                    group: room.group,
                });
            }
        }
        Ok(())
    }

    /// The room called `name`: the configured one, or one on its derived group.
    pub fn resolve(&self, name: &str) -> Result<Room, RoomError> {
        let name = RoomName::new(name)?;
        if let Some(room) = self.rooms.get(&name) {
            return Ok(room.clone());
        }
        let group = derive_group(&name);
        Ok(Room {
            name,
            group,
            ttl: None,
            description: None,
            keep: false,
            history_count: None,
            history_age: None,
            source: RoomSource::Derived,
        })
    }

    /// The configured rooms, by name.
    pub fn rooms(&self) -> impl Iterator<Item = &Room> {
        self.rooms.values()
    }

    /// The configured room called `name`, if any.
    pub fn configured(&self, name: &str) -> Option<&Room> {
        self.rooms.values().find(|r| r.name.as_str() == name)
    }

    /// The `[daemon]` table as written, if the file has one: mcchatd's settings, which
    /// mcchatd validates (`mcchat` has no use for them).
    pub fn daemon_table(&self) -> Option<&toml::Table> {
        self.daemon.as_ref()
    }

    /// The `[web]` table as written (mcchatd's web gateway), if the file has one.
    pub fn web_table(&self) -> Option<&toml::Table> {
        self.web.as_ref()
    }

    /// The `[sites]` table as written (mcchatd's bridge to other sites over NATS), if the
    /// file has one.
    pub fn sites_table(&self) -> Option<&toml::Table> {
        self.sites.as_ref()
    }
}

fn room_from_value(name: &str, value: toml::Value) -> Result<Room, String> {
    let name = RoomName::new(name).map_err(|e| e.to_string())?;
    let toml::Value::Table(table) = value else {
        return Err("must be a table with `group` and `port`".to_owned());
    };
    let raw: RawRoom = from_table(&table).map_err(|e| e.to_string())?;
    let ip: IpAddr = raw.group.parse().map_err(|_| {
        format!(
            "key `group`: {:?} is not an IP address; use a multicast address such as 239.255.77.1",
            raw.group
        )
    })?;
    if !ip.is_multicast() {
        return Err(format!(
            "key `group`: {ip} is not a multicast address; use one in 239.255.0.0/16 (IPv4) \
             or ff15::/16 (IPv6)"
        ));
    }
    let port = u16::try_from(raw.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("key `port`: {} is not a port; use 1-65535", raw.port))?;
    let ttl = raw
        .ttl
        .map(|t| {
            u32::try_from(t)
                .ok()
                .filter(|t| (1..=255).contains(t))
                .ok_or_else(|| format!("key `ttl`: {t} is out of range; use 1-255"))
        })
        .transpose()?;
    let history_count = raw
        .history_count
        .map(|n| parse_history_count(n).map_err(|e| format!("key `history_count`: {e}")))
        .transpose()?;
    let history_age = raw
        .history_age
        .map(|s| parse_age(&s).map_err(|e| format!("key `history_age`: {e}")))
        .transpose()?;
    Ok(Room {
        name,
        group: SocketAddr::new(ip, port),
        ttl,
        description: raw.description,
        keep: raw.keep,
        history_count,
        history_age,
        source: RoomSource::Configured,
    })
}

/// The most messages of one room mcchatd keeps in history.
pub const MAX_HISTORY_COUNT: u64 = 100_000_000;

/// Checks a `history_count`.
pub fn parse_history_count(n: i64) -> Result<u64, String> {
    u64::try_from(n)
        .ok()
        .filter(|n| *n <= MAX_HISTORY_COUNT)
        .ok_or_else(|| format!("{n} is out of range; use 0-{MAX_HISTORY_COUNT} (0 keeps none)"))
}

/// Parses a duration such as `30d`, `12h` or `90s` (humantime's syntax): a `history_age`,
/// or `mcchat history --since`.
pub fn parse_age(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write it like \"30d\", \"12h\" or \"90s\"")
    })?;
    if d.is_zero() {
        return Err(format!(
            "{s:?} is zero; give a positive duration such as \"30d\""
        ));
    }
    Ok(d)
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SHIPPED: &str = include_str!("../../../rooms.toml");

    fn err(text: &str) -> String {
        Registry::from_toml(text, "rooms.toml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn shipped_file_is_valid_and_has_the_promised_rooms() {
        let reg = Registry::from_toml(SHIPPED, "rooms.toml").unwrap();
        let r1 = reg.resolve("room1").unwrap();
        assert_eq!(r1.group(), "239.255.77.1:5555".parse().unwrap());
        assert_eq!(r1.source(), RoomSource::Configured);
        assert_eq!(
            reg.resolve("room2").unwrap().group(),
            "239.255.77.2:5556".parse().unwrap()
        );
        assert!(reg.rooms().any(|r| r.group().is_ipv6()));
    }

    #[test]
    fn unknown_key_in_every_shipped_room_is_rejected() {
        let reg = Registry::from_toml(SHIPPED, "rooms.toml").unwrap();
        for room in reg.rooms() {
            let header = format!("[rooms.{}]", room.name);
            let planted = SHIPPED.replace(&header, &format!("{header}\nbogus = 1"));
            assert_ne!(planted, SHIPPED, "header {header} not found");
            let e = err(&planted);
            assert!(
                e.contains(&format!("room \"{}\"", room.name)) && e.contains("bogus"),
                "{e}"
            );
        }
        let e = err(&format!("bogus = 1\n{SHIPPED}"));
        assert_eq!(
            e,
            "rooms.toml: unknown key \"bogus\" at the top level (expected `rooms`, `daemon`, `web` or `sites`)"
        );
    }

    #[test]
    fn errors_name_file_room_and_key() {
        let cases = [
            (
                "[rooms.a]\ngroup = \"10.1.2.3\"\nport = 1",
                "rooms.toml: room \"a\": key `group`: 10.1.2.3 is not a multicast address; use \
                 one in 239.255.0.0/16 (IPv4) or ff15::/16 (IPv6)",
            ),
            (
                "[rooms.a]\ngroup = \"239.1.1.1\"\nport = 0",
                "rooms.toml: room \"a\": key `port`: 0 is not a port; use 1-65535",
            ),
            (
                "[rooms.a]\ngroup = \"239.1.1.1\"\nport = 70000",
                "rooms.toml: room \"a\": key `port`: 70000 is not a port; use 1-65535",
            ),
            (
                "[rooms.a]\ngroup = \"nope\"\nport = 1",
                "rooms.toml: room \"a\": key `group`: \"nope\" is not an IP address; use a \
                 multicast address such as 239.255.77.1",
            ),
            (
                "[rooms.\"a b\"]\ngroup = \"239.1.1.1\"\nport = 1",
                "rooms.toml: room \"a b\": invalid room name \"a b\": use 1-64 characters from \
                 A-Z a-z 0-9 . _ -",
            ),
            (
                "[rooms.a]\ngroup = \"239.1.1.1\"\nport = 1\nttl = 0",
                "rooms.toml: room \"a\": key `ttl`: 0 is out of range; use 1-255",
            ),
            (
                "[rooms.a]\ngroup = \"239.1.1.1\"\nport = 7\n[rooms.b]\ngroup = \"239.1.1.1\"\n\
                 port = 7",
                "rooms.toml: rooms \"a\" and \"b\" both use 239.1.1.1:7; give each room its own \
                 group:port",
            ),
            (
                "[rooms.a]\nport = 7",
                "rooms.toml: room \"a\": missing field `group`",
            ),
            (
                "rooms = 3",
                "rooms.toml: `rooms` must be a table of `[rooms.NAME]` tables",
            ),
            (
                "[rooms]\na = 3",
                "rooms.toml: room \"a\": must be a table with `group` and `port`",
            ),
            (
                "[rooms.a]\ngroup = \"239.1.1.1\"\nport = 7\nhistory_count = -1",
                "rooms.toml: room \"a\": key `history_count`: -1 is out of range; use \
                 0-100000000 (0 keeps none)",
            ),
            (
                "[rooms.a]\ngroup = \"239.1.1.1\"\nport = 7\nhistory_age = \"forever\"",
                "rooms.toml: room \"a\": key `history_age`: \"forever\" is not a duration \
                 (expected number at 0); write it like \"30d\", \"12h\" or \"90s\"",
            ),
            (
                "[rooms.a]\ngroup = \"239.1.1.1\"\nport = 7\nhistory_age = 30",
                "rooms.toml: room \"a\": key `history_age`: expected a string, found an integer",
            ),
            (
                "[rooms.a]\ngroup = \"239.1.1.1\"\nport = \"7\"",
                "rooms.toml: room \"a\": key `port`: expected an integer, found a string",
            ),
            (
                "[rooms.a]\ngroup = \"239.1.1.1\"\nport = 7\nkeep = \"yes\"",
                "rooms.toml: room \"a\": key `keep`: expected a boolean, found a string",
            ),
            (
                "[rooms.a]\ngroup = [\"239.1.1.1\"]\nport = 7",
                "rooms.toml: room \"a\": key `group`: expected a string, found an array",
            ),
            (
                "[rooms.a]\ngroup = \"239.1.1.1\"\nport = 7\nttl = 1.5",
                "rooms.toml: room \"a\": key `ttl`: expected an integer, found a float",
            ),
            (
                "[rooms.a]\ngroup = \"239.1.1.1\"\nport = 7\nbogus = 1",
                "rooms.toml: room \"a\": unknown field `bogus`, expected one of `group`, `port`, \
                 `ttl`, `description`, `keep`, `history_count`, `history_age`; remove or correct \
                 the key",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(err(text), want, "for {text:?}");
        }
    }

    #[test]
    fn rooms_override_history_settings() {
        let reg = Registry::from_toml(
            "[rooms.a]\ngroup = \"239.1.1.1\"\nport = 7\nhistory_count = 0\n\
             [rooms.b]\ngroup = \"239.1.1.2\"\nport = 7\nhistory_age = \"7d\"",
            "x",
        )
        .unwrap();
        let a = reg.resolve("a").unwrap();
        assert_eq!((a.history_count(), a.history_age()), (Some(0), None));
        let b = reg.resolve("b").unwrap();
        assert_eq!(b.history_age(), Some(Duration::from_secs(7 * 24 * 3600)));
        assert_eq!(b.history_count(), None);
    }

    /// The `[daemon]` table is mcchatd's to check: the registry keeps it as written, so a
    /// file with one (even with keys this mcchat has never heard of) serves `mcchat`.
    #[test]
    fn the_daemon_table_is_kept_for_mcchatd() {
        let reg = Registry::from_toml(
            "[daemon]\nlease_secs = 30\nfrom_a_newer_mcchatd = true\n\
             [rooms.a]\ngroup = \"239.1.1.1\"\nport = 7\nkeep = true",
            "x",
        )
        .unwrap();
        let d = reg.daemon_table().unwrap();
        assert_eq!(
            d.get("lease_secs").and_then(toml::Value::as_integer),
            Some(30)
        );
        assert_eq!(d.len(), 2);
        assert!(reg.resolve("a").unwrap().keep());
        assert_eq!(Registry::from_toml("", "x").unwrap().daemon_table(), None);
        assert_eq!(err("daemon = 1"), "rooms.toml: [daemon]: must be a table");
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let e = err("[rooms.a]\ngroup = \"239.1.1.1\"\nport = = 3\n");
        assert!(e.starts_with("rooms.toml:3:"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn same_group_on_other_ports_is_allowed() {
        let reg = Registry::from_toml(
            "[rooms.a]\ngroup = \"239.1.1.1\"\nport = 7\n[rooms.b]\ngroup = \"239.1.1.1\"\nport = 8",
            "x",
        )
        .unwrap();
        assert_eq!(reg.rooms().count(), 2);
    }

    #[test]
    fn derived_groups_are_stable() {
        // Fixed vectors: changing them breaks every peer already deployed.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
        let lunch = derive_group(&RoomName::new("lunch").unwrap());
        let h = fnv1a32(b"lunch");
        assert_eq!(
            lunch,
            SocketAddr::new(
                Ipv4Addr::from(0xefff_8000 | (h & 0x7fff)).into(),
                20000 + ((h >> 15) % 10000) as u16
            )
        );
        assert_eq!(lunch.to_string(), "239.255.246.31:26045");
    }

    #[test]
    fn unknown_rooms_resolve_to_derived_groups() {
        let reg = Registry::from_toml("", "x").unwrap();
        let r = reg.resolve("lunch").unwrap();
        assert_eq!(r.source(), RoomSource::Derived);
        assert_eq!(r.group(), derive_group(r.name()));
        assert!(reg.resolve("no spaces").is_err());
    }

    proptest! {
        #[test]
        fn derived_group_is_in_range(name in "[A-Za-z0-9._-]{1,64}") {
            let g = derive_group(&RoomName::new(&name).unwrap());
            let IpAddr::V4(ip) = g.ip() else { panic!("not v4") };
            prop_assert_eq!(u32::from(ip) & 0xffff_8000, 0xefff_8000);
            prop_assert!((20000..30000).contains(&g.port()));
        }

        #[test]
        fn any_text_gives_a_registry_or_an_error(text in ".{0,200}") {
            let _ = Registry::from_toml(&text, "x");
        }
    }
}
