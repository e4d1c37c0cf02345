//! A scripted upstream for what a real registry will not do on demand: wrong
//! bytes under a digest, truncated bodies, 429s, slow bodies, redirects, and
//! a Bearer token flow. Every request is recorded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

#[derive(Clone)]
pub enum Blob {
    /// Serves these bytes.
    Good(Bytes),
    /// Announces the full length, sends only the first half, then hangs up.
    Truncated(Bytes),
    /// Answers 429 with Retry-After: 7.
    TooMany,
    /// Sends the first 1 KiB, waits, then the rest.
    Slow(Bytes, Duration),
    /// Redirects (307) to this absolute URL.
    Redirect(String),
    /// Answers 503 to the first n GETs, then serves the bytes.
    FailFirst(usize, Bytes),
    /// Serves these bytes without a length (chunked), 64 KiB at a time.
    Chunked(Bytes),
    /// Sends bytes without a length and never stops.
    Endless,
    /// Announces the bytes' length and sends 1 KiB of them every interval.
    Trickle(Bytes, Duration),
    /// Announces this length, sends 1 KiB of zeros, then nothing more for
    /// as long as the client waits.
    Stalled(usize),
}

#[derive(Clone, Debug)]
pub struct Hit {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub at: std::time::Instant,
    /// The `ratelimit-remaining` this request was answered with.
    pub ratelimit: Option<i64>,
}

#[derive(Default)]
struct Script {
    /// Demand `Bearer <token>` and serve tokens at /token.
    token: Option<String>,
    /// The token endpoint answers 503.
    token_down: bool,
    /// The realm the challenge announces, instead of this fake's /token.
    realm: Option<String>,
    manifests: HashMap<String, (String, Bytes)>,
    blobs: HashMap<String, Blob>,
    hits: Vec<Hit>,
    /// Requests left in the rate limit (one fewer per manifest GET), and
    /// its window in seconds: reported on every answer, as Docker Hub does.
    ratelimit: Option<(i64, u64)>,
}

pub struct Fake {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Fake {
    pub fn start() -> Fake {
        Fake::start_at("127.0.0.1")
    }

    /// Like `start`, listening on another loopback address (`127.0.0.77`).
    pub fn start_at(ip: &str) -> Fake {
        let script = Arc::new(Mutex::new(Script::default()));
        let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new().fallback(handle).with_state(script.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(l, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Fake {
            addr,
            script,
            _stop: tx,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn require_token(&self, token: &str) {
        self.script.lock().unwrap().token = Some(token.to_owned());
    }

    /// Announces `realm` (any URL) in the Bearer challenge instead of this
    /// fake's own token endpoint.
    pub fn token_realm(&self, realm: &str) {
        self.script.lock().unwrap().realm = Some(realm.to_owned());
    }

    pub fn token_down(&self, down: bool) {
        self.script.lock().unwrap().token_down = down;
    }

    pub fn manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) {
        self.script.lock().unwrap().manifests.insert(
            format!("{repo}:{reference}"),
            (media_type.to_owned(), Bytes::copy_from_slice(body)),
        );
    }

    pub fn blob(&self, digest: &str, blob: Blob) {
        self.script
            .lock()
            .unwrap()
            .blobs
            .insert(digest.to_owned(), blob);
    }

    /// Like `blob`, for one repository only: other repositories answer 404
    /// for it (unless `blob` serves it everywhere).
    pub fn blob_in(&self, repo: &str, digest: &str, blob: Blob) {
        self.script
            .lock()
            .unwrap()
            .blobs
            .insert(format!("{repo}@{digest}"), blob);
    }

    /// Reports `ratelimit-remaining: <left>;w=<window>` on every answer,
    /// one fewer after each manifest GET.
    pub fn ratelimit(&self, left: i64, window_secs: u64) {
        self.script.lock().unwrap().ratelimit = Some((left, window_secs));
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.script.lock().unwrap().hits.clone()
    }

    /// Requests whose method is `method` and path starts with `prefix`.
    pub fn count(&self, method: &str, prefix: &str) -> usize {
        self.hits()
            .iter()
            .filter(|h| h.method == method && h.path.starts_with(prefix))
            .count()
    }
}

/// Headers a real upstream sends that are its business, not the client's:
/// Pier must never pass them on.
pub const PRIVATE_HEADERS: [(&str, &str); 3] = [
    ("docker-ratelimit-source", "203.0.113.77"),
    ("set-cookie", "upstream-session=secret"),
    ("x-upstream-internal", "node-17"),
];

async fn handle(state: State<Arc<Mutex<Script>>>, req: Request) -> Response {
    let script = state.0.clone();
    let mut resp = respond(state, req).await;
    let ratelimit = script.lock().unwrap().hits.last().and_then(|h| h.ratelimit);
    if let Some(left) = ratelimit {
        let window = script.lock().unwrap().ratelimit.map_or(0, |r| r.1);
        resp.headers_mut().insert(
            "ratelimit-remaining",
            HeaderValue::from_str(&format!("{left};w={window}")).unwrap(),
        );
    }
    for (k, v) in PRIVATE_HEADERS {
        resp.headers_mut().insert(k, HeaderValue::from_static(v));
    }
    resp
}

async fn respond(State(script): State<Arc<Mutex<Script>>>, req: Request) -> Response {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let (token, token_down, realm, manifests, blobs) = {
        let mut s = script.lock().unwrap();
        if let Some((left, _)) = &mut s.ratelimit
            && method == "GET"
            && path.contains("/manifests/")
        {
            *left -= 1;
        }
        let ratelimit = s.ratelimit.map(|r| r.0);
        s.hits.push(Hit {
            at: std::time::Instant::now(),
            ratelimit,
            method: method.clone(),
            path: if query.is_empty() {
                path.clone()
            } else {
                format!("{path}?{query}")
            },
            authorization: authorization.clone(),
        });
        (
            s.token.clone(),
            s.token_down,
            s.realm.clone(),
            s.manifests.clone(),
            s.blobs.clone(),
        )
    };
    if path == "/token" && token_down {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if path == "/token" {
        let ok = query.contains("scope=repository%3A") || query.contains("scope=repository:");
        return if ok {
            let t = token.unwrap_or_default();
            (
                [(header::CONTENT_TYPE, "application/json")],
                format!(r#"{{"access_token":"{t}","expires_in":300}}"#),
            )
                .into_response()
        } else {
            StatusCode::BAD_REQUEST.into_response()
        };
    }
    if path.starts_with("/cdn/") {
        let digest = path.trim_start_matches("/cdn/");
        return match blobs.get(digest) {
            Some(Blob::Good(b)) => b.clone().into_response(),
            _ => StatusCode::NOT_FOUND.into_response(),
        };
    }
    if let Some(t) = &token {
        let want = format!("Bearer {t}");
        if authorization.as_deref() != Some(want.as_str()) {
            let realm = realm.unwrap_or_else(|| format!("http://{host}/token"));
            let challenge = format!("Bearer realm=\"{realm}\",service=\"fake\"");
            let mut r = (
                StatusCode::UNAUTHORIZED,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}"#,
            )
                .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_str(&challenge).unwrap(),
            );
            return r;
        }
    }
    if path == "/v2/" {
        return "{}".into_response();
    }
    let rest = path.trim_start_matches("/v2/");
    if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
        return match manifests.get(&format!("{repo}:{reference}")) {
            Some((mt, body)) => {
                let digest = format!("sha256:{}", sha256_hex(body));
                let mut r = Response::new(if method == "HEAD" {
                    Body::empty()
                } else {
                    Body::from(body.clone())
                });
                let h = r.headers_mut();
                h.insert(header::CONTENT_TYPE, HeaderValue::from_str(mt).unwrap());
                h.insert(header::CONTENT_LENGTH, body.len().into());
                h.insert(
                    "docker-content-digest",
                    HeaderValue::from_str(&digest).unwrap(),
                );
                r
            }
            None => StatusCode::NOT_FOUND.into_response(),
        };
    }
    if let Some((repo, digest)) = rest.rsplit_once("/blobs/") {
        let scoped = blobs.get(&format!("{repo}@{digest}"));
        let Some(mut blob) = scoped.or_else(|| blobs.get(digest)).cloned() else {
            return StatusCode::NOT_FOUND.into_response();
        };
        if let Blob::FailFirst(n, bytes) = blob {
            let earlier = script
                .lock()
                .unwrap()
                .hits
                .iter()
                .filter(|h| h.method == "GET" && h.path == path)
                .count();
            if earlier <= n {
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            blob = Blob::Good(bytes);
        }
        return match blob {
            Blob::Good(b) => {
                if method == "HEAD" {
                    let mut r = Response::new(Body::empty());
                    r.headers_mut()
                        .insert(header::CONTENT_LENGTH, b.len().into());
                    r
                } else {
                    b.into_response()
                }
            }
            Blob::TooMany => {
                let mut r = StatusCode::TOO_MANY_REQUESTS.into_response();
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
                r
            }
            Blob::Redirect(to) => {
                let mut r = StatusCode::TEMPORARY_REDIRECT.into_response();
                r.headers_mut()
                    .insert(header::LOCATION, HeaderValue::from_str(&to).unwrap());
                r
            }
            Blob::Truncated(b) => {
                let half = b.slice(..b.len() / 2);
                // Headers and half the body go out; then the connection dies.
                let stream = futures::stream::unfold(0u8, move |step| {
                    let half = half.clone();
                    async move {
                        match step {
                            0 => Some((Ok::<_, std::io::Error>(half), 1)),
                            1 => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                Some((Err(std::io::Error::other("hang up")), 2))
                            }
                            _ => None,
                        }
                    }
                });
                let mut r = Response::new(Body::from_stream(stream));
                r.headers_mut()
                    .insert(header::CONTENT_LENGTH, b.len().into());
                r
            }
            Blob::FailFirst(..) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            Blob::Chunked(b) => {
                let chunks: Vec<Result<Bytes, std::io::Error>> = b
                    .chunks(64 * 1024)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                Response::new(Body::from_stream(futures::stream::iter(chunks)))
            }
            Blob::Endless => {
                let chunk = Bytes::from(vec![0x5a; 64 * 1024]);
                let stream =
                    futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
                Response::new(Body::from_stream(stream))
            }
            Blob::Trickle(b, every) => {
                let len = b.len();
                let stream = futures::stream::unfold(0usize, move |at| {
                    let b = b.clone();
                    async move {
                        if at >= b.len() {
                            return None;
                        }
                        if at > 0 {
                            tokio::time::sleep(every).await;
                        }
                        let end = (at + 1024).min(b.len());
                        Some((Ok::<_, std::io::Error>(b.slice(at..end)), end))
                    }
                });
                let mut r = Response::new(Body::from_stream(stream));
                r.headers_mut().insert(header::CONTENT_LENGTH, len.into());
                r
            }
            Blob::Stalled(len) => {
                use futures::StreamExt as _;
                let first = Bytes::from(vec![0u8; 1024.min(len)]);
                let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(first) })
                    .chain(futures::stream::pending());
                let mut r = Response::new(Body::from_stream(stream));
                r.headers_mut().insert(header::CONTENT_LENGTH, len.into());
                r
            }
            Blob::Slow(b, pause) => {
                let head = b.slice(..1024.min(b.len()));
                let tail = b.slice(1024.min(b.len())..);
                let stream = futures::stream::unfold(0u8, move |step| {
                    let (head, tail) = (head.clone(), tail.clone());
                    async move {
                        match step {
                            0 => Some((Ok::<_, std::io::Error>(head), 1)),
                            1 => {
                                tokio::time::sleep(pause).await;
                                Some((Ok(tail), 2))
                            }
                            _ => None,
                        }
                    }
                });
                let mut r = Response::new(Body::from_stream(stream));
                r.headers_mut()
                    .insert(header::CONTENT_LENGTH, b.len().into());
                r
            }
        };
    }
    StatusCode::NOT_FOUND.into_response()
}

/// `sha256:<hex>` of `b`.
pub fn digest(b: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(b))
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(b))
}

/// `n` reproducible pseudo-random bytes (xorshift), different per `seed`.
pub fn random_bytes(n: usize, seed: u8) -> Bytes {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}
