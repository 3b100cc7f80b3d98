"""Choosing the next token of each row of a batch, each row with its own sampling settings.

Semantics of `sample_step` (what the batched code computes; `sample` is the same, tokens only):

    for i in range(B):
        x = float(logits[i])                                                        # [V]
        if params[i].logprobs is not None:
            lp = log_softmax(x)                                 # reported: the model's own distribution
            logprobs[i] = (lp[token[i]], the params[i].logprobs largest entries of lp)
        stops = eos_ids + params[i].stop_token_ids
        if step[i] < params[i].min_new_tokens: x[stops] = -inf
        elif params[i].ignore_eos: x[eos_ids] = -inf
        for t, b in params[i].logit_bias: x[t] += b
        for t in set(prompts[i] + outputs[i]):                                      # repetition_penalty r
            x[t] = x[t] * r if x[t] < 0 else x[t] / r
        for t in range(V):                                          # c = count of t in outputs[i]
            x[t] -= frequency_penalty * c + presence_penalty * (c > 0)
        if allowed has row i: x[t] = -inf for every t its bitmask forbids          # structured output
        if x is -inf everywhere: x[stops] = float(logits[i])[stops]   # min_tokens met a finished grammar
        if params[i].temperature < GREEDY_BELOW: token[i] = argmax(x)
        else:
            p = softmax(x / temperature)
            keep the top_k most likely tokens (0: all), then the smallest set whose mass reaches top_p
            token[i] = multinomial(p restricted and renormalised, generator=generators[i])

Each step above runs once for the whole batch, over the rows that use it, with per-row parameters as
tensors ([R, 1] columns, counts from one scatter of the rows' token ids); Python loops over rows only to
build those tensors, never over the vocabulary. transformers' logits processors apply one setting to a
whole batch, so they serve as the row-by-row oracles in the tests (RepetitionPenaltyLogitsProcessor,
SequenceBiasLogitsProcessor, MinNewTokensLengthLogitsProcessor, TopK/TopP warpers).

Logprobs are those of the raw model distribution, before penalties, bias, grammar masks, temperature and
top-k/top-p (vLLM's default, `logprobs_mode="raw_logprobs"`): they score the text, whatever sampled it.

A seeded row draws from a generator of its own, seeded from its request's seed, so the same seed gives the same
tokens; an unseeded row draws from torch's default generator (generator None; vLLM keeps generators for seeded
requests only, too): the scheduler builds a generator for seeded rows only.

Temperatures below GREEDY_BELOW (1e-2) are greedy: dividing logits by a tinier temperature overflows them
to infinity (vLLM treats near-zero temperatures the same way), and the distribution is one-hot long before.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe.errors import SamplingParamsError

GREEDY_BELOW = 1e-2  # temperatures below this sample greedily
MIN_TOP_P = 1e-6  # a smaller nucleus underflows in float32; use top_k=1 for the single most likely token
MAX_SEED = 2**63 - 1  # torch.Generator seeds are 64-bit; JSON clients handle signed 64-bit integers
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI)
MAX_LOGIT_BIAS = 100.0  # logit_bias values lie in [-100, 100] (OpenAI)
# repetition_penalty lies in [0.01, 100]: dividing by a tinier one overflows logits to infinity
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 100.0


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    min_new_tokens: int = 0  # EOS and stop_token_ids are blocked until this many tokens were generated
    ignore_eos: bool = False  # EOS is blocked at every step (stop_token_ids still end the row): fixed lengths
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # HF/CTRL: divides (or multiplies, if negative) seen tokens' logits
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    stop_token_ids: tuple[int, ...] = ()  # end the sequence like EOS
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise SamplingParamsError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise SamplingParamsError(f"temperature must be >= 0, got {self.temperature}")
        if not MIN_TOP_P <= self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p must be in [{MIN_TOP_P}, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SamplingParamsError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise SamplingParamsError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        if self.min_new_tokens < 0:
            raise SamplingParamsError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if abs(getattr(self, name)) > MAX_PENALTY:
                raise SamplingParamsError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise SamplingParamsError(
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}] (1: off), "
                f"got {self.repetition_penalty}"
            )
        for token, bias in self.logit_bias:
            if token < 0:
                raise SamplingParamsError(f"logit_bias token ids must be >= 0, got {token}")
            if not (math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS):
                raise SamplingParamsError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
        if any(token < 0 for token in self.stop_token_ids):
            raise SamplingParamsError(f"stop_token_ids must be >= 0, got {list(self.stop_token_ids)}")
        if self.logprobs is not None and self.logprobs < 0:
            raise SamplingParamsError(f"logprobs must be >= 0, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        """Whether the row's tokens so far change its logits (a penalty is set)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The row's own random stream, seeded from `seed` (else from fresh random bits); None for greedy rows:
        they draw nothing."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed if self.seed is not None else random.getrandbits(63))
        return generator


@dataclass(frozen=True)
class TokenLogprobs:
    """One position's log-probabilities: the token there, and the k most likely tokens (most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # 1 + how many tokens are more likely than `token` (prompt logprobs only)


@dataclass(frozen=True)
class AllowedTokens:
    """Which tokens some rows may take next (structured output).

    rows [R] are batch rows; bitmask [R, ceil(V / 32)] int32, bit v % 32 of word v // 32 set = token v
    allowed (the layout llguidance, xgrammar and outlines-core fill). Ids past the mask's width are never
    allowed.
    """

    rows: list[int]
    bitmask: torch.Tensor


@dataclass
class Sampled:
    tokens: list[int]  # [B]
    logprobs: list[TokenLogprobs | None]  # [B]; None for rows whose params.logprobs is None


def sample(
    logits: torch.Tensor | list[torch.Tensor],
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    steps: list[int],
    eos_ids: tuple[int, ...] = (),
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
    allowed: AllowedTokens | None = None,
) -> list[int]:
    """B token ids; see `sample_step`."""
    return sample_step(logits, params, generators, steps, eos_ids, prompts, outputs, allowed).tokens


def sample_step(
    logits: torch.Tensor | list[torch.Tensor],
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    steps: list[int],
    eos_ids: tuple[int, ...] = (),
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
    allowed: AllowedTokens | None = None,
) -> Sampled:
    """logits [B, V] (the last position of each row, or a list of B rows [V]); steps[i] = tokens row i
    generated so far; prompts[i] / outputs[i]: row i's prompt and generated ids (needed by penalised rows)
    -> each row's token, and its logprobs when asked."""
    if isinstance(logits, list):
        logits = torch.stack(logits)
    batch = logits.shape[0]
    raw = logits.float()
    x = process_logits(raw, params, steps, eos_ids, prompts, outputs, allowed)  # [B, V]
    out = greedy_tokens(x)  # [B]; kept for greedy rows
    sampled = [i for i in range(batch) if not params[i].greedy]
    if sampled:
        rows = torch.tensor(sampled, device=x.device)
        temperature = torch.tensor([params[i].temperature for i in sampled], device=x.device)
        probs = torch.softmax(x[rows] / temperature[:, None], dim=-1)  # [S, V]
        probs = _restrict(probs, [params[i].top_k for i in sampled], [params[i].top_p for i in sampled])
        for j, i in enumerate(sampled):
            out[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]).item())
    return Sampled(out, _logprobs(raw, out, params))


def greedy_tokens(x: torch.Tensor) -> list[int]:
    """x [B, V] -> each row's argmax (the first maximal entry; a NaN row's first NaN), as ints.

    On a CPU through numpy's argmax, which has the same rule: torch's last-dimension argmax is far slower there
    ([16, 2189] float32: ~3 us against torch's ~30; [16, 32000]: ~40 us against ~800, 2 threads)."""
    if x.device.type == "cpu":
        return x.detach().numpy().argmax(axis=1).tolist()
    return x.argmax(dim=-1).tolist()


def process_logits(
    logits: torch.Tensor,
    params: list[SamplingParams],
    steps: list[int],
    eos_ids: tuple[int, ...] = (),
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
    allowed: AllowedTokens | None = None,
) -> torch.Tensor:
    """logits [B, V] -> the float logits each row samples from: min_tokens' blocked stops, logit bias,
    penalties and grammar masks applied (the module docstring's loop, before temperature). A new tensor."""
    raw = logits.float()
    x = raw.clone()  # [B, V]
    _block_stops(x, params, steps, eos_ids)
    _add_logit_bias(x, params)
    _apply_penalties(x, params, prompts, outputs)
    if allowed is not None and allowed.rows:
        _apply_allowed(x, raw, allowed, params, eos_ids)
    return x


def _block_stops(x: torch.Tensor, params: list[SamplingParams], steps: list[int], eos_ids: tuple[int, ...]) -> None:
    """x[i, eos + stop_token_ids] = -inf for rows under their min_new_tokens, x[i, eos] = -inf for rows that
    ignore EOS (in place)."""
    rows: list[int] = []
    columns: list[int] = []
    eos = sorted(set(eos_ids))
    for i, p in enumerate(params):
        if steps[i] < p.min_new_tokens:
            stops = sorted(set(eos).union(p.stop_token_ids)) if p.stop_token_ids else eos
        elif p.ignore_eos:
            stops = eos
        else:
            continue
        rows += [i] * len(stops)
        columns += stops
    if rows:
        index = torch.tensor([rows, columns], device=x.device)  # [2, N]: one host-to-tensor copy
        x.index_put_((index[0], index[1]), torch.tensor(float("-inf"), device=x.device))


def _add_logit_bias(x: torch.Tensor, params: list[SamplingParams]) -> None:
    rows: list[int] = []
    columns: list[int] = []
    values: list[float] = []
    for i, p in enumerate(params):
        for token, bias in p.logit_bias:
            rows.append(i)
            columns.append(token)
            values.append(bias)
    if rows:
        index = (torch.tensor(rows, device=x.device), torch.tensor(columns, device=x.device))
        x.index_put_(index, torch.tensor(values, device=x.device), accumulate=True)


def _apply_penalties(
    x: torch.Tensor,
    params: list[SamplingParams],
    prompts: Sequence[Sequence[int]] | None,
    outputs: Sequence[Sequence[int]] | None,
) -> None:
    """Repetition (prompt + generated), then frequency and presence (generated only), for penalised rows."""
    penalised = [i for i, p in enumerate(params) if p.penalised]
    if not penalised:
        return
    if outputs is None:
        raise ValueError("penalised rows need `outputs` (their generated ids)")
    device, vocab = x.device, x.shape[1]
    rows = torch.tensor(penalised, device=device)
    generated = _counts([outputs[i] for i in penalised], vocab, device)  # [R, V]
    x_rows = x[rows]  # [R, V]
    repetition = torch.tensor([params[i].repetition_penalty for i in penalised], device=device)[:, None]
    if (repetition != 1).any():
        if prompts is None:
            raise ValueError("rows with a repetition penalty need `prompts`")
        seen = (generated > 0) | (_counts([prompts[i] for i in penalised], vocab, device) > 0)
        scaled = torch.where(x_rows < 0, x_rows * repetition, x_rows / repetition)
        x_rows = torch.where(seen, scaled, x_rows)
    frequency = torch.tensor([params[i].frequency_penalty for i in penalised], device=device)[:, None]
    presence = torch.tensor([params[i].presence_penalty for i in penalised], device=device)[:, None]
    x_rows = x_rows - frequency * generated - presence * (generated > 0).float()
    x[rows] = x_rows


def _counts(ids: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] float: how often each token occurs in each row's ids (one scatter for all rows)."""
    longest = max((len(row) for row in ids), default=0)
    counts = torch.zeros(len(ids), vocab, device=device)
    if longest == 0:
        return counts
    padded = torch.zeros(len(ids), longest, dtype=torch.long)
    present = torch.zeros(len(ids), longest)
    for r, row in enumerate(ids):
        padded[r, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        present[r, : len(row)] = 1.0
    return counts.scatter_add_(1, padded.to(device), present.to(device))


def token_mask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bitmask [R, W] int32 -> allowed [R, vocab] bool (bit v % 32 of word v // 32; ids past 32 W: False)."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)  # [R, 32 W]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    return allowed[:, :vocab]


def _apply_allowed(
    x: torch.Tensor, raw: torch.Tensor, allowed: AllowedTokens, params: list[SamplingParams], eos_ids: tuple[int, ...]
) -> None:
    rows = torch.tensor(allowed.rows, device=x.device)
    mask = token_mask(allowed.bitmask.to(x.device, non_blocking=True), x.shape[1])  # [R, V]
    x_rows = x[rows].masked_fill(~mask, float("-inf"))
    x[rows] = x_rows
    dead = torch.isneginf(x_rows).all(dim=-1)  # min_tokens blocked the only tokens the grammar allows
    if bool(dead.any()):
        for r in dead.nonzero().flatten().tolist():
            i = allowed.rows[r]
            stops = torch.tensor(sorted(set(eos_ids) | set(params[i].stop_token_ids)), device=x.device)
            x[i, stops] = raw[i, stops]


def _logprobs(raw: torch.Tensor, tokens: list[int], params: list[SamplingParams]) -> list[TokenLogprobs | None]:
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(params)
    if not wanted:
        return out
    rows = torch.tensor(wanted, device=raw.device)
    logprobs = torch.log_softmax(raw[rows], dim=-1)  # [R, V]
    chosen = logprobs.gather(1, torch.tensor([tokens[i] for i in wanted], device=raw.device)[:, None])[:, 0]
    k = min(max(params[i].logprobs or 0 for i in wanted), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    chosen_list, values, ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()
    for r, i in enumerate(wanted):
        n = params[i].logprobs or 0
        out[i] = TokenLogprobs(tokens[i], chosen_list[r], tuple(zip(ids[r][:n], values[r][:n], strict=True)))
    return out


def prompt_logprobs(logits: torch.Tensor, ids: Sequence[int], k: int) -> list[TokenLogprobs | None]:
    """logits [T, V] of a prompt's T positions (position j predicts ids[j + 1]) -> one entry per prompt
    token: None for the first (nothing predicts it), then each token's logprob and the k most likely."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # [T - 1, V]
    targets = torch.as_tensor(list(ids[1:]), dtype=torch.long, device=logits.device)
    chosen_column = logprobs.gather(1, targets[:, None])  # [T - 1, 1]
    ranks = ((logprobs > chosen_column).sum(dim=-1) + 1).tolist()
    chosen = chosen_column[:, 0].tolist()
    k = min(k, logprobs.shape[1])
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    values, top = top_values.tolist(), top_ids.tolist()
    entries: list[TokenLogprobs | None] = [None]
    for j, token in enumerate(ids[1:]):
        entries.append(TokenLogprobs(int(token), chosen[j], tuple(zip(top[j], values[j], strict=True)), ranks[j]))
    return entries


def _restrict(probs: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """probs [S, V] -> renormalised probs keeping each row's top_k tokens and then its top_p nucleus."""
    if all(k == 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return probs
    vocab = probs.shape[1]
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [S, V]
    rank = torch.arange(vocab, device=probs.device)[None, :]
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=probs.device)[:, None]
    keep = rank < k
    # nucleus: keep a token when the mass of the tokens before it is below top_p (the first is always kept)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep &= before < torch.tensor(top_p, device=probs.device)[:, None]
    sorted_probs = sorted_probs * keep
    restricted = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return restricted / restricted.sum(dim=-1, keepdim=True)
