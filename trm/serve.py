"""A local chat server: an OpenAI-compatible `/v1/chat/completions` endpoint and a chat page beside it.

Design decisions:
- Python's own `http.server`, no web framework: one model, one machine, 127.0.0.1 by default. Replies come
  from `trm.generation`, the code behind `make chat`, so the prompt format, the history trimming and the
  sampling defaults are the ones the model was trained and measured with (`transformers serve` would apply
  neither the trimming nor the defaults, and answers an over-long prompt with HTTP 500).
- A conversation longer than the context loses its oldest exchanges first, as in `make chat`; when even
  the last message cannot fit, the answer is HTTP 400 with OpenAI's `context_length_exceeded` code and
  a sentence saying how long it was. Malformed requests get HTTP 400 and a sentence too.
- Generation holds a lock: requests are answered one at a time, each with all the CPU threads.
- `finish_reason` is "stop" when the reply ended with `<|endoftext|>` by itself, else "length".
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from data.prompt_format import generation_prompt, validate_messages
from trm.generation import SamplingSettings, context_length, fit_history, generate_reply

CHAT_PAGE = Path(__file__).resolve().parent / "chat_page.html"


class RequestError(ValueError):
    def __init__(self, message: str, code: str = "invalid_request_error"):
        super().__init__(message)
        self.code = code


class ChatService:
    """The model and what a request may change (reply length, temperature)."""

    def __init__(self, model, tokenizer, model_name: str, settings: SamplingSettings | None = None):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.settings = settings or SamplingSettings(max_new_tokens=min(128, context_length(model) // 2))
        self.lock = threading.Lock()

    def complete(self, request: dict) -> dict:
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            raise RequestError("the request body must be a JSON object with a 'messages' list.")
        try:
            messages = validate_messages(request["messages"])
        except (ValueError, AttributeError) as error:
            raise RequestError(f"messages: {error}.") from None
        if not messages or messages[-1]["role"] != "user":
            raise RequestError("the last message must be the user's.")
        settings = replace(self.settings)
        max_tokens = request.get("max_tokens", request.get("max_completion_tokens"))
        if max_tokens is not None:
            if not isinstance(max_tokens, int) or not 1 <= max_tokens < context_length(self.model):
                raise RequestError(f"max_tokens must be an integer from 1 to {context_length(self.model) - 1}.")
            settings.max_new_tokens = max_tokens
        if request.get("temperature") is not None:
            if not isinstance(request["temperature"], (int, float)) or request["temperature"] < 0:
                raise RequestError("temperature must be a number >= 0.")
            settings.temperature = float(request["temperature"])
        budget = context_length(self.model) - settings.max_new_tokens
        conversation = fit_history(messages, self.tokenizer, budget)
        if conversation is None:
            length = len(self.tokenizer(generation_prompt(messages[-1:]))["input_ids"])
            raise RequestError(
                f"the last message is {length} tokens; with {settings.max_new_tokens} tokens for the reply this model's "
                f"context of {context_length(self.model)} tokens leaves room for {budget}. Shorten it.",
                code="context_length_exceeded")
        prompt_tokens = len(self.tokenizer(generation_prompt(conversation))["input_ids"])
        with self.lock:
            reply, ended = generate_reply(self.model, self.tokenizer, conversation, settings)
        completion_tokens = len(self.tokenizer(reply)["input_ids"]) + int(ended)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                         "finish_reason": "stop" if ended else "length"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "trm": {"messages_dropped": len(messages) - len(conversation)},
        }


def make_handler(service: ChatService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

        def _error(self, status: HTTPStatus, message: str, code: str) -> None:
            self._json(status, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

        def do_GET(self):
            if self.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, CHAT_PAGE.read_bytes(), "text/html; charset=utf-8")
            elif self.path == "/v1/models":
                self._json(HTTPStatus.OK, {"object": "list", "data": [{"id": service.model_name, "object": "model", "owned_by": "trm"}]})
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such path: {self.path}", "not_found")

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                return self._error(HTTPStatus.NOT_FOUND, f"no such path: {self.path}", "not_found")
            try:
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(length).decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                return self._error(HTTPStatus.BAD_REQUEST, "the request body is not JSON.", "invalid_request_error")
            try:
                self._json(HTTPStatus.OK, service.complete(request))
            except RequestError as error:
                self._error(HTTPStatus.BAD_REQUEST, str(error), error.code)

        def log_message(self, format, *args):  # one line per request, without the default's reverse DNS
            print(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}", flush=True)

    return Handler


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), make_handler(service))
