//! The egress guard: addresses Pier never connects to on an upstream's say-so
//! (link-local and cloud metadata services, plus `[egress] refuse`), checked
//! on the address actually dialled, so names, redirects and token realms
//! cannot smuggle one past the check.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use url::{Host, Url};

/// Refused whatever the configuration says. IPv4-mapped and NAT64 forms of
/// the IPv4 entries are refused too (see `Egress::refuses`).
const BUILT_IN: &[&str] = &[
    // Link-local: AWS, GCP, Azure, Oracle, DigitalOcean, OpenStack, Tencent
    // and Huawei metadata (169.254.169.254, 169.254.0.23), the ECS task
    // endpoint (169.254.170.2) and time sync services all live here.
    "169.254.0.0/16",
    "fe80::/10",
    // AWS instance metadata over IPv6 (Nitro).
    "fd00:ec2::254/128",
    // GCP metadata for IPv6-only instances.
    "fd20:ce::254/128",
    // Alibaba Cloud metadata.
    "100.100.100.200/32",
    // Azure WireServer (host agent, also serves instance configuration).
    "168.63.129.16/32",
    // Oracle Cloud Classic metadata.
    "192.0.0.192/32",
];

/// The well-known NAT64 prefix (RFC 6052): `64:ff9b::a.b.c.d` reaches the
/// IPv4 address a.b.c.d through a NAT64 gateway.
const NAT64: Ipv6Addr = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0);

/// A hop the guard stopped, before any packet left.
#[derive(Debug, thiserror::Error)]
#[error(
    "{host} is, or resolves to, a link-local or cloud metadata address or one in [egress] refuse"
)]
pub struct Refused {
    /// The host as the URL names it (never the path or query: a redirect
    /// target's may carry a signature).
    pub host: String,
}

/// What Pier refuses to connect to, and the configured upstream hosts that
/// are exempt from it.
#[derive(Debug)]
pub struct Egress {
    refused: Vec<IpNet>,
    /// Hosts of configured endpoints, as configured (lower-case): the
    /// operator chose them, so a registry on a private address still works.
    exempt: HashSet<String>,
}

impl Egress {
    /// The built-in set plus `extra`, exempting the hosts of `endpoints`.
    pub fn new<'a>(extra: &[IpNet], endpoints: impl IntoIterator<Item = &'a Url>) -> Self {
        let mut refused: Vec<IpNet> = BUILT_IN.iter().filter_map(|n| n.parse().ok()).collect();
        refused.extend(extra.iter().copied());
        let exempt = endpoints
            .into_iter()
            .filter_map(|u| u.host_str())
            .map(str::to_ascii_lowercase)
            .collect();
        Self { refused, exempt }
    }

    /// Whether an address falls in a refused range, in any of its spellings.
    pub fn refuses(&self, ip: IpAddr) -> bool {
        let hit = |ip: IpAddr| self.refused.iter().any(|n| n.contains(&ip));
        match ip {
            // A configured IPv6 range may spell IPv4 hosts in mapped form.
            IpAddr::V4(v4) => hit(ip) || hit(IpAddr::V6(v4.to_ipv6_mapped())),
            IpAddr::V6(v6) => hit(ip) || embedded_v4(v6).is_some_and(|v4| hit(IpAddr::V4(v4))),
        }
    }

    fn is_exempt(&self, host: &str) -> bool {
        self.exempt.contains(&host.to_ascii_lowercase())
    }

    /// Checks a URL whose host is an IP literal, which the HTTP client dials
    /// without asking the resolver. Names are checked when they resolve.
    pub fn check_url(&self, url: &Url) -> Result<(), Refused> {
        let ip = match url.host() {
            Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        let host = url.host_str().unwrap_or_default();
        if self.is_exempt(host) || !self.refuses(ip) {
            return Ok(());
        }
        Err(Refused {
            host: host.to_owned(),
        })
    }

    /// Keeps the addresses `host` may be dialled at; an error when the guard
    /// leaves none.
    fn filter(&self, host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Refused> {
        if self.is_exempt(host) {
            return Ok(addrs);
        }
        let before = addrs.len();
        let kept: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| !self.refuses(a.ip()))
            .collect();
        if kept.is_empty() && before > 0 {
            return Err(Refused {
                host: host.to_owned(),
            });
        }
        Ok(kept)
    }
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), deprecated
/// IPv4-compatible (`::a.b.c.d`) or NAT64 (`64:ff9b::a.b.c.d`) address: each
/// can reach that IPv4 host.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let low = Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7]));
    let compatible = s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified();
    let nat64 = s[..6] == NAT64.segments()[..6];
    (compatible || nat64).then_some(low)
}

/// A resolver for the upstream HTTP client that drops refused addresses,
/// so whatever name a redirect or token realm uses, the dialled address is
/// the one checked.
pub struct GuardedResolver(pub Arc<Egress>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: reqwest puts the URL's port in.
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = egress.filter(&host, addrs)?;
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

/// The guard's refusal somewhere in an error's cause chain (a connect
/// error wraps the resolver's).
pub fn refusal_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refused>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(extra: &[&str], endpoints: &[&str]) -> Egress {
        let extra: Vec<IpNet> = extra.iter().map(|n| n.parse().unwrap()).collect();
        let endpoints: Vec<Url> = endpoints.iter().map(|u| Url::parse(u).unwrap()).collect();
        Egress::new(&extra, &endpoints)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    // Pure checks only: nothing here opens a socket.
    #[test]
    fn built_in_ranges_in_every_spelling() {
        let g = guard(&[], &[]);
        for refused in [
            "169.254.169.254",
            "169.254.170.2",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "64:ff9b::169.254.169.254",
            "fe80::1",
            "febf::1",
            "fd00:ec2::254",
            "fd20:ce::254",
            "100.100.100.200",
            "::ffff:100.100.100.200",
            "168.63.129.16",
            "192.0.0.192",
        ] {
            assert!(g.refuses(ip(refused)), "{refused} allowed");
        }
        for allowed in [
            "127.0.0.1",
            "::1",
            "::",
            "10.0.0.1",
            "100.100.100.201",
            "169.253.255.255",
            "fec0::1",
            "fd00::2",
            "::ffff:127.0.0.1",
            "2001:db8::1",
        ] {
            assert!(!g.refuses(ip(allowed)), "{allowed} refused");
        }
    }

    #[test]
    fn configured_ranges_add_to_the_built_in_ones() {
        let g = guard(&["127.0.0.77/32", "10.0.0.0/8"], &[]);
        assert!(g.refuses(ip("127.0.0.77")));
        assert!(g.refuses(ip("::ffff:127.0.0.77")));
        assert!(g.refuses(ip("10.1.2.3")));
        assert!(g.refuses(ip("169.254.169.254")));
        assert!(!g.refuses(ip("127.0.0.1")));
    }

    #[test]
    fn literal_urls_are_checked_and_configured_hosts_exempt() {
        let g = guard(&["10.0.0.0/8"], &["http://10.1.1.1:5000/"]);
        let check = |u: &str| g.check_url(&Url::parse(u).unwrap());
        assert!(check("http://169.254.169.254/latest").is_err());
        assert!(check("http://[::ffff:169.254.169.254]/").is_err());
        assert!(check("http://[::ffff:a9fe:a9fe]/").is_err());
        assert!(
            check("http://2852039166/").is_err(),
            "decimal 169.254.169.254"
        );
        assert!(check("http://10.2.2.2/").is_err());
        let e = check("http://[fe80::1]:8080/x?sig=secret").unwrap_err();
        assert_eq!(e.host, "[fe80::1]");
        assert!(!e.to_string().contains("secret"));
        // The configured endpoint, by host as configured.
        assert!(check("http://10.1.1.1:9999/v2/").is_ok());
        // Names are left to the resolver.
        assert!(check("http://metadata.example/").is_ok());
    }

    #[test]
    fn resolved_addresses_are_filtered_unless_the_host_is_configured() {
        let g = guard(&["127.0.0.77/32"], &["http://Registry.Corp:5000/"]);
        let a = |s: &str| SocketAddr::new(ip(s), 0);
        let mixed = vec![a("127.0.0.77"), a("127.0.0.1")];
        assert_eq!(
            g.filter("cdn.example", mixed.clone()).unwrap(),
            [a("127.0.0.1")]
        );
        let only = vec![a("127.0.0.77"), a("::ffff:127.0.0.77")];
        assert_eq!(
            g.filter("meta.example", only.clone()).unwrap_err().host,
            "meta.example"
        );
        assert_eq!(g.filter("registry.corp", only.clone()).unwrap(), only);
    }

    #[test]
    fn a_refusal_is_found_in_a_cause_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("connect")]
        struct Outer(#[source] Box<dyn std::error::Error + Send + Sync>);
        let e = Outer(Box::new(Refused { host: "h".into() }));
        assert_eq!(refusal_in(&e).unwrap().host, "h");
        assert!(refusal_in(&Outer("other".into())).is_none());
    }
}
