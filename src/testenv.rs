//! Test-only: where the backends started by `tests/run.sh` listen.

/// The value of `var`, or `None` after saying the test is skipped. Under
/// `PIER_TEST_STRICT=1` (CI) a missing backend fails the test instead.
pub fn backend(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            let msg = format!("{var} is not set: run tests/run.sh, which starts the backends");
            assert!(
                std::env::var("PIER_TEST_STRICT").as_deref() != Ok("1"),
                "{msg}"
            );
            eprintln!("SKIPPED: {msg}");
            None
        }
    }
}
