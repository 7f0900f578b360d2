"""The HTTP API (FastAPI): ``create_app(index_path)``, served by ``colengine serve``.

Endpoints (OpenAPI docs at ``/docs``)::

    GET  /health                 {"status": "ok"}  (503 {"status": "loading"} until loaded)
    GET  /info                   {"documents", "index", "model", "generation", "limits", ...}
    POST /search                 {"queries": [str], "k": 10, "filter"?, "pipeline"?, "knobs"?}
    POST /documents              {"documents": [{"id", "text", "title"?, "metadata"?}]}
    POST /documents/delete       {"ids": [str]}
    POST /documents/get          {"ids": [str]}
    GET  /documents/{id}         {"id", "text", "metadata"}
    POST /rerank                 {"query": str, "documents": [str] | "ids": [str], "k"?}

Errors are JSON ``{"error": <kind>, "message": <text>}`` with status 400 (bad input),
401 (missing or wrong API key), 404 (unknown id), 409 (duplicate id), 413 (over a limit),
503 (loading, or the writer lock is busy). With an API key every endpoint but ``/health``
and the docs needs ``Authorization: Bearer KEY`` (or ``X-API-Key: KEY``).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from colengine.errors import DuplicateIdError, UnknownIdError
from colengine.server.encoding import WorkerUnavailable, check_write_encoder
from colengine.server.service import (
    BACKGROUND_NICE,
    IndexService,
    Limits,
    NotReady,
    RequestTooLarge,
    SearchSlots,
    check_nice,
    default_search_slots,
)

__all__ = ["ENV_CONFIG", "app_from_env", "create_app", "serve"]

log = logging.getLogger("colengine.server")
#: environment variable that hands the configuration to ``--workers`` processes
ENV_CONFIG = "COLENGINE_SERVE_CONFIG"
_ENV_KEY = "COLENGINE_API_KEY"


# -- request bodies ----------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SearchRequest(_Body):
    queries: list[str] = Field(description="query texts")
    k: int = Field(10, ge=1, description="hits per query")
    filter: dict[str, Any] | None = Field(None, description="metadata filter, e.g. "
                                          '{"year": {"$gte": 2020}}')
    pipeline: Literal["late", "bm25", "bm25+rerank", "fusion", "dense", "dense+rerank",
                      "hybrid"] = "late"
    candidates: int = Field(100, ge=1, description="first-stage depth of the two-stage pipelines")
    return_text: bool = False
    return_metadata: bool = True
    knobs: dict[str, int | float | None] = Field(
        default_factory=dict, description="index search knobs, e.g. {\"n_probe\": 8}")


class Document(_Body):
    id: str
    text: str
    title: str | None = None
    metadata: dict[str, Any] | None = None


class AddRequest(_Body):
    documents: list[Document]


class IdsRequest(_Body):
    ids: list[str]


class RerankRequest(_Body):
    query: str
    documents: list[str] | None = Field(None, description="texts to score (ids '0'..'n-1')")
    ids: list[str] | None = Field(None, description="indexed documents to score")
    k: int | None = Field(None, ge=1)


# -- errors --------------------------------------------------------------------------------
def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None
           ) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message}, status_code=status, headers=headers)


def _status_of(e: Exception) -> int:
    from colengine import errors

    if isinstance(e, RequestTooLarge):
        return 413
    if isinstance(e, UnknownIdError):
        return 404
    if isinstance(e, DuplicateIdError):
        return 409
    from colengine.distributed.routing import ShardUnavailableError

    if isinstance(e, (NotReady, errors.LockTimeoutError, ShardUnavailableError,
                      WorkerUnavailable)):
        return 503
    if isinstance(e, (ValueError, TypeError)):
        return 400
    return 500


def _hit_json(h: Any, text: bool, metadata: bool) -> dict[str, Any]:
    d: dict[str, Any] = {"id": h.doc_id, "score": h.score}
    passage = getattr(h, "passage", None)
    if passage is not None:   # an index of passages: the window that gave the score
        d["passage"] = {"index": passage.index, "start": passage.start, "end": passage.end}
    if metadata:
        d["metadata"] = h.metadata
    if text:
        d["text"] = h.text
    return d


# -- the app ---------------------------------------------------------------------------------
def create_app(index_path: str | os.PathLike, api_key: str | None = None,
               limits: Limits | None = None, *, model: Any = None, device: str = "auto",
               checkpoint_docs: int = 1000, checkpoint_seconds: float = 30.0,
               lock_timeout: float = 30.0, trust_remote_code: bool | None = None,
               write_nice: int = BACKGROUND_NICE, search_slots: int | None = None,
               write_encoder: str = "auto") -> FastAPI:
    """A FastAPI app serving the index at ``index_path``. The index loads in the background
    once the app starts (requests meanwhile get 503); ``model`` overrides the index's model.
    ``search_slots``: searches run at once (:class:`~colengine.server.service.SearchSlots`;
    default: the cores; 0: no limit). ``write_encoder``: where added documents are encoded
    (:mod:`colengine.server.encoding`), for a sharded index as for one index."""
    limits = limits or Limits()
    from colengine.distributed.routing import is_sharded

    service_cls: Any = IndexService
    if is_sharded(index_path):   # shards on Ray: the same endpoints
        from colengine.distributed.service import ShardedService as service_cls
    service = service_cls(index_path, model=model, device=device, limits=limits,
                           checkpoint_docs=checkpoint_docs, checkpoint_seconds=checkpoint_seconds,
                           lock_timeout=lock_timeout, trust_remote_code=trust_remote_code,
                           write_nice=write_nice, search_slots=search_slots,
                           write_encoder=write_encoder)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=service.open, name="colengine-load", daemon=True)
        loader.start()
        yield
        loader.join(timeout=60)
        service.close()

    app = FastAPI(title="colengine", lifespan=lifespan,
                  description="Late-interaction (ColBERT-style) search over one index.")
    app.state.service = service
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise _Unauthorized()

    @app.exception_handler(_Unauthorized)
    async def _on_unauthorized(request: Request, e: _Unauthorized) -> JSONResponse:
        return _error(401, "Unauthorized", "missing or wrong API key "
                      "(send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')",
                      headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        parts = []
        for err in errs[:3]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where or 'body'}: {err.get('msg')}")
        return _error(400, "ValidationError", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, "HTTPError", str(e.detail))

    async def _on_error(request: Request, e: Exception) -> JSONResponse:
        status = _status_of(e)
        if status == 500:
            log.error("internal error on %s", request.url.path, exc_info=e)
            return _error(500, "InternalError", f"{type(e).__name__}: the server failed; "
                          "see its log")
        return _error(status, type(e).__name__, str(e))

    # specific classes are answered by the exception middleware, which keeps the connection;
    # ``Exception`` (a real 500) goes to Starlette's outermost handler
    from colengine.errors import LockTimeoutError

    for cls in (ValueError, TypeError, KeyError, NotReady, LockTimeoutError, Exception):
        app.add_exception_handler(cls, _on_error)

    auth = [Depends(authorized)]

    @app.get("/health")
    def health() -> JSONResponse:
        if service.ready:
            return JSONResponse({"status": "ok"})
        if service.error:
            return JSONResponse({"status": "error", "error": "LoadError",
                                 "message": service.error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/info", dependencies=auth)
    def info() -> dict[str, Any]:
        return service.info()

    @app.post("/search", dependencies=auth)
    def search(req: SearchRequest) -> JSONResponse:
        hits = service.search(req.queries, req.k, pipeline=req.pipeline,
                              candidates=req.candidates, filter=req.filter,
                              return_text=req.return_text, return_metadata=req.return_metadata,
                              knobs=req.knobs)
        return JSONResponse({"results": [[_hit_json(h, req.return_text, req.return_metadata)
                                          for h in row] for row in hits]})

    @app.post("/documents", dependencies=auth)
    def add(req: AddRequest) -> dict[str, int]:
        return {"added": service.add([{"id": d.id, "text": d.text, "title": d.title,
                                       "metadata": d.metadata} for d in req.documents])}

    @app.post("/documents/delete", dependencies=auth)
    def delete(req: IdsRequest) -> dict[str, int]:
        return {"deleted": service.delete(req.ids)}

    @app.post("/documents/get", dependencies=auth)
    def get_many(req: IdsRequest) -> dict[str, Any]:
        return {"documents": service.get(req.ids)}

    @app.get("/documents/{doc_id:path}", dependencies=auth)
    def get_one(doc_id: str) -> dict[str, Any]:
        return service.get([doc_id])[0]

    @app.post("/rerank", dependencies=auth)
    def rerank(req: RerankRequest) -> dict[str, Any]:
        hits = service.rerank(req.query, ids=req.ids, texts=req.documents, k=req.k)
        return {"results": [_hit_json(h, False, False) for h in hits]}

    return app


class _Unauthorized(Exception):
    pass


class _BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes`` (by its Content-Length, or
    while reading a body sent without one)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = _error(413, "RequestTooLarge",
                           f"request body over the limit of {self.max_bytes} bytes")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _error(400, "BadRequest", "invalid Content-Length")(scope, receive,
                                                                                  send)
            if n > self.max_bytes:
                return await too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        # no Content-Length (chunked): read the body here, up to the limit
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, _replay([msg]), send)
            size += len(msg.get("body", b""))
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[dict], then: Any = None) -> Any:
    queue = list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


# -- processes -------------------------------------------------------------------------------
def _config(index_path: str, limits: Limits, **kwargs: Any) -> dict[str, Any]:
    return {"index_path": str(index_path), "limits": limits.as_dict(), **kwargs}


def app_from_env() -> FastAPI:
    """The app of one ``--workers`` process, configured by ``colengine serve`` through the
    environment (``COLENGINE_SERVE_CONFIG``; the API key in ``COLENGINE_API_KEY``)."""
    cfg = json.loads(os.environ[ENV_CONFIG])
    threads = cfg.pop("torch_threads", None)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return create_app(cfg.pop("index_path"), os.environ.get(_ENV_KEY) or None,
                      Limits(**cfg.pop("limits")), **cfg)


def serve(index_path: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, workers: int = 1, limits: Limits | None = None,
          model: str | None = None, device: str = "auto", checkpoint_docs: int = 1000,
          checkpoint_seconds: float = 30.0, torch_threads: int = 1,
          trust_remote_code: bool | None = None, log_level: str = "info",
          write_nice: int = BACKGROUND_NICE, search_slots: int | None = None,
          write_encoder: str = "auto") -> None:
    """Run the server (blocks). ``workers`` > 1 starts that many processes, each mapping the
    same index files; writes between them go through the index's writer lock.
    ``torch_threads`` per worker: concurrency comes from requests and workers, and one
    intra-op thread stays fast on a busy CPU where two wait on each other.
    ``search_slots``: searches a worker runs at once, the others waiting in arrival order
    (default: :func:`~colengine.server.service.default_search_slots`, the cores shared among
    the workers; 0: no limit). ``write_encoder``: where added documents are encoded
    (``"auto"``, ``"process"`` or ``"thread"``: :mod:`colengine.server.encoding`)."""
    import uvicorn

    from colengine.storage import is_index

    if not is_index(index_path):
        raise ValueError(f"{index_path}: not a colengine index (build one with 'colengine index')")
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    from colengine.distributed.routing import is_sharded

    if workers > 1 and is_sharded(index_path):
        raise ValueError("--workers: a sharded index is served by one process (its shard "
                         "actors do the searching)")
    if torch_threads < 1:
        raise ValueError("--torch-threads must be at least 1")
    check_nice(write_nice)
    check_write_encoder(write_encoder)
    if search_slots is None:
        search_slots = default_search_slots(workers)
    SearchSlots(search_slots)   # checked at the door
    cfg = _config(str(index_path), limits or Limits(), model=model, device=device,
                  checkpoint_docs=checkpoint_docs, checkpoint_seconds=checkpoint_seconds,
                  torch_threads=torch_threads, trust_remote_code=trust_remote_code,
                  write_nice=write_nice, search_slots=search_slots,
                  write_encoder=write_encoder)
    os.environ[ENV_CONFIG] = json.dumps(cfg)
    if api_key:
        os.environ[_ENV_KEY] = api_key
    else:
        os.environ.pop(_ENV_KEY, None)
    uvicorn.run("colengine.server.app:app_from_env", factory=True, host=host, port=port,
                workers=workers, log_level=log_level, timeout_graceful_shutdown=30)
