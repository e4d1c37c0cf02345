use std::time::Duration;

use super::*;

fn load(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_toml(
        text,
        vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    )
}

#[test]
fn defaults_without_a_file() {
    let c = load("", &[]).unwrap();
    assert_eq!(c.listen.to_string(), "0.0.0.0:5000");
    assert_eq!(c.default_registry, "docker.io");
    assert!(matches!(&c.storage, StorageConfig::Fs { path } if path == Path::new("./data")));
    assert!(
        matches!(&c.metadata, MetadataConfig::Embedded { path } if path == Path::new("./data"))
    );
    let docker = c.upstream("docker.io").unwrap();
    assert_eq!(
        docker.endpoints[0].as_str(),
        "https://registry-1.docker.io/"
    );
    assert!(docker.aliases.contains(&"docker".to_owned()));
    for (registry, alias) in [
        ("gcr.io", "gcr"),
        ("ghcr.io", "ghcr"),
        ("registry.k8s.io", "k8s"),
        ("k8s.gcr.io", "k8s-gcr"),
        ("quay.io", "quay"),
        ("mcr.microsoft.com", "mcr"),
        ("nvcr.io", "nvcr"),
        ("docker.elastic.co", "elastic"),
    ] {
        assert_eq!(
            c.upstream(registry).unwrap().aliases,
            vec![alias.to_owned()]
        );
    }
    assert!(c.routes.iter().any(|r| r.pattern == "kube-*"));
}

#[test]
fn an_upstream_entry_overrides_only_what_it_sets() {
    let c = load(
        r#"
        [[upstreams]]
        registry = "docker.io"
        endpoints = ["http://127.0.0.1:5001"]
        tag_ttl = "30s"
        "#,
        &[],
    )
    .unwrap();
    let d = c.upstream("docker.io").unwrap();
    assert_eq!(d.endpoints[0].as_str(), "http://127.0.0.1:5001/");
    assert_eq!(d.tag_ttl, Duration::from_secs(30));
    assert_eq!(d.aliases, vec!["docker".to_owned(), "hub".to_owned()]);
}

#[test]
fn file_routes_come_before_builtin_ones() {
    let c = load(
        r#"
        [[routes]]
        pattern = "kube-special"
        registry = "quay.io"
        "#,
        &[],
    )
    .unwrap();
    assert_eq!(c.routes[0].pattern, "kube-special");
    assert!(c.routes.len() > 1);
}

#[test]
fn every_problem_is_named_by_key() {
    let err = load(
        r#"
        listen = "nope"
        log_format = "xml"
        default_registry = "nowhere.example"
        [storage]
        kind = "fs"
        bucket = "b"
        [[upstreams]]
        registry = "corp.example"
        endpoints = ["ftp://x"]
        [[upstreams]]
        registry = "other.example"
        [[routes]]
        pattern = "x"
        registry = "missing.example"
        "#,
        &[],
    )
    .unwrap_err();
    let all = err.problems.join("\n");
    for key in [
        "listen:",
        "log_format:",
        "default_registry:",
        "storage.bucket:",
        "upstreams[0] (corp.example).endpoints[0]:",
        "upstreams[1] (other.example).endpoints:",
        "routes[0].registry:",
    ] {
        assert!(all.contains(key), "{key} missing from:\n{all}");
    }
}

#[test]
fn unknown_keys_are_refused() {
    let err = load("lisen = \"0.0.0.0:1\"", &[]).unwrap_err();
    assert!(err.to_string().contains("lisen"), "{err}");
}

#[test]
fn environment_overrides_the_file() {
    let c = load(
        "listen = \"127.0.0.1:1\"",
        &[
            ("PIER_LISTEN", "127.0.0.1:2"),
            ("PIER_DOMAINS", "m.example.com, n.example.com"),
            ("PIER_STORAGE__PATH", "/var/lib/pier"),
            ("PIER_UPSTREAMS__DOCKER_IO__USERNAME", "u"),
            ("PIER_UPSTREAMS__DOCKER_IO__PASSWORD", "123456"),
            ("PIER_CONFIG", "ignored.toml"),
            // Kubernetes service links for a Service named `pier`.
            ("PIER_PORT", "tcp://10.0.0.1:5000"),
            ("PIER_SERVICE_HOST", "10.0.0.1"),
            ("PIER_PORT_5000_TCP_ADDR", "10.0.0.1"),
            ("HOME", "/root"),
        ],
    )
    .unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:2");
    assert_eq!(c.domains, vec!["m.example.com", "n.example.com"]);
    assert!(matches!(&c.storage, StorageConfig::Fs { path } if path == Path::new("/var/lib/pier")));
    // Embedded metadata follows the storage path.
    assert!(
        matches!(&c.metadata, MetadataConfig::Embedded { path } if path == Path::new("/var/lib/pier"))
    );
    let d = c.upstream("docker.io").unwrap();
    assert_eq!(d.username.as_deref(), Some("u"));
    assert_eq!(d.password.as_ref().unwrap().expose(), "123456");
}

#[test]
fn redis_metadata_settings() {
    let c = load(
        "[metadata]\nkind = \"redis\"\nurl = \"redis://:pw@127.0.0.1:6379\"",
        &[
            ("PIER_METADATA__POOL_SIZE", "8"),
            ("PIER_METADATA__TIMEOUT", "500ms"),
        ],
    )
    .unwrap();
    let MetadataConfig::Redis {
        url,
        cluster,
        tls_ca,
        sentinel_password,
        key_prefix,
        pool_size,
        timeout,
    } = &c.metadata
    else {
        panic!("{:?}", c.metadata);
    };
    assert_eq!(url.expose(), "redis://:pw@127.0.0.1:6379");
    assert!(!cluster && tls_ca.is_none() && sentinel_password.is_none());
    assert_eq!(key_prefix, "pier:");
    assert_eq!(*pool_size, 8);
    assert_eq!(*timeout, Duration::from_millis(500));
    assert!(!c.to_masked_toml().contains(":pw@"));
    let err = load("[metadata]\nkind = \"redis\"", &[]).unwrap_err();
    assert!(err.to_string().contains("metadata.url"), "{err}");
}

#[test]
fn acme_names_its_domains_and_defaults_to_lets_encrypt() {
    let c = load(
        "[storage]\npath = \"/srv/pier\"\n\
         [server.acme]\ndomains = [\"m.example.com\", \"docker.m.example.com\"]\n\
         contact = [\"mailto:ops@example.com\"]\n",
        &[],
    )
    .unwrap();
    let acme = c.server.acme.as_ref().unwrap();
    assert_eq!(acme.domains, ["m.example.com", "docker.m.example.com"]);
    assert_eq!(acme.directory, LETS_ENCRYPT);
    assert_eq!(acme.cache, Path::new("/srv/pier/acme"));
    assert!(c.to_masked_toml().contains("[server.acme]"));
    for (text, key) in [
        ("[server.acme]\ndomains = []\n", "server.acme.domains"),
        (
            "[server.acme]\ndomains = [\"*.m.example.com\"]\n",
            "server.acme.domains[0]",
        ),
        (
            "[server.acme]\ndomains = [\"m.example.com:443\"]\n",
            "server.acme.domains[0]",
        ),
        (
            "[server.acme]\ndomains = [\"m.example.com\"]\ncontact = [\"ops@example.com\"]\n",
            "server.acme.contact[0]",
        ),
        (
            "[server.acme]\ndomains = [\"m.example.com\"]\ndirectory = \"http://ca.example/dir\"\n",
            "server.acme.directory",
        ),
        (
            "[server]\ntls_cert = \"/c\"\ntls_key = \"/k\"\n[server.acme]\ndomains = [\"m.example.com\"]\n",
            "server.acme",
        ),
    ] {
        let all = load(text, &[]).unwrap_err().problems.join("\n");
        assert!(all.contains(key), "{key} not named in:\n{all}");
    }
}

#[test]
fn redis_sentinels_clusters_and_tls() {
    let c = load(
        "[metadata]\nkind = \"redis\"\nurl = \"rediss+sentinel://s1,s2/mymaster/1\"\n\
         tls_ca = \"/etc/pier/redis-ca.pem\"\nsentinel_password = \"sentinel-secret\"\n",
        &[],
    )
    .unwrap();
    let printed = c.to_masked_toml();
    assert!(
        printed.contains("tls_ca = \"/etc/pier/redis-ca.pem\""),
        "{printed}"
    );
    assert!(!printed.contains("sentinel-secret"), "{printed}");
    let c = load(
        "[metadata]\nkind = \"redis\"\nurl = \"redis://n1:7000\"\ncluster = true\n",
        &[],
    )
    .unwrap();
    assert!(matches!(
        c.metadata,
        MetadataConfig::Redis { cluster: true, .. }
    ));
    for (text, key, says) in [
        (
            "url = \"redis://h\"\ntls_ca = \"/ca.pem\"",
            "metadata.tls_ca",
            "rediss://",
        ),
        (
            "url = \"redis://h\"\nsentinel_password = \"x\"",
            "metadata.sentinel_password",
            "sentinel",
        ),
        ("url = \"redis+sentinel://s1\"", "metadata.url", "master"),
        ("url = \"memcached://h\"", "metadata.url", "scheme"),
    ] {
        let err = load(&format!("[metadata]\nkind = \"redis\"\n{text}\n"), &[]).unwrap_err();
        let all = err.problems.join("\n");
        assert!(all.contains(key) && all.contains(says), "{text}: {all}");
    }
    let err = load("[metadata]\ncluster = true\n", &[]).unwrap_err();
    assert!(err.to_string().contains("metadata.cluster"), "{err}");
}

#[test]
fn a_bad_environment_key_is_named() {
    let err = load("", &[("PIER_UPSTREAMS__NOWHERE__PASSWORD", "x")]).unwrap_err();
    assert!(
        err.to_string()
            .contains("PIER_UPSTREAMS__NOWHERE__PASSWORD"),
        "{err}"
    );
}

#[test]
fn secrets_are_masked_when_printed() {
    let c = load(
        r#"
        [[upstreams]]
        registry = "docker.io"
        username = "me"
        password = "hunter2"
        "#,
        &[],
    )
    .unwrap();
    let printed = c.to_masked_toml();
    assert!(!printed.contains("hunter2"));
    assert!(printed.contains("********"));
    assert!(!format!("{c:?}").contains("hunter2"));
    // The printed config loads again.
    load(&printed.replace("\"********\"", "\"x\""), &[]).unwrap();
}

#[test]
fn the_example_config_loads() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/pier.example.toml")).unwrap();
    load(&text, &[]).unwrap();
}

#[test]
fn server_limits_and_fetch_settings() {
    let c = load("", &[]).unwrap();
    assert_eq!(c.server.header_timeout, Duration::from_secs(30));
    assert_eq!(c.server.max_header_bytes, 64 * 1024);
    assert!(c.server.zero_copy);
    assert_eq!(c.limits.requests_per_second, 0, "limits are off by default");
    assert_eq!(c.fetch.max_concurrent, 64);
    assert_eq!(c.fetch.redirect_above, None);

    let c = load(
        "[limits]\nrequests_per_second = 20\nbytes_per_second = \"2MiB\"\n\
         [fetch]\nredirect_above = \"1GB\"\n[server]\nmax_header_bytes = 16384\n",
        &[
            ("PIER_SERVER__TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.1"),
            ("PIER_LIMITS__CONCURRENT_BLOBS", "4"),
            ("PIER_LIMITS__EXEMPT", "fd00::/8"),
            ("PIER_SERVER__ZERO_COPY", "false"),
        ],
    )
    .unwrap();
    assert_eq!(c.limits.burst, 20, "a burst is at least one second's worth");
    assert_eq!(c.limits.bytes_per_second, 2 << 20);
    assert_eq!(c.limits.concurrent_blobs, 4);
    assert_eq!(c.fetch.redirect_above, Some(1_000_000_000));
    assert_eq!(c.server.max_header_bytes, 16384);
    assert!(!c.server.zero_copy);
    let proxies: Vec<String> = c
        .server
        .trusted_proxies
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(proxies, ["10.0.0.0/8", "192.168.1.1/32"]);
    assert_eq!(c.limits.exempt[0].to_string(), "fd00::/8");

    let e = load(
        "[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\nmax_header_bytes = 100\n\
         [limits]\nbytes_per_second = \"fast\"\n[fetch]\nqueue_timeout = \"0s\"\n\
         max_blob_size = 0\nmin_rate = \"slow\"\nmin_rate_window = \"0s\"\n",
        &[],
    )
    .unwrap_err();
    let all = e.problems.join("\n");
    for key in [
        "server.trusted_proxies[0]",
        "server.max_header_bytes",
        "limits.bytes_per_second",
        "fetch.queue_timeout",
        "fetch.max_blob_size",
        "fetch.min_rate",
        "fetch.min_rate_window",
    ] {
        assert!(all.contains(key), "{key} not named in:\n{all}");
    }
}

#[test]
fn tls_takes_a_certificate_and_its_key_together() {
    let c = load(
        "[server]\ntls_cert = \"/etc/pier/tls.crt\"\ntls_key = \"/etc/pier/tls.key\"\n",
        &[],
    )
    .unwrap();
    let tls = c.server.tls.as_ref().unwrap();
    assert_eq!(tls.cert, Path::new("/etc/pier/tls.crt"));
    assert_eq!(tls.key, Path::new("/etc/pier/tls.key"));
    assert!(
        c.to_masked_toml()
            .contains("tls_key = \"/etc/pier/tls.key\"")
    );
    let from_env = load(
        "",
        &[
            ("PIER_SERVER__TLS_CERT", "/c"),
            ("PIER_SERVER__TLS_KEY", "/k"),
        ],
    );
    assert_eq!(from_env.unwrap().server.tls.unwrap().key, Path::new("/k"));
    assert!(load("", &[]).unwrap().server.tls.is_none());
    for (text, key) in [
        ("[server]\ntls_cert = \"/c\"\n", "server.tls_key"),
        ("[server]\ntls_key = \"/k\"\n", "server.tls_cert"),
    ] {
        let all = load(text, &[]).unwrap_err().problems.join("\n");
        assert!(all.contains(key), "{key} not named in:\n{all}");
    }
}

#[test]
fn cache_budget_and_free_space() {
    let d = load("", &[]).unwrap();
    assert_eq!(d.cache.max_size, None);
    assert_eq!(d.cache.min_free, crate::config::MinFree::Percent(10));
    let c = load(
        "[cache]\nmax_size = \"500GiB\"\nmin_free = \"20GiB\"\n",
        &[("PIER_CACHE__MIN_FREE", "15%")],
    )
    .unwrap();
    assert_eq!(c.cache.max_size, Some(500 << 30));
    assert_eq!(c.cache.min_free, crate::config::MinFree::Percent(15));
    assert_eq!(c.cache.min_free.bytes(1000), 150);
    // The bucket takes a budget too.
    let bucket = load(
        "[storage]\nkind = \"s3\"\nbucket = \"b\"\n[cache]\nmax_size = \"1TiB\"\nmax_age = \"30d\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(bucket.cache.max_size, Some(1 << 40));
    assert_eq!(bucket.cache.max_age, Some(Duration::from_secs(30 * 86_400)));
    let c = load("[cache]\nmin_free = \"20GiB\"\n", &[]).unwrap();
    assert_eq!(c.cache.min_free, crate::config::MinFree::Bytes(20 << 30));
    assert_eq!(
        (c.cache.scrub_interval, c.cache.scrub_rate),
        (None, 32 << 20)
    );
    let c = load(
        "[cache]\nscrub_interval = \"3h\"\n",
        &[("PIER_CACHE__SCRUB_RATE", "8MiB")],
    )
    .unwrap();
    assert_eq!(c.cache.scrub_interval, Some(Duration::from_secs(3 * 3600)));
    assert_eq!(c.cache.scrub_rate, 8 << 20);
    assert_eq!(c.cache.max_age, None);
    let c = load(
        "[cache]\nmax_age = \"30d\"\n",
        &[(
            "PIER_CACHE__PINNED",
            "docker.io/library/*,registry.k8s.io/**",
        )],
    )
    .unwrap();
    assert_eq!(c.cache.max_age, Some(Duration::from_secs(30 * 86_400)));
    assert_eq!(
        c.cache.pinned,
        ["docker.io/library/*", "registry.k8s.io/**"]
    );
    for (text, key) in [
        ("[cache]\nmax_size = 0\n", "cache.max_size"),
        ("[cache]\nmin_free = \"95%\"\n", "cache.min_free"),
        ("[cache]\nmin_free = \"lots\"\n", "cache.min_free"),
        ("[cache]\nscrub_interval = \"0s\"\n", "cache.scrub_interval"),
        ("[cache]\nscrub_rate = 0\n", "cache.scrub_rate"),
        ("[cache]\nmax_age = \"0s\"\n", "cache.max_age"),
        ("[cache]\npinned = [\"library/nginx\"]\n", "cache.pinned[0]"),
    ] {
        let e = load(text, &[]).unwrap_err().to_string();
        assert!(e.contains(key), "{text}: {e}");
    }
}

#[test]
fn a_registry_may_keep_its_content_for_an_age_of_its_own() {
    use super::MaxAge;
    let c = load(
        "[cache]\nmax_age = \"7d\"\n[[upstreams]]\nregistry = \"gcr.io\"\nmax_age = \"90d\"\n\
         [[upstreams]]\nregistry = \"registry.k8s.io\"\nmax_age = \"off\"\n",
        &[("PIER_UPSTREAMS__QUAY_IO__MAX_AGE", "1d")],
    )
    .unwrap();
    let age = |r: &str| {
        c.upstreams
            .iter()
            .find(|u| u.registry == r)
            .unwrap()
            .max_age
    };
    assert_eq!(
        age("gcr.io"),
        Some(MaxAge::After(Duration::from_secs(90 * 86_400)))
    );
    assert_eq!(age("registry.k8s.io"), Some(MaxAge::Off));
    assert_eq!(
        age("quay.io"),
        Some(MaxAge::After(Duration::from_secs(86_400)))
    );
    assert_eq!(age("docker.io"), None);
    let shown = c.to_masked_toml();
    assert!(shown.contains("max_age = \"90d\""), "{shown}");
    assert!(shown.contains("max_age = \"off\""), "{shown}");
    for bad in ["0s", "forever", ""] {
        let text = format!("[[upstreams]]\nregistry = \"gcr.io\"\nmax_age = \"{bad}\"\n");
        let e = load(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("upstreams[0] (gcr.io).max_age"), "{bad}: {e}");
    }
}

#[test]
fn fetch_bounds_have_generous_defaults_and_take_sizes() {
    let d = load("", &[]).unwrap();
    assert_eq!(d.fetch.max_blob_size, 100 << 30);
    assert_eq!(d.fetch.min_rate, 64 * 1024);
    assert_eq!(d.fetch.min_rate_window, Duration::from_secs(60));
    let c = load(
        "[fetch]\nmax_blob_size = \"2GiB\"\nmin_rate = 0\nmin_rate_window = \"5s\"\n",
        &[("PIER_FETCH__MIN_RATE", "1KiB")],
    )
    .unwrap();
    assert_eq!(c.fetch.max_blob_size, 2 << 30);
    assert_eq!(c.fetch.min_rate, 1024);
    assert_eq!(c.fetch.min_rate_window, Duration::from_secs(5));
}

#[test]
fn abandoned_upload_age() {
    let base = "[storage]\nkind = \"s3\"\nbucket = \"b\"\n";
    let age = |c: &Config| match &c.storage {
        StorageConfig::S3(s3) => s3.abandoned_upload_age,
        StorageConfig::Fs { .. } => panic!("not s3"),
    };
    assert_eq!(age(&load(base, &[]).unwrap()), Duration::from_secs(86_400));
    let c = load(
        &format!("{base}abandoned_upload_age = \"2h\"\n"),
        &[("PIER_STORAGE__ABANDONED_UPLOAD_AGE", "36h")],
    )
    .unwrap();
    assert_eq!(age(&c), Duration::from_secs(36 * 3600));
    // Zero would abort every upload in progress, on every replica.
    for (text, key_problem) in [
        (
            format!("{base}abandoned_upload_age = \"0s\"\n"),
            "longer than zero",
        ),
        (
            "[storage]\nabandoned_upload_age = \"1h\"\n".to_owned(),
            "only applies",
        ),
    ] {
        let e = load(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("storage.abandoned_upload_age"), "{e}");
        assert!(e.contains(key_problem), "{e}");
    }
}

#[test]
fn s3_local_cache_settings() {
    let base = "[storage]\nkind = \"s3\"\nbucket = \"b\"\nspool_path = \"/var/lib/pier/spool\"\n";
    let off = load(base, &[]).unwrap();
    let StorageConfig::S3(s3) = &off.storage else {
        panic!("not s3")
    };
    assert_eq!(s3.local_cache_size, 0);
    let on = load(
        &format!("{base}local_cache_path = \"/var/lib/pier/cache\"\n"),
        &[("PIER_STORAGE__LOCAL_CACHE_SIZE", "10Gi")],
    )
    .unwrap();
    let StorageConfig::S3(s3) = &on.storage else {
        panic!("not s3")
    };
    assert_eq!(s3.local_cache_size, 10 << 30);
    assert_eq!(s3.local_cache_path, Path::new("/var/lib/pier/cache"));

    // Inside the spool (emptied at startup) it would not survive a restart.
    let e = load(
        &format!("{base}local_cache_path = \"/var/lib/pier/spool/cache\"\n"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("storage.local_cache_path"), "{e}");
    // Also when the paths only meet once `..` and `.` are taken out.
    for cache in [
        "/var/lib/pier/cache/../spool/cache",
        "/var/lib/pier/./spool",
        "/var/lib/pier/spool/..",
    ] {
        let e = load(&format!("{base}local_cache_path = \"{cache}\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("storage.local_cache_path"), "{cache}: {e}");
    }
    let e = load(&format!("{base}local_cache_size = \"lots\"\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("storage.local_cache_size"), "{e}");
    let e = load("[storage]\nlocal_cache_size = \"1GiB\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("storage.local_cache_size"), "{e}");
}

#[test]
fn egress_refuse_adds_networks() {
    let c = load("", &[]).unwrap();
    assert!(
        c.egress.refuse.is_empty(),
        "only the built-in set by default"
    );

    let c = load(
        "[egress]\nrefuse = [\"10.0.0.0/8\", \"192.168.1.1\"]\n",
        &[],
    )
    .unwrap();
    let nets: Vec<String> = c.egress.refuse.iter().map(ToString::to_string).collect();
    assert_eq!(nets, ["10.0.0.0/8", "192.168.1.1/32"]);
    // Printed and loaded again unchanged.
    let again = load(&c.to_masked_toml(), &[]).unwrap();
    assert_eq!(again.egress.refuse, c.egress.refuse);

    // The environment replaces the file's list.
    let c = load(
        "[egress]\nrefuse = [\"10.0.0.0/8\"]\n",
        &[("PIER_EGRESS__REFUSE", "127.0.0.77/32, fd00::/8")],
    )
    .unwrap();
    let nets: Vec<String> = c.egress.refuse.iter().map(ToString::to_string).collect();
    assert_eq!(nets, ["127.0.0.77/32", "fd00::/8"]);

    let e = load(
        "[egress]\nrefuse = [\"10.0.0.0/8\", \"169.254.0.0/33\", \"metadata\"]\n",
        &[],
    )
    .unwrap_err();
    let all = e.problems.join("\n");
    assert!(all.contains("egress.refuse[1]"), "{all}");
    assert!(all.contains("egress.refuse[2]"), "{all}");
    assert!(!all.contains("egress.refuse[0]"), "{all}");
    let e = load("[egress]\nallow = []\n", &[]).unwrap_err();
    assert!(e.to_string().contains("allow"), "{e}");
}

#[test]
fn admin_and_sync_settings_are_checked() {
    let d = load("", &[]).unwrap();
    assert!(d.admin.token.is_none());
    assert_eq!(d.sync.max_concurrent, 4);
    assert_eq!(d.sync.retries, 3);
    assert_eq!(d.sync.retry_after, Duration::from_secs(300));
    let c = load(
        "[admin]\nallow_from = [\"10.0.0.0/8\"]\n[sync]\nmax_concurrent = 2\n\
         [[sync.images]]\nimage = \"docker.io/library/nginx\"\ntag_pattern = '^1\\.2[5-9]\\.'\n\
         platforms = [\"linux/arm64\"]\ninterval = \"1h\"\n\
         [[sync.images]]\nimage = \"registry.k8s.io/pause\"\ntags = [\"3.9\", \"3.10\"]\n",
        &[("PIER_ADMIN__TOKEN", "0123456789abcdef0123")],
    )
    .unwrap();
    assert_eq!(
        c.admin.token.as_ref().unwrap().expose(),
        "0123456789abcdef0123"
    );
    assert_eq!(c.admin.allow_from.len(), 1);
    assert_eq!(c.sync.max_concurrent, 2);
    assert_eq!(c.sync.images.len(), 2);
    assert_eq!(c.sync.images[0].interval, Duration::from_secs(3600));
    assert_eq!(c.sync.images[1].interval, Duration::from_secs(6 * 3600));
    // The token is never printed.
    assert!(!c.to_masked_toml().contains("0123456789abcdef"));
    for (text, key) in [
        ("[admin]\ntoken = \"short\"\n", "admin.token"),
        ("[admin]\nallow_from = [\"nowhere\"]\n", "admin.allow_from"),
        ("[sync]\nmax_concurrent = 0\n", "sync.max_concurrent"),
        ("[[sync.images]]\ntags = [\"1\"]\n", "sync.images[0].image"),
        ("[[sync.images]]\nimage = \"nginx\"\n", "sync.images[0]"),
        (
            "[[sync.images]]\nimage = \"nginx\"\ntags = [\"1\"]\ntag_pattern = \"1\"\n",
            "sync.images[0]",
        ),
        (
            "[[sync.images]]\nimage = \"nginx:1.25\"\ntags = [\"1\"]\n",
            "sync.images[0].image",
        ),
        (
            "[[sync.images]]\nimage = \"nginx\"\ntag_pattern = \"(\"\n",
            "tag_pattern",
        ),
        (
            "[[sync.images]]\nimage = \"nginx\"\ntags = [\"1\"]\nplatforms = [\"arm64\"]\n",
            "sync.images[0].platforms[0]",
        ),
    ] {
        let e = load(text, &[]).unwrap_err().to_string();
        assert!(e.contains(key), "{text}: {e}");
    }
}
