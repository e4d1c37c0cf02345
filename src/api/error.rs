//! The one place where errors become OCI error bodies
//! (`{"errors":[{"code","message","detail"}]}`) with the matching status.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::json;

use crate::mirror::MirrorError;
use crate::private::PrivateError;
use crate::reference::ReferenceError;
use crate::route::RouteError;
use crate::storage::StorageError;
use crate::upstream::UpstreamError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadUnknown,
    BlobUploadInvalid,
    ManifestInvalid,
    ManifestBlobUnknown,
    SizeInvalid,
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    Unsupported,
    Denied,
    TooManyRequests,
    RangeInvalid,
    PaginationInvalid,
    Unavailable,
    Unauthorized,
    /// A request body the admin API cannot take.
    BadRequest,
    /// An admin API resource (a sync job) that does not exist.
    NotFound,
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::PaginationInvalid => "PAGINATION_NUMBER_INVALID",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    headers: Vec<(header::HeaderName, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub(crate) fn with_header(mut self, name: header::HeaderName, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    /// A per-client limit refused the request.
    pub fn client_limited(r: &crate::limits::Refused) -> Self {
        let secs = r.retry_after.as_secs() + u64::from(r.retry_after.subsec_nanos() > 0);
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooManyRequests,
            format!("per-client limit reached ({}); retry in {secs} s", r.limit),
        )
        .with_header(header::RETRY_AFTER, secs.max(1).to_string())
    }

    pub fn name_invalid(why: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::NameInvalid, why)
    }

    /// The console's and admin API's answer for an image or repository
    /// the cache does not hold; `then` says what to do about it.
    pub fn not_cached(code: ErrorCode, name: &str, then: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            code,
            format!(
                "{:?} is not cached here: {then}",
                name.chars().take(256).collect::<String>()
            ),
        )
    }

    pub fn not_found_route() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NameUnknown,
            "not a registry API path: expected /v2/<name>/manifests|blobs|tags|referrers/...",
        )
    }

    pub fn unsupported() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unsupported,
            "this registry is a read-only pull-through mirror: only GET and HEAD are supported",
        )
        .with_header(header::ALLOW, "GET, HEAD".into())
    }

    pub fn range_not_satisfiable(size: u64) -> Self {
        Self::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::RangeInvalid,
            format!("the requested range is outside the blob's {size} bytes"),
        )
        .with_header(header::CONTENT_RANGE, format!("bytes */{size}"))
    }

    pub fn malformed_range() -> Self {
        Self::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::RangeInvalid,
            "the Range header must be one range such as bytes=0-1023, bytes=1024- or bytes=-512",
        )
    }
}

/// Why a request was refused, for the console's list of failures.
#[derive(Clone, Debug)]
pub struct Refusal(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The request's log line says why, not only the status.
        crate::telemetry::access::note_error(&self.message);
        let body = json!({
            "errors": [{ "code": self.code.as_str(), "message": self.message, "detail": null }]
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        resp.extensions_mut().insert(Refusal(self.message));
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                resp.headers_mut().insert(name, v);
            }
        }
        resp
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        let status = match e {
            RouteError::Name(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::NOT_FOUND,
        };
        let code = match e {
            RouteError::Name(_) => ErrorCode::NameInvalid,
            _ => ErrorCode::NameUnknown,
        };
        Self::new(status, code, e.to_string())
    }
}

impl From<ReferenceError> for ApiError {
    fn from(e: ReferenceError) -> Self {
        let (status, code) = match e {
            ReferenceError::Digest(..) => (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid),
            // No manifest can have such a tag, so "unknown" is the accurate
            // answer, and the one distribution and the OCI conformance
            // suite give.
            ReferenceError::Tag(_) => (StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown),
            ReferenceError::Name(..) => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
        };
        Self::new(status, code, e.to_string())
    }
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> Self {
        let msg = e.to_string();
        match e {
            UpstreamError::NotFound { .. } => {
                Self::new(StatusCode::NOT_FOUND, ErrorCode::NameUnknown, msg)
            }
            UpstreamError::TooManyRequests { retry_after, .. } => {
                let err = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    ErrorCode::TooManyRequests,
                    msg,
                );
                match retry_after {
                    Some(r) => err.with_header(header::RETRY_AFTER, r),
                    None => err,
                }
            }
            UpstreamError::Unavailable { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                format!("{msg}; nothing usable is cached"),
            ),
            UpstreamError::Invalid { .. } => {
                Self::new(StatusCode::BAD_GATEWAY, ErrorCode::Unavailable, msg)
            }
        }
    }
}

impl From<PrivateError> for ApiError {
    fn from(e: PrivateError) -> Self {
        let msg = e.to_string();
        let (status, code) = match &e {
            PrivateError::NameInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
            PrivateError::ManifestUnknown(_) => (StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown),
            PrivateError::BlobUnknown(_) => (StatusCode::NOT_FOUND, ErrorCode::BlobUnknown),
            PrivateError::UploadUnknown(_) => (StatusCode::NOT_FOUND, ErrorCode::BlobUploadUnknown),
            PrivateError::UploadInvalid(_) | PrivateError::BodyBroken(_) => {
                (StatusCode::BAD_REQUEST, ErrorCode::BlobUploadInvalid)
            }
            PrivateError::DigestInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid),
            PrivateError::SizeInvalid(_) => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::SizeInvalid),
            PrivateError::ManifestInvalid(_) => {
                (StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid)
            }
            PrivateError::ManifestBlobUnknown(_) => {
                (StatusCode::BAD_REQUEST, ErrorCode::ManifestBlobUnknown)
            }
            PrivateError::RangeInvalid { offset } => {
                let range = format!("0-{}", offset.saturating_sub(1));
                return Self::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    ErrorCode::BlobUploadInvalid,
                    msg,
                )
                .with_header(header::RANGE, range);
            }
            PrivateError::Storage(StorageError::Unsatisfiable { size }) => {
                return Self::range_not_satisfiable(*size);
            }
            PrivateError::Storage(StorageError::MalformedRange) => return Self::malformed_range(),
            PrivateError::Storage(_) | PrivateError::Spool(_) => {
                tracing::error!(error = %e, "blob storage error");
                return Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unavailable,
                    "the registry's blob storage is unavailable; its log has the details",
                );
            }
            PrivateError::Meta(_) => {
                tracing::error!(error = %e, "metadata error");
                return Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unavailable,
                    "the registry's metadata store is unavailable; its log has the details",
                );
            }
        };
        Self::new(status, code, msg)
    }
}

impl From<MirrorError> for ApiError {
    fn from(e: MirrorError) -> Self {
        match e {
            MirrorError::Upstream(u) => u.into(),
            MirrorError::Storage(StorageError::Unsatisfiable { size }) => {
                Self::range_not_satisfiable(size)
            }
            MirrorError::Storage(StorageError::MalformedRange) => Self::malformed_range(),
            MirrorError::ManifestUnknown(m) => {
                Self::new(StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown, m)
            }
            MirrorError::BlobUnknown(m) => {
                Self::new(StatusCode::NOT_FOUND, ErrorCode::BlobUnknown, m)
            }
            MirrorError::NameUnknown(m) => {
                Self::new(StatusCode::NOT_FOUND, ErrorCode::NameUnknown, m)
            }
            e @ MirrorError::DigestMismatch { .. } => {
                tracing::warn!(error = %e, "refused upstream content");
                Self::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::Unavailable,
                    e.to_string(),
                )
            }
            MirrorError::Fetch(m) => Self::new(StatusCode::BAD_GATEWAY, ErrorCode::Unavailable, m),
            MirrorError::Busy(m) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, m)
                    .with_header(header::RETRY_AFTER, "10".into())
            }
            e @ MirrorError::Storage(_) => {
                // Internal detail stays in the log.
                tracing::error!(error = %e, "blob storage error");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unavailable,
                    "the mirror's blob storage is unavailable; its log has the details",
                )
            }
            e @ MirrorError::Meta(_) => {
                tracing::error!(error = %e, "metadata error");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unavailable,
                    "the mirror's metadata store is unavailable; its log has the details",
                )
            }
        }
    }
}
