//! `Range` headers resolved against any blob size: what resolves lies inside
//! the blob and has the length it claims.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pier::range::RangeSpec;

fuzz_target!(|input: (u64, &[u8])| {
    let (total, header) = input;
    let header = String::from_utf8_lossy(header);
    let Ok(Some(spec)) = RangeSpec::parse(&header) else {
        return;
    };
    if let RangeSpec::From {
        start,
        end: Some(end),
    } = spec
    {
        assert!(start <= end, "{header:?}");
    }
    if let Ok(r) = spec.resolve(total) {
        assert!(
            r.start <= r.end && r.end < total,
            "{header:?} {total}: {r:?}"
        );
        assert_eq!(r.len(), r.end - r.start + 1);
        if let RangeSpec::Suffix(n) = spec {
            assert_eq!(r.len(), n.min(total));
        }
    }
});
