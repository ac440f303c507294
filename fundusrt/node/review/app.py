"""The review page as a Starlette application: worklist, study view, images, sign-off, login.

Every page and API call but the login page needs a signed-in session; every POST needs the session's
CSRF token (form field ``csrf``). Sessions are signed cookies (itsdangerous, via Starlette's
SessionMiddleware) with HttpOnly, SameSite=Strict, and Secure under TLS, keyed by a secret made at
start-up (a restart signs everyone out); the node keeps the ids of signed-in sessions, so signing out ends
a session even for a copy of its cookie. Pages carry a strict Content-Security-Policy: scripts and
styles come from /static only, and patient data reaches the DOM as text, never as markup.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from pathlib import Path
from typing import Any

from fundusrt._deps import require
from fundusrt.dicom.findings import study_findings
from fundusrt.dicom.sr import ResultWriteError
from fundusrt.node.review.auth import Authenticator
from fundusrt.node.review.render import ImageCache, render_image
from fundusrt.node.review.signing import DeliveryWorker, sign_off
from fundusrt.node.review.sources import Study
from fundusrt.runtime.report import EYE_NAMES, UNKNOWN_EYE

log = logging.getLogger("fundusrt.review")
HERE = Path(__file__).resolve().parent
DECISIONS = {"refer": "Refer", "no_refer": "Rescreen", "ungradable": "Ungradable (retake)"}
THUMBNAIL_PX = 640
SESSION_HOURS = 12
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


# keys of an image of the report that older or hand-made reports may lack (fundusrt.runtime.report.ImageResult)
_IMAGE_DEFAULTS = {"frame_index": 0, "num_tiles": 0, "laterality_source": "tag", "image_laterality": "unknown",
                   "image_laterality_confidence": 0.0, "laterality_mismatch": False, "gradable": True,
                   "gradability_reasons": [], "timings": {}}


def _eye_name(eye: str) -> str:
    return EYE_NAMES.get(eye, "Eye not recorded")


def _signoff_json(signoff: Any) -> dict[str, Any] | None:
    if signoff is None:
        return None
    return {"grader": signoff.grader, "signed": signoff.signed, "delivered": signoff.delivered,
            "delivery_reason": signoff.delivery_reason, "sop_instance_uid": signoff.signoff_uid,
            "eyes": {eye: {**v, "eye_name": _eye_name(eye), "decision_label": DECISIONS.get(v["decision"], "")}
                     for eye, v in signoff.eyes.items()},
            "overridden": any(v["action"] == "overridden" for v in signoff.eyes.values())}


class ReviewApp:
    """The application and what it serves from.

    Args:
        source: a `NodeSource` or `FolderSource`.
        auth: checks sign-ins.
        organization: the verifying organisation written into sign-off SRs (the clinic).
        secure_cookies: mark the session cookie Secure (serving over TLS).
        title: shown in the page header.
    """

    def __init__(self, source: Any, auth: Authenticator, organization: str, secure_cookies: bool = False,
                 title: str = "fundusrt review") -> None:
        for module in ("starlette", "jinja2", "python_multipart", "itsdangerous"):  # say which extra, up front
            require(module, "the review page")
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.base import BaseHTTPMiddleware
        from starlette.middleware.sessions import SessionMiddleware
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles
        from starlette.templating import Jinja2Templates

        self.source, self.auth, self.organization, self.title = source, auth, organization, title
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.images = ImageCache()
        self.delivery = DeliveryWorker(source)
        # ids of signed-in sessions: signing out ends a session here too, so a copied cookie is worthless after it
        self._sessions: set[str] = set()
        routes = [
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/", self.worklist, methods=["GET"]),
            Route("/api/studies", self.api_studies, methods=["GET"]),
            Route("/api/studies/{study_uid}", self.api_study, methods=["GET"]),
            Route("/study/{study_uid}", self.study_page, methods=["GET"]),
            Route("/study/{study_uid}/signoff", self.signoff, methods=["POST"]),
            Route("/image/{study_uid}/{sop_uid}/{frame:int}", self.image, methods=["GET"]),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ]
        self.asgi = Starlette(routes=routes, middleware=[
            Middleware(BaseHTTPMiddleware, dispatch=self._headers),
            Middleware(SessionMiddleware, secret_key=secrets.token_hex(32), session_cookie="fundusrt_review",
                       max_age=SESSION_HOURS * 3600, same_site="strict", https_only=secure_cookies),
        ])

    # ------------------------------------------------------------ plumbing

    async def _headers(self, request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers.update(_HEADERS)
        if "Cache-Control" not in response.headers:  # pages and API hold patient data: never stored
            response.headers["Cache-Control"] = "no-store"
        return response

    @staticmethod
    def _csrf(request: Any) -> str:
        if "csrf" not in request.session:
            request.session["csrf"] = secrets.token_urlsafe(24)
        return request.session["csrf"]

    def _user(self, request: Any) -> dict[str, str] | None:
        user = request.session.get("user")
        return user if isinstance(user, dict) and request.session.get("sid") in self._sessions else None

    async def _checked_form(self, request: Any) -> Any:
        """The POSTed form, or None when its CSRF token is missing or wrong."""
        form = await request.form()
        sent, expected = str(form.get("csrf", "")), request.session.get("csrf", "")
        return form if expected and secrets.compare_digest(sent, expected) else None

    def _page(self, request: Any, name: str, status_code: int = 200, **context: Any) -> Any:
        return self.templates.TemplateResponse(request, name, {
            "title": self.title, "user": self._user(request), "csrf": self._csrf(request), **context},
            status_code=status_code)

    def _refused(self, request: Any, status_code: int, message: str) -> Any:
        from starlette.responses import JSONResponse, PlainTextResponse

        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status_code)
        return PlainTextResponse(message, status_code=status_code)

    @staticmethod
    def _login_redirect() -> Any:
        from starlette.responses import RedirectResponse

        return RedirectResponse("/login", status_code=303)

    # ------------------------------------------------------------ sign-in

    async def login_page(self, request: Any) -> Any:
        return self._page(request, "login.html", token=self.auth.uses_token)

    async def login(self, request: Any) -> Any:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import RedirectResponse

        form = await self._checked_form(request)
        if form is None:
            return self._refused(request, 403, "the sign-in form is out of date (no valid CSRF token): "
                                               "open the sign-in page again")
        login, secret = str(form.get("login", "")).strip()[:64], str(form.get("secret", ""))
        name = await run_in_threadpool(self.auth.check, login, secret)  # scrypt takes tens of milliseconds
        client = request.client.host if request.client else ""
        if name is None:
            self.source.audit.write("login_failed", "", login=login, client=client)
            return self._page(request, "login.html", status_code=401, token=self.auth.uses_token,
                              error="Wrong name/login or token/password.")
        request.session.clear()  # a fresh session (and CSRF token) for the signed-in user
        sid = secrets.token_urlsafe(24)
        self._sessions.add(sid)
        request.session.update(user={"login": login, "name": name}, csrf=secrets.token_urlsafe(24), sid=sid)
        self.source.audit.write("login", "", login=login, client=client)
        return RedirectResponse("/", status_code=303)

    async def logout(self, request: Any) -> Any:
        from starlette.responses import RedirectResponse

        if await self._checked_form(request) is None:
            return self._refused(request, 403, "refused: no valid CSRF token")
        user = self._user(request)
        if user is not None:
            self.source.audit.write("logout", "", login=user["login"])
            self._sessions.discard(request.session["sid"])
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # ------------------------------------------------------------ worklist

    def _row(self, study: Study, signoffs: dict[str, Any]) -> dict[str, Any]:
        return {"study_uid": study.study_uid, "status": study.status, "reason": study.reason,
                "arrived": study.arrived, "updated": study.updated, "patient_name": study.patient_name,
                "patient_id": study.patient_id, "images": study.images, "decision": study.decision,
                "decision_label": DECISIONS.get(study.decision or "", ""),
                "signoff": _signoff_json(signoffs.get(study.study_uid)), "url": f"/study/{study.study_uid}"}

    # GET handlers are plain functions: Starlette runs them in its thread pool (they read SQLite and files).

    def worklist(self, request: Any) -> Any:
        if self._user(request) is None:
            return self._login_redirect()
        return self._page(request, "worklist.html")

    def api_studies(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        if self._user(request) is None:
            return self._refused(request, 401, "sign in first")
        latest = {s.study_uid: s for s in self.source.state.signoffs()}  # oldest first: the last one wins
        return JSONResponse({"studies": [self._row(study, latest) for study in reversed(self.source.studies())]})

    def api_study(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        if self._user(request) is None:
            return self._refused(request, 401, "sign in first")
        study = self.source.study(request.path_params["study_uid"])
        if study is None:
            return self._refused(request, 404, "no such study")
        signoffs = self.source.state.signoffs(study.study_uid)
        return JSONResponse({**self._row(study, {study.study_uid: signoffs[-1]} if signoffs else {}),
                             "signoffs": len(signoffs)})

    # ------------------------------------------------------------ study view and sign-off

    def _study_context(self, study: Study) -> dict[str, Any]:
        report = study.report or {}
        findings = {eye.laterality or UNKNOWN_EYE: eye for eye in study_findings(report)} if report else {}
        eyes = []
        for eye, summary in (report.get("eyes") or {}).items():
            images = []
            for image in report["images"]:
                if (image.get("laterality") or UNKNOWN_EYE) != eye:
                    continue
                lesions = [les for les in findings[eye].lesions if les.sop_instance_uid == image["sop_instance_uid"]
                           and les.frame_index == image.get("frame_index", 0)] if eye in findings else []
                url = f"/image/{study.study_uid}/{image['sop_instance_uid']}/{image.get('frame_index', 0)}"
                images.append({**_IMAGE_DEFAULTS, **image, "url": url, "lesions": lesions,
                               "available": study.image_path(image["sop_instance_uid"]) is not None})
            items = [{"id": item_id, "answer": item["answer"],
                      "probability": item["probabilities"].get(item["answer"], 0.0),
                      "options": sorted(item["probabilities"].items(), key=lambda kv: -kv[1])}
                     for item_id, item in (summary.get("items") or {}).items()]
            eyes.append({"key": eye, "name": _eye_name(eye), "summary": summary, "protocol_items": items,
                         "images": images,
                         "decision_label": DECISIONS.get(summary.get("decision") or "", "not screened")})
        return {"study": study, "report": report, "eyes": eyes, "decisions": DECISIONS,
                "package": report.get("package") or {}, "screening": report.get("screening") or {},
                "signoffs": [_signoff_json(s) for s in self.source.state.signoffs(study.study_uid)],
                "ai_sr_uid": study.ai_sr_path.name[3:-4] if study.ai_sr_path else ""}

    def study_page(self, request: Any) -> Any:
        if self._user(request) is None:
            return self._login_redirect()
        study = self.source.study(request.path_params["study_uid"])
        if study is None:
            return self._refused(request, 404, "no such study (it may have been removed from the spool)")
        context = self._study_context(study)
        signed = request.query_params.get("signed", "")  # confirmed only when it is a sign-off of this study
        return self._page(request, "study.html", **context,
                          signed=signed if any(s["sop_instance_uid"] == signed for s in context["signoffs"]) else "")

    async def signoff(self, request: Any) -> Any:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import RedirectResponse

        user = self._user(request)
        if user is None:
            return self._refused(request, 401, "sign in first")
        form = await self._checked_form(request)
        if form is None:
            return self._refused(request, 403, "refused: no valid CSRF token (reload the page and sign off again)")
        study = await run_in_threadpool(self.source.study, request.path_params["study_uid"])
        if study is None:
            return self._refused(request, 404, "no such study")
        context = self._study_context(study)
        if not study.can_sign_off:
            return self._page(request, "study.html", status_code=409, **context,
                              error=f"This study has no result to sign off yet (status {study.status}).")
        if str(form.get("ai_sr", "")) != context["ai_sr_uid"]:
            return self._page(request, "study.html", status_code=409, **context,
                              error="The AI result changed since this page was opened (the study ran again); "
                                    "review the new result and sign off again.")
        eyes = {}
        for eye in context["eyes"]:
            decision = str(form.get(f"decision.{eye['key']}", ""))
            if decision not in DECISIONS:
                return self._page(request, "study.html", status_code=400, **context,
                                  error=f"{eye['name']}: choose a decision.")
            eyes[eye["key"]] = {"decision": decision, "reason": str(form.get(f"reason.{eye['key']}", ""))[:1000]}
        try:
            record = await run_in_threadpool(sign_off, self.source, study, eyes, user["name"], user["login"],
                                             self.organization)
        except ResultWriteError as exc:
            return self._page(request, "study.html", status_code=400, **context, error=f"Not signed off: {exc}.")
        except (OSError, sqlite3.Error) as exc:
            log.error("sign-off of study %s could not be stored: %s", study.study_uid, exc)
            return self._page(request, "study.html", status_code=500, **context,
                              error=f"Not signed off: the sign-off could not be stored ({type(exc).__name__}).")
        self.delivery.wake()
        return RedirectResponse(f"/study/{study.study_uid}?signed={record.signoff_uid}", status_code=303)

    # ------------------------------------------------------------ images

    def image(self, request: Any) -> Any:
        from starlette.responses import Response

        if self._user(request) is None:
            return self._refused(request, 401, "sign in first")
        uid, sop, frame = (request.path_params[k] for k in ("study_uid", "sop_uid", "frame"))
        full = request.query_params.get("size") == "full"
        study = self.source.study(uid)
        path = study.image_path(sop) if study is not None else None
        if path is None:
            return self._refused(request, 404, "image not found (its source file is no longer on disk)")
        key = (str(path), str(study.ai_sr_path), sop, frame, full)

        def render() -> bytes:  # the boxes are looked up only when the image is not cached
            lesions = [les for eye in study_findings(study.report) for les in eye.lesions
                       if les.sop_instance_uid == sop and les.frame_index == frame]
            return render_image(path, sop, frame, lesions, None if full else THUMBNAIL_PX)

        try:
            data = self.images.get_or_render(key, render)
        except (ResultWriteError, OSError) as exc:
            return self._refused(request, 404, f"image cannot be drawn: {exc}")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=600"})
