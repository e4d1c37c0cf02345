//! Bytes read back from a store that Pier does not control (a bucket others
//! can write to, a disk that can rot) are checked as they stream: a whole
//! blob is hashed on its way to the client and its last chunk is held back
//! until every byte matched the digest and the length. A corrupted or
//! overwritten object therefore never reaches a client complete.

use std::io;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::reference::{Digest, Hasher};

struct Check<F> {
    inner: BoxStream<'static, io::Result<Bytes>>,
    hasher: Hasher,
    digest: Digest,
    /// The length it must have, when known.
    size: Option<u64>,
    received: u64,
    /// The latest chunk, sent once the next one arrives (or, for the last,
    /// once the whole blob matched).
    held: Option<Bytes>,
    /// Told once when the bytes turn out wrong.
    on_mismatch: Option<F>,
}

/// `stream`, which should carry the whole blob `digest` (of `size` bytes,
/// when known), ending in an error instead of its last chunk when it does
/// not.
pub fn verified<F>(
    stream: BoxStream<'static, io::Result<Bytes>>,
    digest: Digest,
    size: Option<u64>,
    on_mismatch: F,
) -> BoxStream<'static, io::Result<Bytes>>
where
    F: FnOnce() + Send + 'static,
{
    let check = Check {
        inner: stream,
        hasher: Hasher::new(digest.algorithm()),
        digest,
        size,
        received: 0,
        held: None,
        on_mismatch: Some(on_mismatch),
    };
    futures::stream::unfold(Some(check), |state| async move {
        let mut check = state?;
        loop {
            match check.inner.next().await {
                Some(Ok(chunk)) if chunk.is_empty() => continue,
                Some(Ok(chunk)) => {
                    check.received += chunk.len() as u64;
                    if check.size.is_some_and(|s| check.received > s) {
                        return Some((Err(check.mismatch()), None));
                    }
                    check.hasher.update(&chunk);
                    if let Some(previous) = check.held.replace(chunk) {
                        return Some((Ok(previous), Some(check)));
                    }
                }
                // A read that broke off is the store's failure, not proof
                // of corruption.
                Some(Err(e)) => return Some((Err(e), None)),
                None => {
                    let Check {
                        hasher,
                        digest,
                        size,
                        received,
                        held,
                        ..
                    } = &mut check;
                    let whole = size.is_none_or(|s| *received == s)
                        && std::mem::replace(hasher, Hasher::new(digest.algorithm())).finish()
                            == *digest;
                    if !whole {
                        return Some((Err(check.mismatch()), None));
                    }
                    return held.take().map(|last| (Ok(last), None));
                }
            }
        }
    })
    .boxed()
}

impl<F: FnOnce()> Check<F> {
    fn mismatch(&mut self) -> io::Error {
        if let Some(tell) = self.on_mismatch.take() {
            tell();
        }
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the bytes read for {} do not match it ({} bytes read)",
                self.digest, self.received
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> BoxStream<'static, io::Result<Bytes>> {
        let parts: Vec<io::Result<Bytes>> =
            parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        futures::stream::iter(parts).boxed()
    }

    async fn read(parts: &[&'static [u8]], claimed: &[u8], size: u64) -> (Vec<u8>, bool, usize) {
        let told = Arc::new(AtomicUsize::new(0));
        let t = told.clone();
        let stream = verified(
            chunks(parts),
            Digest::sha256_of(claimed),
            Some(size),
            move || {
                t.fetch_add(1, Ordering::Relaxed);
            },
        );
        let items: Vec<io::Result<Bytes>> = stream.collect().await;
        let failed = items.iter().any(|i| i.is_err());
        let bytes = items.into_iter().filter_map(Result::ok).flatten().collect();
        (bytes, failed, told.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn a_whole_matching_blob_passes() {
        let (bytes, failed, told) = read(&[b"abc", b"", b"def"], b"abcdef", 6).await;
        assert_eq!((bytes.as_slice(), failed, told), (&b"abcdef"[..], false, 0));
    }

    #[tokio::test]
    async fn wrong_bytes_never_come_out_whole() {
        // Same length, other bytes: the last chunk is withheld.
        let (bytes, failed, told) = read(&[b"abc", b"xyz"], b"abcdef", 6).await;
        assert_eq!((bytes.as_slice(), failed, told), (&b"abc"[..], true, 1));
        // Short, and too long.
        let (bytes, failed, told) = read(&[b"abc"], b"abcdef", 6).await;
        assert_eq!((bytes.len(), failed, told), (0, true, 1));
        let (bytes, failed, told) = read(&[b"abcdef", b"g"], b"abcdef", 6).await;
        assert_eq!((bytes.len(), failed, told), (0, true, 1));
    }
}
