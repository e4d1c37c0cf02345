//! Routing (Host header, name, `?ns=`) against the built-in upstreams plus
//! one of our own: never a panic, and only configured registries come out.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use pier::config::Config;
use pier::route::Router;

static CONFIG: LazyLock<Config> = LazyLock::new(|| {
    let text = "domains = [\"m.example\"]\n\
                [[upstreams]]\nregistry = \"corp.example\"\naliases = [\"corp\"]\n\
                endpoints = [\"http://127.0.0.1:1\"]\n\
                [[routes]]\npattern = \"team-*/**\"\nregistry = \"corp.example\"\n";
    match Config::from_toml(text, Vec::new()) {
        Ok(c) => c,
        Err(e) => panic!("fuzz config invalid: {e}"),
    }
});
static ROUTER: LazyLock<Router> = LazyLock::new(|| Router::new(&CONFIG));

fuzz_target!(|input: (Option<String>, String, Option<String>)| {
    let (host, name, ns) = input;
    if let Ok(t) = ROUTER.resolve(host.as_deref(), &name, ns.as_deref()) {
        assert!(CONFIG.upstream(&t.registry).is_some(), "{t:?}");
        assert!(t.repository.as_str().len() <= pier::reference::MAX_NAME_LEN);
        assert!(
            name.ends_with(t.repository.as_str())
                || t.repository
                    .as_str()
                    .strip_prefix("library/")
                    .is_some_and(|r| name.ends_with(r)),
            "{t:?} from {name:?}"
        );
    }
});
