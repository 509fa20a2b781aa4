"""The nodes web page: ``GET /`` and its static files, shipped inside the package.

The page is plain HTML, CSS and JavaScript (no build step, no CDN: the machines it runs
on may have no internet). It only reads ``/api/p2p`` and ``/api/status`` from the
browser, so this module owns nothing but serving three files.
"""

from __future__ import annotations

import pathlib

from fastapi import APIRouter
from fastapi.responses import FileResponse

from localp2p.api.errors import APIError

#: Where the page's files live (package data, see pyproject's package-data).
STATIC_DIR = pathlib.Path(__file__).parent / "static"
#: The files served under /static/ and their media types; a fixed list, so no path from
#: the URL ever reaches the filesystem.
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
#: The page changes with the installed version; browsers revalidate rather than guess.
CACHE_HEADERS = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    """The page itself."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=CACHE_HEADERS)


@router.get("/static/{name}")
async def static_file(name: str) -> FileResponse:
    """One of the page's files; anything not in :data:`STATIC_FILES` is a 404."""
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise APIError(404, f"no static file {name!r}", "invalid_request_error")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=CACHE_HEADERS)
