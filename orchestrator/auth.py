"""Control-API authentication: the operator token file and the guard on every route.

The operator token (`vault-secrets/operator-token`, mode 0600) is created at first start and
kept in plain for the CLI, like `~/.vault-token`; it is adopted into the hashed token store as
an `admin` token. It is never printed: the API's output ends up in log files.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Header, HTTPException, Request

from contracts.credentials import (
    CredentialError,
    VerifiedTokens,
    is_revoked,
    load_or_create_key,
)
from contracts.dataroot import DataRoot, write_secret_file
from orchestrator.access import (
    AUTH_KEY,
    OPERATOR_TOKEN_ID,
    ApiToken,
    RateLimited,
    RateLimiter,
    RateStoreUnavailable,
    Rule,
    TokenScope,
    TokenStore,
    rule_for,
)

CREDENTIAL_PREFIX = "av1."
"""How a machine credential (`contracts.credentials.mint`) begins; API tokens begin `avt_`."""


def ensure_token(root: DataRoot) -> tuple[str, bool]:
    """The operator token, and whether it was created just now (then it is shown once)."""
    path = root.operator_token
    if path.exists():
        return path.read_text().strip(), False
    token = "avt_" + secrets.token_urlsafe(32)
    write_secret_file(path, token)
    return token, True


class Guard:
    """The FastAPI dependency on every route: token → scope → rule → rate limit.

    401 without a live token, 403 when the route's rule does not admit the token's scope (or
    a route has no rule at all), 429 with `Retry-After` past the token's rate limit, 503 when
    the shared rate-limit store cannot be reached.
    """

    def __init__(
        self,
        tokens: TokenStore,
        limiter: RateLimiter,
        root: DataRoot | None = None,
    ) -> None:
        """`root`: where the machine-credential key and revocations are; with it, a worker's
        own credential (`av1.…`) is a machine token for its project and machine."""
        self.tokens = tokens
        self.limiter = limiter
        self.root = root
        self._credentials = VerifiedTokens(load_or_create_key(root)) if root else None

    def __call__(
        self, request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> ApiToken | None:
        route = request.scope.get("route")
        path = getattr(route, "path", request.url.path)
        rule = rule_for(request.method, path)
        if rule is not None and rule.public:
            return None
        token = self._token(authorization)
        holder = request.scope.get(AUTH_KEY)
        if isinstance(holder, dict):
            holder["token_id"] = token.id
        try:
            self.limiter.hit(token)
        except RateLimited as exc:
            raise HTTPException(
                429, str(exc), headers={"Retry-After": str(exc.retry_after)}
            ) from exc
        except RateStoreUnavailable as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from exc
        if rule is None or not self._admits(rule, token, request):
            raise HTTPException(403, f"a {token.scope} token may not {request.method} {path}")
        return token

    def _token(self, authorization: str | None) -> ApiToken:
        if authorization and authorization.startswith("Bearer "):
            value = authorization.removeprefix("Bearer ").strip()
            if value.startswith(CREDENTIAL_PREFIX) and self._credentials is not None:
                return self._machine(value)
            token = self.tokens.authenticate(value)
            if token is not None:
                return token
        raise HTTPException(
            401, "missing, wrong or revoked bearer token", headers={"WWW-Authenticate": "Bearer"}
        )

    def _machine(self, credential: str) -> ApiToken:
        """A worker's machine credential as a machine token: 401 when forged, expired or
        revoked (its assignment ended)."""
        assert self._credentials is not None and self.root is not None
        try:
            identity = self._credentials.verify(credential)
        except CredentialError as exc:
            raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from exc
        if is_revoked(self.root, identity.assignment):
            raise HTTPException(
                401,
                f"the credential of assignment {identity.assignment!r} was revoked",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return ApiToken(
            id=f"assignment:{identity.assignment}",
            scope=TokenScope.machine,
            sha256="",
            created="",
            project=identity.project,
            machine=identity.machine,
            trial=identity.trial,
            assignment=identity.assignment,
        )

    @staticmethod
    def _admits(rule: Rule, token: ApiToken, request: Request) -> bool:
        if token.scope is TokenScope.machine:
            param = rule.machine_project_param
            return (
                param is not None
                and TokenScope.machine in rule.scopes
                and request.path_params.get(param) == token.project
            )
        return token.scope in rule.scopes


def guard_for(root: DataRoot, limiter: RateLimiter) -> Guard:
    """The guard over `root`'s token store, with the operator-token file adopted as admin."""
    tokens = TokenStore(root)
    token, created = ensure_token(root)
    if created:
        print(f"autovibe: operator token created in {root.operator_token} (mode 0600)", flush=True)
    tokens.adopt(token, OPERATOR_TOKEN_ID, TokenScope.admin)
    return Guard(tokens, limiter, root)
