//! `/v2/...` paths: repository names contain slashes, so one wildcard route
//! captures the rest and this parser splits `<name>/<kind>/<reference>`.

use super::error::ApiError;

#[derive(Debug, PartialEq, Eq)]
pub enum V2Path<'a> {
    Base,
    Catalog,
    Manifest {
        name: &'a str,
        reference: &'a str,
    },
    Blob {
        name: &'a str,
        digest: &'a str,
    },
    Tags {
        name: &'a str,
    },
    Referrers {
        name: &'a str,
        digest: &'a str,
    },
    /// Push endpoints: `blobs/uploads/` starts an upload, and
    /// `blobs/uploads/<id>` is one (only private repositories take them).
    Upload {
        name: &'a str,
        id: Option<&'a str>,
    },
}

/// Parses the raw (still percent-encoded) path after `/v2`.
pub fn parse(raw: &str) -> Result<V2Path<'_>, ApiError> {
    // Nothing legitimate in a name, tag or digest is percent-encoded, and
    // decoding would let `%2e%2e` or `%2f` smuggle in path structure.
    if raw.contains('%') {
        return Err(ApiError::name_invalid(
            "percent-encoded characters are not allowed in names",
        ));
    }
    let rest = raw.strip_prefix('/').unwrap_or(raw);
    if rest.is_empty() {
        return Ok(V2Path::Base);
    }
    if rest == "_catalog" {
        return Ok(V2Path::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok(V2Path::Tags { name });
    }
    if let Some((name, id)) = rest.rsplit_once("/blobs/uploads/") {
        if id.contains('/') {
            return Err(not_found());
        }
        let id = Some(id).filter(|i| !i.is_empty());
        return Ok(V2Path::Upload { name, id });
    }
    if let Some(name) = rest.strip_suffix("/blobs/uploads") {
        return Ok(V2Path::Upload { name, id: None });
    }
    let (head, reference) = rest.rsplit_once('/').ok_or_else(not_found)?;
    let (name, kind) = head.rsplit_once('/').ok_or_else(not_found)?;
    match kind {
        "manifests" => Ok(V2Path::Manifest { name, reference }),
        "blobs" => Ok(V2Path::Blob {
            name,
            digest: reference,
        }),
        "referrers" => Ok(V2Path::Referrers {
            name,
            digest: reference,
        }),
        _ => Err(not_found()),
    }
}

fn not_found() -> ApiError {
    ApiError::not_found_route()
}

/// `<registry>/<repository>:<tag>` or `@<digest>` (no reference: `latest`),
/// as the console's image URLs name an image. `None` when it has no
/// registry part; an error when a part is not a valid name.
pub fn image_name(
    name: &str,
) -> Result<Option<(crate::route::Target, crate::reference::Reference)>, ApiError> {
    let (repo, reference) = match name.split_once('@') {
        Some((repo, digest)) => (repo, digest),
        None => match name.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, tag),
            _ => (name, "latest"),
        },
    };
    let Some((registry, repository)) = repo.split_once('/') else {
        return Ok(None);
    };
    let (Ok(repository), Ok(reference)) = (
        crate::reference::RepoName::parse(repository),
        crate::reference::Reference::parse(reference),
    ) else {
        return Err(ApiError::name_invalid(
            "give <registry>/<repository>:<tag> or @<digest>",
        ));
    };
    Ok(Some((
        crate::route::Target {
            registry: registry.to_owned(),
            repository,
        },
        reference,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(parse("/"), Ok(V2Path::Base));
        assert_eq!(parse(""), Ok(V2Path::Base));
        assert_eq!(parse("/_catalog"), Ok(V2Path::Catalog));
        assert_eq!(
            parse("/docker.io/library/nginx/manifests/latest"),
            Ok(V2Path::Manifest {
                name: "docker.io/library/nginx",
                reference: "latest"
            })
        );
        assert_eq!(
            parse("/a/blobs/b/blobs/sha256:x"),
            Ok(V2Path::Blob {
                name: "a/blobs/b",
                digest: "sha256:x"
            })
        );
        assert_eq!(parse("/a/b/tags/list"), Ok(V2Path::Tags { name: "a/b" }));
        assert_eq!(
            parse("/a/referrers/sha256:x"),
            Ok(V2Path::Referrers {
                name: "a",
                digest: "sha256:x"
            })
        );
        assert_eq!(
            parse("/a/b/blobs/uploads/"),
            Ok(V2Path::Upload {
                name: "a/b",
                id: None
            })
        );
        assert_eq!(
            parse("/a/blobs/uploads/123"),
            Ok(V2Path::Upload {
                name: "a",
                id: Some("123")
            })
        );
        assert!(parse("/a/blobs/uploads/1/2").is_err());
        assert!(parse("/a/%2e%2e/manifests/x").is_err());
        assert!(parse("/a").is_err());
        assert!(parse("/a/other/x").is_err());
    }
}
