#!/usr/bin/env python3
"""How long the fs store takes to come back within its budget. Prints
figures; it is not a test.

Writes N small blobs (default 10,000 of 10 KiB, named by their digests,
with spread modification times) into a store directory, sets
`[cache] max_size` so that the store is 20 % over it, and times:

  serve  `pier serve` from its start until `pier_cache_bytes` is within
         the budget (the store finds its blobs from `stat` alone, then
         evicts the least recently used down to 90 % of the budget)
  gc     `pier gc` on a fresh copy of the same directory

  tests/bench/evict_time.py --pier target/release/pier [--blobs 10000] [--size 10240]

Python 3.11 standard library only.
"""

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from benchkit import free_port


def fill(root, blobs, size):
    now = time.time()
    for i in range(blobs):
        data = i.to_bytes(8, "little") * (size // 8)
        hexd = hashlib.sha256(data).hexdigest()
        d = root / "blobs" / "sha256" / hexd[:2]
        d.mkdir(parents=True, exist_ok=True)
        path = d / hexd
        path.write_bytes(data)
        os.utime(path, (now - blobs + i, now - blobs + i))


def config(work, data, max_size, port):
    path = work / f"pier-{port}.toml"
    path.write_text(
        f'listen = "127.0.0.1:{port}"\n[storage]\nkind = "fs"\npath = "{data}"\n'
        f'[cache]\nmax_size = {max_size}\nmin_free = 0\n'
    )
    return path


def cache_bytes(base):
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("pier_cache_bytes "):
            return int(float(line.split()[1]))
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pier", required=True)
    p.add_argument("--blobs", type=int, default=10_000)
    p.add_argument("--size", type=int, default=10 * 1024)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pier-evict-"))
    template = work / "template"
    fill(template, args.blobs, args.size)
    total = args.blobs * (args.size // 8 * 8)
    max_size = int(total / 1.2)

    data = work / "serve"
    shutil.copytree(template, data, copy_function=shutil.copy2)
    port = free_port()
    started = time.monotonic()
    pier = subprocess.Popen([args.pier, "serve", "--config", str(config(work, data, max_size, port))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                used = cache_bytes(base)
                if used is not None and used <= max_size:
                    break
            except OSError:
                pass
            time.sleep(0.01)
        serve_s = time.monotonic() - started
    finally:
        pier.send_signal(signal.SIGTERM)
        pier.wait(timeout=40)

    data = work / "gc"
    shutil.copytree(template, data, copy_function=shutil.copy2)
    started = time.monotonic()
    subprocess.run([args.pier, "gc", "--config", str(config(work, data, max_size, free_port()))],
                   check=True, stdout=subprocess.DEVNULL)
    gc_s = time.monotonic() - started
    left = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
    print(f"{args.blobs} blobs of {args.size} bytes, 20 % over a budget of {max_size} bytes:")
    print(f"  pier serve, start to within budget: {serve_s:.2f} s")
    print(f"  pier gc: {gc_s:.2f} s ({left} bytes left, {left / max_size:.0%} of the budget)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
