"""Training fusion heads (and, for the demo, tiny open_clip encoders from scratch) on the shapes benchmark.

Two modes, both seeded and with progress bars:

* ``train_joint``: the demo's recipe. A tiny open_clip model (``mmfuse-demo``) is trained from
  scratch together with an attention fusion head and a CLIP-style late-fusion similarity head, with
  auxiliary per-patch colour/shape labels from the generator's ground truth, balanced batches, a
  curriculum from attribute to relation negatives, and a warm-up + cosine learning-rate schedule.
* ``train_head``: encoders frozen (loaded from a checkpoint); one strategy's head is trained on
  features of generated data.

Exports: the encoder checkpoint as safetensors, the head as a new version folder of a fusion model
(``fusion_head.safetensors`` + ``fusion_head.json`` describing strategy, hyper-parameters, the
command line, seed, time and measured accuracies).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mmfuse import shapes
from mmfuse.presets import DEFAULTS, PRESETS  # noqa: F401 - PRESETS re-exported
from mmfuse.serving.encoders import encode_text
from mmfuse.serving.openclip_models import register_model_configs
from mmfuse.serving.strategies import FusionBatch, FusionStrategy, build

MODALITIES = ("IMAGE", "TEXT")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
class Featurizer:
    """Benchmark examples -> model inputs, exactly as the served preprocessing makes them."""

    def __init__(self, model_name: str):
        import open_clip

        from mmfuse.serving.openclip_models import ClipSpec, preprocess_config

        register_model_configs()
        cfg = preprocess_config(ClipSpec(model_name))
        if tuple(cfg.input_size) != (3, shapes.SIZE, shapes.SIZE) or cfg.resize_mode != "shortest":
            raise ValueError(f"{model_name}: the benchmark needs a {shapes.SIZE}x{shapes.SIZE} model")
        self.mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std).view(1, 3, 1, 1)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self._tokens: dict[str, torch.Tensor] = {}

    def pixels(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    def tokens(self, captions: Sequence[str]) -> torch.Tensor:
        missing = [c for c in set(captions) if c not in self._tokens]
        if missing:
            for c, t in zip(missing, self.tokenizer(missing)):
                self._tokens[c] = t
        return torch.stack([self._tokens[c] for c in captions])


@dataclass
class Batch:
    pixels: torch.Tensor
    tokens: torch.Tensor
    labels: torch.Tensor  # float [B]
    kinds: list[str]
    colour_cells: torch.Tensor  # [B, g*g]
    shape_cells: torch.Tensor
    present: torch.Tensor  # [B, colours + shapes] multi-hot of what the image holds
    referents: torch.Tensor  # [B, 2, 2] centres (x, y)/SIZE of the caption's subject and object
    has_referents: torch.Tensor  # [B] bool: both named objects are in the image (positive, swapped)
    named_colours: torch.Tensor  # [B, 2] colour index the caption gives its subject and object
    named_shapes: torch.Tensor  # [B, 2]
    named_exist: torch.Tensor  # [B, 2] float: the subject / object the caption names is in the image


def make_batch(examples: list[shapes.Example], featurizer: Featurizer, grid: int) -> Batch:
    cells = [shapes.cell_labels(e.objects, grid) for e in examples]
    n_colours = len(shapes.COLOUR_NAMES)
    present = torch.zeros(len(examples), n_colours + len(shapes.SHAPES))
    referents = torch.zeros(len(examples), 2, 2)
    for i, e in enumerate(examples):
        for obj in e.objects:
            present[i, shapes.COLOUR_NAMES.index(obj.colour)] = 1
            present[i, n_colours + shapes.SHAPES.index(obj.shape)] = 1
        named = e.objects if e.kind == "positive" else e.objects[::-1]
        referents[i] = torch.tensor([[o.cx / shapes.SIZE, o.cy / shapes.SIZE] for o in named])
    return Batch(
        pixels=featurizer.pixels(np.stack([e.image for e in examples])),
        tokens=featurizer.tokens([e.caption for e in examples]),
        labels=torch.tensor([e.label for e in examples], dtype=torch.float32),
        kinds=[e.kind for e in examples],
        colour_cells=torch.from_numpy(np.stack([c for c, _ in cells]).reshape(len(examples), -1)),
        shape_cells=torch.from_numpy(np.stack([s for _, s in cells]).reshape(len(examples), -1)),
        present=present,
        referents=referents,
        has_referents=torch.tensor([e.kind in ("positive", "swapped") for e in examples]),
        named_colours=torch.tensor([[shapes.COLOUR_NAMES.index(w) for w in _named(e.caption, 1)] for e in examples]),
        named_shapes=torch.tensor([[shapes.SHAPES.index(w) for w in _named(e.caption, 2)] for e in examples]),
        named_exist=torch.tensor([[float(any(o.colour == c and o.shape == sh for o in e.objects))
                                   for c, sh in zip(_named(e.caption, 1), _named(e.caption, 2))] for e in examples]),
    )


def _named(caption: str, position: int) -> tuple[str, str]:
    """Word ``position`` of the subject and of the object phrase ("a {colour} {shape}")."""
    words = caption.split()
    return words[position], words[-3 + position]


def kind_weights(step: int, curriculum_steps: int) -> tuple[float, float, float]:
    """Positives, swapped, attribute: attribute negatives first, relation negatives phased in."""
    if step >= curriculum_steps:
        return (0.5, 0.25, 0.25)
    ramp = step / max(1, curriculum_steps)
    return (0.5, 0.25 * ramp, 0.5 - 0.25 * ramp)


# ---------------------------------------------------------------------------------------------
# encoders
# ---------------------------------------------------------------------------------------------
class Encoders(nn.Module):
    """The open_clip model's two towers, returning what the served encoders return."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.clip.visual.output_tokens = True

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor):
        image_pooled, image_seq = self.clip.visual(pixels)
        text_pooled, text_seq = encode_text(self.clip, tokens, trim=True)
        length = text_seq.shape[1]
        positions = torch.arange(length)[None, :]
        text_valid = positions <= tokens[:, :length].argmax(dim=-1, keepdim=True)
        image_valid = torch.ones(image_seq.shape[:2], dtype=torch.bool)
        embeddings = torch.stack([F.normalize(image_pooled, dim=-1), F.normalize(text_pooled, dim=-1)], dim=1)
        return embeddings, [image_seq, text_seq], [image_valid, text_valid]


def create_clip(model_name: str, seed: int, checkpoint: Path | None = None) -> nn.Module:
    import open_clip

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    if checkpoint is not None:
        open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
    return model


def token_widths(clip: nn.Module) -> tuple[int, int]:
    return int(clip.visual.transformer.width), int(clip.transformer.width)


def strategy_hparams(name: str, clip: nn.Module, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from mmfuse.presets import preset_hparams

    image_width, text_width = token_widths(clip)
    image_tokens = int(clip.visual.grid_size[0] * clip.visual.grid_size[1])
    hparams = preset_hparams(name, image_width, text_width, image_tokens, overrides=overrides)
    hparams.pop("_needs_sequences")
    return hparams


def build_preset(preset: str, clip: nn.Module, embed_dim: int, overrides: dict[str, Any] | None = None) -> FusionStrategy:
    return build(preset.split("-")[0], MODALITIES, embed_dim, **strategy_hparams(preset, clip, overrides))




# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    preset: str = "attention"
    model_name: str = DEFAULTS["model_name"]
    steps: int = DEFAULTS["steps"]
    batch_size: int = DEFAULTS["batch_size"]
    lr: float = DEFAULTS["lr"]
    weight_decay: float = 0.01
    warmup: int = 200
    curriculum_steps: int = DEFAULTS["curriculum_steps"]
    modality_dropout: float = DEFAULTS["modality_dropout"]
    aux_weight: float = 0.5
    gate_lr_scale: float = 10.0
    seed: int = 0
    threads: int = DEFAULTS["threads"]
    eval_every: int = 500
    eval_per_kind: int = 200
    extra: dict[str, Any] = field(default_factory=dict)  # strategy hyper-parameter overrides
    init_head: str | None = None  # start from this head's matching weights
    init_checkpoint: str | None = None  # --from-scratch: start the encoders from this checkpoint instead


def make_optimizer(params: list, modules: list[nn.Module], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; the tanh gates of cross-attention start at 0 (identity) and get a larger step to open."""
    gates = {id(p) for m in modules for name, p in m.named_parameters() if name.rsplit(".", 1)[-1].startswith("alpha_")}
    groups = [{"params": [p for p in params if id(p) not in gates], "lr_scale": 1.0},
              {"params": [p for p in params if id(p) in gates], "lr_scale": cfg.gate_lr_scale, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def drop_modalities(rows: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """[B,2] presence mask; each modality dropped with probability p (independently)."""
    if p <= 0:
        return torch.ones(rows, 2, dtype=torch.bool)
    return torch.rand(rows, 2, generator=generator) >= p


def bce_with_dropout(logit: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A row missing a modality cannot be judged: its target is 0.5 (undecided)."""
    target = torch.where(mask.all(dim=1), labels, torch.full_like(labels, 0.5))
    return F.binary_cross_entropy_with_logits(logit, target)


@torch.no_grad()
def evaluate(encoders: Encoders, strategies: dict[str, FusionStrategy], featurizer: Featurizer, seed: int,
             per_kind: int, drop: str | None = None, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Accuracy per kind (score > 0.5 for positives, < 0.5 for negatives), per strategy."""
    examples = shapes.balanced(per_kind, seed)
    correct = {name: {k: 0 for k in shapes.KINDS} for name in strategies}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        b = make_batch(chunk, featurizer, grid=1)
        embeddings, seqs, seq_valid = encoders(b.pixels, b.tokens)
        mask = torch.ones(len(chunk), 2, dtype=torch.bool)
        if drop == "image":
            mask[:, 0] = False
        elif drop == "text":
            mask[:, 1] = False
        fb = FusionBatch(embeddings, mask, seqs, seq_valid)
        for name, strategy in strategies.items():
            score = torch.sigmoid(strategy(fb).logit)
            for e, s in zip(chunk, score.tolist()):
                correct[name][e.kind] += int((s > 0.5) == bool(e.label))
    return {name: {k: v / per_kind for k, v in c.items()} for name, c in correct.items()}


def train_joint(cfg: TrainConfig, progress: Callable[[int, dict[str, float]], None] | None = None):
    """Encoders from scratch + the chosen head + the late similarity head + auxiliary cell losses."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    clip = create_clip(cfg.model_name, cfg.seed, Path(cfg.init_checkpoint) if cfg.init_checkpoint else None)
    encoders = Encoders(clip)
    embed_dim = int(clip.text_projection.shape[1])
    heads = {cfg.preset: build_preset(cfg.preset, clip, embed_dim, cfg.extra)}
    if cfg.init_head:
        warm_start(heads[cfg.preset], Path(cfg.init_head))
    if cfg.preset != "late":
        heads["late"] = build_preset("late", clip, embed_dim)
    image_width, _ = token_widths(clip)
    grid = int(clip.visual.grid_size[0])
    aux = nn.ModuleDict({"colour": nn.Linear(image_width, len(shapes.COLOUR_NAMES) + 1),
                         "shape": nn.Linear(image_width, len(shapes.SHAPES) + 1),
                         "present": nn.Linear(embed_dim, len(shapes.COLOUR_NAMES) + len(shapes.SHAPES))})
    _, text_width = token_widths(clip)
    aux["named_colour"] = nn.Linear(text_width, len(shapes.COLOUR_NAMES))
    aux["named_shape"] = nn.Linear(text_width, len(shapes.SHAPES))
    if heads[cfg.preset].hparams.get("dim"):
        aux["where"] = nn.Linear(heads[cfg.preset].hparams["dim"], 2)
        aux["exists"] = nn.Linear(heads[cfg.preset].hparams["dim"], 1)
        aux["delta"] = nn.Linear(heads[cfg.preset].hparams["dim"], 2)
    params = list(encoders.parameters()) + [p for h in heads.values() for p in h.parameters()] + list(aux.parameters())
    optimizer = make_optimizer(params, [encoders, *heads.values(), aux], cfg)
    featurizer = Featurizer(cfg.model_name)
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    started = time.monotonic()
    for step in range(cfg.steps):
        set_lr(optimizer, lr_at(step, cfg))
        weights = kind_weights(step, cfg.curriculum_steps)
        kinds = rng.choice(len(shapes.KINDS), size=cfg.batch_size, p=weights)
        examples = [shapes.make_example(rng, shapes.KINDS[k]) for k in kinds]
        b = make_batch(examples, featurizer, grid)
        embeddings, seqs, seq_valid = encoders(b.pixels, b.tokens)
        mask = drop_modalities(len(examples), cfg.modality_dropout, generator)
        fb = FusionBatch(embeddings, mask, seqs, seq_valid)
        outputs = {name: h(fb) for name, h in heads.items()}
        losses = {name: bce_with_dropout(out.logit, b.labels, mask) for name, out in outputs.items()}
        losses.update(auxiliary_losses(cfg, aux, b, embeddings, seqs, outputs[cfg.preset], mask, heads[cfg.preset]))
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        record = {k: float(v.detach()) for k, v in losses.items()}
        if progress is not None:
            progress(step, record)
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            encoders.eval()
            for h in heads.values():
                h.eval()
            acc = evaluate(encoders, heads, featurizer, seed=cfg.seed + 10_000 + step, per_kind=cfg.eval_per_kind)
            encoders.train()
            for h in heads.values():
                h.train()
            history.append({"step": step + 1, "seconds": round(time.monotonic() - started, 1), "loss": record,
                            "accuracy": acc})
            print(f"step {step + 1}: accuracy {json.dumps(acc)}", flush=True)
    for module in [encoders, *heads.values()]:
        module.eval()
    return clip, heads, history


def auxiliary_losses(cfg: TrainConfig, aux: nn.ModuleDict, b: Batch, embeddings: torch.Tensor,
                     sequences: list[torch.Tensor], out, mask: torch.Tensor, head: nn.Module) -> dict[str, torch.Tensor]:
    """Losses from the generator's ground truth that lift the encoders and the binding off the plateau.

    * cells: every image patch names the colour and shape covering it;
    * named: the caption's two noun tokens name the colour and shape the caption gives them;
    * present: the pooled image embedding names the colours and shapes in the image;
    * contrastive: pooled image and caption embeddings of positives align (CLIP's InfoNCE);
    * where: after cross-attention, the subject's and the object's noun tokens know where those
      objects are (their centres), which is what a relation needs;
    * exists / delta: the noun tokens know whether their object is in the image, and the EOT token
      (where the score is read) knows the subject-object offset.
    """
    image_tokens, text_tokens = sequences
    eot = b.tokens.argmax(dim=-1)
    rows = torch.arange(len(eot))
    nouns = torch.stack([torch.full_like(eot, 3), eot - 1], dim=1)  # [SOT, a, colour, SHAPE, ..., SHAPE, EOT]
    noun_states = text_tokens[rows[:, None], nouns]  # [B, 2, W]
    losses = {
        "named": cfg.aux_weight * (
            F.cross_entropy(aux["named_colour"](noun_states).flatten(0, 1), b.named_colours.flatten())
            + F.cross_entropy(aux["named_shape"](noun_states).flatten(0, 1), b.named_shapes.flatten())),
        "cells": cfg.aux_weight * (
            F.cross_entropy(aux["colour"](image_tokens).flatten(0, 1), b.colour_cells.flatten())
            + F.cross_entropy(aux["shape"](image_tokens).flatten(0, 1), b.shape_cells.flatten())),
        "present": cfg.aux_weight * F.binary_cross_entropy_with_logits(aux["present"](embeddings[:, 0]), b.present),
    }
    positives = torch.tensor([k == "positive" for k in b.kinds])
    if positives.sum() > 1:
        img, txt = embeddings[positives, 0], embeddings[positives, 1]
        logits = 10.0 * img @ txt.T
        target = torch.arange(len(img))
        losses["contrastive"] = cfg.aux_weight * 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    usable = b.has_referents & mask.all(dim=1)
    if "where" in aux and out.tokens is not None and usable.any():
        reads = [out.tokens]
        if getattr(head, "xattn", None):
            # What the first cross-attention read, before its gate: a direct signal for the binding
            # even while the tanh gates are still closed (they start at 0).
            reads.append(head.xattn[0].last_read)
        total = 0.0
        for states in reads:
            subject = states[rows, torch.full_like(eot, 3)]  # [SOT, a, colour, SHAPE, ...]
            obj = states[rows, eot - 1]  # [..., a, colour, SHAPE, EOT]
            predicted = torch.stack([aux["where"](subject), aux["where"](obj)], dim=1)
            total = total + F.mse_loss(predicted[usable], b.referents[usable])
        losses["where"] = cfg.aux_weight * 4.0 * total
    if "exists" in aux and out.tokens is not None:
        # The decision's parts, read where the decision is made: whether each named object is in
        # the image (attribute negatives), and the subject-object offset (relations), at EOT.
        both = mask.all(dim=1)
        final = out.tokens
        named = torch.stack([final[rows, torch.full_like(eot, 3)], final[rows, eot - 1]], dim=1)
        exists = aux["exists"](named).squeeze(-1)
        losses["exists"] = cfg.aux_weight * F.binary_cross_entropy_with_logits(exists[both], b.named_exist[both])
        if usable.any():
            delta = aux["delta"](final[rows, eot])
            target = b.referents[:, 0] - b.referents[:, 1]
            losses["delta"] = cfg.aux_weight * 4.0 * F.mse_loss(delta[usable], target[usable])
    return losses


def export_checkpoint(clip: nn.Module, path: Path, half: bool = True) -> Path:
    """open_clip state dict as safetensors (fp16 storage by default: loads into fp32 exactly as fp16 values)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in clip.state_dict().items():
        v = v.detach().contiguous().cpu()
        state[k] = v.half() if half and v.is_floating_point() else v
    save_file(state, str(path))
    return path


def train_record(cfg: TrainConfig, command: str, seconds: float, history: list, results: dict) -> dict[str, Any]:
    import platform

    return {"training": {"command": command, "config": asdict(cfg), "seconds": round(seconds, 1),
                         "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
                         "torch": torch.__version__, "history": history},
            "evaluation": results}


def round_to_half(clip: nn.Module) -> None:
    """Round the weights to fp16 values in place: the in-process model then equals the exported one."""
    with torch.no_grad():
        for p in clip.state_dict().values():
            if p.is_floating_point():
                p.copy_(p.half().float())


def train_head(cfg: TrainConfig, clip: nn.Module,
               progress: Callable[[int, dict[str, float]], None] | None = None):
    """One strategy's head on frozen encoders (features of freshly generated data every step)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    encoders = Encoders(clip).eval()
    encoders.requires_grad_(False)
    embed_dim = int(clip.text_projection.shape[1])
    head = build_preset(cfg.preset, clip, embed_dim, cfg.extra)
    if cfg.init_head:
        warm_start(head, Path(cfg.init_head))
    optimizer = make_optimizer(list(head.parameters()), [head], cfg)
    featurizer = Featurizer(cfg.model_name)
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    grid = int(clip.visual.grid_size[0])
    for step in range(cfg.steps):
        set_lr(optimizer, lr_at(step, cfg))
        kinds = rng.choice(len(shapes.KINDS), size=cfg.batch_size, p=kind_weights(step, cfg.curriculum_steps))
        b = make_batch([shapes.make_example(rng, shapes.KINDS[k]) for k in kinds], featurizer, grid)
        with torch.no_grad():
            embeddings, seqs, seq_valid = encoders(b.pixels, b.tokens)
        mask = drop_modalities(len(kinds), cfg.modality_dropout, generator)
        loss = bce_with_dropout(head(FusionBatch(embeddings, mask, seqs, seq_valid)).logit, b.labels, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step, {"loss": float(loss.detach())})
    return head.eval()


def warm_start(head: FusionStrategy, directory: Path) -> list[str]:
    """Copy every parameter of a trained head whose name and shape match; return the ones copied."""
    from safetensors.torch import load_file

    from mmfuse.serving.strategies.base import HEAD_WEIGHTS

    source = load_file(str(directory / HEAD_WEIGHTS))
    target = head.state_dict()
    copied = [k for k, v in source.items() if k in target and target[k].shape == v.shape]
    head.load_state_dict({**target, **{k: source[k] for k in copied}})
    return copied


def full_evaluation(clip: nn.Module, heads: dict[str, FusionStrategy], model_name: str, seed: int,
                    per_kind: int) -> dict[str, dict[str, float]]:
    """Per head: accuracy per kind, and balanced accuracy with the image or the text removed."""
    encoders = Encoders(clip).eval()
    featurizer = Featurizer(model_name)
    results = {name: {} for name in heads}
    for drop in (None, "image", "text"):
        acc = evaluate(encoders, heads, featurizer, seed, per_kind, drop=drop)
        for name, by_kind in acc.items():
            if drop is None:
                results[name].update(by_kind)
            else:
                results[name][f"no_{drop}"] = 0.5 * by_kind["positive"] + 0.25 * (by_kind["swapped"] + by_kind["attribute"])
    return results
