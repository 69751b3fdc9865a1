#!/usr/bin/env python
"""The README's screenshot of the chat page: `python docs/chat_page_screenshot.py MODEL_DIR` (needs Debian's chromium)."""

import shutil
import sys
import threading
from pathlib import Path

import torch
from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trm.generation import load_model  # noqa: E402
from trm.sharing.serve import ChatService, make_server  # noqa: E402

MESSAGES = ["Hi! How are you today?", "Name three primary colours."]


def main(model_dir: str, output: Path = Path(__file__).resolve().parent / "chat_page.png") -> None:
    model, tokenizer = load_model(model_dir)
    server = make_server(ChatService(model, tokenizer, Path(model_dir).name), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    torch.manual_seed(0)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 900, "height": 560})
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        for message in MESSAGES:
            page.fill("#message", message)
            page.press("#message", "Enter")
            page.wait_for_function("document.querySelectorAll('.turn').length % 2 == 0 && !document.querySelector('#send').disabled")
        page.screenshot(path=str(output))
        browser.close()
    server.shutdown()
    print(f"wrote {output}")


if __name__ == "__main__":
    main(sys.argv[1])
