"""bench/transfer.py --quick: the transfer measurement runs end to end (derive, synth, distill, measure) at tiny sizes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_transfer_bench_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("transfer_bench", ROOT / "bench" / "transfer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "transfer.json").is_file()
    assert set(res["derivative"]["rows"]) == {"zero-shot", "overwrite", "transferred", "own"}
    assert set(res["lora"]["rows"]) == {"zero-shot", "transferred", "own"}
    # the fused LoRA model and the stacked adapters are one model
    assert res["lora"]["rows"]["own"]["reference_vs_stacked_psnr_db"] > 60
    assert set(res["controlnet"]["rows"]) == {"zero-shot", "transferred", "transferred, ControlNet full attention"}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_reference_rule_bench_quick(tmp_path):
    res = _load("reference_rule_bench", ROOT / "bench" / "reference_rule.py").main(["--quick", "--out",
                                                                                    str(tmp_path)])
    rows = {r["rule"]: r for r in res["rows"]}
    assert set(rows) == {"global", "shared", "own"} and (tmp_path / "reference_rule.json").is_file()
    # more pairs, closer to full attention: the work column is ordered as the rules' masks nest
    assert rows["global"]["image_pairs_over_full"] > rows["shared"]["image_pairs_over_full"] > \
        rows["own"]["image_pairs_over_full"]
