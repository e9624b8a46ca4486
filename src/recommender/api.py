"""The HTTP API: routes, parameter handling and error responses. Nothing else knows HTTP."""

import contextlib
import json
from collections.abc import AsyncIterator

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from recommender.contract import (
    MAX_USER_ID_LENGTH,
    PARAMETERS,
    Limits,
    ParameterError,
    check_user_id,
    is_given,
    parse_query,
    render,
)
from recommender.features import StoredFeaturesInvalid, StoreUnavailable
from recommender.observability import METRICS_CONTENT_TYPE, ObserveRequests
from recommender.service import Recommender, UnknownUser

MAX_BODY_BYTES = 16_384
# Far above any valid request (a user id of at most 256 characters, each at most 12 bytes when
# percent-encoded; five short numbers), so only an abusive or broken client meets them; its
# request is refused before routing.
MAX_PATH_BYTES = 4096
MAX_QUERY_BYTES = 2048
# Every response names the model and the data it was computed from.
MODEL_HEADER = "X-Model-SHA256"
DATA_HEADER = "X-Data-SHA256"

_RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["restaurants"],
    "properties": {
        "restaurants": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "difference", "displacement"],
                "properties": {
                    "id": {"type": "string"},
                    "difference": {"type": "number", "minimum": 0},
                    "displacement": {"type": "integer", "minimum": 0},
                },
            },
        }
    },
}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["detail"],
    "properties": {"detail": {"type": "string"}, "parameter": {"type": "string"}},
}
_RESPONSES = {
    200: {
        "description": "Restaurants within max_dis, best first (possibly none).",
        "content": {"application/json": {"schema": _RESPONSE_SCHEMA}},
    },
    404: {
        "description": "Unknown user.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["detail"],
                    "properties": {"detail": {"type": "string"}, "user_id": {"type": "string"}},
                }
            }
        },
    },
    414: {
        "description": "The path or the query string is too long.",
        "content": {"application/json": {"schema": _ERROR_SCHEMA}},
    },
    422: {
        "description": "A parameter with a value that is not allowed.",
        "content": {"application/json": {"schema": _ERROR_SCHEMA}},
    },
    503: {
        "description": "The store is unavailable; retry later.",
        "content": {"application/json": {"schema": _ERROR_SCHEMA}},
    },
}


_READINESS_UNAVAILABLE = {
    "description": "Not ready: the store is unavailable.",
    "content": {"application/json": {"schema": {"type": "object", "required": ["status"]}}},
}


def _body_doc(limits: Limits) -> dict:
    """The POST body for the OpenAPI document; null, like an absent key, means "not given"."""

    def optional(schema: dict) -> dict:
        return {**schema, "type": [schema["type"], "null"]}

    properties = {
        "latitude": {"type": "number", "minimum": -90, "maximum": 90},
        "longitude": {"type": "number", "minimum": -180, "maximum": 180},
        "size": {"type": "integer", "minimum": 1, "maximum": limits.max_size},
        "max_dis": {"type": "number", "exclusiveMinimum": 0},
        "sort_dis": {"type": "integer", "enum": [0, 1, None]},
    }
    schema = {"type": "object", "properties": {k: optional(v) for k, v in properties.items()}}
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": schema}}}}


def _parameter(name: str, location: str, description: str, schema: dict, required: bool) -> dict:
    parameter = {
        "name": name,
        "in": location,
        "required": required,
        "description": description,
        "schema": schema,
    }
    if location == "query" and not required:
        # An empty value means "not given", as an absent one does.
        parameter["allowEmptyValue"] = True
    return parameter


def _parameters_doc(coordinates_required: bool, limits: Limits) -> dict:
    """The route's parameters for the OpenAPI document.

    They are read from the request and validated by contract.py (which also takes forms the
    schema does not list: ``50.0`` for a size, empty or ``nan`` for "not given").
    """
    number = {"type": "number"}
    return {
        "parameters": [
            _parameter(
                "user_id",
                "path",
                f"The user's id, at most {MAX_USER_ID_LENGTH} characters.",
                {"type": "string", "maxLength": MAX_USER_ID_LENGTH},
                True,
            ),
            _parameter(
                "latitude",
                "query",
                "WGS-84 degrees.",
                {**number, "minimum": -90, "maximum": 90},
                coordinates_required,
            ),
            _parameter(
                "longitude",
                "query",
                "WGS-84 degrees.",
                {**number, "minimum": -180, "maximum": 180},
                coordinates_required,
            ),
            _parameter(
                "size",
                "query",
                f"Restaurants to return at most (default {limits.default_size}).",
                {"type": "integer", "minimum": 1, "maximum": limits.max_size},
                False,
            ),
            _parameter(
                "max_dis",
                "query",
                f"Search radius in metres (default {limits.default_max_dis:g}).",
                {**number, "exclusiveMinimum": 0},
                False,
            ),
            _parameter(
                "sort_dis",
                "query",
                "1: order by displacement; 0: by difference (default).",
                {"type": "integer", "enum": [0, 1]},
                False,
            ),
        ]
    }


def create_app(recommender: Recommender) -> FastAPI:
    """The FastAPI application answering from ``recommender``.

    The endpoints are module-level functions that find the recommender in ``app.state``:
    FastAPI caches facts about endpoint functions for the life of the process, and a closure
    over the recommender would keep every data set ever loaded (one per reload) alive.
    """
    report = recommender.report
    limits = recommender.limits
    app = FastAPI(
        lifespan=_lifespan,
        # An id ending in "/" is another id, never a redirect to a different user.
        redirect_slashes=False,
        title="Restaurant recommendations",
        description="Restaurants near a point, ranked by a pre-trained model's difference "
        "between the user's features and each restaurant's embedding.",
        version="1",
    )
    app.state.recommender = recommender
    app.add_api_route(
        "/recommend/{user_id}",
        _recommend,
        methods=["GET"],
        name="recommend",
        responses=_RESPONSES,
        openapi_extra=_parameters_doc(True, limits),
    )
    app.add_api_route(
        "/recommend/{user_id}",
        _recommend_post,
        methods=["POST"],
        name="recommend_post",
        responses=_RESPONSES,
        openapi_extra={**_parameters_doc(False, limits), **_body_doc(limits)},
    )
    app.add_api_route(
        "/healthz", _healthz, methods=["GET"], name="healthz", responses={414: _RESPONSES[414]}
    )
    app.add_api_route(
        "/readyz",
        _readyz,
        methods=["GET"],
        name="readyz",
        responses={414: _RESPONSES[414], 503: _READINESS_UNAVAILABLE},
    )
    # Probes that ask with HEAD get the same status, without a body.
    app.add_api_route("/healthz", _healthz, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/readyz", _readyz, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/metrics", _metrics, methods=["GET"], include_in_schema=False)

    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ParameterError, _parameter_error)
    app.add_exception_handler(StoredFeaturesInvalid, _stored_features_invalid)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)

    app.add_middleware(RefuseOversized)
    # Outermost, so that refused requests are counted and logged too.
    app.add_middleware(
        ObserveRequests,
        metrics=recommender.metrics,
        headers={MODEL_HEADER: report.model_sha256, DATA_HEADER: report.data_sha256},
    )
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    recommender: Recommender = app.state.recommender
    report = recommender.report
    # Connections belong to the worker process, so they are opened after the fork.
    await recommender.store.open()
    recommender.metrics.version.labels(report.model_sha256, report.data_sha256).set(1)
    try:
        yield
    finally:
        await recommender.store.close()


async def _recommend(request: Request) -> Response:
    """Recommend restaurants for a user standing at (latitude, longitude)."""
    user_id = request.path_params["user_id"]
    return await _answer(request.app.state.recommender, user_id, _query_parameters(request))


async def _recommend_post(request: Request) -> Response:
    """As GET, taking parameters from the query string or a JSON object body.

    Each parameter may come from either place but not from both; latitude and longitude are
    required from one of them.
    """
    user_id = request.path_params["user_id"]
    body = await _body_parameters(request)
    query = _query_parameters(request)
    for name in PARAMETERS:
        if name in body and name in query and is_given(body[name]) and is_given(query[name]):
            raise ParameterError(name, f"{name} is given in both the query and the body")
    given_in_body = {name: value for name, value in body.items() if is_given(value)}
    return await _answer(request.app.state.recommender, user_id, {**query, **given_in_body})


async def _healthz() -> dict:
    """The process is alive."""
    return {"status": "ok"}


async def _readyz(request: Request) -> JSONResponse:
    """Ready to answer: data loaded and the store reachable; a failed cache only degrades."""
    recommender: Recommender = request.app.state.recommender
    parts = await recommender.store.status()
    if parts["store"] != "ok":
        state, code = "unavailable", 503
    elif any(value != "ok" for value in parts.values()):
        state, code = "degraded", 200
    else:
        state, code = "ready", 200
    body = {
        "status": state,
        **parts,
        "restaurants": len(recommender.catalog),
        "users": recommender.store.n_users,
    }
    return JSONResponse(body, status_code=code)


def _metrics(request: Request) -> Response:
    """Prometheus metrics of every worker.

    A plain function, so FastAPI runs it in a thread: reading every process's metric files
    must not hold up the requests on this worker's event loop.
    """
    exposition = request.app.state.recommender.metrics.exposition()
    return Response(exposition, media_type=METRICS_CONTENT_TYPE)


async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
    headers = dict(error.headers or {})
    if error.status_code == 405:
        # Starlette names only the methods of the first route matching the path.
        headers["Allow"] = ", ".join(_allowed_methods(request.app, request.scope))
    return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=headers)


async def _parameter_error(request: Request, error: ParameterError) -> JSONResponse:
    return JSONResponse({"detail": error.message, "parameter": error.parameter}, status_code=422)


async def _stored_features_invalid(request: Request, error: StoredFeaturesInvalid) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=500)


async def _store_unavailable(request: Request, error: StoreUnavailable) -> JSONResponse:
    return JSONResponse(
        {"detail": f"the feature store is unavailable: {error}"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    methods = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


class RefuseOversized:
    """ASGI middleware: an oversized path or query string gets 414 before it is routed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope.get("raw_path") or scope["path"].encode()
            for part, size, limit in (
                ("path", len(path), MAX_PATH_BYTES),
                ("query", len(scope["query_string"]), MAX_QUERY_BYTES),
            ):
                if size > limit:
                    detail = f"the {part} is {size} bytes long; at most {limit} are accepted"
                    refusal = JSONResponse({"detail": detail, "parameter": part}, status_code=414)
                    await refusal(scope, receive, send)
                    return
        await self.app(scope, receive, send)


async def _answer(recommender: Recommender, user_id: str, raw: dict) -> Response:
    check_user_id(user_id)
    query = parse_query(raw, recommender.limits)
    try:
        ranking = await recommender.recommend(user_id, query)
    except UnknownUser:
        body = orjson.dumps({"detail": "unknown user", "user_id": user_id})
        return Response(body, status_code=404, media_type="application/json")
    return Response(render(ranking), media_type="application/json")


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ParameterError("body", f"{repeated[0]} is given more than once")
    return dict(pairs)


def _query_parameters(request: Request) -> dict[str, str]:
    parameters = {}
    for name, value in request.query_params.multi_items():
        if name not in PARAMETERS:
            continue
        if name in parameters:
            raise ParameterError(name, f"{name} is given more than once")
        parameters[name] = value
    return parameters


async def _body_parameters(request: Request) -> dict[str, object]:
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ParameterError("body", f"the body must be at most {MAX_BODY_BYTES} bytes")
    except ClientDisconnect:
        raise ParameterError("body", "the client went away before sending the whole body") from None
    if not body.strip():
        return {}
    try:
        # The standard parser, unlike orjson, accepts the NaN that many clients send.
        parsed = json.loads(body, object_pairs_hook=_refuse_repeated_keys)
    except (ValueError, RecursionError) as error:
        reason = str(error) if isinstance(error, ParameterError) else "not valid JSON"
        raise ParameterError("body", f"the body must be a JSON object: {reason}") from None
    if not isinstance(parsed, dict):
        raise ParameterError("body", "the body must be a JSON object")
    return {name: parsed[name] for name in PARAMETERS if name in parsed}
