"""A small web UI for people, served by the daemon (and ``hpo-sync serve``) under ``/ui/``.

Server-rendered HTML (Jinja2 templates with autoescaping on: experiment names, descriptions
and config texts are user input), one stylesheet and one small script shipped in this
package — no build step, no CDN, works offline. Decisions (documented in the README, "Web
UI"):

- **Same tokens, same limits as the API.** A sign-in form exchanges a configured API token
  for a server-side session (:mod:`hpo_sync.web.sessions`): a random id in an HttpOnly,
  SameSite=Strict cookie limited to ``/ui``, 12 h at most and 2 h idle. Every request
  re-checks that the token is still configured (a SIGHUP reload may remove it) and applies
  its *current* workspace limit. A limited token sees only its workspaces on every page,
  the outbox included.
- **Open loopback mode.** With no ``[[api.tokens]]``, the UI follows the API's rules —
  loopback peer and loopback ``Host`` header, so a web page cannot reach it by DNS
  rebinding — and there is no sign-in at all (nothing to exchange).
- **CSRF.** The only state-changing requests are sign-in and sign-out (POST). Both need an
  ``Origin`` naming this host (or, without one, ``Sec-Fetch-Site: same-origin``); the
  session cookie is SameSite=Strict besides.
- **CSP.** ``default-src 'none'`` with scripts, styles and fetches from this origin only; no
  inline script or style anywhere (charts use SVG presentation attributes and classes).
- **Feed.** The changes page long-polls ``/ui/changes/poll`` (cookie-authenticated) through
  the read API's change watcher, and inserts the rows the server rendered (escaped by the
  same templates).
- **Reuse.** Filters, sorting and cursors are the read API's own (``parse_params`` with its
  parameter tables, its cursor, its queries), run in its read pool; a bad parameter is a
  400 page with the API's wording.
"""

from __future__ import annotations

from aiohttp import web

from ..api.read import ReadRuntime, metrics_middleware, setup_read_api
from .ui import WEB_UI, WebUi, load_static, make_templates, setup_routes, ui_middleware

__all__ = ["WEB_UI", "WebUi", "setup_web_ui"]


def setup_web_ui(app: web.Application, runtime: ReadRuntime) -> None:
    """Add the UI's routes and its guard to ``app`` (idempotent). Call it after
    :func:`~hpo_sync.api.read.setup_read_api` (it is called here otherwise)."""
    if WEB_UI in app:
        return
    setup_read_api(app, runtime)
    app[WEB_UI] = WebUi(runtime, make_templates(), load_static())
    setup_routes(app)
    # Right inside the metrics middleware: UI requests are counted, then answered as pages
    # (not by the API's JSON error and bearer-token middlewares, which it bypasses).
    middlewares = app.middlewares
    at = middlewares.index(metrics_middleware) + 1 if metrics_middleware in middlewares else 0
    middlewares.insert(at, ui_middleware)
