"""pegq.api: evaluation on trimmed batches equals evaluation on batches padded to 128."""

from __future__ import annotations

import numpy as np
import torch

from pegq import calibrate, predict, quantize
from pegq.config import resolve_config
from pegq.data import load_task
from pegq.models import load_model
from pegq.pipeline import calibration_batches, dev_loader


def test_trimmed_eval_equals_padded_eval_when_frozen(minilm_path):
    torch.manual_seed(0)
    model, tok = load_model(minilm_path, num_labels=2)
    task = load_task("rotten_tomatoes")
    cfg = resolve_config("w8a8")
    cfg.calibration.num_batches = 4
    qm = quantize(model, cfg)
    calibrate(qm, calibration_batches(task, tok, cfg), progress=False)
    loader = dev_loader(task, tok, batch_size=16, max_examples=48)
    assert loader.dataset[0]["input_ids"].shape[-1] == 128  # padded to 128 as in appendix B.1
    a, la = predict(qm, loader, progress=False, trim=True)
    b, lb = predict(qm, loader, progress=False, trim=False)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # and the quantized logits really differ from FP32 ones (the quantizers are on)
    from pegq.peg import quantizers_off

    with quantizers_off(qm):
        c, _ = predict(qm, loader, progress=False)
    assert np.abs(a - c).max() > 1e-3
