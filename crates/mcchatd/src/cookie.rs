//! Stateless return-routability cookies, as DTLS HelloVerifyRequest (RFC 6347 4.2.1) and QUIC
//! Retry (RFC 9000 8.1) use them.
//!
//! A subscription takes effect only when the request carries a cookie the daemon issued to
//! that very address. The cookie is `TIME.MAC`: the issue time in seconds (hex) and an
//! HMAC-SHA256 (RFC 2104), truncated to 96 bits, over the time and the source address and
//! port, keyed with a secret drawn at start-up. The daemon keeps no state per cookie, so a
//! flood of spoofed requests costs it no memory, and a cookie is useless from any other
//! address. Pure: the time is passed in.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use hmac::{KeyInit as _, Mac as _};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// How long a cookie stays valid. Clients renew subscriptions well within it; after it they
/// are simply challenged again.
pub(crate) const COOKIE_LIFETIME_SECS: u64 = 120;

/// Bytes of MAC kept: 96 bits is far beyond guessing within a lifetime.
const MAC_BYTES: usize = 12;

/// Cookies remembered as checked, at most: one per client address that did a round trip.
const RECENT: usize = 16_384;

/// Issues and checks cookies with one secret.
pub(crate) struct CookieJar {
    /// Cookies that verified, by the address they were issued to, with their issue time:
    /// a `--via` client puts the same cookie on every datagram, so its MAC is computed once
    /// per cookie (every two minutes) rather than per datagram. Only cookies that verified
    /// are kept, so a forgery adds nothing; the map is cleared when it holds [`RECENT`].
    recent: std::collections::HashMap<SocketAddr, (Box<str>, u64)>,
    /// HMAC keyed with the secret (one SHA-256 block, used as is), its key blocks hashed
    /// once: every datagram a `--via` client sends carries a cookie to check, and a clone
    /// of this saves half of each check's work.
    keyed: HmacSha256,
}

impl CookieJar {
    /// A jar with the secret `key` (drawn at random by the driver).
    pub(crate) fn with_key(key: [u8; 64]) -> Self {
        Self {
            keyed: HmacSha256::new(&key.into()),
            recent: std::collections::HashMap::new(),
        }
    }

    fn mac(&self, addr: SocketAddr, time: u64) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(&time.to_be_bytes());
        match addr.ip() {
            IpAddr::V4(ip) => mac.update(&ip.to_ipv6_mapped().octets()),
            IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        mac.update(&addr.port().to_be_bytes());
        mac
    }

    /// A cookie for `addr`, issued at `now_secs`.
    pub(crate) fn issue(&self, addr: SocketAddr, now_secs: u64) -> String {
        let tag = self.mac(addr, now_secs).finalize().into_bytes();
        let mut out = format!("{now_secs:x}.");
        for b in &tag[..MAC_BYTES] {
            // Writing to a String cannot fail.
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    /// [`verify`](Self::verify), remembering the cookies that pass, so that the same cookie
    /// from the same address is not checked again within its lifetime.
    pub(crate) fn verify_recent(&mut self, cookie: &str, addr: SocketAddr, now_secs: u64) -> bool {
        if let Some((known, time)) = self.recent.get(&addr)
            && **known == *cookie
        {
            return live(*time, now_secs);
        }
        let Some(time) = self.verified_time(cookie, addr, now_secs) else {
            return false;
        };
        if self.recent.len() >= RECENT {
            self.recent.clear();
        }
        self.recent.insert(addr, (cookie.into(), time));
        true
    }

    /// How many cookies are remembered.
    #[cfg(test)]
    pub(crate) fn remembered(&self) -> usize {
        self.recent.len()
    }

    /// Forgets the remembered cookies that have expired (the hub's one-second tick).
    pub(crate) fn forget_expired(&mut self, now_secs: u64) {
        self.recent.retain(|_, (_, time)| live(*time, now_secs));
    }

    /// Whether `cookie` was issued to `addr` by this jar within the lifetime.
    pub(crate) fn verify(&self, cookie: &str, addr: SocketAddr, now_secs: u64) -> bool {
        self.verified_time(cookie, addr, now_secs).is_some()
    }

    /// The issue time of `cookie` if it was issued to `addr` by this jar within the lifetime.
    fn verified_time(&self, cookie: &str, addr: SocketAddr, now_secs: u64) -> Option<u64> {
        let (time, mac_hex) = cookie.split_once('.')?;
        let time = u64::from_str_radix(time, 16).ok()?;
        if !live(time, now_secs) {
            return None;
        }
        let tag = decode_hex::<MAC_BYTES>(mac_hex)?;
        // Constant-time comparison of the truncated tag.
        self.mac(addr, time)
            .verify_truncated_left(&tag)
            .is_ok()
            .then_some(time)
    }
}

/// Whether a cookie issued at `time` is valid at `now_secs`.
fn live(time: u64, now_secs: u64) -> bool {
    time <= now_secs && now_secs - time <= COOKIE_LIFETIME_SECS
}

fn decode_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cookie_is_bound_to_address_port_and_time() {
        let jar = CookieJar::with_key([7; 64]);
        let a = addr("198.51.100.1:40000");
        let c = jar.issue(a, 1000);
        assert!(jar.verify(&c, a, 1000));
        assert!(jar.verify(&c, a, 1000 + COOKIE_LIFETIME_SECS));
        assert!(!jar.verify(&c, a, 1001 + COOKIE_LIFETIME_SECS), "expired");
        assert!(!jar.verify(&c, a, 999), "from the future");
        assert!(
            !jar.verify(&c, addr("198.51.100.2:40000"), 1000),
            "other host"
        );
        assert!(
            !jar.verify(&c, addr("198.51.100.1:40001"), 1000),
            "other port"
        );
        assert!(
            !CookieJar::with_key([8; 64]).verify(&c, a, 1000),
            "other key"
        );
    }

    #[test]
    fn forged_and_malformed_cookies_fail() {
        let jar = CookieJar::with_key([7; 64]);
        let a = addr("[2001:db8::1]:5");
        let c = jar.issue(a, 50);
        let (t, mac) = c.split_once('.').unwrap();
        let mut flipped = mac.to_owned().into_bytes();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        let forged = format!("{t}.{}", String::from_utf8(flipped).unwrap());
        for bad in [
            forged.as_str(),
            "",
            ".",
            "32.",
            "zz.00",
            &format!("{t}.{}", &mac[..10]),
            &format!("33.{mac}"),
            "ffffffffffffffffff.00",
            "32.é00000000000000000000000",
        ] {
            assert!(!jar.verify(bad, a, 50), "{bad:?}");
        }
    }

    #[test]
    fn a_remembered_cookie_holds_only_for_its_address_and_lifetime() {
        let mut jar = CookieJar::with_key([7; 64]);
        let a = addr("198.51.100.1:40000");
        let c = jar.issue(a, 1000);
        assert!(jar.verify_recent(&c, a, 1000));
        assert_eq!(jar.recent.len(), 1);
        assert!(
            jar.verify_recent(&c, a, 1000 + COOKIE_LIFETIME_SECS),
            "from memory"
        );
        assert!(
            !jar.verify_recent(&c, a, 1001 + COOKIE_LIFETIME_SECS),
            "expired"
        );
        assert!(
            !jar.verify_recent(&c, addr("198.51.100.2:40000"), 1001),
            "other address"
        );
        let forged = format!("{c}0");
        assert!(
            !jar.verify_recent(&forged, a, 1001),
            "not the remembered one"
        );
        assert_eq!(jar.recent.len(), 1, "a forgery is not remembered");
        jar.forget_expired(1001 + COOKIE_LIFETIME_SECS);
        assert!(jar.recent.is_empty());
    }
}
