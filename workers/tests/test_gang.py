"""A gang (num_nodes 2) on one machine: two torchrun agents, one per "node", one gloo process each.

Each node runs as its worker runs it: `finetune.run` with the node's place in the gang (`ctx.gang`),
which starts `torchrun --nnodes 2 --node-rank k --nproc_per_node 1 --master-addr/--master-port`.
The two nodes run at once (threads here, each with its own torchrun process tree, as two workers
would), and the result must equal the single-process run up to fp32 summation order, the tolerance
test_ddp.py explains (same global batch, seed, data order and LR).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from test_ddp import DDP_VS_SINGLE_ATOL, STEPS, max_abs_diff, spec
from test_finetune import final_adapter, make_ctx, memorization_set, train_losses

from tunery_worker.jobs import finetune
from tunery_worker.runner import free_port

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def test_two_node_gang_equals_one_process(tmp_path: Path, tiny_llama: Path) -> None:
    dataset = memorization_set(tmp_path)
    single = make_ctx(tmp_path, tiny_llama, dataset, "single", **spec())
    single_result = finetune.run(single)

    port = free_port("127.0.0.1")
    gang_spec = spec(distributed={"enabled": True, "num_nodes": 2})
    nodes = [make_ctx(tmp_path, tiny_llama, dataset, f"node{rank}", **gang_spec) for rank in (0, 1)]
    for rank, ctx in enumerate(nodes):
        ctx.gang = {"rank": rank, "world": 2, "master_addr": "127.0.0.1", "master_port": port}
    results: dict[int, Any] = {}

    def run(rank: int) -> None:
        try:
            results[rank] = finetune.run(nodes[rank])
        except BaseException as err:  # reported below, in the test's thread
            results[rank] = err

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not isinstance(results[0], BaseException), results[0]
    assert not isinstance(results[1], BaseException), results[1]

    rank0, rank1 = nodes
    assert rank0.logs[0]["text"].startswith(
        "distributed: torchrun --nnodes=2 --node-rank=0 --master-addr=127.0.0.1 "
        f"--master-port={port} --nproc_per_node=1 (gloo)"
    )
    assert rank1.logs[0]["text"].startswith("distributed: torchrun --nnodes=2 --node-rank=1")
    # only rank 0 reports: metrics, checkpoints, outputs and the result
    assert [m["step"] for m in rank0.metrics if m["phase"] == "train"] == list(range(1, STEPS + 1))
    assert set(rank0.checkpoints) == {"checkpoint-8", "checkpoint-16"}
    assert not rank1.metrics and not rank1.checkpoints and not rank1.outputs and results[1] == {}

    # the same run as one process, up to the order of fp32 sums
    assert max_abs_diff(final_adapter(single), final_adapter(rank0)) < DDP_VS_SINGLE_ATOL
    assert train_losses(rank0) == pytest.approx(train_losses(single), rel=1e-4)
    assert results[0]["tokens_processed"] == single_result["tokens_processed"]
