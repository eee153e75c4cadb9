"""Predictor training in MLX (IFPruning), cheap enough for a laptop.

Stages, each a loss over (prompt, response) pairs whose prompt picks the mask:
- ``distill``: a warm start that never back-propagates through the LLM. The
  head learns to reproduce a target mask: the ``activations`` statistic of the
  prompt (GRIFFIN), the ``oracle`` statistic of the reference response's own
  activations, or ``sequence``, of prompt and response together. Binary
  cross-entropy on every channel, positives re-weighted.
- ``sft``: the paper's stage 2. The prompt's features give scores, SoftTopK
  turns them into ``lambda * TopK(lambda)`` masks that multiply each layer's
  FFN activations, and the loss is the masked model's next-token
  cross-entropy on the response tokens only.
- ``pretrain``: the paper's stage 1 on raw text: chunk i of a text chooses the
  mask for the loss on chunk i+1 (the same code path, chunk i as the prompt).

The LLM is frozen by default, and with a ``shared:N`` backbone so are the
features: they are computed once, and a step costs one masked forward and
backward of the LLM (sft/pretrain) or of the head alone (distill).
``train_llm="lora"`` adds LoRA adapters (see ``lora``) to the attention
and/or the FFN (``lora_on``) of the layers after the backbone's N (so the
features stay fixed), saved beside the predictor on export.
"""

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..engine.prompts import prompt_tokens
from ..errors import IFPError
from ..files import atomic_file, atomic_folder
from ..model.load import LoadedModel
from ..model.masks import mask_overlap
from ..select.activations import ActivationScores
from ..select.base import resolve_k, top_k
from ..select.predictor import (
    Predictor,
    create_predictor,
    load_predictor,
    pad_batch,
    save_predictor,
)
from .lora import LORA_TARGETS, add_lora, merge_lora
from .softtopk import topk_mask

STAGES = ("distill", "sft", "pretrain")
# What a distilled mask imitates: the prompt's activations (GRIFFIN), the reply's
# (oracle), or both: the pruned model also runs the prompt, so a mask for the
# reply alone starves the prompt's channels.
DISTILL_TARGETS = ("sequence", "oracle", "activations")
COLLAPSE_OVERLAP = 0.95  # mean cross-prompt overlap above this: masks no longer depend on the prompt
CHECKPOINT = "checkpoint"  # folder inside a run's work folder
# The fixed prompt set whose mask overlap is logged: different domains on purpose.
DIVERSITY_PROMPTS = (
    "Write a Python function that merges two sorted lists.",
    "Implement binary search in JavaScript.",
    "A train travels 60 km in 45 minutes. What is its speed in km/h?",
    "Solve for x: 3x + 7 = 22.",
    "Which organ of the human body produces insulin?",
    "Who wrote the play Hamlet?",
    "Write a short poem about autumn leaves.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
)


@dataclass
class TrainConfig:
    stage: str = "distill"
    keep: float = 0.5
    backbone: str = "shared:4"
    head_hidden: int = 128
    activation: str = "none"
    distill_target: str = "sequence"  # one of DISTILL_TARGETS
    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 0.5
    max_prompt_tokens: int = 256
    max_response_tokens: int = 128
    chunk_tokens: int = 128
    train_llm: str = "none"  # "none" | "lora"
    freeze_predictor: bool = False  # train the adapters alone, under the predictor's fixed masks
    lora_rank: int = 8
    lora_on: str = "attention"  # one of LORA_TARGETS
    log_every: int = 25
    checkpoint_every: int = 50
    checkpoint_minutes: float = 5.0  # ... or after this long, whichever comes first: a slow step is minutes
    seed: int = 0

    def check(self) -> None:
        """One-line errors for bad settings, before any model is loaded or target computed."""
        choices = {"stage": STAGES, "distill_target": DISTILL_TARGETS, "train_llm": ("none", "lora"), "lora_on": LORA_TARGETS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise IFPError(f"unknown {_flag(name)} {getattr(self, name)!r}: use one of {', '.join(allowed)}")
        for name in ("steps", "batch_size", "learning_rate", "temperature", "log_every", "checkpoint_every", "checkpoint_minutes", "lora_rank"):
            if not getattr(self, name) > 0:
                raise IFPError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        if not 0 < self.keep <= 1:
            raise IFPError(f"--keep must be in (0, 1], got {self.keep}")
        if self.freeze_predictor and (self.train_llm != "lora" or self.stage == "distill"):
            raise IFPError("--freeze-predictor trains the LoRA adapters alone: it needs --train-llm lora and --stage sft or pretrain")


def _flag(field: str) -> str:
    """The ``ifp train`` option that sets a TrainConfig field."""
    return "--lr" if field == "learning_rate" else "--" + field.replace("_", "-")


@dataclass
class Pair:
    prompt: list[int]
    response: list[int]
    domain: str


def diversity_pairs(loaded: LoadedModel) -> list[Pair]:
    return [Pair(prompt_tokens(loaded.tokenizer, p), [], "probe") for p in DIVERSITY_PROMPTS]


def make_pairs(loaded: LoadedModel, records: list[dict], config: TrainConfig) -> list[Pair]:
    """Token pairs: SFT records through the chat template; prose as chunk pairs."""
    tokenizer, pairs = loaded.tokenizer, []
    eos = tokenizer.eos_token_ids
    for record in records:
        if "text" in record:
            ids = tokenizer.encode(record["text"], add_special_tokens=False)
            n = config.chunk_tokens
            chunks = [ids[i : i + n] for i in range(0, len(ids) - n + 1, n)]
            pairs += [Pair(a, b, record.get("domain", "prose")) for a, b in zip(chunks, chunks[1:])]
        else:
            prompt = prompt_tokens(tokenizer, record["prompt"])[-config.max_prompt_tokens :]
            response = tokenizer.encode(record["response"], add_special_tokens=False)
            response = response[: config.max_response_tokens - 1] + [min(eos)] if eos else response
            pairs.append(Pair(prompt, response[: config.max_response_tokens], record.get("domain", "")))
    return pairs


def prompt_features(predictor: Predictor, pairs: list[Pair], batch_size: int = 16) -> mx.array:
    """The (frozen) backbone's features of every prompt, ``[N, d]``."""
    out = []
    for start in range(0, len(pairs), batch_size):
        tokens, mask = pad_batch([p.prompt for p in pairs[start : start + batch_size]])
        feats = predictor.features(tokens, mask)
        mx.eval(feats)
        out.append(feats)
    return mx.concatenate(out)


def distill_targets(loaded: LoadedModel, pairs: list[Pair], k: int, target: str, log=None) -> np.ndarray:
    """Top-k indicators ``[N, L, d_ff]`` (uint8) of the statistic each pair implies."""
    if target not in DISTILL_TARGETS:
        raise IFPError(f"unknown distillation target {target!r}: use one of {', '.join(DISTILL_TARGETS)}")
    targets = np.zeros((len(pairs), loaded.num_layers, loaded.d_ff), np.uint8)
    for i, pair in enumerate(pairs):
        scores = ActivationScores(loaded)
        if target == "activations":
            scores.run(pair.prompt)
        else:
            scores.run(pair.prompt + pair.response, skip=len(pair.prompt) if target == "oracle" else 0)
        np.put_along_axis(targets[i], np.array(top_k(scores.sums, k)).astype(np.int64), 1, axis=1)
        if log and (i + 1) % 50 == 0:
            log(f"targets {i + 1}/{len(pairs)}")
    return targets


def cached_distill_targets(
    loaded: LoadedModel, pairs: list[Pair], k: int, target: str, folder: Path, log=None
) -> np.ndarray:
    """``distill_targets``, kept (bit-packed) in the run's folder: they cost a dense
    forward per example, the head's steps almost nothing, so ``--resume`` or a rerun
    with other head settings must not pay for them again."""
    weights = loaded.path / loaded.ifp["weights"]
    source = [str(loaded.path.resolve()), weights.stat().st_size, weights.stat().st_mtime_ns, target, k]
    key = hashlib.sha256(json.dumps([source, [(p.prompt, p.response) for p in pairs]]).encode()).hexdigest()[:16]
    path = Path(folder) / f"targets-{key}.npy"
    if path.is_file():
        if log:
            log(f"targets from {path}")
        return np.unpackbits(np.load(path), axis=-1, count=loaded.d_ff)
    targets = distill_targets(loaded, pairs, k, target, log)
    with atomic_file(path) as tmp:
        np.save(tmp, np.packbits(targets, axis=-1))
    return targets


class Trainable(nn.Module):
    """What the optimizer updates: the predictor head and, with LoRA, adapters."""

    def __init__(self, predictor: Predictor, model: Optional[nn.Module] = None):
        super().__init__()
        self.predictor = predictor
        self.llm = model  # frozen but for LoRA adapters; None when the LLM is not trained


def distill_weights(targets: mx.array, k: int) -> mx.array:
    """Class balance: the k kept channels weigh as much as the d_ff - k others."""
    d_ff = targets.shape[-1]
    return mx.where(targets > 0, (d_ff - k) / k, 1.0)


def distill_loss(
    trainable: Trainable, features: mx.array, targets: mx.array, k: int, denominator: Optional[mx.array] = None
) -> mx.array:
    """Class-balanced binary cross-entropy between scores and a target mask.

    ``denominator``: the weight sum of the whole (global) batch, when this is
    one process's share of it (data-parallel training sums the shares).
    """
    logits = trainable.predictor.scores(features)
    weights = distill_weights(targets, k)
    loss = nn.losses.binary_cross_entropy(logits, targets.astype(mx.float32), with_logits=True, reduction="none")
    return (loss * weights).sum() / (weights.sum() if denominator is None else denominator)


def masked_lm_loss(
    trainable: Trainable, loaded: LoadedModel, features: mx.array, tokens: mx.array, loss_mask: mx.array,
    k: int, temperature: float, denominator: Optional[mx.array] = None,
) -> mx.array:
    """Next-token cross-entropy of the masked LLM on the response tokens only
    (``denominator``: the response-token count of the global batch, as in distill_loss)."""
    masks = topk_mask(trainable.predictor.scores(features), k, temperature)  # [B, L, d_ff]
    for layer, mlp in enumerate(loaded.mlps):
        mlp.channel_mask = masks[:, layer, None, :]
    try:
        logits = loaded.model(tokens[:, :-1])
    finally:
        for mlp in loaded.mlps:
            mlp.channel_mask = None
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), tokens[:, 1:], reduction="none")
    weights = loss_mask[:, 1:]
    return (ce * weights).sum() / (mx.maximum(weights.sum(), 1) if denominator is None else denominator)


def sequence_batch(pairs: list[Pair]) -> tuple[mx.array, mx.array]:
    """Right-padded prompt+response tokens and a mask that is 1 on response tokens."""
    width = max(len(p.prompt) + len(p.response) for p in pairs)
    tokens = np.zeros((len(pairs), width), np.int32)
    loss_mask = np.zeros((len(pairs), width), np.float32)
    for row, pair in enumerate(pairs):
        seq = pair.prompt + pair.response
        tokens[row, : len(seq)] = seq
        loss_mask[row, len(pair.prompt) : len(seq)] = 1.0
    return mx.array(tokens), mx.array(loss_mask)


class Trainer:
    """Runs one stage: batches, steps, checkpoints, resume, diversity logging."""

    def __init__(
        self, loaded: LoadedModel, predictor: Predictor, pairs: list[Pair], config: TrainConfig, out: Path,
        probe_pairs: Optional[list[Pair]] = None, log: Callable[[str], None] = print,
    ):
        config.check()
        if not pairs:
            raise IFPError("no training examples")
        self.loaded, self.predictor, self.pairs, self.config, self.out, self.log = loaded, predictor, pairs, config, out, log
        self.k = resolve_k(loaded.d_ff, config.keep)
        self.step = 0
        self.history: list[dict] = []
        loaded.assign(loaded.dense_ffn())
        self.features = prompt_features(predictor, pairs)
        self.probe_features = prompt_features(predictor, probe_pairs) if probe_pairs else None
        self.targets = None
        if config.stage == "distill":
            self.targets = cached_distill_targets(loaded, pairs, self.k, config.distill_target, out, log)
        if config.train_llm == "lora":  # after the shared backbone's layers, so the features stay fixed
            first = predictor.backbone.layers if predictor.backbone.shared else 0
            add_lora(loaded.model, first, config.lora_rank, config.lora_on)
        self.trainable = Trainable(predictor, loaded.model if config.train_llm == "lora" else None)
        if config.freeze_predictor:  # the masks stay the predictor's: they cannot collapse
            predictor.freeze()
        self.optimizer = optim.AdamW(learning_rate=config.learning_rate, weight_decay=config.weight_decay)
        self.loss_and_grad = nn.value_and_grad(self.trainable, self._loss)
        self.group = mx.distributed.init()  # a group of one unless started by mlx.launch

    def _loss(self, rows: mx.array, tokens=None, loss_mask=None, denominator=None) -> mx.array:
        features = self.features[rows]
        if self.config.stage == "distill":
            targets = mx.array(self.targets[np.array(rows)])
            return distill_loss(self.trainable, features, targets, self.k, denominator)
        return masked_lm_loss(
            self.trainable, self.loaded, features, tokens, loss_mask, self.k, self.config.temperature, denominator
        )

    def _step(self, rows: np.ndarray) -> tuple[mx.array, int]:
        """One optimizer step on the global batch ``rows``; returns its loss and token count.

        Data-parallel: each process takes every size-th example of the batch,
        its loss divided by the *global* denominator, and the gradients are
        summed across processes: the same update as one process on the whole
        batch. A single process is the same code with a group of one.
        """
        size, rank = self.group.size(), self.group.rank()
        shard = rows[rank::size]
        args: dict = {}
        if self.config.stage != "distill":
            args["tokens"], args["loss_mask"] = sequence_batch([self.pairs[i] for i in shard])
            global_mask = args["loss_mask"] if size == 1 else sequence_batch([self.pairs[i] for i in rows])[1]
            args["denominator"] = mx.maximum(global_mask[:, 1:].sum(), 1)
            counted = int(global_mask.sum().item())
        else:  # the head learns from prompts: count their tokens
            args["denominator"] = distill_weights(mx.array(self.targets[rows]), self.k).sum()
            counted = sum(len(self.pairs[i].prompt) for i in rows)
        loss, grads = self.loss_and_grad(mx.array(shard), **args)
        if size > 1:
            loss = mx.distributed.all_sum(loss, group=self.group)
            grads = tree_map(lambda g: mx.distributed.all_sum(g, group=self.group), grads)
        self.optimizer.update(self.trainable, grads)
        mx.eval(self.trainable.parameters(), self.optimizer.state, loss)
        return loss, counted

    def batches(self) -> Iterator[np.ndarray]:
        """Shuffled epochs, seeded by the step so a resumed run continues the same order."""
        n, size = len(self.pairs), min(self.config.batch_size, len(self.pairs))
        per_epoch = max(1, n // size)
        while True:
            epoch, offset = divmod(self.step, per_epoch)
            order = np.random.default_rng(self.config.seed + epoch).permutation(n)
            yield order[offset * size : (offset + 1) * size]

    def train(self, progress: Optional[Callable[[int, int, float, float], None]] = None) -> list[dict]:
        """Run until ``config.steps``; returns the logged history."""
        batches = self.batches()
        tokens_seen, start = 0, time.perf_counter()
        saved = start
        while self.step < self.config.steps:
            loss, counted = self._step(next(batches))
            tokens_seen += counted
            self.step += 1
            rate = tokens_seen / (time.perf_counter() - start)
            if progress:
                progress(self.step, self.config.steps, loss.item(), rate)
            if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                self._log(loss.item(), rate)
            due = time.perf_counter() - saved > 60 * self.config.checkpoint_minutes
            if self.is_writer and (due or self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps):
                self.save_checkpoint()
                saved = time.perf_counter()
        return self.history

    def _log(self, loss: float, rate: float) -> None:
        entry = {"step": self.step, "loss": round(loss, 5), "tokens_per_s": round(rate, 1)}
        if self.group.size() > 1:
            entry["processes"] = self.group.size()
        if self.probe_features is not None:
            per_layer = mask_diversity(self.predictor, self.probe_features, self.k)
            entry["overlap"] = round(float(per_layer.mean()), 4)
            entry["overlap_per_layer"] = [round(float(v), 3) for v in per_layer]
            if entry["overlap"] > COLLAPSE_OVERLAP:
                self.log(f"warning: masks collapsed (mean overlap {entry['overlap']:.3f} across prompts)")
        self.history.append(entry)
        if self.is_writer:
            self.log(json.dumps({k: v for k, v in entry.items() if k != "overlap_per_layer"}))

    @property
    def is_writer(self) -> bool:
        """Only the first process writes checkpoints, logs and the exported folder."""
        return self.group.rank() == 0

    # --- checkpoints -------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / CHECKPOINT

    def save_checkpoint(self) -> None:
        """Parameters, optimizer state and step; the previous checkpoint stays until this one is whole."""
        with atomic_folder(self.checkpoint_dir, force=True) as tmp:
            mx.save_safetensors(str(tmp / "trainable.safetensors"), dict(tree_flatten(self.trainable.trainable_parameters())))
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))
            state = {"step": self.step, "config": asdict(self.config), "history": self.history}
            (tmp / "state.json").write_text(json.dumps(state))

    def resume(self) -> None:
        """Continue from the checkpoint in ``out`` (same parameters, optimizer, step)."""
        folder = self.checkpoint_dir
        state = checkpoint_state(self.out, self.config.stage)
        saved = mx.load(str(folder / "trainable.safetensors"))
        check_saved_parameters(saved, self.trainable, folder)
        self.trainable.load_weights(list(saved.items()), strict=False)
        self.optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
        self.step, self.history = state["step"], state["history"]
        mx.eval(self.trainable.parameters(), self.optimizer.state)


def checkpoint_state(out: Path, stage: str) -> dict:
    """The saved state of the run in ``out`` to resume: checked before anything is loaded."""
    path = out / CHECKPOINT / "state.json"
    if not path.is_file():
        raise IFPError(f"{out}: no checkpoint to resume from")
    state = json.loads(path.read_text())
    if state["config"]["stage"] != stage:
        raise IFPError(f"the checkpoint is for stage {state['config']['stage']}, not {stage}")
    return state


def check_saved_parameters(saved: dict[str, mx.array], trainable: Trainable, folder: Path) -> None:
    """One-line error unless a checkpoint holds exactly the run's trainable parameters:
    ``load_weights(strict=False)`` (the LLM's frozen weights are not in it) would
    otherwise skip or mis-shape whatever differs, and fail steps later."""
    expected = {name: value.shape for name, value in tree_flatten(trainable.trainable_parameters())}
    differ = sorted(set(saved) ^ set(expected)) or sorted(n for n in saved if saved[n].shape != expected[n])
    if differ:
        raise IFPError(
            f"{folder}: the checkpoint's parameters do not match this run's (first: {differ[0]}); "
            "resume with the settings it was trained with"
        )


def mask_diversity(predictor: Predictor, features: mx.array, k: int) -> np.ndarray:
    """Mean pairwise overlap of the predicted masks, per layer ``[L]``."""
    picked = np.array(top_k(predictor.scores(features), k))  # [N, L, k]
    n, layers = picked.shape[0], picked.shape[1]
    per_layer = np.zeros(layers)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    for layer in range(layers):
        per_layer[layer] = np.mean([mask_overlap(picked[i, layer : layer + 1], picked[j, layer : layer + 1], predictor.d_ff) for i, j in pairs])
    return per_layer


def start_predictor(
    loaded: LoadedModel, config: TrainConfig, init: Optional[Path] = None, init_mask: Optional[Path] = None
) -> Predictor:
    """A new predictor, an existing one to continue from, or one that starts as a static mask.

    Starting from a mask (``init_mask``), the last layer's weights are zero and
    its bias is +1 on the mask's channels, -1 elsewhere: the predictor first
    picks exactly that mask for every prompt, and training can only move it
    where the loss says the prompt matters.
    """
    if init is not None:
        return load_predictor(init, loaded)[0]
    mx.random.seed(config.seed)
    predictor = create_predictor(loaded, config.backbone, config.head_hidden, config.activation)
    if init_mask is not None:
        from ..model.masks import load_mask

        indices = np.array(load_mask(init_mask, loaded.config)[0]).astype(np.int64)
        bias = -np.ones((loaded.num_layers, loaded.d_ff), np.float32)
        np.put_along_axis(bias, indices, 1.0, axis=1)
        predictor.out.weight = mx.zeros_like(predictor.out.weight)
        predictor.out.bias = mx.array(bias.reshape(-1))
    return predictor


def export(trainer: Trainer, path: Path, force: bool = False) -> Path:
    """Write the predictor folder; with LoRA, its adapter beside the head (applied
    only to pruned submodels) and, for attention-only adapters, a merged copy of
    the model beside the folder. FFN adapters are not merged: the FFN lives in
    the bank, and their update is per selection (the slice of the kept channels)."""
    if trainer.config.train_llm != "lora":
        return save_predictor(path, trainer.predictor, trainer.loaded.config, trainer.config.keep, force=force)
    saved = save_predictor(path, trainer.predictor, trainer.loaded.config, trainer.config.keep, force=force, adapted=trainer.loaded.model)
    if trainer.config.lora_on == "attention":
        merge_lora(trainer.loaded.model)
        write_merged_model(trainer.loaded, path.parent / f"{path.name}-model", force)
    return saved


def write_merged_model(loaded: LoadedModel, out: Path, force: bool) -> None:
    """A copy of the model folder whose attention weights include the merged LoRA."""
    with atomic_folder(out, force) as tmp:
        for f in loaded.path.iterdir():
            if f.is_file() and f.name != loaded.ifp["weights"]:
                shutil.copy2(f, tmp / f.name)
        weights = {k: v for k, v in tree_flatten(loaded.model.parameters()) if ".mlp." not in k}
        mx.save_safetensors(str(tmp / loaded.ifp["weights"]), weights, metadata={"format": "mlx"})

