"""The plugged experts: list, describe, plug (upload or source), unplug."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from server.api.deps import ExpertsDep
from server.auth import Admin
from server.errors import BadRequestError
from server.schemas import ExpertInfo, PlugFromSource, PlugResponse, UnplugResponse
from server.served_experts import VERSION_HEADER, ServedExperts

router = APIRouter(prefix="/experts", tags=["experts"])


@router.get("", response_model=list[ExpertInfo])
async def list_experts(experts: ExpertsDep) -> list[dict]:
    return experts.describe_all()


@router.get("/{name}", response_model=ExpertInfo)
async def get_expert(name: str, experts: ExpertsDep) -> dict:
    return experts.describe(name)


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
    dependencies=[Admin],
)
async def plug_expert(request: Request, response: Response, experts: ExpertsDep) -> dict:
    """multipart/form-data: `file` (the .safetensors), optional `name` and `replace`;
    or JSON {"source": path | file:// | http(s)://, "name", "replace"}.

    The `X-Plugmoe-Expert-Set-Version` header is the expert-set version that plugged it. In a cluster the
    answer comes once every live replica serves that version (201), or after the wait with a 202 and a
    status URL (`/cluster/versions/{version}`)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise BadRequestError("multipart upload needs a file in the field `file`")
        name = form.get("name")
        replace = str(form.get("replace", "false")).lower() in ("1", "true", "yes", "on")
        data = await upload.read()
        result = await experts.plug_bytes(data, str(name) if name else None, replace)
    elif content_type.startswith("application/json"):
        try:
            body = PlugFromSource.model_validate_json(await request.body())
        except ValueError as e:
            raise BadRequestError(f"the JSON body must be {{'source', 'name', 'replace'}}: {e}") from e
        result = await experts.plug_source(body.source, body.name, body.replace)
    else:
        raise BadRequestError("send multipart/form-data with a `file`, or JSON with a `source`")
    body = {**experts.describe(result.expert.name), "replaced": result.replaced, "admission": result.admission}
    return await answer(experts, result.version, response, body)


@router.delete("/{name}", response_model=UnplugResponse, response_model_exclude_unset=True, dependencies=[Admin])
async def unplug_expert(
    name: str,
    response: Response,
    experts: ExpertsDep,
    purge: Annotated[bool, Query(description="also delete the file")] = False,
) -> dict:
    result = await experts.unplug(name, purge)
    return await answer(experts, result.version, response, {"name": name, "unplugged": True, "purged": result.purged})
