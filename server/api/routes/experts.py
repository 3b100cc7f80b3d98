"""The plugged experts: list, describe (`routes: false` for a pin-only one), plug (upload or source), give one a
domain sample, unplug."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from starlette.datastructures import UploadFile

from moe.adapters.expert import NAME_PATTERN
from server.api.deps import ExpertsDep
from server.errors import BadRequestError
from server.expert_store import GarbageReport, StoreCorruptError, StoreUnavailableError
from server.schemas import DomainSample, ExpertInfo, PlugFromSource, PlugResponse, UnplugResponse, error_responses
from server.served_experts import VERSION_HEADER, ServedExperts

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/experts", tags=["experts"])

_TRUE, _FALSE = ("true",), ("", "false")
_FORM_FIELDS = ("file", "name", "replace")

# The plug body is read by hand (multipart or JSON), so it is described here for the OpenAPI schema.
PLUG_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "the .safetensors file"},
                        "name": {
                            "type": "string",
                            "pattern": f"^{NAME_PATTERN.pattern}$",
                            "description": "plug under this name (default: the name in the file)",
                        },
                        "replace": {"type": "string", "enum": ["true", "false"], "default": "false"},
                    },
                }
            },
            "application/json": {"schema": PlugFromSource.model_json_schema()},
        },
    }
}


@router.get("", response_model=list[ExpertInfo], responses=error_responses(503))
async def list_experts(experts: ExpertsDep) -> list[dict]:
    slot = _slot_bytes(experts)
    return [{**info, "memory_bytes": slot} for info in experts.describe_all()]


@router.get("/{name}", response_model=ExpertInfo, responses=error_responses(404, 503))
async def get_expert(name: str, experts: ExpertsDep) -> dict:
    return {**experts.describe(name), "memory_bytes": _slot_bytes(experts)}


def _slot_bytes(experts: ServedExperts) -> int:
    """Bytes one plugged expert takes in the slot storage: every slot is padded to the largest rank plugged, so
    each takes the same share of the storage (gates and every kind's weights)."""
    slots = experts.model.slots
    return slots.nbytes() // max(1, slots.capacity)


async def answer(experts: ServedExperts, version: int, response: Response, body: dict) -> dict:
    """The response of a plug or unplug that committed `version`: its version header, and in a cluster, once
    every live replica serves it, the replicas (201/200); after the wait, a 202 with a status URL."""
    response.headers[VERSION_HEADER] = str(version)
    convergence = await experts.wait_until_served(version)
    if convergence is None:
        return body
    if not convergence.converged:
        response.status_code = status.HTTP_202_ACCEPTED
        body["status"] = f"/cluster/versions/{version}"
    return {**body, "version": version, "converged": convergence.converged, "replicas": convergence.replicas}


@router.post(
    "",
    response_model=PlugResponse,
    response_model_exclude_unset=True,
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(400, 409, 422, 503, 507),
    openapi_extra=PLUG_BODY,
)
async def plug_expert(request: Request, response: Response, experts: ExpertsDep) -> dict:
    """multipart/form-data: `file` (the .safetensors), optional `name` and `replace`;
    or JSON {"source": path | file:// | http(s)://, "name", "replace"} (sources must be allowed: see
    --source-roots and --source-hosts).

    The `X-Plugmoe-Expert-Set-Version` header is the expert-set version that plugged it. In a cluster the
    answer comes once every live replica serves that version (201), or after the wait with a 202 and a
    status URL (`/cluster/versions/{version}`)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=8) as form:
            unknown = sorted(set(form.keys()) - set(_FORM_FIELDS))
            if unknown:
                raise BadRequestError(
                    f"unknown multipart fields {unknown}; send {list(_FORM_FIELDS)}", param=unknown[0]
                )
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise BadRequestError("multipart upload needs a file in the field `file`", param="file")
            name = _form_text(form.get("name"), "name")
            replace = _form_bool(form.get("replace"), "replace")
            data = await upload.read()  # at most --max-upload-bytes: the request guard counted it
        result = await experts.plug_bytes(data, name or None, replace)
    elif content_type.startswith("application/json"):
        try:
            body = PlugFromSource.model_validate_json(await request.body())
        except ValueError as e:
            raise BadRequestError(f"the JSON body must be {{'source', 'name', 'replace'}}: {e}") from e
        result = await experts.plug_source(body.source, body.name, body.replace)
    else:
        raise BadRequestError("send multipart/form-data with a `file`, or JSON with a `source`")
    body = {**experts.describe(result.expert.name), "replaced": result.replaced, "admission": result.admission}
    answered = await answer(experts, result.version, response, body)
    if result.replaced:
        await _collect_after_change(request, experts)
    return answered


@router.put(
    "/{name}/domain-sample",
    response_model=PlugResponse,
    response_model_exclude_unset=True,
    responses=error_responses(400, 404, 409, 422, 503, 507),
)
async def set_domain_sample(name: str, body: DomainSample, response: Response, experts: ExpertsDep) -> dict:
    """Store a sample of the expert's own domain in its file (what `plugmoe add-sample` does offline) and plug
    it again: admission measures its domain on it, and a router fitted from domain samples can route to it.
    No gate is trained: a pin-only expert stays pin-only (`routes: false`) until then."""
    result = await experts.set_domain_sample(name, body.texts)
    answer_body = {**experts.describe(name), "replaced": True, "admission": result.admission}
    return await answer(experts, result.version, response, answer_body)


@router.delete(
    "/{name}",
    response_model=UnplugResponse,
    response_model_exclude_unset=True,
    responses=error_responses(400, 404, 503, 507),
)
async def unplug_expert(
    name: str,
    request: Request,
    response: Response,
    experts: ExpertsDep,
    purge: Annotated[
        bool,
        Query(description="also delete the file; of an expert unplugged earlier: delete its files (`unplugged` false)"),
    ] = False,
) -> dict:
    result = await experts.unplug(name, purge)
    body = {"name": name, "unplugged": result.unplugged, "purged": result.purged}
    answered = await answer(experts, result.version, response, body)
    if result.unplugged:
        await _collect_after_change(request, experts)
    return answered


@router.post("/gc", response_model=GarbageReport, responses=error_responses(400, 503))
async def collect_garbage(
    request: Request,
    experts: ExpertsDep,
    keep_versions: Annotated[
        int | None,
        Query(
            ge=1,
            le=1_000_000,
            description="keep the files of the newest K versions (default: --store-gc-keep-versions; unset, 1: "
            "the served version's files, and those younger than the grace period)",
        ),
    ] = None,
    grace_s: Annotated[
        float | None,
        Query(
            ge=0, le=86_400 * 30, description="keep files written or reused this recently (default: --store-gc-grace-s)"
        ),
    ] = None,
) -> GarbageReport:
    """Delete the stored expert files that none of the newest `keep_versions` expert-set versions names
    (safe beside other servers and replicas plugging into the same store: see server.expert_store)."""
    settings = request.app.state.settings
    keep = keep_versions or settings.store_gc_keep_versions or 1
    return await experts.collect_garbage(keep, settings.store_gc_grace_s if grace_s is None else grace_s)


async def _collect_after_change(request: Request, experts: ServedExperts) -> None:
    """With --store-gc-keep-versions, collect the store's garbage after a replace or unplug this server
    committed. The change stands whatever happens here: a failure is logged, and the next change retries."""
    settings = request.app.state.settings
    if settings.store_gc_keep_versions is None:
        return
    try:
        await experts.collect_garbage(settings.store_gc_keep_versions, settings.store_gc_grace_s)
    except (StoreUnavailableError, StoreCorruptError, OSError) as e:
        experts.metrics.expert_store_errors.inc()
        logger.error("garbage collection of the expert store after a change failed: %s", e)


def _form_text(value: object, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise BadRequestError(f"multipart field `{field}` must be text, not a file", param=field)


def _form_bool(value: object, field: str) -> bool:
    text = (_form_text(value, field) or "").strip()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BadRequestError(f"multipart field `{field}` must be true or false, got {text[:20]!r}", param=field)
