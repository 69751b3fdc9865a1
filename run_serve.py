#!/usr/bin/env python
"""Serve a model on this machine: an OpenAI-compatible endpoint and a chat page.

    python run_serve.py outputs/phase2 [--host 127.0.0.1] [--port 8000] [--api_key KEY] [--allowed_origins URL ...]

Open http://127.0.0.1:8000/ for the chat page; OpenAI clients use base_url http://127.0.0.1:8000/v1.
The API key may also come from the TRM_API_KEY environment variable (keeps it out of `ps`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trm.cli import run_main
from trm.generation import load_model
from trm.recipe import RecipeError
from trm.sharing.serve import ChatService, ServerLimits, is_loopback, make_server


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_name_or_path")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 keeps it on this machine")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=os.environ.get("TRM_API_KEY"), help="require Authorization: Bearer KEY on /v1/")
    parser.add_argument("--allowed_origins", nargs="*", default=[],
                        help="web origins (e.g. http://localhost:3000) whose pages may call the API (CORS)")
    limits = ServerLimits()
    parser.add_argument("--max_body_bytes", type=int, default=limits.max_body_bytes)
    parser.add_argument("--request_deadline_s", type=float, default=limits.request_deadline_s)
    parser.add_argument("--max_connections", type=int, default=limits.max_connections)
    args = parser.parse_args(argv)
    for name in ("max_body_bytes", "request_deadline_s", "max_connections"):
        if getattr(args, name) <= 0:
            raise RecipeError(f"--{name} must be above 0.")
    limits = ServerLimits(max_body_bytes=args.max_body_bytes, request_deadline_s=args.request_deadline_s,
                          max_connections=args.max_connections)
    model, tokenizer = load_model(args.model_name_or_path)
    service = ChatService(model, tokenizer, Path(args.model_name_or_path).name, limits=limits)
    server = make_server(service, args.host, args.port, tuple(args.allowed_origins), args.api_key)
    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this machine can use the model "
              "(set --api_key or TRM_API_KEY).", file=sys.stderr, flush=True)
    print(f"chat page: http://{args.host}:{args.port}/  (OpenAI base_url: http://{args.host}:{args.port}/v1; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    run_main(main)
