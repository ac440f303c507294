"""Training configuration: plain dataclasses read from one JSON file (`fundusrt train CONFIG`).

Relative paths in the file are taken relative to the current directory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fundusrt.config import ModelConfig, from_dict

METHODS = ("lora", "full")
PART_MODES = ("frozen", "full", "lora")
BAD_SAMPLE_POLICIES = ("skip", "error")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BASE_DTYPES = ("auto", "fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "nf4")
STRATEGIES = ("ddp", "fsdp")
BACKENDS = ("auto", "nccl", "gloo")
# Decoder projections of Qwen2/Llama (q,k,v,o,gate,up,down) and Phi-3 (fused qkv, gate_up).
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                       "qkv_proj", "gate_up_proj")


@dataclass
class DataConfig:
    """Instruction data.

    Attributes:
        train: LLaVA JSON or InternVL JSONL files.
        eval: held-out files whose loss is logged at the end of each epoch.
        image_root: folder image paths are relative to (default: the folder of each data file).
        max_seq_len: samples whose prompt + answers exceed it are bad samples.
        on_bad_sample: "skip" (report each with file and line, train on the rest) or "error" (stop at the first).
        max_bad_fraction: with "skip", stop before training when more than this fraction of samples is bad.
        cache_dir: where preprocessed tiles are cached as .npy (default: OUTPUT_DIR/cache).
    """

    train: list[str]
    eval: list[str] = field(default_factory=list)
    image_root: str | None = None
    max_seq_len: int = 2048
    on_bad_sample: str = "skip"
    max_bad_fraction: float = 0.05
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.train, str) or not self.train:
            raise ValueError("data.train must be a non-empty list of LLaVA JSON / InternVL JSONL files")
        if self.on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"data.on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {self.on_bad_sample!r}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be within 0-1, got {self.max_bad_fraction}")
        if self.max_seq_len < 8:
            raise ValueError(f"data.max_seq_len must be at least 8, got {self.max_seq_len}")


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (peft). `target_modules` are module-name suffixes inside the decoder layers."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DECODER_PROJECTIONS))

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0:
            raise ValueError(f"lora.r must be >= 1 and lora.alpha > 0, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be within [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty")


@dataclass
class DistributedConfig:
    """How ranks started by `torchrun` share the work (a plain `fundusrt train` runs as one rank).

    Attributes:
        strategy: "ddp" (every rank holds the whole model; gradients all-reduced) or "fsdp" (FSDP2
            `fully_shard`: parameters, gradients and optimizer state sharded over the ranks).
        backend: torch.distributed backend; "auto" is nccl on GPUs, gloo on CPUs.
    """

    strategy: str = "ddp"
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"distributed.backend must be one of {BACKENDS}, got {self.backend!r}")


@dataclass
class TrainConfig:
    """A training run.

    Attributes:
        output_dir: checkpoints, metrics.jsonl, bad_samples.jsonl, adapter/ and merged/ go here.
        data: the instruction data.
        base: a checkpoint directory to fine-tune (any layout `fundusrt.models.load` reads).
        init_model: instead of `base`, a ModelConfig dict to train from scratch (text.config.vocab_size
            is set from the tokenizer); needs method "full".
        tokenizer_vocab_size: with init_model: size of the model's own byte-level BPE tokenizer.
        tokenizer_from_data: with init_model: train that tokenizer on the training conversations too (so
            frequent words become single tokens), not only on the built-in ophthalmic corpus.
        method: "lora" (decoder projections) or "full" (every weight).
        lora: LoRA settings, used wherever a part is trained with LoRA.
        connector: with method "lora": "frozen", "full" or "lora".
        vision_blocks: with method "lora": how many of the last vision blocks to train.
        vision_mode: how those blocks train: "full" or "lora".
        vision_warmup_steps: steps training the vision tower and connector on the data's closed questions
            and grounding boxes before the main loop (see fundusrt.training.warmup); for towers trained
            from scratch.
        freeze_vision: keep the vision tower and connector frozen in the main loop (after a warm-up, so
            the decoder learns to read features that stay put).
        lr, weight_decay, max_grad_norm: AdamW settings and gradient clipping (0 disables clipping).
        warmup_steps: linear warm-up steps, then cosine decay to lr * min_lr_ratio.
        batch_size, grad_accum: samples per micro-batch and micro-batches per optimiser step.
        epochs, max_steps: passes over the data, or optimiser steps when max_steps > 0.
        seed: seeds initialisation, data order and dropout.
        grad_checkpointing: recompute activations in the backward pass to save memory (every decoder layer and
            vision block; transformers' activation checkpointing).
        precision: "auto" (bf16 autocast on a GPU that has it, fp16 on other GPUs, fp32 on CPU) or explicit.
            On CPU a 16-bit base still computes in fp32: each frozen weight is upcast as it is used.
        base_dtype: dtype the base weights are held in; "auto" keeps the checkpoint's own (bf16/fp16/fp32),
            so a 16-bit checkpoint is never materialised in fp32. Trained parts are always fp32.
        quantize_base: "nf4" holds the decoder's frozen Linear weights in 4-bit NF4 (bitsandbytes,
            QLoRA); CUDA and method "lora" only.
        distributed: with `torchrun`: {"strategy": "ddp" | "fsdp", "backend": ...}; batch_size is then
            the global micro-batch, split over the ranks, so a run is the same at any world size.
        device: "auto", "cpu" or "cuda".
        threads: torch intra-op threads on CPU (0: torch's default).
        save_every: optimiser steps between resumable checkpoints (0: at each epoch end only).
        keep_checkpoints: how many resumable checkpoints to keep.
        log_every: optimiser steps between progress lines / metrics records.
        resume: continue from the newest checkpoint in output_dir when there is one.
    """

    output_dir: str
    data: DataConfig
    base: str | None = None
    init_model: dict[str, Any] | None = None
    tokenizer_vocab_size: int = 512
    tokenizer_from_data: bool = False
    method: str = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    connector: str = "frozen"
    vision_blocks: int = 0
    vision_mode: str = "full"
    vision_warmup_steps: int = 0
    freeze_vision: bool = False
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    batch_size: int = 4
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0
    seed: int = 0
    grad_checkpointing: bool = False
    precision: str = "auto"
    base_dtype: str = "auto"
    quantize_base: str = "none"
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    device: str = "auto"
    threads: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = True

    def __post_init__(self) -> None:
        # sections may come as JSON objects (dicts) when built by hand
        if isinstance(self.data, dict):
            self.data = from_dict(DataConfig, self.data)
        if isinstance(self.lora, dict):
            self.lora = from_dict(LoraSettings, self.lora)
        if isinstance(self.distributed, dict):
            self.distributed = from_dict(DistributedConfig, self.distributed)
        if (self.base is None) == (self.init_model is None):
            raise ValueError("set exactly one of `base` (a checkpoint to fine-tune) and `init_model` (train from scratch)")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.init_model is not None:
            if self.method != "full":
                raise ValueError("training from scratch (init_model) needs method 'full'")
            self.model_config(self.tokenizer_vocab_size)  # validates the dict now, not after data preparation
        if self.connector not in PART_MODES:
            raise ValueError(f"connector must be one of {PART_MODES}, got {self.connector!r}")
        if self.vision_mode not in ("full", "lora"):
            raise ValueError(f"vision_mode must be 'full' or 'lora', got {self.vision_mode!r}")
        if self.vision_warmup_steps < 0:
            raise ValueError(f"vision_warmup_steps must be >= 0, got {self.vision_warmup_steps}")
        if self.vision_blocks < 0:
            raise ValueError(f"vision_blocks must be >= 0, got {self.vision_blocks}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"base_dtype must be one of {BASE_DTYPES}, got {self.base_dtype!r}")
        if self.quantize_base not in QUANTIZATIONS:
            raise ValueError(f"quantize_base must be one of {QUANTIZATIONS}, got {self.quantize_base!r}")
        if self.quantize_base != "none" and self.method != "lora":
            raise ValueError(f"quantize_base {self.quantize_base!r} (QLoRA) needs method 'lora': a 4-bit base "
                             "cannot be trained itself")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for name in ("batch_size", "grad_accum", "epochs", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "save_every", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}")

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The ModelConfig of `init_model` with the decoder vocabulary set to `vocab_size`."""
        if self.init_model is None:
            raise ValueError("model_config() needs init_model")
        data = json.loads(json.dumps(self.init_model))
        data.setdefault("text", {}).setdefault("config", {})["vocab_size"] = vocab_size
        return ModelConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a JSON object, ignoring unknown keys; raises ValueError naming what is missing."""
        missing = [k for k in ("output_dir", "data") if k not in data]
        if missing:
            raise ValueError(f"training config lacks {missing}")
        if "gradient_checkpointing" in data:  # transformers' spelling would otherwise be ignored silently
            raise ValueError("the training config key is \"grad_checkpointing\", not \"gradient_checkpointing\"")
        return from_dict(cls, data)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a training config JSON file."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read training config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"training config {path} must hold a JSON object")  # noqa: TRY004 (bad file content)
        return cls.from_dict(data)
