#!/usr/bin/env python3
"""Renders helm/pier with real Helm and checks what a cluster would get.

    python3 tests/helm/render_check.py --pier target/debug/pier [--only SCENARIO] [--keep DIR]

- `helm lint --strict` on the default and the production-like values;
- every rendered object validated against the Kubernetes 1.30 schemas
  (kubernetes-validate, strict: unknown fields are errors);
- the ConfigMap's pier.toml loaded by the real binary (`pier check-config`)
  with exactly the environment the Deployment gives the container, secrets
  resolved from the rendered (or a stand-in existing) Secret;
- `pier serve` on the default rendering answers every probe's path with 200
  and exits cleanly on SIGTERM;
- what matters for a mirror: probes on /healthz and /readyz, replicas, the
  Ingress' wildcard hosts, advertise URL from the pod IP, every path Pier
  writes on a volume (read-only root filesystem), no secret in the ConfigMap;
- [server], [limits], [fetch], [egress], [access] from values (the defaults Pier's
  own, but a shutdown_grace that fits the pod's termination grace period) and
  OpenTelemetry export as OTEL_* variables only when an endpoint is set;
- values the chart must refuse;
- the node-side configs in deploy/k8s/.

Exit status: 0 all checks passed, 1 a check failed, 3 a Python module is
missing (tests/setup.sh installs them).
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

try:
    import tomllib

    import helm_python
    import kubernetes_validate
    import yaml
except ImportError as e:  # pragma: no cover - depends on the machine
    print(f"MISSING: python module {e.name}")
    sys.exit(3)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "pier"
PRODUCTION = ROOT / "tests" / "helm" / "values-production.yaml"
K8S = ROOT / "deploy" / "k8s"
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "pier", "pier"
POD_IP = "10.1.2.3"
# What a user's own Secret would hold, for values that name existingSecret.
EXISTING_SECRETS = {
    "corp-registry-credentials": {"user": "corp-bot", "token": "corp-registry-token"},
    "pier-external": {"redis-url": "redis://:external-redis-password@redis:6379/1"},
    "pier-admin": {"token": "external-admin-token-0123456789"},
    "pier-external-keys": {
        "s3-access-key-id": "AKIAEXTERNALKEY",
        "s3-secret-access-key": "external-secret-key",
        "redis-url": "redis://:external-redis-password@redis:6379/1",
    },
}


class Failed(Exception):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Failed(what)


SECONDS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def seconds(duration: str) -> float:
    """A humantime duration ("300s", "5m", "1h 30m") in seconds."""
    parts = re.findall(r"([0-9]+)\s*([a-z]+)", duration)
    check(bool(parts) and all(u in SECONDS for _, u in parts), f"duration {duration!r}")
    return sum(int(n) * SECONDS[u] for n, u in parts)


# ---------------------------------------------------------------------------
# Rendering


def render(values: dict) -> tuple[list[dict], str]:
    """Objects the chart renders for `values`, and NOTES.txt."""
    with helm_python.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects, notes = [], ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__source__"] = path
                objects.append(doc)
    return objects, notes


def render_fails(values: dict) -> str | None:
    """The error message when the chart refuses `values`, else None."""
    try:
        render(values)
    except helm_python.HelmError as e:
        return str(e)
    return None


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def strip(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "__source__"}


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in of_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    check(len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def pier_deployment(objects: list[dict]) -> dict:
    return one(objects, "Deployment", RELEASE)


def pier_container(objects: list[dict]) -> dict:
    containers = pier_deployment(objects)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "pier")


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------------------
# Kubernetes schemas


def validate_objects(objects: list[dict]) -> None:
    for o in objects:
        what = f"{o['__source__']}: {o['kind']}/{o['metadata'].get('name')}"
        if o["apiVersion"] == "monitoring.coreos.com/v1":
            # A CRD: no schema ships with kubernetes-validate.
            check_service_monitor(o, objects)
            continue
        try:
            kubernetes_validate.validate(strip(o), KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            raise Failed(f"{what} does not validate against Kubernetes {KUBE_VERSION}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            raise Failed(f"{what}: {e.message}")
        check(o["metadata"].get("namespace") == NAMESPACE, f"{what} is not namespaced to the release")


def check_service_monitor(sm: dict, objects: list[dict]) -> None:
    spec = sm["spec"]
    service = one(objects, "Service", RELEASE)
    labels = service["metadata"]["labels"]
    for k, v in spec["selector"]["matchLabels"].items():
        check(labels.get(k) == v, f"ServiceMonitor selector {k}={v} does not match the Service")
    ports = {p["name"] for p in service["spec"]["ports"]}
    for ep in spec["endpoints"]:
        check(ep["port"] in ports, f"ServiceMonitor port {ep['port']} is not a Service port")
        check(ep["path"].startswith("/"), "ServiceMonitor path")


# ---------------------------------------------------------------------------
# The container as Kubernetes would start it


def secret_data(objects: list[dict]) -> dict[str, dict[str, str]]:
    out = {name: dict(data) for name, data in EXISTING_SECRETS.items()}
    for s in of_kind(objects, "Secret"):
        data = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
        data.update(s.get("stringData") or {})
        out[s["metadata"]["name"]] = data
    return out


def resolve_env(container: dict, objects: list[dict], secrets: dict | None = None) -> dict[str, str]:
    """The container's environment, as the kubelet would build it."""
    secrets = secret_data(objects) if secrets is None else secrets
    env: dict[str, str] = {}
    for e in container.get("env", []):
        name = e["name"]
        if "value" in e:
            # $(VAR) refers to a variable defined earlier in the list.
            env[name] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), e["value"])
            continue
        src = e["valueFrom"]
        if "fieldRef" in src:
            check(src["fieldRef"]["fieldPath"] == "status.podIP", f"{name}: unexpected fieldRef")
            env[name] = POD_IP
        elif "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            value = secrets.get(ref["name"], {}).get(ref["key"])
            if value is None:
                check(ref.get("optional", False), f"{name}: Secret {ref['name']} has no key {ref['key']}")
                continue
            env[name] = value
        else:
            raise Failed(f"{name}: unexpected valueFrom {src}")
    return env


def pier_toml(objects: list[dict]) -> str:
    return one(objects, "ConfigMap", RELEASE)["data"]["pier.toml"]


def check_config(pier: Path, objects: list[dict], keep: Path | None, label: str, secrets: dict | None = None) -> tuple[dict, str]:
    """Runs `pier check-config` on the rendered pier.toml with the pod's
    environment; returns the parsed file and the effective config printed."""
    text = pier_toml(objects)
    parsed = tomllib.loads(text)  # valid TOML before anything else
    env = resolve_env(pier_container(objects), objects, secrets)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pier.toml"
        path.write_text(text)
        run = subprocess.run(
            [str(pier), "check-config", str(path)],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=60,
        )
    if keep:
        (keep / f"{label}.pier.toml").write_text(text)
        (keep / f"{label}.env").write_text("".join(f"{k}={v}\n" for k, v in sorted(env.items())))
        (keep / f"{label}.effective.toml").write_text(run.stdout + run.stderr)
    check(run.returncode == 0, f"pier check-config rejects the rendered {label} config:\n{run.stderr}\n--- pier.toml\n{text}")
    effective = run.stdout
    for k, v in env.items():
        if k.startswith("PIER_") and ("PASSWORD" in k or "SECRET" in k or k == "PIER_METADATA__URL"):
            check(v not in effective, f"{label}: check-config printed the value of {k}")
    return parsed, effective


def probe_endpoints_answer(pier: Path, objects: list[dict]) -> None:
    """Starts `pier serve` on the rendered config (its data directory and
    address moved to a temporary place) and asks every probe's path, then
    stops it with SIGTERM as the kubelet would."""
    c = pier_container(objects)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "pier.toml"
        config.write_text(pier_toml(objects))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {
            "PATH": os.environ.get("PATH", ""),
            **resolve_env(c, objects),
            "PIER_LISTEN": f"127.0.0.1:{port}",
            "PIER_STORAGE__PATH": str(Path(tmp) / "data"),
            "PIER_METADATA__PATH": str(Path(tmp) / "data"),
        }
        proc = subprocess.Popen([str(pier), *c["args"][:2], str(config)], env=env, cwd=tmp,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            statuses: dict[str, int] = {}
            deadline = time.monotonic() + 20
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                path = c[probe]["httpGet"]["path"]
                while True:
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                            statuses[path] = r.status
                        break
                    except urllib.error.HTTPError as e:
                        statuses[path] = e.code
                        break
                    except (urllib.error.URLError, ConnectionError):
                        check(proc.poll() is None and time.monotonic() < deadline,
                              f"pier serve did not answer {path}: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")
                        time.sleep(0.1)
            check(set(statuses.values()) == {200}, f"probe answers {statuses}")
            proc.send_signal(signal.SIGTERM)
            check(proc.wait(timeout=15) == 0, "pier serve exits cleanly on SIGTERM")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------------------
# What every rendering must get right


def check_pod_basics(objects: list[dict], parsed: dict) -> None:
    deploy = pier_deployment(objects)
    pod = deploy["spec"]["template"]["spec"]
    c = pier_container(objects)

    check(pod.get("enableServiceLinks") is False, "enableServiceLinks must be false")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    check(grace >= 300, f"terminationGracePeriodSeconds {grace} is too short for long blob streams")
    # The kubelet sleeps: the image has no shell or sleep binary to exec.
    pre_stop = c["lifecycle"]["preStop"]
    check("exec" not in pre_stop, f"preStop execs in an image without a shell: {pre_stop}")
    sleep = ["sleep", pre_stop["sleep"]["seconds"]]
    check(0 < int(sleep[1]) < grace, f"preStop sleep {sleep}")
    # Pier's drain after SIGTERM ends before the kubelet's SIGKILL (the
    # preStop sleep counts against the grace period), and is not Pier's own
    # 30s default, which would cut long blob streams short.
    drain = seconds(parsed["server"]["shutdown_grace"])
    check(60 <= drain < grace - int(sleep[1]), f"shutdown_grace {drain}s vs grace {grace}s - preStop {sleep[1]}s")

    # Probes hit Pier's real endpoints, on the port it listens on.
    port = int(parsed["listen"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(ports.get("http") == port, f"container port http {ports} != listen port {port}")
    for probe, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        get = c[probe]["httpGet"]
        check(get["path"] == path, f"{probe} path {get['path']} != {path}")
        check(get["port"] in ("http", port), f"{probe} port {get['port']}")
    service = one(objects, "Service", RELEASE)
    check(service["spec"]["ports"][0]["targetPort"] in ("http", port), "Service targets the http port")
    sel = service["spec"]["selector"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    check(all(labels.get(k) == v for k, v in sel.items()), "Service selects Pier's pods")
    for other in of_kind(objects, "Deployment"):
        if other is not deploy:
            other_labels = other["spec"]["template"]["metadata"]["labels"]
            check(not all(other_labels.get(k) == v for k, v in sel.items()), f"Service also selects {other['metadata']['name']}")

    # The config file is the one mounted.
    args = c["args"]
    check(args[:2] == ["serve", "--config"], f"args {args}")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    check(str(Path(args[2]).parent) in mounts, "the config file's directory is mounted")

    # Read-only root: everything Pier writes sits on a writable volume.
    sc = c["securityContext"]
    check(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
    check(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation")
    check(pod["securityContext"].get("runAsNonRoot") is True, "runAsNonRoot")
    volumes = {v["name"]: v for v in pod["volumes"]}
    written = []
    if parsed["storage"]["kind"] == "fs":
        written.append(parsed["storage"]["path"])
    else:
        written.append(parsed["storage"]["spool_path"])
        if parsed["storage"].get("local_cache_size"):
            written.append(parsed["storage"]["local_cache_path"])
    if parsed["metadata"]["kind"] == "embedded":
        written.append(parsed["metadata"]["path"])
    for path in written:
        check(path.startswith("/"), f"{path} must be absolute (the working directory is read-only)")
        mount = next((m for p, m in mounts.items() if path == p or path.startswith(p.rstrip("/") + "/")), None)
        check(mount is not None and not mount.get("readOnly"), f"{path} is not on a writable volume")
        vol = volumes[mount["name"]]
        check("emptyDir" in vol or "persistentVolumeClaim" in vol, f"{path} is on {vol}")

    # Secrets: only through Secret references, never in plain sight.
    for e in c.get("env", []):
        name = e["name"]
        if name == "PIER_METADATA__URL" and "value" in e:
            check("@" not in e["value"], "a Redis URL with a password is a literal value")
        elif re.search(r"PASSWORD|SECRET|ACCESS_KEY|USERNAME|__URL$", name) and name != "PIER_CLUSTER__ADVERTISE_URL":
            check("secretKeyRef" in e.get("valueFrom", {}), f"{name} does not come from a Secret")

    secret_values = [v for s in of_kind(objects, "Secret") for v in secret_data([s]).get(s["metadata"]["name"], {}).values()]
    for o in objects:
        if o["kind"] == "Secret":
            continue
        dumped = json.dumps(strip(o))
        for v in secret_values:
            check(v not in dumped, f"a secret value appears in {o['kind']}/{o['metadata']['name']}")
    for key in ("access_key_id", "secret_access_key"):
        check(key not in parsed.get("storage", {}), f"storage.{key} rendered into the ConfigMap")
    check("url" not in parsed.get("metadata", {}), "metadata.url rendered into the ConfigMap")
    for u in parsed.get("upstreams", []):
        check("password" not in u and "username" not in u, f"credentials of {u['registry']} rendered into the ConfigMap")

    # Rolling the pods when the config changes.
    check("checksum/config" in deploy["spec"]["template"]["metadata"].get("annotations", {}), "checksum/config annotation")


def replicas_of(objects: list[dict]) -> int | None:
    return pier_deployment(objects)["spec"].get("replicas")


# ---------------------------------------------------------------------------
# Scenarios


def lint(values: dict, label: str) -> None:
    report = helm_python.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    bad = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report.get("errors", [])]
    check(not bad, f"helm lint --strict ({label}): {bad}")


def scenario_defaults(pier: Path, keep: Path | None) -> None:
    lint({}, "defaults")
    objects, notes = render({})
    validate_objects(objects)
    kinds = sorted(o["kind"] for o in objects)
    check(kinds == ["ConfigMap", "Deployment", "Service", "ServiceAccount"], f"default objects {kinds}")
    parsed, effective = check_config(pier, objects, keep, "defaults")
    check_pod_basics(objects, parsed)
    check(replicas_of(objects) == 1, "defaults: one replica (embedded stores cannot be shared)")
    check(parsed["storage"] == {"kind": "fs", "path": "/var/lib/pier/data"}, f"storage {parsed['storage']}")
    check(parsed["metadata"]["kind"] == "embedded", "embedded metadata")
    check('kind = "fs"' in effective and "/var/lib/pier/data" in effective, effective)
    env = env_of(pier_container(objects))
    check("PIER_CLUSTER__ADVERTISE_URL" not in env and "POD_IP" not in env, "no advertise URL without Redis")
    check(not any(n.startswith("OTEL_") for n in env), f"no trace export without otel.endpoint: {sorted(env)}")
    # [server], [limits], [fetch], [egress], [access], [timeouts] as Pier has
    # them without a file, but for the longer shutdown_grace.
    mine, own = tomllib.loads(effective), pier_own_defaults(pier)
    for section in ("server", "limits", "fetch", "cache", "egress", "access", "timeouts"):
        got, want = dict(mine[section]), dict(own[section])
        if section == "server":
            check(got.pop("shutdown_grace") == "5m" and want.pop("shutdown_grace") == "30s", f"shutdown_grace {mine['server']}")
        check(got == want, f"chart default [{section}] {got} != Pier's {want}")
    check("redirect_above" not in parsed["fetch"] and "denied_message" not in parsed["access"], "optional keys left out")
    pod = pier_deployment(objects)["spec"]["template"]["spec"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    check("emptyDir" in data, "defaults: the cache is on an emptyDir")
    check("affinity" not in pod and "topologySpreadConstraints" not in pod, "no spread for one replica")
    check("kubectl" in notes and "docker.io/library/nginx" in notes, "NOTES.txt tells how to pull")
    probe_endpoints_answer(pier, objects)


def scenario_production(pier: Path, keep: Path | None) -> None:
    values = yaml.safe_load(PRODUCTION.read_text())
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(values)
    lint(values, "production")
    objects, notes = render(values)
    validate_objects(objects)
    kinds = sorted({o["kind"] for o in objects})
    for kind in ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Ingress", "PodDisruptionBudget",
                 "Secret", "Service", "ServiceAccount", "ServiceMonitor"]:
        check(kind in kinds, f"production renders a {kind}")
    parsed, effective = check_config(pier, objects, keep, "production")
    check_pod_basics(objects, parsed)

    # Scale-out: S3 + Redis, no replicas field under an HPA of at least 2.
    check(parsed["storage"]["kind"] == "s3" and parsed["metadata"]["kind"] == "redis", "S3 + Redis")
    check('kind = "s3"' in effective and 'kind = "redis"' in effective, effective)
    check(replicas_of(objects) is None, "the HPA owns replicas")
    hpa = one(objects, "HorizontalPodAutoscaler")
    check(hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["scaleTargetRef"]["name"] == RELEASE, "HPA")
    check(one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1, "PDB")
    pod = pier_deployment(objects)["spec"]["template"]["spec"]
    keys = {t["topologyKey"] for t in pod["topologySpreadConstraints"]}
    check({"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= keys, f"topology spread {keys}")
    check("podAntiAffinity" in pod["affinity"], "anti-affinity")
    check(not any(v["name"] == "data" for v in pod["volumes"]), "no local data volume with S3 + Redis")
    spool = next(v for v in pod["volumes"] if v["name"] == "spool")
    check(spool["emptyDir"].get("sizeLimit") == "40Gi", f"spool {spool}")
    # The local cache shares the spool's mount (a hard link needs one).
    storage = parsed["storage"]
    check(storage.get("local_cache_size") == "20Gi", f"local cache {storage}")
    mounts = [m["mountPath"] for m in pier_container(objects)["volumeMounts"] if m["name"] == "spool"]
    check(len(mounts) == 1 and all(storage[k].startswith(mounts[0] + "/")
                                   for k in ("spool_path", "local_cache_path")), f"{mounts} {storage}")

    # Each replica advertises its own pod IP.
    env = env_of(pier_container(objects))
    check(env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", "POD_IP from status.podIP")
    check(env["PIER_CLUSTER__ADVERTISE_URL"]["value"] == "http://$(POD_IP):5000", "advertise URL")
    names = [e["name"] for e in pier_container(objects)["env"]]
    check(names.index("POD_IP") < names.index("PIER_CLUSTER__ADVERTISE_URL"), "POD_IP is defined before use")
    check(f'advertise_url = "http://{POD_IP}:5000/"' in effective, effective)

    # Credentials: from Secrets, by the names Pier reads.
    refs = {n: e["valueFrom"]["secretKeyRef"] for n, e in env.items() if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
    expected = {
        "PIER_STORAGE__ACCESS_KEY_ID": (RELEASE, "s3-access-key-id"),
        "PIER_STORAGE__SECRET_ACCESS_KEY": (RELEASE, "s3-secret-access-key"),
        "PIER_METADATA__URL": (RELEASE, "redis-url"),
        "PIER_UPSTREAMS__DOCKER_IO__USERNAME": (RELEASE, "upstream-docker.io-username"),
        "PIER_UPSTREAMS__DOCKER_IO__PASSWORD": (RELEASE, "upstream-docker.io-password"),
        "PIER_UPSTREAMS__REGISTRY_CORP_EXAMPLE__USERNAME": ("corp-registry-credentials", "user"),
        "PIER_UPSTREAMS__REGISTRY_CORP_EXAMPLE__PASSWORD": ("corp-registry-credentials", "token"),
        "PIER_ADMIN__TOKEN": (RELEASE, "admin-token"),
    }
    for name, (secret, key) in expected.items():
        check(name in refs and (refs[name]["name"], refs[name]["key"]) == (secret, key), f"{name} -> {refs.get(name)}")
    check(not any(n.startswith("PIER_UPSTREAMS__GHCR_IO") for n in env), "no credentials for ghcr.io")
    secret = one(objects, "Secret", RELEASE)
    check(sorted(secret["data"]) == sorted(k for s, k in expected.values() if s == RELEASE), f"Secret keys {sorted(secret['data'])}")
    # The credentials reach Pier: its effective config has them (masked).
    check(effective.count('username = "corp-puller"') == 1 and effective.count('username = "corp-bot"') == 1, effective)
    check('secret_access_key = "********"' in effective and 'url = "********"' in effective, effective)
    # The admin token reaches Pier from the Secret, masked; never the ConfigMap.
    check('token = "********"' in effective and 'allow_from = ["10.0.0.0/8"]' in effective, effective)
    check("production-admin-token" not in yaml.safe_dump(one(objects, "ConfigMap", RELEASE)), "admin token in the ConfigMap")
    check("max_concurrent = 2" in effective, effective)
    check(parsed["ui"] == {"enabled": False}, f"ui {parsed.get('ui')}")
    check(parsed["sync"]["images"] == [
        {"image": "docker.io/library/nginx", "tag_pattern": r"^1\.2[5-9]\.", "platforms": ["linux/amd64", "linux/arm64"], "interval": "6h"},
        {"image": "registry.k8s.io/pause", "tags": ["3.9", "3.10"]},
    ], f"sync lists {parsed['sync']}")

    # Upstreams, aliases, routes, TTLs reach pier.toml.
    ups = {u["registry"]: u for u in parsed["upstreams"]}
    check(ups["docker.io"] == {"registry": "docker.io", "tag_ttl": "30m"}, f"docker.io {ups['docker.io']}")
    check(ups["registry.corp.example"]["aliases"] == ["corp"] and len(ups["registry.corp.example"]["endpoints"]) == 2, "corp upstream")
    check(ups["ghcr.io"] == {"registry": "ghcr.io", "tag_ttl": "5m", "allow": ["acme/**"], "deny": ["acme/secret-*"], "max_age": "90d", "prefetch": True},
          f"ghcr.io {ups['ghcr.io']}")
    check(parsed["routes"] == [{"pattern": "team-*/**", "registry": "registry.corp.example"}], f"routes {parsed['routes']}")
    check(parsed["domains"] == ["m.example.com"] and parsed["timeouts"]["response"] == "20s", "domains, timeouts")
    for line in ['trusted_proxies = ["10.244.0.0/16"]', "requests_per_second = 100", "burst = 400",
                 'exempt = ["10.244.0.0/16"]', "max_concurrent = 32", "redirect_above = 536870912"]:
        check(line in effective, f"production: {line!r} not in the effective config:\n{effective}")
    check(env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.observability:4318", "OTLP endpoint")

    # Ingress: the bare domain and its wildcard, with TLS.
    ing = one(objects, "Ingress")
    hosts = [r["host"] for r in ing["spec"]["rules"]]
    check(hosts == ["m.example.com", "*.m.example.com"], f"Ingress hosts {hosts}")
    check(ing["spec"]["tls"] == [{"hosts": hosts, "secretName": "m-example-com-wildcard"}], f"tls {ing['spec']['tls']}")
    check(ing["spec"]["ingressClassName"] == "nginx", "ingress class")
    for r in ing["spec"]["rules"]:
        backend = r["http"]["paths"][0]["backend"]["service"]
        check(backend == {"name": RELEASE, "port": {"name": "http"}}, f"backend {backend}")

    sa = one(objects, "ServiceAccount")
    check(sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::"), "IRSA annotation")
    check(pod["serviceAccountName"] == sa["metadata"]["name"], "pods use the ServiceAccount")
    check(one(objects, "Service")["spec"]["clusterIP"] == "10.96.0.50", "pinned ClusterIP")
    check("m.example.com/docker.io/library/nginx" in notes and "docker.m.example.com" in notes, "NOTES.txt pulls via the domain")
    check('[host."http://10.96.0.50:5000"]' in notes, "NOTES.txt names the pinned ClusterIP for nodes")


def scenario_variants(pier: Path, keep: Path | None) -> None:
    prod = yaml.safe_load(PRODUCTION.read_text())

    # Scale-out without the HPA: two replicas by default.
    values = merge(prod, {"autoscaling": {"enabled": False}})
    objects, _ = render(values)
    validate_objects(objects)
    check(replicas_of(objects) == 2, "S3 + Redis default to two replicas")
    check(len(of_kind(objects, "PodDisruptionBudget")) == 1, "PDB with two replicas")

    # existingSecret for S3 + Redis (IRSA: no S3 keys in it).
    values = merge(prod, {"existingSecret": "pier-external", "storage": {"s3": {"accessKeyId": "", "secretAccessKey": ""}},
                          "metadata": {"redis": {"url": ""}}})
    objects, _ = render(values)
    validate_objects(objects)
    env = env_of(pier_container(objects))
    for name in ["PIER_STORAGE__ACCESS_KEY_ID", "PIER_STORAGE__SECRET_ACCESS_KEY"]:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        check(ref["name"] == "pier-external" and ref.get("optional") is True, f"{name} optional from existingSecret")
    check(env["PIER_METADATA__URL"]["valueFrom"]["secretKeyRef"]["name"] == "pier-external", "Redis URL from existingSecret")
    check(sorted(one(objects, "Secret")["data"]) == ["admin-token", "upstream-docker.io-password", "upstream-docker.io-username"],
          "the chart's Secret holds only inline upstream credentials and the admin token")
    # The admin token from a Secret of yours.
    values = merge(values, {"config": {"admin": {"token": "", "existingSecret": "pier-admin", "tokenKey": "token"}}})
    objects, _ = render(values)
    ref = env_of(pier_container(objects))["PIER_ADMIN__TOKEN"]["valueFrom"]["secretKeyRef"]
    check((ref["name"], ref["key"]) == ("pier-admin", "token"), f"admin token from existingSecret: {ref}")
    check("admin-token" not in one(objects, "Secret")["data"], "no admin token in the chart's Secret")
    parsed, effective = check_config(pier, objects, keep, "existing-secret")
    check("access_key_id" not in effective, "IRSA: no static keys")
    # ... and with keys in it.
    values["existingSecret"] = "pier-external-keys"
    objects, _ = render(values)
    _, effective = check_config(pier, objects, keep, "existing-secret-keys")
    check('access_key_id = "AKIAEXTERNALKEY"' in effective, effective)

    # Nothing secret at all: no Secret object.
    values = {"storage": {"kind": "s3", "s3": {"bucket": "pier-cache", "endpoint": "http://minio.minio:9000"}},
              "metadata": {"kind": "redis"}, "inClusterRedis": {"enabled": True}}
    objects, _ = render(values)
    validate_objects(objects)
    check(not of_kind(objects, "Secret"), "no Secret without credentials")
    redis = one(objects, "Deployment", f"{RELEASE}-redis")
    check(redis["spec"]["template"]["spec"]["containers"][0]["image"].startswith("docker.io/library/redis:"), "redis image")
    one(objects, "Service", f"{RELEASE}-redis")
    env = env_of(pier_container(objects))
    check(env["PIER_METADATA__URL"]["value"] == f"redis://{RELEASE}-redis:6379", "in-cluster Redis URL")
    check(replicas_of(objects) == 2, "in-cluster Redis + S3: two replicas")
    parsed, _ = check_config(pier, objects, keep, "in-cluster-redis")
    check_pod_basics(objects, parsed)

    # HTTPS from a kubernetes.io/tls Secret: the whole directory mounted
    # (a subPath would never see a renewal), the config naming its files,
    # the probes speaking HTTPS.
    objects, _ = render({"tls": {"secretName": "pier-tls"}})
    validate_objects(objects)
    pod = pier_deployment(objects)["spec"]["template"]["spec"]
    c = pier_container(objects)
    vol = next(v for v in pod["volumes"] if v["name"] == "tls")
    check(vol["secret"]["secretName"] == "pier-tls", f"TLS volume {vol}")
    mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
    check(mount.get("readOnly") is True and "subPath" not in mount, f"TLS mount {mount}")
    parsed, effective = check_config(pier, objects, keep, "tls")
    check(parsed["server"]["tls_cert"] == f"{mount['mountPath']}/tls.crt"
          and parsed["server"]["tls_key"] == f"{mount['mountPath']}/tls.key", f"TLS files {parsed['server']}")
    check(f'tls_key = "{mount["mountPath"]}/tls.key"' in effective, effective)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        check(c[probe]["httpGet"].get("scheme") == "HTTPS", f"{probe} over HTTPS")
    check_pod_basics(objects, parsed)
    check(render_fails({"tls": {"secretName": "Not A Name"}}) is not None, "a bad Secret name is refused")
    objects, _ = render({})
    check("tls_cert" not in pier_toml(objects), "no TLS by default")
    check("scheme" not in pier_container(objects)["readinessProbe"]["httpGet"], "plain probes by default")
    # Sentinel URLs are Redis URLs too.
    objects, _ = render({"storage": {"kind": "s3", "s3": {"bucket": "b-1"}},
                         "metadata": {"kind": "redis", "redis": {"url": "redis+sentinel://s1:26379,s2:26379/mymaster"}}})
    check_config(pier, objects, keep, "sentinel")
    objects, _ = render({"tls": {"secretName": "pier-tls"}, "metrics": {"serviceMonitor": {"enabled": True}}})
    endpoint = one(objects, "ServiceMonitor")["spec"]["endpoints"][0]
    check(endpoint.get("scheme") == "https", f"ServiceMonitor over HTTPS: {endpoint}")

    # A persistent cache: PVC, Recreate, still one replica.
    objects, _ = render({"persistence": {"enabled": True, "storageClass": "fast", "size": "200Gi"}})
    validate_objects(objects)
    pvc = one(objects, "PersistentVolumeClaim")
    check(pvc["spec"]["storageClassName"] == "fast" and pvc["spec"]["resources"]["requests"]["storage"] == "200Gi", "PVC")
    deploy = pier_deployment(objects)
    check(deploy["spec"]["strategy"]["type"] == "Recreate", "Recreate with a ReadWriteOnce volume")
    data = next(v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == "data")
    check(data["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], "the PVC is mounted")
    parsed, _ = check_config(pier, objects, keep, "persistent")
    check_pod_basics(objects, parsed)

    # S3 with the embedded database: one replica, data and spool volumes.
    objects, _ = render({"storage": {"kind": "s3", "s3": {"bucket": "pier-cache", "pathStyle": True}},
                         "config": {"builtinUpstreams": False, "defaultRegistry": "registry.corp.example",
                                    "upstreams": [{"registry": "registry.corp.example", "endpoints": ["https://registry.corp.example"]}]}})
    validate_objects(objects)
    check(replicas_of(objects) == 1, "S3 + embedded metadata: one replica")
    parsed, effective = check_config(pier, objects, keep, "s3-embedded")
    check_pod_basics(objects, parsed)
    check("path_style = true" in effective and "docker.io" not in effective, effective)


TUNING = {
    "config": {
        "server": {"headerTimeout": "10s", "sendTimeout": "2m", "maxHeaderBytes": "32KiB", "shutdownGrace": "9m 30s",
                   "zeroCopy": False, "trustedProxies": ["10.0.0.0/8"]},
        "limits": {"requestsPerSecond": 50, "burst": 200, "concurrentBlobs": 4, "bytesPerSecond": "50MiB",
                   "exempt": ["10.42.0.0/16", "fd00::/8"]},
        "fetch": {"maxConcurrent": 16, "queueTimeout": "45s", "redirectAbove": "256MiB", "maxBlobSize": "20GiB",
                  "minRate": 0, "minRateWindow": "30s"},
        "cache": {"maxSize": "40GiB", "minFree": "15%", "scrubInterval": "3h", "scrubRate": "8MiB",
                  "maxAge": "30d", "pinned": ["registry.k8s.io/**"]},
        "egress": {"refuse": ["10.96.0.0/12", "fd00:10::/64"]},
        "access": {"allow": ["docker.io/library/*", "registry.k8s.io/**"], "deny": ["docker.io/library/ubuntu"],
                   "deniedMessage": "ask #platform to allow an image"},
    },
    "otel": {"endpoint": "http://otel-collector.observability:4318", "protocol": "http/json", "serviceName": "pier-mirror"},
}


def otel_env(objects: list[dict]) -> dict[str, str]:
    c = pier_container(objects)
    return {k: v for k, v in resolve_env(c, objects).items() if k.startswith("OTEL_")}


def scenario_tuning(pier: Path, keep: Path | None) -> None:
    lint(TUNING, "tuning")
    objects, _ = render(TUNING)
    validate_objects(objects)
    parsed, effective = check_config(pier, objects, keep, "tuning")
    check_pod_basics(objects, parsed)

    # Every value reaches Pier, sizes as bytes.
    for line in ['requests_per_second = 50', 'burst = 200', 'concurrent_blobs = 4', 'bytes_per_second = 52428800',
                 'trusted_proxies = ["10.0.0.0/8"]', 'max_header_bytes = 32768', 'zero_copy = false',
                 'header_timeout = "10s"', 'send_timeout = "2m"', 'shutdown_grace = "9m 30s"',
                 'max_concurrent = 16', 'queue_timeout = "45s"', 'redirect_above = 268435456',
                 'max_blob_size = 21474836480', 'min_rate = 0', 'min_rate_window = "30s"',
                 'max_size = 42949672960', 'min_free = "15%"', 'scrub_interval = "3h"', 'scrub_rate = 8388608', 'max_age = "30d"', 'pinned = ["registry.k8s.io/**"]',
                 'denied_message = "ask #platform to allow an image"']:
        check(line in effective, f"tuning: {line!r} not in the effective config:\n{effective}")
    mine = tomllib.loads(effective)
    check(mine["limits"]["exempt"] == ["10.42.0.0/16", "fd00::/8"], f"exempt {mine['limits']}")
    check(mine["egress"]["refuse"] == ["10.96.0.0/12", "fd00:10::/64"], f"egress {mine.get('egress')}")
    check(mine["access"]["allow"] == ["docker.io/library/*", "registry.k8s.io/**"]
          and mine["access"]["deny"] == ["docker.io/library/ubuntu"], f"access {mine['access']}")

    # Trace export: the standard variables, nothing else.
    env = otel_env(objects)
    check(env == {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
                  "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json", "OTEL_SERVICE_NAME": "pier-mirror"}, f"otel env {env}")
    # Only the endpoint: protobuf, Pier's own service name.
    objects, _ = render({"otel": {"endpoint": "https://otlp.example.com"}})
    env = otel_env(objects)
    check(env == {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otlp.example.com",
                  "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, f"otel env {env}")
    # No endpoint: no OTEL_* at all, whatever else is set.
    objects, _ = render({"otel": {"endpoint": "", "protocol": "http/json", "serviceName": "x"}})
    check(otel_env(objects) == {}, "otel variables without an endpoint")

    # Sizes as integers; a longer pod grace period makes room for a longer drain.
    objects, _ = render({"config": {"server": {"maxHeaderBytes": 16384, "shutdownGrace": "20m"},
                                    "fetch": {"redirectAbove": 1073741824}, "limits": {"bytesPerSecond": 1000000}},
                         "terminationGracePeriodSeconds": 1800})
    validate_objects(objects)
    parsed, effective = check_config(pier, objects, keep, "tuning-integers")
    check_pod_basics(objects, parsed)
    for line in ['max_header_bytes = 16384', 'redirect_above = 1073741824', 'bytes_per_second = 1000000', 'shutdown_grace = "20m"']:
        check(line in effective, f"tuning-integers: {line!r} not in the effective config:\n{effective}")


REFUSED = [
    ("two replicas with local stores", {"replicaCount": 2}, "cannot be shared"),
    ("autoscaling with local stores", {"autoscaling": {"enabled": True}}, "cannot be shared"),
    ("an unknown storage kind", {"storage": {"kind": "gcs"}}, "storage/kind"),
    ("an unknown top-level value", {"replicas": 2}, "additional properties"),
    ("an unknown config key", {"config": {"listen": "0.0.0.0:80"}}, "additional properties"),
    ("an uppercase domain", {"config": {"domains": ["M.example.com"]}}, "domains/0"),
    ("a registry without a dot", {"config": {"upstreams": [{"registry": "corp", "endpoints": ["https://corp"]}]}}, "registry"),
    ("an endpoint with a path", {"config": {"upstreams": [{"registry": "r.example", "endpoints": ["https://r.example/v2"]}]}}, "endpoints"),
    ("a bad duration", {"config": {"timeouts": {"connect": "five"}}}, "connect"),
    ("a lease that never lasts", {"config": {"cluster": {"leaseTtl": "0s"}}}, "leaseTtl"),
    ("an upload age of zero (every upload in progress aborted)",
     {"storage": {"kind": "s3", "s3": {"bucket": "b-1", "abandonedUploadAge": "0s"}}}, "abandonedUploadAge"),
    ("a zero Redis timeout", {"metadata": {"kind": "redis", "redis": {"url": "redis://r:6379", "timeout": "0ms"}}}, "timeout"),
    ("a bad route pattern", {"config": {"routes": [{"pattern": "Team/*", "registry": "docker.io"}]}}, "pattern"),
    ("an autoscaler whose minimum is above its maximum",
     {"storage": {"kind": "s3", "s3": {"bucket": "b-1"}}, "metadata": {"kind": "redis", "redis": {"url": "redis://r:6379"}},
      "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}, "minReplicas"),
    ("an Ingress without domains", {"ingress": {"enabled": True}}, "config.domains"),
    ("Pier's own TLS with several replicas",
     {"storage": {"kind": "s3", "s3": {"bucket": "b-1"}}, "metadata": {"kind": "redis", "redis": {"url": "redis://r:6379"}},
      "tls": {"secretName": "pier-tls"}}, "terminate TLS in front"),
    ("Pier's own TLS behind an Ingress",
     {"config": {"domains": ["m.example.com"]}, "ingress": {"enabled": True}, "tls": {"secretName": "pier-tls"}}, "choose one"),
    ("S3 without a bucket", {"storage": {"kind": "s3"}}, "bucket"),
    ("a local cache size without a unit", {"storage": {"kind": "s3", "s3": {"bucket": "b-1"}, "localCache": {"size": "20"}}},
     "localCache"),
    ("a local cache in memory",
     {"storage": {"kind": "s3", "s3": {"bucket": "b-1"}, "localCache": {"size": "4Gi"}, "spool": {"medium": "Memory"}}},
     "medium"),
    ("Redis without a URL", {"metadata": {"kind": "redis"}}, "metadata.redis.url"),
    ("a Redis URL that is not one", {"metadata": {"kind": "redis", "redis": {"url": "http://redis"}}}, "url"),
    ("an access key without its secret", {"storage": {"kind": "s3", "s3": {"bucket": "b-1", "accessKeyId": "AKIA"}}}, "go together"),
    ("a username without a password", {"config": {"upstreams": [{"registry": "docker.io", "username": "me"}]}}, "go together"),
    ("an upstream allow glob with a capital", {"config": {"upstreams": [{"registry": "ghcr.io", "allow": ["Acme/*"]}]}}, "allow"),
    ("an admin token too short to be one", {"config": {"admin": {"token": "short"}}}, "token"),
    ("an upstream maxAge that is no duration", {"config": {"upstreams": [{"registry": "ghcr.io", "maxAge": "forever"}]}}, "maxAge"),
    ("in-cluster Redis with embedded metadata", {"inClusterRedis": {"enabled": True}}, "metadata.kind=redis"),
    ("a short grace period", {"terminationGracePeriodSeconds": 5}, "terminationGracePeriodSeconds"),
    ("a negative request rate", {"config": {"limits": {"requestsPerSecond": -1}}}, "requestsPerSecond"),
    ("trusted proxies as a string", {"config": {"server": {"trustedProxies": "10.0.0.0/8"}}}, "trustedProxies"),
    ("a trusted proxy that is not a CIDR", {"config": {"server": {"trustedProxies": ["10.0.0.0/33"]}}}, "trustedProxies/0"),
    ("an exempt network that is not a CIDR", {"config": {"limits": {"exempt": ["pods"]}}}, "exempt/0"),
    ("a size Pier cannot read", {"config": {"limits": {"bytesPerSecond": "50 mebibytes"}}}, "bytesPerSecond"),
    ("a request head limit below 8KiB", {"config": {"server": {"maxHeaderBytes": 1024}}}, "maxHeaderBytes"),
    ("a bad fetch duration", {"config": {"fetch": {"queueTimeout": 30}}}, "queueTimeout"),
    ("an unknown fetch key", {"config": {"fetch": {"maxConcurrency": 8}}}, "additional properties"),
    ("a blob size ceiling of zero", {"config": {"fetch": {"maxBlobSize": 0}}}, "maxBlobSize"),
    ("a free-space share over 90%", {"config": {"cache": {"minFree": "95%"}}}, "minFree"),
    ("a pin without a registry", {"config": {"cache": {"pinned": ["library/nginx"]}}}, "pinned/0"),
    ("an egress network that is not a CIDR", {"config": {"egress": {"refuse": ["metadata"]}}}, "refuse/0"),
    ("egress refusals as a string", {"config": {"egress": {"refuse": "10.0.0.0/8"}}}, "refuse"),
    ("an access glob without a registry", {"config": {"access": {"deny": ["library/ubuntu"]}}}, "deny/0"),
    ("a gRPC OTLP protocol", {"otel": {"protocol": "grpc"}}, "protocol"),
    ("an OTLP endpoint without a scheme", {"otel": {"endpoint": "otel-collector:4318"}}, "endpoint"),
    ("a drain longer than the pod's grace period", {"config": {"server": {"shutdownGrace": "10m"}}}, "shutdownGrace"),
    ("a grace period too short for the default drain", {"terminationGracePeriodSeconds": 120}, "shutdownGrace"),
]


def scenario_private(pier: Path, keep: Path | None) -> None:
    """The private namespace: users from an htpasswd file in a Secret of
    yours, mounted into the pod, with rights per user in the ConfigMap."""
    prod = yaml.safe_load(PRODUCTION.read_text())
    private = {"enabled": True, "prefix": "own", "alias": "own", "htpasswdSecret": "pier-users",
               "htpasswdKey": "users.htpasswd", "push": [], "pull": ["**"],
               "users": [{"name": "ci", "push": ["team/**"]}]}
    values = merge(prod, {"config": {"private": private}})
    objects, _ = render(values)
    validate_objects(objects)
    parsed, effective = check_config(pier, objects, keep, "private")
    mine = tomllib.loads(effective)["private"]
    check(mine["prefix"] == "own" and mine["alias"] == "own", f"private: {mine}")
    check(mine["htpasswd"] == "/etc/pier-private/htpasswd", f"htpasswd path: {mine}")
    check(mine["htpasswd_pull"] == ["**"] and mine["htpasswd_push"] == [], f"file users' rights: {mine}")
    check(mine["users"] == [{"name": "ci", "push": ["team/**"], "pull": ["**"]}], f"users: {mine['users']}")
    check("password_hash" not in pier_toml(objects), "no password hash in the ConfigMap")
    spec = pier_deployment(objects)["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "htpasswd")
    check(volume["secret"] == {"secretName": "pier-users", "items": [{"key": "users.htpasswd", "path": "htpasswd"}]},
          f"htpasswd volume: {volume}")
    mount = next(m for m in pier_container(objects)["volumeMounts"] if m["name"] == "htpasswd")
    check(mount == {"name": "htpasswd", "mountPath": "/etc/pier-private", "readOnly": True}, f"mount: {mount}")
    check(replicas_of(objects) != 1, "pushes scale out with the replicas (no sticky sessions)")
    # Off by default: nothing of it rendered.
    objects, _ = render(prod)
    check("[private]" not in pier_toml(objects), "private off by default")
    check(all(v["name"] != "htpasswd" for v in pier_deployment(objects)["spec"]["template"]["spec"]["volumes"]),
          "no htpasswd volume when off")
    for what, over, expect in [
        ("private without a Secret of users", {"htpasswdSecret": ""}, "htpasswdSecret"),
    ]:
        msg = render_fails(merge(values, {"config": {"private": over}}))
        check(msg is not None and expect in msg, f"refusing {what}: {msg}")
    msg = render_fails({"config": {"private": {"enabled": True, "htpasswdSecret": "u", "alias": "own"}}})
    check(msg is not None and "config.domains" in msg, f"an alias without domains: {msg}")


def scenario_refused() -> None:
    for what, values, expect in REFUSED:
        msg = render_fails(values)
        check(msg is not None, f"the chart accepts {what}: {values}")
        check(expect in msg, f"refusing {what}, the message should mention {expect!r}: {msg}")


def pier_own_defaults(pier: Path) -> dict:
    """The effective configuration without a file, from the binary itself."""
    run = subprocess.run([str(pier), "check-config"], env={"PATH": os.environ.get("PATH", "")},
                         capture_output=True, text=True, timeout=60, cwd=tempfile.gettempdir())
    check(run.returncode == 0, f"check-config without a file: {run.stderr}")
    return tomllib.loads(run.stdout)


def builtin_endpoints(pier: Path) -> dict[str, str]:
    """Pier's built-in upstream table, from the binary itself."""
    return {u["registry"]: u["endpoints"][0].rstrip("/") for u in pier_own_defaults(pier)["upstreams"]}


def scenario_node_configs(pier: Path) -> None:
    builtin = builtin_endpoints(pier)
    mirror = "http://10.96.0.50:5000"

    # containerd: one directory per registry, each a hosts.toml for Pier.
    certs = K8S / "containerd" / "certs.d"
    files = {d.name: (d / "hosts.toml").read_text() for d in sorted(certs.iterdir()) if d.is_dir()}
    check({"docker.io", "registry.k8s.io"} <= set(files), f"containerd hosts for {sorted(files)}")
    for registry, text in files.items():
        hosts = tomllib.loads(text)
        check(registry in builtin, f"containerd/{registry}: not a built-in upstream, Pier would refuse ns={registry}")
        check(hosts["server"].rstrip("/") == builtin[registry], f"containerd/{registry}: server {hosts['server']} != {builtin[registry]}")
        check(list(hosts["host"]) == [mirror], f"containerd/{registry}: hosts {list(hosts['host'])}")
        check(hosts["host"][mirror]["capabilities"] == ["pull", "resolve"], f"containerd/{registry}: capabilities")

    # The DaemonSet writes exactly those files.
    docs = [d for d in yaml.safe_load_all((K8S / "daemonset-containerd-hosts.yaml").read_text()) if d]
    for d in docs:
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    check(cm["data"] == files, "the DaemonSet's ConfigMap matches deploy/k8s/containerd/certs.d")
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    check(any(v.get("hostPath", {}).get("path") == "/etc/containerd/certs.d" for v in vols.values()), "writes /etc/containerd/certs.d")
    check(any(v.get("configMap", {}).get("name") == cm["metadata"]["name"] for v in vols.values()), "mounts the ConfigMap")
    check("config_path" in (K8S / "daemonset-containerd-hosts.yaml").read_text(), "explains config_path")

    # CRI-O: a mirror per registry, in add-a-prefix form.
    crio = tomllib.loads((K8S / "crio" / "registries.conf").read_text())
    prefixes = [r["prefix"] for r in crio["registry"]]
    check(set(prefixes) == set(files), f"CRI-O registries {prefixes} != containerd's {sorted(files)}")
    for r in crio["registry"]:
        check(r["location"] == r["prefix"], f"CRI-O {r['prefix']}: location {r['location']}")
        check(r["mirror"] == [{"location": f"10.96.0.50:5000/{r['prefix']}", "insecure": True}], f"CRI-O {r['prefix']}: {r['mirror']}")

    # k3s: mirrors in registries.yaml.
    k3s = yaml.safe_load((K8S / "k3s" / "registries.yaml").read_text())
    check(set(k3s) == {"mirrors"} and set(k3s["mirrors"]) == set(files), f"k3s mirrors {sorted(k3s['mirrors'])}")
    for registry, m in k3s["mirrors"].items():
        check(m == {"endpoint": ["http://10.43.0.50:5000"]}, f"k3s {registry}: {m}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pier", required=True, type=Path, help="the pier binary (target/debug/pier)")
    ap.add_argument("--keep", type=Path, help="write the rendered pier.toml and env files here")
    ap.add_argument("--only", action="append", metavar="SCENARIO", help="run only this scenario (repeatable)")
    ap.add_argument("--dump-defaults", type=Path, metavar="JSON",
                    help="write the default rendering's pier.toml, pod and container spec here and exit")
    args = ap.parse_args()
    if args.dump_defaults:
        objects, _ = render({})
        args.dump_defaults.write_text(json.dumps({
            "pier_toml": pier_toml(objects),
            "pod": pier_deployment(objects)["spec"]["template"]["spec"],
            "container": pier_container(objects),
        }))
        return 0
    args.pier = args.pier.resolve()
    if not args.pier.is_file():
        ap.error(f"no pier binary at {args.pier}")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    helm_python.disable_logging()

    scenarios = {
        "defaults": ("chart defaults: one replica, fs + embedded on an emptyDir",
                     lambda: scenario_defaults(args.pier, args.keep)),
        "production": ("production values: S3 + Redis, HPA, Ingress, Secrets",
                       lambda: scenario_production(args.pier, args.keep)),
        "variants": ("variants: existingSecret, in-cluster Redis, PVC, S3 + embedded",
                     lambda: scenario_variants(args.pier, args.keep)),
        "tuning": ("server, limits, fetch, access and otel values",
                   lambda: scenario_tuning(args.pier, args.keep)),
        "private": ("the private namespace with users from a Secret",
                    lambda: scenario_private(args.pier, args.keep)),
        "refused": ("values the chart refuses", scenario_refused),
        "node-configs": ("node configs in deploy/k8s", lambda: scenario_node_configs(args.pier)),
    }
    if args.only:
        unknown = set(args.only) - set(scenarios)
        if unknown:
            ap.error(f"unknown scenario {sorted(unknown)}; choose from {sorted(scenarios)}")
        scenarios = {k: v for k, v in scenarios.items() if k in args.only}
    failed = 0
    for name, run in scenarios.values():
        start = time.monotonic()
        try:
            run()
            print(f"ok   {name} ({time.monotonic() - start:.1f}s)")
        except Failed as e:
            failed += 1
            print(f"FAIL {name}: {e}")
        except helm_python.HelmError as e:
            failed += 1
            print(f"FAIL {name}: helm: {e}")
    print(f"render_check: {len(scenarios) - failed} of {len(scenarios)} scenarios passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
