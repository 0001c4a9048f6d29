"""A tiny API that counts visits in redis (stdlib only: it speaks RESP over a socket).

GET /        -> {"visits": N, "store": "redis"}   (INCR visits)
GET /health  -> 200 "ok" when redis answers PING
"""

import json
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

REDIS = urlparse(os.environ.get("REDIS_URL", "redis://localhost:6379"))


def redis(*args: str) -> str:
    with socket.create_connection((REDIS.hostname, REDIS.port or 6379), timeout=2) as s:
        cmd = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
        s.sendall(cmd.encode())
        reply = s.recv(4096).decode()
    if reply[0] in "+:":
        return reply[1:].strip()
    if reply[0] == "$":
        return reply.split("\r\n")[1]
    raise RuntimeError(reply.strip())


class Handler(BaseHTTPRequestHandler):
    def _send(self, code: int, body: str, kind: str = "application/json") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        try:
            if self.path == "/health":
                ok = redis("PING") == "PONG"
                self._send(200 if ok else 503, "ok\n" if ok else "redis down\n", "text/plain")
            elif self.path == "/":
                self._send(200, json.dumps({"visits": int(redis("INCR", "visits")), "store": "redis"}) + "\n")
            else:
                self._send(404, '{"error": "not found"}\n')
        except OSError as exc:
            self._send(503, json.dumps({"error": f"redis unreachable: {exc}"}) + "\n")


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler).serve_forever()
