#!/usr/bin/env python
"""Replay hostile input against `make serve` and say, per class, how many tries the server held.

    python benchmarks/serve_probe.py --url http://127.0.0.1:8000      # a server you started (make serve)
    python benchmarks/serve_probe.py --model outputs/phase2           # starts run_serve.py on a free port itself

"Held" means the server answered with the expected HTTP status and one-sentence JSON error (never a dropped
connection, a hang or a traceback), and stayed up to answer a normal request afterwards. Exit status 1 if any
class did not hold. The classes are the ones issue 20 found broken: oversized and malformed bodies, silent
clients, foreign Host and Origin headers, non-JSON content types, NaN and extreme numbers, lone surrogates,
deep nesting, bad request lines, a 2,000-exchange history, too many connections, and clients that hang up.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
HI = b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}'


def request_bytes(port: int, method: str = "POST", path: str = "/v1/chat/completions", body: bytes = HI,
                  headers: dict | None = None) -> bytes:
    """An HTTP/1.1 request; a header given as None is left out."""
    fields = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Content-Length": str(len(body)),
              "Connection": "close", **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None) + "\r\n"
    return head.encode("latin-1") + body


def exchange(port: int, data: bytes, timeout: float = 60.0, host: str = "127.0.0.1") -> bytes:
    """Send raw bytes and read the answer until the server closes or the declared body has arrived."""
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(data)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
            head, separator, body = answer.partition(b"\r\n\r\n")
            if separator:
                lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
                if lengths and len(body) >= lengths[0]:
                    break
        return answer


def status_of(answer: bytes) -> int | None:
    try:
        return int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def _one_sentence(answer: bytes) -> bool:
    try:
        return bool(json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return False


def probe_classes(port: int) -> dict[str, list[tuple[bytes, int]]]:
    """Each class: (raw request, expected status) pairs."""
    history = []
    for i in range(2000):
        history += [{"role": "user", "content": f"Message {i} of a long conversation."}, {"role": "assistant", "content": "Fine."}]
    long_chat = json.dumps({"messages": history + [{"role": "user", "content": "Last."}], "max_tokens": 4}).encode()
    chat = lambda extra: json.dumps({"messages": [{"role": "user", "content": "hi"}], **extra}).encode()  # noqa: E731
    return {
        "body too large (413)": [(request_bytes(port, headers={"Content-Length": "50000000"}, body=b""), 413)],
        "bad or missing Content-Length (400/411)": [
            (request_bytes(port, headers={"Content-Length": "-1"}, body=b""), 400),
            (request_bytes(port, headers={"Content-Length": "ten"}, body=b""), 400),
            (request_bytes(port, headers={"Content-Length": None}, body=b""), 411)],
        "not JSON content type (415)": [(request_bytes(port, headers={"Content-Type": "text/plain"}), 415),
                                        (request_bytes(port, headers={"Content-Type": None}), 415)],
        "foreign Host: DNS rebinding (403)": [(request_bytes(port, headers={"Host": "attacker.example"}), 403),
                                              (request_bytes(port, headers={"Host": None}), 403)],
        "foreign Origin: a web page (403)": [(request_bytes(port, headers={"Origin": "http://attacker.example"}), 403),
                                             (request_bytes(port, "OPTIONS", body=b"", headers={"Origin": "http://attacker.example"}), 403)],
        "malformed JSON (400)": [(request_bytes(port, body=b"{not json"), 400), (request_bytes(port, body=b"\xff\xfe{}"), 400),
                                 (request_bytes(port, body=b"[" * 100_000 + b"]" * 100_000), 400)],
        "bad numbers (400)": [(request_bytes(port, body=chat({})[:-1] + b', "temperature": NaN}'), 400),
                              (request_bytes(port, body=chat({})[:-1] + b', "temperature": Infinity}'), 400),
                              (request_bytes(port, body=chat({"temperature": 1e300})), 400),
                              (request_bytes(port, body=chat({"max_tokens": -5})), 400),
                              (request_bytes(port, body=chat({"max_tokens": True})), 400)],
        "tiny temperature answered greedily (200)": [(request_bytes(port, body=chat({"temperature": 1e-300, "max_tokens": 4})), 200)],
        "lone surrogate (400)": [(request_bytes(port, body=b'{"messages": [{"role": "user", "content": "\\ud800"}]}'), 400)],
        "bad request lines (400/414/505)": [(b"GARBAGE\r\n\r\n", 400), (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
                                            (b"GET / HTTP/2.0\r\n\r\n", 505)],
        "terminal escapes in the path (404)": [(request_bytes(port, "GET", "/\x1b[2J\x1b[31mred", body=b""), 404)],
        "2,000-exchange history (200, trimmed)": [(request_bytes(port, body=long_chat), 200)],
    }


def silent_client(port: int) -> bool:
    """A body announced and never sent: the server answers 408 once its socket timeout passes, and closes."""
    answer = exchange(port, request_bytes(port, headers={"Content-Length": "100"}, body=b'{"mess'), timeout=120)
    return status_of(answer) == 408


def too_many_connections(port: int, cap: int) -> bool:
    """`cap` idle connections, then one more: 503. A busy server may not have accepted the idle ones yet when the
    extra one arrives (it is then served), so each try waits twice as long; all waits stay under a second, shorter
    than the socket timeout that would close the idle ones."""
    for wait_s in (0.2, 0.4, 0.8):
        held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(cap)]
        try:
            time.sleep(wait_s)
            if status_of(exchange(port, request_bytes(port))) == 503:
                return True
        finally:
            for connection in held:
                connection.close()
    return False


def client_hangs_up(port: int) -> bool:
    """A client that leaves right after its request: the server stays up and answers the next one."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(request_bytes(port, body=b'{"messages": [{"role": "user", "content": "Tell me a story."}]}'))
    time.sleep(0.5)
    return status_of(exchange(port, request_bytes(port))) == 200


def run_probe(port: int, max_connections: int) -> dict[str, dict]:
    results = {}
    for name, cases in probe_classes(port).items():
        held = 0
        for data, expected in cases:
            try:
                answer = exchange(port, data)
            except OSError:
                answer = b""
            held += status_of(answer) == expected and (expected == 200 or _one_sentence(answer))
        results[name] = {"tried": len(cases), "held": held}
    for name, check in (("silent client (408, closed)", lambda: silent_client(port)),
                        (f"connections beyond {max_connections} (503)", lambda: too_many_connections(port, max_connections)),
                        ("client hangs up (server stays up)", lambda: client_hangs_up(port))):
        try:
            ok = check()
        except OSError:
            ok = False
        results[name] = {"tried": 1, "held": int(ok)}
    alive = status_of(exchange(port, request_bytes(port))) == 200
    results["still answering afterwards (200)"] = {"tried": 1, "held": int(alive)}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running make serve, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", help="start run_serve.py with this model on a free port")
    parser.add_argument("--max_connections", type=int, default=16, help="the server's --max_connections")
    args = parser.parse_args(argv)
    server = None
    if args.model:
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        server = subprocess.Popen([sys.executable, "run_serve.py", args.model, "--port", str(port), "--max_connections",
                                   str(args.max_connections)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
    else:
        port = urlsplit(args.url).port or 80
    try:
        results = run_probe(port, args.max_connections)
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)
    width = max(map(len, results))
    for name, result in results.items():
        print(f"{name:<{width}}  tried {result['tried']}, held {result['held']}")
    failed = [name for name, r in results.items() if r["held"] < r["tried"]]
    print("all hold" if not failed else f"did not hold: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
