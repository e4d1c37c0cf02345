//! The fleet benchmark's load generator (`tests/bench/fleet.py` runs it):
//! N simulated nodes pull one image at once, each as dockerd does (the
//! manifest by tag, then its config and layers three at a time), and every
//! blob's digest and length are checked as its bytes arrive. Prints one
//! JSON object of figures. Only ever told loopback URLs; every request and
//! the whole run have deadlines.
//!
//!   cargo run --release --example fleet_load -- \
//!       --base http://127.0.0.1:8080 --image docker.io/bench/rollout:v1 --nodes 100

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use pier::upstream::describe;
use sha2::{Digest as _, Sha256};

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
                      application/vnd.docker.distribution.manifest.v2+json";

struct Args {
    bases: Vec<String>,
    repository: String,
    tag: String,
    nodes: usize,
    parallel: usize,
    timeout: Duration,
}

fn args() -> Result<Args, String> {
    let mut bases = Vec::new();
    let mut image = None;
    let mut nodes = 1;
    let mut parallel = 3;
    let mut timeout = 900;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--base" => bases.extend(value.split(',').map(str::to_owned)),
            "--image" => image = Some(value),
            "--nodes" => nodes = value.parse().map_err(|e| format!("--nodes: {e}"))?,
            "--parallel" => parallel = value.parse().map_err(|e| format!("--parallel: {e}"))?,
            "--timeout" => timeout = value.parse().map_err(|e| format!("--timeout: {e}"))?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let image = image.ok_or("--image is required")?;
    let (repository, tag) = image.rsplit_once(':').ok_or("--image needs a :tag")?;
    if bases.is_empty() {
        return Err("--base is required".into());
    }
    if bases
        .iter()
        .any(|b| !(b.starts_with("http://127.") || b.starts_with("http://localhost")))
    {
        return Err("--base must be a loopback URL".into());
    }
    Ok(Args {
        bases,
        repository: repository.to_owned(),
        tag: tag.to_owned(),
        nodes,
        parallel: parallel.max(1),
        timeout: Duration::from_secs(timeout),
    })
}

#[derive(Default)]
struct Totals {
    bytes: AtomicU64,
    redirected: AtomicU64,
    mismatches: AtomicU64,
}

/// One node's pull: how long it took, and when its first blob byte came.
struct Pulled {
    took: Duration,
    first_byte: Duration,
}

async fn blob(
    http: &reqwest::Client,
    url: String,
    digest: String,
    size: u64,
    started: Instant,
    totals: &Totals,
) -> Result<Duration, String> {
    let resp = http
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {}", describe(&e)))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    let redirected = !url.starts_with(resp.url().origin().ascii_serialization().as_str());
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    let mut first = None;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("{url}: {}", describe(&e)))?;
        first.get_or_insert_with(|| started.elapsed());
        got += chunk.len() as u64;
        hasher.update(&chunk);
    }
    totals.bytes.fetch_add(got, Ordering::Relaxed);
    if redirected {
        totals.redirected.fetch_add(got, Ordering::Relaxed);
    }
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if actual != digest || got != size {
        totals.mismatches.fetch_add(1, Ordering::Relaxed);
        return Err(format!("{url}: got {got} bytes hashing to {actual}"));
    }
    Ok(first.unwrap_or_else(|| started.elapsed()))
}

async fn node(
    http: reqwest::Client,
    args: Arc<Args>,
    i: usize,
    totals: Arc<Totals>,
) -> Result<Pulled, String> {
    let started = Instant::now();
    let base = &args.bases[i % args.bases.len()];
    let url = format!("{base}/v2/{}/manifests/{}", args.repository, args.tag);
    let resp = http
        .get(&url)
        .header("accept", ACCEPT)
        .send()
        .await
        .map_err(|e| format!("{url}: {}", describe(&e)))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    let manifest: serde_json::Value = resp.json().await.map_err(|e| format!("{url}: {e}"))?;
    let mut blobs = vec![&manifest["config"]];
    blobs.extend(manifest["layers"].as_array().into_iter().flatten());
    let wanted: Vec<(String, u64)> = blobs
        .iter()
        .filter_map(|d| Some((d["digest"].as_str()?.to_owned(), d["size"].as_u64()?)))
        .collect();
    if wanted.len() != blobs.len() {
        return Err(format!("{url}: a descriptor without digest or size"));
    }
    let firsts: Vec<Result<Duration, String>> = futures::stream::iter(wanted)
        .map(|(digest, size)| {
            let url = format!("{base}/v2/{}/blobs/{digest}", args.repository);
            let (http, totals) = (&http, &totals);
            async move { blob(http, url, digest, size, started, totals).await }
        })
        .buffer_unordered(args.parallel)
        .collect()
        .await;
    let mut first_byte = Duration::MAX;
    for f in firsts {
        first_byte = first_byte.min(f?);
    }
    Ok(Pulled {
        took: started.elapsed(),
        first_byte,
    })
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn main() -> std::process::ExitCode {
    let args = match args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("fleet_load: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let Ok(runtime) = tokio::runtime::Runtime::new() else {
        eprintln!("fleet_load: cannot start the runtime");
        return std::process::ExitCode::FAILURE;
    };
    runtime.block_on(run(args))
}

async fn run(args: Arc<Args>) -> std::process::ExitCode {
    // A node's requests each get the whole run's deadline: a layer may take
    // minutes when a thousand nodes share the link.
    let http = match reqwest::Client::builder()
        .timeout(args.timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleet_load: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let totals = Arc::new(Totals::default());
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.nodes)
        .map(|i| tokio::spawn(node(http.clone(), args.clone(), i, totals.clone())))
        .collect();
    let mut took = Vec::new();
    let mut first = Vec::new();
    let mut errors = Vec::new();
    let deadline = tokio::time::Instant::now() + args.timeout + Duration::from_secs(30);
    for t in tasks {
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(Ok(p))) => {
                took.push(p.took.as_secs_f64());
                first.push(p.first_byte.as_secs_f64());
            }
            Ok(Ok(Err(e))) => errors.push(e),
            Ok(Err(e)) => errors.push(format!("node task: {e}")),
            Err(_) => errors.push("the run's deadline passed".into()),
        }
    }
    let wall = started.elapsed().as_secs_f64();
    took.sort_by(f64::total_cmp);
    first.sort_by(f64::total_cmp);
    let out = serde_json::json!({
        "nodes": args.nodes,
        "ok": took.len(),
        "errors": errors.len(),
        "first_errors": errors.iter().take(5).collect::<Vec<_>>(),
        "mismatches": totals.mismatches.load(Ordering::Relaxed),
        "bytes": totals.bytes.load(Ordering::Relaxed),
        "redirected_bytes": totals.redirected.load(Ordering::Relaxed),
        "wall_s": wall,
        "completion_s": {"p50": quantile(&took, 0.5), "p99": quantile(&took, 0.99),
                         "max": took.last().copied().unwrap_or(f64::NAN)},
        "ttfb_s": {"p50": quantile(&first, 0.5), "p99": quantile(&first, 0.99)},
    });
    println!("{out}");
    if errors.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
