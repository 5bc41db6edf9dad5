"""QAT training-step time against FP32 fine-tuning-step time (issue 6 target: <= 2x), side by side.

    .venv/bin/python benchmarks/qat_step.py --model minilm
    .venv/bin/python benchmarks/qat_step.py --model mpnet
    .venv/bin/python benchmarks/qat_step.py --model minilm --grad-norms

One training step = forward + backward + gradient clipping (1.0) + AdamW step + zero_grad, on real
rotten_tomatoes training batches (batch 16 by default, each trimmed to its longest sequence as the
training loop does), in train mode (dropout on).

* FP32: the untouched Hugging Face model (its own attention implementation, sdpa).
* QAT: the same weights wrapped with the ``qat-w8a8`` preset (or ``--preset``), calibrated, every range
  learnable (``Quantizer.learn_ranges``), i.e. exactly what ``pegq qat`` trains: every weight and every
  activation fake-quantized with the STE and LSQ gradients.

The two are measured interleaved (FP32 step, QAT step, FP32 step, ...) on the same batches so that the
load of a shared machine hits both alike; the ratio is the median QAT step over the median FP32 step.
``--grad-norms`` also prints the share of the global gradient norm taken by the quantization parameters
with and without LSQ gradient scaling (why pegq scales them, see ``pegq.quant.lsq``), measured before any
training step on the cached rotten_tomatoes fine-tune when it exists (a fresh head's ~1e-4 logit range is
not representative: its learned scale collapses within a few Adam steps).
Timing weights are the pretrained encoder with a fresh classification head: timing does not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cache_dir, model_path  # noqa: E402


def _step_fn(model, params, optim):
    def step(batch):
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)

    return step


def grad_norm_shares(qm, batches, lsq: bool) -> dict:
    """Share of the squared global gradient norm held by quantizer parameters, averaged over batches."""
    for q in qm.quantizers.values():
        q.lsq_grad_scale = lsq
    qparams = {id(p) for q in qm.quantizers.values() for p in q.parameters() if p.requires_grad}
    qm.eval()  # no dropout: the same gradients with and without the scale, apart from the ranges'
    shares, totals = [], []
    for b in batches:
        qm.zero_grad(set_to_none=True)
        qm(**b).loss.backward()
        sq = {True: 0.0, False: 0.0}
        for p in qm.parameters():
            if p.grad is not None:
                sq[id(p) in qparams] += float(p.grad.double().pow(2).sum())
        totals.append((sq[True] + sq[False]) ** 0.5)
        shares.append(sq[True] / max(1e-30, sq[True] + sq[False]))
    qm.zero_grad(set_to_none=True)
    for q in qm.quantizers.values():
        q.lsq_grad_scale = True
    qm.train()
    return {"lsq_grad_scale": lsq, "quant_share_of_sq_norm": statistics.median(shares),
            "global_norm": statistics.median(totals)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    ap.add_argument("--preset", default="qat-w8a8")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12, help="measured steps of each kind")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grad-norms", action="store_true")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import transformers

    transformers.logging.set_verbosity_error()
    from pegq.api import calibrate, quantize
    from pegq.config import get_preset
    from pegq.data import encode, load_task, make_loader
    from pegq.models import load_model
    from pegq.pipeline import calibration_batches
    from pegq.train import seed_everything, trim_batch

    seed_everything(0)
    task = load_task("rotten_tomatoes")
    cfg = get_preset(args.preset)

    def qat_model(path):
        m, tok = load_model(str(path), num_labels=2)
        qm = quantize(copy.deepcopy(m), cfg)
        calibrate(qm, calibration_batches(task, tok, cfg), progress=False)
        for q in qm.quantizers.values():
            if q.enabled:
                q.learn_ranges()
        qm.train()
        return m, qm, tok

    fp32, qm, tok = qat_model(model_path(args.model))
    ds = encode(task.train[: args.batch * (args.steps + 2)], tok, task.spec)
    batches = [trim_batch(b) for b in make_loader(ds, batch_size=args.batch)]
    norms, norms_from = None, None
    if args.grad_norms:
        ft = cache_dir() / f"{args.model}-rotten_tomatoes-e3"
        src = ft if (ft / "config.json").exists() else model_path(args.model)
        _, qm_ft, _ = qat_model(src)
        norms = [grad_norm_shares(qm_ft, batches[:4], lsq) for lsq in (True, False)]
        norms_from = str(src)
        del qm_ft
    fp32.train()
    qm.train()
    p_fp = [p for p in fp32.parameters() if p.requires_grad]
    p_q = [p for p in qm.parameters() if p.requires_grad]
    step_fp = _step_fn(fp32, p_fp, torch.optim.AdamW(p_fp, lr=1e-5))
    step_q = _step_fn(qm, p_q, torch.optim.AdamW(p_q, lr=1e-5))
    for b in batches[:2]:  # warm-up
        step_fp(b)
        step_q(b)
    t_fp, t_q = [], []
    for b in batches[2:]:
        t = time.perf_counter()
        step_fp(b)
        t_fp.append(time.perf_counter() - t)
        t = time.perf_counter()
        step_q(b)
        t_q.append(time.perf_counter() - t)
    fp_ms, q_ms = 1e3 * statistics.median(t_fp), 1e3 * statistics.median(t_q)
    n_q = sum(q.enabled for q in qm.quantizers.values())
    res = {
        "model": args.model, "preset": args.preset, "batch": args.batch, "steps": len(t_fp),
        "threads": args.threads, "mean_tokens": statistics.mean(int(b["input_ids"].shape[1]) for b in batches[2:]),
        "fp32_step_ms": fp_ms, "qat_step_ms": q_ms, "ratio": q_ms / fp_ms, "target": 2.0,
        "quantizers": n_q, "quant_params": sum(p.numel() for q in qm.quantizers.values() for p in q.parameters()),
    }
    if norms is not None:
        res["grad_norms"], res["grad_norms_model"] = norms, norms_from
    print(f"{args.model} ({args.preset}, batch {args.batch}, {args.threads} threads, {len(t_fp)} steps each, "
          f"mean padded length {res['mean_tokens']:.0f})")
    print(f"  FP32 training step  {fp_ms:8.1f} ms")
    print(f"  QAT training step   {q_ms:8.1f} ms   ({n_q} quantizers learning)")
    print(f"  ratio               {res['ratio']:8.2f}x   (target <= 2x: {'met' if res['ratio'] <= 2 else 'MISSED'})")
    for g in res.get("grad_norms", []):
        print(f"  LSQ grad scale {'on ' if g['lsq_grad_scale'] else 'off'}: quantizer params hold "
              f"{100 * g['quant_share_of_sq_norm']:.1f}% of the squared global grad norm "
              f"(global norm {g['global_norm']:.3g})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
