#!/usr/bin/env python3
"""What checking bucket reads costs. Prints figures; it is not a test.

A whole blob read back from S3 is hashed as it streams to the client, its
last chunk held back until the digest matched. A Range read is passed
through as the bucket sends it. So the same stored blob, read whole
(verified) and as `Range: bytes=0-` (the same bytes, unverified), through
one replica on S3 with no local cache, gives the cost of the check: Pier's
CPU seconds per GiB for each, from /proc/PID/stat.

Needs an S3 server (tests/backends.sh; the PIER_TEST_S3_* variables) and a
built pier:

  source <(bash tests/backends.sh start DIR)   # or tests/run.sh's backends
  tests/bench/verify_cpu.py --pier target/release/pier [--size-mib 256] [--rounds 5]

Python 3.11 standard library only.
"""

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchkit import cpu_seconds, download, free_port, serve_blob, wait_healthy

MiB = 1 << 20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pier", required=True)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    env = {k: os.environ.get(k, "") for k in
           ["PIER_TEST_S3_ENDPOINT", "PIER_TEST_S3_ACCESS_KEY", "PIER_TEST_S3_SECRET_KEY", "PIER_TEST_S3_BUCKET"]}
    if not env["PIER_TEST_S3_ENDPOINT"]:
        sys.exit("PIER_TEST_S3_ENDPOINT is not set: start tests/backends.sh")

    rng = random.Random(7)
    blob = b"".join(rng.randbytes(MiB) for _ in range(args.size_mib))
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    upstream = serve_blob(blob, digest)
    work = Path(tempfile.mkdtemp(prefix="pier-verify-"))
    port = free_port()
    config = work / "pier.toml"
    config.write_text(
        f'listen = "127.0.0.1:{port}"\nbuiltin_upstreams = false\ndefault_registry = "corp.example"\n'
        f'[storage]\nkind = "s3"\nbucket = "{env["PIER_TEST_S3_BUCKET"] or "pier-test"}"\n'
        f'prefix = "verify-{random.getrandbits(32):x}"\nendpoint = "{env["PIER_TEST_S3_ENDPOINT"]}"\n'
        f'access_key_id = "{env["PIER_TEST_S3_ACCESS_KEY"]}"\nsecret_access_key = "{env["PIER_TEST_S3_SECRET_KEY"]}"\n'
        f'spool_path = "{work}/spool"\n'
        f'[metadata]\nkind = "embedded"\npath = "{work}/meta"\n'
        f'[[upstreams]]\nregistry = "corp.example"\nendpoints = ["{upstream}"]\n'
    )
    pier = subprocess.Popen([args.pier, "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, pier)
        url = f"{base}/v2/corp.example/team/app/blobs/{digest}"
        # Cold: fetched, verified, uploaded. Then wait for the upload.
        assert download(url) == (200, len(blob))
        time.sleep(1)
        for _ in range(600):
            metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
            if "pier_blob_fetches_in_flight 0" in metrics:
                break
            time.sleep(0.1)
        time.sleep(1)
        gib = len(blob) / (1 << 30)
        figures = {"whole (verified)": [], "Range bytes=0- (passed through)": []}
        for _ in range(args.rounds):
            for name, headers in (("whole (verified)", ()), ("Range bytes=0- (passed through)", ("Range: bytes=0-",))):
                before = cpu_seconds(pier.pid)
                status, size = download(url, headers)
                assert status in (200, 206) and size == len(blob), (status, size)
                figures[name].append((cpu_seconds(pier.pid) - before) / gib)
        print(f"Pier CPU seconds per GiB read from S3 ({args.size_mib} MiB blob, {args.rounds} rounds, min / median / max):")
        for name, values in figures.items():
            values.sort()
            print(f"  {name:34} {values[0]:.2f} / {values[len(values) // 2]:.2f} / {values[-1]:.2f}")
    finally:
        pier.send_signal(signal.SIGTERM)
        pier.wait(timeout=40)


if __name__ == "__main__":
    main()
