"""The HTTP face of a ``Server``: FastAPI routes, token checks, upload limits, request logs.

| endpoint | token | answer |
|---|---|---|
| ``GET /`` | no | the web page (plain HTML + JS) |
| ``GET /health`` | no | status, served version, method, learning job |
| ``POST /predict`` | with ``token_all`` | top-k classes per image, the version answering |
| ``POST /learn`` | yes | 202: job id and the version it will publish |
| ``GET /jobs/{id}`` | with ``token_all`` | queued, running, done or failed (+ error, accuracy) |
| ``GET /classes`` | with ``token_all`` | the class names of the served version |
| ``GET /versions`` | with ``token_all`` | every version: task, classes, time, held-out accuracy |
| ``POST /rollback/{v}`` | yes | serve version v again (as a new version) |
| ``DELETE /versions/{v}`` | yes | remove an older version |
| ``GET /docs``, ``/openapi.json`` | no | FastAPI's OpenAPI page and schema |

Images come as ``multipart/form-data`` (file fields; ``label`` for all of them, or each file
named ``<class>/<image>``; zips of ``<class>/<image>`` folders), as JSON (``{"images":
[{"data": base64, "label": ...}]}``), or as the raw body (one image, or one zip for /learn).
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..errors import ServeError
from .images import Limits, Upload, class_name, decode, from_base64, is_zip, read_zip
from .server import Server

log = logging.getLogger("retain.serve")

UPLOAD_SCHEMA = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "label": {"type": "string", "description": "/learn: the class of every file (else "
                  "each file is named <class>/<image>, or is a zip of such folders)"},
        "holdout": {"type": "number", "description": "/learn: fraction held out per class "
                    "to measure accuracy"}}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "images": {"type": "array", "items": {"type": "object", "properties": {
            "data": {"type": "string", "description": "base64 (or a data: URL)"},
            "label": {"type": "string"}, "name": {"type": "string"}}}},
        "holdout": {"type": "number"}, "k": {"type": "integer"}}}}}}}


def create_fastapi(server: Server) -> FastAPI:
    limits = server.settings.limits
    token = server.settings.token

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.close()

    app = FastAPI(title="retain serve", lifespan=lifespan,
                  description="A continually learning model: predict, learn new classes, "
                              "versions and rollback.")
    app.state.server = server

    @app.exception_handler(ServeError)
    async def refused(request: Request, e: ServeError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse({"detail": str(e)}, status_code=e.status, headers=headers)

    def authorised(request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if not given:
            raise ServeError(401, "this endpoint needs the server's token: send the header "
                                  "'Authorization: Bearer <token>'")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(),
                                                                 token.encode()):
            raise ServeError(401, "wrong token")

    def reader(request: Request) -> None:
        if server.settings.token_all:
            authorised(request)

    writer = [Depends(authorised)]
    readers = [Depends(reader)]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return (resources.files("retain.serve") / "static" / "index.html").read_text()

    @app.get("/health")
    def health():
        return server.health()

    @app.post("/predict", dependencies=readers, openapi_extra=UPLOAD_SCHEMA)
    async def predict(request: Request, k: int = 5):
        uploads, fields = await read_uploads(request, limits, labelled=False)
        k = number(fields.get("k", k), "k")
        if k != int(k) or k < 1:
            raise ServeError(422, f"k must be a positive whole number, got {k}")
        version, top = await run_in_threadpool(server.predict, uploads, int(k))
        return {"version": version, "predictions": [{"name": u.name, "top": t}
                                                    for u, t in zip(uploads, top, strict=True)]}

    @app.post("/learn", dependencies=writer, status_code=202, openapi_extra=UPLOAD_SCHEMA)
    async def learn(request: Request):
        uploads, fields = await read_uploads(request, limits, labelled=True)
        holdout = number(fields.get("holdout", 0.0), "holdout")
        job = await run_in_threadpool(server.learn, uploads, holdout)
        return {"job": job.id, "version": job.version, "state": job.state,
                "new_classes": job.new_classes, "updated_classes": job.updated_classes,
                "images": job.images, "status_url": f"/jobs/{job.id}"}

    @app.get("/jobs/{job_id}", dependencies=readers)
    def job(job_id: str):
        if job_id not in server.jobs:
            raise ServeError(404, f"no job {job_id!r} (jobs are kept until the server stops)")
        return server.jobs[job_id].describe()

    @app.get("/classes", dependencies=readers)
    def classes():
        m = server.model
        return {"version": m and m.version, "classes": list(m.class_names) if m else []}

    @app.get("/versions", dependencies=readers)
    def versions():
        m = server.model
        return {"current": m and m.version, "versions": server.versions()}

    @app.post("/rollback/{version}", dependencies=writer)
    def rollback(version: int):
        meta = server.rollback(version)
        return {"version": meta["version"], "rollback_of": version, "classes": meta["classes"]}

    @app.delete("/versions/{version}", dependencies=writer)
    def delete(version: int):
        server.delete(version)
        return {"deleted": version}

    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    app.add_middleware(RequestLog)
    return app


def number(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ServeError(422, f"{name} must be a number, got {str(value)[:40]!r}") from None


async def read_uploads(request, limits: Limits, *, labelled: bool
                       ) -> tuple[list[Upload], dict]:
    """The images of a request (decoded and checked) and its other fields."""
    limit = "max_learn_images" if labelled else "max_predict_images"
    most = getattr(limits, limit)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        raw, fields = await read_form(request, most, limit)
    elif ctype == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise ServeError(422, "the body is not valid JSON") from None
        raw, fields = read_json_body(body, labelled)
    elif ctype.startswith("image/") or ctype in ("application/zip", "application/octet-stream"):
        raw, fields = [(await request.body(), "body", None)], dict(request.query_params)
    else:
        raise ServeError(415, f"send multipart/form-data, application/json, image/* or "
                              f"application/zip, not {ctype or 'no content type'!r}")
    uploads = await run_in_threadpool(decode_all, raw, fields, limits, labelled)
    if len(uploads) > most:
        raise ServeError(413, f"{len(uploads)} images in one request, over the limit "
                              f"{limit}={most}")
    if not uploads:
        raise ServeError(422, "the request holds no image")
    return uploads, fields


async def read_form(request, most: int, limit: str) -> tuple[list[tuple], dict]:
    try:
        form = await request.form(max_files=most, max_fields=64)
    except HTTPException as e:  # starlette's own count of the parts
        if "Too many files" in str(e.detail):
            raise ServeError(413, f"more than {most} files in one request, over the limit "
                                  f"{limit}={most}") from None
        raise
    raw, fields = [], {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            raw.append((await value.read(), value.filename or key, None))
        else:
            fields[key] = value
    return raw, fields


def read_json_body(body, labelled: bool) -> tuple[list[tuple], dict]:
    if not isinstance(body, dict) or not isinstance(body.get("images"), list):
        raise ServeError(422, 'send {"images": [{"data": "<base64>", "label": "<class>"}, ...]}')
    raw = []
    for i, item in enumerate(body["images"]):
        item = {"data": item} if isinstance(item, str) else item
        if not isinstance(item, dict):
            raise ServeError(422, f"images[{i}] must be a base64 string or an object")
        name = str(item.get("name") or f"images[{i}]")
        label = None
        if labelled and "label" in item:
            label = class_name(item["label"], name)
        elif labelled and not body.get("label"):
            raise ServeError(422, f"{name} has no label: give each image a 'label' (or one "
                                  f"'label' for all)")
        raw.append((from_base64(item.get("data"), name), name, label))
    return raw, {k: v for k, v in body.items() if k != "images"}


def decode_all(raw: list[tuple], fields: dict, limits: Limits, labelled: bool) -> list[Upload]:
    """Decode every image (zips opened); labels from ``label``, the item, or the file's folder."""
    from .images import label_from_path

    common = class_name(fields["label"], "label") if labelled and fields.get("label") else None
    out: list[Upload] = []
    for data, name, label in raw:
        if labelled and is_zip(data):
            out += read_zip(data, limits, name)
            continue
        if labelled:
            label = label or common or label_from_path(name, name)
        out.append(decode(data, limits, name, label))
    return out


class BodyLimit:
    """413 for a request body over ``max_bytes`` (announced or counted while it arrives)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        message = (f"the request body is {{}} bytes, over the limit "
                   f"max_request_bytes={self.max_bytes}")
        if length and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": message.format(int(length))}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                raise ServeError(413, message.format(f"more than {seen}"))
            return msg

        await self.app(scope, counted, send)


class RequestLog:
    """One log line per request: method, path, status, latency."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def sent(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, sent)
        finally:
            log.info("%s %s %d %.1fms", scope["method"], scope["path"], status[0],
                     (time.perf_counter() - t0) * 1000)
