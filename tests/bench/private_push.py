#!/usr/bin/env python3
"""Pushing and pulling a large private image: Pier's private namespace
against distribution. Prints figures; it is not a test.

Each round makes a fresh one-layer image (random, so incompressible and new
to both servers) of --size-mib MiB as an OCI layout, then with skopeo, the
same client for both:

  push   skopeo copy oci:<layout> docker://<server>/<repo>:rN
  pull   skopeo copy docker://<server>/<repo>:rN dir:<fresh directory>

against, in turn:

  pier           `pier serve`, fs store, `[private]` with one user
  distribution   docker-registry (CNCF distribution) with filesystem storage
                 and htpasswd auth
  dist-no-auth   the same without auth (its data path alone)

Pier and distribution check the same user's password, a bcrypt hash of
cost 10: distribution at every request (skopeo sends Basic credentials
with each), Pier once, then by token and by a 5-minute memory of the right
password. For each:
the wall time and the server's CPU seconds per GiB moved (utime + stime
from /proc), medians over the rounds. Everything listens on loopback, and
the temporary directory is removed at the end.

  tests/bench/private_push.py --pier target/release/pier [--size-mib 256] [--rounds 3]

Needs skopeo and docker-registry (Debian packages). Python 3.11 standard
library only.
"""

import argparse
import gzip
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import cpu_seconds, free_port, wait_healthy, wait_port

MiB = 1 << 20
GiB = 1 << 30
USER, PASSWORD = "bench", "bench-password"


def write_blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"sha256:{digest}", len(data)


def make_image(layout, size):
    """A one-layer OCI image of `size` random bytes, gzipped (random bytes
    do not shrink), in `layout`: skopeo sends a gzip layer as it is, where
    it would compress an uncompressed one on the client first."""
    layout.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    raw = os.urandom(size)
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    layer, layer_size = write_blob(layout, gzip.compress(raw, compresslevel=1))
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    cfg, cfg_size = write_blob(layout, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": cfg_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": layer_size}],
    }).encode()
    m, m_size = write_blob(layout, manifest)
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m, "size": m_size}],
    }))
    return m


def skopeo(*args):
    started = time.monotonic()
    run = subprocess.run(["skopeo", "copy", "--insecure-policy", "--retry-times=0", *args],
                         capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"skopeo copy {' '.join(args)} failed:\n{run.stderr}")
    return time.monotonic() - started


def start_pier(binary, work, hash_):
    port = free_port()
    cfg = work / "pier.toml"
    cfg.write_text(
        f'listen = "127.0.0.1:{port}"\nbuiltin_upstreams = false\ndefault_registry = "r.bench.test"\n'
        f'[[upstreams]]\nregistry = "r.bench.test"\nendpoints = ["http://127.0.0.1:{free_port()}"]\n'
        f'[storage]\nkind = "fs"\npath = "{work / "pier-data"}"\n'
        f'[private]\nprefix = "private"\n[[private.users]]\nname = "{USER}"\n'
        f'password_hash = "{hash_}"\npush = ["**"]\n')
    proc = subprocess.Popen([binary, "serve", "--config", cfg], stdout=subprocess.DEVNULL,
                            stderr=open(work / "pier.log", "w"), env={**os.environ, "RUST_LOG": "warn"})
    wait_healthy(f"http://127.0.0.1:{port}", proc)
    return proc, f"127.0.0.1:{port}", "private/bench/big"


def start_distribution(work, hash_, auth=True):
    port = free_port()
    (work / "htpasswd").write_text(f"{USER}:{hash_}\n")
    cfg = work / "registry.yml"
    cfg.write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {work / 'dist-data'}\n"
        "  maintenance:\n    uploadpurging:\n      enabled: false\n"
        + (f"auth:\n  htpasswd:\n    realm: bench\n    path: {work / 'htpasswd'}\n" if auth else "")
        + f"http:\n  addr: 127.0.0.1:{port}\n  secret: pier-bench\n")
    proc = subprocess.Popen(["docker-registry", "serve", cfg], stdout=subprocess.DEVNULL,
                            stderr=open(work / "distribution.log", "w"))
    wait_port(port, proc)
    return proc, f"127.0.0.1:{port}", "bench/big"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pier", required=True, help="the pier binary (a release build)")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for tool in ["skopeo", "docker-registry"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (Debian: apt-get install skopeo docker-registry)")
    work = Path(tempfile.mkdtemp(prefix="pier-private-bench-"))
    procs = []
    try:
        hash_ = subprocess.run([args.pier, "users", "hash", "--cost", "10"], input=PASSWORD,
                               capture_output=True, text=True, check=True).stdout.strip()
        size = args.size_mib * MiB
        images = []
        for n in range(args.rounds):
            layout = work / f"image-{n}"
            images.append((layout, make_image(layout, size)))
        servers = {}
        for name, start in [("pier", lambda w: start_pier(args.pier, w, hash_)),
                            ("distribution", lambda w: start_distribution(w, hash_)),
                            ("dist-no-auth", lambda w: start_distribution(w, hash_, auth=False))]:
            d = work / name
            d.mkdir()
            proc, host, repo = start(d)
            procs.append(proc)
            servers[name] = (proc, host, repo)
        creds = f"{USER}:{PASSWORD}"
        results = {name: {"push_s": [], "push_cpu": [], "pull_s": [], "pull_cpu": []} for name in servers}
        for n, (layout, digest) in enumerate(images):
            for name, (proc, host, repo) in servers.items():
                ref = f"docker://{host}/{repo}:r{n}"
                cpu = cpu_seconds(proc.pid)
                took = skopeo("--dest-tls-verify=false", "--dest-creds", creds, f"oci:{layout}", ref)
                results[name]["push_s"].append(took)
                results[name]["push_cpu"].append((cpu_seconds(proc.pid) - cpu) / (size / GiB))
                out = work / f"pulled-{name}-{n}"
                cpu = cpu_seconds(proc.pid)
                took = skopeo("--src-tls-verify=false", "--src-creds", creds, ref, f"dir:{out}")
                results[name]["pull_cpu"].append((cpu_seconds(proc.pid) - cpu) / (size / GiB))
                results[name]["pull_s"].append(took)
                pulled = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
                if f"sha256:{pulled}" != digest:
                    sys.exit(f"{name} served another manifest for round {n}")
                shutil.rmtree(out)
        print(f"one-layer image of {args.size_mib} MiB, skopeo, {args.rounds} rounds, medians")
        print(f"{'server':<14}{'push s':>9}{'push CPU s/GiB':>16}{'pull s':>9}{'pull CPU s/GiB':>16}")
        for name, r in results.items():
            med = {k: statistics.median(v) for k, v in r.items()}
            print(f"{name:<14}{med['push_s']:>9.2f}{med['push_cpu']:>16.2f}{med['pull_s']:>9.2f}{med['pull_cpu']:>16.2f}")
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
