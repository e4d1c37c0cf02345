//! The operator console's read side: what the mirror makes of a reference
//! (`explain`), and what the cache holds by repository (`repositories`)
//! and by image (`image`).
//! Read-only, and never contacts an upstream.

mod explain;
mod image;
mod repositories;

pub use explain::{Explanation, Reached, explain, reference_in};
pub use image::{ImageView, image};
pub use repositories::{RepoPage, TagInfo, repository, search};
