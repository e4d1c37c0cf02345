#!/usr/bin/env python3
"""How fast the console's pages paint. Prints figures; it is not a test.

Starts `pier serve` (fs store, embedded metadata, no upstream traffic),
then loads each console page in Debian's headless Chromium (Playwright for
Python, as tests/setup.sh installs them) --rounds times after one warm-up
load, and prints first contentful paint p50 / max per page. The peer in
the same run: a static HTML file of the same size served by the same
Chromium from `file://`, the floor for a page of that size.

  tests/bench/console_paint.py --pier target/release/pier [--rounds 20]
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from benchkit import free_port, wait_healthy

PAGES = ["/", "/repositories", "/activity", "/explain?ref=nginx:1.27"]
ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def paint(page, url):
    page.goto(url)
    for _ in range(200):
        got = page.evaluate(
            "() => performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? null")
        if got is not None:
            return got
        time.sleep(0.01)
    return None


def main(args):
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cfg = Path(tmp, "pier.toml")
        cfg.write_text(f'listen = "127.0.0.1:{port}"\nbuiltin_upstreams = false\n'
                       f'[storage]\nkind = "fs"\npath = "{tmp}/data"\n'
                       f'[[upstreams]]\nregistry = "docker.io"\nendpoints = ["http://127.0.0.1:9"]\n')
        pier = subprocess.Popen([args.pier, "serve", "--config", cfg],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base, pier)
            shell = Path(tmp, "static.html")
            shell.write_text("<!doctype html><html><head><title>static</title></head><body>"
                             "<main><h1>Dashboard</h1><p>" + "x" * 1000 + "</p></main></body></html>")
            rows = []
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                for label, url in [(path, base + path) for path in PAGES] + [("static file (peer)", shell.as_uri())]:
                    paint(page, url)
                    times = [paint(page, url) for _ in range(args.rounds)]
                    times = [t for t in times if t is not None]
                    rows.append((label, statistics.median(times), max(times)))
                browser.close()
            print(f"First contentful paint, warm Pier, {args.rounds} loads each (p50 / max, ms):")
            for label, p50, worst in rows:
                print(f"  {label:28s} {p50:6.0f} / {worst:6.0f}")
        finally:
            pier.terminate()
            pier.wait(10)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pier", required=True)
    ap.add_argument("--rounds", type=int, default=20)
    sys.exit(main(ap.parse_args()))
