//! What a manifest points at: the digests of its config, layers and (for
//! an index) child manifests, read from its JSON. Pure.

use crate::reference::Digest;

/// What a manifest points at, from one parse of it.
pub struct References {
    /// What upstream proved is in the repository by accepting the
    /// manifest: its config and layers, (schema 1) layer sums, and an
    /// index's child manifests; sorted. A `subject` or an artifact's
    /// `blobs` may name anything, in any repository, so they are not here:
    /// such a digest is served under the repository only once upstream
    /// confirms it there.
    pub linked: Vec<Digest>,
    /// The blobs an image manifest is made of, config first, then the
    /// layers as it lists them (the order most clients fetch them in).
    /// Empty for an index.
    pub image_blobs: Vec<Digest>,
    /// The sizes the image blobs' descriptors give.
    pub sizes: Vec<(Digest, u64)>,
}

pub fn references(body: &[u8]) -> References {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        return References {
            linked: Vec::new(),
            image_blobs: Vec::new(),
            sizes: Vec::new(),
        };
    };
    let digest = |v: &serde_json::Value, field: &str| {
        v.get(field)
            .and_then(|d| d.as_str())
            .and_then(|d| Digest::parse(d).ok())
    };
    let listed = |list: &str| {
        doc.get(list)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
    };
    let descriptors = doc.get("config").into_iter().chain(listed("layers"));
    let mut image_blobs: Vec<Digest> = Vec::new();
    let mut sizes = Vec::new();
    for (d, size) in descriptors
        .filter_map(|v| Some((digest(v, "digest")?, v.get("size").and_then(|s| s.as_u64()))))
        .chain(listed("fsLayers").filter_map(|v| Some((digest(v, "blobSum")?, None))))
    {
        if let Some(size) = size {
            sizes.push((d.clone(), size));
        }
        if !image_blobs.contains(&d) {
            image_blobs.push(d);
        }
    }
    let mut linked: Vec<Digest> = image_blobs
        .iter()
        .cloned()
        .chain(listed("manifests").filter_map(|v| digest(v, "digest")))
        .collect();
    linked.sort();
    linked.dedup();
    References {
        linked,
        image_blobs,
        sizes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_of_a_manifest_and_an_index() {
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{a}"}},"layers":[{{"digest":"{b}"}},{{"digest":"bogus"}}]}}"#
        );
        let mut want = vec![a.clone(), b.clone()];
        want.sort();
        assert_eq!(references(m.as_bytes()).linked, want);
        let i = format!(r#"{{"manifests":[{{"digest":"{a}"}}]}}"#);
        assert_eq!(references(i.as_bytes()).linked, vec![a]);
        assert!(references(b"not json").linked.is_empty());
    }

    #[test]
    fn a_subject_or_an_artifacts_blobs_are_not_linked() {
        let [config, layer, subject, blob] = [b"c", b"l", b"s", b"b"].map(|x| Digest::sha256_of(x));
        let m = format!(
            r#"{{"config":{{"digest":"{config}","size":7}},"layers":[{{"digest":"{layer}","size":1234}}],"subject":{{"digest":"{subject}"}},"blobs":[{{"digest":"{blob}","size":9}}]}}"#
        );
        let refs = references(m.as_bytes());
        let mut want = vec![config.clone(), layer.clone()];
        want.sort();
        assert_eq!(refs.linked, want);
        assert_eq!(refs.sizes, vec![(config, 7), (layer, 1234)]);
    }

    #[test]
    fn an_images_blobs_in_the_order_clients_fetch_them() {
        let [a, b, c] = [b"a", b"b", b"c"].map(|x| Digest::sha256_of(x));
        let m = format!(
            r#"{{"config":{{"digest":"{c}"}},"layers":[{{"digest":"{b}"}},{{"digest":"bogus"}},{{"digest":"{a}"}},{{"digest":"{b}"}}]}}"#
        );
        assert_eq!(
            references(m.as_bytes()).image_blobs,
            vec![c, b.clone(), a.clone()]
        );
        let v1 = format!(r#"{{"fsLayers":[{{"blobSum":"{a}"}},{{"blobSum":"{b}"}}]}}"#);
        assert_eq!(references(v1.as_bytes()).image_blobs, vec![a.clone(), b]);
        let i = format!(r#"{{"manifests":[{{"digest":"{a}"}}]}}"#);
        assert!(references(i.as_bytes()).image_blobs.is_empty());
        assert!(references(b"not json").image_blobs.is_empty());
    }
}
