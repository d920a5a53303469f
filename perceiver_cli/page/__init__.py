"""The pages of `perceiver serve`, shipped as package data: `GET /` for browsers (index.html,
page.css, page.js) and `GET /docs` (docs.html, which renders /openapi.json). Plain
HTML/CSS/JS: no CDN, no external font, no build step.

The page learns what it must show as the terminal shows it from `config()`, injected into
index.html when it is served: the confidence bands (render.CONFIDENCE, the terminal's own
table), the strategies and bounds of the options (options.py), and how much of a result
it renders before it says what it cut.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import render
from ..openapi import document
from ..options import MAX_TOP_K, STRATEGIES, FillOptions
from ..results import dumps

ASSETS = {"page.css": "text/css; charset=utf-8", "page.js": "text/javascript; charset=utf-8",
          "docs.js": "text/javascript; charset=utf-8"}
MAX_CHARS = 300_000  # characters of a filled text the page renders (a browser stays responsive)
MAX_SPANS = 3_000  # fills it renders


def config() -> dict:
    return {
        "bands": [{"min": lowest, "colour": colour, "label": label} for lowest, colour, label in render.CONFIDENCE],
        "strategies": list(STRATEGIES),
        "default_strategy": FillOptions.strategy,
        "default_top_k": FillOptions.top_k,
        "max_top_k": MAX_TOP_K,
        "bidi": sorted(render._BIDI),
        "max_chars": MAX_CHARS,
        "max_spans": MAX_SPANS,
    }


def _read(name: str) -> bytes:
    return (files(__package__) / name).read_bytes()


@lru_cache(maxsize=None)
def index() -> bytes:
    """index.html with `config()` in place ("<" escaped: the JSON cannot end its script element)."""
    return _read("index.html").replace(b"{{CONFIG}}", dumps(config()).replace(b"<", b"\\u003c"))


@lru_cache(maxsize=None)
def docs() -> bytes:
    return _read("docs.html")


@lru_cache(maxsize=None)
def asset(name: str) -> tuple[bytes, str] | None:
    """(bytes, media type) of page.css or page.js; None for any other name."""
    return (_read(name), ASSETS[name]) if name in ASSETS else None


# -- serving them ---------------------------------------------------------------------------

OPEN_PATHS = ("/docs", "/openapi.json", *(f"/page/{name}" for name in ASSETS))  # need no API key


def wants_page(scope) -> bool:
    """A browser's GET / (or HEAD /): its Accept names text/html. Other clients of GET /
    get what they always got (405: POST / is the fill-mask route)."""
    if scope.get("path") != "/" or scope.get("method") not in ("GET", "HEAD"):
        return False
    accept = b",".join(v for k, v in scope.get("headers", ()) if k == b"accept")
    return b"text/html" in accept.lower()


def is_open(scope) -> bool:
    """Whether a request needs no API key: the pages, their assets and the API document
    (what every copy of the package ships; nothing about the model or its requests)."""
    return scope.get("path") in OPEN_PATHS or wants_page(scope)


async def _page(request: Request) -> Response:
    if not wants_page(request.scope):
        raise HTTPException(405, headers={"Allow": "POST"})
    return _html(index())


async def _asset(request: Request) -> Response:
    found = asset(request.path_params["name"])
    if found is None:
        raise HTTPException(404)
    return Response(found[0], media_type=found[1], headers={"Cache-Control": "no-cache"})


async def _docs(request: Request) -> Response:
    return _html(docs())


async def _openapi(request: Request) -> Response:
    return Response(_document(), media_type="application/json")


@lru_cache(maxsize=None)
def _document() -> bytes:
    return dumps(document())


def _html(body: bytes) -> Response:
    return Response(body, media_type="text/html; charset=utf-8", headers={
        "Cache-Control": "no-cache",
        # everything the pages load is this server's own: no other origin, no inline script runs
        "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                                   "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        "X-Content-Type-Options": "nosniff",
    })


def routes() -> list[Route]:
    """GET / (the page, for browsers), its assets, GET /docs and GET /openapi.json."""
    return [Route("/", _page, methods=["GET"]), Route("/page/{name}", _asset, methods=["GET"]),
            Route("/docs", _docs, methods=["GET"]), Route("/openapi.json", _openapi, methods=["GET"])]
