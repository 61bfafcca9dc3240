"""bench.gpu_throughput on CPU: the smoke run end to end (the production engine and step, the
table, the JSON), the sweep's out-of-memory handling, the FLOPs formula and the peak table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu_throughput import (
    PEAK_BF16,
    encoder_shape,
    peak_bf16,
    sweep,
    synthetic_batch,
    train_flops,
)

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_prints_the_table_and_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RECSYS_CACHE": str(tmp_path / "cache")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a single process: the bench sets its own
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_throughput", "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "model | batch/dev | ms/step | examples/s | tokens/s | TFLOP/s/dev | MFU" in proc.stdout
    assert "p50 ms | p99 ms" in proc.stdout
    result = json.loads(out.read_text())
    assert result["hardware"]["torch"] == torch.__version__ and result["hardware"]["deepspeed"]
    train = result["train"]
    assert [(r["model"], r["batch_per_device"], r["status"]) for r in train] == [("tiny", 4, "ok"), ("tiny", 8, "ok")]
    for r in train:
        assert r["ms_per_step"] > 0 and r["examples_per_s"] > 0 and r["loss_finite"]
        assert r["mfu"] is None  # CPU: no bf16 tensor-core peak to compare with
        # The model FLOPs of the step the bench says it timed (16 + 16 tokens a row).
        assert math.isclose(r["model_tflops_per_step_per_device"] * 1e12,
                            train_flops(r["non_embedding_params"], r["layers"], r["hidden"], r["batch_per_device"], (16, 16)))
    assert all(line.split(" | ")[6] == "n/a" for line in proc.stdout.splitlines() if line.startswith("tiny | 4 |")
               or line.startswith("tiny | 8 |"))
    serve = result["serve"]
    assert [(r["model"], r["dtype"], r["batch"], r["status"]) for r in serve] == [("tiny", "fp32", 1, "ok"), ("tiny", "fp32", 32, "ok")]
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in serve)


@pytest.mark.slow
def test_two_ranks_under_torchrun_gather_each_others_items(tmp_path: Path) -> None:
    """torchrun with 2 processes (gloo): the loss's negatives are both ranks' rows. A random
    tiny model's loss is about log(candidates): log 8 for 4 rows a rank gathered, log 4 if not."""
    out = tmp_path / "two.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RECSYS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "bench.gpu_throughput", "--smoke", "--no-serve", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = json.loads(out.read_text())["train"]
    assert [(r["batch_per_device"], r["status"], r["world"]) for r in train] == [(4, "ok", 2), (8, "ok", 2)]
    assert train[0]["examples_per_s"] == pytest.approx(2 * 4 / (train[0]["ms_per_step"] / 1e3))
    assert train[0]["first_loss"] > math.log(6), train[0]["first_loss"]  # 8 candidates, not 4


def test_sweep_reports_an_out_of_memory_and_goes_on() -> None:
    def measure(p: int) -> dict[str, int]:
        if p == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if p == 3:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")
        if p == 4:
            raise ValueError("contrastive_batch (10) is split into micro-batches")
        return {"value": p * 10}

    rows = list(sweep([1, 2, 3, 4, 5], measure, expired=lambda: False))
    assert [r["status"] for r in rows] == ["ok", "OOM", "OOM", "error: ValueError: contrastive_batch (10) is split into micro-batches", "ok"]
    assert rows[-1]["value"] == 50 and rows[0]["point"] == 1
    skipped = list(sweep([1, 2], measure, expired=lambda: True))
    assert [r["status"] for r in skipped] == ["skipped: time budget spent"] * 2


def test_bert_base_flops() -> None:
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(BertConfig(), add_pooling_layer=False)
    n, layers, hidden = encoder_shape(model)
    # Per layer: QKV + output 4 * (768^2 + 768), FFN 768 * 3072 + 3072 + 3072 * 768 + 768, 2 LayerNorms 2 * 1536.
    assert (n, layers, hidden) == (12 * (4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 2 * 1536), 12, 768) == (85_054_464, 12, 768)
    one_seq = 6 * n * 32 + 12 * 12 * 768 * 32**2
    assert train_flops(n, layers, hidden, rows=256, seq_lens=(32, 32)) == 256 * 2 * one_seq


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L4", 121e12), ("NVIDIA A10G", 125e12),
    ("NVIDIA L40S", None), ("Tesla T4", None),
])
def test_peak_table(name: str, peak: float | None) -> None:
    assert peak_bf16(name) == peak
    assert peak_bf16(name, override_tflops=500) == 500e12
    assert len(PEAK_BF16) == len({p for p, _ in PEAK_BF16})


def test_synthetic_rows_are_each_others_negatives() -> None:
    """No key of one row matches another row's (nothing masked), on either rank: every other row,
    both ranks', is a negative, as the FLOPs and the gathered loss assume."""
    from recsys.losses import SampledSoftmaxLoss

    a, b = synthetic_batch(8, 5, 7, vocab=30522, seed=1), synthetic_batch(8, 5, 7, vocab=30522, seed=2)
    assert a["q_ids"].shape == (8, 5) and a["d_ids"].shape == (8, 7) and bool(a["q_mask"].all())
    keys = torch.cat([x[k].flatten() for x in (a, b) for k in ("item_keys", "group_keys", "history_keys")])
    assert keys.unique().numel() == keys.numel()
    q = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    loss = SampledSoftmaxLoss()(q, q, weights=a["weights"], item_keys=a["item_keys"], dup_keys=a["dup_keys"],
                                history_keys=a["history_keys"], logq=a["logq"], group_keys=a["group_keys"])
    assert math.isfinite(float(loss)) and float(loss) > 0
