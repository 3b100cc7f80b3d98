"""The plugged experts: list, describe, plug (upload or source), unplug."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status

from server.api.deps import ExpertsDep
from server.auth import Admin
from server.errors import BadRequestError
from server.schemas import ExpertInfo, PlugFromSource, PlugResponse, UnplugResponse

router = APIRouter(prefix="/experts", tags=["experts"])


@router.get("", response_model=list[ExpertInfo])
async def list_experts(experts: ExpertsDep) -> list[dict]:
    return experts.describe_all()


@router.get("/{name}", response_model=ExpertInfo)
async def get_expert(name: str, experts: ExpertsDep) -> dict:
    return experts.describe(name)


@router.post("", response_model=PlugResponse, status_code=status.HTTP_201_CREATED, dependencies=[Admin])
async def plug_expert(request: Request, experts: ExpertsDep) -> dict:
    """multipart/form-data: `file` (the .safetensors), optional `name` and `replace`;
    or JSON {"source": path | file:// | http(s)://, "name", "replace"}."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise BadRequestError("multipart upload needs a file in the field `file`")
        name = form.get("name")
        replace = str(form.get("replace", "false")).lower() in ("1", "true", "yes", "on")
        data = await upload.read()
        expert, report, replaced = await experts.plug_bytes(data, str(name) if name else None, replace)
    elif content_type.startswith("application/json"):
        try:
            body = PlugFromSource.model_validate_json(await request.body())
        except ValueError as e:
            raise BadRequestError(f"the JSON body must be {{'source', 'name', 'replace'}}: {e}") from e
        expert, report, replaced = await experts.plug_source(body.source, body.name, body.replace)
    else:
        raise BadRequestError("send multipart/form-data with a `file`, or JSON with a `source`")
    return {**experts.describe(expert.name), "replaced": replaced, "admission": report}


@router.delete("/{name}", response_model=UnplugResponse, dependencies=[Admin])
async def unplug_expert(
    name: str, experts: ExpertsDep, purge: Annotated[bool, Query(description="also delete the file")] = False
) -> dict:
    purged = await experts.unplug(name, purge)
    return {"name": name, "unplugged": True, "purged": purged}
