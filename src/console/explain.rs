//! `/api/v1/explain?ref=…`: how Pier reads anything a user might type
//! (`nginx`, `docker.io/nginx:1.25`, `https://hub.docker.com/_/nginx`, a
//! whole `docker pull …` line, a host-prefix name), whether `[access]`
//! admits it, what the cache holds of it, what a pull would do now, and
//! the commands to pull it. Only the metadata store is read; no upstream
//! is contacted.

use serde::Serialize;

use crate::mirror::Mirror;
use crate::reference::{Digest, Reference};
use crate::route::{How, RouteError};
use crate::sync::{ImageError, index_entries, route_image};

#[derive(Debug, Serialize)]
pub struct Explanation {
    /// As given.
    pub input: String,
    /// The image reference found in it.
    pub reference: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routed: Option<RoutedTo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached: Option<Cached>,
    /// What a pull of it would do now.
    pub pull_would: String,
    /// Commands that pull it through this mirror.
    pub pull_commands: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Problem>,
}

#[derive(Debug, Serialize)]
pub struct RoutedTo {
    /// add-a-prefix, host-prefix, short name or ns
    pub mode: &'static str,
    pub registry: String,
    pub repository: String,
    pub tag_or_digest: String,
    /// `<registry>/<repository>:<tag>` (or `@digest`)
    pub normalized: String,
    /// The short-name rule that chose the registry, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Access {
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Cached {
    /// The digest cached for the tag (or the digest asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// How long ago upstream last confirmed the tag, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag_confirmed_secs_ago: Option<u64>,
    pub manifest: bool,
    /// For an index: the platforms it lists, and those whose manifest is
    /// cached.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub platforms_cached: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Problem {
    pub code: &'static str,
    pub message: String,
}

/// How this mirror is reached, for pull commands.
pub struct Reached<'a> {
    /// `domains`, or the Host the request came to when none is configured.
    pub hosts: Vec<&'a str>,
    /// Whether the hosts take host prefixes (configured domains do).
    pub prefixes: bool,
    /// (alias, registry)
    pub aliases: &'a [(String, String)],
}

/// The image reference in what a user typed: a `… pull` line's last
/// argument, a Docker Hub or registry web address, or the text itself.
pub fn reference_in(input: &str) -> String {
    let text = input.trim();
    // `docker pull -q nginx:1.25`, `podman pull …`, `ctr image pull …`
    let text = if text.split_whitespace().any(|w| w == "pull") {
        text.split_whitespace()
            .skip_while(|w| *w != "pull")
            .skip(1)
            .filter(|w| !w.starts_with('-'))
            .last()
            .unwrap_or("")
    } else {
        text
    };
    let text = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .unwrap_or(text);
    // Docker Hub's pages: hub.docker.com/_/nginx, hub.docker.com/r/org/app
    if let Some(path) = text.strip_prefix("hub.docker.com/") {
        let path = path.split(['?', '#']).next().unwrap_or("");
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        return match parts.as_slice() {
            ["_", name, ..] => (*name).to_owned(),
            ["r", org, name, ..] => format!("{org}/{name}"),
            _ => path.to_owned(),
        };
    }
    text.trim_end_matches('/').to_owned()
}

/// Explains `input` as this mirror would take it.
pub async fn explain(mirror: &Mirror, input: &str, reached: &Reached<'_>) -> Explanation {
    let reference = reference_in(input);
    let mut out = Explanation {
        input: input.chars().take(512).collect(),
        reference: reference.chars().take(512).collect(),
        routed: None,
        access: None,
        cached: None,
        pull_would: String::new(),
        pull_commands: Vec::new(),
        error: None,
    };
    let routed = match route_image(&reference, &mirror.router) {
        Ok(r) => r,
        Err(e) => {
            let code = match &e {
                ImageError::Route(RouteError::Name(_)) | ImageError::Reference(_) => "NAME_INVALID",
                _ => "NAME_UNKNOWN",
            };
            out.pull_would = format!("be refused ({code}) before anything is contacted");
            out.error = Some(Problem {
                code,
                message: e.to_string(),
            });
            return out;
        }
    };
    let target = &routed.image.target;
    let at = match &routed.image.reference {
        Reference::Tag(t) => format!(":{t}"),
        Reference::Digest(d) => format!("@{d}"),
    };
    let (mode, route) = match &routed.how {
        How::Ns => ("ns", None),
        How::HostPrefix => ("host-prefix", None),
        How::AddPrefix => ("add-a-prefix", None),
        How::Route(pattern) => ("short name", Some(pattern.clone())),
        How::Default => ("short name", None),
    };
    out.routed = Some(RoutedTo {
        mode,
        registry: target.registry.clone(),
        repository: target.repository.as_str().to_owned(),
        tag_or_digest: at.chars().skip(1).collect(),
        normalized: format!("{}{at}", target.key()),
        route,
    });
    out.pull_commands = pull_commands(&target.registry, target.repository.as_str(), &at, reached);
    if let Err(denied) = mirror.policy.check(target) {
        out.access = Some(Access {
            allowed: false,
            message: Some(denied.0.clone()),
        });
        out.pull_would = "be refused (DENIED) before anything is contacted".into();
        out.error = Some(Problem {
            code: "DENIED",
            message: denied.0,
        });
        return out;
    }
    out.access = Some(Access {
        allowed: true,
        message: None,
    });
    let (cached, would) = cache_state(mirror, &routed.image.reference, target).await;
    out.cached = Some(cached);
    out.pull_would = would;
    out
}

fn pull_commands(registry: &str, repo: &str, at: &str, reached: &Reached<'_>) -> Vec<String> {
    let mut commands = Vec::new();
    for host in &reached.hosts {
        commands.push(format!("docker pull {host}/{registry}/{repo}{at}"));
        if reached.prefixes
            && let Some((alias, _)) = reached.aliases.iter().find(|(_, r)| r == registry)
        {
            commands.push(format!("docker pull {alias}.{host}/{repo}{at}"));
        }
    }
    if let (Some(host), "docker.io") = (reached.hosts.first(), registry) {
        let short = repo.strip_prefix("library/").unwrap_or(repo);
        commands.push(format!(
            "docker pull {short}{at}   # with \"registry-mirrors\": [\"https://{host}\"] in daemon.json"
        ));
    }
    commands
}

/// What the cache holds of the image, and what a pull would do now.
async fn cache_state(
    mirror: &Mirror,
    reference: &Reference,
    target: &crate::route::Target,
) -> (Cached, String) {
    let meta = mirror.meta();
    let key = target.key();
    let (digest, confirmed) = match reference {
        Reference::Digest(d) => (Some(d.clone()), None),
        Reference::Tag(t) => match meta.tag(&key, t.as_str()).await {
            Ok(Some(rec)) => (Digest::parse(&rec.digest).ok(), Some(rec.checked_at_ms)),
            _ => (None, None),
        },
    };
    let manifest = match &digest {
        Some(d) => meta.manifest(d).await.ok().flatten(),
        None => None,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut cached = Cached {
        digest: digest.filter(|_| manifest.is_some()).map(|d| d.to_string()),
        tag_confirmed_secs_ago: confirmed.map(|at| now.saturating_sub(at) / 1000),
        manifest: manifest.is_some(),
        platforms: Vec::new(),
        platforms_cached: Vec::new(),
    };
    if let Some(entries) = manifest.as_ref().and_then(|m| index_entries(&m.bytes)) {
        let digests: Vec<Digest> = entries.iter().map(|e| e.digest.clone()).collect();
        let stored = meta.has_manifests(&digests).await.unwrap_or_default();
        for (i, entry) in entries.iter().enumerate() {
            let name = entry
                .platform
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), ToString::to_string);
            if stored.get(i).copied().unwrap_or(false) {
                cached.platforms_cached.push(name.clone());
            }
            cached.platforms.push(name);
        }
    }
    let ttl = u64::try_from(mirror.tag_ttl(&target.registry).as_millis()).unwrap_or(u64::MAX);
    let registry = &target.registry;
    let would = match (reference, manifest.is_some(), confirmed) {
        (_, false, _) => format!("fetch the manifest from {registry} (it is not cached)"),
        (Reference::Digest(_), true, _) => "serve the manifest from the cache".into(),
        (_, true, Some(at)) if now.saturating_sub(at) < ttl => {
            "serve the manifest from the cache (upstream confirmed the tag within its tag_ttl)"
                .into()
        }
        (_, true, _) => format!(
            "ask {registry} whether the tag still names the cached manifest (a HEAD), then serve it from the cache; from the cache alone while {registry} cannot be reached"
        ),
    };
    (cached, would)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_is_found_in_what_users_type() {
        for (typed, found) in [
            ("nginx", "nginx"),
            ("  docker.io/nginx:1.25 ", "docker.io/nginx:1.25"),
            ("docker pull nginx:1.25", "nginx:1.25"),
            ("docker pull -q --platform linux/arm64 nginx", "nginx"),
            (
                "sudo ctr image pull docker.io/library/redis:7",
                "docker.io/library/redis:7",
            ),
            ("https://hub.docker.com/_/nginx", "nginx"),
            (
                "https://hub.docker.com/r/bitnami/redis/tags",
                "bitnami/redis",
            ),
            ("https://ghcr.io/acme/app/", "ghcr.io/acme/app"),
        ] {
            assert_eq!(reference_in(typed), found, "{typed}");
        }
    }
}
