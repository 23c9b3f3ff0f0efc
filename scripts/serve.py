#!/usr/bin/env python3
"""Serves www/ on 127.0.0.1 the way netlify.toml publishes it: application/wasm, the Content-Security-Policy,
and Access-Control-Allow-Origin: * on the files an embedding page loads cross-origin.

usage: scripts/serve.py [--port 8080] [--dir www] [--plain]
"""
import argparse
import functools
import http.server

CSP = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; object-src 'none'; base-uri 'none'"


class Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".wasm": "application/wasm", ".js": "text/javascript", ".json": "application/json"}

    plain = False

    def end_headers(self):
        if self.plain:
            # A stand-in for somebody else's site (the browser tests' blog post): no headers of ours.
            super().end_headers()
            return
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        path = self.path.split("?", 1)[0]
        if path.endswith((".js", ".wasm", ".css")) or path.startswith("/pkg/"):
            self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, fmt, *args):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--dir", default="www")
    ap.add_argument("--plain", action="store_true", help="serve without vramfit's headers (a foreign site)")
    args = ap.parse_args()
    Handler.plain = args.plain
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), functools.partial(Handler, directory=args.dir))
    print(f"serving {args.dir} on http://127.0.0.1:{args.port}/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
