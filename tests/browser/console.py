"""The operator console in a real browser (Debian's Chromium, driven by
Playwright), against a running Pier with real pulls behind it.

tests/browser.rs sets the scene (upstreams, pulls) and runs this script
with a JSON description of what it did; the script checks what each page
shows, saves a screenshot of each page at a phone and a desktop width, and
fails on any JavaScript console error. Exit status 0 means every check
passed; failures are printed one per line.
"""

import hashlib
import json
import re
import sys
import threading
import time
import urllib.request

from playwright.sync_api import sync_playwright

WIDTHS = (390, 1280)
ARGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

spec = json.loads(sys.argv[1])
base = spec["base"]
out = spec["out"]
failures = []
console_errors = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def metrics():
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    cache = {}
    for m in re.finditer(r'^pier_cache_lookups_total\{([^}]*)\} (\d+)', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        cache[(labels["kind"], labels["outcome"])] = int(m.group(2))
    served = {}
    for m in re.finditer(r'^pier_blob_bytes_served_total\{source="(\w+)",[^}]*\} (\d+)', text, re.M):
        served[m.group(1)] = served.get(m.group(1), 0) + int(m.group(2))
    return cache, served


def watch(page, name):
    def on_console(msg):
        if msg.type == "error":
            console_errors.append(f"{name}: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda e: console_errors.append(f"{name}: {e}"))


def shoot(page, name):
    width = page.viewport_size["width"]
    page.screenshot(path=f"{out}/{name}-{width}.png", full_page=True)


def text(page, selector):
    return page.locator(selector).first.inner_text()


def dashboard(page):
    """The dashboard's figures match /metrics once published."""
    cache, served = metrics()
    requests = sum(cache.values())
    from_cache = sum(n for (_, outcome), n in cache.items()
                     if outcome in ("hit", "revalidated", "stale"))
    stale = sum(n for (_, outcome), n in cache.items() if outcome == "stale")
    want = f"{from_cache:,} of {requests:,} requests"
    deadline = time.time() + 15
    shown = ""
    while time.time() < deadline:
        page.goto(base + "/")
        page.wait_for_selector("#hit-ratio-all")
        shown = page.locator(".card", has=page.locator("#hit-ratio-all")).inner_text()
        if want in shown:
            break
        time.sleep(1)
    check(want in shown, f"dashboard shows {want!r} as /metrics counts (got {shown!r})")
    ratio = f"{from_cache / requests * 100:.1f} %"
    check(text(page, "#hit-ratio-all") == ratio, f"dashboard hit ratio is {ratio}")
    row = page.locator("tr", has=page.locator("td", has_text=spec["stale_registry"])).first
    cells = row.locator("td").all_inner_texts()
    check(cells[4] == str(stale) and stale > 0,
          f"{spec['stale_registry']} shows {stale} stale serve(s) as /metrics does (row {cells})")
    check(cells[1] != "0", f"{spec['stale_registry']} shows its upstream requests ({cells})")
    cached_bytes = served.get("cache", 0)
    check(cached_bytes > 0, "some blob bytes were served from the cache")
    top = page.locator("a", has_text=spec["pulled"]).count()
    check(top > 0, f"most pulled lists {spec['pulled']}")


def search(page):
    page.goto(base + "/repositories")
    page.get_by_label("Search cached repositories").fill(spec["search"])
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"q="))
    page.wait_for_selector("table, .notice")
    names = page.locator("main table a").all_inner_texts()
    check(spec["pulled"] in names, f"search {spec['search']!r} finds {spec['pulled']} ({names})")
    check(spec["unpulled"] not in names,
          f"search {spec['search']!r} leaves out unpulled {spec['unpulled']} ({names})")
    page.goto(base + "/repositories?q=" + spec["nothing"])
    page.wait_for_selector(".notice")
    check("No cached repository" in text(page, ".notice"), "an empty search says what to do next")


def repository(page):
    page.goto(base + "/repositories/" + spec["pulled"])
    page.wait_for_selector("main table")
    tags = page.locator("main table tbody tr td:first-child").all_inner_texts()
    check(spec["pulled_tag"] in tags, f"the repository page lists tag {spec['pulled_tag']} ({tags})")
    page.wait_for_selector(".cmd code")
    commands = page.locator(".cmd code").all_inner_texts()
    check(any("docker pull" in c for c in commands), f"the repository page has pull commands ({commands})")


def index_page(page):
    want = spec["index"]
    page.goto(base + "/images/" + want["name"])
    page.wait_for_selector("h2:has-text('Platforms')")
    shown = page.locator("main table tbody tr td:first-child").all_inner_texts()
    check(sorted(shown) == sorted(want["platforms"]),
          f"the index page lists platforms {want['platforms']} (shown {shown})")


def image_page(page):
    want = spec["image"]
    page.goto(base + "/images/" + want["name"])
    page.wait_for_selector("h2:has-text('Layers')")
    sizes = [int(s) for s in page.locator(".layer-size").evaluate_all(
        "els => els.map(e => e.dataset.bytes)")]
    check(sizes == want["layer_sizes"], f"the image page's layer sizes {sizes} match the manifest's {want['layer_sizes']}")
    shown = page.locator(".layer-size").all_inner_texts()
    check(all(s.endswith("B") for s in shown), f"layer sizes read as sizes ({shown})")
    page.wait_for_selector(".cmd code")


def explain(page):
    for case in spec["explain"]:
        page.goto(base + "/explain")
        page.get_by_label("An image, as you would pull it").fill(case["ref"])
        page.get_by_role("button", name="Explain").click()
        page.wait_for_url(re.compile(r"ref="))
        page.wait_for_selector("h2, .notice")
        body = page.locator("main").inner_text()
        for needle in case["shows"]:
            check(needle in body, f"explain {case['ref']!r} shows {needle!r}")
        for needle in case.get("hides", []):
            check(needle not in body, f"explain {case['ref']!r} does not show {needle!r}")
        shoot(page, "explain-" + case["name"])


def activity(page):
    """A slow cold fetch shows while it runs; its bytes arrive intact."""
    slow = spec["slow"]
    got = {}

    def pull():
        with urllib.request.urlopen(slow["url"], timeout=120) as r:
            got["digest"] = "sha256:" + hashlib.sha256(r.read()).hexdigest()

    t = threading.Thread(target=pull)
    t.start()
    seen = False
    deadline = time.time() + 20
    while time.time() < deadline and not seen:
        page.goto(base + "/activity")
        page.wait_for_selector("h2:has-text('Cold fetches now')")
        row = page.locator("tr", has=page.locator("a", has_text=slow["repository"]))
        if row.count() > 0 and row.locator("progress").count() > 0:
            text = row.first.inner_text()
            seen = "/s" in text and "upstream" in text
        if not seen:
            time.sleep(0.5)
    check(seen, f"the activity page shows the cold fetch of {slow['repository']} from upstream, with its speed")
    shoot(page, "activity-fetching")
    t.join(120)
    check(got.get("digest") == slow["digest"], "the slow blob arrived whole and verified")


def failures_listed(page):
    try:
        urllib.request.urlopen(base + spec["failing"], timeout=10)
    except urllib.error.HTTPError:
        pass
    deadline = time.time() + 10
    body = ""
    while time.time() < deadline:
        page.goto(base + "/activity")
        page.wait_for_selector("h2:has-text('Recent failures')")
        body = page.locator("main").inner_text()
        if spec["failing"] in body:
            break
        time.sleep(0.5)
    check(spec["failing"] in body, f"recent failures list {spec['failing']} with its reason")


def admin(page):
    """The token is asked once and kept for the tab; prewarm starts a job
    the activity page follows to the end; purge empties the cache's entry."""
    a = spec["admin"]
    page.goto(base + "/explain?ref=" + a["prewarm"])
    page.get_by_role("button", name="Give the token").click()
    page.get_by_label("Token", exact=True).fill(a["token"])
    page.get_by_role("button", name="Keep for this session").click()
    page.get_by_role("button", name="Prewarm").click()
    page.wait_for_selector("text=Prewarm job")
    check(page.get_by_role("button", name="Admin token set").count() == 1, "the footer says the token is set")
    deadline = time.time() + 30
    state = ""
    while time.time() < deadline:
        page.goto(base + "/activity")
        page.wait_for_selector("h2:has-text('Sync jobs')")
        row = page.locator("tr", has_text=a["prewarm"])
        state = row.first.inner_text() if row.count() else ""
        if "done" in state or "failed" in state:
            break
        time.sleep(0.5)
    check("done" in state, f"the prewarm job shows on the activity page and finishes ({state!r})")
    shoot(page, "activity-job")

    page.goto(base + "/explain?ref=" + a["purge"])
    page.wait_for_selector("h2:has-text('In the cache')")
    check("not cached" not in text(page, "main"), f"{a['purge']} is cached before the purge")
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Purge from cache").click()
    page.wait_for_selector("text=The next pull asks upstream again")
    page.reload()
    page.wait_for_selector("h2:has-text('In the cache')")
    check("not cached" in text(page, "main"), f"{a['purge']} is no longer cached after the purge")
    check(page.get_by_role("button", name="Purge from cache").count() == 0,
          "no purge button for what is not cached")


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
    for width in WIDTHS:
        context = browser.new_context(viewport={"width": width, "height": 900})
        page = context.new_page()
        watch(page, f"{width}px")
        if width == WIDTHS[-1]:
            # Timing (first paint) belongs to the benchmark
            # (tests/bench/console_paint.py): the suite shares the machine.
            dashboard(page)
            search(page)
            repository(page)
            index_page(page)
            image_page(page)
            explain(page)
            failures_listed(page)
            activity(page)
        for name, path in spec["pages"].items():
            page.goto(base + path)
            page.wait_for_load_state("networkidle")
            shoot(page, name)
        if width == WIDTHS[-1]:
            # Last: it changes what the cache holds.
            admin(page)
        context.close()
    browser.close()

check(not console_errors, f"no JavaScript console errors ({console_errors})")
print(f"{len(failures)} failure(s)")
sys.exit(1 if failures else 0)
