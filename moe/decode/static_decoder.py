"""The fixed-slot decoder: rows join and leave at any step (continuous batching), one token per live row a step.

    StaticDecoder(model, max_batch, max_len)   fixed slots; every input of a decode step in persistent buffers
        .join(prefill, row) -> slot            copy a prefilled row (moe.decode.prefill) into a free slot
        .leave(slot)                           free it
        .step(slots, tokens, specs)            one token for every live row -> StepOutput
    decode_one_token(decoder, ...)             one step (what moe.decode.scheduler calls)

The decoder's buffers (B = slots, S = columns allocated, L layers):

    keys[l], values[l]  [B, kv_heads, S, D]   KV slots (moe.model.kv_cache.SlotLayer writes them in the step)
    input_ids           [B, 1] long           each row's newest token, the step's input
    pos                 [B] long              the column (and position) that token takes
    active              [B] long              1 for a live row; a free slot keeps pos 0 and attends column 0
    bias                [B, 1, 1, S]          additive attention mask: 0 where a row may attend, min elsewhere
    allowed [B, C] bool, forced [B] long, apply [B] bool   each row's routing (moe.routing.router.StepRouting)
    context             [B, L, H] float32     each row's running context sums (token mode by the plugged set's
                                              context gates, moe.routing.context): from its prefill, moved on by
                                              every step; zeros while the set has none

A step of bucket (b, s) runs rows [:b] over columns [:s] (views: fixed addresses):

    bias[r, pos[r]] = 0                      the row sees its own new token
    logits = model(input_ids[:b], 4D mask bias[:b, ..., :s], position_ids = pos[:b], SlotCache(b, s))
    pos += active

It reads only those buffers: no host read, no host-to-device copy, no Python that depends on which rows
are live. So on CUDA a step can be captured once per (b, s, routing mode) as a CUDA graph and replayed; the host
picks the bucket from its own mirrors (highest live slot, longest live row). Rows join and leave between
steps by writing a few slot rows; routing rows are rewritten when a row's spec or the plugged set changes,
not per step. Sampling stays outside the step: one host read of logits (and the trace) per step.
Columns are allocated as rows need them (doubling, up to max_len); a row reaching max_len finishes. A step attends
its longest row's columns rounded up to COLUMN_GRAIN, not the whole allocation: views are cheap to make, attention
over masked columns is not (a captured step keeps the allocation's power-of-two buckets, a graph each).

Compiled (torch.compile, a CPU's stand-in for a CUDA graph), the buffers hold every column (max_len, plus one spare
never attended) from the start, and a step is traced once per routing mode with its rows b and columns s as sizes,
not constants: the per-row views (_RowViews, made once per b) and the mask view bias[:b, ..., :s] are the compiled
function's arguments, b and s marked dynamic. It splits only where the model branches on them (b = 1; rows below the
slot capacity, where bottleneck dispatch gathers), and nothing is ever reallocated under a compiled step (before,
every (b, s) bucket compiled, and each growth of the columns dropped them all: a 14.7 s stall mid-run on the
GPT-2-124M shape). The price is memory: keys and values for max_batch x max_len up front (GPT-2-124M, 16 rows x 1024
positions: 1.2 GB in float32; the demo model, 16 x 512: 64 MB), as a static KV cache holds.

Semantics: decoding row i with others equals decoding it alone (each row attends only its own columns,
positions are per row), within float tolerance; a captured step equals the eager step.

LoRA experts (moe.adapters.lora) are not run by a captured or compiled step: while one is plugged, every step runs the
same body eagerly over the current snapshot (its LoRA stacks; grouped dispatch, a host read per layer), and
captured graphs are used again once the last LoRA expert is unplugged. Bottleneck experts alone keep the
captured / fused path, and so does token mode by the context router (a set with context gates, PluggedSet.gates): its
classifiers are in the slot storage's gate columns, written in place on publish (moe.routing.context.ContextGateColumns,
fixed shapes: a plug recompiles nothing), the rows' running context sums in the `context` row buffer the step moves on
in place, and its dispatch the fixed-op one (slot_dispatch), so its step reads nothing on the host either. A compiled
step is kept per routing mode and per way token mode chooses (PluggedSet.context_form: the cosine gates, or the context
gates with or without floors), all sharing the buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.fx.experimental._config as fx_config
from transformers import DynamicCache

from moe.adapters.slots import PluggedSet
from moe.decode.prefill import Prefill, StepOutput
from moe.errors import UnsupportedBackboneError
from moe.model.kv_cache import DECODE_ATTENTION, SlotCache, SlotLayer, dynamic_layers_kv, use_decode_attention
from moe.model.routed import RoutedModel
from moe.model.trace import counts_by_route
from moe.routing.router import RoutingSpec, StepRouting

logger = logging.getLogger(__name__)

COLUMN_GRAIN = 8  # a step attends its longest row's columns rounded up to this (StaticDecoder._step_columns)

_FREE_ROW = RoutingSpec("off")  # a free slot's routing row: nothing allowed, nothing forced


class _RowViews(NamedTuple):
    """The first b rows of the decoder's per-row buffers (views: they share storage with the buffers)."""

    input_ids: torch.Tensor  # [b, 1]
    pos: torch.Tensor  # [b]
    active: torch.Tensor  # [b]
    allowed: torch.Tensor  # [b, C]
    forced: torch.Tensor  # [b]
    apply: torch.Tensor  # [b]
    context: torch.Tensor  # [b, L, H]
    index: torch.Tensor  # [b] arange
    keys: tuple[torch.Tensor, ...]  # per layer [b, kv, S, D]
    values: tuple[torch.Tensor, ...]


def context_length(model: RoutedModel) -> int:
    """Positions the backbone can attend over (its config's maximum; 2048 when the config names none)."""
    config = model.backbone.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _powers_of_two(low: int, high: int) -> tuple[int, ...]:
    """low, 2 low, 4 low, ... below high, then high itself."""
    out, n = [], low
    while n < high:
        out.append(n)
        n *= 2
    return (*out, high)


def capture_refusal(model: RoutedModel) -> str | None:
    """Why a decode step of this model cannot be captured as a CUDA graph (None: it can)."""
    if model.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if model.router.top_k != 1:
        return "top-k routing above 1 groups tokens by expert with a host read per layer"
    config = model.backbone.config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope"):
        return f"rope type {rope.get('rope_type', rope.get('type'))!r} decides on the host from the sequence length"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ("sdpa", DECODE_ATTENTION):
        return (
            f"the backbone's attention is {attention!r}, not sdpa (captured decode needs the grouped decode attention)"
        )
    return None


class StaticDecoder:
    """Fixed decode slots over a RoutedModel (see the module docstring for the buffers and the step).

    plugged: None decodes with the model's live expert slots (what the server does: plugs between steps
        apply from the next step); a PluggedSet (e.g. a training set built from experts) is used as it is.
    capture: record each (rows, columns, route) bucket's step as a CUDA graph on first use and replay it
        (CUDA only; see capture_refusal). compile_backend: torch.compile the step with this backend instead, once
        per routing mode for every bucket (see the module docstring; "inductor"; "aot_eager" traces and
        functionalises without generating code), CPU or CUDA.
    fixed_ops: run each step with no host read (what capture and compile need). Default: so when captured,
        compiled or on a GPU; an eager CPU step instead reads each layer's choices once and runs adapters for the
        routed rows only (moe.model.routed.routed_top1_host_read), where a read costs no device sync.
    """

    def __init__(
        self,
        model: RoutedModel,
        max_batch: int,
        max_len: int,
        plugged: PluggedSet | None = None,
        *,
        capture: bool = False,
        compile_backend: str | None = None,
        min_columns: int = 64,
        fixed_ops: bool | None = None,
    ) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_len = self._window_limit(model, max_len)
        self.device, self.dtype = model.device, model.dtype
        self._fixed_set = plugged
        use_decode_attention(model.backbone)
        self.capture = capture
        if capture:
            refusal = capture_refusal(model) or (plugged is not None and "a fixed set decodes eagerly") or None
            if refusal:
                raise ValueError(f"cannot capture decode steps: {refusal}")
        self.compile_backend = compile_backend
        # a captured or compiled step, or any step on a GPU (a read is a sync), runs routing with no host read;
        # an eager CPU step reads each layer's choices and runs adapters for the routed rows only
        if fixed_ops is None:
            fixed_ops = capture or compile_backend is not None or self.device.type != "cpu"
        if not fixed_ops and (capture or compile_backend is not None):
            raise ValueError("a captured or compiled decode step needs fixed_ops (no host read inside the step)")
        self._fixed_ops = fixed_ops
        self.row_buckets = _powers_of_two(1, max_batch)
        self.min_columns = min(min_columns, self.max_len)

        B, dev = max_batch, self.device
        self._caches: dict[tuple[int, int], SlotCache] = {}
        self._graphs: dict[tuple[int, int, str, tuple[bool, int] | None], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        # (routing mode, the set's context form) -> the step for every bucket: one per mode, and per way token mode
        # chooses (the cosine gates, or the context gates with or without floors: host facts of the published set)
        self._compiled: dict[tuple[str, tuple[bool, int] | None], Callable] = {}
        self._row_views: dict[int, _RowViews] = {}
        self._pool = None
        self._kv_shapes = self._probe_kv_shapes()
        self.columns = 0  # allocated
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.input_ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.active = torch.zeros(B, dtype=torch.long, device=dev)
        self.context = torch.zeros(B, model.num_layers, model.hidden_size, device=dev)
        self.min_value = torch.finfo(self.dtype).min
        self._zero = torch.zeros((), dtype=self.dtype, device=dev)  # a device value: no host copy in a step
        self._rows = torch.arange(B, device=dev)
        pin = dev.type == "cuda"
        self._ids_host = torch.zeros(B, dtype=torch.long, pin_memory=pin)
        self.bias = torch.empty(0)
        # compiled, every column up front: the buffers never move, so a compiled step is never dropped (see the
        # module docstring); eager or captured, columns double as rows need them
        self._allocate_columns(self.max_len if compile_backend else self.min_columns)

        # host mirrors: what the bucket choice and the routing rows are made from
        self.lengths = [0] * B  # 0: a free slot; else tokens cached (= pos)
        self._specs: list[RoutingSpec | None] = [None] * B
        self._routing_key: tuple[int, int] | None = None  # (plugged version, slot generation) the rows match
        self._routing_dirty = True
        self._routing = "off"  # host fact for the step: "off" (nothing can route), "token" (every live row in plain
        # token mode: no allow-list, no pin), "rows" (per-row allow-lists and pins)
        self.allowed = self.forced = self.apply = torch.empty(0)
        self._generation = -1

    @staticmethod
    def _window_limit(model: RoutedModel, max_len: int) -> int:
        """Sliding-window attention keeps only the window in its cache: decode at most that far."""
        config = model.backbone.config
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        used = any("sliding" in t for t in types) if types else getattr(config, "use_sliding_window", True)
        if isinstance(window, int) and window > 0 and used:
            return min(max_len, window)
        return max_len

    def _probe_kv_shapes(self) -> list[tuple[int, int, int, torch.dtype]]:
        """(kv_heads, key dim, value dim, dtype) per layer, from a one-token forward of the plain backbone."""
        probe = DynamicCache()
        with torch.inference_mode():
            self.model.backbone(
                input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device),
                attention_mask=torch.ones(1, 1, dtype=torch.long, device=self.device),
                use_cache=True,
                **{self.model.cache_kwarg: probe},
            )
        return [(k.shape[1], k.shape[3], v.shape[3], k.dtype) for k, v in dynamic_layers_kv(probe)]

    # --- buffers ----------------------------------------------------------------------------------------------

    def _allocate_columns(self, columns: int) -> None:
        """(Re)allocate the KV slots and the mask at `columns` columns, keeping what is there.

        Compiled, one spare column more, never attended: a bucket's views (keys[:b, :, :s], bias[:b, ..., :s]) are then
        never contiguous, not even at s = columns, so a compiled step holds no guard on whether they are (it
        recompiled when the rows first reached the last bucket)."""
        old, B, dev = self.columns, self.max_batch, self.device
        held = columns + 1 if self.compile_backend else columns
        keys = [torch.zeros(B, h, held, dk, dtype=dt, device=dev) for h, dk, _, dt in self._kv_shapes]
        values = [torch.zeros(B, h, held, dv, dtype=dt, device=dev) for h, _, dv, dt in self._kv_shapes]
        bias = torch.full((B, 1, 1, held), self.min_value, dtype=self.dtype, device=dev)
        if old:
            for new, current in zip(keys + values, self.keys + self.values, strict=True):
                new[:, :, :old] = current[:, :, :old]
            bias[..., :old] = self.bias[..., :old]
        else:
            bias[..., 0] = 0.0  # free slots attend column 0: no all-masked softmax row, no NaN
        self.keys, self.values, self.bias, self.columns = keys, values, bias, columns
        self._forget_steps()
        if old:
            logger.info("decoder KV slots grow from %d to %d columns", old, columns)

    def _forget_steps(self) -> None:
        """Buffers moved: drop the per-bucket caches and everything captured or compiled against them."""
        self._caches.clear()
        self._row_views.clear()
        self._graphs.clear()
        self._compiled.clear()
        self._pool = None

    def _column_bucket(self, needed: int) -> int:
        """The columns allocated for a row that needs `needed`: powers of two from min_columns (buffers double)."""
        if needed > self.max_len:
            raise ValueError(f"a row needs {needed} columns; the decoder holds at most {self.max_len}")
        return next(s for s in _powers_of_two(self.min_columns, self.max_len) if s >= needed)

    def _step_columns(self, needed: int) -> int:
        """The columns a step attends when its longest row needs `needed`: `needed` rounded up to COLUMN_GRAIN, within
        the allocation bucket. Every column past the rows' own is masked work for attention (on the demo model, 16
        rows over 128 columns cost ~10% more per forward than over 64), and a step keeps nothing per column count but
        two views: eager, or compiled (the columns are a dynamic size of the compiled step: a new count compiles
        nothing). Captured: the allocation's power-of-two bucket (a CUDA graph per bucket)."""
        bucket = self._column_bucket(needed)
        if self.capture:
            return bucket
        return min(bucket, -(-needed // COLUMN_GRAIN) * COLUMN_GRAIN)

    @property
    def plugged(self) -> PluggedSet:
        """The set a step routes over: the fixed set, or the model's plugged set as it is now."""
        return self._fixed_set if self._fixed_set is not None else self.model.plugged

    def _step_set(self, plugged: PluggedSet | None = None) -> PluggedSet:
        """The tensors a step over `plugged` (default: `plugged` now) reads: for a decoder that follows the model's
        slots, the storage itself (ExpertSlots.live: its gate columns as published, and the context router's gates
        in its gate columns when `plugged` routes by them; what captured graphs hold and compiled steps read, the
        same addresses until the storage grows); a fixed set, or while an expert whose kind has no fixed-op form
        (LoRA) is plugged, the step's snapshot as it is, run eagerly (see `_run`)."""
        if plugged is None:
            plugged = self.plugged
        if self._fixed_set is not None or plugged.eager_only:
            return plugged
        return self.model.slots.live(plugged.context_form)

    # --- rows joining and leaving (between steps) ---------------------------------------------------------

    @property
    def live(self) -> list[int]:
        return [r for r in range(self.max_batch) if self.lengths[r]]

    @property
    def free(self) -> int:
        return self.lengths.count(0)

    def join(self, pre: Prefill, row: int) -> int:
        """Copy row `row` of a prefill into the lowest free slot and arm it. Returns the slot."""
        if not self.free:
            raise RuntimeError(f"all {self.max_batch} decode slots are busy")
        slot = self.lengths.index(0)
        length = pre.length(row)
        if length + 1 > self.max_len:
            raise ValueError(f"a prompt of {length} tokens leaves no room to decode within {self.max_len} columns")
        if length + 1 > self.columns:
            self._allocate_columns(self._column_bucket(length + 1))
        with torch.no_grad():
            for (k, v), keys, values in zip(pre.row_kv(row), self.keys, self.values, strict=True):
                if k.shape[1] != length:
                    raise UnsupportedBackboneError(
                        f"the backbone cached {k.shape[1]} of a {length}-token prompt (sliding-window attention); "
                        "the fixed-slot decoder needs every position"
                    )
                keys[slot, :, :length] = k
                values[slot, :, :length] = v
            self.bias[slot].fill_(self.min_value)
            self.bias[slot, ..., :length] = 0.0
            self.pos[slot] = length
            self.active[slot] = 1
            context = pre.row_context(row)
            if context is None:
                self.context[slot].zero_()
            else:
                self.context[slot] = context
        self.lengths[slot] = length
        self._specs[slot] = pre.specs[row]
        self._routing_dirty = True
        return slot

    def leave(self, slot: int) -> None:
        """Free a slot (its columns stay as they are, masked out)."""
        if not self.lengths[slot]:
            return
        with torch.no_grad():
            self.active[slot] = 0
            self.pos[slot] = 0
            self.bias[slot].fill_(self.min_value)
            self.bias[slot, ..., 0] = 0.0
        self.lengths[slot] = 0
        self._specs[slot] = None
        self._routing_dirty = True

    def reset(self) -> None:
        for slot in self.live:
            self.leave(slot)

    # --- routing rows -----------------------------------------------------------------------------------

    def _sync_routing(self, plugged: PluggedSet) -> None:
        """Rewrite the routing rows when a spec, the plugged set or the slot storage changed (not per step)."""
        storage = plugged.storage
        generation = storage.generation if storage is not None else 0
        if generation != self._generation or self.allowed.shape[-1:] != (plugged.capacity,):
            self.allowed = torch.zeros(self.max_batch, plugged.capacity, dtype=torch.bool, device=self.device)
            self.forced = torch.full((self.max_batch,), -1, dtype=torch.long, device=self.device)
            self.apply = torch.ones(self.max_batch, dtype=torch.bool, device=self.device)
            self._generation = generation
            self._forget_steps()  # the slot tensors may have moved too
            self._routing_dirty = True
        key = (plugged.version, generation)
        if not self._routing_dirty and key == self._routing_key:
            return
        specs = [spec if spec is not None else _FREE_ROW for spec in self._specs]
        routing = StepRouting.from_specs(specs, plugged)
        with torch.no_grad():
            self.allowed.copy_(routing.allowed)
            self.forced.copy_(routing.forced)
            self.apply.copy_(routing.apply)
        live = [spec for spec in self._specs if spec is not None]
        if not routing.routes_anything:
            self._routing = "off"
        elif all(spec.mode == "token" and spec.allow is None for spec in live):
            self._routing = "token"
        else:
            self._routing = "rows"
        self._routing_key, self._routing_dirty = key, False

    # --- the step ---------------------------------------------------------------------------------------

    def _cache(self, b: int, s: int) -> SlotCache:
        cache = self._caches.get((b, s))
        if cache is None:
            cache = SlotCache(
                [SlotLayer(k[:b], v[:b], self.pos[:b], s) for k, v in zip(self.keys, self.values, strict=True)]
            )
            self._caches[(b, s)] = cache
        return cache

    def _body(self, b: int, s: int, routing_mode: str, plugged: PluggedSet) -> tuple[torch.Tensor, ...]:
        """The capturable step of bucket (b, s): reads and writes the persistent buffers only.
        Returns (logits [b, V], trace rows [b, C + 1], trace layers [L, C + 1]).

        routing_mode "token" skips the allow-list and pin ops; free rows run like live ones (their outputs are
        never read, and they count nothing: the trace weighs rows by `active`)."""
        return self._forward(self._rows_of(b), self.bias[:b, :, :, :s], self._cache(b, s), routing_mode, plugged)

    def _rows_of(self, b: int) -> _RowViews:
        """The first b rows of every per-row buffer, as views made once per b (cleared with the buffers)."""
        views = self._row_views.get(b)
        if views is None:
            views = _RowViews(
                self.input_ids[:b],
                self.pos[:b],
                self.active[:b],
                self.allowed[:b],
                self.forced[:b],
                self.apply[:b],
                self.context[:b],
                self._rows[:b],
                tuple(k[:b] for k in self.keys),
                tuple(v[:b] for v in self.values),
            )
            if self.compile_backend:  # the rows a dynamic size of the compiled step: marked once, on views kept
                for view in (*views[: _RowViews._fields.index("keys")], *views.keys, *views.values):
                    torch._dynamo.maybe_mark_dynamic(view, 0)
            self._row_views[b] = views
        return views

    def _compiled_body(self, rows: _RowViews, bias: torch.Tensor, routing_mode: str, plugged: PluggedSet) -> tuple:
        """The step compiled for every bucket (b >= 2; b = 1 is a graph of its own): the row views and the mask view
        bias [b, 1, 1, s] are its arguments with b and s dynamic sizes, and the cache is made here, in the trace,
        with s symbolic. The views are made outside it: a view made in the trace is a view of a graph input, and
        inductor wrote through it by copying those b rows of every KV buffer out and back, each step."""
        s = bias.shape[-1]
        cache = SlotCache([SlotLayer(k, v, rows.pos, s) for k, v in zip(rows.keys, rows.values, strict=True)])
        return self._forward(rows, bias, cache, routing_mode, plugged)

    def _forward(
        self, rows: _RowViews, bias: torch.Tensor, cache: SlotCache, routing_mode: str, plugged: PluggedSet
    ) -> tuple[torch.Tensor, ...]:
        pos = rows.pos
        bias[rows.index, 0, 0, pos] = self._zero  # index_put_: the row sees its own new token
        routing = StepRouting(
            rows.allowed,
            rows.forced,
            rows.apply,
            routes_anything=routing_mode != "off",
            all_token_mode=routing_mode == "token",
            applies_everywhere=True,
        )
        out = self.model(
            rows.input_ids,
            attention_mask=bias,
            routing=routing,
            plugged=plugged,
            past_key_values=cache,
            position_ids=pos[:, None],
            use_cache=True,
            logits_to_keep=1,
            token_mask=rows.active[:, None],
            fixed_ops=self._fixed_ops,
            context=rows.context,
        )
        pos.add_(rows.active)
        return out.logits[:, -1], out.trace.rows, out.trace.layers

    def bucket(self) -> tuple[int, int]:
        """(rows, columns) the next step runs: the highest live slot and the longest live row, rounded up."""
        live = self.live
        b = next(n for n in self.row_buckets if n >= (live[-1] + 1 if live else 1))
        return b, self._step_columns(max((self.lengths[r] for r in range(b)), default=0) + 1)

    @torch.no_grad()
    def step(
        self, slots: list[int], tokens: list[int], specs: list[RoutingSpec], plugged: PluggedSet | None = None
    ) -> StepOutput:
        """Feed tokens[i] to slot slots[i] (every live slot, in any order) under specs[i]; one token each.
        Returns logits and routing counts in the order of `slots`. plugged: the set the step routes over, as the
        caller read it from `plugged` this step (the scheduler, which checked the specs against it); None: read
        now."""
        if sorted(slots) != self.live:
            raise RuntimeError(f"a step feeds every live slot: got {sorted(slots)}, live {self.live}")
        for slot, spec in zip(slots, specs, strict=True):
            if self._specs[slot] != spec:
                self._specs[slot] = spec
                self._routing_dirty = True
        if plugged is None:
            plugged = self.plugged
        self._sync_routing(plugged)
        b, s = self.bucket()
        if s > self.columns:
            self._allocate_columns(self._column_bucket(s))
        self._ids_host.zero_()
        self._ids_host[slots] = torch.tensor(tokens, dtype=torch.long)
        self.input_ids[:, 0].copy_(self._ids_host, non_blocking=True)
        logits, trace_rows, trace_layers = self._run(b, s, self._routing, plugged)
        for slot in slots:
            self.lengths[slot] += 1
        index = torch.tensor(slots, device=self.device)
        logits = logits.index_select(0, index)  # a copy: a replay overwrites the graph's outputs
        table = torch.cat([trace_rows.index_select(0, index), trace_layers]).tolist()  # the one trace read
        columns = plugged.columns
        return StepOutput(
            logits, counts_by_route(columns, table[: len(slots)]), counts_by_route(columns, table[len(slots) :])
        )

    def _run(self, b: int, s: int, routing_mode: str, plugged: PluggedSet) -> tuple[torch.Tensor, ...]:
        plugged = self._step_set(plugged)
        key = (b, s, routing_mode, plugged.context_form if routing_mode != "off" else None)  # off routes nothing
        if plugged.eager_only:
            # a kind with no fixed-op form (LoRA: a plan made on the host per layer, moe.adapters.lora) is run by no
            # captured or compiled step; the plain eager routed step runs it, until the last such expert is unplugged
            return self._body(b, s, routing_mode, plugged)
        if self.capture:
            captured = self._graphs.get(key) or self._capture(key, plugged)
            captured[0].replay()
            return captured[1]
        if self.compile_backend:
            fn = self._compiled.get(key[2:])
            if fn is None:
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                fn = torch.compile(
                    lambda rows, bias: self._compiled_body(rows, bias, routing_mode, plugged),
                    backend=self.compile_backend,
                    fullgraph=True,
                    dynamic=False,  # static but for the sizes marked dynamic: rows and columns
                )
                self._compiled[key[2:]] = fn
            rows, bias = self._rows_of(b), self.bias[:b, :, :, :s]  # the mask view is made per step: marked here
            torch._dynamo.maybe_mark_dynamic(bias, 0)
            torch._dynamo.maybe_mark_dynamic(bias, 3)
            # no duck shaping: sizes equal when traced (b = s = 8) stay distinct symbols, else the graph would hold
            # them equal and recompile when they part
            with fx_config.patch(use_duck_shape=False):
                return fn(rows, bias)
        return self._body(b, s, routing_mode, plugged)

    def warm_up_compiled(self, modes: tuple[str, ...] = ("off", "token", "rows")) -> list[tuple[str, int]]:
        """Compile now what a compiled decoder's first steps would (a server calls this before it says it is ready,
        so no request stalls on a compile): for each routing mode, the step over the set as published (its context
        form), at the row buckets where the graph splits: 1 row, 2 (the first call with the rows a dynamic size: the
        graph every larger bucket below the slot capacity keeps) and the first bucket at or above the capacity
        (bottleneck dispatch's dense form), over the first column bucket (the columns are dynamic from the first
        call). Runs on free rows only, so it needs an empty decoder: a free row's step changes nothing a live row
        reads (its position stays 0, it adds nothing to its context sums; it writes column 0 of its own KV slot,
        which a join overwrites). Returns the (mode, rows) steps run; none without compile_backend, or while the set
        has no fixed-op form (a LoRA expert: eager steps)."""
        if not self.compile_backend:
            return []
        if self.live:
            raise RuntimeError(f"warm_up_compiled needs an empty decoder; slots {self.live} are live")
        plugged = self.plugged
        if self._step_set(plugged).eager_only:
            return []
        capacity = plugged.capacity
        rows = sorted({1, min(2, self.max_batch), next((n for n in self.row_buckets if n >= capacity), self.max_batch)})
        done = []
        with torch.no_grad():
            self._sync_routing(plugged)
            for mode in modes:
                for b in rows:
                    self._run(b, self.min_columns, mode, plugged)
                    done.append((mode, b))
        return done

    def _warm_up(self, b: int, s: int, routing_mode: str, plugged: PluggedSet, times: int = 2) -> None:
        """Run bucket (b, s)'s step `times` times and undo what it did to the rows (pos, bias): what a capture
        needs first (allocator, compiled kernels). Each run writes the KV column the next real step overwrites."""
        saved_pos, saved_bias = self.pos.clone(), self.bias.clone()
        for _ in range(times):
            self._body(b, s, routing_mode, plugged)
            self.pos.copy_(saved_pos)
            self.bias.copy_(saved_bias)

    def _capture(self, key: tuple[int, int, str, tuple[bool, int] | None], plugged: PluggedSet) -> tuple:
        """Record bucket `key`'s step as a CUDA graph. Safe with live rows: a warm-up step advances pos and
        unmasks a column, so pos and bias are put back after each one (every warm-up writes the column the next
        real step overwrites, and pos stays inside the bucket: a row at column s - 1 never indexes column s).
        Every graph shares one memory pool: outputs are consumed before the next replay."""
        b, s, routing_mode, _ = key
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._warm_up(b, s, routing_mode, plugged)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = self._body(b, s, routing_mode, plugged)
        self._pool = graph.pool()
        self._graphs[key] = (graph, outputs)
        logger.info("captured the decode step of bucket rows %d x columns %d (routing %s)", b, s, routing_mode)
        return self._graphs[key]


def decode_one_token(
    decoder: StaticDecoder,
    slots: list[int],
    tokens: list[int],
    specs: list[RoutingSpec],
    plugged: PluggedSet | None = None,
) -> StepOutput:
    """One decode step of every live slot of `decoder` over `plugged` (see StaticDecoder.step)."""
    return decoder.step(slots, tokens, specs, plugged)
