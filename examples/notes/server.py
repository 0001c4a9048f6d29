"""notes: POST /notes appends one line to $NOTES_FILE, GET /notes lists them, GET /health."""

import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NOTES = os.environ["NOTES_FILE"]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/health":
            self.reply(200, "ok\n")
        elif self.path == "/notes":
            try:
                with open(NOTES) as f:
                    self.reply(200, f.read())
            except FileNotFoundError:
                self.reply(200, "")
        else:
            self.reply(404, "not found\n")

    def do_POST(self) -> None:
        if self.path != "/notes":
            return self.reply(404, "not found\n")
        text = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode().strip()
        if not text or "\n" in text:
            return self.reply(400, "one line, please\n")
        with open(NOTES, "a") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        return self.reply(201, text + "\n")

    def reply(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler).serve_forever()
