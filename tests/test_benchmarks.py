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
        text=True, encoding="utf-8", errors="replace",
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


def test_bench_generalization_quick_reports_every_site_for_both_methods(tmp_path):
    output, png = tmp_path / "generalization.json", tmp_path / "generalization.png"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_generalization.py"), "--quick",
         "--workdir", str(tmp_path / "work"), "--output", str(output), "--png", str(png)],
        capture_output=True,
        text=True, encoding="utf-8", errors="replace",
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert json.loads(output.read_text()) == report
    assert png.stat().st_size > 10_000
    # our bundle went through the user's commands: monai.bundle train, then pipeline segment
    assert report["commands"][0].startswith("python -m monai.bundle run --config_file configs/train.json")
    assert report["commands"][1].startswith("python -m pipeline segment --bundle")
    sites = ["in_domain", "zero_air", "padded_air", "bias_gamma", "thick_slices", "orientation", "cropped_fov"]
    for method in ("unetpp_bundle", "monai_basicunet"):
        results = report["results"][method]
        assert list(results) == sites
        for site in sites:
            assert 0.0 <= results[site]["dice"] <= 1.0
            assert 0.0 <= results[site]["fg_in_air"] <= 1.0
        assert results["in_domain"]["gap_to_in_domain"] == 0.0
        # the constant-air sites report the share of foreground at that value, the noisy ones cannot
        assert results["zero_air"]["fg_at_background_value"] is not None
        assert results["padded_air"]["fg_at_background_value"] is not None
        assert results["bias_gamma"]["fg_at_background_value"] is None
