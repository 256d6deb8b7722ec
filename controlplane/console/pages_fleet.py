"""Console pages: logging in and out, the fleet, a device."""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec
from litestar import Request, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body, Parameter
from litestar.response import Redirect, Template

from controlplane.console._auth import COOKIE, PREFIX, console_user, safe_next

__all__ = ["HANDLERS"]

_SESSION_S: Final = 12 * 3600


class LoginForm(msgspec.Struct):
    token: str = ""
    next: str = ""


@get("/login", sync_to_thread=True)
def login_page(request: Request[Any, Any, Any],
               next: Annotated[str, Parameter(max_length=500)] = "") -> Template:
    return Template(template_name="login.html",
                    context={"next": safe_next(next), "error": None, "user": console_user(request)})


@post("/login", sync_to_thread=True, status_code=303)
def login(request: Request[Any, Any, Any],
          data: Annotated[LoginForm, Body(media_type=RequestEncodingType.URL_ENCODED)]) -> Template | Redirect:
    from controlplane.auth import verify_token

    secret = data.token.strip()
    info = verify_token(request.app.state.engine, secret) if 0 < len(secret) <= 200 else None
    if info is None:
        return Template(template_name="login.html", status_code=401,
                        context={"next": safe_next(data.next), "error": "invalid or revoked API token",
                                 "user": None})
    response = Redirect(safe_next(data.next), status_code=303)
    response.set_cookie(COOKIE, secret, path=PREFIX, httponly=True, samesite="strict", max_age=_SESSION_S,
                        secure=request.url.scheme == "https")
    return response


@post("/logout", sync_to_thread=False, status_code=303)
def logout() -> Redirect:
    response = Redirect(f"{PREFIX}/login", status_code=303)
    response.delete_cookie(COOKIE, path=PREFIX)
    return response


HANDLERS: Final[list[Any]] = [login_page, login, logout]
