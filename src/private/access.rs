//! Who may do what in the private namespace: the configured users and the
//! htpasswd file's, their passwords (bcrypt) and their push and pull globs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use crate::config::PrivateConfig;
use crate::route::glob_match;

/// What a request wants to do to a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pull,
    /// Push, and delete (as in distribution, deleting needs push rights).
    Push,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
        }
    }

    /// The action a token scope names, if Pier knows it.
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "pull" => Some(Action::Pull),
            "push" | "delete" | "*" => Some(Action::Push),
            _ => None,
        }
    }
}

struct User {
    /// `None`: no password works (an entry that only sets rights, for a
    /// user the htpasswd file does not list).
    hash: Option<String>,
    push: Vec<String>,
    pull: Vec<String>,
}

/// How long a password once found right is taken without bcrypt again:
/// clients that send Basic credentials send them with every request.
const VERIFIED_FOR: Duration = Duration::from_secs(300);
/// Entries kept in that memory before it is cleared.
const VERIFIED_MAX: usize = 10_000;

pub struct Users {
    users: HashMap<String, User>,
    anonymous_pull: bool,
    /// SHA-256 of `name \0 password` → when bcrypt last said yes.
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    /// bcrypt checks running at once: each holds a blocking thread for
    /// tens of milliseconds, and guesses must not take the pool.
    checking: tokio::sync::Semaphore,
}

/// bcrypt checks that may run at once.
const CHECKS_AT_ONCE: usize = 4;

/// Checked against for an unknown user, so an answer takes as long
/// whether or not the name exists. (The hash of a random password.)
const NO_SUCH_USER: &str = "$2b$10$3.NYMJLmyDZzrH.tERmSSeG4TSm9HOczHW5S5Cm3e8nV7ipCkv/.O";

/// The failure to read the htpasswd file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct HtpasswdError {
    path: String,
    why: String,
}

impl Users {
    pub fn new(config: &PrivateConfig) -> Result<Self, HtpasswdError> {
        let mut users = HashMap::new();
        if let Some(path) = &config.htpasswd {
            for (name, hash) in read_htpasswd(path)? {
                users.insert(
                    name,
                    User {
                        hash: Some(hash),
                        push: config.htpasswd_push.clone(),
                        pull: config.htpasswd_pull.clone(),
                    },
                );
            }
        }
        for u in &config.users {
            let hash = u
                .password_hash
                .as_ref()
                .map(|h| h.expose().to_owned())
                .or_else(|| users.get(&u.name).and_then(|known| known.hash.clone()));
            users.insert(
                u.name.clone(),
                User {
                    hash,
                    push: u.push.clone(),
                    pull: u.pull.clone(),
                },
            );
        }
        Ok(Self {
            users,
            anonymous_pull: config.anonymous_pull,
            verified: Mutex::new(HashMap::new()),
            checking: tokio::sync::Semaphore::new(CHECKS_AT_ONCE),
        })
    }

    /// Whether `name` and `password` were found right lately: no bcrypt
    /// needed, and no login attempt to count.
    pub fn remembered(&self, name: &str, password: &str) -> bool {
        let verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        verified
            .get(&pair_key(name, password))
            .is_some_and(|at| at.elapsed() < VERIFIED_FOR)
    }

    /// Whether `password` is `name`'s. Runs bcrypt (tens of milliseconds)
    /// on the blocking pool, a few at a time, unless the pair was found
    /// right lately; an unknown name takes as long as a known one.
    pub async fn verify(&self, name: &str, password: &str) -> bool {
        if self.remembered(name, password) {
            return true;
        }
        let hash = self.users.get(name).and_then(|u| u.hash.clone());
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| NO_SUCH_USER.to_owned());
        let Ok(_permit) = self.checking.acquire().await else {
            return false;
        };
        let given = password.to_owned();
        let right =
            tokio::task::spawn_blocking(move || bcrypt::verify(given, &hash).unwrap_or(false))
                .await
                .unwrap_or(false)
                && known;
        if right {
            let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if verified.len() >= VERIFIED_MAX {
                verified.clear();
            }
            verified.insert(pair_key(name, password), Instant::now());
        }
        right
    }

    /// Whether `user` (`None`: anonymous) may do `action` to the private
    /// repository `repo` (its name under the prefix).
    pub fn may(&self, user: Option<&str>, repo: &str, action: Action) -> bool {
        match user {
            None => action == Action::Pull && self.anonymous_pull,
            Some(name) => self.users.get(name).is_some_and(|u| {
                let globs = match action {
                    Action::Pull => &u.pull,
                    Action::Push => &u.push,
                };
                globs.iter().any(|g| glob_match(g, repo))
                    || (action == Action::Pull && self.anonymous_pull)
            }),
        }
    }

    pub fn anonymous_pull(&self) -> bool {
        self.anonymous_pull
    }
}

fn pair_key(name: &str, password: &str) -> [u8; 32] {
    Sha256::new()
        .chain_update(name.as_bytes())
        .chain_update([0])
        .chain_update(password.as_bytes())
        .finalize()
        .into()
}

/// `name:hash` lines; blank lines and `#` comments are skipped. Only bcrypt
/// entries are taken: the others (MD5, SHA-1, crypt) are too weak to keep.
fn read_htpasswd(path: &Path) -> Result<Vec<(String, String)>, HtpasswdError> {
    let error = |why: String| HtpasswdError {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let mut users = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, hash)) = line.split_once(':') else {
            return Err(error(format!("line {} is not name:hash", i + 1)));
        };
        if !crate::config::is_bcrypt(hash) {
            return Err(error(format!(
                "line {} ({name}) is not a bcrypt entry: make it with `htpasswd -B`",
                i + 1
            )));
        }
        users.push((name.to_owned(), hash.to_owned()));
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn users(extra: &str) -> Users {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let config = Config::from_toml(
            &format!(
                r#"
                [private]
                {extra}
                [[private.users]]
                name = "ci"
                password_hash = "{hash}"
                push = ["team/**"]
                "#
            ),
            Vec::new(),
        )
        .unwrap();
        Users::new(config.private.as_ref().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn passwords_and_globs() {
        let u = users("");
        assert!(u.verify("ci", "s3cret").await);
        assert!(u.verify("ci", "s3cret").await, "remembered");
        assert!(!u.verify("ci", "wrong").await);
        assert!(!u.verify("nobody", "s3cret").await);
        assert!(u.may(Some("ci"), "team/app", Action::Push));
        assert!(u.may(Some("ci"), "team/a/b", Action::Push));
        assert!(!u.may(Some("ci"), "other/app", Action::Push));
        assert!(u.may(Some("ci"), "other/app", Action::Pull));
        assert!(!u.may(None, "team/app", Action::Pull));
        assert!(users("anonymous_pull = true").may(None, "team/app", Action::Pull));
        assert!(!users("anonymous_pull = true").may(None, "team/app", Action::Push));
    }

    #[tokio::test]
    async fn htpasswd_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("pw", 4).unwrap();
        std::fs::write(&path, format!("# team\nbob:{hash}\n\nann:{hash}\n")).unwrap();
        // Every user of the file gets `htpasswd_push`, unless an entry of
        // their name (without a password) says otherwise.
        let u = users(&format!(
            "htpasswd = {:?}\nhtpasswd_push = [\"shared/**\"]\n[[private.users]]\nname = \"ann\"\npush = [\"ann/**\"]",
            path.display().to_string()
        ));
        assert!(u.verify("bob", "pw").await);
        assert!(u.verify("ann", "pw").await);
        assert!(u.may(Some("bob"), "shared/x", Action::Push));
        assert!(!u.may(Some("bob"), "ann/x", Action::Push));
        assert!(u.may(Some("ann"), "ann/x", Action::Push));
        assert!(!u.may(Some("ann"), "shared/x", Action::Push));
        assert!(u.may(Some("ann"), "shared/x", Action::Pull));
        std::fs::write(&path, "eve:$apr1$abc$def\n").unwrap();
        let config = Config::from_toml(
            &format!("[private]\nhtpasswd = {:?}", path.display().to_string()),
            Vec::new(),
        )
        .unwrap();
        let e = Users::new(config.private.as_ref().unwrap()).err().unwrap();
        assert!(e.to_string().contains("htpasswd -B"), "{e}");
    }
}
