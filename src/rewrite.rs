//! `pier rewrite`: points the images of Kubernetes manifests at the mirror.
//! Every `image` of a `containers`, `initContainers` or
//! `ephemeralContainers` entry, in any kind (a Pod, a workload's template,
//! a CronJob's job template, a `List`'s items), in every document. The
//! text is changed only where an image is written, so comments and layout
//! stay as they were. Pure.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::config::Config;

/// How images are to name the mirror.
#[derive(Clone, Debug)]
pub enum Form {
    /// `m.example.com/docker.io/library/nginx`
    AddPrefix(String),
    /// `docker.m.example.com/library/nginx`
    HostPrefix(String),
}

/// The registries a mirror serves, and their host prefixes.
pub struct Mirror {
    form: Form,
    /// registry → its first alias
    registries: HashMap<String, Option<String>>,
}

impl Mirror {
    pub fn new(form: Form, config: &Config) -> Self {
        Self {
            form,
            registries: config
                .upstreams
                .iter()
                .map(|u| (u.registry.clone(), u.aliases.first().cloned()))
                .collect(),
        }
    }

    /// Where `image` is to be pulled from through the mirror: `Ok(None)`
    /// when it already names the mirror, `Err` (why) when it is left alone.
    pub fn point(&self, image: &str) -> Result<Option<String>, String> {
        Ok(self.pointed(image)?.map(|(to, _)| to))
    }

    /// Like `point`, with the image as Docker reads it
    /// (`docker.io/library/nginx:1.27`): what the mirror is to fetch.
    fn pointed(&self, image: &str) -> Result<Option<(String, String)>, String> {
        let parsed = Parsed::of(image).ok_or_else(|| "not an image reference".to_owned())?;
        let own = match &self.form {
            Form::AddPrefix(host) | Form::HostPrefix(host) => host,
        };
        if parsed.domain == *own || parsed.domain.ends_with(&format!(".{own}")) {
            return Ok(None);
        }
        let registry = match parsed.domain.as_str() {
            "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io",
            other => other,
        };
        let Some(alias) = self.registries.get(registry) else {
            return Err(format!("{registry} is not an upstream of this mirror"));
        };
        let rest = format!("{}{}", parsed.path, parsed.reference);
        let to = match (&self.form, alias) {
            (Form::HostPrefix(domain), Some(alias)) => format!("{alias}.{domain}/{rest}"),
            // No host prefix for it: the bare domain takes the add-a-prefix
            // form.
            (Form::HostPrefix(host) | Form::AddPrefix(host), _) => {
                format!("{host}/{registry}/{rest}")
            }
        };
        Ok(Some((to, format!("{registry}/{rest}"))))
    }
}

/// An image reference, normalized as Docker does.
struct Parsed {
    domain: String,
    /// The repository, `library/` added for Docker Hub's official images.
    path: String,
    /// `:tag`, `@digest`, both, or nothing, as written.
    reference: String,
}

impl Parsed {
    fn of(image: &str) -> Option<Self> {
        let image = image.trim();
        if image.is_empty() || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return None;
        }
        let (name, digest) = match image.split_once('@') {
            Some((n, d)) => (n, format!("@{d}")),
            None => (image, String::new()),
        };
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, format!(":{t}")),
            _ => (name, String::new()),
        };
        let (domain, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ if name.contains('/') => ("docker.io".to_owned(), name.to_owned()),
            _ => ("docker.io".to_owned(), format!("library/{name}")),
        };
        let path = if domain == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let valid = !path.is_empty()
            && path
                .split('/')
                .all(|c| !c.is_empty() && crate::reference::is_path_component(c));
        valid.then_some(Self {
            domain: domain.to_ascii_lowercase(),
            path,
            reference: format!("{tag}{digest}"),
        })
    }
}

/// An image found in a document: where its text starts (in chars), how it
/// is quoted, and its value.
struct Found {
    /// 1-based line, 0-based column in chars.
    line: usize,
    col: usize,
    style: TScalarStyle,
    value: String,
}

/// Where the walk over a document's events is.
enum Frame {
    Map {
        key: Option<String>,
        want_key: bool,
        /// The key this mapping is the value of, or its sequence's.
        under: Option<String>,
        in_seq: bool,
    },
    Seq {
        under: Option<String>,
    },
}

#[derive(Default)]
struct Images {
    stack: Vec<Frame>,
    found: Vec<Found>,
}

const CONTAINER_LISTS: [&str; 3] = ["containers", "initContainers", "ephemeralContainers"];

impl Images {
    /// The key a new node sits under, and whether it sits in a sequence.
    fn place(&self) -> (Option<String>, bool) {
        match self.stack.last() {
            Some(Frame::Map { key, .. }) => (key.clone(), false),
            Some(Frame::Seq { under }) => (under.clone(), true),
            None => (None, false),
        }
    }

    /// A value (scalar or collection) ended: its mapping wants a key next.
    fn value_done(&mut self) {
        if let Some(Frame::Map { want_key, key, .. }) = self.stack.last_mut() {
            *want_key = true;
            *key = None;
        }
    }
}

impl MarkedEventReceiver for Images {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::MappingStart(..) => {
                let (under, in_seq) = self.place();
                self.stack.push(Frame::Map {
                    key: None,
                    want_key: true,
                    under,
                    in_seq,
                });
            }
            Event::SequenceStart(..) => {
                let (under, _) = self.place();
                self.stack.push(Frame::Seq { under });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.value_done();
            }
            Event::Scalar(value, style, ..) => {
                if let Some(Frame::Map {
                    key,
                    want_key,
                    under,
                    in_seq,
                }) = self.stack.last_mut()
                {
                    if *want_key {
                        *key = Some(value);
                        *want_key = false;
                        return;
                    }
                    let is_image = key.as_deref() == Some("image")
                        && *in_seq
                        && under
                            .as_deref()
                            .is_some_and(|u| CONTAINER_LISTS.contains(&u));
                    if is_image {
                        self.found.push(Found {
                            line: mark.line(),
                            col: mark.col(),
                            style,
                            value,
                        });
                    }
                }
                self.value_done();
            }
            Event::Alias(_) => self.value_done(),
            _ => {}
        }
    }
}

/// The byte offset of each line's start, lines ending in `\n`, `\r\n`
/// or `\r` as YAML has them.
fn line_starts(text: &str) -> Vec<usize> {
    let mut starts = vec![0];
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => starts.push(i + 1),
            b'\r' if bytes.get(i + 1) != Some(&b'\n') => starts.push(i + 1),
            _ => {}
        }
        i += 1;
    }
    starts
}

/// What rewriting a text did.
pub struct Rewritten {
    pub text: String,
    /// (from, to, the image as Docker reads it) for every image pointed at
    /// the mirror.
    pub changed: Vec<(String, String, String)>,
    /// (image, why) for every image left as it was.
    pub left: Vec<(String, String)>,
}

/// Rewrites the images in `text` (YAML, any number of documents).
pub fn rewrite(text: &str, mirror: &Mirror) -> Result<Rewritten, String> {
    let mut images = Images::default();
    Parser::new_from_str(text)
        .load(&mut images, true)
        .map_err(|e| format!("not YAML: {e}"))?;
    // The parser's index is not a char count everywhere (it counts bytes
    // in parts of block scalars): an image is found by its line and
    // column, which are.
    let lines = line_starts(text);
    let byte = |line: usize, col: usize| {
        let Some(&start) = lines.get(line.saturating_sub(1)) else {
            return text.len();
        };
        text[start..]
            .char_indices()
            .nth(col)
            .map_or(text.len(), |(b, _)| start + b)
    };
    let mut out = String::with_capacity(text.len() + 64 * images.found.len());
    let (mut changed, mut left) = (Vec::new(), Vec::new());
    let mut copied = 0;
    for found in images.found {
        let at = byte(found.line, found.col);
        let start = match found.style {
            TScalarStyle::Plain => at,
            TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted => at + 1,
            _ => {
                left.push((found.value, "written as a block scalar".into()));
                continue;
            }
        };
        let end = start + found.value.len();
        // Only where the text is the value itself (no escapes, no folding).
        if text.get(start..end) != Some(found.value.as_str()) || start < copied {
            left.push((
                found.value,
                "written in a form this cannot edit in place".into(),
            ));
            continue;
        }
        match mirror.pointed(&found.value) {
            Ok(Some((to, source))) => {
                out.push_str(&text[copied..start]);
                out.push_str(&to);
                copied = end;
                changed.push((found.value, to, source));
            }
            Ok(None) => {}
            Err(why) => left.push((found.value, why)),
        }
    }
    out.push_str(&text[copied..]);
    Ok(Rewritten {
        text: out,
        changed,
        left,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn mirror(form: Form) -> Mirror {
        Mirror::new(form, &Config::from_toml("", Vec::new()).unwrap())
    }

    #[test]
    fn images_are_normalized_as_docker_does_and_pointed_at_the_mirror() {
        let add = mirror(Form::AddPrefix("m.example.com".into()));
        let host = mirror(Form::HostPrefix("m.example.com".into()));
        let digest = format!("sha256:{}", "ab".repeat(32));
        for (image, via_prefix, via_host) in [
            (
                "nginx".to_owned(),
                "m.example.com/docker.io/library/nginx".to_owned(),
                "docker.m.example.com/library/nginx".to_owned(),
            ),
            (
                "bitnami/redis:7.2".to_owned(),
                "m.example.com/docker.io/bitnami/redis:7.2".to_owned(),
                "docker.m.example.com/bitnami/redis:7.2".to_owned(),
            ),
            (
                format!("registry.k8s.io/pause:3.9@{digest}"),
                format!("m.example.com/registry.k8s.io/pause:3.9@{digest}"),
                format!("k8s.m.example.com/pause:3.9@{digest}"),
            ),
            (
                "index.docker.io/library/alpine".to_owned(),
                "m.example.com/docker.io/library/alpine".to_owned(),
                "docker.m.example.com/library/alpine".to_owned(),
            ),
        ] {
            assert_eq!(add.point(&image).unwrap().unwrap(), via_prefix, "{image}");
            assert_eq!(host.point(&image).unwrap().unwrap(), via_host, "{image}");
        }
        assert_eq!(
            add.point("m.example.com/docker.io/library/nginx").unwrap(),
            None
        );
        assert_eq!(
            host.point("docker.m.example.com/library/nginx").unwrap(),
            None
        );
        assert!(add.point("registry.local:5000/app:1").is_err());
        assert!(add.point("Upper/Case").is_err());
    }
}
