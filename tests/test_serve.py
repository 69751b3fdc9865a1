"""`make serve`: the OpenAI-compatible endpoint and the chat page, over real HTTP on 127.0.0.1."""

import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from benchmarks.serve_probe import exchange, request_bytes, run_probe, status_of, too_many_connections
from data.prompt_format import generation_prompt
from trm.generation import fit_history, load_model
from trm.sharing.serve import ChatService, ClientGone, ServerLimits, make_server


def _start(model_dir, limits=None, **options):
    model, tokenizer = load_model(model_dir)
    service = ChatService(model, tokenizer, "trm-test", limits=limits)
    httpd = make_server(service, "127.0.0.1", 0, **options)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, service


@pytest.fixture()
def server(model_dir):
    httpd, _ = _start(model_dir)
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


def test_a_message_typed_into_the_page_in_headless_chromium_gets_a_reply(server, tmp_path):
    if not shutil.which("chromium"):
        if os.environ.get("TRM_REQUIRE_BROWSER"):  # set by .ci/run, which installs it
            pytest.fail("TRM_REQUIRE_BROWSER is set but Debian's chromium is not installed")
        pytest.skip("needs Debian's chromium (apt install chromium)")
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


# Bounds under hostile input: each case below once dropped the connection, parked a thread or answered
# a request it should have refused.

def _raw(port: int, data: bytes) -> bytes:
    return exchange(port, data, timeout=30)


_status, _request = status_of, request_bytes


@pytest.fixture()
def bounded(model_dir):
    httpd, service = _start(model_dir, ServerLimits(socket_timeout_s=1.0, max_connections=4,
                                                     request_deadline_s=1.0),
                            allowed_origins=("http://localhost:3000",))
    yield httpd.server_address[1], service
    httpd.shutdown()
    httpd.server_close()


def test_bodies_are_bounded_and_a_silent_client_is_answered_and_closed(bounded):
    port, _ = bounded
    assert _status(_raw(port, _request(port, headers={"Content-Length": "50000000"}, body=b""))) == 413
    assert _status(_raw(port, _request(port, headers={"Content-Length": "-1"}, body=b""))) == 400
    assert _status(_raw(port, _request(port, headers={"Content-Length": None}, body=b""))) == 411
    short = _raw(port, _request(port, headers={"Content-Length": "100"}, body=b'{"messages"'))  # then silence
    assert _status(short) == 408 and b"ended after 11 of 100 bytes" in short
    with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:  # an idle connection is closed
        assert idle.recv(1) == b""


def test_browsers_of_other_origins_and_other_host_names_are_refused(bounded):
    port, _ = bounded
    assert _status(_raw(port, _request(port, headers={"Host": "evil.example"}))) == 403  # DNS rebinding
    assert _status(_raw(port, _request(port, headers={"Origin": "http://evil.example"}))) == 403
    assert _status(_raw(port, _request(port, headers={"Content-Type": "text/plain"}))) == 415  # a form post
    invited = _raw(port, _request(port, headers={"Origin": "http://localhost:3000"}))
    assert _status(invited) == 200 and b"Access-Control-Allow-Origin: http://localhost:3000" in invited
    preflight = _raw(port, _request(port, "OPTIONS", body=b"", headers={"Origin": "http://localhost:3000", "Content-Type": None}))
    assert _status(preflight) == 204 and b"Access-Control-Allow-Headers: Content-Type, Authorization" in preflight
    assert _status(_raw(port, _request(port, headers={"Origin": f"http://127.0.0.1:{port}"}))) == 200  # the chat page itself


def test_an_api_key_is_required_when_set(model_dir):
    httpd, _ = _start(model_dir, api_key="s3cret")
    port = httpd.server_address[1]
    try:
        assert _status(_raw(port, _request(port))) == 401
        assert _status(_raw(port, _request(port, headers={"Authorization": "Bearer wrong"}))) == 401
        assert _status(_raw(port, _request(port, headers={"Authorization": "Bearer s3cret"}))) == 200
        assert _status(_raw(port, _request(port, "GET", "/", body=b""))) == 200  # the page itself is public
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("body, words", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "not JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
    (b"[" * 5000 + b"]" * 5000, "nests deeper"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": true}', "max_tokens"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_malformed_requests_get_400_and_a_sentence(bounded, body, words):
    port, _ = bounded
    answer = _raw(port, _request(port, body=body))
    assert _status(answer) == 400 and words in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["message"]


def test_the_hostile_input_probe_holds_against_the_server(model_dir):
    httpd, _ = _start(model_dir, ServerLimits(socket_timeout_s=1.0, max_connections=4))
    try:
        results = run_probe(httpd.server_address[1], max_connections=4)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert {name: r for name, r in results.items() if r["held"] < r["tried"]} == {}


def test_the_connection_check_fails_where_the_cap_is_higher(model_dir):
    httpd, _ = _start(model_dir, ServerLimits(socket_timeout_s=5.0, max_connections=6))
    try:
        port = httpd.server_address[1]
        assert not too_many_connections(port, cap=4)
        assert too_many_connections(port, cap=6)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_tiny_temperature_answers_greedily(bounded):
    port, _ = bounded
    body = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-300}'
    assert _status(_raw(port, _request(port, body=body))) == 200


def test_bad_request_lines_are_answered_and_the_log_is_escaped(bounded, capsys):
    port, _ = bounded
    assert _status(_raw(port, b"GARBAGE\r\n\r\n")) == 400
    assert _status(_raw(port, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")) == 414
    assert _status(_raw(port, b"GET / HTTP/9.9\r\n\r\n")) in (400, 505)
    _raw(port, _request(port, "GET", "/\x1b[31mred", body=b""))
    log = capsys.readouterr().out
    assert "\x1b" not in log and "\\x1b[31mred" in log


def test_connections_beyond_the_cap_get_503(bounded):
    port, _ = bounded
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
    try:
        time.sleep(0.2)  # the server has accepted them
        assert _status(_raw(port, _request(port))) == 503
    finally:
        for connection in held:
            connection.close()


def test_a_request_waiting_past_its_deadline_for_the_model_gets_503(bounded):
    port, service = bounded
    with service.lock:  # another generation holds the model
        answer = _raw(port, _request(port))
    assert _status(answer) == 503 and b"busy" in answer


def test_a_client_that_left_is_noticed(model_dir):
    here, there = socket.socketpair()
    watch = ClientGone(here, deadline=time.monotonic() + 60)
    assert not watch(None, None)
    there.close()
    assert watch(None, None) and watch.stopped_because == "client left"
    here.close()


def test_history_fitting_tokenises_each_exchange_about_once(tokenizer):
    calls = []

    def counting(text, *args, **kwargs):
        calls.append(len(text))
        return tokenizer(text, *args, **kwargs)

    messages = []
    for i in range(2000):
        messages += [{"role": "user", "content": f"Message {i}."}, {"role": "assistant", "content": "Fine."}]
    messages.append({"role": "user", "content": "Last."})
    fitted = fit_history(messages, counting, 40)
    assert fitted[-1]["content"] == "Last." and len(tokenizer(generation_prompt(fitted))["input_ids"]) <= 40
    assert len(calls) <= 2001 + 5 and sum(calls) < 3 * len(generation_prompt(messages))


@pytest.fixture()
def talking_server(tmp_path, tokenizer):
    """A server whose model writes a few words before it ends (greedy: the same reply every time)."""
    from conftest import model_preferring
    from trm.training import default_generation_config

    model = model_preferring(tokenizer(" cat", add_special_tokens=False)["input_ids"][0], strength=8.0)
    model.generation_config = default_generation_config(tokenizer)
    model.save_pretrained(tmp_path / "talking")
    tokenizer.save_pretrained(tmp_path / "talking")
    httpd, _ = _start(tmp_path / "talking")
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_the_openai_client_gets_the_same_reply_streamed_and_unstreamed(talking_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=talking_server, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Tell me about cats."}]
    whole = client.chat.completions.create(model="trm-test", messages=messages, temperature=0, max_tokens=12)
    reply = whole.choices[0].message.content
    assert reply and whole.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="trm-test", messages=messages, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    text = client.completions.create(model="trm-test", prompt="The river", temperature=0, max_tokens=10)
    assert text.object == "text_completion" and text.choices[0].text and text.usage.prompt_tokens == 2
    pieces = list(client.completions.create(model="trm-test", prompt="The river", temperature=0, max_tokens=10, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == text.choices[0].text
    request = urllib.request.Request(f"{talking_server}/chat/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"messages": messages, "stream": True, "max_tokens": 4}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        events = response.read().decode().split("\n\n")
    assert response.headers["Content-Type"] == "text/event-stream" and events[-2:] == ["data: [DONE]", ""]
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|context of 64"):
        client.completions.create(model="trm-test", prompt="word " * 100, max_tokens=10)


def test_beyond_loopback_the_page_works_under_any_name_and_other_origins_stay_out(model_dir):
    model, tokenizer = load_model(model_dir)
    httpd = make_server(ChatService(model, tokenizer, "trm-test"), "0.0.0.0", 0, api_key="k")
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        lan = f"192.168.7.7:{port}"
        key = {"Authorization": "Bearer k", "Host": lan}
        assert _status(_raw(port, _request(port, headers={**key, "Origin": f"http://{lan}"}))) == 200
        assert _status(_raw(port, _request(port, headers={**key, "Origin": "http://attacker.example"}))) == 403
        assert _status(_raw(port, _request(port, headers={"Host": lan}))) == 401
    finally:
        httpd.shutdown()
        httpd.server_close()
