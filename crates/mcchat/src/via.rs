//! Where mcchatd is: `--via HOST[:PORT]` resolved to the daemon's relay address. The relay
//! protocol itself (subscribe, renew, unsubscribe) is the engine's
//! (`mcchat_core::peer`); the transport only moves its datagrams.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use mcchat_core::control::DEFAULT_RELAY_PORT;

/// Resolves `HOST[:PORT]` (the port defaults to 5554).
pub(crate) async fn resolve(spec: &str) -> Result<SocketAddr> {
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = spec.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_RELAY_PORT));
    }
    let with_port = if spec.contains(':') {
        spec.to_owned()
    } else {
        format!("{spec}:{DEFAULT_RELAY_PORT}")
    };
    tokio::net::lookup_host(&with_port)
        .await
        .with_context(|| format!("cannot resolve mcchatd address {spec:?}"))?
        .next()
        .with_context(|| format!("mcchatd address {spec:?} resolves to nothing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn via_addresses_resolve() {
        assert_eq!(
            resolve("127.0.0.1").await.unwrap(),
            "127.0.0.1:5554".parse().unwrap()
        );
        assert_eq!(
            resolve("127.0.0.1:7").await.unwrap(),
            "127.0.0.1:7".parse().unwrap()
        );
        assert_eq!(resolve("::1").await.unwrap(), "[::1]:5554".parse().unwrap());
        assert_eq!(
            resolve("[::1]:7").await.unwrap(),
            "[::1]:7".parse().unwrap()
        );
    }
}
