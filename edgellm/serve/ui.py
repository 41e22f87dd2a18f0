"""The browser chat page: static files (no build step, no CDN) served at `/` and `/ui/`, outside the API schema."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
# The page only talks to its own origin; model output is rendered as DOM text nodes, and this policy stops any
# inline script or remote load even if a rendering bug let markup through.
HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag) so an upgraded edgellm serves its new page
}


class _UIFiles(StaticFiles):
    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


def mount_ui(app: FastAPI) -> None:
    """Serve the chat page at `/` and its assets under `/ui/`. Neither appears in the OpenAPI schema, and
    neither needs the API key (the page asks for it and sends it to /v1 itself)."""
    index = STATIC_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=HEADERS)

    app.mount("/ui", _UIFiles(directory=STATIC_DIR), name="ui")
