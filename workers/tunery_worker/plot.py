"""Render a job's loss curve to PNG: `python -m tunery_worker.plot METRICS_JSON OUT_PNG`.

METRICS_JSON is the body of `GET /v1/training/jobs/{id}/metrics` (its `points`). Training loss is
drawn as a line, evaluation loss as markers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_loss(points: list[dict], out: Path, title: str = "Training loss") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    train = [
        (p["step"], p["loss"]) for p in points if p.get("phase") == "train" and p.get("loss") is not None
    ]
    evals = [(p["step"], p["eval_loss"]) for p in points if p.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#2563eb")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o", label="eval loss", color="#dc2626")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m tunery_worker.plot METRICS_JSON OUT_PNG [TITLE]", file=sys.stderr)
        return 2
    body = json.loads(Path(argv[0]).read_text())
    plot_loss(body.get("points", body), Path(argv[1]), *(argv[2:3]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
