"""A small WSGI app, as you would write it for any server, run unchanged by
gunicorn in a dispatcher `proxy` pool (examples/apps/python.toml).

Routes:
- GET /            what this is;
- GET /headers     the request's headers as JSON (what the app is told:
                   X-Forwarded-For, Forwarded, no hop-by-hop fields);
- POST /upload     reads the body as it arrives; answers its length and
                   SHA-256 as JSON;
- GET /bytes/N     N bytes (at most 64 MiB), sent in 64 KiB pieces;
- GET /pid         the serving process's pid.
"""

import hashlib
import json
import os


def reply(start_response, status, body, ctype="text/plain; charset=utf-8"):
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    method = environ["REQUEST_METHOD"]
    if path == "/":
        return reply(start_response, "200 OK", b"a WSGI app in a dispatcher proxy pool: try /headers, POST /upload, /bytes/N\n")
    if path == "/headers":
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
        return reply(start_response, "200 OK", json.dumps(headers).encode(), "application/json")
    if path == "/pid":
        return reply(start_response, "200 OK", str(os.getpid()).encode())
    if path == "/upload" and method in ("POST", "PUT"):
        stream = environ["wsgi.input"]
        n, h = 0, hashlib.sha256()
        while True:
            chunk = stream.read(65536)
            if not chunk:
                break
            n += len(chunk)
            h.update(chunk)
        return reply(start_response, "200 OK", json.dumps({"bytes": n, "sha256": h.hexdigest()}).encode(), "application/json")
    if path.startswith("/bytes/"):
        try:
            n = min(int(path[len("/bytes/"):]), 64 << 20)
        except ValueError:
            return reply(start_response, "400 Bad Request", b"/bytes/N: N is a number\n")
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(n))])
        piece = bytes(i % 251 for i in range(65536))

        def body():
            left = n
            while left > 0:
                k = min(left, len(piece))
                yield piece[:k]
                left -= k

        return body()
    return reply(start_response, "404 Not Found", b"not found\n")
