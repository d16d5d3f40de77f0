#!/usr/bin/env python3
"""A local mock of the Hugging Face Hub's HTTP interface, for tests without the internet.

Serves folders as model repos the way huggingface.co answers `huggingface_hub` (2.x) and runner:
  GET  /api/models/ORG/NAME/revision/REV          repo info: `sha` (the commit) and `siblings`
  GET  /api/models/ORG/NAME/tree/REV[/PATH]        the file listing (`oid`, `size`, `lfs`)
  HEAD|GET /ORG/NAME/resolve/REV/PATH              `X-Repo-Commit`, `ETag`; LFS files (weights,
       `.model`) answer 302 to /cdn/SHA256/NAME with `X-Linked-Etag` (the sha256) and
       `X-Linked-Size` (the CDN listens on a second port: another origin); other files 200 with their git blob sha1 as ETag
  GET  /cdn/SHA256/NAME                            the bytes, with `Range` (206)
Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) as the Hub's do.

  mock_hub.py --repo ORG/NAME=DIR[@BRANCH] ... [--token T] [--fail SUBSTR=STATUS:COUNT]
              [--drop SUBSTR=BYTES:COUNT] [--corrupt SUBSTR=COUNT] [--log FILE] [--port N]

Several `--repo` of one name are several commits (each addressable by its hash); the last one
given for a branch (default `main`) is that branch. `--token`: requests to the API and resolve
routes without `Authorization: Bearer T` get 401, with another token 403 (the CDN needs none).
Faults apply to the first COUNT requests whose path contains SUBSTR: `--fail` answers STATUS
(429 and 503 with `Retry-After: 0`), `--drop` closes the connection after BYTES bytes of the body,
`--corrupt` flips a byte of the body. Prints `port N`, a `repo NAME BRANCH=COMMIT…` line per repo, then `ready`. Standard library only.
"""
import argparse
import hashlib
import json
import os
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack", ".h5", ".model")


def file_hashes(path):
    sha256, sha1 = hashlib.sha256(), hashlib.sha1()
    size = os.path.getsize(path)
    sha1.update(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            sha256.update(chunk)
            sha1.update(chunk)
    return size, sha256.hexdigest(), sha1.hexdigest()


class Commit:
    def __init__(self, folder):
        self.folder = os.path.abspath(folder)
        self.files = {}
        for root, dirs, names in os.walk(self.folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for n in sorted(names):
                if n.startswith("."):
                    continue
                full = os.path.join(root, n)
                rel = os.path.relpath(full, self.folder).replace(os.sep, "/")
                size, sha256, sha1 = file_hashes(full)
                self.files[rel] = {"full": full, "size": size, "sha256": sha256, "git": sha1, "lfs": rel.endswith(LFS_SUFFIXES)}
        h = hashlib.sha1()
        for rel, f in sorted(self.files.items()):
            h.update(f"{rel}\0{f['sha256']}\n".encode())
        self.sha = h.hexdigest()


class Faults:
    def __init__(self, specs, parse):
        self.lock = threading.Lock()
        self.items = [parse(s) for s in specs]

    def take(self, path):
        with self.lock:
            for item in self.items:
                if item["sub"] in path and item["count"] > 0:
                    item["count"] -= 1
                    return item
        return None


def parse_fault(spec, with_value):
    sub, _, rest = spec.rpartition("=")
    if with_value:
        value, _, count = rest.partition(":")
        return {"sub": sub, "value": int(value), "count": int(count or 1)}
    return {"sub": sub, "value": None, "count": int(rest or 1)}


class Hub:
    def __init__(self, args):
        self.repos = {}  # name -> {"commits": {sha: Commit}, "branches": {branch: sha}}
        for spec in args.repo:
            name, _, rest = spec.partition("=")
            folder, _, branch = rest.partition("@")
            c = Commit(folder)
            r = self.repos.setdefault(name, {"commits": {}, "branches": {}})
            r["commits"][c.sha] = c
            r["branches"][branch or "main"] = c.sha
        self.blobs = {f["sha256"]: f for r in self.repos.values() for c in r["commits"].values() for f in c.files.values()}
        self.token = args.token
        self.fail = Faults(args.fail, lambda s: parse_fault(s, True))
        self.drop = Faults(args.drop, lambda s: parse_fault(s, True))
        self.corrupt = Faults(args.corrupt, lambda s: parse_fault(s, False))
        self.log = open(args.log, "a", buffering=1) if args.log else None
        self.log_lock = threading.Lock()

    def commit(self, name, rev):
        r = self.repos[name]
        sha = r["branches"].get(rev, rev)
        return r["commits"].get(sha)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mock-hub/1"

    def log_message(self, *a):
        pass

    def record(self, status):
        hub = self.server.hub
        if hub.log:
            with hub.log_lock:
                hub.log.write(json.dumps({"method": self.command, "path": self.path, "range": self.headers.get("Range"), "auth": self.headers.get("Authorization") is not None, "status": status}) + "\n")

    def reply(self, status, headers=None, body=b""):
        self.record(status)
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, status, code, message):
        self.reply(status, {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}, json.dumps({"error": message}).encode())

    def authorized(self):
        hub = self.server.hub
        if hub.token is None:
            return True
        got = self.headers.get("Authorization")
        if got is None:
            self.error(401, "GatedRepo", "Access to this repo is restricted: you must be authenticated")
            return False
        if got != f"Bearer {hub.token}":
            self.error(403, "GatedRepo", "Your token has no access to this repo")
            return False
        return True

    def do_HEAD(self):
        self.route()

    def do_GET(self):
        self.route()

    def route(self):
        hub = self.server.hub
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        fault = hub.fail.take(path)
        if fault:
            headers = {"Retry-After": "0"} if fault["value"] in (429, 503) else {}
            return self.reply(fault["value"], headers, b"injected failure")
        parts = path.strip("/").split("/")
        if parts[0] == "cdn" and len(parts) >= 2:
            return self.cdn(parts[1], path)
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            if not self.authorized():
                return
            name, what = "/".join(parts[2:4]), parts[4]
            if name not in hub.repos:
                return self.error(404, "RepoNotFound", f"Repository {name} not found")
            # The revision is percent-encoded (`refs%2Fpr%2F1`): split the raw path, then unquote.
            raw = url.path.strip("/").split("/")
            rev = urllib.parse.unquote(raw[5])
            c = hub.commit(name, rev)
            if c is None:
                return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            if what == "revision":
                body = {"id": name, "modelId": name, "sha": c.sha, "private": False, "disabled": False, "gated": False, "siblings": [{"rfilename": p} for p in sorted(c.files)]}
                return self.reply(200, {"Content-Type": "application/json"}, json.dumps(body).encode())
            if what == "tree":
                prefix = "/".join(urllib.parse.unquote(p) for p in raw[6:])
                entries = []
                for p, f in sorted(c.files.items()):
                    if prefix and not p.startswith(prefix + "/"):
                        continue
                    e = {"type": "file", "oid": f["git"], "size": f["size"], "path": p}
                    if f["lfs"]:
                        e["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": 134}
                    entries.append(e)
                return self.reply(200, {"Content-Type": "application/json"}, json.dumps(entries).encode())
            return self.error(404, "NotFound", f"no route {path}")
        if len(parts) >= 5 and parts[2] == "resolve":
            if not self.authorized():
                return
            name = "/".join(parts[:2])
            if name not in hub.repos:
                return self.error(404, "RepoNotFound", f"Repository {name} not found")
            c = hub.commit(name, parts[3])
            if c is None:
                return self.error(404, "RevisionNotFound", f"Invalid rev id: {parts[3]}")
            rel = "/".join(parts[4:])
            f = c.files.get(rel)
            if f is None:
                return self.error(404, "EntryNotFound", f"{rel} does not exist at {c.sha}")
            if f["lfs"]:
                loc = f"{hub.cdn_origin}/cdn/{f['sha256']}/{urllib.parse.quote(rel.rsplit('/', 1)[-1])}"
                return self.reply(302, {"Location": loc, "X-Repo-Commit": c.sha, "ETag": f'"{f["git"]}"', "X-Linked-Etag": f'"{f["sha256"]}"', "X-Linked-Size": f["size"]})
            return self.send_file(f, {"X-Repo-Commit": c.sha, "ETag": f'"{f["git"]}"'}, path)
        return self.error(404, "NotFound", f"no route {path}")

    def cdn(self, sha, path):
        f = self.server.hub.blobs.get(sha)
        if f is None:
            return self.error(404, "EntryNotFound", "no such blob")
        return self.send_file(f, {"ETag": f'"{sha}"'}, path)

    def send_file(self, f, headers, path):
        hub = self.server.hub
        size = f["size"]
        start = 0
        rng = self.headers.get("Range")
        status = 200
        if rng and rng.startswith("bytes=") and self.command == "GET":
            start = int(rng[6:].split("-")[0] or 0)
            if start >= size and size > 0:
                self.record(416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        length = size - start
        self.record(status)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        drop = hub.drop.take(path)
        corrupt = hub.corrupt.take(path)
        self.wfile.flush()
        with open(f["full"], "rb") as fh:
            if drop is not None or corrupt is not None:
                fh.seek(start)
                budget = drop["value"] if drop else length
                sent = 0
                while sent < min(length, budget):
                    chunk = fh.read(min(1 << 20, min(length, budget) - sent))
                    if not chunk:
                        break
                    if corrupt is not None and sent == 0:
                        chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                    self.wfile.write(chunk)
                    sent += len(chunk)
                self.wfile.flush()
                if drop is not None:
                    self.close_connection = True
                    self.connection.shutdown(2)
                return
            offset, left = start, length
            while left > 0:
                n = os.sendfile(self.connection.fileno(), fh.fileno(), offset, min(left, 64 << 20))
                if n == 0:
                    break
                offset += n
                left -= n


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that goes away mid-answer (or a `--drop`) is routine here.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
            super().handle_error(request, client_address)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", action="append", default=[], required=True)
    ap.add_argument("--token")
    ap.add_argument("--fail", action="append", default=[])
    ap.add_argument("--drop", action="append", default=[])
    ap.add_argument("--corrupt", action="append", default=[])
    ap.add_argument("--log")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    hub = Hub(args)
    server = Server(("127.0.0.1", args.port), Handler)
    # The CDN on another port: another origin, as the Hub's LFS storage is (no token goes there).
    cdn = Server(("127.0.0.1", 0), Handler)
    for s in (server, cdn):
        s.hub = hub
    hub.cdn_origin = f"http://127.0.0.1:{cdn.server_address[1]}"
    threading.Thread(target=cdn.serve_forever, daemon=True).start()
    print(f"port {server.server_address[1]}", flush=True)
    for name, r in server.hub.repos.items():
        print(f"repo {name} " + " ".join(f"{b}={s}" for b, s in r["branches"].items()), flush=True)
    print("ready", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
