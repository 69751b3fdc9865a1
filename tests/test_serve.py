"""`make serve`: the OpenAI-compatible endpoint and the chat page, over real HTTP on 127.0.0.1."""

import json
import shutil
import threading
import urllib.error
import urllib.request

import pytest

from trm.generation import load_model
from trm.serve import ChatService, make_server


@pytest.fixture()
def server(model_dir):
    model, tokenizer = load_model(model_dir)
    httpd = make_server(ChatService(model, tokenizer, "trm-test"), "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _post(url, payload):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_chat_completions_answer_in_openai_shape(server):
    status, body = _post(f"{server}/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello there"}]})
    assert status == 200 and body["object"] == "chat.completion" and body["model"] == "trm-test"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"  # the model ends at once
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    with urllib.request.urlopen(f"{server}/v1/models", timeout=10) as response:
        assert json.loads(response.read())["data"][0]["id"] == "trm-test"


def test_too_long_or_malformed_requests_get_one_clear_sentence_not_a_server_error(server):
    url = f"{server}/v1/chat/completions"
    status, body = _post(url, {"messages": [{"role": "user", "content": "word " * 300}]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "context of 64 tokens" in body["error"]["message"]
    for payload, words in [(b"{not json", "not JSON"), ({"prompt": "hi"}, "'messages' list"),
                           ({"messages": [{"role": "assistant", "content": "hi"}]}, "alternate"),
                           ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
                           ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature")]:
        status, body = _post(url, payload)
        assert status == 400 and words in body["error"]["message"], (payload, body)
    status, body = _post(f"{server}/v1/other", {})
    assert status == 404


def test_a_long_conversation_keeps_its_latest_exchanges(server):
    messages = []
    for i in range(12):
        messages += [{"role": "user", "content": f"Message number {i} is here."}, {"role": "assistant", "content": "Fine."}]
    status, body = _post(f"{server}/v1/chat/completions", {"messages": messages + [{"role": "user", "content": "Last one."}]})
    assert status == 200 and body["trm"]["messages_dropped"] > 0
    assert body["usage"]["prompt_tokens"] <= 64 - 32


def test_the_chat_page_is_served_and_talks_to_the_endpoint(server):
    with urllib.request.urlopen(f"{server}/", timeout=10) as response:
        page = response.read().decode()
    assert response.headers["Content-Type"].startswith("text/html")
    assert 'fetch("/v1/chat/completions"' in page and 'id="message"' in page


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (apt install chromium)")
def test_a_message_typed_into_the_page_in_headless_chromium_gets_a_reply(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{server}/")
        page.fill("#message", "Hello there")
        page.press("#message", "Enter")
        page.wait_for_selector(".turn.assistant:not(:has-text('…'))", timeout=30_000)
        turns = page.locator(".turn").all_inner_texts()
        assert turns[0] == "You: Hello there" and turns[1].startswith("TRM:")
        page.fill("#message", "word " * 300)
        page.press("#message", "Enter")
        page.wait_for_selector(".turn.error", timeout=30_000)
        assert "context of 64 tokens" in page.locator(".turn.error").inner_text()
        page.screenshot(path=str(tmp_path / "chat.png"))
        browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 0
