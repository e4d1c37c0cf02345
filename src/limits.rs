//! Per-client limits, keyed by the client's IP: a request rate with a burst
//! (shared by all replicas through the metadata store), blob downloads at
//! once, and response bytes per second (both per replica).
//!
//! The client's IP is the TCP peer, unless the peer is a trusted proxy:
//! then it is the nearest untrusted address in `X-Forwarded-For` (or
//! `Forwarded`), read from the right, since everything left of that could
//! have been written by the client itself.

use std::collections::HashMap;
use std::future::Future as _;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use ipnet::IpNet;

use crate::config::{LimitsConfig, ServerConfig};
use crate::meta::MetaStore;
use crate::rate::{LocalRates, Rate};
use crate::telemetry::metrics::metrics;

/// Entries in the per-client table before idle ones are swept.
const SWEEP_AT: usize = 65_536;

/// The TCP peer of a request's connection (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

pub struct ClientLimits {
    trusted: Vec<IpNet>,
    exempt: Vec<IpNet>,
    rate: Option<Rate>,
    /// Shared rates; `local` stands in while it cannot answer.
    meta: Arc<dyn MetaStore>,
    local: LocalRates,
    concurrent_blobs: u32,
    bytes_per_second: u64,
    /// Per client: blob downloads running and the byte budget.
    clients: Mutex<HashMap<IpAddr, ClientState>>,
    /// Failed logins a client may make per minute (shared like `rate`).
    failed_logins: Option<Rate>,
    /// Clients refused for failing to log in, until when (this replica's
    /// memory of the shared count's verdict).
    locked_out: Mutex<HashMap<IpAddr, Instant>>,
    /// One password check at a time per client: guesses sent in parallel
    /// wait for the verdict on the one before, lockout included.
    logging_in: Mutex<HashMap<IpAddr, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Default)]
struct ClientState {
    downloads: u32,
    /// When the client's byte budget is next clear (bytes-per-second).
    clear_at: Option<Instant>,
}

/// Why a request was refused, and when to come back.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub limit: &'static str,
    pub retry_after: Duration,
}

impl ClientLimits {
    pub fn new(server: &ServerConfig, limits: &LimitsConfig, meta: Arc<dyn MetaStore>) -> Self {
        Self {
            trusted: server.trusted_proxies.clone(),
            exempt: limits.exempt.clone(),
            rate: (limits.requests_per_second > 0)
                .then(|| Rate::new(limits.requests_per_second, limits.burst)),
            meta,
            local: LocalRates::default(),
            concurrent_blobs: limits.concurrent_blobs,
            bytes_per_second: limits.bytes_per_second,
            clients: Mutex::new(HashMap::new()),
            failed_logins: (limits.failed_logins > 0).then(|| {
                let interval_us = 60_000_000 / u64::from(limits.failed_logins);
                Rate {
                    interval_us,
                    tolerance_us: interval_us * u64::from(limits.failed_logins - 1),
                }
            }),
            locked_out: Mutex::new(HashMap::new()),
            logging_in: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for `ip`'s turn to have a password checked; the turn lasts
    /// while the guard lives.
    pub async fn login_turn(&self, ip: IpAddr) -> tokio::sync::OwnedMutexGuard<()> {
        let turn = {
            let mut waiting = self
                .logging_in
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Turns nobody holds or waits for are dropped as others come.
            waiting.retain(|_, t| Arc::strong_count(t) > 1);
            waiting.entry(ip).or_default().clone()
        };
        turn.lock_owned().await
    }

    /// Refuses a client that failed to log in too often lately, before its
    /// credentials are looked at (so a right guess then gains nothing).
    pub fn may_log_in(&self, ip: IpAddr) -> Result<(), Refused> {
        let locked = self
            .locked_out
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match locked.get(&ip) {
            Some(until) if *until > Instant::now() => {
                Err(refuse("failed_logins", *until - Instant::now()))
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed login by `ip` against its allowance; past it, the
    /// client is refused for a while.
    pub async fn failed_login(&self, ip: IpAddr) -> Result<(), Refused> {
        crate::telemetry::metrics::metrics().failed_logins.inc();
        let Some(rate) = self.failed_logins else {
            return Ok(());
        };
        if self.exempt(ip) {
            return Ok(());
        }
        let key = format!("login:{ip}");
        let decision = match self.meta.throttle(&key, rate).await {
            Ok(d) => d,
            Err(_) => self.local.check(&key, rate),
        };
        decision.map_err(|wait| {
            let mut locked = self
                .locked_out
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            locked.retain(|_, until| *until > now);
            locked.insert(ip, now + wait);
            refuse("failed_logins", wait)
        })
    }

    /// Who sent a request that arrived from `peer` with `headers`.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        client_ip(peer.ip(), headers, &self.trusted)
    }

    fn exempt(&self, ip: IpAddr) -> bool {
        self.exempt.iter().any(|n| n.contains(&ip))
    }

    /// Counts one request against `ip`'s rate.
    pub async fn admit(&self, ip: IpAddr) -> Result<(), Refused> {
        let Some(rate) = self.rate else { return Ok(()) };
        if self.exempt(ip) {
            return Ok(());
        }
        let key = ip.to_string();
        let decision = match self.meta.throttle(&key, rate).await {
            Ok(d) => d,
            Err(e) => {
                metrics().backend_error("metadata");
                tracing::debug!(error = %e, "rate limits fall back to this replica's count");
                self.local.check(&key, rate)
            }
        };
        decision.map_err(|wait| refuse("requests", wait))
    }

    /// Takes one of `ip`'s blob download slots; it is given back when the
    /// returned slot drops (with the response body). `None` when no
    /// download limit applies to `ip`: the body then goes out untouched.
    pub fn start_download(self: &Arc<Self>, ip: IpAddr) -> Result<Option<Download>, Refused> {
        let counted = self.concurrent_blobs > 0;
        let paced = self.bytes_per_second > 0;
        if !(counted || paced) || self.exempt(ip) {
            return Ok(None);
        }
        if counted {
            let mut clients = self.lock();
            let state = clients.entry(ip).or_default();
            if state.downloads >= self.concurrent_blobs {
                // A slot frees when a download ends, which nobody can
                // predict; a second is a polite pace for retrying.
                return Err(refuse("concurrent_blobs", Duration::from_secs(1)));
            }
            state.downloads += 1;
        }
        Ok(Some(Download {
            limits: self.clone(),
            ip,
            counted,
            paced,
        }))
    }

    /// The per-client table; past `SWEEP_AT` entries, clients with nothing
    /// running and no byte debt left are forgotten (a public mirror sees
    /// many addresses once).
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, ClientState>> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if clients.len() >= SWEEP_AT {
            let now = Instant::now();
            clients.retain(|_, s| s.downloads > 0 || s.clear_at.is_some_and(|t| t > now));
        }
        clients
    }

    /// Books `n` bytes to `ip` and says how long to hold them back so the
    /// client's downloads together stay under its byte rate.
    fn pace(&self, ip: IpAddr, n: usize) -> Duration {
        let now = Instant::now();
        let cost = Duration::from_secs_f64(n as f64 / self.bytes_per_second as f64);
        let mut clients = self.lock();
        let state = clients.entry(ip).or_default();
        let start = state.clear_at.filter(|t| *t > now).unwrap_or(now);
        state.clear_at = Some(start + cost);
        start - now
    }

    fn finish(&self, ip: IpAddr, counted: bool) {
        let mut clients = self.lock();
        if let Some(state) = clients.get_mut(&ip) {
            if counted {
                state.downloads = state.downloads.saturating_sub(1);
            }
            if state.downloads == 0 && state.clear_at.is_none_or(|t| t <= Instant::now()) {
                clients.remove(&ip);
            }
        }
    }
}

fn refuse(limit: &'static str, wait: Duration) -> Refused {
    metrics()
        .client_limited
        .get_or_create(&crate::telemetry::metrics::LimitLabels { limit })
        .inc();
    Refused {
        limit,
        retry_after: wait,
    }
}

/// A running blob download: holds its slot and paces its bytes.
pub struct Download {
    limits: Arc<ClientLimits>,
    ip: IpAddr,
    counted: bool,
    paced: bool,
}

impl Drop for Download {
    fn drop(&mut self) {
        self.limits.finish(self.ip, self.counted);
    }
}

impl Download {
    /// `body`, holding this download's slot until it is dropped and paced to
    /// the client's byte rate. Frames pass through untouched (zero-copy
    /// placeholders included).
    pub fn wrap<B>(self, body: B) -> LimitedBody<B> {
        LimitedBody {
            inner: body,
            download: self,
            held: None,
        }
    }
}

pub struct LimitedBody<B> {
    inner: B,
    download: Download,
    /// A frame waiting out its pacing delay.
    held: Option<(Frame<Bytes>, Pin<Box<tokio::time::Sleep>>)>,
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if let Some((_, sleep)) = this.held.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            if let Some((frame, _)) = this.held.take() {
                return Poll::Ready(Some(Ok(frame)));
            }
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        let Some(Ok(frame)) = frame else {
            return Poll::Ready(frame);
        };
        if !this.download.paced {
            return Poll::Ready(Some(Ok(frame)));
        }
        let n = frame.data_ref().map_or(0, Bytes::len);
        let wait = this.download.limits.pace(this.download.ip, n);
        if wait.is_zero() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let mut sleep = Box::pin(tokio::time::sleep(wait));
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Ok(frame)));
        }
        this.held = Some((frame, sleep));
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        if let Some(n) = self
            .held
            .as_ref()
            .and_then(|(f, _)| f.data_ref())
            .map(Bytes::len)
        {
            let n = n as u64;
            hint.set_lower(hint.lower() + n);
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + n);
            }
        }
        hint
    }
}

/// The client address: `peer`, or when `peer` is a trusted proxy, the
/// rightmost address in the forwarding headers that is not one.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(v) = value.to_str() else { return peer };
        hops.extend(v.split(',').filter_map(|h| parse_hop(h.trim())));
    }
    if hops.is_empty() {
        for value in headers.get_all(http::header::FORWARDED) {
            let Ok(v) = value.to_str() else { return peer };
            hops.extend(
                v.split(',')
                    .filter_map(|element| forwarded_for(element).and_then(parse_hop)),
            );
        }
    }
    hops.into_iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer)
}

/// The `for=` parameter of one `Forwarded` element.
fn forwarded_for(element: &str) -> Option<&str> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("for")
            .then(|| v.trim().trim_matches('"'))
    })
}

/// `1.2.3.4`, `1.2.3.4:567`, `::1`, `[::1]` or `[::1]:567`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    hop.parse::<SocketAddr>().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = headers(&[("x-forwarded-for", "203.0.113.9, 10.1.2.3")]);
        // From an untrusted peer the header is the client's own word.
        assert_eq!(
            client_ip(ip("198.51.100.1"), &xff, &trusted),
            ip("198.51.100.1")
        );
        // Through two trusted hops, the first untrusted from the right.
        assert_eq!(client_ip(ip("10.0.0.1"), &xff, &trusted), ip("203.0.113.9"));
        // A client cannot hide behind a forged leftmost entry.
        let forged = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9")]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &forged, &trusted),
            ip("203.0.113.9")
        );
        // Several header lines form one list.
        let split = headers(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "10.9.9.9"),
        ]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &split, &trusted),
            ip("203.0.113.7")
        );
        // Garbage names nobody: the proxy itself is the client.
        let junk = headers(&[("x-forwarded-for", "unknown, ???")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &junk, &trusted), ip("10.0.0.1"));
    }

    #[test]
    fn forwarded_header_with_ports_and_ipv6() {
        let trusted: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap()];
        let h = headers(&[(
            "forwarded",
            r#"for="[2001:db8::7]:4711";proto=https, for=127.0.0.1"#,
        )]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &trusted), ip("2001:db8::7"));
        let h = headers(&[("forwarded", "for=192.0.2.60:8080;by=203.0.113.43")]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &trusted), ip("192.0.2.60"));
    }
}
