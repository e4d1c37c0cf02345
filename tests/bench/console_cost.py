#!/usr/bin/env python3
"""What the operator console costs the data plane. Prints figures; it is not
a test.

Two replicas side by side on the same S3 server and Redis, each with a local
cache so warm blobs come from local disk: one with the console on (its
publisher writes the replica's figures to Redis every 2 s, and `--viewers`
dashboards poll `/api/v1/stats` and `/api/v1/activity` once a second each,
five times what an open page asks), one with `[ui] enabled = false` (no
figures kept, nothing published). Per round and replica: wrk against a warm
4 KiB blob and a warm manifest by tag (32 connections).

Needs the backends (tests/backends.sh: PIER_TEST_S3_*, PIER_TEST_REDIS_URL),
wrk and curl, and a built pier:

  tests/bench/console_cost.py --pier target/release/pier [--rounds 5] [--seconds 5] [--viewers 10]

Python 3.11 standard library only; shares the upstream and wrk runner of
uses_cost.py.
"""

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import uses_cost
from uses_cost import Replica, upstream, wrk


def viewers(base, n, stop, polls):
    """`n` dashboards polling the console's figures once a second each."""
    def view():
        while not stop.is_set():
            for path in ("/api/v1/stats", "/api/v1/activity"):
                try:
                    with urllib.request.urlopen(base + path, timeout=10) as r:
                        json.loads(r.read())
                except OSError:
                    if stop.is_set():
                        return
                    raise
                polls.append(1)
            stop.wait(1)

    threads = [threading.Thread(target=view, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def main(args):
    env = {k: os.environ.get(k, "") for k in ["PIER_TEST_S3_ENDPOINT", "PIER_TEST_S3_ACCESS_KEY",
                                                "PIER_TEST_S3_SECRET_KEY", "PIER_TEST_S3_BUCKET",
                                                "PIER_TEST_REDIS_URL"]}
    if not env["PIER_TEST_S3_ENDPOINT"] or not env["PIER_TEST_REDIS_URL"]:
        sys.exit("PIER_TEST_S3_ENDPOINT / PIER_TEST_REDIS_URL are not set: start tests/backends.sh")
    rng = random.Random(12)
    small = rng.randbytes(4096)
    config_blob = rng.randbytes(512)
    blobs = {"sha256:" + hashlib.sha256(b).hexdigest(): b for b in (config_blob, small)}
    config_d, small_d = list(blobs)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d,
                   "size": len(config_blob)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": small_d,
                    "size": len(small)}],
    }).encode()
    up = upstream(blobs, manifest)
    work = Path(tempfile.mkdtemp(prefix="pier-console-"))
    replicas = [
        Replica("console", env, up, work, ""),
        Replica("noconsole", env, up, work, "[ui]\nenabled = false\n"),
    ]
    figures = {r.name: {"blob rps": [], "manifest rps": []} for r in replicas}
    stop = threading.Event()
    polls = []
    try:
        for r in replicas:
            r.warm([f"{r.base}/v2/corp.example/team/app/manifests/v1"] +
                   [f"{r.base}/v2/corp.example/team/app/blobs/{d}" for d in blobs])
        viewers(replicas[0].base, args.viewers, stop, polls)
        started = time.monotonic()
        for _ in range(args.rounds):
            for r in replicas:
                f = figures[r.name]
                f["blob rps"].append(wrk(f"{r.base}/v2/corp.example/team/app/blobs/{small_d}", args.seconds))
                f["manifest rps"].append(wrk(f"{r.base}/v2/corp.example/team/app/manifests/v1", args.seconds))
        took = time.monotonic() - started
    finally:
        stop.set()
        for r in replicas:
            r.stop()
    print(f"Console on ({args.viewers} dashboards polling, {len(polls) / took:.1f} API reads/s) "
          f"against [ui] enabled = false, S3 + Redis, local cache; {args.rounds} rounds, "
          f"wrk {args.seconds}s x 32 connections (min / median / max):")
    for name, f in figures.items():
        for key, values in f.items():
            values.sort()
            print(f"  {name:10} {key:13} " + " / ".join(f"{v:.0f}" for v in
                                                      (values[0], values[len(values) // 2], values[-1])))
    for key in ("blob rps", "manifest rps"):
        a = sorted(figures["console"][key])[args.rounds // 2]
        b = sorted(figures["noconsole"][key])[args.rounds // 2]
        print(f"  median {key}: console / no console = {a / b:.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pier", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--viewers", type=int, default=10)
    args = p.parse_args()
    # Replica reads its binary from uses_cost's arguments.
    uses_cost.ARGS = args
    main(args)
