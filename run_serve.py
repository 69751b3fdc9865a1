#!/usr/bin/env python
"""Serve a model on this machine: an OpenAI-compatible endpoint and a chat page.

    python run_serve.py outputs/phase2 [--host 127.0.0.1] [--port 8000]

Open http://127.0.0.1:8000/ for the chat page; OpenAI clients use base_url http://127.0.0.1:8000/v1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trm.cli import run_main
from trm.generation import load_model
from trm.serve import ChatService, make_server


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_name_or_path")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 keeps it on this machine")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model_name_or_path)
    server = make_server(ChatService(model, tokenizer, Path(args.model_name_or_path).name), args.host, args.port)
    print(f"chat page: http://{args.host}:{args.port}/  (OpenAI base_url: http://{args.host}:{args.port}/v1; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    run_main(main)
