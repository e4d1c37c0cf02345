//! One cached image as the console shows it: an index's platforms, or an
//! image's layers (each cached or not) and its config (created, OS and
//! architecture, entrypoint and command, ports, labels, history). Reads the
//! metadata store and the blob store only.

use serde::Serialize;
use serde_json::Value;

use crate::descriptors::references;
use crate::meta::MetaError;
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
