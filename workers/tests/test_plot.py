import json

from tunery_worker.plot import main


def test_plot_writes_a_png(tmp_path):
    points = [{"step": s, "phase": "train", "loss": 3.0 / (s + 1)} for s in range(1, 20)]
    points.append({"step": 19, "phase": "eval", "eval_loss": 0.4})
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"points": points}))
    out = tmp_path / "loss.png"
    assert main([str(metrics), str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000
