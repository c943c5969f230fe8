"""A headless Chromium screenshot of a FiftyOne App page, opened as a user opens it: the token URL that
`python -m fathompipe.app` prints (the first visit trades the token for a cookie).

    python -m support.app_screenshot URL OUT.png [--wait-s 20] [--size 1600x1000]

Needs `pip install playwright` and Debian's chromium (/usr/bin/chromium); prints the page's title, the
HTTP statuses it saw other than 2xx/3xx, and console errors, so a page that did not load says so.
"""
from __future__ import annotations

import argparse
import sys
from typing import List

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m support.app_screenshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--wait-s", type=float, default=20.0, help="time for the grid and its images to load")
    parser.add_argument("--size", default="1600x1000")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    width, height = (int(v) for v in args.size.split("x"))
    failed: List[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.on("response", lambda r: failed.append(f"{r.status} {r.url.split('?')[0]}") if r.status >= 400 else None)
        page.on("console", lambda m: failed.append(f"console {m.type}: {m.text[:200]}") if m.type == "error" else None)
        page.goto(args.url, wait_until="domcontentloaded")
        page.wait_for_timeout(args.wait_s * 1000)
        dismiss = page.get_by_text("Dismiss", exact=True)  # the App's "Explore Enterprise" pop-up over the grid
        if dismiss.count():
            dismiss.first.click()
            page.wait_for_timeout(1000)
        page.screenshot(path=args.out)
        print(f"{args.out}: '{page.title()}' at {page.url.split('?')[0]}")
        browser.close()
    for line in failed:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
