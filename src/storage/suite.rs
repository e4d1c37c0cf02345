//! The behaviour every `BlobStore` must show, run against each backend.

use std::path::Path;

use futures::TryStreamExt;

use super::{BlobStore, StorageError};
use crate::range::RangeSpec;
use crate::reference::Digest;

async fn read_all(store: &dyn BlobStore, d: &Digest, r: Option<RangeSpec>) -> Vec<u8> {
    let body = store.get(d, r).await.unwrap().unwrap();
    let want = body.len();
    let chunks: Vec<_> = body.stream.try_collect().await.unwrap();
    let bytes = chunks.concat();
    assert_eq!(bytes.len() as u64, want);
    bytes
}

/// Stores `data` the way a fetch does: from a spool file holding it.
pub async fn write(store: &dyn BlobStore, digest: &Digest, spool: &Path, data: &[u8]) {
    std::fs::write(spool, data).unwrap();
    store.store(digest, spool, data.len() as u64).await.unwrap();
}

pub async fn run(store: &dyn BlobStore, scratch: &Path) {
    std::fs::create_dir_all(scratch).unwrap();
    store.health().await.unwrap();
    let data: Vec<u8> = (0..700_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = Digest::sha256_of(&data);

    assert_eq!(store.stat(&digest).await.unwrap(), None);
    assert!(store.get(&digest, None).await.unwrap().is_none());

    // A spool of another length than the blob's is refused.
    let spool = scratch.join("spool");
    std::fs::write(&spool, &data[..300_000]).unwrap();
    let refused = store.store(&digest, &spool, data.len() as u64).await;
    assert!(refused.is_err());
    assert_eq!(store.stat(&digest).await.unwrap(), None);

    write(store, &digest, &spool, &data).await;
    assert_eq!(store.stat(&digest).await.unwrap(), Some(data.len() as u64));
    assert_eq!(read_all(store, &digest, None).await, data);

    let r = RangeSpec::From {
        start: 10,
        end: Some(99),
    };
    assert_eq!(read_all(store, &digest, Some(r)).await, &data[10..100]);
    let r = RangeSpec::From {
        start: 699_990,
        end: None,
    };
    assert_eq!(read_all(store, &digest, Some(r)).await, &data[699_990..]);
    assert_eq!(
        read_all(store, &digest, Some(RangeSpec::Suffix(5))).await,
        &data[data.len() - 5..]
    );
    let past_end = RangeSpec::From {
        start: 700_000,
        end: None,
    };
    assert!(matches!(
        store.get(&digest, Some(past_end)).await,
        Err(StorageError::Unsatisfiable { size: 700_000 })
    ));

    // Committing the same blob again is harmless.
    write(store, &digest, &spool, &data).await;
    assert_eq!(read_all(store, &digest, None).await, data);

    store.delete(&digest).await.unwrap();
    assert_eq!(store.stat(&digest).await.unwrap(), None);
    store.delete(&digest).await.unwrap();
}
