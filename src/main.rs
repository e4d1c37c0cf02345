//! The `pier` command: `serve`, `check-config`, `cache stats`, `gc`,
//! `sync` and `rewrite`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pier::config::{Config, StorageConfig};
use std::sync::Arc;

use pier::lifecycle::{EvictError, Evictor, FLUSH_EVERY, Retention, SharedBudget, UseLog};
use pier::storage::{BlobStore, Budget, S3BlobStore, Survey};

#[derive(Parser)]
#[command(
    name = "pier",
    version,
    about = "A pull-through container-image registry mirror"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mirror.
    Serve {
        /// Configuration file (TOML). Without one, built-in defaults apply.
        #[arg(long, short, env = "PIER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Load and validate a configuration, print it with secrets masked.
    CheckConfig {
        #[arg(env = "PIER_CONFIG")]
        file: Option<PathBuf>,
    },
    /// Look at the cache.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Bring the blob store within its budget now (least recently served
    /// first); safe beside running replicas.
    Gc {
        #[arg(long, short, env = "PIER_CONFIG")]
        config: Option<PathBuf>,
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Bring images into the cache before anyone pulls them, and follow
    /// the job to its end.
    Sync(SyncArgs),
    /// Point the images of Kubernetes manifests at the mirror: reads the
    /// files (or stdin), writes the result to stdout.
    Rewrite(RewriteArgs),
    /// Users of the private namespace.
    Users {
        #[command(subcommand)]
        action: UsersAction,
    },
}

#[derive(Subcommand)]
enum UsersAction {
    /// Read a password from stdin, print its bcrypt hash for
    /// `[[private.users]] password_hash` (`echo -n pw | pier users hash`).
    Hash {
        /// bcrypt's cost: each step doubles the time a check takes.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(4..=16))]
        cost: u32,
    },
}

/// `pier users hash`: the password is stdin's, less one line ending.
fn hash_password(cost: u32) -> Result<(), ExitCode> {
    use std::io::Read as _;
    let mut password = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut password) {
        eprintln!("pier: cannot read the password from stdin: {e}");
        return Err(ExitCode::FAILURE);
    }
    let password = password
        .strip_suffix('\n')
        .map(|p| p.strip_suffix('\r').unwrap_or(p))
        .unwrap_or(&password);
    if password.is_empty() {
        eprintln!("pier: give the password on stdin (`echo -n 'password' | pier users hash`)");
        return Err(ExitCode::FAILURE);
    }
    match bcrypt::hash(password, cost) {
        Ok(h) => {
            println!("{h}");
            Ok(())
        }
        Err(e) => {
            eprintln!("pier: cannot hash the password: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("form").required(true).args(["prefix", "host_prefix"])))]
struct RewriteArgs {
    /// The mirror's host: `nginx` becomes `HOST/docker.io/library/nginx`.
    #[arg(long, value_name = "HOST")]
    prefix: Option<String>,
    /// The mirror's domain for host prefixes: `nginx` becomes
    /// `docker.DOMAIN/library/nginx`.
    #[arg(long, value_name = "DOMAIN")]
    host_prefix: Option<String>,
    /// The mirror's configuration, for its upstreams and their host
    /// prefixes (the built-in ones without it).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Also sync every image found, on the server (see `pier sync`).
    #[arg(long)]
    sync: bool,
    #[arg(long, env = "PIER_SERVER", default_value = "http://127.0.0.1:5000")]
    server: String,
    #[arg(long, env = "PIER_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Manifests (YAML); stdin when none is given.
    #[arg(value_name = "FILE")]
    files: Vec<PathBuf>,
}

/// Where `pier sync` does its work.
#[derive(clap::Args)]
struct SyncArgs {
    /// Images, as a client would pull them: `nginx:1.27`,
    /// `registry.k8s.io/pause:3.9`, `m.example.com/docker.io/library/nginx@sha256:…`.
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<String>,
    /// Only these platforms of a multi-platform image (repeat for more);
    /// all of them when none is given.
    #[arg(long = "platform", value_name = "OS/ARCH[/VARIANT]")]
    platforms: Vec<String>,
    /// The Pier to sync on (its admin API).
    #[arg(long, env = "PIER_SERVER", default_value = "http://127.0.0.1:5000")]
    server: String,
    /// The server's `[admin] token`.
    #[arg(long, env = "PIER_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Sync here, into the stores this configuration names, with no
    /// server (a CronJob, a CI step).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CacheAction {
    /// Print the store's usage against its budget.
    Stats {
        #[arg(long, short, env = "PIER_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Config, ExitCode> {
    Config::load(path.map(PathBuf::as_path), std::env::vars()).map_err(|e| {
        eprintln!("pier: invalid configuration:");
        for p in &e.problems {
            eprintln!("  {p}");
        }
        ExitCode::from(2)
    })
}

use pier::sync::human;

/// A Unix time in ms as a date.
fn date_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// Runs `work` with the bucket's eviction, as a replica would (same
/// metadata store, same lease, same pins).
fn with_bucket<T>(
    config: &Config,
    work: impl AsyncFnOnce(&Evictor, String) -> Result<T, ExitCode>,
) -> Result<T, ExitCode> {
    let StorageConfig::S3(s3) = &config.storage else {
        return Err(ExitCode::FAILURE);
    };
    let runtime = tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("pier: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })?;
    runtime.block_on(async {
        let meta = pier::server::open_meta(config).await.map_err(|e| {
            eprintln!("pier: {e:#}");
            ExitCode::FAILURE
        })?;
        let store: Arc<dyn BlobStore> = Arc::new(S3BlobStore::new(s3).await);
        let keep = pier::server::pins(config, &meta);
        let retention = Retention::of(config);
        let budget = SharedBudget {
            max_size: config.cache.max_size,
            retention: retention.clone(),
        };
        let uses = UseLog::start(meta.clone(), FLUSH_EVERY, retention);
        let evictor = Evictor::new(store, meta, keep, budget, uses, None);
        let name = format!(
            "s3 {}/{}",
            s3.bucket,
            s3.prefix.as_deref().unwrap_or("").trim_matches('/')
        );
        work(&evictor, name.trim_end_matches('/').to_owned()).await
    })
}

fn bucket_budget_line(budget: &SharedBudget) -> String {
    let max = budget.max_size.map_or_else(
        || "no size budget".to_owned(),
        |m| format!("max_size {}", human(m)),
    );
    format!("budget: {max}; {}", budget.retention)
}

fn bucket_stats(config: &Config) -> Result<(), ExitCode> {
    with_bucket(config, async |evictor, name| {
        let inventory = evictor.inventory().await.map_err(|e| {
            eprintln!("pier: cannot list the bucket: {e}");
            ExitCode::FAILURE
        })?;
        println!("store: {name}");
        println!(
            "blobs: {} ({})",
            inventory.blobs.len(),
            human(inventory.bytes)
        );
        if let Some(max) = evictor.budget().max_size {
            println!(
                "use: {:.1} % of max_size",
                inventory.bytes as f64 * 100.0 / max as f64
            );
        }
        println!("{}", bucket_budget_line(evictor.budget()));
        if let Some(first) = inventory.blobs.first() {
            println!("least recently served: {}", date_ms(first.recency_ms()));
        }
        Ok(())
    })
}

fn bucket_gc(config: &Config, dry_run: bool) -> Result<(), ExitCode> {
    with_bucket(config, async |evictor, name| {
        println!("store: {name}");
        println!("{}", bucket_budget_line(evictor.budget()));
        // A replica's pass holds the lease for seconds to minutes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        let report = loop {
            match evictor.pass(dry_run).await {
                Err(EvictError::Busy) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
                Err(EvictError::Busy) => {
                    eprintln!("pier: another eviction pass has run for 5 minutes; try later");
                    return Err(ExitCode::FAILURE);
                }
                Err(e) => {
                    eprintln!("pier: {e}");
                    return Err(ExitCode::FAILURE);
                }
                Ok(report) => break report,
            }
        };
        println!("holds: {} blobs, {}", report.blobs, human(report.bytes));
        if report.pinned > 0 {
            println!("pinned: {} blobs kept", report.pinned);
        }
        match report.oldest_ms {
            None if report.spared == 0 => println!("within budget: nothing to remove"),
            None => println!(
                "{}: nothing",
                if dry_run { "would remove" } else { "removed" }
            ),
            Some(oldest) => println!(
                "{}: {} blobs, {}, least recently served {}",
                if dry_run { "would remove" } else { "removed" },
                report.removed,
                human(report.removed_bytes),
                date_ms(oldest)
            ),
        }
        if report.spared > 0 {
            println!(
                "spared: {} blobs served or stored again meanwhile",
                report.spared
            );
        }
        Ok(())
    })
}

/// The fs store's directory; `None` for the bucket.
fn fs_root(config: &Config) -> Option<&std::path::Path> {
    match &config.storage {
        StorageConfig::Fs { path } => Some(path),
        StorageConfig::S3(_) => None,
    }
}

fn budget_line(config: &Config, survey: &Survey) -> String {
    let keep = config.cache.min_free.bytes(survey.total);
    let max = config.cache.max_size.map_or_else(
        || "no size budget".to_owned(),
        |m| format!("max_size {}", human(m)),
    );
    format!("budget: {max}; keeps {} free (min_free)", human(keep))
}

fn survey(root: &std::path::Path) -> Result<Survey, ExitCode> {
    Survey::of(root).map_err(|e| {
        eprintln!("pier: cannot read the store at {}: {e}", root.display());
        ExitCode::FAILURE
    })
}

fn cache_stats(config: &Config) -> Result<(), ExitCode> {
    let Some(root) = fs_root(config) else {
        return bucket_stats(config);
    };
    let survey = survey(root)?;
    println!("store: fs {}", root.display());
    println!("blobs: {} ({})", survey.blobs.len(), human(survey.bytes()));
    if let Some(max) = config.cache.max_size {
        println!(
            "use: {:.1} % of max_size",
            survey.bytes() as f64 * 100.0 / max as f64
        );
    }
    println!("{}", budget_line(config, &survey));
    println!("free: {} of {}", human(survey.free), human(survey.total));
    if let Some((at, ..)) = survey.blobs.first() {
        println!(
            "least recently served: {}",
            humantime::format_rfc3339_seconds(*at)
        );
    }
    Ok(())
}

fn gc(config: &Config, dry_run: bool) -> Result<(), ExitCode> {
    let Some(root) = fs_root(config) else {
        return bucket_gc(config, dry_run);
    };
    if !config.cache.pinned.is_empty() {
        eprintln!(
            "pier: gc cannot see which blobs [cache] pinned keeps (the metadata store says, and a \
             running replica holds it); the replicas keep the budget and the pins themselves"
        );
        return Err(ExitCode::from(2));
    }
    let survey = survey(root)?;
    // Which registry a blob was served for is in the metadata a running
    // replica holds: by age, only what every rule has expired goes.
    let budget = Budget {
        max_size: config.cache.max_size,
        min_free: config.cache.min_free,
        max_age: Retention::of(config).longest(),
        scrub: None,
    };
    println!("store: fs {}", root.display());
    println!("{}", budget_line(config, &survey));
    println!(
        "holds: {} blobs, {}; {} free of {}",
        survey.blobs.len(),
        human(survey.bytes()),
        human(survey.free),
        human(survey.total)
    );
    let victims = survey.over_budget(&budget);
    if victims.is_empty() {
        println!("within budget: nothing to remove");
        return Ok(());
    }
    let bytes: u64 = victims.iter().map(|(_, _, s)| s).sum();
    let (oldest, newest) = (victims[0].0, victims[victims.len() - 1].0);
    println!(
        "{}: {} blobs, {}, last served {} to {}",
        if dry_run { "would remove" } else { "removing" },
        victims.len(),
        human(bytes),
        humantime::format_rfc3339_seconds(oldest),
        humantime::format_rfc3339_seconds(newest)
    );
    if dry_run {
        return Ok(());
    }
    let (count, removed) = Survey::remove(root, victims);
    println!(
        "removed: {count} blobs, {} ({} were served meanwhile and stay)",
        human(removed),
        victims.len() - count
    );
    Ok(())
}

fn sync(args: SyncArgs) -> Result<(), ExitCode> {
    use std::io::IsTerminal;
    let runtime = tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("pier: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })?;
    let mut show = pier::sync::for_output(std::io::stderr().is_terminal());
    let job = match &args.config {
        Some(path) => {
            let config = load(Some(path))?;
            runtime.block_on(sync_here(&config, &args, show.as_mut()))?
        }
        None => {
            let Some(token) = args.token.as_deref() else {
                eprintln!(
                    "pier: --token (or PIER_ADMIN_TOKEN) is needed to sync on {}; or sync here with --config",
                    args.server
                );
                return Err(ExitCode::from(2));
            };
            runtime
                .block_on(pier::sync::submit_and_follow(
                    &args.server,
                    token,
                    &args.images,
                    &args.platforms,
                    show.as_mut(),
                ))
                .map_err(|e| {
                    eprintln!("pier: {e}");
                    ExitCode::FAILURE
                })?
        }
    };
    report_failed(&job)
}

/// Works on the job in this process, with the configured stores.
async fn sync_here(
    config: &Config,
    args: &SyncArgs,
    show: &mut dyn pier::sync::Show,
) -> Result<pier::sync::Job, ExitCode> {
    let (mirror, _, meta) = pier::server::build_mirror(config).await.map_err(|e| {
        eprintln!("pier: {e:#}");
        ExitCode::FAILURE
    })?;
    let syncer = Arc::new(pier::sync::Syncer::new(mirror.clone(), &config.sync));
    let jobs = pier::sync::Jobs::new(meta, syncer, &config.sync);
    let request = pier::sync::SyncRequest {
        images: args.images.clone(),
        platforms: args.platforms.clone(),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut job = jobs.prepare(request, now).map_err(|e| {
        eprintln!("pier: {e}");
        ExitCode::from(2)
    })?;
    jobs.work(&mut job, &mut pier::sync::Shown(show)).await;
    // Fetches joined from elsewhere store before the process ends.
    mirror.begin_shutdown();
    mirror
        .shutdown(tokio::time::Instant::now() + config.server.shutdown_grace)
        .await;
    Ok(job)
}

fn rewrite(args: RewriteArgs) -> Result<(), ExitCode> {
    use std::io::{IsTerminal, Read, Write};
    let config = match &args.config {
        Some(path) => load(Some(path))?,
        None => load(None)?,
    };
    let form = match (args.prefix, args.host_prefix) {
        (Some(host), _) => pier::rewrite::Form::AddPrefix(mirror_host(&host)?),
        (None, Some(domain)) => pier::rewrite::Form::HostPrefix(mirror_host(&domain)?),
        (None, None) => return Err(ExitCode::from(2)),
    };
    let mirror = pier::rewrite::Mirror::new(form, &config);
    let mut inputs = Vec::new();
    if args.files.is_empty() {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(|e| {
            eprintln!("pier: cannot read stdin: {e}");
            ExitCode::FAILURE
        })?;
        inputs.push(("stdin".to_owned(), text));
    }
    for file in &args.files {
        let text = std::fs::read_to_string(file).map_err(|e| {
            eprintln!("pier: cannot read {}: {e}", file.display());
            ExitCode::FAILURE
        })?;
        inputs.push((file.display().to_string(), text));
    }
    let mut out = std::io::stdout().lock();
    let mut images = Vec::new();
    for (i, (name, text)) in inputs.iter().enumerate() {
        let done = pier::rewrite::rewrite(text, &mirror).map_err(|e| {
            eprintln!("pier: {name}: {e}");
            ExitCode::FAILURE
        })?;
        for (image, why) in &done.left {
            eprintln!("pier: {name}: left {image} as it is: {why}");
        }
        // What the mirror is to fetch, as Docker reads the image: the
        // server's own short-name rules may read it otherwise.
        images.extend(done.changed.into_iter().map(|(_, _, source)| source));
        if i > 0 && !done.text.starts_with("---") {
            let _ = writeln!(out, "---");
        }
        let _ = out.write_all(done.text.as_bytes());
        if !done.text.ends_with('\n') {
            let _ = writeln!(out);
        }
    }
    drop(out);
    if !args.sync || images.is_empty() {
        return Ok(());
    }
    images.sort();
    images.dedup();
    let Some(token) = args.token.as_deref() else {
        eprintln!("pier: --sync needs --token (or PIER_ADMIN_TOKEN)");
        return Err(ExitCode::from(2));
    };
    let runtime = tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("pier: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })?;
    // The manifests went to stdout: progress goes to stderr.
    let mut show = pier::sync::for_stderr(std::io::stderr().is_terminal());
    let job = runtime
        .block_on(pier::sync::submit_and_follow(
            &args.server,
            token,
            &images,
            &[],
            show.as_mut(),
        ))
        .map_err(|e| {
            eprintln!("pier: {e}");
            ExitCode::FAILURE
        })?;
    report_failed(&job)
}

/// A mirror host as images name it: lowercase, no scheme or path.
fn mirror_host(given: &str) -> Result<String, ExitCode> {
    let host = given.trim().trim_end_matches('/').to_ascii_lowercase();
    let ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if ok {
        Ok(host)
    } else {
        eprintln!(
            "pier: {given:?} is not a host as an image names it (like m.example.com or m.example.com:8443, no scheme)"
        );
        Err(ExitCode::from(2))
    }
}

/// Names each image of `job` that failed; a failure if any did.
fn report_failed(job: &pier::sync::Job) -> Result<(), ExitCode> {
    let failed: Vec<_> = job
        .images
        .iter()
        .filter(|i| i.state == pier::sync::State::Failed)
        .collect();
    for image in &failed {
        eprintln!(
            "pier: {} failed: {}",
            image.image,
            image.error.as_deref().unwrap_or("no reason given")
        );
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(ExitCode::FAILURE)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Rewrite(args) => match rewrite(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(code) => code,
        },
        Command::Users {
            action: UsersAction::Hash { cost },
        } => match hash_password(cost) {
            Ok(()) => ExitCode::SUCCESS,
            Err(code) => code,
        },
        Command::Sync(args) => match sync(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(code) => code,
        },
        Command::Cache {
            action: CacheAction::Stats { config },
        } => match load(config.as_ref()).and_then(|c| cache_stats(&c)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(code) => code,
        },
        Command::Gc { config, dry_run } => {
            match load(config.as_ref()).and_then(|c| gc(&c, dry_run)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(code) => code,
            }
        }
        Command::CheckConfig { file } => match load(file.as_ref()) {
            Ok(c) => {
                print!("{}", c.to_masked_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Serve { config } => {
            let config = match load(config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            pier::telemetry::init(config.log_format);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("pier: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(async {
                let listener = pier::server::listen(config.listen)
                    .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
                pier::server::serve(&config, listener, pier::server::shutdown_signal()).await
            });
            pier::telemetry::shutdown();
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pier: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
