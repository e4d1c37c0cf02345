//! `WWW-Authenticate` headers as an upstream (or anyone on the path) might
//! send them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pier::upstream::challenge::{Challenge, parse};

fuzz_target!(|data: &[u8]| {
    let header = String::from_utf8_lossy(data);
    let scheme = header.trim_start().to_ascii_lowercase();
    match parse(&header) {
        Some(Challenge::Bearer { realm, .. }) => {
            assert!(!realm.is_empty());
            assert!(scheme.starts_with("bearer"), "{header:?}");
        }
        Some(Challenge::Basic) => assert!(scheme.starts_with("basic"), "{header:?}"),
        None => {}
    }
});
