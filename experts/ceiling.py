"""Expert quality against the ceiling: each domain's perplexity gain as a share of what fine-tuning the whole
backbone on that domain wins (`python -m demo.ceiling ... --out FILE` writes the ceilings).

No MLP expert, a part of the model trained on the same data, should be expected to beat the whole backbone
fine-tuned, so the share says how much of the reachable gain an expert delivers:

    share[mode] = (ppl[mode] / ppl[off] - 1) / (ceiling best_ppl / ceiling backbone_ppl - 1)

for mode in sequence and token routing (100%: the expert wins all the ceiling does). Both gains are measured on
the same held-out records with the same loss (demo.ceiling scores the first 300, as `plugmoe eval --limit 300`);
the ceiling file records the backbone perplexity it measured, and a domain whose `ppl off` differs from it by
more than 0.5% is flagged (`comparable`: false), since then the two were not measured on the same text.

The ceiling file is JSON: {domain: {"backbone_ppl", "best_ppl", ...}} (demo.ceiling's line per domain).
`plugmoe eval --ceiling FILE` adds the shares to its report (`ceiling`) and table; for a report already written:

    python -m experts.ceiling demo/experts/eval.json demo/experts/ceiling.json [--write]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SAME_TEXT_TOLERANCE = 5e-3  # relative difference of the two backbone perplexities still called the same text


def load_ceilings(path: str | Path) -> dict[str, dict]:
    ceilings = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(ceilings, dict) or not all(
        isinstance(c, dict) and {"backbone_ppl", "best_ppl"} <= set(c) for c in ceilings.values()
    ):
        raise ValueError(f"{path}: a ceiling file maps each domain to demo.ceiling's {{backbone_ppl, best_ppl, ...}}")
    return ceilings


def ceiling_shares(report: dict, ceilings: dict[str, dict]) -> dict[str, dict]:
    """Per evaluated domain with a ceiling: the ceiling's perplexity change and each routed mode's share of it."""
    out = {}
    for domain in report["domains"]:
        ceiling = ceilings.get(domain["domain"])
        if ceiling is None:
            continue
        ceiling_change = ceiling["best_ppl"] / ceiling["backbone_ppl"] - 1.0
        off = domain["ppl"]["off"]
        out[domain["domain"]] = {
            "ceiling_ppl_change": ceiling_change,
            "ceiling_backbone_ppl": ceiling["backbone_ppl"],
            "comparable": abs(off / ceiling["backbone_ppl"] - 1.0) <= SAME_TEXT_TOLERANCE,
            **{
                f"share_{mode}": (domain["ppl"][mode] / off - 1.0) / ceiling_change if ceiling_change < 0 else None
                for mode in ("sequence", "token")
            },
        }
    return out


def render_ceiling_table(shares: dict[str, dict]) -> str:
    """The shares as markdown (under `plugmoe eval`'s table)."""
    lines = [
        "| domain | ceiling Δppl (whole backbone fine-tuned) | share of it, seq | share of it, token |",
        "|---|---|---|---|",
    ]
    for domain, s in shares.items():
        cells = [f"{s[k]:.0%}" if s[k] is not None else "-" for k in ("share_sequence", "share_token")]
        flag = "" if s["comparable"] else " (ceiling measured on other text)"
        lines.append(f"| {domain} | {s['ceiling_ppl_change']:+.1%}{flag} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the ceiling shares of a `plugmoe eval` report already written")
    parser.add_argument("report", type=Path, help="an eval JSON report")
    parser.add_argument("ceilings", type=Path, help="the ceiling file (python -m demo.ceiling --out)")
    parser.add_argument("--write", action="store_true", help="also store the shares and the table in the report")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text(encoding="utf-8"))
    shares = ceiling_shares(report, load_ceilings(args.ceilings))
    table = render_ceiling_table(shares)
    print(table)
    if args.write:
        report["ceiling"] = shares
        report["table"] = report.get("table", "").split("\n\n| domain | ceiling")[0] + "\n\n" + table
        args.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
