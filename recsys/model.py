"""Two towers over a pretrained Hugging Face encoder, and their export.

The query/user tower and the item tower share one encoder by default (the transfer works best
when both sides live in the pretrained space); `separate_towers` gives each side its own copy.
The export opens with plain `transformers` and `sentence-transformers`, no recsys import.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from recsys import storage
from recsys.config import LoraSettings, ModelConfig, StorageConfig
from recsys.encoder import (
    RECSYS_META,
    load_hf_encoder,
    model_identity,
    pool,
    prepare_tokenizer,
    resolve_model_path,
)

log = logging.getLogger(__name__)


ADAPTER_DIR = "adapter"  # inside an exported tower of a LoRA run: the adapter alone (peft)


def apply_lora(encoder: nn.Module, lora: LoraSettings, where: str) -> nn.Module:
    """`encoder` with LoRA adapters (peft) on `lora.target_modules`; every base weight frozen.
    Under ZeRO-3 the base weights are already partitioned (built inside zero.Init); the adapters
    are small and DeepSpeed partitions them with the rest at `initialize`. The projection and
    the temperature live outside the encoder (TwoTower, the loss) and train as plain parameters:
    no peft `modules_to_save`, whose deep copy of a partitioned module is what breaks it under
    ZeRO-3."""
    from peft import LoraConfig, get_peft_model

    linear = {name.rsplit(".", 1)[-1] for name, m in encoder.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in lora.target_modules if t not in linear]
    if missing:
        raise ValueError(
            f"model.lora.target_modules: {missing} are not linear layers of {where}; its linear layers are "
            f"{sorted(linear)}"
        )
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), bias="none")
    return get_peft_model(encoder, config)


def is_lora(encoder: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(encoder, PeftModel)


def _load_encoder(path: str, dtype: torch.dtype | None, mcfg: ModelConfig) -> nn.Module:
    # An unused pooler leaves parameters without gradients, which breaks DDP/ZeRO reduction.
    encoder = load_hf_encoder(path, dtype, keep_pooler=False, attn_implementation=mcfg.attn_implementation)
    if hasattr(encoder.config, "use_cache"):
        encoder.config.use_cache = False  # a decoder would otherwise build a KV cache per forward
    if mcfg.gradient_checkpointing:
        # Non-reentrant: the reentrant variant gives no gradient to parameters inside a
        # checkpointed block when its input does not require one (frozen embeddings under
        # LoRA), so the adapters would never train.
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mcfg.lora is not None:
        encoder = apply_lora(encoder, mcfg.lora, path)
    return encoder


def load_tokenizer(mcfg: ModelConfig) -> Any:
    """The tokenizer every tower input goes through (recsys.encoder.prepare_tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(mcfg.name_or_path))
    return prepare_tokenizer(tok, mcfg.pooling, mcfg.padding_side)


class TwoTower(nn.Module):
    def __init__(self, query_encoder: nn.Module, item_encoder: nn.Module | None, mcfg: ModelConfig) -> None:
        super().__init__()
        self.query_encoder = query_encoder
        # None = shared weights; registering the same module twice would double-count params.
        self.item_encoder = item_encoder
        self.pooling = mcfg.pooling
        self.normalize = mcfg.normalize
        hidden = int(query_encoder.config.hidden_size)
        self.projection = (
            nn.Linear(hidden, mcfg.projection_dim, bias=False) if mcfg.projection_dim > 0 else None
        )

    def _encode(self, encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (batch, seq, hidden)
        emb = pool(hidden, attention_mask, self.pooling)  # (batch, hidden)
        if self.projection is not None:
            emb = self.projection(emb)  # (batch, dim)
        if self.normalize:
            emb = nn.functional.normalize(emb, dim=-1)
        return emb

    def encode_query(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._encode(self.query_encoder, input_ids, attention_mask)  # (batch, dim)

    def encode_item(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        enc = self.item_encoder if self.item_encoder is not None else self.query_encoder
        return self._encode(enc, input_ids, attention_mask)  # (batch, dim)

    def forward(
        self, q_ids: torch.Tensor, q_mask: torch.Tensor, d_ids: torch.Tensor, d_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_query(q_ids, q_mask), self.encode_item(d_ids, d_mask)


def build_two_tower(mcfg: ModelConfig, dtype: torch.dtype | None = None) -> TwoTower:
    path = resolve_model_path(mcfg.name_or_path)
    query = _load_encoder(path, dtype, mcfg)
    item = _load_encoder(path, dtype, mcfg) if mcfg.separate_towers else None
    return TwoTower(query, item, mcfg)


def _write_sentence_transformers(encoder: nn.Module, tokenizer: Any, out: Path, mcfg: ModelConfig, projection: nn.Linear | None, max_tokens: int) -> None:
    """HF weights + tokenizer + the module files sentence-transformers reads. A LoRA tower
    writes its adapter alone to `ADAPTER_DIR` and is then merged into its base weights IN PLACE
    (peft merge_and_unload): the folder holds a plain model."""
    out.mkdir(parents=True, exist_ok=True)
    if is_lora(encoder):
        encoder.save_pretrained(out / ADAPTER_DIR, safe_serialization=True)
        encoder = encoder.merge_and_unload()
    encoder.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    hidden = int(encoder.config.hidden_size)
    modules: list[dict[str, Any]] = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": hidden,
                "pooling_mode_cls_token": mcfg.pooling == "cls",
                "pooling_mode_mean_tokens": mcfg.pooling == "mean",
                "pooling_mode_lasttoken": mcfg.pooling == "last",
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            },
            indent=2,
        )
    )
    if projection is not None:
        from safetensors.torch import save_file

        dense = out / "2_Dense"
        dense.mkdir(exist_ok=True)
        (dense / "config.json").write_text(
            json.dumps(
                {
                    "in_features": hidden,
                    "out_features": projection.out_features,
                    "bias": False,
                    "activation_function": "torch.nn.modules.linear.Identity",
                }
            )
        )
        save_file({"linear.weight": projection.weight.detach().float().contiguous()}, str(dense / "model.safetensors"))
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    if mcfg.normalize:
        idx = len(modules)
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out / f"{idx}_Normalize").mkdir(exist_ok=True)
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_tokens, "do_lower_case": False}))
    (out / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": mcfg.query_prefix, "document": mcfg.item_prefix}, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    )


def export_model(
    model: TwoTower, tokenizer: Any, mcfg: ModelConfig, cfg_dict: dict[str, Any], out_dir: str | Path,
    storage_cfg: StorageConfig | None = None, training: dict[str, Any] | None = None,
) -> str:
    """Write the consolidated model to `out_dir` (local path or object-store URI), replacing
    whatever an earlier export left there: a sentence-transformers folder (HF weights inside) per
    tower, and RECSYS_META with the settings and the model's identity `model_id`.

    Call on one process with full (gathered, fp32) parameters. Returns `out_dir` as a string.
    LoRA towers are merged into their base weights in place (their adapter is written first).
    `training`: what the metadata records of how these weights were chosen (the best
    validation step), outside the model's identity.
    """
    with tempfile.TemporaryDirectory(prefix="recsys-export-") as tmp:
        model_id = _write_export(model, tokenizer, mcfg, cfg_dict, Path(tmp), training)
        storage.replace_dir(tmp, str(out_dir), storage_cfg, marker=RECSYS_META)
    log.info("exported model %s to %s", model_id, out_dir)
    return str(out_dir)


def _write_export(model: TwoTower, tokenizer: Any, mcfg: ModelConfig, cfg_dict: dict[str, Any], out: Path,
                  training: dict[str, Any] | None = None) -> str:
    if mcfg.separate_towers and model.item_encoder is not None:
        _write_sentence_transformers(model.query_encoder, tokenizer, out / "query", mcfg, model.projection, mcfg.max_query_tokens)
        _write_sentence_transformers(model.item_encoder, tokenizer, out / "item", mcfg, model.projection, mcfg.max_item_tokens)
    else:
        # One folder serves both sides; item length is the common default for ST users.
        _write_sentence_transformers(model.query_encoder, tokenizer, out, mcfg, model.projection, mcfg.max_item_tokens)
    # The projection lives once per tower, in the sentence-transformers Dense module
    # (2_Dense/model.safetensors), which TextEncoder reads when projection_dim > 0.
    meta: dict[str, Any] = {
        "pooling": mcfg.pooling,
        "normalize": mcfg.normalize,
        "max_query_tokens": mcfg.max_query_tokens,
        "max_item_tokens": mcfg.max_item_tokens,
        "query_prefix": mcfg.query_prefix,
        "item_prefix": mcfg.item_prefix,
        "separate_towers": mcfg.separate_towers,
        "user_history_items": mcfg.user_history_items,
        "projection_dim": mcfg.projection_dim,
        "base_model": mcfg.name_or_path,
    }
    if mcfg.lora is not None:  # only then: ids of exports without LoRA stay what they were
        meta["lora"] = {**mcfg.lora.model_dump(mode="json"), "adapter": ADAPTER_DIR}
    # Over the weights just written and the settings, not the training config: re-exporting the
    # same weights gives the same id, any change to them a new one.
    meta["model_id"] = model_identity(out, meta)
    if training:
        meta["training"] = training
    (out / RECSYS_META).write_text(json.dumps(meta, indent=2))
    (out / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    return str(meta["model_id"])
