//! Pier: a pull-through mirror for OCI / Docker registries.
//!
//! Layering (who may call whom): `api → mirror → {upstream, storage, meta}
//! → {reference, config}`. `route` and `range` are pure. Nothing imports
//! `api`; `server` wires the pieces together.

pub mod api;
pub mod config;
pub mod limits;
pub mod meta;
pub mod mirror;
pub mod policy;
pub mod range;
pub mod rate;
pub mod reference;
pub mod route;
pub mod server;
pub mod storage;
pub mod telemetry;
#[cfg(test)]
mod testenv;
pub mod upstream;
pub mod zerocopy;
