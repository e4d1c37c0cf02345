//! Which images may be pulled: allow and deny lists of globs over
//! `<registry>/<repository>`, globally and per upstream. Pure.

use crate::config::Config;
use crate::route::{Target, glob_match};

#[derive(Debug, Default)]
pub struct Policy {
    allow: Vec<String>,
    deny: Vec<String>,
    message: Option<String>,
}

/// A refused image, with the text that tells the user what to do.
#[derive(Debug, PartialEq, Eq)]
pub struct Denied(pub String);

impl Policy {
    pub fn new(config: &Config) -> Self {
        let mut allow = config.access.allow.clone();
        let mut deny = config.access.deny.clone();
        // Upstream lists speak of repositories; anchor them to the registry.
        for u in &config.upstreams {
            allow.extend(u.allow.iter().map(|p| format!("{}/{p}", u.registry)));
            deny.extend(u.deny.iter().map(|p| format!("{}/{p}", u.registry)));
        }
        // The console shows what the policy lets through, and knows no
        // users: the private namespace stays out of it. (Mirrored names
        // never start with the prefix, which has no dot.)
        if let Some(p) = &config.private {
            deny.push(format!("{}/**", p.prefix));
        }
        Self {
            allow,
            deny,
            message: config.access.denied_message.clone(),
        }
    }

    pub fn check(&self, target: &Target) -> Result<(), Denied> {
        if self.allow.is_empty() && self.deny.is_empty() {
            return Ok(());
        }
        let image = target.key();
        let denied = self.deny.iter().any(|p| glob_match(p, &image))
            || (!self.allow.is_empty() && !self.allow.iter().any(|p| glob_match(p, &image)));
        if !denied {
            return Ok(());
        }
        let mut text = format!("{image} is not allowed through this mirror");
        if let Some(m) = &self.message {
            text.push_str(": ");
            text.push_str(m);
        }
        Err(Denied(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::RepoName;

    fn policy(toml: &str) -> Policy {
        Policy::new(&Config::from_toml(toml, Vec::new()).unwrap())
    }

    fn target(registry: &str, repo: &str) -> Target {
        Target {
            registry: registry.into(),
            repository: RepoName::parse(repo).unwrap(),
        }
    }

    #[test]
    fn everything_is_allowed_by_default() {
        assert_eq!(
            policy("").check(&target("docker.io", "library/nginx")),
            Ok(())
        );
    }

    #[test]
    fn deny_wins_and_allow_lists_are_exclusive() {
        let p = policy(
            r#"
            [access]
            allow = ["docker.io/library/*", "registry.k8s.io/**"]
            deny = ["docker.io/library/bad*"]
            denied_message = "ask in #platform"

            [[upstreams]]
            registry = "gcr.io"
            allow = ["distroless/**"]
            deny = ["distroless/secret"]
            "#,
        );
        assert!(p.check(&target("docker.io", "library/nginx")).is_ok());
        assert!(p.check(&target("registry.k8s.io", "a/b/c")).is_ok());
        assert!(p.check(&target("gcr.io", "distroless/static")).is_ok());
        let Err(Denied(why)) = p.check(&target("docker.io", "library/badimage")) else {
            panic!("denied image allowed");
        };
        assert_eq!(
            why,
            "docker.io/library/badimage is not allowed through this mirror: ask in #platform"
        );
        assert!(p.check(&target("docker.io", "bitnami/nginx")).is_err());
        assert!(p.check(&target("gcr.io", "distroless/secret")).is_err());
        assert!(p.check(&target("quay.io", "x/y")).is_err());
    }

    #[test]
    fn bad_patterns_are_named() {
        let err = Config::from_toml("[access]\nallow = [\"NOPE\"]", Vec::new()).unwrap_err();
        assert!(err.to_string().contains("access.allow[0]"), "{err}");
    }
}
