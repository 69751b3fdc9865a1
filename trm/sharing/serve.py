"""A local chat server: an OpenAI-compatible `/v1/chat/completions` endpoint and a chat page beside it.

Design decisions:
- Python's own `http.server`, no web framework: one model, one machine, 127.0.0.1 by default, no
  dependency to install or audit. Its weak points are closed here explicitly (`ServerLimits`), which is
  less code than adopting an ASGI stack and keeps every bound visible in one place. Replies come from
  `trm.generation`, the code behind `make chat`, so the prompt format, the history trimming and the
  sampling defaults are the ones the model was trained and measured with.
- Bounded: a request body of at most `max_body_bytes` (413 above it, 411 without a length), socket
  timeouts (a slow or silent client gets 408 and is closed), at most `max_connections` at once (503 beyond),
  a deadline per request (waiting for the model and generating, 503 / `finish_reason` "length"), and a
  client that has gone is skipped before and during its generation.
- Browsers are kept out unless invited: the Host header must name the listening address (so DNS rebinding
  cannot reach it), a cross-origin `Origin` must be in `allowed_origins` (403 otherwise; those get CORS
  headers and preflight answers), and POST bodies must be `application/json`, which a web page cannot
  send to another origin without a preflight. `--api_key` requires `Authorization: Bearer KEY` on `/v1/`.
- Every malformed request is answered with an HTTP error and one sentence (OpenAI's error shape), never a
  dropped connection: bad JSON, NaN, deep nesting, lone surrogates, out-of-range numbers, bad request lines.
  The log is one line per request with control characters escaped; a client that hangs up is one line.
- `/v1/chat/completions` and `/v1/completions` (plain text continued), each unstreamed or, with `"stream": true`,
  as Server-Sent Events in OpenAI's chunk format ending with `data: [DONE]`; `usage` in both.
- A conversation longer than the context loses its oldest exchanges first; when even the last message
  cannot fit, the answer is HTTP 400 with OpenAI's `context_length_exceeded` code and its length.
- Generation holds a lock: requests are answered one at a time, each with all the CPU threads.
- `finish_reason` is "stop" when the reply ended with `<|endoftext|>` by itself, else "length".
"""

from __future__ import annotations

import ipaddress
import json
import math
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from data.files import is_text
from data.prompt_format import generation_prompt, validate_messages
from trm.generation import SamplingSettings, context_length, fit_history, generate_text

CHAT_PAGE = Path(__file__).resolve().parent / "chat_page.html"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")


@dataclass
class ServerLimits:
    max_body_bytes: int = 1_000_000
    socket_timeout_s: float = 30.0
    max_connections: int = 16
    request_deadline_s: float = 120.0
    max_json_depth: int = 32
    max_temperature: float = 2.0


class RequestError(ValueError):
    def __init__(self, message: str, code: str = "invalid_request_error", status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.code, self.status = code, status


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _depth(value, limit: int, level: int = 0) -> int:
    if level > limit:
        return level
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return max((_depth(child, limit, level + 1) for child in children), default=level)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_request_body(body: bytes, limits: ServerLimits):
    """The JSON of a request body, or a RequestError naming what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(f"the request body is not UTF-8 (byte {error.start}).") from None
    try:
        request = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError(f"the request body nests deeper than {limits.max_json_depth} levels.") from None
    except ValueError as error:
        raise RequestError(f"the request body is not JSON ({error}).") from None
    if _depth(request, limits.max_json_depth) > limits.max_json_depth:
        raise RequestError(f"the request body nests deeper than {limits.max_json_depth} levels.")
    return request


class ClientGone(StoppingCriteria):
    """Stops a generation whose client has closed its connection, or whose deadline has passed."""

    def __init__(self, connection: socket.socket | None, deadline: float):
        self.connection, self.deadline = connection, deadline
        self.stopped_because: str | None = None

    def client_left(self) -> bool:
        if self.connection is None:
            return False
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        if time.monotonic() > self.deadline:
            self.stopped_because = "deadline"
        elif self.client_left():
            self.stopped_because = "client left"
        return self.stopped_because is not None


class SseText(TextStreamer):
    """Hands each piece of decoded reply text to `send` as it is generated (Server-Sent Events). Whitespace at the
    end of a piece waits for the next one, so a chat reply streams exactly as the unstreamed reply reads (stripped)."""

    def __init__(self, tokenizer, send, strip: bool):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.send, self.strip, self.pending, self.started = send, strip, "", False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        text = self.pending + text
        if self.strip and not self.started:
            text = text.lstrip()
        ready = text.rstrip() if self.strip else text
        self.pending = "" if stream_end else text[len(ready):]
        if ready:
            self.started = True
            self.send(ready)


class ChatService:
    """The model and what a request may change (reply length, temperature, streaming)."""

    def __init__(self, model, tokenizer, model_name: str, settings: SamplingSettings | None = None,
                 limits: ServerLimits | None = None):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.settings = settings or SamplingSettings(max_new_tokens=min(128, context_length(model) // 2))
        self.limits = limits or ServerLimits()
        self.lock = threading.Lock()

    def _settings(self, request: dict) -> SamplingSettings:
        settings = replace(self.settings)
        max_tokens = request.get("max_tokens", request.get("max_completion_tokens"))
        if max_tokens is not None:
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens < context_length(self.model):
                raise RequestError(f"max_tokens must be an integer from 1 to {context_length(self.model) - 1}.")
            settings.max_new_tokens = max_tokens
        temperature = request.get("temperature")
        if temperature is not None:
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
                    or not 0 <= temperature <= self.limits.max_temperature:
                raise RequestError(f"temperature must be a number from 0 to {self.limits.max_temperature:g}.")
            # Below 0.01 sampling is greedy in effect, and dividing logits by 1e-300 overflows: answer greedily.
            settings.temperature = float(temperature) if temperature >= 0.01 else 0.0
        if not isinstance(request.get("stream", False), bool):
            raise RequestError("stream must be true or false.")
        return settings

    def _messages(self, request) -> list[dict]:
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            raise RequestError("the request body must be a JSON object with a 'messages' list.")
        for position, message in enumerate(request["messages"]):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str) and not is_text(content):
                raise RequestError(f"messages: message {position} holds a lone surrogate (\\ud800-\\udfff), not text.")
        try:
            messages = validate_messages(request["messages"])
        except (ValueError, AttributeError) as error:
            raise RequestError(f"messages: {str(error)[:300]}.") from None
        if not messages or messages[-1]["role"] != "user":
            raise RequestError("the last message must be the user's.")
        return messages

    def prepare_chat(self, request) -> dict:
        """A chat request checked and fitted to the context: the prompt to continue and what the reply reports."""
        messages = self._messages(request)
        settings = self._settings(request)
        budget = context_length(self.model) - settings.max_new_tokens
        conversation = fit_history(messages, self.tokenizer, budget)
        if conversation is None:
            length = len(self.tokenizer(generation_prompt(messages[-1:]))["input_ids"])
            raise RequestError(
                f"the last message is {length} tokens; with {settings.max_new_tokens} tokens for the reply this model's "
                f"context of {context_length(self.model)} tokens leaves room for {budget}. Shorten it.",
                code="context_length_exceeded")
        return {"kind": "chat", "prompt": generation_prompt(conversation), "settings": settings,
                "stream": request.get("stream", False), "usage_in_stream": _include_usage(request),
                "extra": {"trm": {"messages_dropped": len(messages) - len(conversation)}}}

    def prepare_completion(self, request) -> dict:
        """A `/v1/completions` request: plain text continued as it is (no chat format), as phase 1 models are used."""
        if not isinstance(request, dict) or not isinstance(request.get("prompt"), str) or not request["prompt"]:
            raise RequestError("the request body must be a JSON object with a non-empty 'prompt' string.")
        if not is_text(request["prompt"]):
            raise RequestError("prompt holds a lone surrogate (\\ud800-\\udfff), not text.")
        settings = self._settings(request)
        length = len(self.tokenizer(request["prompt"])["input_ids"])
        if length + settings.max_new_tokens > context_length(self.model):
            raise RequestError(f"the prompt is {length} tokens; with {settings.max_new_tokens} tokens to generate this model's "
                               f"context of {context_length(self.model)} tokens is exceeded. Shorten it.", code="context_length_exceeded")
        return {"kind": "text", "prompt": request["prompt"], "settings": settings, "stream": request.get("stream", False),
                "usage_in_stream": _include_usage(request), "extra": {}}

    def generate(self, job: dict, connection: socket.socket | None = None, send=None) -> tuple[str, bool]:
        """Run a prepared job under the model's lock and the request's deadline; `send` receives streamed text."""
        deadline = time.monotonic() + self.limits.request_deadline_s
        watch = ClientGone(connection, deadline)
        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise RequestError("the model is busy with other requests; try again later.", "server_busy", HTTPStatus.SERVICE_UNAVAILABLE)
        try:
            if watch.client_left():
                raise ConnectionAbortedError("the client left before its reply was generated")
            streamer = SseText(self.tokenizer, send, strip=job["kind"] == "chat") if send else None
            text, ended = generate_text(self.model, self.tokenizer, job["prompt"], job["settings"], streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([watch]))
        finally:
            self.lock.release()
        if watch.stopped_because == "client left":
            raise ConnectionAbortedError("the client left during its generation")
        return (text.strip() if job["kind"] == "chat" else text), ended

    def usage(self, job: dict, text: str, ended: bool) -> dict:
        prompt_tokens = len(self.tokenizer(job["prompt"])["input_ids"])
        completion_tokens = len(self.tokenizer(text)["input_ids"]) + int(ended)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

    def response(self, job: dict, text: str, ended: bool) -> dict:
        """The whole answer, in the OpenAI shape of a chat completion or a text completion."""
        finish = "stop" if ended else "length"
        if job["kind"] == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            kind, prefix = "chat.completion", "chatcmpl"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            kind, prefix = "text_completion", "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": self.model_name,
                "choices": [choice], "usage": self.usage(job, text, ended), **job["extra"]}


def _include_usage(request: dict) -> bool:
    options = request.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def printable(text: str, limit: int = 200) -> str:
    """Text for the log: control characters escaped, so a request cannot write terminal escapes."""
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return escaped[:limit] + ("..." if len(escaped) > limit else "")


@dataclass
class AccessPolicy:
    """Who may talk to the server: the Host names it answers to, the browser origins it invites, the API key."""

    host: str
    port: int
    allowed_origins: tuple[str, ...] = ()
    api_key: str | None = None

    def host_allowed(self, header: str | None) -> bool:
        if not header:
            return False
        if not is_loopback(self.host) and self.host not in ("0.0.0.0", "::"):
            names = (self.host,)
        elif is_loopback(self.host):
            names = LOOPBACK_NAMES
        else:
            return True  # bound to every interface: any name may reach it, so the API key is what protects it
        return any(header in (name, f"{name}:{self.port}") for name in names)

    @staticmethod
    def same_origin(origin: str | None, host_header: str | None) -> bool:
        """The chat page's own requests: their Origin is the address (Host) the page was served from."""
        return origin is None or (host_header is not None and origin == f"http://{host_header}")

    def origin_allowed(self, origin: str | None, host_header: str | None) -> bool:
        return self.same_origin(origin, host_header) or origin in self.allowed_origins or "*" in self.allowed_origins


def make_handler(service: ChatService, policy: AccessPolicy) -> type[BaseHTTPRequestHandler]:
    limits = service.limits

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = limits.socket_timeout_s

        def _cors_headers(self) -> dict:
            headers = getattr(self, "headers", None)
            origin, host = (headers.get("Origin"), headers.get("Host")) if headers else (None, None)
            if not policy.same_origin(origin, host) and policy.origin_allowed(origin, host):
                return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
            return {}

        def _send(self, status: HTTPStatus, body: bytes, content_type: str, extra: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in {**self._cors_headers(), **(extra or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

        def _error(self, status: HTTPStatus, message: str, code: str, close: bool = False) -> None:
            if close:
                self.close_connection = True
            payload = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}}).encode()
            self._send(status, payload, "application/json", {"Connection": "close"} if close else None)

        def _admitted(self) -> bool:
            """Host, Origin and API key checks shared by every method; answers the refusal itself."""
            if not policy.host_allowed(self.headers.get("Host")):
                self._error(HTTPStatus.FORBIDDEN, "this server answers only requests addressed to its own host name.", "forbidden_host", close=True)
                return False
            if not policy.origin_allowed(self.headers.get("Origin"), self.headers.get("Host")):
                self._error(HTTPStatus.FORBIDDEN, "requests from this web page's origin are not allowed (see --allowed_origins).",
                            "forbidden_origin", close=True)
                return False
            if policy.api_key and self.path.startswith("/v1/") and self.command != "OPTIONS":
                if self.headers.get("Authorization", "") != f"Bearer {policy.api_key}":
                    self._error(HTTPStatus.UNAUTHORIZED, "a valid API key is required: Authorization: Bearer KEY.", "invalid_api_key")
                    return False
            return True

        def do_GET(self):
            if not self._admitted():
                return
            if self.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, CHAT_PAGE.read_bytes(), "text/html; charset=utf-8")
            elif self.path == "/v1/models":
                self._json(HTTPStatus.OK, {"object": "list", "data": [{"id": service.model_name, "object": "model", "owned_by": "trm"}]})
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such path: {printable(self.path)}", "not_found")

        def do_OPTIONS(self):
            if not self._admitted():
                return
            self._send(HTTPStatus.NO_CONTENT, b"", "text/plain", {
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Content-Type, Authorization", "Access-Control-Max-Age": "600"})

        def _read_body(self) -> bytes | None:
            length_header = self.headers.get("Content-Length")
            if length_header is None:
                self._error(HTTPStatus.LENGTH_REQUIRED, "a POST needs a Content-Length header.", "length_required", close=True)
                return None
            if not length_header.strip().isdigit():
                self._error(HTTPStatus.BAD_REQUEST, "Content-Length must be a non-negative integer.", "invalid_request_error", close=True)
                return None
            length = int(length_header)
            if length > limits.max_body_bytes:
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"the request body is {length:,} bytes; this server accepts at most {limits.max_body_bytes:,}.",
                            "request_too_large", close=True)
                return None
            chunks, received = [], 0
            while received < length:  # in pieces, so what came before a stall is counted, not lost
                try:
                    chunk = self.rfile.read1(min(65536, length - received))
                except socket.timeout:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
                received += len(chunk)
            body = b"".join(chunks)
            if len(body) < length:
                self._error(HTTPStatus.REQUEST_TIMEOUT, f"the request body ended after {len(body):,} of {length:,} bytes.",
                            "request_timeout", close=True)
                return None
            return body

        def do_POST(self):
            if not self._admitted():
                return
            prepare = {"/v1/chat/completions": service.prepare_chat, "/v1/completions": service.prepare_completion}.get(self.path)
            if prepare is None:
                return self._error(HTTPStatus.NOT_FOUND, f"no such path: {printable(self.path)}", "not_found", close=True)
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if content_type != "application/json":
                return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "the request body must be sent as Content-Type: application/json.",
                                   "unsupported_media_type", close=True)
            body = self._read_body()
            if body is None:
                return
            streaming = False
            try:
                job = prepare(parse_request_body(body, limits))
                if job["stream"]:
                    streaming = True
                    self._stream(job)
                else:
                    self._json(HTTPStatus.OK, service.response(job, *service.generate(job, self.connection)))
            except RequestError as error:
                if streaming:  # headers are sent: the error goes into the stream, as OpenAI's API does
                    self._event({"error": {"message": str(error), "type": "invalid_request_error", "code": error.code}})
                    self.close_connection = True
                else:
                    self._error(error.status, str(error), error.code)
            except ConnectionError as gone:  # the client left: before, during or after its generation
                self.close_connection = True
                print(printable(f"{self.client_address[0]}: {gone or type(gone).__name__}; nothing more sent"), flush=True)
            except Exception as error:  # a bug must still answer, not drop the connection
                if not streaming:
                    self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"the server failed on this request ({type(error).__name__}).",
                                "server_error", close=True)
                self.close_connection = True

        def _event(self, payload) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            self.wfile.write(f"data: {data}\n\n".encode("utf-8"))
            self.wfile.flush()

        def _stream(self, job: dict) -> None:
            """Server-Sent Events as OpenAI sends them: a chunk per piece of text, a last chunk with the finish
            reason, the usage when `stream_options.include_usage` asks for it, then `data: [DONE]`."""
            chat = job["kind"] == "chat"
            identity = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                        "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                        "model": service.model_name}

            def chunk(delta: dict | str, finish: str | None = None) -> dict:
                choice = ({"index": 0, "delta": delta, "finish_reason": finish} if chat else
                          {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish})
                return {**identity, "choices": [choice]}

            self.close_connection = True  # the stream's end is the connection's end
            self.send_response(HTTPStatus.OK)
            for key, value in {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "close",
                               **self._cors_headers()}.items():
                self.send_header(key, value)
            self.end_headers()
            if chat:
                self._event(chunk({"role": "assistant", "content": ""}))
            text, ended = service.generate(job, self.connection,
                                           send=lambda piece: self._event(chunk({"content": piece} if chat else piece)))
            self._event(chunk({} if chat else "", "stop" if ended else "length"))
            if job["usage_in_stream"]:
                self._event({**identity, "choices": [], "usage": service.usage(job, text, ended)})
            self._event("[DONE]")

        def send_error(self, code, message=None, explain=None):
            """The stdlib's own error paths (a bad request line, a 414) answer in the API's JSON shape, with a status
            line even for an HTTP/0.9-style request, and close the connection."""
            if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
                self.request_version = "HTTP/1.0"
            status = HTTPStatus(code)
            self._error(status, printable(message or status.phrase), "invalid_request_error", close=True)

        def handle_one_request(self):
            try:
                super().handle_one_request()
            except socket.timeout:
                self.close_connection = True
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                print(f"{printable(self.client_address[0])}: the client closed the connection", flush=True)

        def log_request(self, code="-", size="-"):  # one line per request: "POST /v1/chat/completions -> 200"
            print(printable(f"{getattr(self, 'requestline', '') or '(no request line)'} -> {getattr(code, 'value', code)}"), flush=True)

        def log_message(self, format, *args):  # the stdlib's error paths, possibly before the request line is parsed
            print(printable(f"{getattr(self, 'requestline', '') or '(no request line)'} -> {format % args}"), flush=True)

    return Handler


class BoundedServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` with a cap on simultaneous connections (503 beyond it) and one-line errors."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                body = b'{"error": {"message": "too many connections; try again later.", "type": "invalid_request_error", "code": "server_busy"}}'
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        print(f"{client_address[0]}: connection error, closed", flush=True)


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 8000, allowed_origins: tuple[str, ...] = (),
                api_key: str | None = None) -> BoundedServer:
    policy = AccessPolicy(host, port, tuple(allowed_origins), api_key)
    server = BoundedServer((host, port), make_handler(service, policy), service.limits.max_connections)
    policy.port = server.server_address[1]  # port 0 picks a free one
    return server
