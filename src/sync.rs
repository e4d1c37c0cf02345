//! Sync: images brought into the cache before anyone pulls them, through
//! the same mirror pulls use, so a blob synced and pulled at once is
//! fetched once across replicas.
//!
//! - `image`: images named as a client would pull them, routed and
//!   checked as pulls are.
//! - `platform`: which manifests of an index a list of platforms takes.
//! - `run`: syncing one image (`Syncer`).
//! - `job` and `jobs`: jobs kept in the metadata store, driven by whoever
//!   holds their lease, taken over when that replica dies.
//! - `lists`: `[[sync.images]]`, synced again every interval.
//! - `client` and `show`: `pier sync`, following a job on a server (or
//!   working on one here) with progress bars or lines.

mod client;
mod image;
mod job;
mod jobs;
mod lists;
mod platform;
mod run;
mod show;

pub use crate::reference::Platform;
pub use client::{ClientError, submit_and_follow};
pub use image::{ImageError, ImageRef, Routed, parse_image, route_image};
pub use job::{ImageJob, Job, State, is_id};
pub use jobs::{Jobs, MAX_IMAGES, Report, SubmitError, SyncRequest};
pub use lists::spawn as keep_lists_synced;
pub use platform::index_entries;
pub use run::{Progress, SyncError, Syncer};
pub use show::{Show, Shown, for_output, for_stderr, human};
