"""tools/gpu_check.py runs end to end on tiny CPU shapes (its non-GPU parts): the equivalence
table, every bench section and the report files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_on_cpu(tmp_path: Path) -> None:
    gpu_check = _load()
    default_shape = gpu_check.bench.MICRO
    report = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)])
    assert gpu_check.bench.MICRO is default_shape  # the bench's default shape is restored
    text = report.read_text()
    assert text.startswith("# GPU check on cpu")
    assert "| sdpa | float32 |" in text and "| yes |" in text and "| NO |" not in text
    for preset, batch in gpu_check.BENCHES:
        assert f"### {preset} batch {batch} sdpa" in text
    assert text.count("ideal = vanilla /") == len(gpu_check.BENCHES) and "fastv_eager" in text
    checks = json.loads(next(tmp_path.glob("gpu-check-*.json")).read_text())["checks"]
    assert checks[0]["kept_equal_to_eager"] and checks[0]["keep1_max_logit_diff"] < 1e-4
    assert len(list(tmp_path.glob("bench-*.json"))) == len(gpu_check.BENCHES)


def test_budget_skips_and_names_the_benches(tmp_path: Path) -> None:
    gpu_check = _load()
    text = gpu_check.main(["--device", "cpu", "--tiny", "--budget", "0", "--out", str(tmp_path)]).read_text()
    assert "Skipped (time budget 0 s): llava-1.5-7b batch 1 sdpa" in text and "###" not in text


def test_refuses_a_missing_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_check = _load()
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main(["--device", "cuda"])
