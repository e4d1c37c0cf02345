//! Connections to Redis in each of its deployments: one server, a master
//! named by Sentinel, or a Redis Cluster, with TLS checked against the
//! public roots or a CA of the operator's. The pool hands out a
//! [`Conn`], which every command runs on the same way.
//!
//! After a Sentinel failover a pooled connection may still reach the old
//! master, now a replica that refuses writes: each connection is asked for
//! its `ROLE` before use and dropped unless it is the master, so the next
//! one is made to whichever master the sentinels name.

use deadpool::managed::{Metrics, RecycleError, RecycleResult};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use std::time::Duration;

use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline,
    RedisConnectionInfo, RedisError, RedisFuture, RedisResult, TlsCertificates, TlsMode, Value,
};

use crate::config::redis_url::{RedisTarget, Topology};

/// What connections are made from, and their deadlines.
pub struct Connector {
    source: Source,
    config: AsyncConnectionConfig,
}

enum Source {
    Single(Client),
    /// Asked for the master at every new connection.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    /// A cluster connection is multiplexed over one link per node and
    /// follows slot moves and failovers itself: every pooled handle is a
    /// clone of one.
    Cluster {
        client: redis::cluster::ClusterClient,
        shared: tokio::sync::Mutex<Option<ClusterConnection>>,
    },
}

/// Builds the connector for `target`; `ca` (PEM) replaces the public roots
/// for TLS, `sentinel_password` is the sentinels' own, and `timeout` bounds
/// each connection attempt and each command (the client's own defaults are
/// shorter than a `metadata.timeout` may be).
pub fn connector(
    target: &RedisTarget,
    ca: Option<Vec<u8>>,
    sentinel_password: Option<&str>,
    timeout: Duration,
) -> RedisResult<Connector> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let certs = || TlsCertificates {
        client_tls: None,
        root_cert: ca.clone(),
    };
    let addr = |(host, port): &(String, u16)| {
        if target.tls {
            ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.clone(), *port)
        }
    };
    let source = match &target.topology {
        Topology::Single { db } => {
            let info = addr(&target.hosts[0])
                .into_connection_info()?
                .set_redis_settings(settings(target, *db));
            let client = if target.tls && ca.is_some() {
                Client::build_with_tls(info, certs())?
            } else {
                Client::open(info)?
            };
            Source::Single(client)
        }
        Topology::Sentinel { master, db } => {
            let mut b = SentinelClientBuilder::new(
                target.hosts.iter().map(addr),
                master.clone(),
                SentinelServerType::Master,
            )?
            .set_client_to_redis_db(*db);
            if let Some(user) = &target.username {
                b = b.set_client_to_redis_username(user);
            }
            if let Some(pass) = &target.password {
                b = b.set_client_to_redis_password(pass);
            }
            if let Some(pass) = sentinel_password {
                b = b.set_client_to_sentinel_password(pass);
            }
            if target.tls {
                b = b
                    .set_client_to_redis_tls_mode(TlsMode::Secure)
                    .set_client_to_sentinel_tls_mode(TlsMode::Secure);
                if ca.is_some() {
                    b = b
                        .set_client_to_redis_certificates(certs())
                        .set_client_to_sentinel_certificates(certs());
                }
            }
            Source::Sentinel(tokio::sync::Mutex::new(b.build()?))
        }
        Topology::Cluster => {
            let seeds = target
                .hosts
                .iter()
                .map(|h| addr(h).into_connection_info())
                .collect::<RedisResult<Vec<_>>>()?;
            let mut b = ClusterClientBuilder::new(seeds)
                .connection_timeout(timeout)
                .response_timeout(timeout);
            if let Some(user) = &target.username {
                b = b.username(user);
            }
            if let Some(pass) = &target.password {
                b = b.password(pass);
            }
            if target.tls && ca.is_some() {
                b = b.certs(certs());
            }
            Source::Cluster {
                client: b.build()?,
                shared: tokio::sync::Mutex::new(None),
            }
        }
    };
    Ok(Connector { source, config })
}

fn settings(target: &RedisTarget, db: i64) -> RedisConnectionInfo {
    let mut s = RedisConnectionInfo::default().set_db(db);
    if let Some(user) = &target.username {
        s = s.set_username(user);
    }
    if let Some(pass) = &target.password {
        s = s.set_password(pass);
    }
    s
}

/// A connection from the pool, whichever kind of Redis it reaches.
pub enum Conn {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection on loan from the pool; it goes back when dropped.
pub struct Pooled(pub deadpool::managed::Object<Connector>);

impl Pooled {
    /// Runs `cmd`, which names no key, on the server that holds `key`'s
    /// slot: in a cluster, SCAN and PING would otherwise go to any node.
    pub async fn query_in_slot_of<T: redis::FromRedisValue>(
        &mut self,
        cmd: Cmd,
        key: &str,
    ) -> RedisResult<T> {
        match &mut *self.0 {
            Conn::Node(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = Route::with_key(key, SlotAddr::Master);
                let value = c
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                Ok(redis::from_redis_value(value)?)
            }
        }
    }
}

impl ConnectionLike for Pooled {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.0.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.0.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

impl deadpool::managed::Manager for Connector {
    type Type = Conn;
    type Error = RedisError;

    async fn create(&self) -> Result<Conn, RedisError> {
        match &self.source {
            Source::Single(client) => Ok(Conn::Node(
                client
                    .get_multiplexed_async_connection_with_config(&self.config)
                    .await?,
            )),
            Source::Sentinel(client) => Ok(Conn::Node(
                client
                    .lock()
                    .await
                    .get_async_connection_with_config(&self.config)
                    .await?,
            )),
            Source::Cluster { client, shared } => {
                let mut shared = shared.lock().await;
                if let Some(conn) = shared.as_ref() {
                    return Ok(Conn::Cluster(conn.clone()));
                }
                let conn = client.get_async_connection().await?;
                *shared = Some(conn.clone());
                Ok(Conn::Cluster(conn))
            }
        }
    }

    async fn recycle(&self, conn: &mut Conn, _: &Metrics) -> RecycleResult<RedisError> {
        match (&self.source, conn) {
            // Routing and reconnecting are the cluster connection's own.
            (Source::Cluster { .. }, _) => Ok(()),
            (Source::Sentinel(_), c) => match redis::cmd("ROLE").query_async(c).await? {
                redis::Role::Primary { .. } => Ok(()),
                _ => Err(RecycleError::message("no longer the master")),
            },
            (Source::Single(_), c) => {
                redis::cmd("PING").query_async::<()>(c).await?;
                Ok(())
            }
        }
    }
}
