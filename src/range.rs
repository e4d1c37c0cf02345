//! Single byte ranges from a `Range` header (`bytes=a-b`, `bytes=a-`,
//! `bytes=-n`), resolved against a blob's size.

/// A `Range` header as the client wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=a-b` (b inclusive) or `bytes=a-` (to the end).
    From { start: u64, end: Option<u64> },
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// Why a Range header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeError {
    /// Not a single `bytes=` range we can read.
    Malformed,
    /// Well-formed but outside the blob (`416`, `Content-Range: bytes */size`).
    Unsatisfiable,
}

/// An inclusive byte range inside a blob of known size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `Content-Range` header value.
    pub fn content_range(&self, total: u64) -> String {
        format!("bytes {}-{}/{}", self.start, self.end, total)
    }
}

impl RangeSpec {
    /// Parses a header value. `Ok(None)` means "serve the whole blob": a
    /// unit other than bytes is ignored, as RFC 9110 requires, and several
    /// ranges are answered in full, as it allows.
    pub fn parse(header: &str) -> Result<Option<RangeSpec>, RangeError> {
        let (unit, spec) = header.trim().split_once('=').ok_or(RangeError::Malformed)?;
        let (unit, spec) = (unit.trim(), spec.trim());
        // Units are tokens, compared without regard to case.
        if !unit.eq_ignore_ascii_case("bytes") {
            let token = !unit.is_empty()
                && unit
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c));
            return if token {
                Ok(None)
            } else {
                Err(RangeError::Malformed)
            };
        }
        if spec.contains(',') {
            return Ok(None);
        }
        let (a, b) = spec.split_once('-').ok_or(RangeError::Malformed)?;
        // Positions past u64 are past any blob: they saturate (a start
        // there is unsatisfiable, an end is cut to the blob), as RFC 9110
        // reads them, instead of being refused as malformed.
        let num = |s: &str| -> Result<u64, RangeError> {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                return Err(RangeError::Malformed);
            }
            Ok(s.parse().unwrap_or(u64::MAX))
        };
        if a.trim().is_empty() {
            return Ok(Some(RangeSpec::Suffix(num(b)?)));
        }
        let start = num(a)?;
        let end = if b.trim().is_empty() {
            None
        } else {
            Some(num(b)?)
        };
        if end.is_some_and(|e| e < start) {
            return Err(RangeError::Malformed);
        }
        Ok(Some(RangeSpec::From { start, end }))
    }

    /// The bytes this spec selects in a blob of `total` bytes.
    pub fn resolve(self, total: u64) -> Result<ByteRange, RangeError> {
        match self {
            RangeSpec::From { start, end } => {
                if start >= total {
                    return Err(RangeError::Unsatisfiable);
                }
                let end = end.map_or(total - 1, |e| e.min(total - 1));
                Ok(ByteRange { start, end })
            }
            RangeSpec::Suffix(0) => Err(RangeError::Unsatisfiable),
            RangeSpec::Suffix(n) => {
                if total == 0 {
                    return Err(RangeError::Unsatisfiable);
                }
                Ok(ByteRange {
                    start: total.saturating_sub(n),
                    end: total - 1,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_beyond_u64_saturate() {
        let huge = "99999999999999999999999";
        assert_eq!(r(&format!("bytes=0-{huge}"), 10), Ok(Some((0, 9))));
        assert_eq!(r(&format!("bytes=-{huge}"), 10), Ok(Some((0, 9))));
        assert_eq!(
            r(&format!("bytes={huge}-"), 10),
            Err(RangeError::Unsatisfiable)
        );
    }

    fn r(h: &str, total: u64) -> Result<Option<(u64, u64)>, RangeError> {
        match RangeSpec::parse(h)? {
            None => Ok(None),
            Some(s) => s.resolve(total).map(|b| Some((b.start, b.end))),
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(r("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(r("bytes=10-", 100), Ok(Some((10, 99))));
        assert_eq!(r("bytes=90-200", 100), Ok(Some((90, 99))));
        assert_eq!(r("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(r("bytes=-1000", 100), Ok(Some((0, 99))));
        assert_eq!(r("bytes=0-0,5-6", 100), Ok(None));
        assert_eq!(r("bytes=100-", 100), Err(RangeError::Unsatisfiable));
        assert_eq!(r("bytes=-0", 100), Err(RangeError::Unsatisfiable));
        // Units: case-insensitive; one that is not bytes means no range.
        assert_eq!(r("BYTES=0-1", 100), Ok(Some((0, 1))));
        assert_eq!(r("Bytes = 2-3", 100), Ok(Some((2, 3))));
        assert_eq!(r("items=0-1", 100), Ok(None));
        for bad in [
            "bytes=",
            "bytes=a-b",
            "bytes 0-1",
            "=0-1",
            "it ems=0-1",
            "bytes=5-1",
            "bytes=-",
            "bytes=1-2-3",
        ] {
            assert_eq!(r(bad, 100), Err(RangeError::Malformed), "{bad}");
        }
        assert_eq!(
            ByteRange { start: 2, end: 4 }.content_range(10),
            "bytes 2-4/10"
        );
    }
}
