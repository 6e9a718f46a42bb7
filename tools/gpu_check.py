"""The GPU check, in one go (under 8 minutes on one H100 / H200):

    python tools/gpu_check.py                  # writes results/bench/gpu-check-<device>-<date>.md (+ .json per bench)
    python tools/gpu_check.py --quick          # equivalence only

1. Kernels agree with the eager reference (a random LLaVA-shaped model, 8 layers, 576
   image tokens, a left-padded batch of 2):
   * keep ratio 1 (PyramidDrop, lam = 1): the engine's logits equal the unmodified model's,
     per kernel (SDPA float32 and bfloat16, flash-attention-2 bfloat16 when installed);
   * PyramidDrop (lam = 0.5): the kept indices of each kernel against eager in the same
     dtype (float32: identical; bfloat16: the overlap, as kernels round differently
     before the ranking layer).
2. ``python -m redundancy.bench`` at the LLaVA-1.5-7B (batch 1 and 8) and LLaVA-NeXT-7B
   (batch 1) shapes in bfloat16 with random weights: prefill, decode, memory; engine vs
   ideal vs FLOPs and the FastV peer (SDPA, and flash-attention-2 when installed).

Each step is timed; a step that would start after ``--budget`` seconds is skipped and
named in the report. On a CPU (``--device cpu --tiny``) the same code runs on tiny shapes:
that is how the non-GPU parts are tested (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redundancy import bench  # noqa: E402
from redundancy.engine import apply_schedule  # noqa: E402
from redundancy.models.factory import build_model, config_from_dims  # noqa: E402
from redundancy.schedule import DropSchedule  # noqa: E402

CHECK_DIMS = dataclasses.replace(bench.MICRO, name="check-8L", num_layers=8, hidden=512, ffn=1376, heads=8, kv_heads=8)
TINY_DIMS = dataclasses.replace(bench.MICRO, name="tiny", num_layers=4, hidden=64, ffn=128, heads=4, kv_heads=2,
                                n_image=16, vision_tokens=17, n_text=8)
BENCHES = (("llava-1.5-7b", 1), ("llava-1.5-7b", 8), ("llava-next-7b", 1))


def kernels(device: torch.device) -> list[tuple[str, torch.dtype]]:
    """The (attention implementation, dtype) pairs to check on ``device``."""
    pairs = [("sdpa", torch.float32)]
    if device.type == "cuda":
        pairs.append(("sdpa", torch.bfloat16))
        if importlib.util.find_spec("flash_attn") is not None:
            pairs.append(("flash_attention_2", torch.bfloat16))
    return pairs


def _batch(model: Any, dims: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """Two prompts, the second left-padded by 3 tokens (masks and the flash padding path)."""
    inputs = bench.random_inputs(model, dims.n_text, 2, seed=0)
    mask = torch.ones_like(inputs["input_ids"])
    inputs["input_ids"][1, :3], mask[1, :3] = 0, 0
    inputs["attention_mask"] = mask
    return {k: v.to(device) for k, v in inputs.items()}


def equivalence(dims: Any, device: torch.device) -> list[dict[str, Any]]:
    """Per kernel: max |logit diff| at keep ratio 1 and the kept-index agreement with eager."""
    rows = []
    quarters = tuple(sorted({max(1, dims.num_layers * q // 4) for q in (1, 2, 3)}))
    keep_all = DropSchedule.pdrop(layers=quarters, lam=1.0)
    pdrop = DropSchedule.pdrop(layers=quarters, lam=0.5)
    for impl, dtype in kernels(device):
        with torch.device(device):
            eager = build_model(config_from_dims(dims, "llava"), attn_implementation="eager", dtype=dtype)
            model = build_model(config_from_dims(dims, "llava"), attn_implementation=impl, dtype=dtype)
        batch = _batch(model, dims, device)
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            ref = model(**batch).logits.float()
            with apply_schedule(model, keep_all):
                out = model(**batch).logits.float()
            with apply_schedule(eager, pdrop) as t_ref:
                eager(**batch)
            with apply_schedule(model, pdrop) as t_impl:
                model(**batch)
        overlaps = [len(set(a.tolist()) & set(b.tolist())) / max(1, len(a))
                    for r_ref, r_impl in zip(t_ref.boundaries, t_impl.boundaries)
                    for a, b in zip(r_ref.kept, r_impl.kept)]
        exact = all(torch.equal(a, b) for r_ref, r_impl in zip(t_ref.boundaries, t_impl.boundaries)
                    for a, b in zip(r_ref.kept, r_impl.kept))
        keep1 = float((out - ref)[real].abs().max())
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        passed = keep1 <= tolerance and (exact if dtype == torch.float32 else min(overlaps) >= 0.9)
        rows.append({"impl": impl, "dtype": str(dtype).removeprefix("torch."), "keep1_max_logit_diff": keep1,
                     "keep1_tolerance": tolerance, "kept_equal_to_eager": exact, "min_kept_overlap": min(overlaps),
                     "passed": passed})
        del model, eager
    return rows


def run_benches(device: torch.device, tiny: bool, out_dir: Path, stamp: str, within: Callable[[], bool]
                ) -> tuple[list[str], list[str]]:
    """The bench at each shape (and kernel); returns the report sections and the skipped ones."""
    sections, skipped = [], []
    impls = ["sdpa"] + (
        ["flash_attention_2"] if device.type == "cuda" and importlib.util.find_spec("flash_attn") else []
    )
    for preset, batch in BENCHES:
        for impl in impls if (preset, batch) == BENCHES[0] else impls[:1]:
            name = f"{preset} batch {batch} {impl}"
            if not within():
                skipped.append(name)
                continue
            cfg = bench.BenchConfig(
                preset=None if tiny else preset, batch_size=1 if tiny else batch, attn=impl, device=str(device),
                repeats=1 if tiny else 5, warmup=0 if tiny else 2, new_tokens=2 if tiny else 32, progress=False,
                out=str(out_dir / f"bench-{stamp}-{preset}-b{batch}-{impl}.json"),
                **({"K": 1, "layers": [1, 2, 3], "layer": 2} if tiny else {}),
            )
            sections.append(f"### {name}\n\n```\n{bench.run(cfg)}\n```\n")
    return sections, skipped


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU test of this script)")
    parser.add_argument("--quick", action="store_true", help="equivalence only, no bench")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no new step starts")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny to test the script itself")
    start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M")
    checks = equivalence(TINY_DIMS if args.tiny else CHECK_DIMS, device)
    default_shape = bench.MICRO
    if args.tiny:
        bench.MICRO = TINY_DIMS  # the bench's shape when no preset is given
    try:
        sections, skipped = ([], []) if args.quick else run_benches(
            device, args.tiny, out_dir, stamp, lambda: time.perf_counter() - start < args.budget)
    finally:
        bench.MICRO = default_shape
    lines = [
        f"# GPU check on {name} ({stamp} UTC)",
        "",
        f"torch {torch.__version__}; command: python tools/gpu_check.py {' '.join(argv or sys.argv[1:])}",
        "",
        "## Kernel equivalence (random LLaVA-shaped model, left-padded batch of 2)",
        "",
        "| kernel | dtype | keep-1 max logit diff (tol.) | kept = eager | min kept overlap | pass |",
        "|---|---|---|---|---|---|",
        *(f"| {r['impl']} | {r['dtype']} | {r['keep1_max_logit_diff']:.2e} ({r['keep1_tolerance']:.0e}) | "
          f"{r['kept_equal_to_eager']} | {r['min_kept_overlap']:.3f} | {'yes' if r['passed'] else 'NO'} |"
          for r in checks),
        "",
        "## Bench (random weights; medians of interleaved rounds)",
        "",
        *sections,
        *([f"Skipped (time budget {args.budget:.0f} s): {', '.join(skipped)}", ""] if skipped else []),
        f"Total {time.perf_counter() - start:.0f} s.",
    ]
    report = out_dir / f"gpu-check-{name.replace(' ', '_')}-{stamp}.md"
    report.write_text("\n".join(lines) + "\n")
    (out_dir / f"gpu-check-{stamp}.json").write_text(json.dumps({"device": name, "checks": checks}, indent=1) + "\n")
    print(report.read_text())
    if not all(r["passed"] for r in checks):
        raise SystemExit(f"kernel equivalence failed; see {report}")
    return report


if __name__ == "__main__":
    main()
