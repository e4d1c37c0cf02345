#!/usr/bin/env python3
"""How quickly the console searches a large cache. Prints figures; it is
not a test.

Fills a fresh Redis with N cached repository names (the `repos` set Pier
keeps), starts Pier on it, and times `/api/v1/repositories?q=` for:

- the first search (it loads the list of names: one round trip per 10,000);
- searches while the list is fresh (a scan in memory): a rare substring, a
  common one (first page of 50), and the next page after it;
- the peer in the same run: reading every name from Redis once (what a
  search that went to the store each time would cost at the least).

  tests/bench/search.py --pier target/release/pier [--repos 100000] [--rounds 50]

Needs redis-server. Python 3.11 standard library only.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from benchkit import free_port, wait_healthy


def resp(*args):
    out = f"*{len(args)}\r\n"
    for a in args:
        a = str(a)
        out += f"${len(a.encode())}\r\n{a}\r\n"
    return out.encode()


def fill(port, prefix, names):
    """ZADDs `names` to `<prefix>repos`, 1,000 per command, pipelined."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        batch = 1000
        sent = 0
        for i in range(0, len(names), batch):
            args = ["ZADD", prefix + "repos"]
            for n in names[i:i + batch]:
                args += ["0", n]
            s.sendall(resp(*args))
            sent += 1
        got = b""
        while got.count(b"\r\n") < sent:
            got += s.recv(65536)


def read_all(port, prefix):
    """Seconds to read every name with one ZRANGE, as the peer."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        started = time.perf_counter()
        s.sendall(resp("ZRANGE", prefix + "repos", 0, -1))
        buf = b""
        header = None
        while True:
            buf += s.recv(1 << 20)
            if header is None and b"\r\n" in buf:
                header = int(buf[1:buf.index(b"\r\n")])
            # Each element is "$len\r\nname\r\n": count the lines.
            if header is not None and buf.count(b"\r\n") >= 1 + 2 * header:
                break
        return time.perf_counter() - started


def timed(url):
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        body = json.loads(r.read())
    return time.perf_counter() - started, body


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pier", required=True)
    ap.add_argument("--repos", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()

    registries = ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io", "gcr.io"]
    names = sorted(
        f"{registries[i % len(registries)]}/team{i % 997}/service-{i:06d}"
        for i in range(args.repos))
    with tempfile.TemporaryDirectory() as tmp:
        redis_port = free_port()
        redis = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
             "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        pier = None
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", redis_port)).close()
                    break
                except OSError:
                    time.sleep(0.05)
            prefix = "bench:"
            fill(redis_port, prefix, names)
            port = free_port()
            config = Path(tmp, "pier.toml")
            config.write_text(
                f'listen = "127.0.0.1:{port}"\nbuiltin_upstreams = false\n'
                f'[storage]\nkind = "fs"\npath = "{tmp}/data"\n'
                f'[metadata]\nkind = "redis"\nurl = "redis://127.0.0.1:{redis_port}"\n'
                f'key_prefix = "{prefix}"\n'
                + "".join(f'[[upstreams]]\nregistry = "{r}"\nendpoints = ["http://127.0.0.1:9"]\n'
                          for r in registries))
            pier = subprocess.Popen([args.pier, "serve", "--config", str(config)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base, pier)

            def search(q, n=50, last=None):
                query = {"q": q, "n": n}
                if last:
                    query["last"] = last
                return timed(f"{base}/api/v1/repositories?{urllib.parse.urlencode(query)}")

            first, body = search("service-099")
            print(f"{args.repos} repositories in Redis")
            print(f"first search (loads the names):  {first * 1000:8.1f} ms  "
                  f"({len(body['repositories'])} found)")
            rows = []
            for label, q, last in [("rare substring (10 of them)", "service-09999", None),
                                   ("no match (a full scan)", "no-such-name", None),
                                   ("common, first page of 50", "team1", None),
                                   ("common, next page", "team1", "__next__")]:
                times = []
                found = 0
                next_of = search("team1")[1]["next"]
                for _ in range(args.rounds):
                    # Stay within the list's freshness: time warm searches.
                    took, body = search(q, last=next_of if last else None)
                    times.append(took)
                    found = len(body["repositories"])
                times.sort()
                p50 = statistics.median(times) * 1000
                p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1000
                rows.append((label, p50, p99, found))
            for label, p50, p99, found in rows:
                print(f"{label:32s} p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  ({found} found)")
            peer = statistics.median(read_all(redis_port, prefix) for _ in range(5)) * 1000
            print(f"peer: one ZRANGE of every name   {peer:8.1f} ms")
        finally:
            if pier:
                pier.terminate()
                pier.wait(10)
            redis.terminate()
            redis.wait(10)


if __name__ == "__main__":
    sys.exit(main())
