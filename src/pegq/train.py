"""FP32 fine-tuning (paper appendix B.1).

AdamW, learning rate set to its maximum and decayed linearly to zero, 3 epochs, sequences truncated to
128 tokens; Table 8's per-task learning rate and batch size are the defaults. Each batch is cut to its
longest sequence before the forward (right padding + attention mask make this exactly equivalent to
padding to 128, and it is several times faster on a CPU). The result is an HF ``save_pretrained``
checkpoint with its tokenizer, written atomically, plus ``train_log.json``.

Resuming: a run that is interrupted leaves ``<output>.partial-state/`` holding the last finished epoch
(model + optimizer + scheduler); the same command picks it up and does not redo finished epochs.

Scale-out: :func:`make_accelerator` hands :func:`train_loop` an ``accelerate.Accelerator`` under a
multi-process launcher (``accelerate launch``/``torchrun``) or with a CUDA device, so fine-tuning and QAT
run data-parallel unchanged; on a plain CPU run there is none and the loop is the plain PyTorch loop
(``docs/architecture.md``, "Scale-out").
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .io import atomic_dir, atomic_write_json

# Table 8 (learning rate, batch size); rotten_tomatoes and CSV tasks use SST-2's.
TABLE8 = {
    "cola": (2e-5, 32),
    "sst2": (2e-5, 16),
    "mrpc": (5e-5, 8),
    "stsb": (4e-5, 32),
    "qqp": (4e-5, 64),
    "mnli": (2e-5, 16),
    "mnli-mm": (2e-5, 16),
    "qnli": (2e-5, 32),
    "rte": (3e-5, 8),
    "rotten_tomatoes": (2e-5, 16),
}

HEAD_ONLY_LR = 1e-3  # a freshly initialised head on frozen features needs a far larger step than 2e-5


@dataclass
class FinetuneConfig:
    learning_rate: float | None = None  # None = Table 8 default for the task
    batch_size: int | None = None
    epochs: float = 3.0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0  # B.1: no warm-up, linear decay from the max
    max_length: int = 128
    seed: int = 0
    max_train_examples: int | None = None
    grad_clip: float = 1.0
    #: train only the classification head on cached encoder features (the encoder stays as loaded).
    #: Not the paper's set-up: for CPU-only machines where full fine-tuning of a base model takes hours.
    head_only: bool = False

    def resolved(self, task_name: str) -> FinetuneConfig:
        lr, bs = TABLE8.get(task_name, TABLE8["sst2"])
        if self.head_only:
            lr, bs = HEAD_ONLY_LR, 32
        c = FinetuneConfig(**asdict(self))
        c.learning_rate = self.learning_rate or lr
        c.batch_size = self.batch_size or bs
        return c


def loader_generator(loader) -> torch.Generator | None:
    """The ``torch.Generator`` that orders a shuffled DataLoader (also under accelerate's wrapper), or None."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "batch_sampler", None)  # accelerate's BatchSamplerShard wraps the original
    for obj in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None),
                getattr(inner, "sampler", None), getattr(loader, "base_dataloader", None)):
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator):
            return gen
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_accelerator():
    """An ``accelerate.Accelerator`` when there is something to accelerate, else ``None`` (plain loop).

    Used when the process was started by ``accelerate launch``/``torchrun`` with several processes
    (``WORLD_SIZE`` > 1) or a CUDA device is present; ``PEGQ_ACCELERATE=1``/``0`` forces it on/off. On a
    CPU-only machine without a launcher the loop runs exactly as without accelerate.
    """
    import os

    force = os.environ.get("PEGQ_ACCELERATE")
    if force is not None:
        want = force.strip().lower() not in ("0", "false", "no", "off", "")
    else:
        want = int(os.environ.get("WORLD_SIZE", "1")) > 1 or torch.cuda.is_available()
    if not want:
        return None
    from accelerate import Accelerator

    # without CUDA, several processes run data-parallel on the CPU (gloo)
    return Accelerator(cpu=not torch.cuda.is_available())


def is_main_process(accelerator) -> bool:
    return accelerator is None or accelerator.is_main_process


def trim_batch(batch: dict) -> dict:
    """Cut right-padded columns beyond the longest sequence of the batch."""
    if "attention_mask" not in batch:
        return batch
    L = int(batch["attention_mask"].sum(1).max())
    return {k: (v[:, :L] if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in batch.items()}


def train_loop(
    model,
    train_loader,
    epochs: float,
    learning_rate: float,
    warmup_ratio: float = 0.0,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    extra_params: list | None = None,
    lr_overrides: dict[int, float] | None = None,
    loss_fn=None,
    state_dir: Path | None = None,
    progress: bool = True,
    desc: str = "fine-tuning",
    accelerator=None,
) -> list[dict]:
    """AdamW + linear warm-up/decay loop shared by fine-tuning and QAT. Returns the loss log.

    With ``state_dir`` the state after each finished epoch is saved there, and a run that finds it
    resumes after the last finished epoch. With an ``accelerate.Accelerator`` it runs unchanged on
    several devices (``accelerate launch``). ``lr_overrides`` maps ``id(parameter)`` to its own peak
    learning rate (no weight decay for those; QAT's activation ranges), on the same warm-up/decay schedule.
    ``loss_fn(batch, outputs)`` replaces the model's own loss (QAT's distillation).
    """
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    if extra_params:
        ids = {id(p) for p in params}
        params += [p for p in extra_params if id(p) not in ids]
    over = lr_overrides or {}
    groups = [{"params": [p for p in params if id(p) not in over]}]
    groups += [{"params": [p], "lr": over[id(p)], "weight_decay": 0.0} for p in params if id(p) in over]
    optim = torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay)
    steps_per_epoch = len(train_loader)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    sched = get_linear_schedule_with_warmup(optim, int(warmup_ratio * total), total)
    plain = model
    if accelerator is not None:
        # the schedule stays in single-process steps (accelerate steps it once per process); each process
        # sees 1/N of every epoch, so the loop counts its own (sharded) steps
        model, optim, train_loader, sched = accelerator.prepare(model, optim, train_loader, sched)
        steps_per_epoch = len(train_loader)
        total = max(1, math.ceil(epochs * steps_per_epoch))
    main = is_main_process(accelerator)
    log: list[dict] = []
    start_epoch = 0
    shuffle_gen = loader_generator(train_loader)
    if state_dir is not None and (state_dir / "state.pt").exists():
        st = torch.load(state_dir / "state.pt", weights_only=False, map_location="cpu")
        plain.load_state_dict(st["model"])
        optim.load_state_dict(st["optim"])
        sched.load_state_dict(st["sched"])
        torch.set_rng_state(st["rng"])
        if shuffle_gen is not None and st.get("loader_rng") is not None:
            shuffle_gen.set_state(st["loader_rng"])
        start_epoch, log = st["epoch"], st["log"]
        print(f"resuming after epoch {start_epoch} from {state_dir}")
    step = start_epoch * steps_per_epoch
    n_epochs = math.ceil(epochs)
    model.train()
    for epoch in range(start_epoch, n_epochs):
        bar = tqdm(train_loader, desc=f"{desc} epoch {epoch + 1}/{n_epochs}", disable=not (progress and main))
        running = 0.0
        for i, batch in enumerate(bar):
            if step >= total:
                break
            batch = trim_batch(batch)
            out = model(**batch)
            loss = out.loss if loss_fn is None else loss_fn(batch, out)
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            if grad_clip:
                if accelerator is not None:
                    accelerator.clip_grad_norm_(params, grad_clip)
                else:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            running = 0.98 * running + 0.02 * loss.item() if i else loss.item()
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if step % 50 == 0 or step == total:
                log.append({"step": step, "epoch": epoch, "loss": float(loss.item())})
        if state_dir is not None and step < total and main:
            with atomic_dir(state_dir) as tmp:
                torch.save(
                    {
                        "model": plain.state_dict(),
                        "optim": optim.state_dict(),
                        "sched": sched.state_dict(),
                        "rng": torch.get_rng_state(),
                        # the shuffle order of the next epochs: without it a resumed run would replay
                        # epoch 1's order and end elsewhere than an uninterrupted one
                        "loader_rng": None if shuffle_gen is None else shuffle_gen.get_state(),
                        "epoch": epoch + 1,
                        "log": log,
                    },
                    tmp / "state.pt",
                )
        if accelerator is not None:
            accelerator.wait_for_everyone()
    model.eval()
    return log


def finetune(
    model_path: str,
    task,
    output_dir: str | Path,
    config: FinetuneConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Fine-tune ``model_path`` on ``task`` (a pegq.data task) and save an HF checkpoint."""
    from .data import encode, make_loader
    from .io import OutputError
    from .models import load_model

    output_dir = Path(output_dir)
    if (output_dir / "config.json").exists() and not overwrite:
        raise OutputError(
            f"{str(output_dir)!r} already holds a checkpoint; pass --overwrite to replace it"
        )
    cfg = (config or FinetuneConfig()).resolved(task.spec.name)
    seed_everything(cfg.seed)
    model, tokenizer = load_model(model_path, num_labels=task.spec.num_labels)
    train = task.train
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    train_ds = encode(train, tokenizer, task.spec, max_length=cfg.max_length)
    loader = make_loader(train_ds, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed)
    state_dir = output_dir.with_name(output_dir.name + ".partial-state")
    accelerator = None if cfg.head_only else make_accelerator()
    t0 = time.perf_counter()
    trainer = train_head_only if cfg.head_only else train_loop
    log = trainer(
        model,
        loader,
        epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        state_dir=state_dir,
        progress=progress,
        accelerator=accelerator,
    )
    train_s = time.perf_counter() - t0
    info = {
        "base_model": str(model_path),
        "task": task.spec.name,
        "train_examples": len(train),
        "config": asdict(cfg),
        "train_seconds": train_s,
        "loss_log": log,
    }
    if not is_main_process(accelerator):  # under `accelerate launch` only the main process writes
        accelerator.wait_for_everyone()
        return {**info, "main_process": False}
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pegq_finetune.json").write_text(json.dumps(info, indent=2))
    if state_dir.exists():
        import shutil

        shutil.rmtree(state_dir, ignore_errors=True)
    atomic_write_json(output_dir / "pegq_finetune.json", info)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return info


# ----------------------------------------------------------------------------------- head-only training


def _head_logits(model, h0: torch.Tensor) -> torch.Tensor:
    """The classification head of ``model`` applied to token-0 features ``h0`` ([N, 1, d])."""
    mt = getattr(model.config, "model_type", None)
    base = model.base_model
    if mt in ("bert", "mobilebert") and getattr(base, "pooler", None) is not None:
        return model.classifier(model.dropout(base.pooler(h0)))
    if mt in ("roberta", "xlm-roberta", "mpnet", "camembert"):
        return model.classifier(h0)
    if mt == "distilbert":
        x = torch.relu(model.pre_classifier(h0[:, 0]))
        return model.classifier(model.dropout(x))
    raise ValueError(f"head-only fine-tuning is not implemented for model_type {mt!r}; "
                     "use full fine-tuning (drop --head-only)")


def _head_parameters(model) -> list[torch.nn.Parameter]:
    base = model.base_model
    params = [p for n, p in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")]
    if getattr(model.config, "model_type", None) in ("bert", "mobilebert") and base.pooler is not None:
        params += list(base.pooler.parameters())
    return params


@torch.no_grad()
def encoder_features(model, loader, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-0 hidden states of the encoder's last layer ([N, 1, d]) and the labels, in loader order."""
    from .api import model_inputs

    model.eval()
    feats, labels = [], []
    for b in tqdm(loader, desc="encoder features", disable=not progress):
        b = trim_batch(b)
        h = model.base_model(**model_inputs(b)).last_hidden_state
        feats.append(h[:, :1].float())
        labels.append(b["labels"])
    return torch.cat(feats), torch.cat(labels)


def train_head_only(
    model,
    loader,
    epochs: float,
    learning_rate: float,
    warmup_ratio: float = 0.0,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    state_dir: Path | None = None,
    progress: bool = True,
    accelerator=None,
) -> list[dict]:
    """Train only the classification head (pooler + classifier for BERT) on cached encoder features.

    The encoder runs once (no gradients); the head is then trained for ``epochs`` passes over the
    cached features with AdamW and linear decay. Same result format as :func:`train_loop`.
    """
    from torch.optim import AdamW
    from transformers import get_linear_schedule_with_warmup

    bs = loader.batch_size or 32
    x, y = encoder_features(model, loader, progress)
    head = _head_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    steps_per_epoch = math.ceil(len(x) / bs)
    total = max(1, math.ceil(steps_per_epoch * epochs))
    optim = AdamW(head, lr=learning_rate, weight_decay=weight_decay)
    sched = get_linear_schedule_with_warmup(optim, int(warmup_ratio * total), total)
    regression = getattr(model.config, "num_labels", 2) == 1
    g = torch.Generator().manual_seed(0)
    log, step = [], 0
    model.train()
    bar = tqdm(total=total, desc="training head", disable=not progress)
    while step < total:
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), bs):
            if step >= total:
                break
            idx = order[i: i + bs]
            logits = _head_logits(model, x[idx])
            if regression:
                loss = torch.nn.functional.mse_loss(logits.squeeze(-1), y[idx].float())
            else:
                loss = torch.nn.functional.cross_entropy(logits, y[idx].long())
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(head, grad_clip)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % 50 == 0 or step == total:
                log.append({"step": step, "epoch": step / steps_per_epoch, "loss": float(loss.item())})
                bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return log
