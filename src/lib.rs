//! Pier: a pull-through mirror for OCI / Docker registries.
//!
//! `rewrite` (`pier rewrite`: manifests pointed at the mirror) is pure and
//! reads only `config` and `reference`.
//!
//! `console` (the operator console's figures and views) reads through
//! `mirror` and `sync`'s image routing: `api → console → sync`. Its
//! `publish` writes each replica's share of the figures to `meta`, drained
//! from `telemetry::tally`, which `mirror` and `api` count into (like the
//! metrics, `telemetry` is a leaf anyone may call).
//!
//! Layering (who may call whom): `api → sync → mirror → {lifecycle,
//! upstream, storage, meta} → {reference, config}`, and `lifecycle →
//! {storage, meta}`. `sync` (prewarming: images brought in before anyone
//! pulls them, as jobs kept in `meta`) pulls through `mirror`, so its
//! fetches are a pull's. `route`, `range`, `rate` and
//! `descriptors` (what a manifest points at) are pure. `limits` (per-client
//! limits) sits beside `api`, which applies it; `zerocopy` (the client
//! connection and sendfile bodies) is a leaf that `storage` hands files to
//! and `api` builds bodies with. `lifecycle` keeps the cache within its
//! budget where storage alone cannot: shared recency of blobs and
//! manifests, how long each registry's content is kept, one fenced
//! eviction pass at a time over a bucket, and forgetting the metadata of
//! what is gone. `janitor` (periodic upkeep of
//! the stores) and `pins` (which blobs eviction spares) use `storage` and
//! `meta`. `tls` (HTTPS of Pier's own: certificates from files, reloaded
//! when they change) is a leaf `server` builds from `config`. `server`
//! wires the pieces together and owns the accept loop; nothing imports
//! `api`.

pub mod api;
pub mod config;
pub mod console;
pub mod descriptors;
pub mod janitor;
pub mod lifecycle;
pub mod limits;
pub mod meta;
pub mod mirror;
pub mod pins;
pub mod policy;
pub mod private;
pub mod range;
pub mod rate;
pub mod reference;
pub mod rewrite;
pub mod route;
pub mod server;
pub mod storage;
pub mod sync;
pub mod telemetry;
#[cfg(test)]
mod testenv;
pub mod tls;
pub mod upstream;
pub mod zerocopy;
