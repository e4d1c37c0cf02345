//! Config text plus `PIER_*` variables: errors name at least one problem,
//! and a config that loads can be printed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pier::config::Config;

fuzz_target!(|input: (&str, Vec<(String, String)>)| {
    let (text, vars) = input;
    let vars = vars.into_iter().map(|(k, v)| (format!("PIER_{k}"), v));
    match Config::from_toml(text, vars) {
        Ok(c) => {
            let printed = c.to_masked_toml();
            assert!(!printed.starts_with("# cannot print"), "{printed}");
        }
        Err(e) => assert!(!e.problems.is_empty()),
    }
});
