"""Login, token refresh and logout under /api/account."""
from __future__ import annotations


from .. import store
from ..auth import AuthError
from ..errors import ApiError
from .manage import ManageHandler


def _api_error(exc: AuthError) -> ApiError:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return ApiError(exc.status, exc.message, headers)


class LoginHandler(ManageHandler):
    async def post(self) -> None:
        """Exchange a username and password for tokens.
        ---
        tags: [account]
        summary: Log in
        description: >-
          Send the access token as `Authorization: Bearer <access>`; it lasts an
          hour, the refresh token 30 days. Five failed logins for one username from one
          address within 5 minutes answer 429 with Retry-After, attempts sent in parallel
          included. After 300 failures from one address within 5 minutes, a username that
          has failed from it gets no further try until the window passes; one that has not
          failed is never refused by that bound.
        requestBody: {required: true, content: {application/json: {schema: LoginInput}}}
        responses:
          200: {description: Tokens, content: {application/json: {schema: Tokens}}}
          400: BadRequest
          401: Unauthorized
          429: TooManyRequests
        """
        body = await self.json_body()
        try:
            user = await self.ctx.auth.authenticate(body.get("username"), body.get("password"),
                                                    self.request.remote_ip or "")
        except AuthError as exc:
            raise _api_error(exc) from None
        self.write_json(await store.run(self.ctx.auth.login, user))


class RefreshHandler(ManageHandler):
    async def post(self) -> None:
        """A new access token for a refresh token.
        ---
        tags: [account]
        summary: Refresh the access token
        requestBody: {required: true, content: {application/json: {schema: RefreshInput}}}
        responses:
          200: {description: A new access token, content: {application/json: {schema: AccessToken}}}
          400: BadRequest
          401: Unauthorized
        """
        token = (await self.json_body()).get("refresh")
        if not isinstance(token, str) or not token:
            raise ApiError(400, "refresh required")
        try:
            access = await store.run(self.ctx.auth.refresh, token)
        except AuthError as exc:
            raise _api_error(exc) from None
        self.write_json({"access": access})


class LogoutHandler(ManageHandler):
    async def post(self) -> None:
        """Revoke the tokens of this login (the access token sent and its refresh token).
        ---
        tags: [account]
        summary: Log out
        description: >-
          Identify the login with the bearer access token, or with its refresh
          token in the body, or both.
        security: [{bearerAuth: []}, {}]
        requestBody: {required: false, content: {application/json: {schema: LogoutInput}}}
        responses:
          200: {description: Logged out, content: {application/json: {schema: Status}}}
          400: BadRequest
          401: Unauthorized
        """
        tokens = []
        if self.current_user is not None:
            tokens.append(self.bearer_token())
        if self.request.body.strip():
            refresh = (await self.json_body()).get("refresh")
            if self.ctx.auth.user_for(refresh, "refresh") is not None:
                tokens.append(refresh)
        if not tokens:
            raise ApiError(401, "authentication required", {"WWW-Authenticate": "Bearer"})
        for token in tokens:
            await store.run(self.ctx.auth.revoke, token)
        self.write_json({"status": "logged out"})
