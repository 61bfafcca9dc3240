"""The gradient cache (recsys/train_step.py) under real DeepSpeed ZeRO 2 and 3, on 1 and 2 workers.

Each case trains one optimizer step twice from the same weights and the same RNG state: once
with the contrastive batch in one graph (every micro-batch encoded with a graph, one loss, one
backward) and once with the gradient cache (micro-batches encoded without a graph, the loss's
gradient w.r.t. the embeddings cached, each micro-batch re-encoded and back-propagated as one
engine micro-step). The optimizer is plain SGD without clipping, so the parameter change is the
gradient itself and the two must agree to fp32 rounding: max |diff| <= 1e-4 x max |change|.
Dropout stays on (the tiny BERT's 0.1): the cache replays each micro-batch's RNG state.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recsys.storage import free_port

ROWS, MICRO, HARD = 8, 2, 2  # rows per worker per contrastive batch, rows per micro-batch, hard negatives per row
CASES = ((2, 1), (3, 2))  # (ZeRO stage, contrastive batches per optimizer step)
TOLERANCE = 1e-4


def _batch(rank: int, accum: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * accum + rank)

    def texts(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.randint(3, 11, (n,), generator=g)
        ids = torch.randint(1000, 2000, (n, 10), generator=g)
        mask = (torch.arange(10)[None, :] < lengths[:, None]).long()
        return ids * mask, mask

    q_ids, q_mask = texts(ROWS)
    d_ids, d_mask = texts(ROWS)
    h_ids, h_mask = texts(ROWS * HARD)
    keys = torch.arange(ROWS) + 100 * rank + 1000 * accum
    history = torch.full((ROWS, 2), -1)
    history[0, 0] = keys[1]  # an accidental hit to mask
    return {
        "q_ids": q_ids, "q_mask": q_mask, "d_ids": d_ids, "d_mask": d_mask, "h_ids": h_ids, "h_mask": h_mask,
        "weights": torch.rand(ROWS, generator=g) + 0.5, "item_keys": keys, "dup_keys": keys.clone(),
        "group_keys": torch.arange(ROWS) + 50 * rank, "history_keys": history,
        "logq": torch.rand(ROWS, generator=g).log(), "h_logq": torch.rand(ROWS, HARD, generator=g).log(),
    }


def _one_graph(engine, module, b) -> None:  # noqa: ANN001
    """The reference: the contrastive batch's loss in one graph, one backward, one micro-step."""
    from recsys.train_step import micro_batches

    parts = [engine(c, mode="embed") for c in micro_batches(b, MICRO)]
    q, d, h = (torch.cat([p[i] for p in parts]) for i in range(3))
    loss = module.loss_on(q, d, h, b)
    engine.backward(loss)
    engine.step()


def _flat(module, stage: int) -> torch.Tensor:  # noqa: ANN001
    import deepspeed

    params = list(module.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            return torch.cat([p.detach().float().flatten().clone() for p in params])
    return torch.cat([p.detach().float().flatten().clone() for p in params])


def _worker(rank: int, world: int, port: int, model: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    from recsys.config import Config
    from recsys.losses import SampledSoftmaxLoss
    from recsys.model import build_two_tower
    from recsys.train import deepspeed_config
    from recsys.train_step import TrainStep, contrastive_step

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    found = {}
    for stage, accum in CASES:
        for cached in (False, True):
            cfg = Config()
            cfg.model.name_or_path = model
            cfg.train.zero_stage, cfg.train.grad_accum = stage, accum
            cfg.train.batch_size, cfg.train.contrastive_batch = (MICRO, ROWS) if cached else (ROWS, 0)
            torch.manual_seed(0)
            module = TrainStep(build_two_tower(cfg.model), SampledSoftmaxLoss(0.1, learn_temperature=True))
            before = _flat(module, 0)
            assert module.towers.query_encoder.training, "the encoders train with dropout"
            # No clipping: a clipped norm would hide a gradient off by a constant factor.
            ds = {**deepspeed_config(cfg), "gradient_clipping": 0.0}
            engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.5), config=ds)
            for a in range(accum):
                b = _batch(rank, a)
                torch.manual_seed(7 + a)  # the same dropout masks in both runs
                if cached:
                    contrastive_step(engine, module, b, MICRO)
                else:
                    _one_graph(engine, module, b)
            assert engine.global_steps == 1, (stage, cached, engine.global_steps)
            found[(stage, cached)] = _flat(module, stage) - before
            with torch.no_grad():
                found[(stage, cached, "temperature")] = float(module.loss.temperature)
            engine.destroy()
    if rank == 0:
        torch.save(found, out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip torch's teardown (see tests/test_losses.py: a joinable-thread SIGABRT)


@pytest.mark.parametrize("world", [1, 2])
def test_the_gradient_cache_update_equals_the_one_graph_update_under_zero_2_and_3(world, tiny_model, tmp_path) -> None:
    out = str(tmp_path / "deltas.pt")
    mp.spawn(_worker, args=(world, free_port(), tiny_model, out), nprocs=world, join=True)
    found = torch.load(out)
    for stage, _ in CASES:
        ref, got = found[(stage, False)], found[(stage, True)]
        scale = ref.abs().max().item()
        assert scale > 1e-3, f"ZeRO-{stage}: the step changed nothing"
        err = (got - ref).abs().max().item()
        assert err <= TOLERANCE * scale, f"ZeRO-{stage}, {world} worker(s): max |diff| {err:.3g} vs max |change| {scale:.3g}"
        assert found[(stage, True, "temperature")] == pytest.approx(found[(stage, False, "temperature")], rel=1e-5, abs=1e-7)
        assert found[(stage, True, "temperature")] != pytest.approx(0.1, abs=1e-7), "the temperature got no gradient"


@pytest.mark.parametrize("dropout", [True, False])
def test_the_encoders_train_with_dropout_unless_it_is_switched_off(dropout, tiny_model) -> None:
    from recsys.config import ModelConfig
    from recsys.losses import SampledSoftmaxLoss
    from recsys.model import build_two_tower
    from recsys.train_step import TrainStep

    step = TrainStep(build_two_tower(ModelConfig(name_or_path=tiny_model)), SampledSoftmaxLoss(gather=False), dropout=dropout)
    ids = torch.randint(1000, 2000, (4, 8))
    mask = torch.ones_like(ids)
    for _ in range(2):  # also after an evaluation's eval() / train() round trip
        assert step.towers.query_encoder.training is dropout
        torch.manual_seed(0)
        a = step.towers.encode_query(ids, mask)
        b = step.towers.encode_query(ids, mask)
        assert torch.equal(a, b) is not dropout  # dropout on: two passes differ
        step.eval()
        step.train()
