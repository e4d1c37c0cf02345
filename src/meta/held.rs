//! A lease held while long work runs (an eviction pass, a forget pass, a
//! scrub, a sync job): renewed in the background, and known to be lost
//! once another process took it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::{MetaError, MetaStore};

pub struct Held {
    meta: Arc<dyn MetaStore>,
    name: String,
    holder: String,
    lost: Arc<AtomicBool>,
    renewing: JoinHandle<()>,
}

impl Held {
    /// Takes lease `name` for `holder`; `None` while another holds it.
    pub async fn take(
        meta: &Arc<dyn MetaStore>,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Held>, MetaError> {
        if meta.acquire_lease(name, holder, ttl).await?.is_some() {
            return Ok(None);
        }
        let lost = Arc::new(AtomicBool::new(false));
        let renewing = tokio::spawn({
            let (meta, name, holder, lost) = (
                meta.clone(),
                name.to_owned(),
                holder.to_owned(),
                lost.clone(),
            );
            async move {
                loop {
                    tokio::time::sleep(ttl / 4).await;
                    match meta.renew_lease(&name, &holder, ttl).await {
                        Ok(true) => {}
                        Ok(false) => {
                            lost.store(true, Ordering::Relaxed);
                            return;
                        }
                        Err(e) => tracing::warn!(lease = %name, error = %e, "cannot renew a lease"),
                    }
                }
            }
        });
        Ok(Some(Held {
            meta: meta.clone(),
            name: name.to_owned(),
            holder: holder.to_owned(),
            lost,
            renewing,
        }))
    }

    /// Whether another process holds the lease now.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    pub async fn release(self) {
        self.renewing.abort();
        if let Err(e) = self.meta.release_lease(&self.name, &self.holder).await {
            tracing::debug!(lease = %self.name, error = %e, "cannot release a lease; it will lapse");
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renewing.abort();
    }
}
