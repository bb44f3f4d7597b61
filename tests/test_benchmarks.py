"""Benchmarks run from a clean checkout and print well-formed JSON (no timing thresholds here)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_network_quick_prints_comparison_json(tmp_path):
    output = tmp_path / "network.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_network.py"), "--quick", "--repeats", "1", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert json.loads(output.read_text()) == report
    cases = {c["case"]: c for c in report["comparisons"]}
    assert set(cases) == {"2d", "3d"}
    for case in cases.values():
        # Same architecture as MONAI's at equal widths: identical parameter and FLOP counts.
        assert case["parameters"]["ours"] == case["parameters"]["monai"]
        assert case["flops_forward"]["ours"] == case["flops_forward"]["monai"]
        for key in ("inference_fp32_ratio", "inference_bf16_ratio", "train_step_fp32_ratio", "train_step_bf16_ratio"):
            assert case[key] > 0
    shares = [report["pruning_3d"][f"L{k}"]["flop_share"] for k in (1, 2, 3, 4)]
    assert shares == sorted(shares) and shares[-1] == 1.0
