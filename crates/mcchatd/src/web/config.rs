//! The `[web]` table of rooms.toml and `--web`: where the chat page and its WebSocket are
//! served (nowhere unless set), which page origins may connect, and the limits.

use std::net::SocketAddr;

use mcchat_core::config::from_table;
use mcchat_core::room::Registry;
use serde::Deserialize;

use crate::config::{Limit, parse_listen};

/// `max_connections`.
pub(crate) const MAX_CONNECTIONS: Limit = Limit::new("max_connections", 1, 1_000_000);
/// `rate`: messages per second one connection may send.
pub(crate) const RATE: Limit = Limit::new("rate", 1, 1_000_000);
/// `burst` for `rate`.
pub(crate) const BURST: Limit = Limit::new("burst", 1, 1_000_000);

/// The web gateway's settings after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WebSettings {
    /// Addresses to serve on (HTTP); empty: the gateway is off.
    pub listen: Vec<SocketAddr>,
    /// Page origins allowed besides the served host itself (`http://chat.example:8080`).
    pub origins: Vec<String>,
    /// Most connections at once.
    pub max_connections: usize,
    /// Client messages per second per connection, and the burst.
    pub rate: u32,
    pub burst: u32,
}

impl Default for WebSettings {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            origins: Vec::new(),
            max_connections: 10_000,
            rate: 20,
            burst: 40,
        }
    }
}

/// The `[web]` table broke a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: [web]: {problem}")]
pub(crate) struct WebError {
    pub origin: String,
    pub problem: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeb {
    listen: Option<Vec<String>>,
    origins: Option<Vec<String>>,
    max_connections: Option<i64>,
    rate: Option<i64>,
    burst: Option<i64>,
}

impl WebSettings {
    /// The settings from the registry's `[web]` table (defaults where absent).
    pub(crate) fn from_registry(registry: &Registry, origin: &str) -> Result<Self, WebError> {
        let problem = |problem: String| WebError {
            origin: origin.to_owned(),
            problem,
        };
        let Some(table) = registry.web_table() else {
            return Ok(Self::default());
        };
        let raw: RawWeb = from_table(table).map_err(|e| problem(e.to_string()))?;
        raw.validate().map_err(problem)
    }
}

impl RawWeb {
    fn validate(self) -> Result<WebSettings, String> {
        let d = WebSettings::default();
        let listen = self
            .listen
            .unwrap_or_default()
            .iter()
            .map(|s| parse_listen(s).map_err(|e| format!("key `listen`: {e}")))
            .collect::<Result<_, _>>()?;
        let origins = self.origins.unwrap_or_default();
        if let Some(bad) = origins
            .iter()
            .find(|o| !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/'))
        {
            return Err(format!(
                "key `origins`: {bad:?} is not an origin such as \"http://chat.example:8080\" (scheme, host, port; no path)"
            ));
        }
        let limit = |l: Limit, v: Option<i64>, default: i64| -> Result<i64, String> {
            v.map_or(Ok(default), |v| {
                l.check::<i64>(v)
                    .map_err(|e| format!("key `{}`: {e}", l.key))
            })
        };
        let n = |v: i64| usize::try_from(v).unwrap_or(usize::MAX);
        let u = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
        Ok(WebSettings {
            listen,
            origins,
            max_connections: n(limit(
                MAX_CONNECTIONS,
                self.max_connections,
                d.max_connections as i64,
            )?),
            rate: u(limit(RATE, self.rate, i64::from(d.rate))?),
            burst: u(limit(BURST, self.burst, i64::from(d.burst))?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(text: &str) -> Result<WebSettings, String> {
        let reg = Registry::from_toml(text, "rooms.toml").map_err(|e| e.to_string())?;
        WebSettings::from_registry(&reg, "rooms.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn off_unless_set_and_keys_checked() {
        assert_eq!(web("").unwrap(), WebSettings::default());
        let w = web("[web]\nlisten = [\"127.0.0.1:8080\"]\norigins = [\"http://chat.lan:8080\"]\nmax_connections = 5").unwrap();
        assert_eq!(w.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(w.max_connections, 5);
        assert_eq!(
            web("[web]\nlisten = [\"8080\"]").unwrap_err(),
            "rooms.toml: [web]: key `listen`: \"8080\" is not an address:port such as \"0.0.0.0:5554\" or \"[::]:5554\""
        );
        assert!(
            web("[web]\nmax_connections = 0")
                .unwrap_err()
                .contains("key `max_connections`")
        );
        assert!(
            web("[web]\norigins = [\"chat.lan\"]")
                .unwrap_err()
                .contains("key `origins`")
        );
        assert!(
            web("[web]\nbogus = 1")
                .unwrap_err()
                .contains("unknown field `bogus`")
        );
        assert_eq!(
            web("web = 1").unwrap_err(),
            "rooms.toml: [web]: must be a table"
        );
    }
}
