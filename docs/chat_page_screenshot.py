"""The README's screenshot of the chat page: python docs/chat_page_screenshot.py MODEL_DIR (needs Debian's chromium)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import shutil, threading
from playwright.sync_api import sync_playwright
from trm.generation import load_model
from trm.serve import ChatService, make_server
model, tok = load_model(sys.argv[1])
httpd = make_server(ChatService(model, tok, Path(sys.argv[1]).name), "127.0.0.1", 0)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{httpd.server_address[1]}/"
import torch; torch.manual_seed(0)
with sync_playwright() as p:
    b = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
    page = b.new_page(viewport={"width": 900, "height": 560})
    page.goto(url)
    for msg in ["Hi! How are you today?", "Name three primary colours."]:
        page.fill("#message", msg); page.press("#message", "Enter")
        page.wait_for_function("document.querySelectorAll('.turn').length % 2 == 0 && !document.querySelector('#send').disabled", timeout=60000)
    page.screenshot(path="docs/chat_page.png")
    b.close()
httpd.shutdown()
