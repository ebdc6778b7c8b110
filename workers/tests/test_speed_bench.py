"""The training-speed bench (`python -m tunery_worker.bench`) runs the worker's own finetune handler on
a model it writes to a temp folder: it must work where no operator listed that folder as a model root."""

import json

from tunery_worker import bench


def test_the_speed_bench_trains_its_own_model_outside_the_operators_model_folders(monkeypatch, capsys):
    monkeypatch.delenv("TUNERY_MODEL_ROOTS", raising=False)
    args = ["--steps", "4", "--warmup", "1", "--batch-size", "2", "--seq-len", "32", "--json"]
    assert bench.main(args) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["tunery"]["tokens_per_step"] == 2 * 32
    assert figures["tunery"]["tokens_per_s"] > 0 and figures["ratio"] > 0
