"""vLLM's runtime LoRA adapter API: POST /v1/load_lora_adapter and POST /v1/unload_lora_adapter.

A vLLM user's calls work unchanged: the same bodies, a plain-text success message with 200, and vLLM's
statuses and error types (vllm/entrypoints/openai/serving_models.py):

    load    lora_name or lora_path missing          400 InvalidUserInput
            the name is taken and load_inplace unset 400 InvalidUserInput
            no adapter at the path                   404 NotFoundError ("No adapter found for ...")
            an adapter that cannot be served         400 BadRequestError (the message names what is refused)
    unload  lora_name missing                        400 InvalidUserInput
            no adapter of that name                  404 NotFoundError

What differs: loading is a plug (server.served_experts: validation, the finite probe, the expert store, the
swap between two steps; in a cluster every replica follows), so it needs the admin rights of POST /experts
and reads only PEFT directories under --source-roots (or on --source-hosts). The adapter becomes a pin-only
LoRA expert (moe.adapters.peft: attention and MLP targets, no training), served when named as `model`; any plugged
expert can be unloaded by name. Names are expert names (lowercase letters, digits, '_' and '-').
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from moe import (
    ExpertFileError,
    ExpertNameTakenError,
    IncompatibleExpertError,
    InvalidExpertNameError,
    UnknownExpertError,
)
from moe.adapters.expert import check_name
from moe.adapters.peft import LoraImportError, read_adapter
from moe.errors import NonFiniteOutputError
from server.api.deps import ExpertsDep, SettingsDep
from server.errors import BadRequestError, ExpertSourceError, NotFoundError
from server.schemas import LoadLoraAdapterRequest, UnloadLoraAdapterRequest, error_responses
from server.served_experts import ServedExperts

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["lora adapters"])
_NO_FILE = "there is no file at"  # server.expert_sources' message for an allowed path with nothing there


class InvalidUserInput(BadRequestError):
    """vLLM's error type for a malformed adapter request (400)."""


def loaded_message(name: str) -> str:
    return f"Success: LoRA adapter '{name}' added successfully."


def unloaded_message(name: str) -> str:
    return f"Success: LoRA adapter '{name}' removed successfully."


# vLLM answers success as plain text and errors as its JSON error object: the OpenAPI schema says both
_SUCCESS = {"description": "vLLM's success message", "content": {"text/plain": {"schema": {"type": "string"}}}}


@router.post(
    "/load_lora_adapter",
    responses={200: _SUCCESS, **error_responses(400, 404, 413, 503, 507)},
)
async def load_lora_adapter(
    body: LoadLoraAdapterRequest, experts: ExpertsDep, settings: SettingsDep
) -> PlainTextResponse:
    """Load a PEFT LoRA adapter directory as a pin-only expert named `lora_name` (use it as `model`)."""
    name, path = body.lora_name, body.lora_path
    if not name or not path:
        raise InvalidUserInput("Both 'lora_name' and 'lora_path' must be provided.")
    await load_adapter(experts, name, path, body.load_inplace, trusted=False, served_model=settings.model)
    return PlainTextResponse(loaded_message(name))


@router.post(
    "/unload_lora_adapter",
    responses={200: _SUCCESS, **error_responses(400, 404, 503, 507)},
)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, experts: ExpertsDep) -> PlainTextResponse:
    """Unplug the adapter (any plugged expert) named `lora_name`, and delete its stored file."""
    name = body.lora_name
    if not name:
        raise InvalidUserInput("'lora_name' needs to be provided to unload a LoRA adapter.")
    try:
        await experts.unplug(name, purge=True)
    except UnknownExpertError:
        raise NotFoundError(f"The lora adapter '{name}' cannot be found.") from None
    return PlainTextResponse(unloaded_message(name))


async def load_adapter(
    experts: ServedExperts, name: str, path: str, replace: bool, trusted: bool, served_model: str | None
) -> None:
    """Convert and plug; every refusal as vLLM answers it. `trusted`: the path is the operator's
    (--lora-modules at start), read directly; otherwise through the source allow-lists. `served_model`: the
    backbone's path or id, which the adapter's base_model_name_or_path is compared with (a warning)."""
    try:
        check_name(name)
    except InvalidExpertNameError as e:
        raise InvalidUserInput(f"lora_name: {e}", param="lora_name") from None
    if not replace and name in experts.model.plugged.names:
        raise InvalidUserInput(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
    try:
        if trusted:
            config, tensors = await asyncio.to_thread(read_adapter, path)
        else:
            config, tensors = await experts.fetch_peft(path)
        result = await experts.plug_peft(config, tensors, name, path, replace, served_model)
    except ExpertSourceError as e:
        if str(e).startswith(_NO_FILE):
            raise NotFoundError(f"No adapter found for {path!r}: {e}") from None
        raise BadRequestError(f"Loading lora {name} failed: {e}", param="lora_path") from None
    except ExpertNameTakenError:  # another writer took the name since the check above
        raise InvalidUserInput(f"The lora adapter '{name}' has already been loaded.", param="lora_name") from None
    except (LoraImportError, ExpertFileError, IncompatibleExpertError, NonFiniteOutputError) as e:
        raise BadRequestError(f"Loading lora {name} failed: {e}", param="lora_path") from None
    logger.info("loaded LoRA adapter %r from %s (expert-set version %d)", name, path, result.version)


async def seed_lora_modules(experts: ServedExperts, modules: list[tuple[str, str]], served_model: str) -> None:
    """--lora-modules at start: each adapter plugged (replacing one of the same name that came from another
    path). One that cannot be served stops the start, as in vLLM: the operator asked for it by name."""
    for name, path in modules:
        if name in experts.model.plugged.names:
            provenance = experts.model.plugged.get(name).metadata.get("provenance") or {}
            if provenance.get("adapter_dir") == path:
                logger.info("LoRA adapter %r from %s is already plugged (the expert store kept it)", name, path)
                continue
        try:
            await load_adapter(experts, name, path, replace=True, trusted=True, served_model=served_model)
        except (BadRequestError, NotFoundError) as e:
            raise RuntimeError(f"--lora-modules {name}={path}: {e}") from e
