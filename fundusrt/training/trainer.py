"""The training loop: seeded, resumable, gradient accumulation, cosine schedule with warm-up, progress
lines and a JSONL metrics log; ends by writing the adapter (LoRA) and a merged native checkpoint.

Under torchrun every rank runs this loop on its share of each global micro-batch (see
fundusrt.training.distributed); rank 0 alone writes files, and checkpoints hold full tensors keyed by
parameter name, so a run resumes at any world size."""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fundusrt.manifest import atomic_write_bytes, atomic_write_text
from fundusrt.models import load
from fundusrt.models.layouts import native
from fundusrt.models.lvlm import LVLM
from fundusrt.training import distributed
from fundusrt.training.adapters import merge_adapters, save_adapter, set_trainable, transformer_blocks
from fundusrt.training.base import (
    NAMED_DTYPES,
    base_dtype,
    keep_upcasts_narrow,
    quantize_decoder_nf4,
    remove_upcasts,
    trained_in_fp32,
    upcast_frozen,
)
from fundusrt.training.config import TrainConfig
from fundusrt.training.records import DataIssue, Record, read_records
from fundusrt.training.samples import (
    IGNORE_INDEX,
    Batch,
    Sample,
    apply_bad_sample_policy,
    collate,
    prepare_samples,
)
from fundusrt.training.warmup import warm_up_vision

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
BAD_SAMPLES = "bad_samples.jsonl"
# Keys that may change between a run and its resumption; anything else must match.
RESUMABLE_CHANGES = ("output_dir", "epochs", "max_steps", "save_every", "keep_checkpoints", "log_every", "resume",
                     "threads", "distributed")


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    merged_dir: Path
    adapter_dir: Path | None
    steps: int
    final_loss: float
    model: LVLM = field(repr=False)


def build_model(config: TrainConfig) -> LVLM:
    """The model to train: the base checkpoint, or a fresh seeded model from `init_model`.

    A fresh model gets its own byte-level BPE tokenizer, trained on the built-in ophthalmic corpus
    plus the chat template and the training conversations when `tokenizer_from_data` is set.
    """
    if config.base is not None:
        return load(config.base, dtype=base_dtype(config.base_dtype, config.base))
    from fundusrt.models.chat import CHAT_TEMPLATES
    from fundusrt.models.tokenizer import OPHTHALMIC_CORPUS
    from fundusrt.training.tokenizer import train_tokenizer

    corpus = OPHTHALMIC_CORPUS.splitlines()
    if config.tokenizer_from_data:
        template = config.model_config(config.tokenizer_vocab_size)
        corpus += [part.format(system=template.system_message, content="") for part in
                   CHAT_TEMPLATES[template.chat_template]] * 50
        corpus += [text for file in config.data.train for record in read_records(file, config.data.image_root)
                   if isinstance(record, Record) for turn in record.turns for text in turn]
    tokenizer = train_tokenizer(corpus, config.tokenizer_vocab_size)
    torch.manual_seed(config.seed)
    return LVLM(config.model_config(tokenizer.get_vocab_size()), tokenizer)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lm_loss(model: LVLM, batch: Batch, device: torch.device, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """Next-token cross-entropy summed over the labelled (assistant) tokens of `batch`."""
    ids = batch.input_ids.to(device)
    pixels = None if batch.pixel_values is None else batch.pixel_values.to(device)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        embeds = model.prompt_embeds(ids, pixels)
        logits = model.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask.to(device),
                                      use_cache=False).logits
    targets = batch.labels.to(device)[:, 1:]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def labelled_tokens(batch: Batch) -> int:
    """How many tokens of `batch` the loss covers."""
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


class LossModule(nn.Module):
    """The LVLM with `lm_loss` as its forward: DDP and FSDP act through a module's forward call.

    With FSDP every rank must run the same sub-modules, so a micro-batch without images still runs the
    vision tower and connector, on one blank tile whose result is multiplied by 0.
    """

    def __init__(self, model: LVLM, device: torch.device, autocast_dtype: torch.dtype | None,
                 always_run_vision: bool, upcasts: bool) -> None:
        super().__init__()
        self.model = model
        self.upcasts = upcasts  # frozen 16-bit weights read as fp32 (see fundusrt.training.base)
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.always_run_vision = always_run_vision

    def forward(self, batch: Batch) -> torch.Tensor:
        if not self.upcasts:
            return self._loss(batch)
        with keep_upcasts_narrow():
            return self._loss(batch)

    def _loss(self, batch: Batch) -> torch.Tensor:
        loss = lm_loss(self.model, batch, self.device, self.autocast_dtype)
        if batch.pixel_values is None and self.always_run_vision:
            size = self.model.config.tiling.tile_size
            blank = torch.zeros(1, 3, size, size, device=self.device)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                loss = loss + 0.0 * self.model.image_embeds(blank).float().sum()
        return loss


def _device_and_precision(config: TrainConfig) -> tuple[torch.device, torch.dtype | None]:
    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU; use device 'auto' or 'cpu'")
    device = torch.device("cuda" if config.device == "cuda" or (config.device == "auto" and cuda) else "cpu")
    precision = config.precision
    if precision == "auto":
        precision = "fp32" if device.type == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    return device, None if precision == "fp32" else NAMED_DTYPES[precision]


def _checkpoint_layers(model: nn.Module) -> None:
    """transformers' activation checkpointing of every layer of `model` (non-reentrant torch.utils.checkpoint)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated there
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _copy_into(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` into the model's parameters of the same names."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def _fingerprint(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES}


class Trainer:
    """One training run of `config`; `run()` trains (resuming if it can) and writes the outputs."""

    def __init__(self, config: TrainConfig, log: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device, self.autocast_dtype = _device_and_precision(config)
        if config.quantize_base == "nf4" and self.device.type != "cuda":
            raise ValueError("quantize_base 'nf4' (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels run on "
                             f"CUDA and this run is on {self.device.type}; set quantize_base to 'none' to train "
                             "LoRA on a 16-bit base instead")
        if config.vision_warmup_steps and config.distributed.strategy == "fsdp":
            raise ValueError("vision_warmup_steps runs on whole (unsharded) towers: use distributed.strategy 'ddp'")
        if config.quantize_base == "nf4" and config.distributed.strategy == "fsdp":
            raise ValueError("quantize_base 'nf4' (QLoRA) is not sharded by this trainer: use distributed.strategy "
                             "'ddp' (each GPU holds the 4-bit base)")
        self.ranks = distributed.init_ranks(config.distributed, self.device.type)
        if self.ranks.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.ranks.local_rank)
        quiet = not self.ranks.is_main
        self.log = (lambda line: None) if quiet else (log or (lambda line: print(line, file=sys.stderr, flush=True)))
        self.model = build_model(config)
        if config.vision_warmup_steps and any(p.dtype != torch.float32 for p in self.model.vision.parameters()):
            raise ValueError("vision_warmup_steps trains the vision tower in place, which needs an fp32 base: set "
                             "base_dtype to 'fp32'")
        if config.quantize_base == "nf4":
            quantize_decoder_nf4(self.model, self.autocast_dtype or torch.bfloat16, self.device)
        torch.manual_seed(config.seed)  # LoRA initialisation: the same on every rank and in every run
        self.targets = set_trainable(self.model, config)
        trained_in_fp32(self.model)
        upcasts = upcast_frozen(self.model) if self.autocast_dtype is None else 0  # fp32 compute, 16-bit base
        if config.grad_checkpointing:
            for part in (self.model.language_model, self.model.vision):
                _checkpoint_layers(part)
        self.model.to(self.device)
        self.loss_module = distributed.wrap(
            LossModule(self.model, self.device, self.autocast_dtype, self.ranks.strategy == "fsdp", upcasts > 0),
            self.ranks, transformer_blocks(self.model), self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
        self.scaler = torch.amp.GradScaler(enabled=self.autocast_dtype == torch.float16)
        self.pad_id = self.model.prompt.pad_token_id if self.model.prompt.pad_token_id is not None else 0

    # data ------------------------------------------------------------------------------------------------
    def prepare(self, files: list[str], bad_log: Path) -> list[Sample]:
        """Usable samples of `files` under the bad-sample policy; each bad one is logged and appended to `bad_log`.

        Rank 0 fills the preprocessing cache first; the other ranks then read the same cache files.
        """
        data = self.config.data
        cache = Path(data.cache_dir) if data.cache_dir else self.out / "cache"

        def report(issue: DataIssue) -> None:
            if self.ranks.is_main:
                self.log(f"bad sample, skipped: {issue}")
                with open(bad_log, "a") as f:
                    f.write(json.dumps({"file": issue.file, "line": issue.line, "reason": issue.reason}) + "\n")

        if not self.ranks.is_main:
            self.ranks.barrier()
        samples, issues = prepare_samples(files, self.model.prompt, self.model.tokenizer, self.model.config.tiling,
                                          max_seq_len=data.max_seq_len, cache_dir=cache,
                                          image_root=data.image_root, on_issue=report)
        if self.ranks.is_main:
            self.ranks.barrier()
        apply_bad_sample_policy(samples, issues, data.on_bad_sample, data.max_bad_fraction)
        return samples

    def load_batch(self, samples: list[Sample], indices: np.ndarray) -> Batch | None:
        """Collate the samples at `indices`, skipping (and reporting) any whose tiles cannot be read."""
        items = []
        for i in indices:
            sample = samples[int(i)]
            try:
                items.append((sample, sample.pixel_values()))
            except (OSError, ValueError) as exc:
                self.log(f"bad sample, skipped at train time: {sample.where}: {exc}")
        return collate(items, self.pad_id) if items else None

    def micro_step(self, samples: list[Sample], indices: np.ndarray, scale: float | None) -> float | None:
        """Loss of the global micro-batch `indices` (mean over its labelled tokens on all ranks); with `scale`,
        also backpropagate loss * scale. None when none of its samples could be read."""
        mine, weight = self.ranks.share(indices)
        batch = self.load_batch(samples, mine)
        if batch is None:
            if self.ranks.active:  # the other ranks' collectives cannot be met without a batch
                raise RuntimeError(f"rank {self.ranks.rank}: no readable sample among {len(mine)}; "
                                   "check the preprocessing cache (data.cache_dir)")
            return None
        total = self.ranks.sum([labelled_tokens(batch) * weight])[0]
        loss_sum = self.loss_module(batch) * weight
        if scale is not None:
            # DDP and FSDP average gradients over the ranks: times world_size makes it their sum
            self.scaler.scale(loss_sum * (scale * self.ranks.world_size / max(total, 1.0))).backward()
        return self.ranks.sum([float(loss_sum.detach())])[0] / max(total, 1.0)

    # checkpoints -----------------------------------------------------------------------------------------
    def _checkpoints(self) -> list[Path]:
        root = self.out / CHECKPOINTS
        return sorted(root.glob("step-*[0-9]")) if root.is_dir() else []

    def _save_checkpoint(self, step: int, loss: float) -> None:
        """Gather the full trainable state (a collective under FSDP); rank 0 writes it, once."""
        from safetensors.torch import save

        weights, optim = distributed.trainable_state(self.model, self.optimizer)
        if self.ranks.is_main:
            root = self.out / CHECKPOINTS
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
            if self.config.vision_warmup_steps:  # warmed-up (possibly frozen) vision weights are run state
                weights |= {name: p.detach().cpu().contiguous() for name, p in self.model.named_parameters()
                            if name.startswith(("vision.", "connector."))}
            atomic_write_bytes(staging / "trainable.safetensors", save(weights))
            buffer = io.BytesIO()
            torch.save({"optimizer": optim, "scaler": self.scaler.state_dict(), "torch_rng": torch.get_rng_state()},
                       buffer)
            atomic_write_bytes(staging / "state.pt", buffer.getvalue())
            atomic_write_text(staging / "trainer_state.json", json.dumps(
                {"step": step, "loss": loss, "world_size": self.ranks.world_size,
                 "config": _fingerprint(self.config)}, indent=1) + "\n")
            final = root / f"step-{step:08d}"
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
            for old in self._checkpoints()[:-self.config.keep_checkpoints]:
                shutil.rmtree(old)
        self.ranks.barrier()

    def _resume(self) -> int:
        """Restore the newest checkpoint (written at any world size); returns its step (0 when starting fresh)."""
        from safetensors.torch import load_file

        found = self._checkpoints() if self.config.resume else []
        if not found:
            return 0
        latest = found[-1]
        state = json.loads((latest / "trainer_state.json").read_text())
        if state["config"] != _fingerprint(self.config):
            raise ValueError(f"{latest} was written by a different configuration; use a new output_dir or set "
                             "\"resume\": false to start over")
        weights = load_file(str(latest / "trainable.safetensors"))
        extra = torch.load(latest / "state.pt", weights_only=False)
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        frozen = {name: tensor for name, tensor in weights.items() if name not in trainable}
        _copy_into(self.model, frozen)  # warmed-up vision weights that the main loop keeps frozen
        distributed.load_trainable_state(self.model, self.optimizer,
                                         {k: v for k, v in weights.items() if k in trainable}, extra["optimizer"])
        self.scaler.load_state_dict(extra["scaler"])
        torch.set_rng_state(extra["torch_rng"])
        self.log(f"resumed from {latest} (step {state['step']}, written by {state.get('world_size', 1)} rank(s))")
        return int(state["step"])

    # loop ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_loss(self, samples: list[Sample]) -> float:
        """Mean loss over `samples` (eval mode, no dropout)."""
        self.model.eval()
        bs, losses = self.config.batch_size, []
        for start in range(0, len(samples), bs):
            loss = self.micro_step(samples, np.arange(start, min(start + bs, len(samples))), scale=None)
            if loss is not None:
                losses.append(loss)
        self.model.train()
        return float(np.mean(losses)) if losses else float("nan")

    def run(self) -> TrainResult | None:
        """Train to the configured number of steps and write adapter/ (LoRA) and merged/ (None on ranks > 0)."""
        try:
            return self._run()
        finally:
            distributed.close(self.ranks)

    def _run(self) -> TrainResult | None:
        cfg = self.config
        main = self.ranks.is_main
        self.out.mkdir(parents=True, exist_ok=True)
        if main:
            atomic_write_text(self.out / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        train = self.prepare(cfg.data.train, self.out / BAD_SAMPLES)
        held_out = self.prepare(cfg.data.eval, self.out / BAD_SAMPLES) if cfg.data.eval else []
        micro_per_epoch = math.ceil(len(train) / cfg.batch_size)
        steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
        total = cfg.max_steps or cfg.epochs * steps_per_epoch
        ranks = f", {self.ranks.world_size} ranks ({self.ranks.strategy})" if self.ranks.active else ""
        self.log(f"{len(train)} training samples, {len(held_out)} held out; {total} steps "
                 f"({steps_per_epoch} per epoch) on {self.device}{ranks}, "
                 f"{sum(p.numel() for p in self.params):,} trainable parameters")
        start_step = self._resume()
        if cfg.vision_warmup_steps and start_step == 0:
            warm_up_vision(self.model, train, steps=cfg.vision_warmup_steps, batch_size=max(cfg.batch_size, 32),
                           lr=cfg.lr, seed=cfg.seed, device=self.device, log=self.log)
        order: dict[int, np.ndarray] = {}
        self.model.train()
        loss_value, started, tokens, done = float("nan"), time.perf_counter(), 0, 0
        metrics = open(self.out / METRICS, "a") if main else None  # noqa: SIM115 (closed in finally)
        try:
            for step in range(start_step, total):
                lr = cfg.lr * lr_factor(step, cfg.warmup_steps, total, cfg.min_lr_ratio)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                step_losses = []
                last_micro = (step + 1) * cfg.grad_accum - 1
                for micro in range(step * cfg.grad_accum, last_micro + 1):
                    epoch, index = divmod(micro, micro_per_epoch)
                    if epoch not in order:
                        order = {epoch: np.random.default_rng([cfg.seed, epoch]).permutation(len(train))}
                    indices = order[epoch][index * cfg.batch_size:(index + 1) * cfg.batch_size]
                    with distributed.accumulating(self.loss_module, self.ranks, micro == last_micro):
                        loss = self.micro_step(train, indices, scale=1.0 / cfg.grad_accum)
                    if loss is not None:
                        step_losses.append(loss)
                        tokens += sum(len(train[int(i)].input_ids) for i in indices)
                self.scaler.unscale_(self.optimizer)
                grad_norm = (distributed.grad_norm(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
                             if cfg.max_grad_norm > 0 else 0.0)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                done += 1
                loss_value = float(np.mean(step_losses)) if step_losses else float("nan")
                last = step + 1 == total
                if ((step + 1) % cfg.log_every == 0 or last) and metrics is not None:
                    elapsed = time.perf_counter() - started
                    record = {"step": step + 1, "epoch": (step * cfg.grad_accum) // micro_per_epoch, "loss": loss_value,
                              "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tokens / elapsed, "elapsed_s": elapsed,
                              "eta_s": elapsed / done * (total - step - 1)}
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    self.log(f"step {step + 1}/{total}  epoch {record['epoch']}  loss {loss_value:.4f}  "
                             f"lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s  "
                             f"ETA {time.strftime('%H:%M:%S', time.gmtime(record['eta_s']))}")
                epoch_end = (step + 1) % steps_per_epoch == 0
                if (cfg.save_every and (step + 1) % cfg.save_every == 0) or epoch_end or last:
                    self._save_checkpoint(step + 1, loss_value)
                if held_out and (epoch_end or last):
                    eval_loss = self.evaluate_loss(held_out)
                    if metrics is not None:
                        metrics.write(json.dumps({"step": step + 1, "eval_loss": eval_loss}) + "\n")
                        metrics.flush()
                    self.log(f"step {step + 1}: held-out loss {eval_loss:.4f}")
        finally:
            if metrics is not None:
                metrics.close()
        return self._finish(total, loss_value)

    def _final_model(self) -> LVLM | None:
        """The trained model, whole and on the CPU, on rank 0 (None elsewhere).

        An FSDP run holds only shards: its full trainable state goes to rank 0, which rebuilds the model
        around it from the base instead of gathering the frozen base too.
        """
        if self.ranks.strategy != "fsdp":
            return self.model if self.ranks.is_main else None
        weights, _ = distributed.trainable_state(self.model, self.optimizer)
        if not self.ranks.is_main:
            return None
        model = build_model(self.config)
        set_trainable(model, self.config)
        trained_in_fp32(model)
        _copy_into(model, weights)
        return model

    def _finish(self, steps: int, loss: float) -> TrainResult | None:
        model = self._final_model()
        result = None
        if model is not None:
            model = model.to("cpu")
            remove_upcasts(model)
            adapter_dir = None
            if self.targets:
                adapter_dir = save_adapter(model, self.out / "adapter", self.targets, self.config.lora,
                                           str(self.config.base))
            merged = merge_adapters(model)
            merged_dir = native.save(merged, self.out / "merged")
            self.log(f"wrote {merged_dir}" + (f" and {adapter_dir}" if adapter_dir else ""))
            result = TrainResult(self.out, merged_dir, adapter_dir, steps, loss, merged)
        self.ranks.barrier()
        return result


def train(config: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult | None:
    """Run `config` (see TrainConfig); resumes from output_dir's newest checkpoint when allowed.

    Returns None on torchrun ranks other than 0 (rank 0 writes the outputs)."""
    return Trainer(config, log).run()
