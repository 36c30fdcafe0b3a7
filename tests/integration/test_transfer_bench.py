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
