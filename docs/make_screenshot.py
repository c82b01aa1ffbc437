"""Save docs/demo.png: the demo page answering a question in memory and rag mode side by side.

Start the demo first (`memstore demo`), then: python docs/make_screenshot.py [--url URL] [--question Q]
Needs Debian's chromium and `pip install playwright` (no browser download).
"""
import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000/")
    parser.add_argument("--question", default="Which journal mode lets readers and a writer proceed concurrently?")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "demo.png")
    args = parser.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
        page.goto(args.url)
        page.wait_for_selector("#model option", state="attached")
        page.fill("#question", args.question)
        page.select_option("#mode", "both")
        page.click("#ask")
        page.wait_for_function("document.querySelectorAll('.panel .sources li').length > 0 && "
                               "document.querySelectorAll('.panel').length == 2 && "
                               "document.querySelectorAll('.panel')[1].querySelector('.sources li')",
                               timeout=600_000)
        page.screenshot(path=str(args.out), full_page=False)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
