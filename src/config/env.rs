//! `PIER_*` environment overrides, applied to the parsed file before it is
//! typed. `__` separates nesting levels: `PIER_STORAGE__PATH` sets
//! `[storage] path`, `PIER_UPSTREAMS__DOCKER_IO__PASSWORD` sets `password` of
//! the docker.io upstream (its registry name upper-cased, non-alphanumerics
//! as `_`). `PIER_CONFIG` names the file and is not a key.

use toml::{Table, Value};

use super::ConfigError;
use super::builtin::builtin_upstreams;

/// Keys whose values are comma-separated lists.
const LIST_KEYS: &[&str] = &["domains", "aliases", "endpoints"];
/// Keys whose values are booleans.
const BOOL_KEYS: &[&str] = &["path_style", "builtin_upstreams"];

pub fn apply(
    table: &mut Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    let mut vars: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(k, _)| k.starts_with("PIER_") && k != "PIER_CONFIG")
        .collect();
    // Deterministic order, whatever the process environment's order is.
    vars.sort();
    for (name, raw) in vars {
        let path: Vec<String> = name["PIER_".len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if let Err(p) = set(table, &path, &raw) {
            problems.push(format!("{name}: {p}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError { problems })
    }
}

fn set(table: &mut Table, path: &[String], raw: &str) -> Result<(), String> {
    match path {
        [key] if key.is_empty() => Err("empty key".into()),
        [key] => {
            table.insert(key.clone(), typed(key, raw)?);
            Ok(())
        }
        [section, registry, key] if section == "upstreams" => {
            let entry = upstream_entry(table, registry)?;
            entry.insert(key.clone(), typed(key, raw)?);
            Ok(())
        }
        [section, rest @ ..] if section != "upstreams" && section != "routes" => {
            let sub = table
                .entry(section.clone())
                .or_insert_with(|| Value::Table(Table::new()));
            match sub {
                Value::Table(t) => set(t, rest, raw),
                _ => Err(format!("{section} is not a table")),
            }
        }
        _ => Err("not a configuration key (see `pier check-config`)".into()),
    }
}

/// The `[[upstreams]]` entry for the registry spelled `key` (`docker_io`),
/// created for a built-in registry the file does not mention.
fn upstream_entry<'t>(table: &'t mut Table, key: &str) -> Result<&'t mut Table, String> {
    let upstreams = table
        .entry("upstreams")
        .or_insert_with(|| Value::Array(Vec::new()));
    let Value::Array(list) = upstreams else {
        return Err("upstreams is not an array".into());
    };
    let registry_of = |v: &Value| {
        v.get("registry")
            .and_then(Value::as_str)
            .map(env_key)
            .unwrap_or_default()
    };
    let index = match list.iter().position(|v| registry_of(v) == key) {
        Some(i) => i,
        None => {
            let builtin = builtin_upstreams()
                .into_iter()
                .find(|u| env_key(&u.registry) == key)
                .ok_or_else(|| format!("no upstream registry matches {key:?}"))?;
            let mut t = Table::new();
            t.insert("registry".into(), Value::String(builtin.registry));
            list.push(Value::Table(t));
            list.len() - 1
        }
    };
    match list.get_mut(index) {
        Some(Value::Table(t)) => Ok(t),
        _ => Err("upstreams entry is not a table".into()),
    }
}

/// `docker.io` → `docker_io`, the lower-cased form of an env variable part.
fn env_key(registry: &str) -> String {
    registry
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn typed(key: &str, raw: &str) -> Result<Value, String> {
    if LIST_KEYS.contains(&key) {
        return Ok(Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        ));
    }
    if BOOL_KEYS.contains(&key) {
        return match raw.trim() {
            "true" | "1" => Ok(Value::Boolean(true)),
            "false" | "0" => Ok(Value::Boolean(false)),
            other => Err(format!("expected true or false, got {other:?}")),
        };
    }
    Ok(Value::String(raw.to_owned()))
}
