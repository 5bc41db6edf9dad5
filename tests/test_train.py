"""pegq.train: head-only fine-tuning trains the head and leaves the encoder exactly as loaded."""

from __future__ import annotations

import json

import pytest
import torch

from pegq.data import load_task
from pegq.models import load_model
from pegq.train import FinetuneConfig, finetune


def test_head_only_trains_head_not_encoder(minilm_path, tmp_path):
    task = load_task("rotten_tomatoes")
    out = tmp_path / "ho"
    info = finetune(minilm_path, task, out, FinetuneConfig(head_only=True, epochs=3, max_train_examples=256),
                    progress=False)
    assert info["config"]["learning_rate"] == pytest.approx(1e-3)
    before, _ = load_model(minilm_path, num_labels=2)
    after, _ = load_model(str(out), num_labels=2)
    b, a = before.state_dict(), after.state_dict()
    enc = [k for k in a if k.startswith("bert.encoder.") or k.startswith("bert.embeddings.")]
    assert enc and all(torch.equal(a[k], b[k]) for k in enc)
    # the pooler and the classifier moved (the classifier starts from a fresh random init in both)
    assert not torch.equal(a["bert.pooler.dense.weight"], b["bert.pooler.dense.weight"])
    losses = [r["loss"] for r in info["loss_log"]]
    assert losses, info
    meta = json.loads((out / "pegq_finetune.json").read_text())
    assert meta["config"]["head_only"] is True


def test_head_only_unknown_family_is_a_clear_error():
    from pegq.train import _head_logits

    class Cfg:
        model_type = "gpt2"

    class M(torch.nn.Module):
        config = Cfg()
        base_model = torch.nn.Identity()

    with pytest.raises(ValueError, match="gpt2"):
        _head_logits(M(), torch.zeros(1, 1, 4))


def test_train_loop_gives_overridden_parameters_their_own_learning_rate():
    """``lr_overrides`` (QAT's activation-range learning rate): Adam's first step moves each parameter by
    about its own peak learning rate, and the overridden ones get no weight decay."""
    from types import SimpleNamespace

    from pegq.train import train_loop

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.ones(3))
            self.b = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return SimpleNamespace(loss=((self.a * x).sum() + (self.b * x).sum()) ** 2)

    m = Tiny()
    loader = [{"x": torch.tensor([1.0, -2.0, 3.0])}]
    train_loop(m, loader, epochs=1, learning_rate=1e-4, weight_decay=0.5, grad_clip=0.0,
               lr_overrides={id(m.a): 1e-2}, progress=False)
    da, db = (1 - m.a.detach()).abs(), (1 - m.b.detach()).abs()
    assert torch.allclose(da, torch.full((3,), 1e-2), rtol=1e-3), da  # no decay on a
    assert torch.allclose(db, torch.full((3,), 1e-4 * (1 + 0.5)), rtol=0.7), db  # step + decoupled decay
    assert da.min() > 50 * db.max()


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    """A run killed in epoch 2 and restarted resumes after epoch 1 and ends with exactly the weights of an
    uninterrupted run: the shuffle order of the later epochs and the dropout RNG are restored too."""
    from types import SimpleNamespace

    from pegq.data import make_loader
    from pegq.train import train_loop

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(4, 1)
            self.drop = torch.nn.Dropout(0.3)

        def forward(self, x, y):
            return SimpleNamespace(loss=((self.lin(self.drop(x)).squeeze(-1) - y) ** 2).mean())

    g = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(4, generator=g), "y": torch.randn((), generator=g)} for _ in range(24)]

    def run(state_dir, fail_at=None):
        torch.manual_seed(0)
        m = Net()
        calls = {"n": 0}

        def loss_fn(batch, out):
            calls["n"] += 1
            if fail_at is not None and calls["n"] == fail_at:
                raise KeyboardInterrupt("killed")
            return out.loss

        loader = make_loader(data, batch_size=4, shuffle=True, seed=0)
        train_loop(m, loader, epochs=3, learning_rate=1e-2, loss_fn=loss_fn, state_dir=state_dir, progress=False)
        return m, calls["n"]

    ref, n_ref = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "state", fail_at=9)  # 6 steps per epoch: dies in epoch 2
    resumed, n = run(tmp_path / "state")
    assert n == n_ref - 6  # epoch 1 was not redone
    for a, b in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), (a, b)
