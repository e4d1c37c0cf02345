//! `[private]`: the namespace of the operator's own images, its users and
//! what each may push and pull.

use super::file::{FilePrivate, FilePrivateUser};
use super::validate::{Problems, is_dns_label, is_route_pattern, positive};
use super::{PrivateConfig, PrivateUser, Secret, UpstreamConfig};

pub(super) fn build(
    raw: FilePrivate,
    domains: &[String],
    upstreams: &[UpstreamConfig],
    p: &mut Problems,
) -> Option<PrivateConfig> {
    let prefix = raw.prefix.unwrap_or_else(|| "private".into());
    // One component without a dot or colon: a name starting with it can
    // never be read as a registry host (add-a-prefix).
    if !crate::reference::is_path_component(&prefix)
        || prefix.contains('.')
        || prefix == "localhost"
    {
        p.add(
            "private.prefix",
            format!(
                "{prefix:?} is not one path component of a-z 0-9 _ - without a dot (nor localhost, a registry's name)"
            ),
        );
    }
    if let Some(alias) = &raw.alias {
        if !is_dns_label(alias) {
            p.add(
                "private.alias",
                format!("{alias:?} is not a lowercase DNS label"),
            );
        }
        if domains.is_empty() {
            p.add(
                "private.alias",
                "host prefixes need `domains` to be set".into(),
            );
        }
        if let Some(u) = upstreams.iter().find(|u| u.aliases.contains(alias)) {
            p.add(
                "private.alias",
                format!("{alias:?} already names the upstream {}", u.registry),
            );
        }
    }
    let globs = |p: &mut Problems, key: &str, v: Option<Vec<String>>, default: &[&str]| {
        let v = v.unwrap_or_else(|| default.iter().map(|s| (*s).to_owned()).collect());
        for (i, g) in v.iter().enumerate() {
            if !is_route_pattern(g) {
                p.add(
                    &format!("{key}[{i}]"),
                    format!("{g:?} is not a glob over a repository name (a-z 0-9 . _ - / *)"),
                );
            }
        }
        v
    };
    let mut users: Vec<PrivateUser> = Vec::new();
    for (i, u) in raw.users.into_iter().enumerate() {
        let key = format!("private.users[{i}]");
        let FilePrivateUser {
            name,
            password_hash,
            push,
            pull,
        } = u;
        let Some(name) = name.filter(|n| valid_user_name(n)) else {
            p.add(
                &format!("{key}.name"),
                "needs a name without `:`, spaces or control characters".into(),
            );
            continue;
        };
        if users.iter().any(|u| u.name == name) {
            p.add(&format!("{key}.name"), format!("{name:?} is listed twice"));
        }
        match &password_hash {
            Some(h) if !is_bcrypt(h) => p.add(
                &format!("{key}.password_hash"),
                "is not a bcrypt hash ($2b$…, from `pier users hash` or `htpasswd -nB`)".into(),
            ),
            None if raw.htpasswd.is_none() => p.add(
                &format!("{key}.password_hash"),
                "is needed (only users of the `htpasswd` file may leave it out)".into(),
            ),
            _ => {}
        }
        users.push(PrivateUser {
            name,
            password_hash: password_hash.map(|h| Secret::new(h.trim())),
            push: globs(p, &format!("{key}.push"), push, &[]),
            pull: globs(p, &format!("{key}.pull"), pull, &["**"]),
        });
    }
    let upload_ttl = positive(p, "private.upload_ttl", raw.upload_ttl, 3600);
    // A push's blobs wait unreferenced until its manifest comes, and an
    // idle upload's chunks until it goes on: neither may be collected first.
    let gc_grace = positive(p, "private.gc_grace", raw.gc_grace, 86_400);
    if gc_grace < upload_ttl {
        p.add(
            "private.gc_grace",
            format!(
                "must be at least upload_ttl ({}): chunks of an upload still going on would be collected",
                humantime::format_duration(upload_ttl)
            ),
        );
    }
    let htpasswd_push = globs(p, "private.htpasswd_push", raw.htpasswd_push, &[]);
    let htpasswd_pull = globs(p, "private.htpasswd_pull", raw.htpasswd_pull, &["**"]);
    Some(PrivateConfig {
        prefix,
        alias: raw.alias,
        users,
        htpasswd: raw.htpasswd,
        htpasswd_push,
        htpasswd_pull,
        anonymous_pull: raw.anonymous_pull.unwrap_or(false),
        token_ttl: positive(p, "private.token_ttl", raw.token_ttl, 300),
        upload_ttl,
        gc_interval: positive(p, "private.gc_interval", raw.gc_interval, 3600),
        token_realm: raw.token_realm.and_then(|r| match url::Url::parse(&r) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(r),
            _ => {
                p.add(
                    "private.token_realm",
                    format!("{r:?} is not an http(s) URL like https://m.example.com/auth/token"),
                );
                None
            }
        }),
        gc_grace,
    })
}

fn valid_user_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && !n.contains(':')
        && !n.chars().any(char::is_whitespace)
        && !n.chars().any(char::is_control)
}

/// The bcrypt forms htpasswd and bcrypt libraries write.
pub(crate) fn is_bcrypt(h: &str) -> bool {
    let h = h.trim();
    ["$2a$", "$2b$", "$2y$", "$2x$"]
        .iter()
        .any(|v| h.starts_with(v))
        && h.len() == 60
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn problems(private: &str) -> String {
        match Config::from_toml(&format!("[private]\n{private}"), Vec::new()) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_private_sections_name_their_keys() {
        assert_eq!(problems("prefix = \"own\""), "");
        assert!(problems("prefix = \"localhost\"").contains("private.prefix"));
        assert!(problems("prefix = \"a.b\"").contains("private.prefix"));
        assert!(problems("alias = \"own\"").contains("private.alias"));
        assert!(problems("gc_grace = \"1m\"").contains("private.gc_grace"));
        assert!(problems("token_realm = \"ftp://x\"").contains("private.token_realm"));
        let user = "[[private.users]]\nname = \"ci\"\n";
        assert!(problems(user).contains("password_hash"));
        assert!(
            problems(&format!("{user}password_hash = \"plain\"")).contains("not a bcrypt hash")
        );
        assert!(problems(&format!("htpasswd = \"/x\"\n{user}push = [\"UP\"]")).contains("push[0]"));
    }
}
