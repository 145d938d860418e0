"""The JSON API under /api/v1 (an interface scripts rely on: names as documented in
docs/console.md). Authorization: Bearer TOKEN (`dicom-relay token add`); a console session
works too. 401 without valid credentials, 403 for a role that may not, 404 for what does not
exist."""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from relay.console.control import Control, NotFound
from relay.console.users import Principal, Users

PrincipalOf = Callable[[Request], Principal | None]


def api_router(control: Control, users: Callable[[], Users],
               session_principal: PrincipalOf | None = None) -> APIRouter:
    router = APIRouter(prefix="/api/v1")

    def principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            found = users().bearer(token.strip())
            if found is not None:
                return found
        elif session_principal is not None:
            found = session_principal(request)
            if found is not None:
                return found
        raise HTTPException(401, "a valid token (Authorization: Bearer …) is needed",
                            headers={"WWW-Authenticate": "Bearer"})

    def role(needed: str) -> Any:
        # No string annotations in this module: FastAPI reads these at run time, and
        # `principal` is local to this function.
        def check(who: Principal = Depends(principal)) -> Principal:
            if not who.may(needed):
                raise HTTPException(403, f"{who.name} ({who.role}) may not do this: "
                                    f"{needed} or above")
            return who
        return Depends(check)

    viewer, operator, admin = role("viewer"), role("operator"), role("admin")

    def found(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except SQLAlchemyError as exc:
            raise HTTPException(503, "the history database does not answer: "
                                + str(exc).splitlines()[0][:300]) from None

    @router.get("/queues", summary="Each destination's queue")
    def queues(who: Principal = viewer) -> dict[str, Any]:
        return {"destinations": control.queues()}

    @router.get("/studies", summary="Search studies (newest first)")
    def studies(q: Annotated[str, Query(
                    description="PatientID as received or as sent, PatientName (its "
                    "beginning, any case), AccessionNumber or StudyInstanceUID")] = "",
                limit: Annotated[int, Query(ge=1, le=500)] = 50,
                who: Principal = viewer) -> dict[str, Any]:
        return {"studies": found(lambda: control.studies(q, limit))}

    @router.get("/studies/{uid}", summary="A study, with its timeline")
    def study(uid: str, who: Principal = viewer) -> dict[str, Any]:
        return dict(found(lambda: control.study(uid)))

    @router.get("/failed", summary="Quarantined objects, newest first")
    def failed(who: Principal = viewer) -> dict[str, Any]:
        return {"failed": control.failed()}

    @router.post("/failed/{ident}/retry", summary="Requeue one object, for its destination")
    def retry(ident: str, who: Principal = operator) -> dict[str, Any]:
        done = found(lambda: control.retry(ident, who.name))
        return {"done": done.done, **done.details}

    @router.post("/destinations/{name}/pause", summary="Stop sending (survives a restart)")
    def pause(name: str, who: Principal = operator) -> dict[str, Any]:
        done = found(lambda: control.set_paused(name, True, who.name))
        return {"done": done.done, **done.details}

    @router.post("/destinations/{name}/resume", summary="Send again")
    def resume(name: str, who: Principal = operator) -> dict[str, Any]:
        done = found(lambda: control.set_paused(name, False, who.name))
        return {"done": done.done, **done.details}

    @router.post("/studies/{uid}/release", summary="Send a held study now")
    def release(uid: str, who: Principal = operator) -> dict[str, Any]:
        done = found(lambda: control.release(uid, who.name))
        return {"done": done.done, **done.details}

    @router.post("/studies/{uid}/retry",
                 summary="Requeue a study's quarantined objects, each for its destination")
    def retry_study(uid: str, who: Principal = operator) -> dict[str, Any]:
        done = found(lambda: control.retry_study(uid, who.name))
        return {"done": done.done, **done.details}

    @router.post("/studies/{uid}/resend/{destination}",
                 summary="Send a study's kept delivered copies again ([spool] "
                 "keep_delivered_hours)")
    def resend(uid: str, destination: str, who: Principal = operator) -> dict[str, Any]:
        done = found(lambda: control.resend(uid, destination, who.name))
        return {"done": done.done, **done.details}

    @router.post("/reload", summary="Re-read the config file, as SIGHUP")
    def reload(who: Principal = admin) -> Any:
        applied, report = control.reload(who.name)
        body = {"done": "reloaded" if applied else "refused: the running configuration "
                "stays", **report}
        return JSONResponse(body, status_code=200 if applied else 409)

    return router
