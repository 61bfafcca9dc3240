"""The sequence user tower: its loss, its model, its export, and its Ray Train job end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recsys.config import load_config
from recsys.losses import full_softmax_loss
from recsys.sequence import SequenceTower, has_sequence_tower, load_sequence_tower
from tests.conftest import TINY_SEQUENCE

REPO = Path(__file__).resolve().parents[1]


def test_full_softmax_masks_history_and_duplicates_but_never_the_target() -> None:
    torch.manual_seed(0)
    u = F.normalize(torch.randn(3, 8), dim=-1)
    items = F.normalize(torch.randn(6, 8), dim=-1)
    items[1], items[3] = u[0], u[1]  # the masked items would be rows 0's and 1's best negatives
    target = torch.tensor([0, 2, 4])
    items[5] = u[1]
    masked = torch.tensor([[1, 0, -1], [5, -1, -1], [-1, -1, -1]])  # row 0's history holds its target
    dup = torch.tensor([0, 1, 2, 2, 3, 4])  # rows 2 and 3 are near-duplicates (3 is in no history)
    got = full_softmax_loss(u, items, target, 0.1, masked=masked, dup_rows=dup)
    logits = u @ items.T / 0.1
    keep = torch.ones(3, 6, dtype=torch.bool)
    keep[0, 1] = False  # history, not the target
    keep[1, 5] = False  # history
    keep[1, 3] = False  # the target's near-duplicate
    want = torch.stack([-(logits[r, target[r]] - torch.logsumexp(logits[r][keep[r]], 0)) for r in range(3)]).mean()
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, F.cross_entropy(logits, target), atol=1e-3)  # the masks changed it


@torch.no_grad()
def test_tower_reads_order_and_ignores_padding_and_empty_rows() -> None:
    torch.manual_seed(0)
    tower = SequenceTower(TINY_SEQUENCE, 12, 5).eval()
    table = torch.randn(6, 16)
    a = tower.encode_user(table, torch.tensor([[1, 2, -1, -1]]))
    b = tower.encode_user(table, torch.tensor([[1, 2]]))
    assert torch.allclose(a, b, atol=1e-5)  # padding changes nothing
    c = tower.encode_user(table, torch.tensor([[2, 1]]))
    assert not torch.allclose(a, c, atol=1e-3)  # positions: the newest item matters most
    empty = tower.encode_user(table, torch.tensor([[-1, -1]]))
    assert torch.isfinite(empty).all() and float(empty.abs().sum()) == 0.0
    causal = SequenceTower({**TINY_SEQUENCE, "attention": "causal"}, 12, 5).eval()
    out = causal.encode_user(table, torch.tensor([[1, 2, 3], [1, 2, 4], [4, -1, -1], [-1, -1, -1]]))
    assert torch.isfinite(out).all()
    # Newest first: the newest position (the user) sees the older items, so the oldest counts.
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_an_item_without_id_ranks_by_its_text() -> None:
    torch.manual_seed(0)
    tower = SequenceTower(TINY_SEQUENCE, 12, 3).eval()
    text = torch.randn(4, 12)
    with_id = tower.item_vectors(text, torch.tensor([1, 2, 3, 0]))
    text_only = tower.item_vectors(text, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(with_id[3], text_only[3])  # the cold item: text alone
    assert not torch.allclose(with_id[0], text_only[0])


@pytest.fixture(scope="module")
def prepared(ray_cluster, s3_server, tiny_model):
    from recsys.data import prepare

    cfg = load_config(REPO / "jobs/configs/train_tiny.yaml", [
        f"model.name_or_path={tiny_model}", "model.user_tower=sequence", "model.item_id_embeddings=true",
        "sequence.ffn_dim=32", "sequence.max_epochs=3", "sequence.patience=5",
        "sequence.batch_size=32", "sequence.cpus_per_worker=1", "train.run_name=seq",
    ])
    cfg.storage = s3_server.storage_config("s3://test/sequence")
    prepare.run(cfg)
    return cfg


def test_sequence_job_trains_exports_and_evaluates(prepared, tmp_path) -> None:
    from recsys import evaluate, paths, storage, train
    from recsys.train_sequence import SequenceExamples

    out = train.run(prepared)
    assert out["user_tower"] == "sequence" and out["epochs"] == 3 and out["trainable_parameters"] > 0
    local = storage.download_dir(paths.export_dir(prepared), tmp_path / "export", prepared.storage)
    assert has_sequence_tower(local)
    meta = json.loads((local / "recsys_model.json").read_text())
    assert meta["user_tower"] == "sequence" and meta["model_id"] == out["model_id"]
    model = load_sequence_tower(local)
    assert model.tower.ids is not None and len(model.id_of) > 0

    # The sentence-transformers item encoder beside it still loads as before.
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(local)).encode(["a thing"]).shape[0] == 1

    report = evaluate.run(prepared.model_copy(update={"eval": prepared.eval.model_copy(update={"systems": ["popularity", "fine_tuned"]})}))
    m = report["metrics"]["fine_tuned"]
    assert "test/next_item/ndcg@10" in m and "test/search/ndcg@10" in m
    # The report's next-item ranking is the sequence tower's: recompute it directly.
    items = evaluate._items(prepared)
    ids = items.column("item_id").to_pylist()
    emb = np.stack([np.asarray(v, np.float32) for v in evaluate._read_dir(paths.embeddings(prepared), prepared).column("embedding").to_pylist()])
    ex = SequenceExamples.from_table(evaluate._read_dir(paths.examples(prepared, "next_item", "test"), prepared), ids, model.max_len)
    from recsys.metrics import average, per_query_metrics

    direct = average(per_query_metrics(ex.rank(model, emb, ids, 10), ex.relevant(ids), [10]), "test/next_item")
    assert abs(direct["test/next_item/ndcg@10"] - m["test/next_item/ndcg@10"]) < 1e-6


# Four more runs (~75 s): slow. The joint stage's training runs by default without Ray below.
@pytest.mark.slow
def test_sequence_job_resumes_goes_on_jointly_and_starts_afresh_for_other_settings(prepared, tmp_path) -> None:
    from sentence_transformers import SentenceTransformer

    from recsys import paths, storage, train

    train.run(prepared)  # done already when the test above ran first: it resumes and stops at once
    local = storage.download_dir(paths.export_dir(prepared), tmp_path / "export", prepared.storage)
    # A second run with more epochs resumes after the third, from the Ray Train checkpoint, and
    # goes on end to end (the item tower's encoder fine-tuned jointly) for 4 steps.
    more = prepared.model_copy(update={
        "sequence": prepared.sequence.model_copy(update={"max_epochs": 4, "joint_steps": 4, "joint_refresh_every": 2,
                                                         "joint_batch_size": 8, "joint_lr": 1e-3}),
        "train": prepared.train.model_copy(update={"task": "next_item"})})
    again = train.run(more)
    assert again["epochs"] == 4 and again["resumed_from_epoch"] == 3
    assert again["joint_steps"] == 4 and again["joint_trainable_parameters"] > again["trainable_parameters"]
    local2 = storage.download_dir(paths.export_dir(more), tmp_path / "export2", more.storage)
    meta2 = json.loads((local2 / "recsys_model.json").read_text())
    st_base, st_new = SentenceTransformer(str(local)).encode(["a thing"]), SentenceTransformer(str(local2)).encode(["a thing"])
    if again["joint_improved"]:  # the export's item tower is the jointly fine-tuned encoder
        assert meta2["sequence_joint_best_step"] == again["joint_best_step"] > 0 and not np.allclose(st_base, st_new, atol=1e-5)
        assert meta2["sequence_item_tower"] == "base+joint"
    else:  # the frozen stage's tower over the unchanged item tower
        assert meta2["sequence_joint_best_step"] == 0 and np.allclose(st_base, st_new, atol=1e-6)
    # The same run re-submitted frozen only: the joint checkpoint is not the export's item tower.
    frozen = more.model_copy(update={"sequence": more.sequence.model_copy(update={"joint_steps": 0})})
    assert "joint_steps" not in train.run(frozen)
    local3 = storage.download_dir(paths.export_dir(frozen), tmp_path / "export3", frozen.storage)
    assert json.loads((local3 / "recsys_model.json").read_text())["sequence_joint_best_step"] == 0
    assert np.allclose(st_base, SentenceTransformer(str(local3)).encode(["a thing"]), atol=1e-6)
    with pytest.raises(ValueError, match="train.task=next_item"):
        train.run(more.model_copy(update={"train": prepared.train}))
    # Other settings: that checkpoint is not this config's tower, so it starts afresh.
    other = more.model_copy(update={"sequence": more.sequence.model_copy(update={"temperature": 0.2, "max_epochs": 1})})
    assert train.run(other)["resumed_from_epoch"] == 0


def test_the_saved_tower_loads_in_plain_torch_and_agrees(tmp_path) -> None:
    from recsys.sequence import PROGRAM_FILE, SEQUENCE_DIR, save_sequence_tower

    torch.manual_seed(0)
    tower = SequenceTower(TINY_SEQUENCE, 12, 4)
    save_sequence_tower(tower, {"a": 1, "b": 2, "c": 3, "d": 4}, tmp_path / SEQUENCE_DIR)
    (tmp_path / "recsys_model.json").write_text("{}")
    ours = load_sequence_tower(tmp_path)
    plain = torch.export.load(str(tmp_path / SEQUENCE_DIR / PROGRAM_FILE)).module()
    ids = ["a", "b", "c", "d", "cold"]
    emb = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
    hist = torch.tensor([[4, 0, 2, -1, -1], [1, -1, -1, -1, -1], [-1, -1, -1, -1, -1]])
    with torch.no_grad():
        users, items = plain(torch.from_numpy(emb), ours.id_rows(ids), hist)
    assert np.allclose(items.numpy(), ours.item_vectors(emb, ids), atol=1e-5)
    assert np.allclose(users.numpy(), ours.encode_users([[4, 0, 2], [1], []], emb, ids), atol=1e-5)
    with torch.no_grad():  # one user, as in the README
        one, _ = plain(torch.from_numpy(emb), ours.id_rows(ids), torch.tensor([[1, 0, -1]]))
    assert np.allclose(one.numpy(), ours.encode_users([[1, 0]], emb, ids), atol=1e-5)


def test_early_stopping_keeps_the_best_epoch_and_a_stopped_run_stays_stopped() -> None:
    from recsys.config import SequenceConfig
    from recsys.train_sequence import SequenceExamples, fit

    rng = np.random.default_rng(0)
    n_items, ids = 12, [f"i{k}" for k in range(12)]
    hist = np.full((40, 4), -1, dtype=np.int64)
    hist[:, :2] = rng.integers(0, n_items, size=(40, 2))
    train = SequenceExamples(hist, rng.integers(0, n_items, size=40), np.ones(40, np.float32))
    valid = SequenceExamples(hist[:10], rng.integers(0, n_items, size=10), np.ones(10, np.float32))
    emb = rng.normal(size=(n_items, 12)).astype(np.float32)
    tower = {k: v for k, v in TINY_SEQUENCE.items() if k != "item_ids"}  # that one is model.item_id_embeddings
    scfg = SequenceConfig(**{**tower, "max_len": 4, "max_epochs": 30, "patience": 1, "batch_size": 8, "lr": 0.05})
    states: list[dict] = []
    model, hist_out = fit(scfg, train, emb, ids, np.arange(n_items), valid=valid, on_epoch=lambda r, st: states.append(copy.deepcopy(st)))
    best = hist_out["best_epoch"]
    assert hist_out["epochs"] == best + 2 < 30  # stopped one epoch after the best
    for k, v in model.tower.state_dict().items():
        assert torch.equal(v, states[best]["tower"][k]), k  # the best epoch's weights, not the last
    again, h2 = fit(scfg, train, emb, ids, np.arange(n_items), valid=valid, state=states[-1])
    assert h2["epochs"] == hist_out["epochs"]  # nothing trained on a re-run of a finished run


def _rule_data(n_items: int = 30, rows: int = 400, seed: int = 0):
    """Histories whose next item is always the newest item + 1: learnable by any tower."""
    from recsys.train_sequence import SequenceExamples

    rng = np.random.default_rng(seed)
    hist = np.full((rows, 4), -1, dtype=np.int64)
    hist[:, 0] = rng.integers(0, n_items, size=rows)
    hist[:, 1] = (hist[:, 0] - 1) % n_items
    target = (hist[:, 0] + 1) % n_items
    return SequenceExamples(hist, target, np.ones(rows, np.float32)), rng.normal(size=(n_items, 12)).astype(np.float32)


def test_sampled_softmax_path_trains_when_the_catalog_is_too_big_for_a_full_one() -> None:
    """Past sequence.full_softmax_max_items the loss is the in-batch sampled softmax with logQ:
    another loss on the same batch, and it still learns the rule."""
    from recsys.config import SequenceConfig
    from recsys.train_sequence import fit, step_loss

    train, emb = _rule_data()
    valid, _ = _rule_data(rows=60, seed=1)
    ids = [f"i{k}" for k in range(len(emb))]
    tower = {k: v for k, v in TINY_SEQUENCE.items() if k != "item_ids"}
    base = {**tower, "max_len": 4, "max_epochs": 12, "patience": 12, "batch_size": 64, "lr": 0.01}
    full, sampled = SequenceConfig(**base), SequenceConfig(**base, full_softmax_max_items=len(ids) - 1)
    torch.manual_seed(0)
    t = SequenceTower({**TINY_SEQUENCE, "item_ids": False}, 12, 0).eval()
    b = next(iter(train.batches(64, 0)))
    args = (torch.from_numpy(emb), torch.zeros(len(ids), dtype=torch.long), torch.arange(len(ids)))
    assert not torch.allclose(step_loss(t, b, *args, full), step_loss(t, b, *args, sampled))
    _, h = fit(sampled, train, emb, ids, np.arange(len(ids)), valid=valid)
    assert h["best"] > 0.8, h["rows"]  # a random ranking of 30 items scores ~0.2


def test_validation_excludes_history_only_when_asked() -> None:
    from recsys.sequence import SequenceModel
    from recsys.train_sequence import SequenceExamples

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(6, 12)).astype(np.float32)
    ids = [f"i{k}" for k in range(6)]
    torch.manual_seed(0)
    model = SequenceModel(SequenceTower({**TINY_SEQUENCE, "item_ids": False}, 12, 0), {})
    ex = SequenceExamples(np.array([[0, 1, 2, -1], [3, 4, -1, -1]]), np.array([5, 0]), np.ones(2, np.float32))
    kept = ex.rank(model, emb, ids, 6)
    assert all(len(r) == 6 for r in kept)  # the papers' protocol: history items rank too
    dropped = ex.rank(model, emb, ids, 6, exclude_history=True)
    assert set(dropped[0]).isdisjoint({"i0", "i1", "i2"}) and set(dropped[1]).isdisjoint({"i3", "i4"})


def test_a_tower_setting_that_keeps_the_weights_shapes_still_changes_the_model_id(tmp_path, tiny_model, attach_random_tower) -> None:
    """Causal and bidirectional towers have the same weights but rank differently: serving must
    see two models."""
    from recsys.config import ModelConfig
    from recsys.model import build_two_tower, export_model, load_tokenizer

    mcfg = ModelConfig(name_or_path=tiny_model)
    torch.manual_seed(0)
    model = build_two_tower(mcfg)
    got = []
    for attention in ("bidirectional", "causal"):
        export_model(model, load_tokenizer(mcfg), mcfg, {}, tmp_path / attention)
        got.append(attach_random_tower(tmp_path / attention, ["a", "b", "c"], seed=0, attention=attention))
    assert got[0] != got[1]


def test_the_joint_stage_fine_tunes_the_encoder_and_keeps_the_frozen_result_unless_beaten(tiny_model) -> None:
    """End to end in process: the encoder's weights move, every validation is logged, and only a
    validation above the baseline replaces the frozen stage's model."""
    from recsys.config import ModelConfig, SequenceConfig
    from recsys.features import ItemTokens
    from recsys.model import build_two_tower, load_tokenizer
    from recsys.sequence import SequenceModel
    from recsys.sequence_joint import embed_all, fit_joint

    train, _ = _rule_data(n_items=12, rows=64)
    valid, _ = _rule_data(n_items=12, rows=16, seed=1)
    ids = [f"i{k}" for k in range(12)]
    texts = [f"item number {k} of colour {'red blue green'.split()[k % 3]}" for k in range(12)]
    mcfg = ModelConfig(name_or_path=tiny_model, max_item_tokens=16)
    tokens = ItemTokens(texts, load_tokenizer(mcfg), mcfg)
    tower_settings = {k: v for k, v in TINY_SEQUENCE.items() if k != "item_ids"}
    scfg = SequenceConfig(**{**tower_settings, "max_len": 4, "joint_steps": 4, "joint_refresh_every": 2, "joint_batch_size": 16,
                             "joint_lr": 1e-3})
    results = {}
    for name, baseline in (("beats", float("-inf")), ("never", float("inf"))):
        torch.manual_seed(0)
        encoder = build_two_tower(mcfg)
        dim = int(embed_all(encoder, tokens).shape[1])
        model = SequenceModel(SequenceTower({**TINY_SEQUENCE, "dim": 16, "item_ids": False}, dim, 0), {})
        before = {k: v.clone() for k, v in encoder.state_dict().items()}
        tower_before = {k: v.clone() for k, v in model.tower.state_dict().items()}
        got, best_encoder, hist = fit_joint(scfg, model, encoder, tokens, ids, np.arange(12), valid,
                                            lambda ep: train.batches(16, ep), baseline=baseline)
        assert [r["joint_step"] for r in hist["rows"]] == [2, 4] and hist["steps"] == 4
        results[name] = (before, encoder.state_dict(), tower_before, got.tower.state_dict(), best_encoder)
    before, after, _, _, best = results["beats"]
    assert best is not None and any(not torch.equal(before[k], after[k]) for k in before)  # the encoder was trained
    before, after, tower_before, tower_after, best = results["never"]
    assert best is None  # nothing beat the frozen stage: its tower and the encoder are kept as they were
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(tower_before[k], tower_after[k]) for k in tower_before)


def test_the_joint_stage_refuses_what_it_cannot_train_correctly() -> None:
    from recsys.config import Config
    from recsys.sequence_joint import check_joint

    cfg = Config()
    cfg.train.task, cfg.sequence.joint_steps = "next_item", 10
    check_joint(cfg, 1_000)
    for change, message in (
        (lambda c: setattr(c.train, "task", "both"), "train.task=next_item"),
        (lambda c: setattr(c.sequence, "item_tower", "fine_tuned"), "sequence.item_tower=base"),
        (lambda c: setattr(c.model, "projection_dim", 64), "projection_dim=0"),
    ):
        bad = cfg.model_copy(deep=True)
        change(bad)
        with pytest.raises(ValueError, match=message):
            check_joint(bad, 1_000)
    with pytest.raises(ValueError, match="full_softmax_max_items"):
        check_joint(cfg, 200_000)


def test_a_joint_step_encodes_at_most_joint_grad_items_the_targets_first_then_the_newest() -> None:
    """A batch of long histories must not encode batch x max_len items with gradient (the Amazon
    joint run was killed for memory that way)."""
    from recsys.sequence_joint import grad_rows

    target = torch.tensor([10, 11, 10])
    hist = torch.tensor([[1, 2, 3, 4], [5, 6, -1, -1], [1, 7, 8, 9]])  # newest first
    assert grad_rows(target, hist, 100).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    # Cap 5: both targets, then the newest column (1, 5; 1 again), then the next (2, ...).
    assert grad_rows(target, hist, 5).tolist() == [1, 2, 5, 10, 11]
    assert grad_rows(target, hist, 1).tolist() == [10, 11]  # every target, whatever the cap


def test_a_joint_step_reads_the_cache_forward_and_trains_the_encoder_backward(tiny_model) -> None:
    """The forward pass must not let the model tell freshly encoded items from cached ones (with
    the fresh values in it, the Amazon joint run's validation fell from 0.0684 to 0.0388 while its
    training loss fell), and the gradient must still reach the encoder."""
    from recsys.config import ModelConfig
    from recsys.features import ItemTokens
    from recsys.model import build_two_tower, load_tokenizer
    from recsys.sequence_joint import JointStep, embed_all

    mcfg = ModelConfig(name_or_path=tiny_model, max_item_tokens=16)
    tokens = ItemTokens([f"item {k}" for k in range(6)], load_tokenizer(mcfg), mcfg)
    torch.manual_seed(0)
    encoder = build_two_tower(mcfg)
    cache = embed_all(encoder, tokens) + 0.5  # stale: not what the encoder gives now
    tower = SequenceTower({**TINY_SEQUENCE, "item_ids": False}, int(cache.shape[1]), 0).eval()
    hist, rows = torch.tensor([[1, 2], [3, -1]]), torch.tensor([1, 2, 3, 4])
    ids = torch.zeros(6, dtype=torch.long)
    u, items = JointStep(encoder, tower)(cache, ids, hist, *tokens.batch(rows.tolist()), rows)
    want_u, want_items = tower(cache, ids, hist)
    assert torch.allclose(u, want_u, atol=1e-6) and torch.allclose(items, want_items, atol=1e-6)
    (u.sum() + items[rows].sum()).backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in encoder.parameters())
