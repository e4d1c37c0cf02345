//! The operator console's read side: what the mirror makes of a reference
//! (`explain`), and what the cache holds by repository (`repositories`).
//! Read-only, and never contacts an upstream.

mod explain;
mod repositories;

pub use explain::{Explanation, Reached, explain, reference_in};
pub use repositories::{RepoPage, TagInfo, repository, search};
