"""The console's pages: server-rendered (Jinja2), refreshed by the browser itself where they
show something that moves; every form carries the session's CSRF token. The pages act
through the same Control as the API."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import SQLAlchemyError

from relay.console import i18n
from relay.console.control import Control, NotFound
from relay.console.sessions import COOKIE, LoginLimiter, Session, Sessions
from relay.console.users import Users

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
LOGIN_CSRF = "relay_login_csrf"
MAX_UPLOAD = 64 * 1024 * 1024  # the rule tester: files beyond this are not read
MAX_FILES = 20  # the rule tester: files per try


class LoginRequired(Exception):
    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def age(seconds: float) -> str:
    if not seconds:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def when(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def chart_svg(buckets: list[tuple[float, int]], now: float, slot: float = 600,
              slots: int = 36) -> str:
    """Bars of objects delivered per slot, oldest left; an SVG the page carries inline."""
    first = (now // slot - (slots - 1)) * slot
    counts = dict(buckets)
    values = [counts.get(first + i * slot, 0) for i in range(slots)]
    top = max(values) or 1
    width, height = 720, 140
    bar = width / slots
    rects = []
    for i, v in enumerate(values):
        h = (height - 20) * v / top
        start = time.strftime("%H:%M", time.localtime(first + i * slot))
        rects.append(f'<rect x="{i * bar + 1:.1f}" y="{height - 20 - h:.1f}" '
                     f'width="{bar - 2:.1f}" height="{h:.1f}" fill="#3b78b5">'
                     f'<title>{start}: {v}</title></rect>')
    labels = "".join(
        f'<text x="{i * bar:.1f}" y="{height - 5}" font-size="10">'
        f'{time.strftime("%H:%M", time.localtime(first + i * slot))}</text>'
        for i in range(0, slots, 6))
    return (f'<svg id="chart" width="{width}" height="{height}" role="img" '
            f'aria-label="throughput">{"".join(rects)}{labels}'
            f'<text x="{width - 60}" y="12" font-size="10">max {top}</text></svg>')


def pages_router(control: Control, users: Callable[[], Users], sessions: Sessions,
                 limiter: LoginLimiter, secure_cookies: bool) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def lang_of(request: Request) -> str:
        return i18n.language(request.cookies.get(i18n.COOKIE),
                             request.headers.get("accept-language"))

    def session_of(request: Request) -> Session | None:
        session = sessions.get(request.cookies.get(COOKIE))
        if session is None:
            return None
        # Removed users (or changed roles) apply at their next request.
        entry = users().data["users"].get(session.principal.name)
        if not isinstance(entry, dict) or entry.get("role") != session.principal.role:
            sessions.drop(session.id)
            return None
        return session

    def need(request: Request, role: str = "viewer") -> Session:
        session = session_of(request)
        if session is None:
            raise LoginRequired(request.url.path + (f"?{request.url.query}"
                                                    if request.url.query else ""))
        if not session.principal.may(role):
            _ = i18n.translator(lang_of(request))
            raise HTTPException(403, _("You may not do this: it needs the role {role}.",
                                       role=role))
        return session

    async def form_with_csrf(request: Request, session: Session) -> Any:
        form = await request.form()
        token = form.get("csrf")
        if not isinstance(token, str) or not secrets.compare_digest(token, session.csrf):
            raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the "
                                "page and try again")
        return form

    def render(request: Request, template: str, session: Session | None, *,
               title: str, nav: str = "", status: int = 200, **context: Any) -> HTMLResponse:
        lang = lang_of(request)
        flash = list(session.flash) if session else []
        if session:
            session.flash.clear()
        principal = session.principal if session else None
        return TEMPLATES.TemplateResponse(request, template, {
            "lang": lang, "_": i18n.translator(lang), "title": title, "nav": nav,
            "user": principal, "csrf": session.csrf if session else context.pop("csrf", ""),
            "flash": flash, "size": size, "age": age, "when": when,
            "may_operate": bool(principal and principal.may("operator")),
            "may_admin": bool(principal and principal.may("admin")), **context},
            status_code=status)

    def back(url: str, session: Session, message: str) -> RedirectResponse:
        session.flash.append(message)
        return RedirectResponse(url, status_code=303)

    # --- logging in ----------------------------------------------------------------------------

    @router.get("/login")
    def login_page(request: Request, next: str = "/") -> Response:  # noqa: A002
        csrf = secrets.token_urlsafe(24)
        response = render(request, "login.html", None, title="Log in", csrf=csrf,
                          next=_local(next))
        response.set_cookie(LOGIN_CSRF, csrf, httponly=True, samesite="strict",
                            secure=secure_cookies, path="/login")
        return response

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        _ = i18n.translator(lang_of(request))
        token, cookie = form.get("csrf"), request.cookies.get(LOGIN_CSRF)
        if not (isinstance(token, str) and cookie and secrets.compare_digest(token, cookie)):
            raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the "
                                "page and try again")
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        address = request.client.host if request.client else "?"
        csrf = secrets.token_urlsafe(24)
        wait = limiter.blocked_for(address, name)
        response: Response
        if wait > 0:
            response = render(request, "login.html", None, title="Log in", csrf=csrf,
                              next=_local(str(form.get("next", "/"))), status=429,
                              error=_("Too many failed logins: try again in {seconds} s.",
                                      seconds=int(wait) + 1))
        else:
            principal = users().login(name, password)
            if principal is not None:
                limiter.succeeded(name)
                session = sessions.create(principal)
                control.login(principal.name, address)
                done = RedirectResponse(_local(str(form.get("next", "/"))), status_code=303)
                done.set_cookie(COOKIE, session.id, httponly=True, samesite="strict",
                                secure=secure_cookies, path="/")
                return done
            limiter.failed(address, name)
            response = render(request, "login.html", None, title="Log in", csrf=csrf,
                              next=_local(str(form.get("next", "/"))), status=401,
                              error=_("Wrong user name or password."))
        response.set_cookie(LOGIN_CSRF, csrf, httponly=True, samesite="strict",
                            secure=secure_cookies, path="/login")
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        session = need(request)
        await form_with_csrf(request, session)
        sessions.drop(session.id)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @router.get("/lang/{code}")
    def set_language(request: Request, code: str) -> Response:
        target = _local(request.headers.get("referer", "/"), same_host=request.url.netloc)
        response = RedirectResponse(target, status_code=303)
        if code in i18n.LANGUAGES:
            response.set_cookie(i18n.COOKIE, code, samesite="strict", secure=secure_cookies,
                                max_age=365 * 86400, path="/")
        return response

    # --- reading -------------------------------------------------------------------------------

    @router.get("/")
    def overview(request: Request) -> Response:
        session = need(request)
        o = control.overview()
        return render(request, "overview.html", session, title="Overview", nav="/",
                      refresh=5, o=o, chart=chart_svg(o["chart"], o["now"]))

    @router.get("/studies")
    def studies(request: Request, q: str = "") -> Response:
        session = need(request)
        found: list[dict[str, Any]] = []
        error = None
        try:
            found = control.studies(q, 100)
        except NotFound as exc:
            error = str(exc)
        except SQLAlchemyError as exc:
            error = str(exc).splitlines()[0][:200]
        return render(request, "studies.html", session, title="Studies", nav="/studies",
                      q=q, studies=found, error=error)

    @router.get("/studies/{uid}")
    def study(request: Request, uid: str) -> Response:
        session = need(request)
        try:
            s = control.study(uid)
            objs = control.objects_of(uid)
        except NotFound as exc:
            return render(request, "message.html", session, title="Study", status=404,
                          nav="/studies", message=str(exc))
        series: dict[str, list[dict[str, Any]]] = {}
        for o in objs:
            series.setdefault(o["series_instance_uid"] or "?", []).append(o)
        return render(request, "study.html", session, title="Study", nav="/studies",
                      refresh=10, s=s, series=series, kept=control.kept_copies(uid))

    @router.post("/studies/{uid}/retry")
    async def retry_study(request: Request, uid: str) -> Response:
        session = need(request, "operator")
        await form_with_csrf(request, session)
        try:
            message = control.retry_study(uid, session.principal.name).done
        except NotFound as exc:
            message = str(exc)
        return back(f"/studies/{quote(uid)}", session, message)

    @router.post("/studies/{uid}/resend/{destination}")
    async def resend(request: Request, uid: str, destination: str) -> Response:
        session = need(request, "operator")
        await form_with_csrf(request, session)
        try:
            message = control.resend(uid, destination, session.principal.name).done
        except NotFound as exc:
            message = str(exc)
        return back(f"/studies/{quote(uid)}", session, message)

    @router.get("/failed")
    def failed(request: Request) -> Response:
        session = need(request)
        groups: dict[str, list[dict[str, Any]]] = {}
        for item in control.failed():
            groups.setdefault(item["reason"], []).append(item)
        return render(request, "failed.html", session, title="Failed", nav="/failed",
                      groups=groups)

    @router.get("/destinations")
    def destinations(request: Request) -> Response:
        session = need(request)
        return render(request, "destinations.html", session, title="Destinations",
                      nav="/destinations", o=control.overview())

    @router.get("/tester")
    def tester_page(request: Request) -> Response:
        session = need(request)
        return render(request, "tester.html", session, title="Rule tester", nav="/tester",
                      results=[])

    @router.get("/config")
    def config(request: Request) -> Response:
        session = need(request)
        return render(request, "config.html", session, title="Configuration", nav="/config",
                      source=str(control.relay.config.source), text=control.config_text())

    # --- acting --------------------------------------------------------------------------------

    @router.post("/studies/{uid}/release")
    async def release(request: Request, uid: str) -> Response:
        session = need(request, "operator")
        await form_with_csrf(request, session)
        try:
            done = control.release(uid, session.principal.name)
            message = f"{uid}: released ({done.details['objects']})"
        except NotFound as exc:
            message = str(exc)
        return back(f"/studies/{quote(uid)}", session, message)

    @router.post("/failed/act")
    async def failed_act(request: Request) -> Response:
        form = await form_with_csrf(request, need(request))
        do = str(form.get("do", ""))
        session = need(request, "admin" if do.startswith("delete") else "operator")
        reason = str(form.get("reason", ""))
        ids = ([str(i) for i in form.getlist("id")] if do.endswith("selected")
               else control.ids_of_reason(reason))
        if do.startswith("retry"):
            count = control.retry_many(ids, session.principal.name)
            return back("/failed", session, f"{count} object(s) requeued")
        if do.startswith("delete"):
            # Nothing is deleted before a page that names the count is confirmed.
            return render(request, "confirm.html", session, title="Delete", nav="/failed",
                          ids=ids)
        raise HTTPException(400, "unknown action")

    @router.post("/failed/delete")
    async def failed_delete(request: Request) -> Response:
        session = need(request, "admin")
        form = await form_with_csrf(request, session)
        count = control.delete_failed([str(i) for i in form.getlist("id")],
                                      session.principal.name)
        return back("/failed", session, f"{count} object(s) deleted")

    @router.post("/destinations/{name}/{action}")
    async def destination_action(request: Request, name: str, action: str) -> Response:
        session = need(request, "viewer" if action == "echo" else "operator")
        await form_with_csrf(request, session)
        try:
            if action == "echo":
                ok, detail = control.echo(name, session.principal.name)
                message = f"echo {name}: {'OK' if ok else 'FAILED'}: {detail}"
            elif action in ("pause", "resume"):
                message = control.set_paused(name, action == "pause",
                                             session.principal.name).done
            else:
                raise HTTPException(404, f"no action {action!r}")
        except NotFound as exc:
            message = str(exc)
        return back("/destinations", session, message)

    @router.post("/tester")
    async def tester(request: Request) -> Response:
        session = need(request)
        form = await form_with_csrf(request, session)
        files = []
        for upload in form.getlist("files")[:MAX_FILES]:
            if isinstance(upload, str):
                continue
            data = await upload.read(MAX_UPLOAD + 1)
            if data:
                files.append((upload.filename or "upload", data[:MAX_UPLOAD]))
        results = control.tester(files)
        return render(request, "tester.html", session, title="Rule tester", nav="/tester",
                      results=results)

    @router.post("/reload")
    async def reload(request: Request) -> Response:
        session = need(request, "admin")
        await form_with_csrf(request, session)
        applied, report = control.reload(session.principal.name)
        if applied:
            changed = [f"{k}: {', '.join(v)}" for k, v in report.items()
                       if isinstance(v, list) and v]
            message = "reloaded" + (f" ({'; '.join(changed)})" if changed else "")
        else:
            message = f"reload refused, the running configuration stays: {report['refused']}"
        return back("/config", session, message)

    return router


def _local(url: str, same_host: str | None = None) -> str:
    """Only a path of this site (never an open redirect)."""
    if same_host and "://" in url:
        scheme_host, _, rest = url.partition("://")[2].partition("/")
        if scheme_host != same_host:
            return "/"
        url = "/" + rest
    if not url.startswith("/") or url.startswith("//") or "\\" in url:
        return "/"
    return url
