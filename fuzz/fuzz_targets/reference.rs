//! Repository names, tags, digests and references: any text, and what
//! parses prints back to itself.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pier::reference::{Digest, Reference, RepoName, Tag, is_path_component};

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(n) = RepoName::parse(&s) {
        assert_eq!(n.as_str(), s);
        assert!(n.as_str().len() <= pier::reference::MAX_NAME_LEN);
        assert!(n.components().all(is_path_component));
        assert_eq!(RepoName::parse(&n.to_string()), Ok(n));
    }
    if let Ok(t) = Tag::parse(&s) {
        assert_eq!(t.as_str(), s);
        assert_eq!(Tag::parse(&t.to_string()), Ok(t));
    }
    if let Ok(d) = Digest::parse(&s) {
        assert_eq!(d.to_string(), s);
        assert_eq!(s.parse::<Digest>(), Ok(d));
    }
    if let Ok(r) = Reference::parse(&s) {
        assert_eq!(Reference::parse(&r.to_string()), Ok(r));
    }
});
