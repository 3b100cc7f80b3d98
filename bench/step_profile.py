"""Where a decode step's time goes in the engine, in process (no HTTP): the server's Engine (its own thread, the
server's metrics) running `--clients` sequences of `--prompt-tokens`-token prompts x `--new-tokens` greedy tokens on
the demo model with its experts (or `--shape gpt2-124m`), routing off and token mode, against HF `generate` on the
same prompts as one static batch in the main thread (bench/peer.py's comparison).

    python bench/step_profile.py                         # off, token, hf: tokens/s, cores, and the step's phases
    python bench/step_profile.py --profile               # plus cProfile of the engine thread (top functions)
    python bench/step_profile.py --cases token --rounds 3
    python bench/step_profile.py --cases off off+compile token token+compile   # the compiled decode step (inductor)

Token mode routes as the server does by default: the context router fitted on the experts' domain texts
(`--router gates`: each expert's cosine gates alone, `plugmoe serve --router gates`; a token case says "routed by the
gates" where the gates route, e.g. experts without domain texts, as the gpt2-124m shape's). A set routed by the context
router compiles as one routed by the gates (its classifiers in the slot storage's gate columns).

Each case runs in a fresh process (libgomp's pools are per process, see server/engine.py), in turn, `--rounds`
times, after an untimed warm-up in the same process; ratios are taken within a round and the median printed (a
shared machine drifts: the load average is printed with each round). On a loaded machine the engine thread's CPU
time per step (printed) moves less than its wall time: time spent waiting for a core does not count.

A `+compile` case runs the engine with compile_backend (the server's --compile-decode). The engine compiles its steps
when it starts, before it is ready (Engine.warming; printed: "compiled at start", with the graphs compiled then); its
warm-up is then two runs, both printed: the first shows whether a run reaches a step the start did not compile (its
wall time then holds that compile), the second whether anything compiles again (the graphs dynamo compiled in each
run, and while timed, are printed; a compiled step survives the KV columns' growth, so in steady state none). A cold
compile time needs a cold inductor cache: TORCHINDUCTOR_CACHE_DIR=$(mktemp -d).

`--shape gpt2-124m` runs random GPT-2-124M weights with the demo vocabulary and `--routed-experts` experts that win
every token (bench/peer.py's named shape), written once to a temporary folder that every case's process reads:

    python bench/step_profile.py --shape gpt2-124m --cases off off+compile token token+compile hf --rounds 2

Phases of an engine step (wall time of the engine thread, per decode step, from timers around the scheduler's
calls, each phase exclusive of the phases it calls: a few perf_counter reads per step, cheap beside the step;
`--phase-clock cpu`: the engine thread's CPU time instead, which a machine shared with other work moves less):

    forward      StaticDecoder._run: the model's decode forward (routing ops included)
    step rest    the rest of StaticDecoder.step: input ids in, logits rows out, the one trace read, counts by route
    sampling     Scheduler._sample (sample_step and its host read)
    advance      Scheduler._advance_all, every row: record the token, TextStream.add (detokenise), the Event
    flush        Scheduler._flush: the observer (metrics, routed totals) and the pushes to the event loop, with
                 the wait for the GIL while the woken loop holds it
    prefill      moe.decode.prefill.prefill, from the admission: the prompts' forward (model work, as `forward`)
    admit        the rest of Scheduler._admit: picking, arming and joining the new rows (their first tokens: under
                 sampling, advance)
    other        the rest of Scheduler.step (cancel checks, _drop, counts); `ms/step` also holds the engine loop

The hf case prints its own phases the same way: its decode forwards (`forward`), its prefill forward per decode step
(`prefill`), and the rest of `generate` (`host`: logits processors, stopping criteria, the cache and mask growth).

`--decoder-columns 64 128 256` times the decoder alone instead (no engine, no sampling, no text): per case, in a
fresh process, the main thread runs `StaticDecoder.step` of `--clients` rows of demo prompts at each KV column count
(the rows' routing off or token; `+compile`: the step compiled, its compile untimed), and prints CPU and wall ms per
step and the ratios per column count:

    python bench/step_profile.py --decoder-columns 64 128 256 --cases off off+compile token token+compile --threads 1

`--profile` profiles the engine thread with cProfile (its overhead inflates Python-heavy parts: read it for where,
not for how much).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.peer import demo_prompts, shape_with_demo_vocabulary  # noqa: E402
from bench.serve_load import write_experts  # noqa: E402

T = TypeVar("T")

CASES = ("off", "token", "hf", "off+compile", "token+compile")
PHASES = ("forward", "step rest", "sampling", "advance", "flush", "prefill", "admit", "other")


class PhaseClock:
    """Exclusive seconds per named phase (a nested timed call's time is its own phase's, not its caller's), from
    wrappers around bound methods (replaced on the instance). clock: time.perf_counter (wall) or time.thread_time
    (the calling thread's CPU: waiting for a core, or for the GIL, does not count)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._nested: list[float] = []  # per open call: seconds its timed callees took
        self._clock = clock

    def wrap(self, owner: Any, method: str, phase: str) -> None:
        inner: Callable = getattr(owner, method)
        seconds, nested, clock = self.seconds, self._nested, self._clock

        def timed(*args: Any, **kwargs: Any) -> Any:
            nested.append(0.0)
            start = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                took = clock() - start
                seconds[phase] += took - nested.pop()
                if nested:
                    nested[-1] += took

        setattr(owner, method, timed)


def in_ending_thread(fn: Callable[[], T]) -> T:
    """fn() in a thread that ends when it returns, as the server loads (server.engine.in_passing_thread): a live
    thread that ran one of torch's parallel ops keeps an OpenMP pool, and once the process holds more pool threads
    than CPUs libgomp stops spinning in every pool (the engine thread's decode forward then took 9.4 ms a step
    instead of 4.0 on the demo model, 16 rows, 2 threads: the main thread had built the engine's KV buffers)."""
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(fn()), name="plugmoe-load")
    thread.start()
    thread.join()
    if not out:
        raise RuntimeError("loading failed (its traceback is above)")
    return out[0]


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The demo model and its experts plugged, loaded in a thread that ends (as the server does)."""

    def body() -> tuple[Any, Any]:
        import torch

        from experts.cli import load_experts_dir
        from moe import RoutedModel, RouterConfig, load_backbone

        torch.set_num_threads(args.threads)
        backbone, tokenizer = load_backbone(args.model)
        model = RoutedModel(backbone, RouterConfig())
        model.set_experts(tuple(load_experts_dir(args.experts, model.fingerprint)))
        if args.router == "context" and len(model.plugged):  # as the server does after a plug (its default)
            from moe.admission.router_fit import ContextRouterFitter

            ContextRouterFitter(model, tokenizer).offer(model.plugged.experts)  # None: too few domain texts
        return model, tokenizer

    return in_ending_thread(body)


def engine_case(case: str, args: argparse.Namespace) -> dict:
    import torch
    from torch._dynamo.utils import counters

    import moe.decode.scheduler as scheduler_module
    from moe import RoutingSpec
    from moe.decode.sampling import SamplingParams
    from moe.decode.sequence import GenerationRequest
    from server.engine import Engine
    from server.metrics import Metrics

    model, tokenizer = load_model(args)
    prompts = [tokenizer(p)["input_ids"] for p in demo_prompts(Path(args.model), args.clients, args.prompt_tokens)]
    mode, compiled = case.split("+")[0], case.endswith("+compile")
    options = {"compile_backend": args.compile} if compiled else {}
    engine = in_ending_thread(  # its decoder allocates the KV buffers (parallel fills): not in this thread
        lambda: Engine(
            model, tokenizer, max_batch_size=args.clients, max_queue=4 * args.clients, metrics=Metrics(), **options
        )
    )
    scheduler = engine.scheduler
    clock = PhaseClock(time.thread_time if args.phase_clock == "cpu" else time.perf_counter)
    steps = [0]
    profiler = cProfile.Profile() if args.profile else None
    profiling = [False]  # the timed run only
    step = scheduler.step

    def profiled_step() -> None:  # on the engine thread: cProfile hooks the thread that enables it
        if profiler is None or not profiling[0]:
            return step()
        profiler.enable()
        try:
            return step()
        finally:
            profiler.disable()

    scheduler.step = profiled_step
    clock.wrap(scheduler, "step", "other")  # exclusive: what the phases below leave of a scheduler step
    clock.wrap(scheduler.decoder, "_run", "forward")
    clock.wrap(scheduler.decoder, "step", "step rest")
    clock.wrap(scheduler, "_sample", "sampling")
    # per batch; a tree from before it (this file run against an older checkout, for a before/after) per row
    clock.wrap(scheduler, "_advance_all" if hasattr(scheduler, "_advance_all") else "_advance", "advance")
    clock.wrap(scheduler, "_flush", "flush")
    clock.wrap(scheduler, "_admit", "admit")
    clock.wrap(scheduler_module, "prefill", "prefill")  # the name _start calls
    decode = scheduler._decode

    def counted_decode(plugged: Any) -> None:
        steps[0] += 1
        decode(plugged)

    scheduler._decode = counted_decode
    run_thread = engine._start_loop

    def engine_thread() -> None:  # the pool size is per thread: the engine's compiles and runs the steps
        torch.set_num_threads(args.threads)
        run_thread()

    engine._start_loop = engine_thread
    graphs = counters["stats"]
    started = time.perf_counter()
    engine.start()
    while engine.warming:  # compiling its steps (compile_backend), before it says it is ready
        time.sleep(0.01)
    start_compile = time.perf_counter() - started
    graphs_at_start = graphs["unique_graphs"]
    request = GenerationRequest(
        [0],
        args.new_tokens,
        SamplingParams(min_new_tokens=args.new_tokens),
        routing=RoutingSpec(mode),  # type: ignore[arg-type]
    )

    async def one(prompt: list[int]) -> int:
        handle = engine.submit(dataclasses.replace(request, prompt_ids=prompt))
        tokens = 0
        async for event in handle.events():
            tokens += len(event.token_ids)
            if event.finished is not None and event.finished.reason == "error":
                raise RuntimeError(event.finished.message)
        return tokens

    async def run() -> tuple[int, float]:
        start = time.perf_counter()
        counts = await asyncio.gather(*[one(p) for p in prompts])
        return sum(counts), time.perf_counter() - start

    # untimed, twice: the first allocates and compiles every bucket the run reaches (its wall is about the compile
    # time); the second shows what is left (a compiled step survives the KV columns' growth: nothing recompiles)
    warm_up = asyncio.run(run())[1]
    graphs_in_warm_up = graphs["unique_graphs"] - graphs_at_start
    second_warm_up = asyncio.run(run())[1]
    graphs_in_second = graphs["unique_graphs"] - graphs_at_start - graphs_in_warm_up
    clock.seconds.clear()
    steps[0] = 0
    profiling[0] = True
    graphs_before = graphs["unique_graphs"]
    engine_before, process_before = cpu_seconds_of_engine(engine), time.process_time()
    tokens, wall = asyncio.run(run())
    process_cores = (time.process_time() - process_before) / wall
    engine_cores = (cpu_seconds_of_engine(engine) - engine_before) / wall
    profiling[0] = False
    engine.stop()
    result = {
        "case": case,
        # what routed token mode: the context router, or the gates (asked, or an expert with too few domain texts)
        "router": "gates" if mode == "off" or model.plugged.context is None else "context",
        "tokens": tokens,
        "wall": wall,
        "steps": steps[0],
        "engine_cores": engine_cores,
        "process_cores": process_cores,
        "phases": {name: clock.seconds.get(name, 0.0) / max(steps[0], 1) for name in PHASES},
        "phase_clock": args.phase_clock,
        "loop": wall / max(steps[0], 1),
        "start_compile": start_compile,
        "warm_up": warm_up,
        "second_warm_up": second_warm_up,
        "engine_cpu_per_step": engine_cores * wall / max(steps[0], 1),
        # graphs dynamo compiled (a recompile is one more): in each warm-up run, and while timed
        "graphs": [graphs_in_warm_up, graphs_in_second, graphs["unique_graphs"] - graphs_before],
        "graphs_at_start": graphs_at_start,
    }
    if profiler is not None:
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(args.top)
        result["profile"] = stream.getvalue()
    return result


def decoder_case(case: str, args: argparse.Namespace) -> dict:
    """The decoder alone, in this (main) thread: CPU and wall ms per `StaticDecoder.step` of --clients rows at each
    of --decoder-columns KV columns. The prompts are cut so that no row outgrows the column bucket while timed."""
    import torch

    from moe import RoutingSpec
    from moe.decode.prefill import prefill
    from moe.decode.static_decoder import StaticDecoder

    model, tokenizer = load_model(args)
    torch.set_num_threads(args.threads)  # the pool size is per thread: this one runs the steps
    mode, compiled = case.split("+")[0], case.endswith("+compile")
    spec = RoutingSpec(mode="off") if mode == "off" else RoutingSpec()
    texts = demo_prompts(Path(args.model), args.clients, args.prompt_tokens)
    warm, timed = 3, args.decoder_steps
    columns_out: dict[str, dict] = {}
    for columns in args.decoder_columns:
        length = min(args.prompt_tokens, columns - warm - timed - 1)  # the rows stay inside `columns`
        if length < 1:
            raise SystemExit(f"--decoder-steps {timed} leaves no room for a prompt in {columns} columns")
        decoder = StaticDecoder(
            model,
            max_batch=args.clients,
            max_len=max(args.decoder_columns),
            min_columns=columns,
            compile_backend=args.compile if compiled else None,
        )
        prompts = [tokenizer(t)["input_ids"][:length] for t in texts]
        pre = prefill(model, prompts, [spec] * len(prompts))
        slots = [decoder.join(pre, row) for row in range(len(prompts))]
        tokens, specs = [p[-1] for p in prompts], pre.specs
        start = time.perf_counter()
        for _ in range(warm):  # compiles the bucket (compiled cases)
            decoder.step(slots, tokens, specs)
        warm_up = time.perf_counter() - start
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(timed):
            decoder.step(slots, tokens, specs)
        wall = time.perf_counter() - start
        assert max(decoder.lengths) < columns, "a row outgrew the column bucket"  # (compiled: all columns held)
        columns_out[str(columns)] = {
            "cpu_ms": (time.process_time() - cpu) / timed * 1e3,
            "wall_ms": wall / timed * 1e3,
            "warm_up": warm_up,
        }
    return {"case": case, "columns": columns_out}


def cpu_seconds_of_engine(engine: Any) -> float:
    """User + system CPU seconds of the engine thread (its native id's /proc entry)."""
    native = engine._thread.native_id
    fields = Path(f"/proc/self/task/{native}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hf_case(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    batch = tokenizer(
        demo_prompts(Path(args.model), args.clients, args.prompt_tokens), return_tensors="pt", padding=True
    )

    def run() -> tuple[int, float]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or 0,
            )
        return out[:, batch["input_ids"].shape[1] :].numel(), time.perf_counter() - start

    forward, forwards = model.forward, []  # HF's own phases: each forward's wall time (the first is the prefill)

    def timed_forward(*a, **k):
        start = time.perf_counter()
        try:
            return forward(*a, **k)
        finally:
            forwards.append(time.perf_counter() - start)

    model.forward = timed_forward
    run()
    forwards.clear()
    cpu = time.process_time()
    tokens, wall = run()
    cores = (time.process_time() - cpu) / wall
    steps = args.new_tokens
    return {
        "case": "hf",
        "tokens": tokens,
        "wall": wall,
        "steps": steps,
        "engine_cores": cores,
        "process_cores": cores,
        "loop": wall / steps,
        # per decode step, as the engine's phases: the decode forwards, the prefill, generate's host work
        "hf_phases": {
            "forward": sum(forwards[1:]) / max(len(forwards) - 1, 1),
            "prefill": forwards[0] / steps,
            "host": (wall - sum(forwards)) / steps,
        },
    }


def print_case(result: dict) -> None:
    ms = 1e3
    line = (
        f"  {result['case']:13s} {result['tokens'] / result['wall']:7.0f} tok/s  {result['loop'] * ms:6.2f} ms/step"
        f"  engine {result['engine_cores']:.2f} cores, process {result['process_cores']:.2f}"
    )
    if result.get("router") == "gates" and result["case"].startswith("token"):
        line += ", routed by the gates"
    if "engine_cpu_per_step" in result:
        line += f", engine CPU {result['engine_cpu_per_step'] * ms:.2f} ms/step"
    if result.get("graphs_at_start"):
        line += f", compiled at start: {result['graphs_at_start']} graphs in {result['start_compile']:.1f} s"
    if "warm_up" in result:
        line += f", warm-up runs {result['warm_up']:.1f} s + {result['second_warm_up']:.1f} s"
    if any(result.get("graphs", ())):
        first, second, timed = result["graphs"]
        line += f", graphs compiled: {first} in the first warm-up, {second} in the second, {timed} while timed"
    print(line, flush=True)
    if "hf_phases" in result:
        parts = "  ".join(f"{name} {value * ms:.2f}" for name, value in result["hf_phases"].items())
        print(f"{'':16s}wall ms per decode step: {parts}", flush=True)
    if "phases" in result:
        parts = "  ".join(f"{name} {result['phases'][name] * ms:.2f}" for name in PHASES)
        print(f"{'':16s}{result['phase_clock']} ms per decode step: {parts}", flush=True)
    if "profile" in result:
        print(result["profile"], flush=True)


def print_decoder_case(result: dict) -> None:
    parts = "  ".join(
        f"{columns} cols {c['cpu_ms']:6.2f} CPU ms ({c['wall_ms']:6.2f} wall, warm-up {c['warm_up']:.1f} s)"
        for columns, c in result["columns"].items()
    )
    print(f"  {result['case']:13s} per step: {parts}", flush=True)


def print_decoder_ratios(rounds: list[dict[str, dict]], args: argparse.Namespace) -> None:
    """Compiled / eager CPU ms per step (< 1: the compiled step is cheaper), median over rounds, per column count."""
    for mode in ("off", "token"):
        if mode not in args.cases or f"{mode}+compile" not in args.cases:
            continue
        for columns in map(str, args.decoder_columns):
            ratios = [
                r[f"{mode}+compile"]["columns"][columns]["cpu_ms"] / r[mode]["columns"][columns]["cpu_ms"]
                for r in rounds
            ]
            print(
                f"{mode}+compile / {mode} CPU ms per step at {columns} columns: median {statistics.median(ratios):.2f}"
                f" over {len(ratios)} rounds"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "demo" / "model"))
    parser.add_argument("--experts", default=str(REPO / "demo" / "experts"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=33)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES[:3]))
    parser.add_argument(
        "--router",
        choices=["context", "gates"],
        default="context",
        help="token mode's router: the server's default (context: fitted on the experts' domain texts, the gates "
        "where an expert carries fewer than 8) or each expert's cosine gates alone (plugmoe serve --router gates)",
    )
    parser.add_argument("--compile", default="inductor", help="the +compile cases' torch.compile backend")
    parser.add_argument("--profile", action="store_true", help="cProfile the engine thread (engine cases)")
    parser.add_argument(
        "--phase-clock",
        choices=["wall", "cpu"],
        default="wall",
        help="what a phase's ms are: wall time of the engine thread, or its CPU time (a loaded machine's waits for a "
        "core, and the waits for the GIL, left out; each read is a system call, ~1 us)",
    )
    parser.add_argument("--top", type=int, default=25, help="functions the profile lists")
    parser.add_argument(
        "--decoder-columns",
        nargs="+",
        type=int,
        metavar="COLUMNS",
        help="time the decoder alone (StaticDecoder.step, no engine) at these KV column counts",
    )
    parser.add_argument(
        "--decoder-steps", type=int, default=20, help="timed steps per column count (--decoder-columns)"
    )
    parser.add_argument(
        "--shape",
        choices=["demo", "gpt2-124m"],
        default="demo",
        help="demo: --model and --experts; gpt2-124m: random GPT-2-124M weights with the demo vocabulary and "
        "--routed-experts experts that win every token (bench/peer.py's shape), written to a temporary folder",
    )
    parser.add_argument("--routed-experts", type=int, default=8, help="gpt2-124m: experts that win every token")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args()
    if args.decoder_columns and "hf" in args.cases:
        parser.error("--decoder-columns times plugmoe's decoder: drop hf from --cases")
    if args.case:
        if args.decoder_columns:
            result = decoder_case(args.case, args)
        else:
            result = hf_case(args) if args.case == "hf" else engine_case(args.case, args)
        print(json.dumps(result), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        passed = sys.argv[1:]
        if args.shape != "demo":  # written once: every case's process reads the same weights and experts
            args.model = str(shape_with_demo_vocabulary(Path(tmp) / "model", args.shape))
            args.experts = str(Path(tmp) / "experts")
            write_experts(Path(args.model), Path(args.experts), args.routed_experts, 0, 16, "float32")
            passed = [*passed, "--shape", "demo", "--model", args.model, "--experts", args.experts]
        run_rounds(args, passed)


def run_rounds(args: argparse.Namespace, passed: list[str]) -> None:
    """Every case of --cases in a process of its own, --rounds times (order rotated), then the ratios."""
    what = f"the decoder alone at {args.decoder_columns} KV columns" if args.decoder_columns else "the engine"
    print(
        f"{what}: {args.clients} clients, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, "
        f"{args.threads} threads, --router {args.router}"
    )
    rounds: list[dict[str, dict]] = []
    for index in range(args.rounds):
        print(f"round {index + 1}: load average {os.getloadavg()[0]:.2f}", flush=True)
        order = args.cases[index % len(args.cases) :] + args.cases[: index % len(args.cases)]
        results = {}
        for case in order:
            out = subprocess.run(
                [sys.executable, __file__, *passed, "--case", case], capture_output=True, text=True, cwd=REPO
            )
            if out.returncode != 0:
                raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
            results[case] = json.loads(out.stdout.strip().splitlines()[-1])
            (print_decoder_case if args.decoder_columns else print_case)(results[case])
        rounds.append(results)
    if args.decoder_columns:
        print_decoder_ratios(rounds, args)
        return
    pairs = [
        ("token", "off"),
        ("off", "hf"),
        ("token", "hf"),
        ("off+compile", "off"),
        ("token+compile", "token"),
        ("token+compile", "off+compile"),
        ("off+compile", "hf"),
    ]
    for top, bottom in pairs:
        if top in args.cases and bottom in args.cases:
            ratios = [r[top]["tokens"] / r[top]["wall"] / (r[bottom]["tokens"] / r[bottom]["wall"]) for r in rounds]
            cpu = [cpu_per_token(r[top]) / cpu_per_token(r[bottom]) for r in rounds]
            print(
                f"{top} / {bottom} tokens/s: median {statistics.median(ratios):.2f} over {len(ratios)} rounds; "
                f"CPU seconds per token (engine thread; hf: the process): {statistics.median(cpu):.2f}"
            )


def cpu_per_token(result: dict) -> float:
    """CPU seconds per token generated: the engine thread's (hf: its process's), which waiting for a core on a shared
    machine does not inflate as it does wall time."""
    return result["engine_cores"] * result["wall"] / result["tokens"]


if __name__ == "__main__":
    main()
