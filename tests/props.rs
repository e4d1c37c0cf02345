#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Property tests for the parsers that read what clients and upstreams send:
//! the reference grammar, routing, `Range` headers, `WWW-Authenticate`
//! challenges and the config file. Each parser must survive any input, and
//! what it accepts must round-trip and keep its invariants.

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use pier::config::{Config, MetadataConfig};
use pier::range::{ByteRange, RangeError, RangeSpec};
use pier::reference::{
    Algorithm, Digest, Hasher, MAX_NAME_LEN, Reference, RepoName, Tag, is_path_component,
};
use pier::route::{RouteError, Router, Target, glob_match};
use pier::upstream::challenge::{self, Challenge};
use proptest::prelude::*;

/// Enough to explore each grammar while the whole file runs in seconds.
const CASES: u32 = 256;
/// `Config::from_toml` is the slowest parser here.
const CONFIG_CASES: u32 = 64;

// ---------------------------------------------------------------------------
// Input generators

/// Any text: arbitrary unicode, or arbitrary bytes read lossily (as a header
/// or path that is not UTF-8 would reach a parser that expects text).
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\PC{0,40}",
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

/// Text over the characters the reference grammar cares about, so that
/// valid and nearly valid names both turn up often.
fn grammar_text() -> impl Strategy<Value = String> {
    "[a-z0-9._/A-Z:@%-]{0,24}"
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn component() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,6}((\\.|_|__|-{1,3})[a-z0-9]{1,6}){0,3}"
}

/// A valid repository name of 1-4 components, at most `max` bytes.
fn repo_name(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(component(), 1..5)
        .prop_map(|c| c.join("/"))
        .prop_filter("name too long", move |n| n.len() <= max)
}

/// A valid name whose first component does not look like a registry host
/// (no `.`, not `localhost`), as short names and Docker's mirrors send.
fn short_name(max: usize) -> impl Strategy<Value = String> {
    repo_name(max).prop_filter("first component looks like a host", |n| {
        let first = n.split('/').next().unwrap_or_default();
        !first.contains('.') && first != "localhost"
    })
}

fn valid_tag() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
}

fn valid_digest() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-f]{64}".prop_map(|h| format!("sha256:{h}")),
        "[0-9a-f]{128}".prop_map(|h| format!("sha512:{h}")),
    ]
}

// ---------------------------------------------------------------------------
// Independent oracles: the grammar restated another way.

/// A path component is lowercase alphanumerics and `._-`, starts and ends
/// alphanumeric, and its separator runs are `.`, `_`, `__` or dashes: no two
/// different separators touch, and no `..` or `___`.
fn component_oracle(c: &str) -> bool {
    let alnum = |ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit();
    let (Some(first), Some(last)) = (c.chars().next(), c.chars().last()) else {
        return false;
    };
    alnum(first)
        && alnum(last)
        && c.chars()
            .all(|ch| alnum(ch) || matches!(ch, '.' | '_' | '-'))
        && !["..", "___", ".-", "-.", "._", "_.", "_-", "-_"]
            .iter()
            .any(|bad| c.contains(bad))
}

fn name_oracle(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && s.split('/').all(component_oracle)
}

fn tag_oracle(s: &str) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    (1..=128).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && s.chars().all(ok)
}

fn digest_oracle(s: &str) -> bool {
    let hex =
        |h: &str, n: usize| h.len() == n && h.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'));
    s.strip_prefix("sha256:").is_some_and(|h| hex(h, 64))
        || s.strip_prefix("sha512:").is_some_and(|h| hex(h, 128))
}

// ---------------------------------------------------------------------------
// reference

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn reference_parsers_survive_anything(s in prop_oneof![any_text(), grammar_text()]) {
        if let Ok(n) = RepoName::parse(&s) {
            prop_assert_eq!(n.as_str(), s.as_str());
            prop_assert_eq!(RepoName::parse(&n.to_string()), Ok(n.clone()));
            prop_assert!(n.components().all(is_path_component));
        }
        if let Ok(t) = Tag::parse(&s) {
            prop_assert_eq!(t.as_str(), s.as_str());
            prop_assert_eq!(Tag::parse(&t.to_string()), Ok(t.clone()));
        }
        if let Ok(d) = Digest::parse(&s) {
            prop_assert_eq!(d.to_string(), s.clone());
            prop_assert_eq!(s.parse::<Digest>(), Ok(d.clone()));
        }
        if let Ok(r) = Reference::parse(&s) {
            prop_assert_eq!(Reference::parse(&r.to_string()), Ok(r.clone()));
        }
    }

    #[test]
    fn names_parse_exactly_when_the_grammar_says(s in grammar_text()) {
        prop_assert_eq!(RepoName::parse(&s).is_ok(), name_oracle(&s), "{:?}", s);
        for c in s.split('/') {
            prop_assert_eq!(is_path_component(c), component_oracle(c), "{:?}", c);
        }
    }

    #[test]
    fn valid_names_always_parse(s in repo_name(MAX_NAME_LEN)) {
        let n = RepoName::parse(&s).unwrap();
        prop_assert_eq!(n.to_string(), s.clone());
        prop_assert_eq!(n.components().collect::<Vec<_>>(), s.split('/').collect::<Vec<_>>());
    }

    #[test]
    fn names_over_255_bytes_are_refused(s in repo_name(usize::MAX), pad in 0usize..300) {
        // Any valid name padded past the limit with more valid components.
        let long = format!("{s}/{}", "a".repeat(MAX_NAME_LEN + pad));
        prop_assert!(RepoName::parse(&long).is_err());
    }

    #[test]
    fn tags_parse_exactly_when_the_grammar_says(s in prop_oneof![valid_tag(), grammar_text(), "[A-Za-z0-9._-]{120,135}"]) {
        prop_assert_eq!(Tag::parse(&s).is_ok(), tag_oracle(&s), "{:?}", s);
    }

    #[test]
    fn valid_tags_and_digests_round_trip(t in valid_tag(), d in valid_digest()) {
        let tag = Tag::parse(&t).unwrap();
        prop_assert_eq!(tag.to_string(), t.clone());
        prop_assert_eq!(Reference::parse(&t), Ok(Reference::Tag(tag)));

        let digest: Digest = d.parse().unwrap();
        prop_assert_eq!(digest.to_string(), d.clone());
        let (alg, hex) = d.split_once(':').unwrap();
        prop_assert_eq!(digest.algorithm().as_str(), alg);
        prop_assert_eq!(digest.hex(), hex);
        prop_assert_eq!(Reference::parse(&d), Ok(Reference::Digest(digest)));
    }

    #[test]
    fn digests_parse_exactly_when_the_grammar_says(
        s in prop_oneof![
            valid_digest(),
            // Wrong lengths, uppercase, other algorithms, stray separators.
            "(sha256|sha512|SHA256|md5|sha384|sha256\\+b64|):[0-9a-fA-F:]{60,68}",
            "(sha256|sha512):[0-9a-f]{124,132}",
            any_text(),
        ]
    ) {
        prop_assert_eq!(Digest::parse(&s).is_ok(), digest_oracle(&s), "{:?}", s);
    }

    #[test]
    fn a_digest_matches_exactly_its_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        split in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
    ) {
        let d = Digest::sha256_of(&bytes);
        prop_assert_eq!(d.algorithm(), Algorithm::Sha256);
        prop_assert_eq!(Digest::parse(&d.to_string()), Ok(d.clone()));
        prop_assert!(d.matches(&bytes));
        // Hashing in two pieces gives the same digest.
        let at = split.index(bytes.len() + 1);
        let mut h = Hasher::new(Algorithm::Sha256);
        h.update(&bytes[..at]);
        h.update(&bytes[at..]);
        prop_assert_eq!(h.finish(), d.clone());
        // One changed byte, or one byte more, does not match.
        let mut other = bytes.clone();
        if other.is_empty() {
            other.push(0);
        } else {
            let i = flip.index(other.len());
            other[i] ^= 1;
        }
        prop_assert!(!d.matches(&other));
    }
}

// ---------------------------------------------------------------------------
// route

const DOMAIN: &str = "m.example";

/// The built-in upstreams plus one of our own, in host-prefix mode.
fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        Config::from_toml(
            &format!(
                "domains = [\"{DOMAIN}\"]\n\
                 [[upstreams]]\nregistry = \"corp.example\"\naliases = [\"corp\"]\n\
                 endpoints = [\"http://127.0.0.1:1\"]\n\
                 [[routes]]\npattern = \"team-*/**\"\nregistry = \"corp.example\"\n"
            ),
            Vec::new(),
        )
        .unwrap()
    })
}

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| Router::new(config()))
}

/// (registry, one of its aliases) for every configured upstream.
fn upstream() -> impl Strategy<Value = (String, String)> {
    let pairs: Vec<(String, String)> = config()
        .upstreams
        .iter()
        .flat_map(|u| u.aliases.iter().map(|a| (u.registry.clone(), a.clone())))
        .collect();
    prop::sample::select(pairs)
}

/// What a registry's repository becomes: Docker Hub's one-component names
/// get `library/`.
fn expected(registry: &str, name: &str) -> Target {
    let repo = if registry == "docker.io" && !name.contains('/') {
        format!("library/{name}")
    } else {
        name.to_owned()
    };
    Target {
        registry: registry.to_owned(),
        repository: RepoName::parse(&repo).unwrap(),
    }
}

/// Host headers as clients send them: the bare domain, IPs, ports.
fn plain_host() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(DOMAIN.to_owned()),
        any::<u16>().prop_map(|p| format!("{DOMAIN}:{p}")),
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| format!("{}:{p}", Ipv4Addr::from(ip))),
        Just("[::1]:5000".to_owned()),
    ]
}

/// A host name that no upstream is configured for.
fn unconfigured_host() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,10}\\.(invalid|test|example\\.com)",
        any::<[u8; 4]>().prop_map(|ip| Ipv4Addr::from(ip).to_string()),
        (any::<[u8; 4]>(), 1u16..).prop_map(|(ip, p)| format!("{}:{p}", Ipv4Addr::from(ip))),
        Just("localhost".to_owned()),
        Just("169.254.169.254".to_owned()),
        Just("[::1]:5000".to_owned()),
    ]
    .prop_filter("configured", |h| config().upstream(h).is_none())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn routing_survives_anything_and_only_names_configured_registries(
        host in prop::option::of(prop_oneof![any_text(), plain_host(), "[a-z0-9.:\\[\\]-]{0,30}"]),
        name in prop_oneof![any_text(), grammar_text(), repo_name(MAX_NAME_LEN)],
        ns in prop::option::of(prop_oneof![any_text(), unconfigured_host(), upstream().prop_map(|u| u.0)]),
    ) {
        if let Ok(t) = router().resolve(host.as_deref(), &name, ns.as_deref()) {
            prop_assert!(config().upstream(&t.registry).is_some(), "{:?}", t);
            prop_assert!(t.repository.as_str().len() <= MAX_NAME_LEN);
            prop_assert_eq!(t.key(), format!("{}/{}", t.registry, t.repository));
            // The repository is the name, minus a registry prefix, plus
            // Docker Hub's `library/`.
            prop_assert!(
                name.ends_with(t.repository.as_str())
                    || t.repository.as_str() == format!("library/{name}")
                    || name.split_once('/').is_some_and(|(_, rest)| {
                        t.repository.as_str() == format!("library/{rest}")
                    }),
                "{:?} from {:?}", t, name
            );
        }
    }

    #[test]
    fn add_a_prefix_names_the_registry(
        (registry, _alias) in upstream(),
        name in repo_name(MAX_NAME_LEN - "library/".len()),
        host in plain_host(),
    ) {
        let path = format!("{registry}/{name}");
        prop_assert_eq!(
            router().resolve(Some(&host), &path, None),
            Ok(expected(&registry, &name))
        );
        // Docker Hub's other spellings mean docker.io.
        if registry == "docker.io" {
            for other in ["index.docker.io", "registry-1.docker.io", "REGISTRY.HUB.DOCKER.COM"] {
                prop_assert_eq!(
                    router().resolve(Some(&host), &format!("{other}/{name}"), None),
                    Ok(expected("docker.io", &name))
                );
            }
        }
    }

    #[test]
    fn host_prefix_and_ns_name_the_registry(
        (registry, alias) in upstream(),
        name in repo_name(MAX_NAME_LEN - "library/".len()),
        port in prop::option::of(any::<u16>()),
        upper in any::<bool>(),
    ) {
        let mut host = format!("{alias}.{DOMAIN}");
        if upper {
            host = host.to_ascii_uppercase();
        }
        if let Some(p) = port {
            host = format!("{host}:{p}");
        }
        let want = Ok(expected(&registry, &name));
        prop_assert_eq!(&router().resolve(Some(&host), &name, None), &want);
        prop_assert_eq!(&router().resolve(Some(&host), &name, Some(&registry)), &want);
        prop_assert_eq!(&router().resolve(Some("127.0.0.1:5000"), &name, Some(&registry)), &want);
        prop_assert_eq!(&router().resolve(None, &name, Some(&registry)), &want);
    }

    #[test]
    fn unconfigured_registries_are_refused(
        other in unconfigured_host(),
        name in repo_name(MAX_NAME_LEN - 40),
        host in prop::option::of(plain_host()),
    ) {
        // As `?ns=`, whatever the name and Host.
        prop_assert!(matches!(
            router().resolve(host.as_deref(), &name, Some(&other)),
            Err(RouteError::UnknownRegistry(_))
        ));
        // As the first path component, when it looks like a host.
        if other.contains('.') || other.contains(':') || other == "localhost" {
            let prefixed = format!("{other}/{name}");
            let refused = matches!(
                router().resolve(host.as_deref(), &prefixed, None),
                Err(RouteError::UnknownRegistry(_))
            );
            prop_assert!(refused, "{}", prefixed);
        }
    }

    #[test]
    fn unknown_aliases_are_refused(alias in "[a-z0-9]{1,12}", name in repo_name(64)) {
        prop_assume!(!config().upstreams.iter().any(|u| u.aliases.contains(&alias)));
        let host = format!("{alias}.{DOMAIN}");
        let refused = matches!(
            router().resolve(Some(&host), &name, None),
            Err(RouteError::UnknownAlias { .. })
        );
        prop_assert!(refused);
    }

    #[test]
    fn short_names_follow_the_first_matching_route(name in short_name(MAX_NAME_LEN - "library/".len())) {
        let registry = config()
            .routes
            .iter()
            .find(|r| glob_match(&r.pattern, &name))
            .map_or(config().default_registry.as_str(), |r| r.registry.as_str());
        prop_assert_eq!(
            router().resolve(Some(DOMAIN), &name, None),
            Ok(expected(registry, &name))
        );
    }

    #[test]
    fn globs_respect_component_boundaries(name in prop_oneof![repo_name(64), grammar_text()]) {
        let literal = name.replace('*', "");
        prop_assert!(glob_match(&literal, &literal));
        prop_assert!(glob_match("**", &name));
        prop_assert_eq!(glob_match("*", &name), !name.contains('/'));
        prop_assert_eq!(glob_match("*/**", &name), name.contains('/'));
        if let Some((first, _)) = name.split_once('/') {
            let (all_below, one_below) = (format!("{first}/**"), format!("{first}/*"));
            prop_assert!(glob_match(&all_below, &name));
            let deeper = format!("{name}/x/y");
            prop_assert!(!glob_match(&one_below, &deeper));
        }
    }
}

// ---------------------------------------------------------------------------
// range

/// The largest position written here with its own digits; larger ones
/// (any number of digits) saturate to u64::MAX.
const MAX_WRITTEN: u64 = 9_999_999_999_999_999_999;

/// Range specs as a client could write them.
fn range_spec() -> impl Strategy<Value = RangeSpec> {
    let edge = prop_oneof![
        0u64..1000,
        Just(MAX_WRITTEN),
        Just(MAX_WRITTEN - 1),
        0..=MAX_WRITTEN
    ];
    prop_oneof![
        (edge.clone(), prop::option::of(edge.clone())).prop_map(|(start, end)| {
            RangeSpec::From {
                start,
                end: end.map(|e| e.max(start)),
            }
        }),
        edge.clone().prop_map(RangeSpec::Suffix),
    ]
}

fn blob_size() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..2000, Just(u64::MAX), any::<u64>()]
}

fn header_for(spec: RangeSpec) -> String {
    match spec {
        RangeSpec::From { start, end: None } => format!("bytes={start}-"),
        RangeSpec::From {
            start,
            end: Some(end),
        } => format!("bytes={start}-{end}"),
        RangeSpec::Suffix(n) => format!("bytes=-{n}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn range_headers_survive_anything(
        h in prop_oneof![any_text(), "(bytes|BYTES|items| bytes)=[0-9 ,-]{0,30}", "bytes=[0-9]{15,25}-[0-9]{0,25}"],
        total in blob_size(),
    ) {
        match RangeSpec::parse(&h) {
            Ok(Some(spec)) => {
                if let RangeSpec::From { start, end: Some(end) } = spec {
                    prop_assert!(start <= end);
                }
                if let Ok(r) = spec.resolve(total) {
                    prop_assert!(r.start <= r.end && r.end < total, "{:?} in {}", r, total);
                }
            }
            // The whole blob: several ranges, or a unit that is not bytes.
            Ok(None) => {
                let unit = h.split('=').next().unwrap_or_default().trim();
                prop_assert!(h.contains(',') || !unit.eq_ignore_ascii_case("bytes"), "{h:?}");
            }
            Err(_) => {}
        }
    }

    #[test]
    fn written_ranges_parse_back(spec in range_spec(), pad in "[ ]{0,2}") {
        let h = header_for(spec);
        prop_assert_eq!(RangeSpec::parse(&h), Ok(Some(spec)));
        prop_assert_eq!(RangeSpec::parse(&format!("{pad}{h}{pad}")), Ok(Some(spec)));
    }

    #[test]
    fn resolved_ranges_lie_inside_the_blob(spec in range_spec(), total in blob_size()) {
        let got = spec.resolve(total);
        let want = match spec {
            RangeSpec::From { start, .. } if start >= total => Err(RangeError::Unsatisfiable),
            RangeSpec::From { start, end } => Ok(ByteRange {
                start,
                end: end.unwrap_or(u64::MAX).min(total - 1),
            }),
            RangeSpec::Suffix(n) if n == 0 || total == 0 => Err(RangeError::Unsatisfiable),
            RangeSpec::Suffix(n) => Ok(ByteRange { start: total - n.min(total), end: total - 1 }),
        };
        prop_assert_eq!(got, want);
        if let Ok(r) = got {
            prop_assert!(r.end < total);
            prop_assert!((1..=total).contains(&r.len()));
            prop_assert_eq!(r.len(), r.end - r.start + 1);
            match spec {
                RangeSpec::Suffix(n) => prop_assert_eq!(r.len(), n.min(total)),
                RangeSpec::From { start, end } => prop_assert_eq!(
                    r.len(),
                    end.unwrap_or(u64::MAX).min(total - 1) - start + 1
                ),
            }
            prop_assert_eq!(
                r.content_range(total),
                format!("bytes {}-{}/{}", r.start, r.end, total)
            );
            // The resolved range, written back as a header, selects itself.
            if r.end <= MAX_WRITTEN {
                let again = RangeSpec::parse(&format!("bytes={}-{}", r.start, r.end));
                prop_assert_eq!(again.map(|s| s.map(|s| s.resolve(total))), Ok(Some(Ok(r))));
            }
        }
    }

    #[test]
    fn positions_past_u64_are_past_every_blob(big in "[1-9][0-9]{20,40}", total in 1u64..u64::MAX) {
        let parse = |h: String| RangeSpec::parse(&h).map(|s| s.map(|s| s.resolve(total)));
        prop_assert_eq!(parse(format!("bytes={big}-")), Ok(Some(Err(RangeError::Unsatisfiable))));
        let whole = ByteRange { start: 0, end: total - 1 };
        prop_assert_eq!(parse(format!("bytes=0-{big}")), Ok(Some(Ok(whole))));
        prop_assert_eq!(parse(format!("bytes=-{big}")), Ok(Some(Ok(whole))));
    }

    #[test]
    fn several_ranges_mean_the_whole_blob(a in range_spec(), b in range_spec()) {
        let h = format!("{}, {}", header_for(a), header_for(b).trim_start_matches("bytes="));
        prop_assert_eq!(RangeSpec::parse(&h), Ok(None));
    }

    #[test]
    fn other_units_are_ignored_and_backwards_ranges_are_malformed(
        unit in "[a-zA-Z]{1,8}",
        a in 1u64..=MAX_WRITTEN,
        d in 1u64..1000,
    ) {
        let want = if unit.eq_ignore_ascii_case("bytes") { Ok(Some(RangeSpec::From { start: 0, end: Some(1) })) } else { Ok(None) };
        prop_assert_eq!(RangeSpec::parse(&format!("{unit}=0-1")), want);
        let backwards = format!("bytes={a}-{}", a.saturating_sub(d));
        prop_assert_eq!(RangeSpec::parse(&backwards), Err(RangeError::Malformed));
    }
}

// ---------------------------------------------------------------------------
// challenge

/// A quoted-string with `"` and `\` escaped.
fn quoted(v: &str) -> String {
    let mut out = String::from("\"");
    for c in v.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Parameter values: URLs and scopes as registries send them, and anything.
fn param_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "https://[a-z.]{1,20}(:[0-9]{1,5})?/[a-z/]{0,10}",
        "repository:[a-z0-9/]{1,20}:(pull|pull,push)",
        any::<String>(),
        "[ ,=\"\\\\a-z]{0,12}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn challenges_survive_anything(h in prop_oneof![
        any_text(),
        "(Bearer|Basic|bearer|Negotiate) [a-z=\", \\\\]{0,30}",
    ]) {
        match challenge::parse(&h) {
            Some(Challenge::Bearer { realm, .. }) => {
                prop_assert!(!realm.is_empty());
                prop_assert!(h.trim_start().to_ascii_lowercase().starts_with("bearer"));
            }
            Some(Challenge::Basic) => {
                prop_assert!(h.trim_start().to_ascii_lowercase().starts_with("basic"));
            }
            None => {}
        }
    }

    #[test]
    fn bearer_challenges_parse_back(
        scheme in prop::sample::select(vec!["Bearer", "bearer", "BEARER"]),
        realm in param_value().prop_filter("realm is required", |r| !r.is_empty()),
        service in prop::option::of(param_value()),
        scope in prop::option::of(param_value()),
        extra in prop::collection::vec(("(error|charset|x[a-z]{0,5})", param_value()), 0..3),
        order in any::<prop::sample::Index>(),
        sep in prop::sample::select(vec![",", ", ", " ,  "]),
        key_case in any::<bool>(),
    ) {
        let key = |k: &str| if key_case { k.to_ascii_uppercase() } else { k.to_owned() };
        let mut params = vec![format!("{}={}", key("realm"), quoted(&realm))];
        if let Some(s) = &service {
            params.push(format!("{}={}", key("service"), quoted(s)));
        }
        if let Some(s) = &scope {
            params.push(format!("{}={}", key("scope"), quoted(s)));
        }
        for (k, v) in &extra {
            params.push(format!("{k}={}", quoted(v)));
        }
        let first = order.index(params.len());
        params.rotate_left(first);
        let header = format!("{scheme} {}", params.join(sep));
        prop_assert_eq!(
            challenge::parse(&header),
            Some(Challenge::Bearer { realm, service, scope }),
            "{}", header
        );
    }

    #[test]
    fn bare_token_values_parse_back(
        realm in "[A-Za-z0-9:/._~+-]{1,30}",
        service in "[A-Za-z0-9:/._~+-]{1,30}",
    ) {
        let header = format!("Bearer realm={realm},service={service}");
        prop_assert_eq!(
            challenge::parse(&header),
            Some(Challenge::Bearer { realm, service: Some(service), scope: None })
        );
    }

    #[test]
    fn basic_and_unknown_schemes(rest in any_text(), scheme in "[A-Za-z]{1,10}") {
        prop_assert_eq!(challenge::parse(&format!("Basic {rest}")), Some(Challenge::Basic));
        prop_assert_eq!(challenge::parse(&format!("bAsIc {rest}")), Some(Challenge::Basic));
        let lower = scheme.to_ascii_lowercase();
        prop_assume!(lower != "basic" && lower != "bearer");
        prop_assert_eq!(challenge::parse(&format!("{scheme} {rest}")), None);
    }
}

// ---------------------------------------------------------------------------
// config

const EXAMPLE: &str = include_str!("../pier.example.toml");

/// One edit to a valid config: delete, insert or replace a stretch of it.
#[derive(Clone, Debug)]
enum Edit {
    Delete(prop::sample::Index, usize),
    Insert(prop::sample::Index, String),
    Replace(prop::sample::Index, String),
    DuplicateLine(prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let snippet = prop_oneof![
        any_text(),
        "[\\[\\]=\"'{},.#\n a-z0-9_-]{1,12}",
        prop::sample::select(vec![
            "[[upstreams]]\n",
            "[storage]\n",
            "kind = \"s3\"\n",
            "= \"\"",
            "\"\"\"",
            "[[routes]]\npattern = \"**\"\n",
            "endpoints = [\"http://[::1]:0\"]\n",
            "tag_ttl = \"0s\"\n",
            "tag_ttl = \"99999999999999999999y\"\n",
            "pool_size = -1\n",
            "1e999",
        ])
        .prop_map(str::to_owned),
    ];
    prop_oneof![
        (any::<prop::sample::Index>(), 1usize..40).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<prop::sample::Index>(), snippet.clone()).prop_map(|(i, s)| Edit::Insert(i, s)),
        (any::<prop::sample::Index>(), snippet).prop_map(|(i, s)| Edit::Replace(i, s)),
        any::<prop::sample::Index>().prop_map(Edit::DuplicateLine),
    ]
}

fn apply(text: &str, edit: &Edit) -> String {
    let chars: Vec<char> = text.chars().collect();
    let at = |i: &prop::sample::Index| i.index(chars.len() + 1);
    let join = |a: &[char], mid: &str, b: &[char]| {
        a.iter().collect::<String>() + mid + &b.iter().collect::<String>()
    };
    match edit {
        Edit::Delete(i, n) => {
            let start = at(i);
            let end = (start + n).min(chars.len());
            join(&chars[..start], "", &chars[end..])
        }
        Edit::Insert(i, s) => {
            let p = at(i);
            join(&chars[..p], s, &chars[p..])
        }
        Edit::Replace(i, s) => {
            let p = at(i);
            let end = (p + s.chars().count()).min(chars.len());
            join(&chars[..p], s, &chars[end..])
        }
        Edit::DuplicateLine(i) => {
            let lines: Vec<&str> = text.lines().collect();
            let k = i
                .index(lines.len().max(1))
                .min(lines.len().saturating_sub(1));
            let mut out: Vec<&str> = lines.clone();
            if let Some(l) = lines.get(k) {
                out.insert(k, l);
            }
            out.join("\n")
        }
    }
}

/// `PIER_*` variables, some naming keys and some not.
fn env_vars() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop_oneof![
        prop::sample::select(vec![
            "PIER_LISTEN",
            "PIER_DOMAINS",
            "PIER_STORAGE__KIND",
            "PIER_METADATA__POOL_SIZE",
            "PIER_UPSTREAMS__DOCKER_IO__PASSWORD",
            "PIER_UPSTREAMS__DOCKER_IO__ENDPOINTS",
            "PIER_BUILTIN_UPSTREAMS",
            "PIER_",
            "PIER___",
            "PIER_PORT",
        ])
        .prop_map(str::to_owned),
        "PIER_[A-Z_]{0,30}",
        any::<String>().prop_map(|s| format!("PIER_{s}")),
    ];
    prop::collection::vec((name, any_text()), 0..4)
}

/// Lists the config says nothing invalid about: host names, aliases, URLs.
fn valid_config() -> impl Strategy<Value = (String, String, String, u16)> {
    (
        "[a-z][a-z0-9]{0,8}(\\.[a-z][a-z0-9]{0,8}){1,2}",
        "[a-z][a-z0-9]{0,8}\\.example",
        "x[a-z0-9]{0,8}",
        1u16..,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CONFIG_CASES))]

    #[test]
    fn config_survives_arbitrary_text(text in prop_oneof![any_text(), "[\\[\\]=\"a-z_. \n0-9]{0,80}"], vars in env_vars()) {
        if let Err(e) = Config::from_toml(&text, vars) {
            prop_assert!(!e.problems.is_empty());
        }
    }

    #[test]
    fn config_survives_mutations_of_the_example(
        edits in prop::collection::vec(edit(), 1..4),
        vars in env_vars(),
    ) {
        let text = edits.iter().fold(EXAMPLE.to_owned(), |t, e| apply(&t, e));
        match Config::from_toml(&text, vars) {
            Ok(c) => {
                // What `check-config` prints is itself a valid config (when
                // no masked secret has to be valid, as a Redis URL must).
                let printed = c.to_masked_toml();
                if matches!(c.metadata, MetadataConfig::Embedded { .. }) {
                    let again = Config::from_toml(&printed, Vec::new());
                    prop_assert!(again.is_ok(), "{:?}\n{}", again.err(), printed);
                }
            }
            Err(e) => prop_assert!(!e.problems.is_empty()),
        }
    }

    #[test]
    fn valid_configs_load_and_print_back(
        (domain, registry, alias, port) in valid_config(),
        ttl in 1u64..100_000,
    ) {
        prop_assume!(config().upstream(&registry).is_none());
        let text = format!(
            "domains = [\"{domain}\"]\n\
             [[upstreams]]\nregistry = \"{registry}\"\naliases = [\"{alias}\"]\n\
             endpoints = [\"http://127.0.0.1:{port}\"]\ntag_ttl = \"{ttl}s\"\n"
        );
        let c = Config::from_toml(&text, Vec::new()).unwrap();
        prop_assert_eq!(&c.domains, &vec![domain.clone()]);
        let u = c.upstream(&registry).unwrap();
        prop_assert_eq!(&u.aliases, &vec![alias.clone()]);
        prop_assert_eq!(u.endpoints[0].as_str(), format!("http://127.0.0.1:{port}/"));
        prop_assert_eq!(u.tag_ttl.as_secs(), ttl);
        // Printed and loaded again, it is the same configuration.
        let again = Config::from_toml(&c.to_masked_toml(), Vec::new()).unwrap();
        prop_assert_eq!(&again.domains, &c.domains);
        prop_assert_eq!(&again.default_registry, &c.default_registry);
        let u2 = again.upstream(&registry).unwrap();
        prop_assert_eq!(&u2.aliases, &u.aliases);
        prop_assert_eq!(&u2.endpoints, &u.endpoints);
        prop_assert_eq!(u2.tag_ttl, u.tag_ttl);
        // And the router it makes sends the alias there.
        let router = Router::new(&c);
        let got = router.resolve(Some(&format!("{alias}.{domain}")), "a/b", None);
        prop_assert_eq!(got.map(|t| t.registry), Ok(registry.clone()));
    }
}
