"""experts.ceiling: an expert's perplexity gain as a share of the whole-backbone fine-tune's."""

from __future__ import annotations

import json

import pytest

from experts.ceiling import ceiling_shares, load_ceilings, render_ceiling_table


def _report(off: float, seq: float, token: float) -> dict:
    return {"domains": [{"domain": "code", "ppl": {"off": off, "sequence": seq, "token": token}}, {"domain": "x"}]}


def test_shares_of_the_ceiling() -> None:
    ceilings = {"code": {"backbone_ppl": 2.005, "best_ppl": 1.5753}}  # -21.4%, demo.ceiling's line
    shares = ceiling_shares(_report(2.005, 1.725, 1.924), ceilings)
    assert list(shares) == ["code"]
    code = shares["code"]
    assert code["ceiling_ppl_change"] == pytest.approx(-0.2143, abs=1e-4)
    assert code["share_sequence"] == pytest.approx(0.1397 / 0.2143, abs=1e-3)  # -14.0% of -21.4%: 65%
    assert code["share_token"] == pytest.approx(0.0404 / 0.2143, abs=1e-3)
    assert code["comparable"]
    assert "| code | -21.4% | 65% | 19% |" in render_ceiling_table(shares)


def test_a_ceiling_measured_on_other_text_is_flagged() -> None:
    shares = ceiling_shares(_report(2.2, 1.9, 2.1), {"code": {"backbone_ppl": 2.005, "best_ppl": 1.5753}})
    assert not shares["code"]["comparable"]
    assert "ceiling measured on other text" in render_ceiling_table(shares)


def test_a_malformed_ceiling_file_is_refused(tmp_path) -> None:
    path = tmp_path / "ceiling.json"
    path.write_text(json.dumps({"code": {"best_ppl": 1.5}}))
    with pytest.raises(ValueError, match="backbone_ppl, best_ppl"):
        load_ceilings(path)


def test_the_command_adds_the_shares_to_a_written_report(tmp_path, capsys) -> None:
    from experts.ceiling import main

    report, ceilings = tmp_path / "eval.json", tmp_path / "ceiling.json"
    report.write_text(json.dumps({**_report(2.005, 1.725, 1.924), "table": "| domain | ... |"}))
    ceilings.write_text(json.dumps({"code": {"backbone_ppl": 2.005, "best_ppl": 1.5753}}))
    main([str(report), str(ceilings), "--write"])
    main([str(report), str(ceilings), "--write"])  # twice: the table is replaced, not appended again
    written = json.loads(report.read_text())
    assert written["ceiling"]["code"]["share_sequence"] == pytest.approx(0.652, abs=1e-3)
    assert written["table"].count("| code | -21.4% | 65% | 19% |") == 1
    assert written["table"].startswith("| domain | ... |")
    assert "| code | -21.4% | 65% | 19% |" in capsys.readouterr().out
