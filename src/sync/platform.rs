//! The entries of an image index, and those a list of platforms selects.
//! Pure.

use serde::Deserialize;

use crate::reference::{Digest, Platform};

/// A manifest an index lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub digest: Digest,
    /// `None` when the index gives none (or one that cannot be read).
    pub platform: Option<Platform>,
}

#[derive(Deserialize)]
struct RawIndex {
    manifests: Vec<serde_json::Value>,
}

/// The manifests an index lists, when `body` is an index (it has a
/// `manifests` list); `None` for an image manifest. An entry whose
/// platform cannot be read is listed without one.
pub fn index_entries(body: &[u8]) -> Option<Vec<Entry>> {
    let index: RawIndex = serde_json::from_slice(body).ok()?;
    let text = |v: &serde_json::Value, field: &str| {
        v.get(field)
            .and_then(|f| f.as_str())
            .map(str::to_ascii_lowercase)
    };
    Some(
        index
            .manifests
            .iter()
            .filter_map(|e| {
                let platform = e.get("platform");
                Some(Entry {
                    digest: Digest::parse(e.get("digest")?.as_str()?).ok()?,
                    platform: platform.and_then(|p| {
                        Some(Platform {
                            os: text(p, "os")?,
                            architecture: text(p, "architecture")?,
                            variant: text(p, "variant"),
                        })
                    }),
                })
            })
            .collect(),
    )
}

/// The entries `wanted` selects (all of them when it is empty).
pub fn select(entries: &[Entry], wanted: &[Platform]) -> Vec<Entry> {
    entries
        .iter()
        .filter(|e| {
            wanted.is_empty()
                || e.platform
                    .as_ref()
                    .is_some_and(|p| wanted.iter().any(|w| w.selects(p)))
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn platforms_read_and_select_as_docker_does() {
        let arm64 = Platform::parse("linux/arm64").unwrap();
        assert_eq!(arm64.to_string(), "linux/arm64");
        let v8 = Platform::parse("linux/arm64/v8").unwrap();
        assert!(arm64.selects(&v8));
        assert!(!v8.selects(&Platform::parse("linux/arm64/v9").unwrap()));
        assert!(!arm64.selects(&Platform::parse("linux/amd64").unwrap()));
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64", ""] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_index_lists_its_platforms_and_a_filter_picks_among_them() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let body = format!(
            r#"{{"schemaVersion":2,"manifests":[
                {{"digest":"{}","platform":{{"os":"linux","architecture":"amd64"}}}},
                {{"digest":"{}","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
                {{"digest":"{}","platform":{{"os":"unknown","architecture":"unknown"}}}},
                {{"digest":"{}","platform":{{"os":7}}}}]}}"#,
            d('a'),
            d('b'),
            d('c'),
            d('e')
        );
        let entries = index_entries(body.as_bytes()).unwrap();
        assert_eq!(entries.len(), 4);
        assert_eq!(select(&entries, &[]).len(), 4);
        let arm = select(&entries, &[Platform::parse("linux/arm64").unwrap()]);
        assert_eq!(arm.len(), 1);
        assert_eq!(arm[0].digest.to_string(), d('b'));
        assert!(index_entries(br#"{"schemaVersion":2,"layers":[]}"#).is_none());
    }
}
