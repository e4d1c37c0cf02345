//! What a request's log line says beyond its method, path and client: the
//! image it named, what the cache did and, for an error, what the client
//! was told. Handlers note these as they learn
//! them; the request middleware logs them once, at the end, and copies them
//! onto the request's span only when spans are exported.
//!
//! Recording them on the span as they came made the log layer format and
//! store every field again per record: the logging of a small cached
//! response cost more CPU than serving it.

use std::cell::RefCell;

tokio::task_local! {
    static NOTED: RefCell<Facts>;
}

#[derive(Debug, Default)]
pub struct Facts {
    pub registry: Option<String>,
    pub repository: Option<String>,
    pub reference: Option<String>,
    pub cache: Option<&'static str>,
    /// What the error response told the client.
    pub error: Option<String>,
}

/// Runs `request`, gathering what it notes.
pub async fn collect<F: Future>(request: F) -> (F::Output, Facts) {
    let mut scoped = std::pin::pin!(NOTED.scope(RefCell::default(), request));
    let out = scoped.as_mut().await;
    let facts = scoped
        .take_value()
        .map(RefCell::into_inner)
        .unwrap_or_default();
    (out, facts)
}

/// Outside [`collect`] (a spawned fetch, a test) notes go nowhere.
fn note(f: impl FnOnce(&mut Facts)) {
    let _ = NOTED.try_with(|noted| {
        if let Ok(mut facts) = noted.try_borrow_mut() {
            f(&mut facts);
        }
    });
}

pub fn note_target(registry: &str, repository: &str) {
    note(|f| {
        f.registry = Some(registry.to_owned());
        f.repository = Some(repository.to_owned());
    });
}

pub fn note_reference(reference: &str) {
    note(|f| f.reference = Some(reference.to_owned()));
}

pub fn note_cache(outcome: &'static str) {
    note(|f| f.cache = Some(outcome));
}

pub fn note_error(message: &str) {
    note(|f| f.error = Some(message.to_owned()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notes_reach_the_collector_and_nowhere_else() {
        note_cache("hit"); // outside: dropped, no panic
        let ((), facts) = collect(async {
            note_target("docker.io", "library/alpine");
            tokio::task::yield_now().await;
            note_reference("3.20");
            note_cache("miss");
            note_error("upstream unreachable");
        })
        .await;
        assert_eq!(facts.registry.as_deref(), Some("docker.io"));
        assert_eq!(facts.repository.as_deref(), Some("library/alpine"));
        assert_eq!(facts.reference.as_deref(), Some("3.20"));
        assert_eq!(facts.cache, Some("miss"));
        assert_eq!(facts.error.as_deref(), Some("upstream unreachable"));
        let (_, empty) = collect(async {}).await;
        assert!(empty.registry.is_none() && empty.cache.is_none());
    }
}
