"""`plugmoe import-lora`: a PEFT LoRA adapter directory in, a routed LoRA expert file out (only its gate trained).

Conversion: moe.adapters.peft.convert_adapter (the adapter's LoRA pairs on the MLP projections, scaling,
rank_pattern / alpha_pattern, rsLoRA; refusals naming what the LoRA kind does not serve; --mlp-only drops the
rest). The server's POST /v1/load_lora_adapter runs the same conversion and serves the expert gateless.

Then stage 2 of training (experts.train.train_gate: keys, thresholds under the false-positive cap, loss-free
offsets) on example text of the adapter's domain, with the adapter frozen, and the usual routing check.
Reads JSON and safetensors only: PEFT itself is not needed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from experts.config import TrainConfig
from experts.data import Example
from experts.train import (
    domain_sample_texts,
    example_prompts,
    gate_evals,
    heldout_loss,
    reference_set,
    repair_beside,
    routing_check,
    texts_of,
    train_gate,
)
from moe.adapters.expert import Expert
from moe.adapters.peft import (  # noqa: F401  (re-exported: the command and its tests use them from here)
    AdapterMismatchError,
    ImportReport,
    LoraImportError,
    NonMlpTargetsError,
    UnsupportedAdapterError,
    convert_adapter,
    read_adapter,
)
from moe.model.routed import RoutedModel
from moe.model.text_batches import batches
from moe.routing.router import RoutingSpec

logger = logging.getLogger(__name__)

# --- the whole import: convert, gate, check ------------------------------------------------------------


def import_lora(
    model: RoutedModel,
    tokenizer,
    expert: Expert,
    config: TrainConfig,
    domain: Sequence[Example],
    heldout: Sequence[Example],
    calibration: Sequence[Example],
    calibration_heldout: Sequence[Example] = (),
    negatives: Sequence[Example] = (),
    others: Sequence[Expert] = (),
    other_examples: Sequence[Example] = (),
    description: str = "",
    examples: Sequence[str] = (),
    provenance: dict | None = None,
    sample: Sequence[Example] = (),
    repair_calibration: Sequence[str] = (),
) -> Expert:
    """Stage 2 (the gate) on a converted LoRA expert, the repair beside `others` (as train-expert's), the
    routing check and the held-out loss with the expert pinned against the backbone alone; returns it on CPU in
    float32 with its evals and its domain sample (drawn from `sample`, default heldout) in the metadata."""
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    expert = expert.to(model.device, model.dtype)
    others = tuple(o.to(model.device, model.dtype) for o in others)
    gate = train_gate(model, tokenizer, expert, domain, calibration, config, negatives, others, other_examples)
    own_sample = domain_sample_texts(sample or heldout, config.sample_size, config.seed)
    expert.metadata = {**expert.metadata, "domain_sample": own_sample}
    admission = None
    if others:
        admission = repair_beside(model, tokenizer, expert, others, repair_calibration or texts_of(calibration), config)
    routing = routing_check(model, tokenizer, expert, heldout, calibration_heldout or calibration, others)
    held = [
        b.to(model.device) for b in batches(tokenizer, list(heldout[: config.eval_examples]), 32, config.max_tokens)
    ]
    plugged = reference_set(model, (expert,))
    losses = {
        "heldout_loss_off": heldout_loss(model, plugged, RoutingSpec("off"), held),
        "heldout_loss_pinned": heldout_loss(model, plugged, RoutingSpec("pin", expert.name), held),
    }
    logger.info("routing check: %s; held-out loss %s", routing, losses)
    expert.description = description
    expert.examples = example_prompts(examples, heldout)
    expert.metadata = {
        "domain_sample": own_sample,
        "provenance": {**expert.metadata.get("provenance", {}), **(provenance or {})},
        "evals": {
            "import": losses,
            "gate": gate_evals(gate, config),
            "admission": admission,
            "routing": routing,
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    return expert.to("cpu", torch.float32)
