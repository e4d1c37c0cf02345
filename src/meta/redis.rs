//! Metadata in Redis, shared by every replica. Keys (after `key_prefix`):
//! `m:<digest>` manifest (media type, `\n`, bytes); `t:<repo>:<tag>` JSON
//! `TagRecord`; `tags:<repo>` and `repos` sorted sets (all scores 0, so
//! they sort by name); `l:<repo>` set of digests the repository may serve;
//! `uses` and `muses` sorted sets of blob and manifest digests by last use
//! (Unix ms), `expires` and `mexpires` by deadline; `job:<id>` sync job
//! records, `jobs` their ids (scores 0: by name, which is by age) and
//! `jobs:open` those not finished;
//! `usage` hash of
//! the `bytes` and `blobs` stored; `lease:<name>` leases; the console's
//! `counts` hash (totals) and `counts:<minute>` hashes, `pulls` sorted set
//! of repositories by pulls, `replica:<name>` records (each with its own
//! expiry) listed in the `replicas` sorted set, and the
//! `failures` list, newest first.
//! Every command has a deadline: a Redis outage turns into errors, never
//! into hung requests.
//!
//! In a Redis Cluster every key carries the prefix as a hash tag, so all of
//! them share one slot: the scripts and transactions below touch several
//! keys at once, which a cluster allows only within a slot. The cluster
//! then gives failover, not sharding (see the README for the load).

mod connect;

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use deadpool::managed::{Pool, PoolConfig, Timeouts};
use redis::AsyncCommands;

use self::connect::{Connector, Pooled};
use crate::config::Secret;
use crate::config::redis_url::{RedisTarget, Topology};

use super::{
    Claimed, Counts, FAILURES_KEPT, JOBS_KEPT, MINUTES_KEPT, MetaError, MetaStore, Removal,
    StoredManifest, TagRecord, UseKind,
};
use crate::rate::Rate;
use crate::reference::Digest;

pub struct RedisMeta {
    pool: Pool<Connector>,
    prefix: String,
    timeout: Duration,
}

/// How to reach Redis, beyond its URL.
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// The URL names a cluster node even with one host.
    pub cluster: bool,
    /// CA certificates (PEM) for TLS instead of the public roots.
    pub tls_ca: Option<Vec<u8>>,
    pub sentinel_password: Option<Secret>,
    pub pool_size: usize,
    pub timeout: Duration,
}

impl RedisMeta {
    /// A pool for one plain server at `url`.
    pub fn new(
        url: &str,
        prefix: &str,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<Self, MetaError> {
        let options = RedisOptions {
            pool_size,
            timeout,
            ..RedisOptions::default()
        };
        Self::connect(url, prefix, &options)
    }

    /// Builds the pool; connections are made on first use, so a Redis that
    /// is down at start is not fatal.
    pub fn connect(url: &str, prefix: &str, options: &RedisOptions) -> Result<Self, MetaError> {
        let target = crate::config::redis_url::parse(url, options.cluster)
            .map_err(|why| MetaError::Backend(format!("redis: the URL {why}")))?;
        let connector = connect::connector(
            &target,
            options.tls_ca.clone(),
            options.sentinel_password.as_ref().map(Secret::expose),
            options.timeout,
        )
        .map_err(|e| MetaError::Backend(format!("redis: {e}")))?;
        let timeout = options.timeout;
        let mut config = PoolConfig::new(options.pool_size.max(1));
        config.timeouts = Timeouts {
            wait: Some(timeout),
            create: Some(timeout),
            recycle: Some(timeout),
        };
        let pool = Pool::builder(connector)
            .config(config)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| MetaError::Backend(format!("redis: {e}")))?;
        Ok(Self {
            pool,
            prefix: key_prefix(&target, prefix),
            timeout,
        })
    }

    /// The prefix every key starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        k.push_str(&parts.join(":"));
        k
    }

    fn uses_key(&self, kind: UseKind) -> String {
        self.key(&[match kind {
            UseKind::Blobs => "uses",
            UseKind::Manifests => "muses",
            UseKind::BlobDeadlines => "expires",
            UseKind::ManifestDeadlines => "mexpires",
        }])
    }

    /// Runs `op` on a pooled connection within the deadline.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, MetaError>
    where
        F: FnOnce(Pooled) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let work = async {
            let conn = self
                .pool
                .get()
                .await
                .map_err(|e| MetaError::Backend(format!("redis: {e}")))?;
            op(Pooled(conn))
                .await
                .map_err(|e| MetaError::Backend(format!("redis: {e}")))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| Err(MetaError::Backend("redis: timed out".into())))
    }
}

/// `prefix`, as a hash tag in a cluster (`{pier:}`) so every key lands in
/// one slot; a prefix that already has a tag is the operator's choice.
fn key_prefix(target: &RedisTarget, prefix: &str) -> String {
    if target.topology == Topology::Cluster && !prefix.contains('{') {
        format!("{{{prefix}}}")
    } else {
        prefix.to_owned()
    }
}

/// Extends a lease only for its holder (Redis 7.0 has no compare-and-set).
const RENEW: &str = r"if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";
/// Changes a lease's value only for its holder.
const REPLACE: &str = r"if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 else return 0 end";
/// Deletes a lease only for its holder.
const RELEASE: &str = r"if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// Stores a job's record, notes it open or finished, and drops the oldest
/// finished jobs beyond the number kept (ids sort by age: scores are 0).
const SAVE_JOB: &str = r"
redis.call('set', KEYS[1], ARGV[2])
redis.call('zadd', KEYS[2], 0, ARGV[1])
if ARGV[3] == '1' then redis.call('sadd', KEYS[3], ARGV[1]) else redis.call('srem', KEYS[3], ARGV[1]) end
local excess = redis.call('zcard', KEYS[2]) - tonumber(ARGV[4])
if excess <= 0 then return 0 end
local oldest = redis.call('zrange', KEYS[2], 0, excess + redis.call('scard', KEYS[3]) - 1)
for _, id in ipairs(oldest) do
  if excess <= 0 then break end
  if redis.call('sismember', KEYS[3], id) == 0 then
    redis.call('del', ARGV[5] .. id)
    redis.call('zrem', KEYS[2], id)
    excess = excess - 1
  end
end
return 0
";

/// The rule of `crate::rate::decide` on the server's clock, so every replica
/// counts against one TAT per key. Returns 0, or the µs to wait.
const THROTTLE: &str = r"
local t = redis.call('time')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('get', KEYS[1]) or now)
if tat < now then tat = now end
local ahead = tat - now
local tolerance = tonumber(ARGV[2])
if ahead > tolerance then return ahead - tolerance end
tat = tat + tonumber(ARGV[1])
redis.call('set', KEYS[1], string.format('%.0f', tat), 'px', math.floor((tat - now) / 1000) + 1)
return 0";

/// `MetaStore::claim_removal`: 1 claimed, 0 wanted, -1 fenced. KEYS: the
/// eviction lease, the blob's lease, `uses`; ARGV: holder, digest, the use
/// the decision saw, the blob lease's ttl in ms. A blob lease ending in
/// " stored" (`super::STORED`) is a finished fetch's, left to lapse.
const CLAIM_REMOVAL: &str = r"
if redis.call('get', KEYS[1]) ~= ARGV[1] then return -1 end
local fetching = redis.call('get', KEYS[2])
if fetching and string.sub(fetching, -7) ~= ' stored' then return 0 end
local used = redis.call('zscore', KEYS[3], ARGV[2])
if used and tonumber(used) > tonumber(ARGV[3]) then return 0 end
redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[4])
return 1";

/// `MetaStore::forget_manifests`, one digest: 1 when removed. KEYS: `uses`,
/// the manifest's key; ARGV: digest, cutoff ms.
const FORGET_MANIFEST: &str = r"
local used = redis.call('zscore', KEYS[1], ARGV[1])
if used and tonumber(used) >= tonumber(ARGV[2]) then return 0 end
if redis.call('del', KEYS[2]) == 1 then
  redis.call('zrem', KEYS[1], ARGV[1])
  return 1
end
return 0";

/// Uses sent to Redis in one command.
const USES_PER_COMMAND: usize = 1000;

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl MetaStore for RedisMeta {
    async fn manifest(&self, digest: &Digest) -> Result<Option<StoredManifest>, MetaError> {
        let key = self.key(&["m", &digest.to_string()]);
        let raw: Option<Vec<u8>> = self.run(|mut c| async move { c.get(key).await }).await?;
        raw.map(|r| StoredManifest::decode(&r, digest)).transpose()
    }

    async fn put_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        manifest: &StoredManifest,
        references: &[Digest],
    ) -> Result<(), MetaError> {
        let value = manifest.encode();
        let members: Vec<String> = std::iter::once(digest)
            .chain(references)
            .map(Digest::to_string)
            .collect();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .set(self.key(&["m", &digest.to_string()]), value)
            .ignore()
            .sadd(self.key(&["l", repo]), members)
            .ignore()
            .zadd(self.key(&["repos"]), repo, 0)
            .ignore();
        self.run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    async fn tag(&self, repo: &str, tag: &str) -> Result<Option<TagRecord>, MetaError> {
        let key = self.key(&["t", repo, tag]);
        let raw: Option<Vec<u8>> = self.run(|mut c| async move { c.get(key).await }).await?;
        raw.map(|r| {
            serde_json::from_slice(&r)
                .map_err(|e| MetaError::Corrupt(format!("tag {repo}:{tag}: {e}")))
        })
        .transpose()
    }

    async fn put_tag(&self, repo: &str, tag: &str, record: &TagRecord) -> Result<(), MetaError> {
        let value = serde_json::to_vec(record).map_err(|e| MetaError::Backend(e.to_string()))?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .set(self.key(&["t", repo, tag]), value)
            .ignore()
            .zadd(self.key(&["tags", repo]), tag, 0)
            .ignore()
            .zadd(self.key(&["repos"]), repo, 0)
            .ignore();
        self.run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    async fn tags(&self, repo: &str) -> Result<Vec<String>, MetaError> {
        let key = self.key(&["tags", repo]);
        self.run(|mut c| async move { c.zrange(key, 0, -1).await })
            .await
    }

    async fn link(&self, repo: &str, digests: &[Digest]) -> Result<(), MetaError> {
        if digests.is_empty() {
            return Ok(());
        }
        let members: Vec<String> = digests.iter().map(Digest::to_string).collect();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .sadd(self.key(&["l", repo]), members)
            .ignore()
            .zadd(self.key(&["repos"]), repo, 0)
            .ignore();
        self.run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    async fn is_linked(&self, repo: &str, digest: &Digest) -> Result<bool, MetaError> {
        let key = self.key(&["l", repo]);
        let member = digest.to_string();
        self.run(|mut c| async move { c.sismember(key, member).await })
            .await
    }

    async fn repositories(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, MetaError> {
        let key = self.key(&["repos"]);
        let min = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let limit = isize::try_from(limit).unwrap_or(isize::MAX);
        self.run(|mut c| async move { c.zrangebylex_limit(key, min, "+", 0, limit).await })
            .await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<String>, MetaError> {
        let key = self.key(&["lease", name]);
        let (holder, ms) = (holder.to_owned(), ttl_ms(ttl));
        self.run(|mut c| async move {
            // SET NX PX takes it; otherwise report who has it. A lease that
            // expires between the two commands counts as held this time.
            let taken: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&holder)
                .arg("NX")
                .arg("PX")
                .arg(ms)
                .query_async(&mut c)
                .await?;
            if taken.is_some() {
                return Ok(None);
            }
            let current: Option<String> = c.get(&key).await?;
            Ok(Some(current.unwrap_or_default()))
        })
        .await
    }

    async fn renew_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, MetaError> {
        let key = self.key(&["lease", name]);
        let (holder, ms) = (holder.to_owned(), ttl_ms(ttl));
        self.run(|mut c| async move {
            let renewed: i64 = redis::Script::new(RENEW)
                .key(key)
                .arg(holder)
                .arg(ms)
                .invoke_async(&mut c)
                .await?;
            Ok(renewed == 1)
        })
        .await
    }

    async fn replace_lease(
        &self,
        name: &str,
        holder: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, MetaError> {
        let key = self.key(&["lease", name]);
        let (holder, value, ms) = (holder.to_owned(), value.to_owned(), ttl_ms(ttl));
        self.run(|mut c| async move {
            let replaced: i64 = redis::Script::new(REPLACE)
                .key(key)
                .arg(holder)
                .arg(value)
                .arg(ms)
                .invoke_async(&mut c)
                .await?;
            Ok(replaced == 1)
        })
        .await
    }

    async fn lease(&self, name: &str) -> Result<Option<String>, MetaError> {
        let key = self.key(&["lease", name]);
        self.run(|mut c| async move { c.get(key).await }).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), MetaError> {
        let key = self.key(&["lease", name]);
        let holder = holder.to_owned();
        self.run(|mut c| async move {
            redis::Script::new(RELEASE)
                .key(key)
                .arg(holder)
                .invoke_async::<i64>(&mut c)
                .await
                .map(drop)
        })
        .await
    }

    async fn throttle(&self, key: &str, rate: Rate) -> Result<Result<(), Duration>, MetaError> {
        let key = self.key(&["rate", key]);
        let wait_us: u64 = self
            .run(|mut c| async move {
                redis::Script::new(THROTTLE)
                    .key(key)
                    .arg(rate.interval_us)
                    .arg(rate.tolerance_us)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(match wait_us {
            0 => Ok(()),
            us => Err(Duration::from_micros(us)),
        })
    }

    async fn record_uses(&self, kind: UseKind, uses: &[(Digest, u64)]) -> Result<(), MetaError> {
        for batch in uses.chunks(USES_PER_COMMAND) {
            let key = self.uses_key(kind);
            let mut cmd = redis::cmd("ZADD");
            // GT: a replica whose batch arrives late never moves a use back.
            cmd.arg(key).arg("GT");
            for (digest, at) in batch {
                cmd.arg(*at).arg(digest.to_string());
            }
            self.run(|mut c| async move { cmd.query_async::<()>(&mut c).await })
                .await?;
        }
        Ok(())
    }

    async fn last_uses(
        &self,
        kind: UseKind,
        digests: &[Digest],
    ) -> Result<Vec<Option<u64>>, MetaError> {
        let mut out = Vec::with_capacity(digests.len());
        for batch in digests.chunks(USES_PER_COMMAND) {
            let key = self.uses_key(kind);
            let mut cmd = redis::cmd("ZMSCORE");
            cmd.arg(key);
            for digest in batch {
                cmd.arg(digest.to_string());
            }
            let scores: Vec<Option<f64>> = self
                .run(|mut c| async move { cmd.query_async(&mut c).await })
                .await?;
            out.extend(scores.into_iter().map(|s| s.map(|ms| ms.max(0.0) as u64)));
        }
        Ok(out)
    }

    async fn forget_uses(&self, kind: UseKind, digests: &[Digest]) -> Result<(), MetaError> {
        for batch in digests.chunks(USES_PER_COMMAND) {
            let key = self.uses_key(kind);
            let members: Vec<String> = batch.iter().map(Digest::to_string).collect();
            self.run(|mut c| async move { c.zrem::<_, _, ()>(key, members).await })
                .await?;
        }
        Ok(())
    }

    async fn used_before(
        &self,
        kind: UseKind,
        before_ms: u64,
        skip: usize,
        limit: usize,
    ) -> Result<Vec<Digest>, MetaError> {
        let key = self.uses_key(kind);
        let max = format!("({before_ms}");
        let (skip, limit) = (
            isize::try_from(skip).unwrap_or(isize::MAX),
            isize::try_from(limit).unwrap_or(isize::MAX),
        );
        let members: Vec<String> = self
            .run(|mut c| async move { c.zrangebyscore_limit(key, "-inf", max, skip, limit).await })
            .await?;
        Ok(members
            .iter()
            .filter_map(|m| Digest::parse(m).ok())
            .collect())
    }

    async fn forget_manifests(
        &self,
        digests: &[Digest],
        before_ms: u64,
    ) -> Result<Vec<Digest>, MetaError> {
        let mut removed = Vec::new();
        for digest in digests {
            let name = digest.to_string();
            let keys = [self.uses_key(UseKind::Manifests), self.key(&["m", &name])];
            let gone: i64 = self
                .run(|mut c| async move {
                    redis::Script::new(FORGET_MANIFEST)
                        .key(&keys[..])
                        .arg(name)
                        .arg(before_ms)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            if gone == 1 {
                removed.push(digest.clone());
            }
        }
        Ok(removed)
    }

    async fn adopt_manifests(&self, at_ms: u64) -> Result<usize, MetaError> {
        let strip = self.key(&["m", ""]);
        // The key prefix is the operator's: its glob characters match
        // themselves.
        let mut pattern: String = strip
            .chars()
            .flat_map(|c| match c {
                '*' | '?' | '[' | ']' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        pattern.push('*');
        let uses = self.uses_key(UseKind::Manifests);
        let mut cursor: u64 = 0;
        let mut adopted = 0;
        loop {
            let pattern = pattern.clone();
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(USES_PER_COMMAND);
            let slot_of = self.prefix.clone();
            let (next, keys): (u64, Vec<String>) = self
                .run(|mut c| async move { c.query_in_slot_of(scan, &slot_of).await })
                .await?;
            let digests: Vec<&str> = keys
                .iter()
                .filter_map(|k| k.strip_prefix(&strip))
                .filter(|d| Digest::parse(d).is_ok())
                .collect();
            if !digests.is_empty() {
                let mut cmd = redis::cmd("ZADD");
                // NX: a use already recorded stays.
                cmd.arg(&uses).arg("NX").arg("CH");
                for d in &digests {
                    cmd.arg(at_ms).arg(*d);
                }
                let added: usize = self
                    .run(|mut c| async move { cmd.query_async(&mut c).await })
                    .await?;
                adopted += added;
            }
            if next == 0 {
                return Ok(adopted);
            }
            cursor = next;
        }
    }

    async fn has_manifests(&self, digests: &[Digest]) -> Result<Vec<bool>, MetaError> {
        let mut out = Vec::with_capacity(digests.len());
        for batch in digests.chunks(USES_PER_COMMAND) {
            let mut pipe = redis::pipe();
            for d in batch {
                pipe.exists(self.key(&["m", &d.to_string()]));
            }
            let found: Vec<bool> = self
                .run(|mut c| async move { pipe.query_async(&mut c).await })
                .await?;
            out.extend(found);
        }
        Ok(out)
    }

    async fn links(&self, repo: &str) -> Result<Vec<Digest>, MetaError> {
        let key = self.key(&["l", repo]);
        let members: Vec<String> = self
            .run(|mut c| async move { c.smembers(key).await })
            .await?;
        Ok(members
            .iter()
            .filter_map(|m| Digest::parse(m).ok())
            .collect())
    }

    async fn unlink(&self, repo: &str, digests: &[Digest]) -> Result<(), MetaError> {
        for batch in digests.chunks(USES_PER_COMMAND) {
            let key = self.key(&["l", repo]);
            let members: Vec<String> = batch.iter().map(Digest::to_string).collect();
            self.run(|mut c| async move { c.srem::<_, _, ()>(key, members).await })
                .await?;
        }
        Ok(())
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> Result<(), MetaError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(self.key(&["t", repo, tag]))
            .ignore()
            .zrem(self.key(&["tags", repo]), tag)
            .ignore();
        self.run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    async fn forget_repository(&self, repo: &str) -> Result<(), MetaError> {
        for tag in self.tags(repo).await? {
            self.delete_tag(repo, &tag).await?;
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(self.key(&["l", repo]))
            .ignore()
            .del(self.key(&["tags", repo]))
            .ignore()
            .zrem(self.key(&["repos"]), repo)
            .ignore();
        self.run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    async fn add_usage(&self, bytes: i64, blobs: i64) -> Result<(i64, i64), MetaError> {
        let key = self.key(&["usage"]);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hincr(&key, "bytes", bytes)
            .hincr(&key, "blobs", blobs);
        self.run(|mut c| async move { pipe.query_async(&mut c).await })
            .await
    }

    async fn claim_removal(&self, removal: &Removal<'_>) -> Result<Claimed, MetaError> {
        let keys = [
            self.key(&["lease", removal.fence]),
            self.key(&["lease", &super::blob_lease(removal.digest)]),
            self.uses_key(UseKind::Blobs),
        ];
        let args = (
            removal.holder.to_owned(),
            removal.digest.to_string(),
            removal.seen_ms,
            ttl_ms(removal.ttl),
        );
        let answer: i64 = self
            .run(|mut c| async move {
                redis::Script::new(CLAIM_REMOVAL)
                    .key(&keys[..])
                    .arg(args.0)
                    .arg(args.1)
                    .arg(args.2)
                    .arg(args.3)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(match answer {
            1 => Claimed::Yes,
            0 => Claimed::Wanted,
            _ => Claimed::Fenced,
        })
    }

    fn shared(&self) -> bool {
        true
    }

    async fn save_job(&self, id: &str, record: &[u8], open: bool) -> Result<(), MetaError> {
        let keys = [
            self.key(&["job", id]),
            self.key(&["jobs"]),
            self.key(&["jobs", "open"]),
        ];
        let args = (
            id.to_owned(),
            record.to_vec(),
            u8::from(open),
            JOBS_KEPT,
            self.key(&["job", ""]),
        );
        self.run(|mut c| async move {
            redis::Script::new(SAVE_JOB)
                .key(&keys[..])
                .arg(args.0)
                .arg(args.1)
                .arg(args.2)
                .arg(args.3)
                .arg(args.4)
                .invoke_async::<()>(&mut c)
                .await
        })
        .await
    }

    async fn open_jobs(&self) -> Result<Vec<String>, MetaError> {
        let key = self.key(&["jobs", "open"]);
        self.run(|mut c| async move { c.smembers(key).await }).await
    }

    async fn close_job(&self, id: &str) -> Result<(), MetaError> {
        let key = self.key(&["jobs", "open"]);
        let id = id.to_owned();
        self.run(|mut c| async move { c.srem::<_, _, ()>(key, id).await })
            .await
    }

    async fn job(&self, id: &str) -> Result<Option<Vec<u8>>, MetaError> {
        let key = self.key(&["job", id]);
        self.run(|mut c| async move { c.get(key).await }).await
    }

    async fn recent_jobs(&self, limit: usize) -> Result<Vec<Vec<u8>>, MetaError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let jobs = self.key(&["jobs"]);
        let stop = isize::try_from(limit).unwrap_or(isize::MAX) - 1;
        let ids: Vec<String> = self
            .run(|mut c| async move { c.zrevrange(jobs, 0, stop).await })
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key(&["job", id])).collect();
        let records: Vec<Option<Vec<u8>>> = self
            .run(|mut c| async move { redis::cmd("MGET").arg(keys).query_async(&mut c).await })
            .await?;
        Ok(records.into_iter().flatten().collect())
    }

    async fn add_counts(
        &self,
        minute: u64,
        counts: &[(String, u64)],
        pulls: &[(String, u64)],
    ) -> Result<(), MetaError> {
        if counts.is_empty() && pulls.is_empty() {
            return Ok(());
        }
        let (total, by_minute) = (
            self.key(&["counts"]),
            self.key(&["counts", &minute.to_string()]),
        );
        // All or nothing: a round written in part and then put back
        // would count twice.
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (name, n) in counts {
            pipe.hincr(&total, name, *n).ignore();
            pipe.hincr(&by_minute, name, *n).ignore();
        }
        if !counts.is_empty() {
            let ttl = i64::try_from(MINUTES_KEPT * 60).unwrap_or(i64::MAX);
            pipe.expire(&by_minute, ttl).ignore();
        }
        let pulled = self.key(&["pulls"]);
        for (repo, n) in pulls {
            pipe.zincr(&pulled, repo, *n).ignore();
        }
        self.run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    async fn counts(&self, from: u64, to: u64) -> Result<Counts, MetaError> {
        let minutes: Vec<u64> = (from..=to).collect();
        let mut pipe = redis::pipe();
        pipe.hgetall(self.key(&["counts"]));
        for m in &minutes {
            pipe.hgetall(self.key(&["counts", &m.to_string()]));
        }
        let mut maps: Vec<std::collections::BTreeMap<String, u64>> = self
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        if maps.is_empty() {
            return Ok(Counts::default());
        }
        let total = maps.remove(0);
        Ok(Counts {
            total,
            minutes: minutes
                .into_iter()
                .zip(maps)
                .filter(|(_, m)| !m.is_empty())
                .collect(),
        })
    }

    async fn top_pulls(&self, n: usize) -> Result<Vec<(String, u64)>, MetaError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let key = self.key(&["pulls"]);
        let stop = isize::try_from(n).unwrap_or(isize::MAX) - 1;
        self.run(|mut c| async move { c.zrevrange_withscores(key, 0, stop).await })
            .await
    }

    async fn add_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
    ) -> Result<(), MetaError> {
        let key = self.key(&["ref", repo, &subject.to_string()]);
        let member = referrer.to_string();
        self.run(|mut c| async move { c.sadd::<_, _, ()>(key, member).await })
            .await
    }

    async fn remove_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        referrer: &Digest,
    ) -> Result<(), MetaError> {
        let key = self.key(&["ref", repo, &subject.to_string()]);
        let member = referrer.to_string();
        self.run(|mut c| async move { c.srem::<_, _, ()>(key, member).await })
            .await
    }

    async fn referrers(&self, repo: &str, subject: &Digest) -> Result<Vec<Digest>, MetaError> {
        let key = self.key(&["ref", repo, &subject.to_string()]);
        let members: Vec<String> = self
            .run(|mut c| async move { c.smembers(key).await })
            .await?;
        let mut digests: Vec<Digest> = members
            .iter()
            .filter_map(|m| Digest::parse(m).ok())
            .collect();
        digests.sort();
        Ok(digests)
    }

    async fn put_upload(&self, id: &str, record: &[u8], ttl: Duration) -> Result<(), MetaError> {
        let key = self.key(&["upload", id]);
        let (record, ms) = (record.to_vec(), ttl_ms(ttl));
        self.run(|mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(record)
                .arg("PX")
                .arg(ms)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    async fn upload(&self, id: &str) -> Result<Option<Vec<u8>>, MetaError> {
        let key = self.key(&["upload", id]);
        self.run(|mut c| async move { c.get(key).await }).await
    }

    async fn delete_upload(&self, id: &str) -> Result<(), MetaError> {
        let key = self.key(&["upload", id]);
        self.run(|mut c| async move { c.del::<_, ()>(key).await })
            .await
    }

    async fn put_replica(&self, name: &str, record: &[u8], ttl: Duration) -> Result<(), MetaError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.key(&["replica", name]))
            .arg(record)
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .zadd(self.key(&["replicas"]), name, 0)
            .ignore();
        self.run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    async fn replicas(&self) -> Result<Vec<Vec<u8>>, MetaError> {
        // Each record lapses by its own key's expiry (Redis's clock, not
        // the replicas'); the list only says which keys to look at.
        let listed = self.key(&["replicas"]);
        let names: Vec<String> = self
            .run(|mut c| {
                let listed = listed.clone();
                async move { c.zrange(&listed, 0, -1).await }
            })
            .await?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = names.iter().map(|n| self.key(&["replica", n])).collect();
        let records: Vec<Option<Vec<u8>>> = self
            .run(|mut c| async move { redis::cmd("MGET").arg(keys).query_async(&mut c).await })
            .await?;
        let gone: Vec<&String> = names
            .iter()
            .zip(&records)
            .filter(|(_, r)| r.is_none())
            .map(|(n, _)| n)
            .collect();
        if !gone.is_empty() {
            self.run(|mut c| async move { c.zrem::<_, _, ()>(&listed, gone).await })
                .await?;
        }
        Ok(records.into_iter().flatten().collect())
    }

    async fn add_failures(&self, records: &[Vec<u8>]) -> Result<(), MetaError> {
        if records.is_empty() {
            return Ok(());
        }
        let key = self.key(&["failures"]);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for r in records {
            pipe.lpush(&key, r.as_slice()).ignore();
        }
        pipe.ltrim(&key, 0, FAILURES_KEPT as isize - 1).ignore();
        self.run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    async fn failures(&self, n: usize) -> Result<Vec<Vec<u8>>, MetaError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let key = self.key(&["failures"]);
        let stop = isize::try_from(n).unwrap_or(isize::MAX) - 1;
        self.run(|mut c| async move { c.lrange(key, 0, stop).await })
            .await
    }

    async fn health(&self) -> Result<(), MetaError> {
        let slot_of = self.prefix.clone();
        self.run(|mut c| async move {
            c.query_in_slot_of::<String>(redis::cmd("PING"), &slot_of)
                .await
        })
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::meta::MetaStore;

    /// Runs the shared suite against the Redis that `tests/run.sh` starts
    /// (`PIER_TEST_REDIS_URL`).
    #[tokio::test]
    async fn redis_meta_passes_the_suite() {
        let Some(url) = crate::testenv::backend("PIER_TEST_REDIS_URL") else {
            return;
        };
        let prefix = format!("suite-{:x}:", rand::random::<u64>());
        let meta = super::RedisMeta::new(&url, &prefix, 4, Duration::from_secs(2)).unwrap();
        crate::meta::suite::run(&meta).await;
        crate::meta::suite::leases(&meta).await;
        crate::meta::suite::throttle(&meta).await;
        crate::meta::suite::uses_and_removals(&meta).await;
        crate::meta::suite::forgetting(&meta).await;
        crate::meta::suite::check_persisted(&meta).await;
        crate::meta::suite::jobs(&meta).await;
        crate::meta::suite::uploads(&meta).await;
        crate::meta::suite::console_figures(&meta).await;
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_an_error_within_the_deadline() {
        let meta =
            super::RedisMeta::new("redis://127.0.0.1:1", "x:", 2, Duration::from_millis(300))
                .unwrap();
        let started = std::time::Instant::now();
        assert!(meta.health().await.is_err());
        assert!(meta.tags("r").await.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
