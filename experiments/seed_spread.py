"""The vanilla / PyramidDrop-trained gap over training seeds, from exported model cards.

Each argument is a pair of card directories (``python -m redundancy.micro.export ... dest=...``
writes ``card.json`` and ``predictions.jsonl``), vanilla first, the PyramidDrop twin trained from
the same shared stages with the same seed second:

    python experiments/seed_spread.py \\
        redundancy/assets/checkpoints/micro-llava-vanilla,redundancy/assets/checkpoints/micro-llava-pdrop \\
        results/training/seeds/v23-vanilla-s1,results/training/seeds/v23-pdrop-s1

Prints, per seed, both held-out accuracies, the paired difference (vanilla - PyramidDrop) with
its bootstrap interval and exact McNemar test (Holm-adjusted across the seeds), and the mean and
standard deviation of the gap across seeds (``redundancy.stats``).
"""

import json
import statistics
import sys
from pathlib import Path

from redundancy.data import exact_match, load_dataset
from redundancy.loading import TEST_SET
from redundancy.stats import compare, holm

answers = {str(s.question_id): s.answers for s in load_dataset(TEST_SET)}


def scores(card_dir: str) -> tuple[dict, list[float]]:
    card = json.loads((Path(card_dir) / "card.json").read_text())
    rows = [json.loads(line) for line in (Path(card_dir) / "predictions.jsonl").open()]
    rows.sort(key=lambda r: r["question_id"])
    return card, [exact_match(r["prediction"], answers[str(r["question_id"])]) for r in rows]


pairs = [arg.split(",") for arg in sys.argv[1:]]
if not pairs or any(len(p) != 2 for p in pairs):
    sys.exit("usage: python experiments/seed_spread.py <vanilla card dir>,<pdrop card dir> [...]")
seeds, comparisons = [], []
for vanilla_dir, pdrop_dir in pairs:
    vanilla, a = scores(vanilla_dir)
    pdrop, b = scores(pdrop_dir)
    seeds.append((vanilla["seed"], pdrop["seed"], vanilla["name"], pdrop["name"]))
    comparisons.append(compare(a, b))
comparisons = holm(comparisons)
print("| seed | vanilla % | PyramidDrop-trained % | vanilla - PyramidDrop (95% CI), test | n |")
print("|---|---|---|---|---|")
for (sv, _sp, nv, np_), c in zip(seeds, comparisons):
    print(f"| {sv} ({nv} / {np_}) | {100 * c.a:.1f} | {100 * c.b:.1f} | {c.text()} | {c.n} |")
gaps = [100 * c.diff for c in comparisons]
spread = f" +- {statistics.stdev(gaps):.1f} (sd)" if len(gaps) > 1 else ""
print(f"\nGap over {len(gaps)} seed(s): {statistics.mean(gaps):.1f}{spread} points; "
      f"vanilla {statistics.mean(100 * c.a for c in comparisons):.1f}, "
      f"PyramidDrop-trained {statistics.mean(100 * c.b for c in comparisons):.1f}")
