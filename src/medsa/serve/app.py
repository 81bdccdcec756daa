"""FastAPI application of ``medsa serve``: a JSON API plus the static page in ``static/``.

API (all errors are JSON ``{"error": "<message>"}`` with a meaningful status code; docs/serve.md):

- ``GET /api/info``: model name, root folders, limits
- ``GET /api/files?root=I&path=REL``: sub-folders and image files of a folder in a root
- ``POST /api/open {root, path}``: open an image -> image info (id, size, slices, window)
- ``POST /api/upload?filename=NAME`` (raw file body): size / type / decode checked -> image info
- ``GET /api/images/{id}/slices/{z}``: raw slice for the canvas (float32 gray or uint8 RGB)
- ``POST /api/predict {image, slice, points: [[x, y, label]], box, multimask, mask_input}``:
  candidate masks (run-length encoded) with their predicted IoU and a token of their low-res logits
  (``mask_input`` of the next click: previous-mask feedback)
- ``POST /api/embed {image, slice}``: compute (and cache) a slice's embedding ahead of a click
- ``POST /api/save {image, name, objects: [{name, label, masks: {slice: rle}}], overwrite,
  dicom_seg}``: write one label map plus a ``.labels.json`` sidecar into the output folder (409:
  exists, confirm); ``dicom_seg``: also ``<name>_seg.dcm`` (DICOM images only, else 400)
- ``POST /api/propagate {image, keys: {slice: rle}, direction}``: start propagating one object
  through a volume in a background thread -> ``{job}``; ``GET /api/jobs/{job}``: progress, then the
  masks per slice; ``POST /api/jobs/{job}/cancel``
- ``GET /api/download/{name}``: a saved mask, as an attachment
- ``GET /api/stats``: encoder calls and embedding-cache counters

Security: only files under the root folders are readable (see :mod:`medsa.serve.paths`), masks are
written only inside the output folder, the ``Host`` header must be a loopback name when the server
listens on loopback (DNS-rebinding guard), state-changing requests need the ``X-Medsa`` header
that only same-origin scripts can send (CSRF guard), JSON bodies are limited in size
(:class:`BodyLimit`), and messages never contain absolute server paths. See SECURITY.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from medsa.errors import ConfigError, DataError, MedsaError, PromptError

from .outputs import MAX_OBJECTS, LabelledObject, OverwriteNeeded
from .paths import AccessDenied, NotFound
from .rle import rle_decode, rle_encode
from .service import SegmentationService, ServeConfig
from .uploads import UploadError

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
    (OverwriteNeeded, 409),
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
    points: list[tuple[float, float, int]] = Field(default_factory=list, max_length=10_000)
    #: ``[x0, y0, x1, y1]`` in image pixels
    box: list[float] | None = Field(default=None, max_length=16)
    multimask: bool = False
    #: token of the mask shown before this prompt (``masks[i].token`` of an earlier answer)
    mask_input: str | None = Field(default=None, max_length=64)


class EmbedRequest(BaseModel):
    image: str = Field(max_length=64)
    slice: int = 0


#: run-length encoded masks by slice index (a string: JSON keys); see :mod:`medsa.serve.rle`
SliceMasks = dict[str, list[int]]


class SaveObject(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    label: int
    masks: SliceMasks = Field(default_factory=dict)


class SaveRequest(BaseModel):
    image: str = Field(max_length=64)
    name: str | None = Field(default=None, max_length=200)
    #: the objects of the label map (one label each)
    objects: list[SaveObject] = Field(default_factory=list, max_length=MAX_OBJECTS + 1)
    #: one object's masks (label 1, named "object 1"); kept for API clients of the binary format
    masks: SliceMasks | None = None
    #: replace an existing file this session did not write (the page asks the user first)
    overwrite: bool = False
    #: also write ``<name>_seg.dcm``, a DICOM-SEG referencing the source series (DICOM images only)
    dicom_seg: bool = False


class PropagateRequest(BaseModel):
    image: str = Field(max_length=64)
    #: key slices of one object: slice -> its mask (taken verbatim)
    keys: SliceMasks = Field(min_length=1)
    direction: str = Field(default="both", pattern="^(both|up|down)$")


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
    app.add_middleware(BodyLimit, limit=int(config.max_request_mb * 2**20), exempt=("/api/upload",))
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
        return _error(status, service.public_message(str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

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
            # the folder's name only: absolute server paths are not shown to clients
            "output_dir": service.output_dir.name,
            "max_upload_mb": config.max_upload_mb,
            "limits": {
                "max_upload_mb": config.max_upload_mb,
                "max_uploads": config.max_uploads,
                "max_upload_total_mb": config.max_upload_total_mb,
                "max_image_mpix": config.max_image_mpix,
                "max_volume_mvox": config.max_volume_mvox,
                "max_request_mb": config.max_request_mb,
            },
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
        p = service.predict(
            img, req.slice, list(req.points), req.box, req.multimask, req.mask_input
        )
        areas = [int(m.sum()) for m in p.masks]
        return {
            "image": img.id,
            "slice": req.slice,
            "width": img.width,
            "height": img.height,
            "masks": [
                {
                    "rle": rle_encode(m),
                    "score": float(s),
                    "area": a,
                    "token": service.logits.put(img.id, req.slice, lg),
                }
                for m, s, a, lg in zip(p.masks, p.scores, areas, p.logits, strict=True)
            ],
            "best": int(p.scores.argmax()),
            "cached": p.cached,
            "mask_input_used": p.used_mask_input,
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
        given = list(req.objects)
        if req.masks is not None:
            given.append(SaveObject(name="object 1", label=1, masks=req.masks))
        if not given:
            raise PromptError("nothing to save: give at least one object")
        if len(given) > MAX_OBJECTS:
            raise PromptError(f"too many objects ({len(given)}); at most {MAX_OBJECTS} per file")
        # masks stay run lengths here: decoded slice by slice while the label map is painted
        objects = [LabelledObject(o.name, o.label, _slice_keys(img, o.masks)) for o in given]
        dest, sidecar, seg = service.save(img, objects, req.name, req.overwrite, req.dicom_seg)
        return {
            "name": dest.name,
            # relative to the output folder's parent: absolute server paths are not shown
            "path": f"{service.output_dir.name}/{dest.name}",
            "sidecar": sidecar.name,
            "dicom_seg": seg.name if seg is not None else None,
            "labels": {o.name: o.label for o in objects},
            "foreground": {o.name: o.foreground for o in objects},
            "download": f"/api/download/{dest.name}",
        }

    @app.post("/api/propagate")
    def propagate(req: PropagateRequest) -> dict[str, Any]:
        img = service.images.get(req.image)
        keys = {
            z: rle_decode(runs, (img.height, img.width))
            for z, runs in _slice_keys(img, req.keys).items()
        }
        job = service.propagate(img, keys, req.direction)
        return job.public()

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str) -> dict[str, Any]:
        job = service.jobs.get(job_id)
        out = job.public()
        if job.state == "done" and job.kind == "propagate":
            res = job.result
            out["masks"] = {str(z): rle_encode(m) for z, m in res.masks.items()}
            out["scores"] = {str(z): (s if s == s else None) for z, s in res.scores.items()}
            out["z_range"] = list(res.z_range) if res.z_range is not None else None
        return out

    @app.post("/api/jobs/{job_id}/cancel")
    def job_cancel(job_id: str) -> dict[str, Any]:
        return service.jobs.cancel(job_id).public()

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


def _slice_keys(img: Any, masks: dict[str, list[int]]) -> dict[int, list[int]]:
    """``{"3": rle}`` -> ``{3: rle}`` with every key checked to be a slice of ``img``."""
    out = {}
    for key, runs in masks.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 9:
            raise PromptError(f"mask key {key[:20]!r} is not a slice index")
        out[img.check_slice(int(key))] = runs
    return out


class _BodyTooLarge(HTTPException):
    pass


class BodyLimit:
    """ASGI middleware: request bodies larger than ``limit`` bytes get 413, before parsing.

    A declared ``Content-Length`` above the limit is refused without reading; a body sent without
    one (chunked) is counted while it streams and refused as soon as it passes the limit, so a
    huge JSON document never reaches the parser. ``exempt`` paths (uploads) have their own limit.
    """

    def __init__(self, app: Any, limit: int, exempt: tuple[str, ...] = ()) -> None:
        self.app, self.limit, self.exempt = app, limit, exempt

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        msg = (
            f"request body is larger than {self.limit / 2**20:g} MB (start the server with "
            "--max-request-mb to change the limit)"
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _error(413, msg)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge(413, msg)
            return message

        await self.app(scope, limited, send)


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
