"""config-app: serves the JSON config found at $CONFIG_PATH and logs requests to $LOG_DIR.

GET /        the config file, as is (read at every request)
GET /env     what the service and its preStart saw: CONFIG_PATH, GREETING, the user
GET /health  ok
"""

import json
import os
import pwd
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONFIG_PATH = os.environ.get("CONFIG_PATH", "/mnt/config/app.json")
LOG_DIR = os.environ.get("LOG_DIR", "")
PORT = int(os.environ.get("PORT", "8080"))


def read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/health":
            self.reply(200, b"ok\n", "text/plain")
        elif self.path == "/":
            try:
                with open(CONFIG_PATH, "rb") as f:
                    body = f.read()
            except OSError as exc:
                self.reply(500, f"cannot read {CONFIG_PATH}: {exc}\n".encode(), "text/plain")
                return
            self.reply(200, body, "application/json")
        elif self.path == "/env":
            info = {
                "CONFIG_PATH": CONFIG_PATH,
                "GREETING": os.environ.get("GREETING"),
                "prestart": read("/tmp/prestart.txt"),
                "user": pwd.getpwuid(os.getuid()).pw_name,
            }
            self.reply(200, json.dumps(info).encode(), "application/json")
        else:
            self.reply(404, b"not found\n", "text/plain")

    def reply(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {self.address_string()} {fmt % args}\n"
        if LOG_DIR and self.path != "/health":
            try:
                with open(os.path.join(LOG_DIR, "requests.log"), "a") as f:
                    f.write(line)
            except OSError as exc:
                line += f"(cannot write {LOG_DIR}/requests.log: {exc})\n"
        print(line, end="", flush=True)


ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
