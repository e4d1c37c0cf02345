//! `[metadata] url` for Redis: one server, the sentinels that name the
//! master, or the seed nodes of a Redis Cluster.
//!
//! ```text
//! redis://[[user]:password@]host[:port][/db]            one server
//! rediss://...                                          the same over TLS
//! redis+sentinel://[[user]:password@]h1[:port],h2[:port]/master[/db]
//! redis://[[user]:password@]h1[:port],h2[:port]         cluster seeds
//! ```
//!
//! Several hosts without `+sentinel` are cluster seeds; `cluster = true`
//! makes a single host one too. The user and password are the Redis
//! servers' (Sentinel's own password is `sentinel_password`).

/// Where Redis is and how to reach it.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub tls: bool,
    pub hosts: Vec<(String, u16)>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub topology: Topology,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("tls", &self.tls)
            .field("hosts", &self.hosts)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("topology", &self.topology)
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    Single { db: i64 },
    Sentinel { master: String, db: i64 },
    Cluster,
}

const REDIS_PORT: u16 = 6379;
const SENTINEL_PORT: u16 = 26379;

/// Parses `url`; the error says what is wrong, never what the password is.
pub fn parse(url: &str, cluster: bool) -> Result<RedisTarget, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("is not a URL like redis://host:6379")?;
    let (tls, sentinel) = match scheme {
        "redis" => (false, false),
        "rediss" => (true, false),
        "redis+sentinel" => (false, true),
        "rediss+sentinel" => (true, true),
        other => {
            return Err(format!(
                "scheme {other:?} is not redis, rediss, redis+sentinel or rediss+sentinel"
            ));
        }
    };
    if rest.contains(['?', '#']) {
        return Err("takes no query or fragment".into());
    }
    // The user and password end at the last `@` (a password may hold `/`,
    // `@` or `:`, escaped or not); hosts and path come after.
    let (userinfo, rest) = match rest.rsplit_once('@') {
        Some((u, r)) => (Some(u), r),
        None => (None, rest),
    };
    let (hostlist, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (username, password) = match userinfo {
        None => (None, None),
        Some(u) => {
            let (user, pass) = u.split_once(':').unwrap_or((u, ""));
            (non_empty(decode(user)?), non_empty(decode(pass)?))
        }
    };
    let default_port = if sentinel { SENTINEL_PORT } else { REDIS_PORT };
    let hosts = hostlist
        .split(',')
        .map(|h| host_port(h, default_port))
        .collect::<Result<Vec<_>, _>>()?;
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let topology = if sentinel {
        if cluster {
            return Err("names sentinels, which cannot be combined with cluster = true".into());
        }
        match segments.as_slice() {
            [master] => Topology::Sentinel {
                master: (*master).to_owned(),
                db: 0,
            },
            [master, db] => Topology::Sentinel {
                master: (*master).to_owned(),
                db: db_number(db)?,
            },
            _ => return Err("names the sentinels' master after the hosts: /mymaster[/db]".into()),
        }
    } else {
        let db = match segments.as_slice() {
            [] => 0,
            [db] => db_number(db)?,
            _ => return Err("has a path other than /db".into()),
        };
        if cluster || hosts.len() > 1 {
            if db != 0 {
                return Err("selects a database, which a Redis Cluster does not have".into());
            }
            Topology::Cluster
        } else {
            Topology::Single { db }
        }
    };
    Ok(RedisTarget {
        tls,
        hosts,
        username,
        password,
        topology,
    })
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Percent-decoding of the user and password.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("has a bad %-escape in its user or password")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "has a user or password that is not UTF-8".into())
}

fn host_port(s: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        // [v6]:port
        let (host, after) = rest.split_once(']').ok_or("has an unclosed [ in a host")?;
        (host, after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
    {
        return Err(format!("has {s:?} where a host[:port] belongs"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("has a bad port in {s:?}"))?,
    };
    Ok((host.to_owned(), port))
}

fn db_number(s: &str) -> Result<i64, String> {
    s.parse::<i64>()
        .ok()
        .filter(|db| *db >= 0)
        .ok_or_else(|| format!("has {s:?} where a database number belongs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &[(&str, u16)]) -> Vec<(String, u16)> {
        list.iter().map(|(h, p)| ((*h).to_owned(), *p)).collect()
    }

    #[test]
    fn one_server_with_or_without_tls() {
        let t = parse("redis://redis.internal", false).unwrap();
        assert_eq!(t.hosts, hosts(&[("redis.internal", 6379)]));
        assert_eq!(t.topology, Topology::Single { db: 0 });
        assert!(!t.tls && t.password.is_none());
        let t = parse("rediss://default:p%40ss@10.0.0.5:6380/3", false).unwrap();
        assert!(t.tls);
        assert_eq!(t.username.as_deref(), Some("default"));
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        assert_eq!(t.topology, Topology::Single { db: 3 });
        let t = parse("redis://:secret@[::1]:7000", false).unwrap();
        assert_eq!(t.hosts, hosts(&[("::1", 7000)]));
        assert_eq!(t.username, None);
        assert_eq!(t.password.as_deref(), Some("secret"));
    }

    #[test]
    fn sentinels_name_their_master() {
        let t = parse("redis+sentinel://:pw@s1,s2:26380,s3/mymaster/2", false).unwrap();
        assert_eq!(
            t.hosts,
            hosts(&[("s1", 26379), ("s2", 26380), ("s3", 26379)])
        );
        assert_eq!(
            t.topology,
            Topology::Sentinel {
                master: "mymaster".into(),
                db: 2
            }
        );
        assert!(parse("rediss+sentinel://s1/m", false).unwrap().tls);
        assert!(parse("redis+sentinel://s1", false).is_err());
        assert!(parse("redis+sentinel://s1/m", true).is_err());
    }

    #[test]
    fn several_hosts_or_cluster_true_are_cluster_seeds() {
        let t = parse("redis://n1:7000,n2:7001", false).unwrap();
        assert_eq!(t.topology, Topology::Cluster);
        assert_eq!(
            parse("rediss://n1:7000", true).unwrap().topology,
            Topology::Cluster
        );
        assert!(parse("redis://n1:7000,n2:7001/1", false).is_err());
    }

    #[test]
    fn mistakes_are_named_and_passwords_are_not() {
        for (url, says) in [
            ("http://x", "scheme"),
            ("redis:/x", "is not a URL"),
            ("redis://h:0", "bad port"),
            ("redis://h:99999", "bad port"),
            ("redis://h/x", "database number"),
            ("redis://h/1/2", "path"),
            ("redis://h?db=1", "query"),
            ("redis://:se%zzcret@h", "%-escape"),
            ("redis://a b", "host"),
            ("redis://", "host"),
        ] {
            let e = parse(url, false).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("secret"), "{url}: {e}");
        }
        let t = parse("redis://:hunter2@h", false).unwrap();
        assert!(!format!("{t:?}").contains("hunter2"));
        // Unescaped `/`, `@` and `:` in a password are the password's.
        let t = parse("redis://u:pa/ss@wo:rd@h:7000/2", false).unwrap();
        assert_eq!(t.password.as_deref(), Some("pa/ss@wo:rd"));
        assert_eq!(t.hosts, hosts(&[("h", 7000)]));
        assert_eq!(t.topology, Topology::Single { db: 2 });
        for url in [
            "redis://u:se/cret@h:0",
            "redis://:se/cret@",
            "redis://:se/cret@h/x",
        ] {
            let e = parse(url, false).unwrap_err();
            assert!(!e.contains("se/cret") && !e.contains("cret"), "{url}: {e}");
        }
    }
}
