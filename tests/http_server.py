"""A file server on 127.0.0.1 for the download tests: Range and If-Range requests, and injectable faults.

Test equipment, not library (it used to live in `detr_explained.hub`): `tests/test_hub.py`,
`tests/test_coco_subset.py`, `tests/test_robustness.py` and the notebooks 24_hub and
31_coco_subset import it from here (the notebooks put `../tests` on `sys.path`).

`LocalFileServer(root)` serves the files under `root` from a background thread the way real
file servers do (RFC 9110): `Range: bytes=a-` answers `206 Partial Content` with
`Content-Range: bytes a-b/total`, or `416` when `a` is past the end; every answer carries a
strong `ETag` and a `Last-Modified` computed from the file's size and modification time, and
`If-Range` with a validator that no longer matches makes the server send the whole file (200),
as the RFC prescribes. A folder is answered with an HTML listing, like `python -m http.server`.
A `Fault` makes one request misbehave: cut the connection after some bytes, answer a status,
ignore `Range` or `If-Range`, send another `Content-Type`, or leave out the validators.
Faults are queued per URL path and used up one request at a time; every request is logged.
"""
from __future__ import annotations
import email.utils, html, http.server, re, socket, threading, urllib.parse
from dataclasses import dataclass
from pathlib import Path

__all__ = ['Fault', 'LocalFileServer']


@dataclass
class Fault:
    "One misbehaviour of `LocalFileServer`, used up by one request."
    status: int|None = None         # answer this HTTP status instead of the file (404, 503, ...)
    drop_after: int|None = None     # send this many body bytes, then close the connection
    ignore_range: bool = False      # answer 200 with the whole file even when a Range was asked
    ignore_if_range: bool = False   # honour Range even when If-Range no longer matches (a broken server)
    content_type: str|None = None   # send this Content-Type instead of application/octet-stream
    no_validators: bool = False     # send neither ETag nor Last-Modified


def validators(file: Path) -> tuple[str, str]:
    "(ETag, Last-Modified) of a file, from its size and modification time (as nginx does)."
    st = file.stat()
    return f'"{st.st_size:x}-{st.st_mtime_ns:x}"', email.utils.formatdate(st.st_mtime, usegmt=True)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    "GET/HEAD of files under `server.owner.root`, with single-range requests, If-Range and `Fault`s."
    def log_message(self, *args): pass
    def do_HEAD(self): self._serve(body=False)
    def do_GET(self): self._serve(body=True)

    def _serve(self, body):
        owner = self.server.owner
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        entry = dict(path=path, range=self.headers.get('Range'), if_range=self.headers.get('If-Range'),
                     status=None, start=0, sent=0)
        owner.log.append(entry)
        fault = owner._next_fault(path)
        if fault.status: return self._empty(entry, fault.status)
        folder = owner._folder(path)
        if folder is not None: return self._listing(entry, folder, path, body)
        file = owner._file(path)
        if file is None: return self._empty(entry, 404)
        size, (etag, modified) = file.stat().st_size, validators(file)
        start, end, status = 0, size - 1, 200
        m = re.fullmatch(r'bytes=(\d+)-(\d*)', (entry['range'] or '').strip())
        still_valid = entry['if_range'] in (None, etag, modified) or fault.ignore_if_range
        if m and still_valid and not fault.ignore_range:
            start, status = int(m[1]), 206
            if m[2]: end = min(int(m[2]), size - 1)
            if start >= size: return self._empty(entry, 416, {'Content-Range': f'bytes */{size}'})
        headers = {} if fault.no_validators else {'ETag': etag, 'Last-Modified': modified}
        self._send_file(entry, file, start, end, status, size, body, fault, headers)

    def _empty(self, entry, status, headers={}):
        entry['status'] = status
        self.send_response(status)
        for k, v in {**headers, 'Content-Length': '0'}.items(): self.send_header(k, v)
        self.end_headers()

    def _listing(self, entry, folder, path, body):
        "An HTML index of a folder, as `python -m http.server` sends."
        names = [html.escape(p.name) for p in sorted(folder.iterdir())]
        items = ''.join(f'<li><a href="{n}">{n}</a></li>' for n in names)
        page = (f'<!DOCTYPE html>\n<html><head><title>Directory listing for {html.escape(path)}</title></head>'
                f'<body><ul>{items}</ul></body></html>\n').encode()
        entry['status'] = 200
        self.send_response(200)
        self.send_header('Content-Type', 'text/html; charset=utf-8'); self.send_header('Content-Length', str(len(page)))
        self.end_headers()
        if body: self.wfile.write(page); entry['sent'] = len(page)

    def _send_file(self, entry, file, start, end, status, size, body, fault, headers):
        entry.update(status=status, start=start)
        length = end - start + 1
        self.send_response(status)
        self.send_header('Content-Type', fault.content_type or 'application/octet-stream')
        self.send_header('Content-Length', str(length))
        self.send_header('Accept-Ranges', 'bytes')
        for k, v in headers.items(): self.send_header(k, v)
        if status == 206: self.send_header('Content-Range', f'bytes {start}-{end}/{size}')
        self.end_headers()
        if not body: return
        todo = length if fault.drop_after is None else min(length, fault.drop_after)
        with open(file, 'rb') as f:
            f.seek(start)
            while todo > 0 and (block := f.read(min(todo, 1 << 16))):
                self.wfile.write(block); todo -= len(block); entry['sent'] += len(block)
        if entry['sent'] < length:  # a dropped connection: stop short of Content-Length
            self.wfile.flush(); self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


class LocalFileServer:
    "Serve `root` over HTTP from a background thread, with Range/If-Range requests and injectable `Fault`s."
    def __init__(self, root: Path|str,        # the folder to serve; URL path '/a/b.pth' is root/'a/b.pth'
                 faults: dict|None=None,      # {'/a/b.pth': [Fault(...), ...]}, used up one request at a time
                 host: str='127.0.0.1', port: int=0):  # port 0: any free port
        self.root, self.host, self.port = Path(root), host, port
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.log, self._lock = [], threading.Lock()

    def _next_fault(self, path) -> Fault:
        with self._lock:
            queue = self.faults.get(path)
            return queue.pop(0) if queue else Fault()

    def _resolve(self, path) -> Path|None:
        parts = [p for p in path.split('/') if p]
        if any(p in ('.', '..') for p in parts): return None  # no escape from root
        return self.root.joinpath(*parts)

    def _file(self, path) -> Path|None:
        f = self._resolve(path)
        return f if f is not None and f.is_file() else None

    def _folder(self, path) -> Path|None:
        f = self._resolve(path)
        return f if f is not None and f.is_dir() else None

    def start(self):
        self.httpd = http.server.ThreadingHTTPServer((self.host, self.port), _RangeHandler)
        self.httpd.daemon_threads, self.httpd.owner = True, self
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self): self.httpd.shutdown(); self.httpd.server_close()
    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()
    @property
    def url(self) -> str: return f'http://{self.host}:{self.port}'
