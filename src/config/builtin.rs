//! The upstream table and short-name routes Pier knows without a config.

use std::time::Duration;

use url::Url;

use super::{RouteConfig, UpstreamConfig};

/// How long a tag is trusted before Pier asks upstream again.
pub const DEFAULT_TAG_TTL: Duration = Duration::from_secs(10 * 60);

/// (registry, host-prefix aliases, endpoint)
const UPSTREAMS: &[(&str, &[&str], &str)] = &[
    (
        "docker.io",
        &["docker", "hub"],
        "https://registry-1.docker.io",
    ),
    ("gcr.io", &["gcr"], "https://gcr.io"),
    ("ghcr.io", &["ghcr"], "https://ghcr.io"),
    ("registry.k8s.io", &["k8s"], "https://registry.k8s.io"),
    ("k8s.gcr.io", &["k8s-gcr"], "https://k8s.gcr.io"),
    ("quay.io", &["quay"], "https://quay.io"),
    ("mcr.microsoft.com", &["mcr"], "https://mcr.microsoft.com"),
    ("nvcr.io", &["nvcr"], "https://nvcr.io"),
    (
        "docker.elastic.co",
        &["elastic"],
        "https://docker.elastic.co",
    ),
];

/// Short names that are not Docker Hub images (pattern, registry).
const ROUTES: &[(&str, &str)] = &[
    ("kube-*", "registry.k8s.io"),
    ("pause", "registry.k8s.io"),
    ("etcd", "registry.k8s.io"),
    ("ingress-nginx/**", "registry.k8s.io"),
    ("sig-storage/**", "registry.k8s.io"),
    ("metrics-server/**", "registry.k8s.io"),
    ("kas-network-proxy/**", "registry.k8s.io"),
    ("distroless/**", "gcr.io"),
];

pub fn builtin_upstreams() -> Vec<UpstreamConfig> {
    UPSTREAMS
        .iter()
        .filter_map(|(registry, aliases, endpoint)| {
            Some(UpstreamConfig {
                registry: (*registry).to_owned(),
                aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
                endpoints: vec![Url::parse(endpoint).ok()?],
                tag_ttl: DEFAULT_TAG_TTL,
                username: None,
                password: None,
                allow: Vec::new(),
                deny: Vec::new(),
                max_age: None,
                prefetch: false,
            })
        })
        .collect()
}

pub fn builtin_routes() -> Vec<RouteConfig> {
    ROUTES
        .iter()
        .map(|(pattern, registry)| RouteConfig {
            pattern: (*pattern).to_owned(),
            registry: (*registry).to_owned(),
        })
        .collect()
}
