#!/usr/bin/env python3
"""What sharing recency costs. Prints figures; it is not a test.

With a budget on the bucket (`[cache] max_size`), every blob a replica
serves is noted as a use (in memory, written to Redis in one batch every
5 s). Two replicas on the same S3 server and Redis, one with a budget
(uses tracked) and one without (not tracked), each with a local cache so
warm blobs come from local disk, are measured side by side in one run:

- warm blob requests per second (wrk, a 4 KiB blob: the cost per request);
- warm blob CPU seconds per GiB (curl, a 256 MiB blob read --downloads
  times; /proc/PID/stat);
- warm manifest-by-tag requests per second (wrk).

Needs the backends (tests/backends.sh: PIER_TEST_S3_*, PIER_TEST_REDIS_URL),
wrk and curl, and a built pier:

  tests/bench/uses_cost.py --pier target/release/pier [--rounds 3] [--seconds 5] [--downloads 8]

Python 3.11 standard library only.
"""

import argparse
import hashlib
import http.server
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from benchkit import cpu_seconds, download, free_port, wait_healthy

MiB = 1 << 20


def upstream(blobs, manifest):
    """A fake registry serving `blobs` (digest -> bytes) and one manifest
    under team/app:v1; its URL."""
    media = "application/vnd.oci.image.manifest.v1+json"

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        def do_HEAD(self):
            self.do_GET(body=False)

        def do_GET(self, body=True):
            if self.path == "/v2/":
                data, ctype = b"{}", "application/json"
            elif self.path in ("/v2/team/app/manifests/v1",
                               "/v2/team/app/manifests/sha256:" + hashlib.sha256(manifest).hexdigest()):
                data, ctype = manifest, media
            elif self.path.startswith("/v2/team/app/blobs/") and self.path[19:] in blobs:
                data, ctype = blobs[self.path[19:]], "application/octet-stream"
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            if ctype == media:
                self.send_header("Docker-Content-Digest", "sha256:" + hashlib.sha256(data).hexdigest())
            self.end_headers()
            if body:
                self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def wrk(url, seconds):
    out = subprocess.run(["wrk", "-t2", "-c32", f"-d{seconds}s", url], capture_output=True, text=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or "Non-2xx" in out or "Socket errors" in out:
        sys.exit(f"wrk failed against {url}:\n{out}")
    return float(m.group(1))


class Replica:
    def __init__(self, name, env, up, work, extra):
        self.name = name
        self.port = free_port()
        ns = f"uses-{name}-{random.getrandbits(32):x}"
        config = work / f"{name}.toml"
        config.write_text(
            f'listen = "127.0.0.1:{self.port}"\nbuiltin_upstreams = false\ndefault_registry = "corp.example"\n'
            f'[storage]\nkind = "s3"\nbucket = "{env["PIER_TEST_S3_BUCKET"] or "pier-test"}"\n'
            f'prefix = "{ns}"\nendpoint = "{env["PIER_TEST_S3_ENDPOINT"]}"\n'
            f'access_key_id = "{env["PIER_TEST_S3_ACCESS_KEY"]}"\n'
            f'secret_access_key = "{env["PIER_TEST_S3_SECRET_KEY"]}"\n'
            f'spool_path = "{work}/{name}/spool"\nlocal_cache_path = "{work}/{name}/copies"\n'
            f'local_cache_size = "2GiB"\n'
            f'[metadata]\nkind = "redis"\nurl = "{env["PIER_TEST_REDIS_URL"]}"\nkey_prefix = "{ns}:"\n'
            f'{extra}'
            f'[[upstreams]]\nregistry = "corp.example"\nendpoints = ["{up}"]\n'
        )
        self.proc = subprocess.Popen([ARGS.pier, "serve", "--config", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        wait_healthy(self.base, self.proc)

    def warm(self, urls):
        for url in urls:
            assert download(url)[0] == 200, url
        # Stored, then read once from the bucket into the local copy.
        for _ in range(600):
            m = urllib.request.urlopen(f"{self.base}/metrics").read().decode()
            if "pier_blob_fetches_in_flight 0" in m:
                break
            time.sleep(0.1)
        time.sleep(1)
        for url in urls:
            assert download(url)[0] == 200, url
        time.sleep(1)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=40)


def main():
    env = {k: os.environ.get(k, "") for k in ["PIER_TEST_S3_ENDPOINT", "PIER_TEST_S3_ACCESS_KEY",
                                                "PIER_TEST_S3_SECRET_KEY", "PIER_TEST_S3_BUCKET",
                                                "PIER_TEST_REDIS_URL"]}
    if not env["PIER_TEST_S3_ENDPOINT"] or not env["PIER_TEST_REDIS_URL"]:
        sys.exit("PIER_TEST_S3_ENDPOINT / PIER_TEST_REDIS_URL are not set: start tests/backends.sh")
    rng = random.Random(11)
    small = rng.randbytes(4096)
    big = b"".join(rng.randbytes(MiB) for _ in range(ARGS.size_mib))
    blobs = {"sha256:" + hashlib.sha256(b).hexdigest(): b for b in (small, big)}
    small_d, big_d = list(blobs)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": small_d, "size": len(small)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": big_d, "size": len(big)}],
    }).encode()
    up = upstream(blobs, manifest)
    work = Path(tempfile.mkdtemp(prefix="pier-uses-"))
    replicas = [
        Replica("tracked", env, up, work, '[cache]\nmax_size = "100GiB"\n'),
        Replica("untracked", env, up, work, ""),
    ]
    figures = {r.name: {"blob rps": [], "blob cpu/GiB": [], "manifest rps": []} for r in replicas}
    try:
        for r in replicas:
            r.warm([f"{r.base}/v2/corp.example/team/app/manifests/v1"] +
                   [f"{r.base}/v2/corp.example/team/app/blobs/{d}" for d in blobs])
        gib = len(big) / (1 << 30)
        for _ in range(ARGS.rounds):
            for r in replicas:
                f = figures[r.name]
                f["blob rps"].append(wrk(f"{r.base}/v2/corp.example/team/app/blobs/{small_d}", ARGS.seconds))
                f["manifest rps"].append(wrk(f"{r.base}/v2/corp.example/team/app/manifests/v1", ARGS.seconds))
                before = cpu_seconds(r.proc.pid)
                for _ in range(ARGS.downloads):
                    assert download(f"{r.base}/v2/corp.example/team/app/blobs/{big_d}") == (200, len(big))
                f["blob cpu/GiB"].append((cpu_seconds(r.proc.pid) - before) / (ARGS.downloads * gib))
    finally:
        for r in replicas:
            r.stop()
    print(f"Uses tracked (a bucket budget) against not, S3 + Redis, local cache; "
          f"{ARGS.rounds} rounds, wrk {ARGS.seconds}s x 32 connections (min / median / max):")
    for name, f in figures.items():
        for key, values in f.items():
            values.sort()
            fmt = "{:.2f}" if "cpu" in key else "{:.0f}"
            print(f"  {name:10} {key:13} " + " / ".join(fmt.format(v) for v in
                                                      (values[0], values[len(values) // 2], values[-1])))
    for key in ("blob rps", "manifest rps", "blob cpu/GiB"):
        a = sorted(figures["tracked"][key])[ARGS.rounds // 2]
        b = sorted(figures["untracked"][key])[ARGS.rounds // 2]
        print(f"  median {key}: tracked / untracked = {a / b:.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pier", required=True)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--downloads", type=int, default=8, help="reads of the big blob per round")
    ARGS = p.parse_args()
    main()
