//! Checking a pushed manifest before it is stored: a type Pier serves, a
//! body that agrees with it, and what it points at. Pure.

use serde::Deserialize;

use crate::reference::Digest;

/// Largest manifest a push may store (the OCI spec's suggested bound).
pub const MAX_MANIFEST: usize = 4 * 1024 * 1024;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What a valid manifest points at.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Points {
    /// Config, layers and an artifact's blobs: must be in the repository.
    pub blobs: Vec<Digest>,
    /// An index's manifests: must be in the repository.
    pub manifests: Vec<Digest>,
    /// OCI 1.1 `subject`: may name a manifest not pushed yet.
    pub subject: Option<Digest>,
    /// The artifact type (or the config's media type), for referrers.
    pub artifact_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Doc {
    schema_version: Option<u32>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    blobs: Vec<Descriptor>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: Option<String>,
    digest: String,
    size: Option<i64>,
    #[serde(default)]
    urls: Vec<String>,
}

/// Checks `body`, sent as `content_type`; what it points at, or why not.
pub fn check(content_type: &str, body: &[u8]) -> Result<Points, String> {
    let content_type = content_type.split(';').next().unwrap_or("").trim();
    let index = match content_type {
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        OCI_INDEX | DOCKER_LIST => true,
        "" => return Err("a manifest needs a Content-Type".into()),
        other => {
            return Err(format!(
                "{other:?} is not a manifest type this registry stores (OCI or Docker schema 2)"
            ));
        }
    };
    if body.len() > MAX_MANIFEST {
        return Err(format!(
            "the manifest is {} bytes; at most {MAX_MANIFEST} are stored",
            body.len()
        ));
    }
    let doc: Doc =
        serde_json::from_slice(body).map_err(|e| format!("the manifest is not valid: {e}"))?;
    if doc.schema_version != Some(2) {
        return Err("schemaVersion must be 2".into());
    }
    if let Some(m) = &doc.media_type
        && m != content_type
    {
        return Err(format!(
            "the manifest says mediaType {m:?} but was sent as {content_type:?}"
        ));
    }
    let digest = |d: &Descriptor| -> Result<Digest, String> {
        if d.size.is_none_or(|s| s < 0) {
            return Err(format!("the descriptor of {:?} needs a size", d.digest));
        }
        Digest::parse(&d.digest).map_err(|e| format!("{:?}: {e}", d.digest))
    };
    let mut points = Points {
        subject: doc.subject.as_ref().map(digest).transpose()?,
        artifact_type: doc.artifact_type.clone(),
        ..Points::default()
    };
    if index {
        let Some(manifests) = &doc.manifests else {
            return Err("an index needs a manifests list".into());
        };
        for m in manifests {
            points.manifests.push(digest(m)?);
        }
    } else {
        let Some(config) = &doc.config else {
            return Err("an image manifest needs a config".into());
        };
        points.blobs.push(digest(config)?);
        if points.artifact_type.is_none() {
            points.artifact_type = config.media_type.clone();
        }
        for layer in doc.layers.iter().chain(&doc.blobs) {
            // A foreign layer is fetched from its own URLs, never pushed.
            if !layer.urls.is_empty() {
                digest(layer)?;
                continue;
            }
            points.blobs.push(digest(layer)?);
        }
    }
    points.blobs.dedup();
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> String {
        Digest::sha256_of(s.as_bytes()).to_string()
    }

    #[test]
    fn images_and_indexes() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{{"digest":"{}","size":3}}]}}"#,
            d("c"),
            d("l")
        );
        let p = check(OCI_MANIFEST, m.as_bytes()).unwrap();
        assert_eq!(p.blobs.len(), 2);
        assert!(
            check(OCI_INDEX, m.as_bytes())
                .unwrap_err()
                .contains("mediaType")
        );
        assert!(check("text/plain", m.as_bytes()).is_err());
        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"digest":"{}","size":9}}],"subject":{{"digest":"{}","size":1}}}}"#,
            d("m"),
            d("s")
        );
        let p = check(OCI_INDEX, i.as_bytes()).unwrap();
        assert_eq!(p.manifests.len(), 1);
        assert!(p.subject.is_some());
        assert!(check(OCI_MANIFEST, b"{").is_err());
        assert!(
            check(
                OCI_MANIFEST,
                br#"{"schemaVersion":2,"config":{"digest":"sha256:bad","size":1}}"#
            )
            .is_err()
        );
        assert!(check(OCI_MANIFEST, br#"{"schemaVersion":1}"#).is_err());
    }
}
