"""A fake of the Azure Files REST API (one storage account, path-style URLs).

Stands in for Azure Files: directories (create, list, delete), files (create, read
whole or by range, delete), Put Range, List Ranges, Set File Properties and Rename,
with Azure's status codes and XML errors. It checks the
SharedKey signature against the account key, so a request signed with any other
key is refused with 403 as Azure does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape, quoteattr

from .server import HttpsServer, Request, Response

ACCOUNT = "lorashiptest"


@dataclass
class FakeFile:
    data: bytearray
    ranges: list[tuple[int, int]] = field(default_factory=list)  # written [start, end] inclusive
    metadata: dict[str, str] = field(default_factory=dict)
    content_md5: bytes | None = None


def _error(status: int, code: str, message: str = "") -> Response:
    body = f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{message or code}</Message></Error>'.encode()
    return Response(status, body, {"Content-Type": "application/xml", "x-ms-error-code": code, "x-ms-request-id": str(uuid.uuid4())})


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [tuple(r) for r in out]


class FakeFiles:
    """In-memory shares of one account; ``requests`` records every call."""

    def __init__(self, ca, account: str = ACCOUNT) -> None:
        self.account = account
        self.key = base64.b64encode(hashlib.sha256(b"fake-account-key").digest() * 2).decode()
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.dirs: dict[str, set[str]] = {}
        self.files: dict[str, dict[str, FakeFile]] = {}
        self.fail_put_range_after: int | None = None  # answer 503 to Put Range after this many succeed
        self.ranges_ok = 0
        self.key_rotated = False  # refuse the key listKeys handed out, as after a rotation
        self.server = HttpsServer(ca, self.handle)
        self.endpoint = f"{self.server.url}/{{account}}"

    def create_share(self, name: str) -> None:
        with self.lock:
            self.dirs.setdefault(name, {""})
            self.files.setdefault(name, {})

    def close(self) -> None:
        self.server.close()

    def put_ranges(self) -> list[Request]:
        return [r for r in self.requests if r.method == "PUT" and r.query.get("comp") == "range"]

    def writes(self) -> list[Request]:
        """Every request that changed the share (creates, ranges, properties, renames, deletes)."""
        return [r for r in self.requests if r.method in ("PUT", "DELETE")]

    # SharedKey, as documented for the File service
    def _signature_ok(self, req: Request) -> bool:
        auth = req.headers.get("authorization", "")
        if self.key_rotated or not auth.startswith(f"SharedKey {self.account}:"):
            return False
        h = req.headers
        length = h.get("content-length", "")
        parts = [req.method, h.get("content-encoding", ""), h.get("content-language", ""), "" if length == "0" else length,
                 h.get("content-md5", ""), h.get("content-type", ""), h.get("date", ""), h.get("if-modified-since", ""),
                 h.get("if-match", ""), h.get("if-none-match", ""), h.get("if-unmodified-since", ""), h.get("range", "")]
        xms = "".join(f"{k}:{v}\n" for k, v in sorted((k, v.strip()) for k, v in h.items() if k.startswith("x-ms-")))
        resource = f"/{self.account}{req.raw_path}"
        for k, v in sorted(req.raw_query):
            resource += f"\n{k.lower()}:{unquote(v)}"
        string = "\n".join(parts) + "\n" + xms + resource
        expected = base64.b64encode(hmac.new(base64.b64decode(self.key), string.encode(), hashlib.sha256).digest()).decode()
        return hmac.compare_digest(auth.split(":", 1)[1], expected)

    def handle(self, req: Request) -> Response:
        with self.lock:
            self.requests.append(req)
            if not self._signature_ok(req):
                return _error(403, "AuthenticationFailed", "Server failed to authenticate the request.")
            parts = req.path.strip("/").split("/", 2)
            if len(parts) < 2 or parts[0] != self.account:
                return _error(400, "InvalidUri")
            share, path = parts[1], (parts[2] if len(parts) > 2 else "")
            if share not in self.dirs:
                return _error(404, "ShareNotFound", "The specified share does not exist.")
            if req.query.get("restype") == "directory":
                return self._directory(req, share, path)
            return self._file(req, share, path)

    def _headers(self, **extra: str) -> dict[str, str]:
        return {"x-ms-request-id": str(uuid.uuid4()), "x-ms-version": "2025-11-05", "Date": formatdate(usegmt=True),
                "ETag": f'"0x{uuid.uuid4().hex[:15].upper()}"', "Last-Modified": formatdate(usegmt=True), **extra}

    def _parent_ok(self, share: str, path: str) -> bool:
        return path.rsplit("/", 1)[0] in self.dirs[share] if "/" in path else True

    def _source(self, req: Request) -> str:
        source = urlsplit(req.headers["x-ms-file-rename-source"]).path
        return unquote(source).strip("/").split("/", 2)[2]

    def _directory(self, req: Request, share: str, path: str) -> Response:
        dirs, files = self.dirs[share], self.files[share]
        comp = req.query.get("comp")
        if req.method in ("GET", "HEAD") and comp is None:
            return Response(200, b"", self._headers()) if path in dirs else _error(404, "ResourceNotFound")
        if req.method == "PUT" and comp is None:
            if path in dirs:
                return _error(409, "ResourceAlreadyExists")
            if not self._parent_ok(share, path):
                return _error(404, "ParentNotFound")
            dirs.add(path)
            return Response(201, b"", self._headers())
        if req.method == "GET" and comp == "list":
            if path not in dirs:
                return _error(404, "ResourceNotFound", "The specified resource does not exist.")
            return Response(200, self._listing(share, path), self._headers(**{"Content-Type": "application/xml"}))
        if req.method == "DELETE" and comp is None:
            if path not in dirs or path == "":
                return _error(404, "ResourceNotFound", "The specified resource does not exist.")
            if any(d.startswith(path + "/") for d in dirs) or any(f.startswith(path + "/") for f in files):
                return _error(409, "DirectoryNotEmpty", "The specified directory is not empty.")
            dirs.discard(path)
            return Response(202, b"", self._headers())
        if req.method == "PUT" and comp == "rename":
            src = self._source(req)
            if src not in dirs:
                return _error(404, "ResourceNotFound")
            if path in dirs or path in files:
                return _error(409, "ResourceAlreadyExists")
            if not self._parent_ok(share, path):
                return _error(404, "ParentNotFound")
            for d in [d for d in dirs if d == src or d.startswith(src + "/")]:
                dirs.discard(d)
                dirs.add(path + d[len(src):])
            for f in [f for f in files if f.startswith(src + "/")]:
                files[path + f[len(src):]] = files.pop(f)
            return Response(200, b"", self._headers())
        return _error(400, "UnsupportedHttpVerb", f"{req.method} {comp}")

    def _listing(self, share: str, path: str) -> bytes:
        """List Directories and Files: the entries right under ``path`` (one page)."""
        prefix = f"{path}/" if path else ""
        children = lambda names: sorted({n[len(prefix):] for n in names if n.startswith(prefix) and n != path and "/" not in n[len(prefix):]})
        entries = "".join(f"<Directory><Name>{escape(n)}</Name><Properties /></Directory>" for n in children(self.dirs[share]))
        entries += "".join(f"<File><Name>{escape(n)}</Name><Properties><Content-Length>{len(self.files[share][prefix + n].data)}"
                           f"</Content-Length></Properties></File>" for n in children(self.files[share]))
        return (f'<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint={quoteattr(self.server.url + "/")} '
                f'ShareName={quoteattr(share)} DirectoryPath={quoteattr(path)}><Prefix /><Entries>{entries}</Entries>'
                f'<NextMarker /></EnumerationResults>').encode()

    def _file(self, req: Request, share: str, path: str) -> Response:
        dirs, files = self.dirs[share], self.files[share]
        comp = req.query.get("comp")
        f = files.get(path)
        if req.method == "PUT" and comp is None:
            if not self._parent_ok(share, path):
                return _error(404, "ParentNotFound")
            meta = {k[len("x-ms-meta-"):]: v for k, v in req.headers.items() if k.startswith("x-ms-meta-")}
            files[path] = FakeFile(bytearray(int(req.headers["x-ms-content-length"])), metadata=meta)
            return Response(201, b"", self._headers())
        if f is None and not (req.method == "PUT" and comp == "rename"):
            return _error(404, "ResourceNotFound", "The specified resource does not exist.")
        if req.method == "PUT" and comp == "range":
            if self.fail_put_range_after is not None and self.ranges_ok >= self.fail_put_range_after:
                return _error(503, "ServerBusy", "The server is currently unable to receive requests.")
            start, end = (int(x) for x in req.headers["x-ms-range"].split("=")[1].split("-"))
            if end >= len(f.data) or len(req.body) != end - start + 1:
                return _error(416, "InvalidRange")
            if "content-md5" in req.headers and base64.b64decode(req.headers["content-md5"]) != hashlib.md5(req.body).digest():
                return _error(400, "Md5Mismatch")
            f.data[start : end + 1] = req.body
            f.ranges = _merge(f.ranges + [(start, end)])
            self.ranges_ok += 1
            return Response(201, b"", self._headers())
        if req.method == "PUT" and comp == "properties":
            md5 = req.headers.get("x-ms-content-md5")
            f.content_md5 = base64.b64decode(md5) if md5 else None
            return Response(200, b"", self._headers())
        if req.method == "PUT" and comp == "rename":
            src = self._source(req)
            if src not in files:
                return _error(404, "ResourceNotFound")
            if path in files and req.headers.get("x-ms-file-rename-replace-if-exists") != "true":
                return _error(409, "ResourceAlreadyExists")
            if not self._parent_ok(share, path):
                return _error(404, "ParentNotFound")
            files[path] = files.pop(src)
            return Response(200, b"", self._headers())
        if req.method == "GET" and comp == "rangelist":
            xml = "".join(f"<Range><Start>{s}</Start><End>{e}</End></Range>" for s, e in f.ranges)
            body = f'<?xml version="1.0" encoding="utf-8"?><Ranges>{xml}</Ranges>'.encode()
            return Response(200, body, self._headers(**{"Content-Type": "application/xml", "x-ms-content-length": str(len(f.data))}))
        if req.method == "DELETE" and comp is None:
            del files[path]
            return Response(202, b"", self._headers())
        if req.method in ("HEAD", "GET") and comp is None:
            extra = {"x-ms-type": "File", "Content-Type": "application/octet-stream", "Content-Length": str(len(f.data))}
            if f.content_md5:
                extra["Content-MD5"] = base64.b64encode(f.content_md5).decode()
            extra.update({f"x-ms-meta-{k}": v for k, v in f.metadata.items()})
            if req.method == "HEAD":
                return Response(200, b"", self._headers(**extra))
            wanted = req.headers.get("x-ms-range") or req.headers.get("range")
            if wanted:  # Get File with a range: 206 and Content-Range, as Azure answers
                start, _, end = wanted.split("=", 1)[1].partition("-")
                start, end = int(start), min(int(end or len(f.data) - 1), len(f.data) - 1)
                if start >= len(f.data):
                    return _error(416, "InvalidRange", "The range specified is invalid for the current size of the resource.")
                body = bytes(f.data[start : end + 1])
                extra.pop("Content-MD5", None)
                extra.update({"Content-Length": str(len(body)), "Content-Range": f"bytes {start}-{end}/{len(f.data)}"})
                return Response(206, body, self._headers(**extra))
            return Response(200, bytes(f.data), self._headers(**extra))
        return _error(400, "UnsupportedHttpVerb", f"{req.method} {comp}")
