//! Images named as a client would pull them, routed exactly as pulls are:
//! `nginx`, `docker.io/nginx:1.25`,
//! `m.example.com/docker.io/library/nginx@sha256:…`, or a host-prefix name
//! (`docker.m.example.com/library/nginx`). Pure.

use std::fmt;

use crate::policy::Policy;
use crate::reference::{Reference, ReferenceError};
use crate::route::{How, RouteError, Router, Target};

/// An image to sync: where it comes from and which manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub target: Target,
    pub reference: Reference,
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{t}", self.target.key()),
            Reference::Digest(d) => write!(f, "{}@{d}", self.target.key()),
        }
    }
}

/// Why an image cannot be synced; the pull API refuses it the same way.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    Route(#[from] RouteError),
    #[error("{0}")]
    Reference(#[from] ReferenceError),
    #[error("{0}")]
    Denied(String),
}

/// An image routed as a pull would be, before `[access]` has its say.
pub struct Routed {
    pub image: ImageRef,
    /// Which rule chose the upstream.
    pub how: How,
    /// This mirror's host, when the text named it.
    pub host: Option<String>,
}

/// Routes `text` as a pull would; `latest` when it names no tag.
pub fn route_image(text: &str, router: &Router) -> Result<Routed, ImageError> {
    let text = text.trim();
    let (name, reference) = match text.split_once('@') {
        // `name:tag@digest`: the digest decides, as Docker has it.
        Some((name, digest)) => match name.rsplit_once(':') {
            Some((bare, tag)) if !tag.contains('/') => (bare, digest),
            _ => (name, digest),
        },
        None => match text.rsplit_once(':') {
            // A colon after the last slash is a tag's; one before it is a
            // registry host's port.
            Some((name, tag)) if !tag.contains('/') => (name, tag),
            _ => (text, "latest"),
        },
    };
    let reference = Reference::parse(reference)?;
    // A first component naming this mirror is the Host a pull would send.
    let (host, name) = match name.split_once('/') {
        Some((first, rest)) if router.is_own_host(first) => (Some(first), rest),
        _ => (None, name),
    };
    let (target, how) = router.resolve_how(host, name, None)?;
    Ok(Routed {
        image: ImageRef { target, reference },
        how,
        host: host.map(str::to_owned),
    })
}

/// Reads `text` as a pull would route and admit it.
pub fn parse_image(text: &str, router: &Router, policy: &Policy) -> Result<ImageRef, ImageError> {
    let routed = route_image(text, router)?;
    policy
        .check(&routed.image.target)
        .map_err(|denied| ImageError::Denied(denied.0))?;
    Ok(routed.image)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Config;

    fn parts() -> (Router, Policy) {
        let config = Config::from_toml(
            "domains = [\"m.example.com\"]\n[access]\ndeny = [\"docker.io/library/forbidden\"]\n",
            Vec::new(),
        )
        .unwrap();
        (Router::new(&config), Policy::new(&config))
    }

    fn parsed(text: &str) -> String {
        let (router, policy) = parts();
        parse_image(text, &router, &policy).unwrap().to_string()
    }

    #[test]
    fn every_form_a_client_pulls_is_read_as_the_pull_would_route_it() {
        let digest = format!("sha256:{}", "a".repeat(64));
        for (given, want) in [
            ("nginx", "docker.io/library/nginx:latest".to_owned()),
            ("nginx:1.25", "docker.io/library/nginx:1.25".to_owned()),
            (
                "docker.io/nginx:1.25",
                "docker.io/library/nginx:1.25".to_owned(),
            ),
            (
                "index.docker.io/library/nginx",
                "docker.io/library/nginx:latest".to_owned(),
            ),
            (
                "registry.k8s.io/pause:3.9",
                "registry.k8s.io/pause:3.9".to_owned(),
            ),
            (
                &format!("m.example.com/docker.io/library/nginx@{digest}"),
                format!("docker.io/library/nginx@{digest}"),
            ),
            (
                "m.example.com/nginx:1",
                "docker.io/library/nginx:1".to_owned(),
            ),
            (
                "docker.m.example.com/library/nginx:1",
                "docker.io/library/nginx:1".to_owned(),
            ),
            (
                "k8s.m.example.com/pause:3.9",
                "registry.k8s.io/pause:3.9".to_owned(),
            ),
            ("ghcr.io/acme/app", "ghcr.io/acme/app:latest".to_owned()),
            (
                &format!("nginx:1.25@{digest}"),
                format!("docker.io/library/nginx@{digest}"),
            ),
        ] {
            assert_eq!(parsed(given), want, "{given}");
        }
    }

    #[test]
    fn what_a_pull_refuses_is_refused() {
        let (router, policy) = parts();
        let refused = |t: &str| parse_image(t, &router, &policy).unwrap_err().to_string();
        assert!(refused("evil.example.org/x/y:1").contains("not a registry this mirror"));
        assert!(refused("nowhere.m.example.com/x:1").contains("names no configured upstream"));
        assert!(refused("nginx:-bad").contains("tag"));
        assert!(refused("Nginx:1").contains("name"));
        assert!(matches!(
            parse_image("forbidden:1", &router, &policy),
            Err(ImageError::Denied(_))
        ));
    }
}
