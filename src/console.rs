//! The operator console's read side: what the mirror makes of a reference
//! (`explain`). Read-only, and never contacts an upstream.

mod explain;

pub use explain::{Explanation, Reached, explain, reference_in};
