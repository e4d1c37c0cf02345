//! One cached image as the console shows it: an index's platforms, or an
//! image's layers (each cached or not) and its config (created, OS and
//! architecture, entrypoint and command, ports, labels, history). Reads the
//! metadata store and the blob store only.

use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;

use crate::descriptors::references;
use crate::meta::{MetaError, MetaStore};
use crate::mirror::Mirror;
use crate::reference::{Digest, Reference};
use crate::route::Target;
use crate::sync::index_entries;

/// Configs larger than this are not read for the page.
const CONFIG_AT_MOST: u64 = 4 << 20;

#[derive(Debug, Serialize)]
pub struct ImageView {
    pub digest: String,
    pub media_type: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<PlatformView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigView>,
    /// Cached signatures, SBOMs and other artifacts about this image.
    pub referrers: Vec<ReferrerView>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ReferrerView {
    pub digest: String,
    /// Its `artifactType`, or else its config's media type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The tag it is cached under, where a tool stored it by the tag scheme
    /// (`sha256-<hex>.sig`) instead of the referrers API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct PlatformView {
    pub platform: String,
    pub digest: String,
    pub cached: bool,
}

#[derive(Debug, Serialize)]
pub struct LayerView {
    pub digest: String,
    pub size: Option<u64>,
    pub cached: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct ConfigView {
    pub digest: String,
    pub cached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub entrypoint: Value,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub cmd: Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<String>,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub labels: Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<String>,
}

/// Manifests of this repository examined for a `subject`, at most.
const SUBJECTS_READ: usize = 500;

/// What the cache holds about `digest` in `repo`: manifests whose `subject`
/// is it (pulled through the referrers API or by digest), and tags of the
/// tag scheme (`sha256-<hex>`, `sha256-<hex>.sig`, `.att`, `.sbom`).
async fn referrers(
    meta: &dyn MetaStore,
    repo: &str,
    digest: &Digest,
) -> Result<Vec<ReferrerView>, MetaError> {
    let kind_of = |bytes: &[u8]| {
        let doc = serde_json::from_slice::<Value>(bytes).ok()?;
        doc["artifactType"]
            .as_str()
            .or_else(|| doc["config"]["mediaType"].as_str())
            .map(str::to_owned)
    };
    let mut found = Vec::new();
    let scheme = digest.to_string().replacen(':', "-", 1);
    for tag in meta.tags(repo).await? {
        if !tag.starts_with(&scheme) {
            continue;
        }
        let Some(record) = meta.tag(repo, &tag).await? else {
            continue;
        };
        let Ok(d) = Digest::parse(&record.digest) else {
            continue;
        };
        let manifest = meta.manifest(&d).await?;
        found.push(ReferrerView {
            digest: d.to_string(),
            artifact_type: manifest.and_then(|m| kind_of(&m.bytes)),
            tag: Some(tag),
        });
    }
    let linked: Vec<Digest> = meta
        .links(repo)
        .await?
        .into_iter()
        .filter(|d| d != digest)
        .collect();
    let are_manifests = meta.has_manifests(&linked).await?;
    let candidates: Vec<Digest> = linked
        .into_iter()
        .zip(are_manifests)
        .filter(|(d, m)| *m && !found.iter().any(|r| r.digest == d.to_string()))
        .map(|(d, _)| d)
        .take(SUBJECTS_READ)
        .collect();
    let wanted = digest.to_string();
    let wanted = wanted.as_str();
    // Up to 16 reads at a time: a page view over hundreds of manifests
    // takes a few round trips' time, not hundreds.
    let read: Vec<Result<Option<ReferrerView>, MetaError>> = futures::stream::iter(candidates)
        .map(|d: Digest| async move {
            let Some(m) = meta.manifest(&d).await? else {
                return Ok(None);
            };
            let subject = serde_json::from_slice::<Value>(&m.bytes)
                .ok()
                .and_then(|v| v["subject"]["digest"].as_str().map(str::to_owned));
            Ok((subject.as_deref() == Some(wanted)).then(|| ReferrerView {
                digest: d.to_string(),
                artifact_type: kind_of(&m.bytes),
                tag: None,
            }))
        })
        .buffered(16)
        .collect()
        .await;
    for r in read {
        found.extend(r?);
    }
    Ok(found)
}

/// The cached image `reference` names in `target`; `None` when the
/// repository is hidden or the image is not cached.
pub async fn image(
    mirror: &Mirror,
    target: &Target,
    reference: &Reference,
) -> Result<Option<ImageView>, MetaError> {
    if mirror.policy.check(target).is_err() {
        return Ok(None);
    }
    let meta = mirror.meta();
    let digest = match reference {
        Reference::Digest(d) => d.clone(),
        Reference::Tag(t) => match meta.tag(&target.key(), t.as_str()).await? {
            Some(rec) => match Digest::parse(&rec.digest) {
                Ok(d) => d,
                Err(_) => return Ok(None),
            },
            None => return Ok(None),
        },
    };
    // Only what this repository may serve.
    if !meta.is_linked(&target.key(), &digest).await? {
        return Ok(None);
    }
    let Some(manifest) = meta.manifest(&digest).await? else {
        return Ok(None);
    };
    let mut view = ImageView {
        digest: digest.to_string(),
        media_type: manifest.media_type.clone(),
        platforms: Vec::new(),
        layers: Vec::new(),
        config: None,
        referrers: referrers(meta.as_ref(), &target.key(), &digest).await?,
    };
    if let Some(entries) = index_entries(&manifest.bytes) {
        let digests: Vec<Digest> = entries.iter().map(|e| e.digest.clone()).collect();
        let cached = meta.has_manifests(&digests).await?;
        for (i, entry) in entries.iter().enumerate() {
            view.platforms.push(PlatformView {
                platform: entry
                    .platform
                    .as_ref()
                    .map_or_else(|| "unknown".to_owned(), ToString::to_string),
                digest: entry.digest.to_string(),
                cached: cached.get(i).copied().unwrap_or(false),
            });
        }
        return Ok(Some(view));
    }
    let refs = references(&manifest.bytes);
    let size_of = |d: &Digest| refs.sizes.iter().find(|(s, _)| s == d).map(|(_, n)| *n);
    let config_digest = serde_json::from_slice::<Value>(&manifest.bytes)
        .ok()
        .and_then(|v| v["config"]["digest"].as_str().map(str::to_owned))
        .and_then(|d| Digest::parse(&d).ok());
    for blob in &refs.image_blobs {
        if Some(blob) == config_digest.as_ref() {
            continue;
        }
        view.layers.push(LayerView {
            digest: blob.to_string(),
            size: size_of(blob),
            cached: mirror.stored_size(blob).await.is_some(),
        });
    }
    if let Some(config) = config_digest {
        let bytes = mirror.stored_bytes(&config, CONFIG_AT_MOST).await;
        let mut c = ConfigView {
            digest: config.to_string(),
            cached: bytes.is_some(),
            ..ConfigView::default()
        };
        if let Some(doc) = bytes.and_then(|b| serde_json::from_slice::<Value>(&b).ok()) {
            let text = |v: &Value| v.as_str().map(str::to_owned);
            c.created = text(&doc["created"]);
            c.os = text(&doc["os"]);
            c.architecture = text(&doc["architecture"]);
            let run = &doc["config"];
            c.entrypoint = run["Entrypoint"].clone();
            c.cmd = run["Cmd"].clone();
            c.exposed_ports = run["ExposedPorts"]
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            c.labels = run["Labels"].clone();
            c.history = doc["history"]
                .as_array()
                .map(|h| {
                    h.iter()
                        .filter_map(|e| e["created_by"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
        }
        view.config = Some(c);
    }
    Ok(Some(view))
}
