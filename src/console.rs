//! The operator console's read side: what the mirror makes of a reference
//! (`explain`), what the cache holds by repository (`repositories`) and by
//! image (`image`), the cluster's figures (`figures`) and what it is doing
//! now (`activity`), both from what each replica publishes to the metadata
//! store (`publish`, the one part that writes). It never contacts an
//! upstream.

mod activity;
mod explain;
mod figures;
mod image;
pub mod publish;
mod repositories;

pub use activity::{Activity, activity};
pub use explain::{Explanation, Reached, explain, reference_in};
pub use figures::{Stats, stats};
pub use image::{ImageView, image};
pub use repositories::{RepoNames, RepoPage, TagInfo, repository, search};
