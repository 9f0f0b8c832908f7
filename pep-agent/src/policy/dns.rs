//! `network.dns:`: the agent's resolver for `domain` rules (issue 7).
//!
//! ```yaml
//! network:
//!   dns:
//!     upstream: "127.0.0.53:53"   # default: the first nameserver of /etc/resolv.conf
//!     min_ttl_s: 10               # a learned address stays reachable at least this long
//!     max_ttl_s: 3600             # and at most this long (answers' TTLs are capped to it)
//! ```

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Deserializer};

use super::de::{checked_map, scalar};
use super::expand::expand_vars;

/// `min_ttl_s` when omitted: long enough for the connect that follows a
/// lookup even when the answer's TTL is 0.
pub const DEFAULT_DNS_MIN_TTL_S: u32 = 10;
/// `max_ttl_s` when omitted.
pub const DEFAULT_DNS_MAX_TTL_S: u32 = 3600;

/// `network.dns`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    /// Where allowed queries are forwarded; `None`: the host's resolver
    /// configuration (`/etc/resolv.conf`), read when the resolver starts.
    pub upstream: Option<SocketAddr>,
    pub min_ttl_s: u32,
    pub max_ttl_s: u32,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            upstream: None,
            min_ttl_s: DEFAULT_DNS_MIN_TTL_S,
            max_ttl_s: DEFAULT_DNS_MAX_TTL_S,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    #[serde(default)]
    upstream: Option<Upstream>,
    #[serde(default)]
    min_ttl_s: Option<u32>,
    #[serde(default)]
    max_ttl_s: Option<u32>,
}

impl<'de> Deserialize<'de> for DnsSettings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(
            d,
            "`network.dns`: `{upstream, min_ttl_s, max_ttl_s}`",
            |raw: RawDns| {
                let min_ttl_s = raw.min_ttl_s.unwrap_or(DEFAULT_DNS_MIN_TTL_S);
                let max_ttl_s = raw.max_ttl_s.unwrap_or(DEFAULT_DNS_MAX_TTL_S);
                if min_ttl_s == 0 {
                    return Err("`min_ttl_s` must be at least 1: an address learned for 0 s \
                                could never be connected to"
                        .into());
                }
                if min_ttl_s > max_ttl_s {
                    return Err(format!(
                        "`min_ttl_s` ({min_ttl_s}) is above `max_ttl_s` ({max_ttl_s})"
                    ));
                }
                Ok(Self {
                    upstream: raw.upstream.map(|u| u.0),
                    min_ttl_s,
                    max_ttl_s,
                })
            },
        )
    }
}

/// `upstream:`: `ip:port`, `[ipv6]:port`, or a bare address (port 53).
struct Upstream(SocketAddr);

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a DNS server such as `127.0.0.53:53` or `[::1]:53`", |text| {
            let text = expand_vars(text)?;
            let t = text.trim();
            if let Ok(sa) = t.parse::<SocketAddr>() {
                return Ok(Upstream(sa));
            }
            t.parse::<IpAddr>()
                .map(|ip| Upstream(SocketAddr::new(ip, 53)))
                .map_err(|_| format!("bad DNS server `{t}`: expected e.g. `127.0.0.53:53` or `[::1]:53`"))
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::{LoadContext, load_str};

    fn load(dns: &str) -> Result<super::DnsSettings, String> {
        load_str(
            &format!("apiVersion: pep/v1\nnetwork:\n  dns: {dns}\n"),
            "p.yaml",
            &LoadContext::new("/root"),
        )
        .map(|p| p.network.dns)
        .map_err(|e| e.to_string())
    }

    #[test]
    fn parses_defaults_and_values() {
        let d = load("{ upstream: \"127.0.0.53\" }").expect("valid");
        assert_eq!(d.upstream, Some("127.0.0.53:53".parse().unwrap()));
        assert_eq!((d.min_ttl_s, d.max_ttl_s), (10, 3600));
        let d = load("{ upstream: \"[::1]:5353\", min_ttl_s: 1, max_ttl_s: 60 }").expect("valid");
        assert_eq!(d.upstream, Some("[::1]:5353".parse().unwrap()));
        assert_eq!((d.min_ttl_s, d.max_ttl_s), (1, 60));
    }

    #[test]
    fn errors_carry_locations() {
        let e = load("{ upstream: \"dns.example\" }").unwrap_err();
        assert!(
            e.starts_with("p.yaml:3:20: ") && e.contains("bad DNS server"),
            "{e}"
        );
        let e = load("{ upstreams: \"127.0.0.1\" }").unwrap_err();
        assert!(e.starts_with("p.yaml:3:") && e.contains("upstreams"), "{e}");
        let e = load("{ min_ttl_s: 100, max_ttl_s: 10 }").unwrap_err();
        assert!(e.starts_with("p.yaml:3:") && e.contains("above"), "{e}");
        let e = load("{ min_ttl_s: 0 }").unwrap_err();
        assert!(e.contains("at least 1"), "{e}");
    }
}
