//! Works out which upstream a request means: (Host header, name in the path,
//! `?ns=`) → `Target`. Pure: no I/O.
//!
//! Tried in order: `ns` (containerd mirrors), a host prefix
//! (`docker.m.example`), a registry host as first path component
//! (`m.example/docker.io/library/nginx`), then short-name rules and the
//! default registry (`m.example/nginx`, Docker `registry-mirrors`).

use std::collections::HashMap;

use thiserror::Error;

use crate::config::{Config, RouteConfig};
use crate::reference::{MAX_NAME_LEN, RepoName};

/// The upstream registry and the repository in it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub registry: String,
    pub repository: RepoName,
}

impl Target {
    /// The key every store uses: `<registry>/<repository>`.
    pub fn key(&self) -> String {
        [self.registry.as_str(), "/", self.repository.as_str()].concat()
    }
}

/// Which rule took a request to its upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum How {
    /// containerd's `?ns=`
    Ns,
    /// a host prefix (`docker.m.example.com`)
    HostPrefix,
    /// a registry as the first path component
    AddPrefix,
    /// a short-name rule, by its pattern
    Route(String),
    /// a short name no rule matched: the default registry
    Default,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("{0:?} is not a registry this mirror is configured for")]
    UnknownRegistry(String),
    #[error("host {host:?} names no configured upstream (known prefixes: {known})")]
    UnknownAlias { host: String, known: String },
    #[error("ns={ns:?} contradicts the host, which names {host_registry}")]
    NsConflict { ns: String, host_registry: String },
    #[error("{0}")]
    Name(String),
}

/// Routing tables built once from the config.
#[derive(Debug)]
pub struct Router {
    domains: Vec<String>,
    aliases: HashMap<String, String>,
    registries: Vec<String>,
    routes: Vec<RouteConfig>,
    default_registry: String,
}

impl Router {
    pub fn new(config: &Config) -> Self {
        let mut aliases = HashMap::new();
        for u in &config.upstreams {
            for a in &u.aliases {
                aliases.insert(a.clone(), u.registry.clone());
            }
        }
        Self {
            domains: config.domains.clone(),
            aliases,
            registries: config
                .upstreams
                .iter()
                .map(|u| u.registry.clone())
                .collect(),
            routes: config.routes.clone(),
            default_registry: config.default_registry.clone(),
        }
    }

    /// Resolves a request. `name` is the repository part of the path as the
    /// client sent it; `host` the Host header; `ns` containerd's parameter.
    pub fn resolve(
        &self,
        host: Option<&str>,
        name: &str,
        ns: Option<&str>,
    ) -> Result<Target, RouteError> {
        self.resolve_how(host, name, ns).map(|(target, _)| target)
    }

    /// Like `resolve`, and which rule decided.
    pub fn resolve_how(
        &self,
        host: Option<&str>,
        name: &str,
        ns: Option<&str>,
    ) -> Result<(Target, How), RouteError> {
        if name.len() > MAX_NAME_LEN * 2 {
            return Err(RouteError::Name("the repository name is too long".into()));
        }
        let host_registry = match host {
            Some(h) => self.registry_of_host(h)?,
            None => None,
        };
        let ns_registry = match ns {
            Some(ns) => Some(self.configured(ns)?),
            None => None,
        };
        let chosen = match (ns_registry, host_registry) {
            (Some(n), Some(h)) if n != h => {
                return Err(RouteError::NsConflict {
                    ns: ns.unwrap_or_default().to_owned(),
                    host_registry: h,
                });
            }
            (Some(r), _) => Some((r, How::Ns)),
            (None, Some(r)) => Some((r, How::HostPrefix)),
            (None, None) => None,
        };
        if let Some((registry, how)) = chosen {
            return Ok((target(registry, name)?, how));
        }
        // Add-a-prefix: a first component that looks like a host.
        if let Some((first, rest)) = name.split_once('/')
            && looks_like_host(first)
        {
            let registry = self.configured(first)?;
            return Ok((target(registry, rest)?, How::AddPrefix));
        }
        // Only a one-component name can be a bare registry host; a dot in a
        // later component (`org/app.v2`) is part of a repository name.
        if !name.contains('/') && looks_like_host(name) {
            return Err(RouteError::Name(format!(
                "{name:?} names a registry but no repository"
            )));
        }
        match self.routes.iter().find(|r| glob_match(&r.pattern, name)) {
            Some(r) => Ok((
                target(r.registry.clone(), name)?,
                How::Route(r.pattern.clone()),
            )),
            None => Ok((target(self.default_registry.clone(), name)?, How::Default)),
        }
    }

    /// Whether `host` is this mirror's: one of its domains, or a host
    /// prefix under one.
    pub fn is_own_host(&self, host: &str) -> bool {
        let host = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
        self.domains.iter().any(|d| {
            host == *d
                || host
                    .strip_suffix(d.as_str())
                    .is_some_and(|p| p.ends_with('.'))
        })
    }

    /// The registry a host-prefix Host header names, `None` for the bare
    /// domain or a host under no configured domain (an IP, say).
    fn registry_of_host(&self, host: &str) -> Result<Option<String>, RouteError> {
        let host = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
        for domain in &self.domains {
            if host == *domain {
                return Ok(None);
            }
            if let Some(prefix) = host.strip_suffix(domain.as_str())
                && let Some(alias) = prefix.strip_suffix('.')
            {
                return match self.aliases.get(alias) {
                    Some(r) => Ok(Some(r.clone())),
                    None => {
                        let mut known: Vec<&str> =
                            self.aliases.keys().map(String::as_str).collect();
                        known.sort_unstable();
                        Err(RouteError::UnknownAlias {
                            host,
                            known: known.join(", "),
                        })
                    }
                };
            }
        }
        Ok(None)
    }

    /// `name` as a configured registry (Docker Hub's other spellings too).
    fn configured(&self, name: &str) -> Result<String, RouteError> {
        let canonical = match name.to_ascii_lowercase().as_str() {
            "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
                "docker.io".to_owned()
            }
            other => other.to_owned(),
        };
        if self.registries.contains(&canonical) {
            Ok(canonical)
        } else {
            Err(RouteError::UnknownRegistry(shorten(name)))
        }
    }
}

fn target(registry: String, name: &str) -> Result<Target, RouteError> {
    // Docker Hub's official images live under `library/`.
    let full = if registry == "docker.io" && !name.contains('/') {
        format!("library/{name}")
    } else {
        name.to_owned()
    };
    let repository = RepoName::parse(&full).map_err(|e| RouteError::Name(e.to_string()))?;
    Ok(Target {
        registry,
        repository,
    })
}

/// The reference grammar's rule: a first component is a registry host if it
/// has a `.` or `:` or is `localhost`.
fn looks_like_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// `host` without a `:port` (and an IPv6 literal without its brackets).
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// `*` matches within one path component, `**` across components.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    glob_bytes(pattern.as_bytes(), name.as_bytes())
}

fn glob_bytes(p: &[u8], n: &[u8]) -> bool {
    match p {
        [] => n.is_empty(),
        [b'*', b'*', rest @ ..] => (0..=n.len()).any(|i| glob_bytes(rest, &n[i..])),
        [b'*', rest @ ..] => {
            // Any run of the name up to the next '/'.
            let stop = n.iter().position(|&c| c == b'/').unwrap_or(n.len());
            (0..=stop).any(|i| glob_bytes(rest, &n[i..]))
        }
        [c, rest @ ..] => n.first() == Some(c) && glob_bytes(rest, &n[1..]),
    }
}

fn shorten(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let c = Config::from_toml(
            r#"
            domains = ["m.example"]
            [[upstreams]]
            registry = "corp.example"
            aliases = ["corp"]
            endpoints = ["http://127.0.0.1:1"]
            "#,
            Vec::new(),
        )
        .unwrap();
        Router::new(&c)
    }

    fn key(host: &str, name: &str, ns: Option<&str>) -> Result<String, RouteError> {
        router().resolve(Some(host), name, ns).map(|t| t.key())
    }

    #[test]
    fn add_a_prefix() {
        assert_eq!(
            key("m.example:5000", "docker.io/library/nginx", None).unwrap(),
            "docker.io/library/nginx"
        );
        assert_eq!(
            key("m.example", "docker.io/nginx", None).unwrap(),
            "docker.io/library/nginx"
        );
        assert_eq!(
            key("m.example", "index.docker.io/library/nginx", None).unwrap(),
            "docker.io/library/nginx"
        );
        assert_eq!(
            key("127.0.0.1:5000", "gcr.io/distroless/static", None).unwrap(),
            "gcr.io/distroless/static"
        );
        assert_eq!(
            key("m.example", "evil.example.com/x", None),
            Err(RouteError::UnknownRegistry("evil.example.com".into()))
        );
        assert!(key("m.example", "localhost/x", None).is_err());
        assert!(key("m.example", "gcr.io", None).is_err());
    }

    #[test]
    fn host_prefix() {
        assert_eq!(
            key("docker.m.example:5000", "library/nginx", None).unwrap(),
            "docker.io/library/nginx"
        );
        assert_eq!(
            key("docker.m.example", "nginx", None).unwrap(),
            "docker.io/library/nginx"
        );
        assert_eq!(
            key("K8S.m.example.", "kube-apiserver", None).unwrap(),
            "registry.k8s.io/kube-apiserver"
        );
        assert_eq!(
            key("gcr.m.example", "distroless/static-debian11", None).unwrap(),
            "gcr.io/distroless/static-debian11"
        );
        assert_eq!(
            key("corp.m.example", "a/b", None).unwrap(),
            "corp.example/a/b"
        );
        assert!(matches!(
            key("evil.m.example", "x", None),
            Err(RouteError::UnknownAlias { .. })
        ));
    }

    #[test]
    fn ns_parameter() {
        assert_eq!(
            key("127.0.0.1:5000", "library/nginx", Some("docker.io")).unwrap(),
            "docker.io/library/nginx"
        );
        assert_eq!(
            key("m.example", "pause", Some("registry.k8s.io")).unwrap(),
            "registry.k8s.io/pause"
        );
        assert_eq!(
            key("m.example", "x", Some("evil.example.com")),
            Err(RouteError::UnknownRegistry("evil.example.com".into()))
        );
        assert!(matches!(
            key("gcr.m.example", "x", Some("docker.io")),
            Err(RouteError::NsConflict { .. })
        ));
        assert_eq!(
            key("docker.m.example", "library/x", Some("docker.io")).unwrap(),
            "docker.io/library/x"
        );
    }

    #[test]
    fn short_names() {
        for (name, want) in [
            ("nginx", "docker.io/library/nginx"),
            ("library/nginx", "docker.io/library/nginx"),
            ("bitnami/nginx", "docker.io/bitnami/nginx"),
            ("kube-apiserver", "registry.k8s.io/kube-apiserver"),
            ("pause", "registry.k8s.io/pause"),
            (
                "distroless/static-debian11",
                "gcr.io/distroless/static-debian11",
            ),
            (
                "ingress-nginx/controller",
                "registry.k8s.io/ingress-nginx/controller",
            ),
        ] {
            assert_eq!(key("m.example:5000", name, None).unwrap(), want, "{name}");
        }
    }

    #[test]
    fn dots_after_the_first_component_are_short_names() {
        // Found by tests/props.rs: these were refused as "names a registry".
        for (name, want) in [
            ("0/0.a", "docker.io/0/0.a"),
            ("bitnami/app.v2", "docker.io/bitnami/app.v2"),
            ("kube-x/a.b/c", "docker.io/kube-x/a.b/c"),
            (
                "distroless/static.debian",
                "gcr.io/distroless/static.debian",
            ),
        ] {
            assert_eq!(key("m.example", name, None).unwrap(), want, "{name}");
        }
    }

    #[test]
    fn bad_names() {
        for name in ["", "UPPER", "a/../b", "a//b", "..", "%2e%2e"] {
            assert!(
                matches!(key("m.example", name, None), Err(RouteError::Name(_))),
                "{name}"
            );
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("kube-*", "kube-apiserver"));
        assert!(!glob_match("kube-*", "kube-x/y"));
        assert!(glob_match("distroless/**", "distroless/a/b"));
        assert!(glob_match("distroless/*", "distroless/static"));
        assert!(!glob_match("distroless/*", "distroless/a/b"));
        assert!(glob_match("pause", "pause"));
        assert!(!glob_match("pause", "pause2"));
        assert!(glob_match("*", "x"));
        assert!(!glob_match("*", "x/y"));
        assert!(glob_match("**", "x/y"));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(glob_match("**/b*", "x/bc/bd"));
        assert!(glob_match("team-*/**", "team-a/x/y"));
        assert!(!glob_match("team-*/**", "team/x"));
    }
}
