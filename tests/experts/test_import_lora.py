"""Importing PEFT LoRA adapters (built offline with PEFT on tiny models of every supported family): parity with
PEFT's own model when pinned (logits and greedy tokens; MLP, attention and all-linear targets), refusals,
--mlp-only, the gate, and the `import-lora` command."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from experts.import_lora import (
    AdapterMismatchError,
    LoraImportError,
    NonMlpTargetsError,
    UnsupportedAdapterError,
    convert_adapter,
)
from moe import RoutedModel, RoutingSpec
from moe.adapters.file import ExpertFile
from moe.decode.generation import generate
from moe.model.backbone import FAMILIES as FAMILY_TABLE
from tests.tiny import FAMILIES, MORE_FAMILIES, tiny_backbone, tiny_config, tiny_tokenizer

ALL_FAMILIES = (*FAMILIES, *MORE_FAMILIES)
# MLP targets per family, each with a twist of PEFT's config: per-module rank and alpha, rsLoRA, a regex,
# a subset of layers, and GPT-2's Conv1D (fan_in_fan_out)
CONFIGS = {
    "gpt2": {"target_modules": ["mlp.c_fc", "mlp.c_proj"], "fan_in_fan_out": True},
    "gpt_neox": {"target_modules": ["dense_h_to_4h", "dense_4h_to_h"], "use_rslora": True, "lora_alpha": 6},
    "llama": {
        "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "rank_pattern": {"layers.1.mlp.down_proj": 2},
        "alpha_pattern": {"down_proj": 3},
    },
    "qwen2": {"target_modules": r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj", "lora_alpha": 16},
    "mistral": {"target_modules": ["up_proj", "down_proj"], "layers_to_transform": [1]},
}
# targets that also reach attention, per family
ATTENTION = {
    "gpt2": ["c_attn", "mlp.c_fc"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["k_proj", "o_proj", "up_proj"],
}
TARGETS = ("mlp", "attention", "all-linear")


def config_for(family: str, targets: str = "mlp") -> dict:
    """PEFT's config for the family's MLP targets (with its twist), its attention projections only (rsLoRA, a
    rank per module), or target_modules="all-linear" (every linear layer but lm_head)."""
    if targets == "attention":
        attention = list(FAMILY_TABLE[family].attention_targets)
        return {"target_modules": attention, "use_rslora": True, "rank_pattern": {attention[-1]: 2}}
    if targets == "all-linear":
        return {"target_modules": "all-linear", "lora_alpha": 12}
    return CONFIGS.get(family, {"target_modules": list(FAMILY_TABLE[family].projections)})


def peft_adapter(family: str, directory: Path, seed: int, base: torch.nn.Module | None = None, **config) -> Path:
    """A PEFT LoRA adapter with random (not zero) lora_B, saved with save_pretrained."""
    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    model = get_peft_model(base if base is not None else tiny_backbone(family, seed=0), LoraConfig(**options))
    with torch.no_grad():  # init_lora_weights=False draws a small B; make the adapter's effect plain
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(3.0)
    model.save_pretrained(directory)
    return directory


def imported(model: RoutedModel, directory: Path, name: str, **options):
    """convert_adapter, then through the expert file (every check goes through the format)."""
    expert, report = convert_adapter(directory, model, name, **options)
    data = ExpertFile.to_bytes(expert, model.fingerprint)
    return ExpertFile.load(data, model.fingerprint), report


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("family", ALL_FAMILIES)
@torch.no_grad()
def test_pinned_import_gives_the_peft_models_logits(family: str, targets: str, tmp_path: Path) -> None:
    directory = peft_adapter(family, tmp_path / "a", seed=1, **config_for(family, targets))
    peft = PeftModel.from_pretrained(tiny_backbone(family, seed=0), directory).eval()
    model = RoutedModel(tiny_backbone(family, seed=0))
    expert, report = imported(model, directory, "a")
    table = FAMILY_TABLE[family]
    want_targets = {
        "mlp": set(report.targets) & set(table.projections),  # the family's twist may pick a subset
        "attention": set(table.attention_targets),
        "all-linear": set(table.targets),
    }[targets]
    assert expert.kind == "lora" and set(report.targets) == want_targets and want_targets
    model.plug(expert)
    plain = tiny_backbone(family, seed=0)
    for length in (9, 40):  # 27 tokens: the gathered path; 120: grouped
        x = ids(3, length)
        want = peft(x).logits
        assert not torch.allclose(want, plain(x).logits, atol=1e-3), "vacuous: the adapter changes nothing"
        got = model(x, routing=[RoutingSpec("pin", "a")] * 3).logits
        # float32, the delta added in another order than PEFT's: a few logits differed by 1.5e-5 on one CPU (AMD
        # EPYC, attention targets), within 1e-5 on others; 5e-5 stays 20x under the adapter's own effect (1e-3)
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("targets", ["attention", "all-linear"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
@torch.no_grad()
def test_pinned_import_gives_the_peft_models_greedy_tokens(family: str, targets: str, tmp_path: Path) -> None:
    """plugmoe's generate (prefill, then decode steps over the KV cache) with the adapter pinned gives, token for
    token, what PEFT's model gives with transformers' greedy `generate`."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(family, vocab=len(tokenizer))
    config.initializer_range = 0.2  # the default repeats one token forever: a weak test
    torch.manual_seed(7)
    weights = copy.deepcopy(AutoModelForCausalLM.from_config(config).state_dict())

    def backbone() -> torch.nn.Module:
        model = AutoModelForCausalLM.from_config(config).eval()
        model.load_state_dict(weights)
        return model

    directory = peft_adapter(family, tmp_path / "a", seed=1, base=backbone(), **config_for(family, targets))
    peft = PeftModel.from_pretrained(backbone(), directory).eval()
    model = RoutedModel(backbone())
    model.plug(imported(model, directory, "a")[0])
    prompts = ["The quick brown fox", "def add(a, b):", "Mia walks to the market."]
    got = generate(model, tokenizer, prompts, RoutingSpec("pin", "a"), 12)
    changed = 0
    for prompt, g in zip(prompts, got, strict=True):
        x = tokenizer(prompt, return_tensors="pt")["input_ids"]
        options = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0, "eos_token_id": 0}
        want = peft.generate(input_ids=x, **options)[0, x.shape[1] :].tolist()
        want = want[: want.index(0) + 1] if 0 in want else want
        assert g.token_ids == want, prompt
        changed += backbone().generate(input_ids=x, **options)[0, x.shape[1] :].tolist()[: len(want)] != want
    assert changed, "vacuous: the adapter changes no greedy token"


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_pinned_rows_equal_peft_mixed_adapter_batch(family: str, tmp_path: Path) -> None:
    """One batch, rows on adapter a, on the backbone, on adapter b: PEFT's adapter_names against pins."""
    dir_a = peft_adapter(family, tmp_path / "a", seed=1, **config_for(family))
    dir_b = peft_adapter(family, tmp_path / "b", seed=2, **config_for(family))
    peft = PeftModel.from_pretrained(tiny_backbone(family, seed=0), dir_a, adapter_name="a")
    peft.load_adapter(dir_b, adapter_name="b")
    peft.eval()
    model = RoutedModel(tiny_backbone(family, seed=0))
    model.plug(imported(model, dir_a, "a")[0])
    model.plug(imported(model, dir_b, "b")[0])
    x = ids(3, 30, seed=5)
    want = peft(input_ids=x, adapter_names=["a", "__base__", "b"]).logits
    got = model(x, routing=[RoutingSpec("pin", "a"), RoutingSpec("off"), RoutingSpec("pin", "b")]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(got[1], tiny_backbone(family, seed=0)(x).logits[1]), "the base row, bit for bit"


def test_scaling_follows_rank_and_alpha_patterns_and_rslora(tmp_path: Path) -> None:
    model = RoutedModel(tiny_backbone("llama", seed=0))
    expert, report = imported(model, peft_adapter("llama", tmp_path / "a", seed=1, **CONFIGS["llama"]), "a")
    pairs = expert.adapter.pairs
    assert report.targets == {"gate_proj": 4, "up_proj": 4, "down_proj": 4} and report.layers == (0, 1)
    assert pairs["gate_proj"].scaling.tolist() == [2.0, 2.0]  # 8 / 4
    assert pairs["down_proj"].scaling.tolist() == [0.75, 1.5]  # alpha_pattern 3: 3 / 4, and 3 / 2 (rank_pattern 2)
    assert not pairs["down_proj"].A[1, 2:].any(), "layer 1's rank-2 pair is zero-padded to 4"
    neox = RoutedModel(tiny_backbone("gpt_neox", seed=0))
    expert, _ = imported(neox, peft_adapter("gpt_neox", tmp_path / "n", seed=1, **CONFIGS["gpt_neox"]), "n")
    assert expert.adapter.pairs["dense_4h_to_h"].scaling.tolist() == [3.0, 3.0]  # rsLoRA: 6 / sqrt(4)


def test_an_adapter_on_some_layers_covers_those_layers(tmp_path: Path) -> None:
    model = RoutedModel(tiny_backbone("mistral", seed=0))
    expert, report = imported(model, peft_adapter("mistral", tmp_path / "m", seed=1, **CONFIGS["mistral"]), "m")
    assert expert.layers == (1,) and report.layers == (1,) and set(expert.adapter.pairs) == {"up_proj", "down_proj"}


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_attention_targets_are_served_or_dropped_with_mlp_only(family: str, tmp_path: Path) -> None:
    options = {k: v for k, v in config_for(family).items() if k != "target_modules"}
    directory = peft_adapter(family, tmp_path / "attn", seed=3, target_modules=ATTENTION[family], **options)
    model = RoutedModel(tiny_backbone(family, seed=0))
    served, report = imported(model, directory, "served")
    attention = {"gpt2": "attn.c_attn", "gpt_neox": "attention.query_key_value"}.get(family, "self_attn.")
    assert any(target.startswith(attention) for target in report.targets) and not report.dropped
    assert served.gate_site == "attention"

    expert, report = imported(model, directory, "attn", mlp_only=True)
    assert expert.gate_site == "mlp"
    assert report.dropped and all(".mlp." not in module for module in report.dropped)
    (warning,) = [w for w in report.warnings if w.startswith("--mlp-only")]
    assert "will not reproduce the adapter as trained" in warning and "plugmoe eval" in warning
    assert expert.metadata["provenance"]["dropped"] == report.dropped
    model.plug(expert)
    peft = PeftModel.from_pretrained(tiny_backbone(family, seed=0), directory).eval()
    for name, param in peft.named_parameters():  # PEFT's model without the dropped attention LoRAs
        if "lora_B" in name and ".mlp." not in name:
            param.zero_()
    x = ids(2, 9)
    got = model(x, routing=[RoutingSpec("pin", "attn")] * 2).logits
    torch.testing.assert_close(got, peft(x).logits, atol=1e-5, rtol=1e-4)


REFUSALS = [
    ("dora", "llama", {"target_modules": ["down_proj"], "use_dora": True}, UnsupportedAdapterError, "DoRA"),
    ("bias", "gpt_neox", {"target_modules": ["dense_4h_to_h"], "bias": "lora_only"}, UnsupportedAdapterError, "bias"),
    (
        "lora_bias",
        "gpt_neox",
        {"target_modules": ["dense_4h_to_h"], "lora_bias": True},
        UnsupportedAdapterError,
        "lora_B",
    ),
    (
        "pissa",
        "llama",
        {"target_modules": ["up_proj"], "init_lora_weights": "pissa"},
        UnsupportedAdapterError,
        "rewrites",
    ),
    ("embedding", "llama", {"target_modules": ["embed_tokens", "down_proj"]}, NonMlpTargetsError, "embed_tokens"),
    ("lm_head", "qwen2", {"target_modules": ["lm_head", "down_proj"]}, NonMlpTargetsError, "lm_head"),
    ("rank cap", "llama", {"target_modules": ["q_proj"], "r": 300}, UnsupportedAdapterError, "over the cap of 256"),
    (
        "modules_to_save",
        "llama",
        {"target_modules": ["down_proj"], "modules_to_save": ["lm_head"]},
        NonMlpTargetsError,
        "lm_head",
    ),
    (
        "trainable tokens",
        "llama",
        {"target_modules": ["down_proj"], "trainable_token_indices": [5, 7]},
        NonMlpTargetsError,
        "embed_tokens",
    ),
]


@pytest.mark.parametrize(("case", "family", "config", "error", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_what_the_lora_kind_cannot_reproduce_is_refused(case, family, config, error, message, tmp_path: Path) -> None:
    directory = peft_adapter(family, tmp_path / "x", seed=4, **config)
    with pytest.raises(error, match=message):
        convert_adapter(directory, RoutedModel(tiny_backbone(family, seed=0)), "x")


def test_adapters_for_another_backbone_are_refused(tmp_path: Path) -> None:
    llama = peft_adapter("llama", tmp_path / "llama", seed=1, target_modules=["gate_proj", "down_proj"])
    with pytest.raises(LoraImportError, match="no LoRA on the attention or MLP projections"):
        convert_adapter(llama, RoutedModel(tiny_backbone("gpt2", seed=0)), "x")
    with pytest.raises(AdapterMismatchError, match="the LoRA maps 32 -> 64, the backbone's gate_proj maps 48 -> 96"):
        convert_adapter(llama, RoutedModel(tiny_backbone("llama", seed=0, hidden=48)), "x")
    deep = peft_adapter(
        "llama", tmp_path / "deep", seed=1, base=tiny_backbone("llama", layers=3), target_modules=["up_proj"]
    )
    with pytest.raises(AdapterMismatchError, match="layers up to 2; the backbone has 2 layers"):
        convert_adapter(deep, RoutedModel(tiny_backbone("llama", seed=0)), "x")


def _edit_config(directory: Path, **changes) -> Path:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return directory


def test_base_model_name_is_checked(tmp_path: Path) -> None:
    model = RoutedModel(tiny_backbone("llama", seed=0))
    directory = _edit_config(
        peft_adapter("llama", tmp_path / "a", seed=1, target_modules=["up_proj"]),
        base_model_name_or_path="org/other-model",
    )
    with pytest.raises(AdapterMismatchError, match="trained on 'org/other-model', the backbone is 'org/model'"):
        convert_adapter(directory, model, "a", served="org/model")
    _, report = convert_adapter(directory, model, "a", served="org/model", ignore_base_model=True)
    assert any("--ignore-base-model" in w for w in report.warnings)
    _, report = convert_adapter(directory, model, "a", served=str(tmp_path / "other-model"))
    assert report.warnings == [], "a local copy named after the hub id is the same model"


def test_broken_adapter_directories_say_what_to_do(tmp_path: Path) -> None:
    model = RoutedModel(tiny_backbone("llama", seed=0))
    with pytest.raises(LoraImportError, match="no adapter_config.json"):
        convert_adapter(tmp_path / "missing", model, "a")
    directory = peft_adapter("llama", tmp_path / "a", seed=1, target_modules=["up_proj"])
    with pytest.raises(LoraImportError, match="tensors have rank 4, the config says 8"):
        convert_adapter(_edit_config(directory, r=8), model, "a")
    with pytest.raises(UnsupportedAdapterError, match="only LoRA adapters"):
        convert_adapter(_edit_config(directory, r=4, peft_type="IA3"), model, "a")
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    with pytest.raises(LoraImportError, match="safe_serialization=True"):
        convert_adapter(directory, model, "a")


# --- the command ------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _texts(words: tuple[str, ...], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(10)) for _ in range(n)]


def test_import_lora_command_writes_a_gated_expert(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from experts.cli import main
    from moe import load_backbone

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    mlp = peft_adapter(
        "llama", tmp_path / "mlp", seed=1, base=base, target_modules=["gate_proj", "up_proj", "down_proj"]
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    attn = peft_adapter("llama", tmp_path / "attn", seed=2, base=base, target_modules=["q_proj", "down_proj"])
    code = _write_jsonl(tmp_path / "code.jsonl", _texts(("def", "return", "(a, b):", "x", "+", "1"), 30, 0))
    general = _write_jsonl(tmp_path / "general.jsonl", _texts(("the", "fox", "river", "morning", "cold"), 30, 1))
    out = tmp_path / "code-lora.safetensors"
    fast = ["--max-tokens", "32", "--gate-steps", "5", "--gate-max-tokens", "500", "--balance-steps", "2"]
    common = ["--model", str(tiny_model_dir), "--data", str(code), "--calibration", str(general), "--seed", "0"]

    # an attention LoRA: its gate is trained on the attention blocks' inputs, where it is decided
    assert (
        main(["import-lora", str(attn), "--name", "a", "--out", str(tmp_path / "a.safetensors"), *common, *fast]) == 0
    )
    capsys.readouterr()
    attention = ExpertFile.load(tmp_path / "a.safetensors", RoutedModel(load_backbone(tiny_model_dir)[0]).fingerprint)
    assert set(attention.adapter.pairs) == {"self_attn.q_proj", "down_proj"} and attention.gate_site == "attention"
    assert (attention.thresholds < 2.0).all(), "the gate was trained"
    args = ["import-lora", str(attn), "--name", "x", "--out", str(tmp_path / "x.safetensors"), "--mlp-only"]
    assert main([*args, *common, *fast]) == 0
    printed = capsys.readouterr().out
    assert "warning: --mlp-only: dropping self_attn.q_proj (layers [0, 1])" in printed
    assert f"plugmoe eval --model {tiny_model_dir} --experts {tmp_path} --data x={code}" in printed

    argv = ["import-lora", str(mlp), "--name", "code", "--out", str(out), "--description", "python", *common, *fast]
    assert main(argv) == 0
    backbone, _ = load_backbone(tiny_model_dir, device="cpu")
    model = RoutedModel(backbone)
    expert = ExpertFile.load(out, model.fingerprint)
    assert expert.kind == "lora" and expert.name == "code" and expert.description == "python"
    assert (expert.thresholds < 2.0).all(), "the gate was trained (a converted expert's gate starts closed)"
    provenance, evals = expert.metadata["provenance"], expert.metadata["evals"]
    assert provenance["source"] == "peft" and provenance["tool"] == "plugmoe import-lora"
    assert provenance["adapter_config"]["r"] == 4 and provenance["base_model_name_or_path"] == str(tiny_model_dir)
    assert set(evals) >= {"gate", "routing", "import"} and len(evals["gate"]["recall_per_layer"]) == 2
    sample = expert.metadata["domain_sample"]  # what admission measures this domain on, beside later experts
    assert sample and all(set(text.split()) <= {"def", "return", "(a,", "b):", "x", "+", "1"} for text in sample)
    model.plug(expert)  # as the server would
    x = ids(1, 8)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), mlp).eval()
    with torch.no_grad():
        got = model(x, routing=[RoutingSpec("pin", "code")]).logits
        torch.testing.assert_close(got, peft(x).logits, atol=1e-5, rtol=1e-4)


def test_import_lora_offers_no_flag_it_would_ignore(capsys) -> None:
    from experts.cli import main

    with pytest.raises(SystemExit) as info:  # train-expert's --adapter-from: the adapter here is PEFT's
        main(
            [
                "import-lora",
                "dir",
                "--model",
                "m",
                "--name",
                "x",
                "--data",
                "d.jsonl",
                "--out",
                "x.safetensors",
                "--adapter-from",
                "y",
            ]
        )
    assert info.value.code == 2 and "unrecognized arguments: --adapter-from" in capsys.readouterr().err
