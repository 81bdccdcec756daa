"""FastAPI application of ``medsa serve``: a JSON API plus the static page in ``static/``.

API (all errors are JSON ``{"error": "<message>"}`` with a meaningful status code; docs/serve.md):

- ``GET /api/info``: model name, root folders, limits
- ``GET /api/files?root=I&path=REL``: sub-folders and image files of a folder in a root
- ``POST /api/open {root, path}``: open an image -> image info (id, size, slices, window)
- ``POST /api/upload?filename=NAME`` (raw file body): size / type / decode checked -> image info
- ``GET /api/images/{id}/slices/{z}``: raw slice for the canvas (float32 gray or uint8 RGB)
- ``POST /api/predict {image, slice, points: [[x, y, label]], box, multimask}``: candidate masks
  (run-length encoded) with their predicted IoU
- ``POST /api/embed {image, slice}``: compute (and cache) a slice's embedding ahead of a click
- ``POST /api/save {image, name, masks: {slice: rle}}``: write the mask into the output folder
- ``GET /api/download/{name}``: a saved mask, as an attachment
- ``GET /api/stats``: encoder calls and embedding-cache counters

Security: only files under the root folders are readable (see :mod:`medsa.serve.paths`), masks are
written only inside the output folder, the ``Host`` header must be a loopback name when the server
listens on loopback (DNS-rebinding guard), and state-changing requests need the ``X-Medsa`` header
that only same-origin scripts can send (CSRF guard).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from medsa.errors import ConfigError, DataError, MedsaError, PromptError

from .paths import AccessDenied, NotFound
from .service import SegmentationService, ServeConfig, UploadError, rle_decode, rle_encode

if TYPE_CHECKING:
    from medsa.sam.sam import Sam

__all__ = ["create_app", "STATIC_DIR", "LOOPBACK_HOSTS"]

log = logging.getLogger("medsa.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
#: header the page sends on every POST; a cross-site form or ``fetch`` cannot set it without a
#: CORS pre-flight, which this server never grants
CSRF_HEADER = "x-medsa"

_STATUS: list[tuple[type[MedsaError], int]] = [
    (AccessDenied, 403),
    (NotFound, 404),
    (PromptError, 422),
    (UploadError, 400),
    (DataError, 400),
    (ConfigError, 400),
    (MedsaError, 400),
]


# ------------------------------------------------------------------------------- request models


class OpenRequest(BaseModel):
    root: int = 0
    path: str = Field(max_length=4096)


class PredictRequest(BaseModel):
    image: str = Field(max_length=64)
    slice: int = 0
    #: clicks as ``[x, y, label]`` in image pixels; label 1 positive, 0 negative
    points: list[tuple[float, float, int]] = Field(default_factory=list)
    #: ``[x0, y0, x1, y1]`` in image pixels
    box: list[float] | None = None
    multimask: bool = False


class EmbedRequest(BaseModel):
    image: str = Field(max_length=64)
    slice: int = 0


class SaveRequest(BaseModel):
    image: str = Field(max_length=64)
    name: str | None = Field(default=None, max_length=200)
    #: slice index (as a string, JSON keys) -> run-length encoded mask (see ``rle_encode``)
    masks: dict[str, list[int]] = Field(default_factory=dict)


# ------------------------------------------------------------------------------- application


def create_app(
    model: Sam,
    config: ServeConfig,
    *,
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS,
    model_name: str | None = None,
) -> FastAPI:
    """Build the web app around ``model``.

    Args:
        model: any :class:`medsa.sam.Sam` (with or without an adapter), in eval mode.
        config: folders and limits.
        allowed_hosts: accepted ``Host`` header names (port ignored); ``None`` accepts any (use
            only when binding a non-loopback address on purpose).
        model_name: shown in the page; defaults to ``model.name``.
    """
    service = SegmentationService(model, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()  # removes the temporary upload folder

    app = FastAPI(
        title="medsa serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.service = service
    name = model_name or getattr(model, "name", type(model).__name__)

    # ---------------------------------------------------------------- middleware / errors

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        host = _host_name(request.headers.get("host", ""))
        if allowed_hosts is not None and host not in allowed_hosts:
            return _error(403, f"host {host!r} is not allowed (DNS-rebinding guard)")
        if request.method not in ("GET", "HEAD", "OPTIONS") and (
            request.headers.get(CSRF_HEADER) != "1"
        ):
            return _error(403, f"missing {CSRF_HEADER} header (cross-site requests are refused)")
        response: Response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
            "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"
        )
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(MedsaError)
    async def medsa_error(request: Request, exc: MedsaError) -> JSONResponse:
        status = next(code for cls, code in _STATUS if isinstance(exc, cls))
        return _error(status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else err.get("msg", ""))
        return _error(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    # ---------------------------------------------------------------- page

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ---------------------------------------------------------------- API

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {
            "model": name,
            "image_size": int(getattr(model, "img_size", 0)),
            "roots": [
                {"index": i, "name": r.name or str(r)} for i, r in enumerate(service.roots.roots)
            ],
            "output_dir": str(service.output_dir),
            "max_upload_mb": config.max_upload_mb,
        }

    @app.get("/api/files")
    def files(root: int = 0, path: str = "") -> dict[str, Any]:
        return service.list_dir(root, path)

    @app.post("/api/open")
    def open_image(req: OpenRequest) -> dict[str, Any]:
        return service.open(req.root, req.path).info()

    @app.post("/api/upload")
    async def upload(request: Request, filename: str = "") -> dict[str, Any]:
        from starlette.concurrency import run_in_threadpool

        limit = int(config.max_upload_mb * 1024 * 1024)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise UploadError(
                f"{filename}: file is {int(declared) / 2**20:.1f} MB; the limit is "
                f"{config.max_upload_mb:g} MB (start the server with --max-upload-mb to change it)"
            )
        dest = service.new_upload_path(filename)
        size = 0
        try:
            with open(dest, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise UploadError(
                            f"{filename}: file is larger than the {config.max_upload_mb:g} MB limit"
                        )
                    f.write(chunk)
            if size == 0:
                raise UploadError(f"{filename}: empty upload")
            img = await run_in_threadpool(service.open_upload, filename, dest)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return img.info()

    @app.get("/api/images/{image_id}/slices/{z}")
    def slice_data(image_id: str, z: int) -> Response:
        img = service.images.get(image_id)
        data, dtype = img.display_slice(z)
        return Response(
            data,
            media_type="application/octet-stream",
            headers={
                "X-Width": str(img.width),
                "X-Height": str(img.height),
                "X-Channels": str(img.channels),
                "X-Dtype": dtype,
            },
        )

    @app.post("/api/predict")
    def predict(req: PredictRequest) -> dict[str, Any]:
        img = service.images.get(req.image)
        p = service.predict(img, req.slice, list(req.points), req.box, req.multimask)
        areas = [int(m.sum()) for m in p.masks]
        return {
            "image": img.id,
            "slice": req.slice,
            "width": img.width,
            "height": img.height,
            "masks": [
                {"rle": rle_encode(m), "score": float(s), "area": a}
                for m, s, a in zip(p.masks, p.scores, areas, strict=True)
            ],
            "best": int(p.scores.argmax()),
            "cached": p.cached,
            "ms": round(p.seconds * 1000, 1),
        }

    @app.post("/api/embed")
    def embed(req: EmbedRequest) -> dict[str, Any]:
        # The page calls this when the user settles on a slice, so that the encoder pass runs
        # while the user looks for the structure rather than after the first click.
        img = service.images.get(req.image)
        _, cached = service.embedding(img, req.slice)
        return {"image": img.id, "slice": req.slice, "cached": cached}

    @app.post("/api/save")
    def save(req: SaveRequest) -> dict[str, Any]:
        img = service.images.get(req.image)
        masks = {}
        for key, runs in req.masks.items():
            try:
                z = int(key)
            except ValueError:
                raise PromptError(f"mask key {key!r} is not a slice index") from None
            img.check_slice(z)
            masks[z] = rle_decode(runs, (img.height, img.width))
        dest = service.save(img, masks, req.name)
        foreground = int(sum(int(m.sum()) for m in masks.values()))
        return {
            "name": dest.name,
            "path": str(dest),
            "foreground": foreground,
            "download": f"/api/download/{dest.name}",
        }

    @app.get("/api/download/{name}")
    def download(name: str) -> FileResponse:
        from .paths import safe_output_name

        name = safe_output_name(name)
        path = service.output_dir / name
        if not path.is_file() or path.is_symlink():
            raise NotFound(f"no saved mask named {name!r}")
        return FileResponse(path, filename=name, media_type="application/octet-stream")

    @app.get("/api/stats")
    def stats() -> dict[str, Any]:
        return service.stats()

    return app


def _host_name(header: str) -> str:
    """Host part of a ``Host`` header: ``"[::1]:8000" -> "[::1]"``, ``"a:80" -> "a"``."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if ":" in header else header


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
