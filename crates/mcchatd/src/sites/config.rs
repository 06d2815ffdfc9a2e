//! The `[sites]` table of rooms.toml and `--site` / `--nats`: whether this daemon bridges its
//! rooms to other sites over NATS, as which site, through which servers, with which
//! credentials, and which rooms (docs/PROTOCOL.md 8, README "Several sites").

use std::path::PathBuf;
use std::time::Duration;

use mcchat_core::config::from_table;
use mcchat_core::room::{Registry, parse_age};
use serde::Deserialize;

/// Longest site name: a writer leaves 36 bytes for hop-by-hop tags (`tags::HOP_RESERVE`),
/// and a message from another site takes `@site=NAME;hops=1;relay=0123abcd ` (29 bytes and
/// the name) on its way into the far LAN's group; so even the longest message fits.
pub(crate) const MAX_SITE: usize = 7;

/// Which rooms are bridged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Bridged {
    /// Every configured room (the default), and ad-hoc ones if `adhoc`.
    All { adhoc: bool },
    /// These rooms only.
    Only(Vec<String>),
}

/// TLS to the NATS servers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Tls {
    /// Refuse servers that do not offer TLS.
    pub required: bool,
    /// Root certificates to trust (PEM), besides the system's.
    pub ca: Option<PathBuf>,
    /// A client certificate and its key (PEM), for servers that ask for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// How the daemon proves who it is to NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Credentials {
    #[default]
    None,
    /// A `.creds` file (JWT and NKey seed).
    File(PathBuf),
    Token(String),
    User {
        user: String,
        password: String,
    },
}

/// The bridge's settings after validation. `nats` empty: the bridge is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SitesSettings {
    /// This daemon's site: the `site` tag of what it publishes.
    pub site: String,
    /// Server URLs (`nats://host:4222`, `tls://host:4222`).
    pub nats: Vec<String>,
    pub credentials: Credentials,
    pub tls: Tls,
    pub rooms: Bridged,
    /// How long the JetStream stream keeps messages (what a site that lost part of it can
    /// still fetch).
    pub max_age: Duration,
    /// The stream's duplicate window (copies of one `instance:seq` within it are stored once).
    pub duplicate_window: Duration,
    /// Replicas of the stream and the lease bucket (1, or 3 on a cluster).
    pub replicas: usize,
    /// The JetStream domain to use (a hub's, from a leaf node without JetStream of its own).
    pub domain: Option<String>,
    /// How long an injection lease lives without renewal: the other daemon of a LAN takes
    /// over within about this after the holder stops.
    pub lease: Duration,
}

impl Default for SitesSettings {
    fn default() -> Self {
        Self {
            site: String::new(),
            nats: Vec::new(),
            credentials: Credentials::None,
            tls: Tls::default(),
            rooms: Bridged::All { adhoc: false },
            max_age: Duration::from_secs(3600),
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
            domain: None,
            lease: Duration::from_secs(6),
        }
    }
}

impl SitesSettings {
    /// Whether the daemon bridges at all.
    pub(crate) fn enabled(&self) -> bool {
        !self.nats.is_empty()
    }

    /// Whether `room` is bridged (`configured`: the room is in the rooms file).
    pub(crate) fn bridges(&self, room: &str, configured: bool) -> bool {
        self.enabled()
            && match &self.rooms {
                Bridged::All { adhoc } => configured || *adhoc,
                Bridged::Only(list) => list.iter().any(|r| r == room),
            }
    }

    /// Applies `--site` and `--nats`, then checks what only the pair can break.
    pub(crate) fn with_flags(
        mut self,
        site: Option<&str>,
        nats: &[String],
        origin: &str,
    ) -> Result<Self, SitesError> {
        let problem = |problem: String| SitesError {
            origin: origin.to_owned(),
            problem,
        };
        if let Some(s) = site {
            check_site(s).map_err(|e| problem(format!("--site: {e}")))?;
            s.clone_into(&mut self.site);
        }
        if !nats.is_empty() {
            for u in nats {
                check_url(u).map_err(|e| problem(format!("--nats: {e}")))?;
            }
            self.nats = nats.to_vec();
        }
        if self.enabled() && self.site.is_empty() {
            return Err(problem(
                "bridging to NATS needs this daemon's site name: set `site = \"paris\"` in [sites] or pass --site NAME".to_owned(),
            ));
        }
        if !self.enabled() && !self.site.is_empty() {
            return Err(problem(format!(
                "site {:?} is set but no NATS server: set `nats = [\"nats://HOST:4222\"]` in [sites] or pass --nats URL",
                self.site
            )));
        }
        Ok(self)
    }
}

/// The `[sites]` table (or a flag) broke a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: [sites]: {problem}")]
pub(crate) struct SitesError {
    pub origin: String,
    pub problem: String,
}

/// A site name: 1 to [`MAX_SITE`] of `A-Z a-z 0-9 _ -` (a tag value and part of a lease
/// key).
pub(crate) fn check_site(s: &str) -> Result<(), String> {
    if s.is_empty()
        || s.len() > MAX_SITE
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "site name {s:?}: use 1 to {MAX_SITE} letters, digits, '_' or '-'"
        ));
    }
    Ok(())
}

/// A server URL as async-nats takes it.
pub(crate) fn check_url(u: &str) -> Result<(), String> {
    u.parse::<async_nats::ServerAddr>()
        .map(|_| ())
        .map_err(|e| {
            format!("{u:?} is not a NATS server URL such as \"nats://127.0.0.1:4222\": {e}")
        })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSites {
    site: Option<String>,
    nats: Option<Vec<String>>,
    creds: Option<PathBuf>,
    token: Option<String>,
    user: Option<String>,
    password: Option<String>,
    tls: Option<RawTls>,
    rooms: Option<Vec<String>>,
    adhoc_rooms: Option<bool>,
    max_age: Option<String>,
    duplicate_window: Option<String>,
    replicas: Option<i64>,
    domain: Option<String>,
    lease: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    required: Option<bool>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl SitesSettings {
    /// The settings from the registry's `[sites]` table (off where absent).
    pub(crate) fn from_registry(registry: &Registry, origin: &str) -> Result<Self, SitesError> {
        let problem = |problem: String| SitesError {
            origin: origin.to_owned(),
            problem,
        };
        let Some(table) = registry.sites_table() else {
            return Ok(Self::default());
        };
        let raw: RawSites = from_table(table).map_err(|e| problem(e.to_string()))?;
        raw.validate().map_err(problem)
    }
}

fn age(key: &str, v: Option<String>, default: Duration) -> Result<Duration, String> {
    v.map_or(Ok(default), |s| {
        parse_age(&s).map_err(|e| format!("key `{key}`: {e}"))
    })
}

impl RawSites {
    fn validate(self) -> Result<SitesSettings, String> {
        let d = SitesSettings::default();
        let site = self.site.unwrap_or_default();
        if !site.is_empty() {
            check_site(&site).map_err(|e| format!("key `site`: {e}"))?;
        }
        let nats = self.nats.unwrap_or_default();
        for u in &nats {
            check_url(u).map_err(|e| format!("key `nats`: {e}"))?;
        }
        let credentials = match (self.creds, self.token, self.user, self.password) {
            (None, None, None, None) => Credentials::None,
            (Some(f), None, None, None) => Credentials::File(f),
            (None, Some(t), None, None) => Credentials::Token(t),
            (None, None, Some(user), Some(password)) => Credentials::User { user, password },
            (None, None, Some(_), None) | (None, None, None, Some(_)) => {
                return Err("keys `user` and `password` go together".to_owned());
            }
            _ => {
                return Err(
                    "set one way to log in: `creds`, `token`, or `user` with `password`".to_owned(),
                );
            }
        };
        let tls = self.tls.map_or_else(Tls::default, |t| Tls {
            required: t.required.unwrap_or(false),
            ca: t.ca,
            cert: t.cert,
            key: t.key,
        });
        if tls.cert.is_some() != tls.key.is_some() {
            return Err("keys `tls.cert` and `tls.key` go together".to_owned());
        }
        let rooms = match (self.rooms, self.adhoc_rooms) {
            (Some(list), None | Some(false)) => {
                if let Some(bad) = list
                    .iter()
                    .find(|r| !mcchat_core::room::RoomName::is_valid(r))
                {
                    return Err(format!("key `rooms`: {bad:?} is not a room name"));
                }
                Bridged::Only(list)
            }
            (Some(_), Some(true)) => {
                return Err(
                    "key `adhoc_rooms` bridges every ad-hoc room; it cannot go with a `rooms` list"
                        .to_owned(),
                );
            }
            (None, adhoc) => Bridged::All {
                adhoc: adhoc.unwrap_or(false),
            },
        };
        let replicas = match self.replicas {
            None => d.replicas,
            Some(n @ 1..=5) => usize::try_from(n).unwrap_or(1),
            Some(n) => return Err(format!("key `replicas`: {n} is not 1 to 5")),
        };
        let max_age = age("max_age", self.max_age, d.max_age)?;
        let duplicate_window = age(
            "duplicate_window",
            self.duplicate_window,
            d.duplicate_window,
        )?;
        if duplicate_window > max_age {
            return Err("key `duplicate_window` must not be longer than `max_age`".to_owned());
        }
        let lease = age("lease", self.lease, d.lease)?;
        if !(Duration::from_secs(2)..=Duration::from_secs(600)).contains(&lease) {
            return Err("key `lease`: use 2s to 10m".to_owned());
        }
        if let Some(d) = &self.domain
            && (d.is_empty()
                || !d
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
        {
            return Err(format!(
                "key `domain`: {d:?} is not a JetStream domain (letters, digits, '_', '-')"
            ));
        }
        Ok(SitesSettings {
            site,
            domain: self.domain,
            nats,
            credentials,
            tls,
            rooms,
            max_age,
            duplicate_window,
            replicas,
            lease,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sites(text: &str) -> Result<SitesSettings, String> {
        let reg = Registry::from_toml(text, "rooms.toml").map_err(|e| e.to_string())?;
        SitesSettings::from_registry(&reg, "rooms.toml")
            .and_then(|s| s.with_flags(None, &[], "rooms.toml"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn off_unless_set_and_keys_checked() {
        let off = sites("").unwrap();
        assert!(!off.enabled());
        assert!(!off.bridges("room1", true));
        let on = sites("[sites]\nsite = \"paris\"\nnats = [\"nats://127.0.0.1:4222\"]").unwrap();
        assert!(on.enabled());
        assert!(on.bridges("room1", true));
        assert!(!on.bridges("adhoc", false));
        let only =
            sites("[sites]\nsite = \"paris\"\nnats = [\"nats://h:4222\"]\nrooms = [\"a.b\"]")
                .unwrap();
        assert!(only.bridges("a.b", false) && !only.bridges("room1", true));
        for (text, needle) in [
            (
                "[sites]\nnats = [\"nats://h:4222\"]",
                "needs this daemon's site name",
            ),
            ("[sites]\nsite = \"paris\"", "no NATS server"),
            ("[sites]\nsite = \"pa.ris\"", "key `site`"),
            ("[sites]\nsite = \"p\"\nnats = [\"http://h\"]", "key `nats`"),
            ("[sites]\nuser = \"u\"", "go together"),
            (
                "[sites]\ntoken = \"t\"\ncreds = \"/x\"",
                "one way to log in",
            ),
            ("[sites]\nrooms = [\"a b\"]", "not a room name"),
            ("[sites]\nreplicas = 0", "key `replicas`"),
            (
                "[sites]\nmax_age = \"1m\"\nduplicate_window = \"2m\"",
                "duplicate_window",
            ),
            ("[sites]\nlease = \"1s\"", "key `lease`"),
            ("[sites]\ndomain = \"a.b\"", "key `domain`"),
            ("[sites]\nbogus = 1", "unknown field `bogus`"),
            ("sites = 1", "must be a table"),
        ] {
            let err = sites(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(err.starts_with("rooms.toml: [sites]"), "{err}");
        }
    }

    #[test]
    fn flags_override_the_file() {
        let reg = Registry::from_toml("[sites]\nsite = \"paris\"\nnats = [\"nats://a:4222\"]", "f")
            .unwrap();
        let s = SitesSettings::from_registry(&reg, "f")
            .unwrap()
            .with_flags(Some("lyon"), &["nats://b:4222".to_owned()], "f")
            .unwrap();
        assert_eq!(
            (s.site.as_str(), s.nats.as_slice()),
            ("lyon", &["nats://b:4222".to_owned()][..])
        );
        assert!(
            SitesSettings::default()
                .with_flags(Some("x y"), &[], "f")
                .unwrap_err()
                .to_string()
                .contains("--site")
        );
    }
}
