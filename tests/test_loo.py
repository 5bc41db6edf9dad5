"""Leave-one-out diagnosis (paper Table 2): kinds derived from names, the rows, a small real run on
MiniLM that is interrupted and resumed, the outputs and the CLI."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from pegq import loo as loo_mod
from pegq.config import ConfigError
from pegq.io import OutputError
from pegq.loo import activation_kinds, leave_one_out, plan_rows, quantizer_kind, summarize

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bert_names(layers: int, head: bool = True) -> list[str]:
    per_layer = ["attn.query", "attn.key", "attn.value", "attn.scores", "attn.probs", "attn.context",
                 "attn.output", "attn.residual_sum", "attn.layernorm", "ffn.intermediate", "ffn.output",
                 "ffn.residual_sum", "ffn.layernorm"]
    names = ["embeddings.sum_token_type", "embeddings.sum", "embeddings.layernorm"]
    names += [f"encoder.layer.{i}.{k}" for i in range(layers) for k in per_layer]
    names += ["pooler"] + (["classifier.output"] if head else [])
    return names


# --------------------------------------------------------------------------- kinds and rows
@pytest.mark.parametrize(
    "name, kind, layer",
    [
        ("encoder.layer.3.attn.scores", "attn.scores", 3),
        ("encoder.layer.11.ffn.residual_sum", "ffn.residual_sum", 11),
        ("encoder.layer.0.ffn.2.output", "ffn.2.output", 0),  # MobileBERT's stacked FFNs
        ("embeddings.sum", "embeddings.sum", None),
        ("classifier.output", "classifier.output", None),
    ],
)
def test_quantizer_kind(name, kind, layer):
    assert quantizer_kind(name) == (kind, layer)


def test_kinds_are_derived_from_names():
    kinds = activation_kinds(bert_names(6))
    assert len(kinds) == 3 + 13 + 2
    assert list(kinds["ffn.residual_sum"]) == list(range(6))
    assert kinds["pooler"] == {None: ["pooler"]}


@pytest.mark.parametrize("layers", [6, 12, 3])
def test_rows_follow_the_paper_and_the_model(layers):
    names = bert_names(layers)
    rows = plan_rows(names, sweep_kind="ffn.residual_sum")
    ids = [r["id"] for r in rows]
    # Table 2's order first, then every other kind, then the sweep
    assert ids[:8] == ["fp32", "all", "except:attn.scores", "except:embeddings.sum", "except:attn.output",
                       "except:attn.probs", "except:ffn.residual_sum", "except:ffn.residual_sum@last2"]
    by_id = {r["id"]: r for r in rows}
    assert by_id["all"]["fp32"] == [] and len(by_id["fp32"]["fp32"]) == len(names)
    assert len(by_id["except:attn.scores"]["fp32"]) == layers
    last2 = by_id["except:ffn.residual_sum@last2"]
    assert last2["layers"] == [layers - 2, layers - 1]  # never hard-coded to 10, 11
    assert last2["fp32"] == [f"encoder.layer.{i}.ffn.residual_sum" for i in (layers - 2, layers - 1)]
    assert by_id["except:classifier.output"]["fp32"] == ["classifier.output"]
    sweep = [r for r in rows if r["id"].startswith("except:ffn.residual_sum@") and r["layers"] and len(
        r["layers"]) == 1 and "last" not in r["id"]]
    assert [r["fp32"] for r in sweep] == [[f"encoder.layer.{i}.ffn.residual_sum"] for i in range(layers)]
    assert len(rows) == 2 + 18 + 1 + layers


def test_row_options_and_bad_kinds():
    names = bert_names(6)
    rows = plan_rows(names, kinds=["ffn.residual_sum", "attn.probs"], last_layers=0)
    assert [r["id"] for r in rows] == ["fp32", "all", "except:attn.probs", "except:ffn.residual_sum"]
    with pytest.raises(ConfigError, match="did you mean ffn.residual_sum"):
        plan_rows(names, kinds=["ffn.residual_summ"])
    with pytest.raises(ConfigError, match="unknown quantizer kind 'ffn.resid'"):
        plan_rows(names, sweep_kind="ffn.resid")
    with pytest.raises(ConfigError, match="not per layer"):
        plan_rows(names, sweep_kind="pooler")


def test_summary_marks_rows_that_recover_most():
    rows = plan_rows(bert_names(2), kinds=["attn.scores", "ffn.residual_sum", "pooler"], last_layers=1)
    fp32 = {"score": 90.0}
    scores = {"all": 50.0, "except:attn.scores": 52.0, "except:ffn.residual_sum": 88.0,
              "except:ffn.residual_sum@last1": 75.0, "except:pooler": 49.0}
    done = {f"{k}|seed={s}": {"score": v + s, "agreement": 80.0} for k, v in scores.items() for s in (0, 1, 2)}
    out = {x["id"]: x for x in summarize(rows, done, [0, 1, 2], fp32)}
    assert out["all"]["median"] == 51.0
    assert out["except:ffn.residual_sum"]["recovered"] == pytest.approx((89 - 51) / (90 - 51))
    assert out["except:ffn.residual_sum"]["best"] and out["except:ffn.residual_sum"]["marked"]
    assert out["except:ffn.residual_sum@last1"]["marked"] and not out["except:ffn.residual_sum@last1"]["best"]
    assert not out["except:attn.scores"]["marked"] and not out["except:pooler"]["marked"]
    assert out["fp32"]["recovered"] is None and not out["fp32"]["marked"]


# --------------------------------------------------------------------------- a small real run
@pytest.fixture
def recorder(monkeypatch):
    """Wrap loo._score: record which quantizers were on for every call; optionally interrupt."""
    calls: list[dict] = []
    real = loo_mod._score
    state = {"interrupt_at": None}

    def fake(qm, loader, spec, progress, desc):
        acts = qm.activation_quantizers()
        calls.append({
            "desc": desc,
            "off": sorted(n for n, q in acts.items() if not q.enabled),
            "weights_on": sum(q.enabled for q in qm.weight_quantizers().values()),
            "bits": {q.bits for q in acts.values() if q.enabled},
            "n_acts": len(acts),
        })
        if state["interrupt_at"] is not None and len(calls) == state["interrupt_at"]:
            raise KeyboardInterrupt
        return real(qm, loader, spec, progress, desc)

    monkeypatch.setattr(loo_mod, "_score", fake)
    return calls, state


def test_small_real_run_interrupted_then_resumed(minilm_path, tmp_path, recorder):
    calls, state = recorder
    out = tmp_path / "loo"
    kw = dict(kinds=["ffn.residual_sum"], last_layers=2, seeds=[0], max_eval_examples=8, eval_batch_size=8,
              progress=False)
    state["interrupt_at"] = 3  # FP32, "all", then stop during "except:ffn.residual_sum"
    with pytest.raises(KeyboardInterrupt):
        leave_one_out(minilm_path, "rotten_tomatoes", out, **kw)
    partial = json.loads((out / "loo.partial.json").read_text())
    assert partial["fp32"] is not None and list(partial["done"]) == ["all|seed=0"]
    assert not (out / "loo.json").exists()

    state["interrupt_at"] = None
    first = len(calls)
    res = leave_one_out(minilm_path, "rotten_tomatoes", out, **kw)
    redone = [c["desc"] for c in calls[first:]]
    assert redone == ["except:ffn.residual_sum", "except:ffn.residual_sum@last2"]  # FP32 and "all" not redone
    assert [c["desc"] for c in calls].count("FP32 eval") == 1

    # what was quantized in each scoring call (weights always FP32, activations 8-bit)
    by_desc = {c["desc"]: c for c in calls}
    assert by_desc["FP32 eval"]["off"] == sorted(by_desc["FP32 eval"]["off"]) and len(
        by_desc["FP32 eval"]["off"]) == 83
    assert by_desc["all"]["off"] == [] and by_desc["all"]["bits"] == {8}
    assert by_desc["except:ffn.residual_sum"]["off"] == [f"encoder.layer.{i}.ffn.residual_sum" for i in range(6)]
    assert by_desc["except:ffn.residual_sum@last2"]["off"] == [
        "encoder.layer.4.ffn.residual_sum", "encoder.layer.5.ffn.residual_sum"]
    assert all(c["weights_on"] == 0 for c in calls)

    # outputs
    saved = json.loads((out / "loo.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert not (out / "loo.partial.json").exists()
    assert [r["id"] for r in saved["rows"]] == ["fp32", "all", "except:ffn.residual_sum",
                                                "except:ffn.residual_sum@last2"]
    assert saved["dev_examples"] == 8 and saved["activation_quantizers"] == 83 and saved["num_layers"] == 6
    assert saved["setup"]["estimator"] == "current_minmax" and saved["setup"]["calib_batch_size"] == 1
    for r in saved["rows"]:
        assert 0.0 <= r["median"] <= 100.0
        assert r["agreement_median"] is not None
    assert saved["rows"][0]["median"] == saved["fp32"]["score"]
    md = (out / "loo.md").read_text()
    assert "| all, except residual connections after FFN (ffn.residual_sum) | 6 |" in md
    assert "same as above, but for layers 4, 5 only" in md

    # a finished run is not overwritten silently; other settings do not resume a foreign partial
    with pytest.raises(OutputError, match="--overwrite"):
        leave_one_out(minilm_path, "rotten_tomatoes", out, **kw)
    other = tmp_path / "other"
    other.mkdir()
    (other / "loo.partial.json").write_text(json.dumps({"signature": {"model": "x"}, "done": {}}))
    with pytest.raises(OutputError, match="other settings"):
        leave_one_out(minilm_path, "rotten_tomatoes", other, **kw)


# --------------------------------------------------------------------------- CLI
def test_cli_loo_errors_are_one_line(minilm_path, tmp_path):
    from pegq.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["loo", "-m", minilm_path, "-t", "rotten_tomatoes", "-o", str(tmp_path / "o"),
                              "--sweep-kind", "ffn.residual_summ", "-q"], catch_exceptions=False)
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert text.startswith("error:") and len(text.splitlines()) == 1, text
    assert "ffn.residual_sum" in text
    assert not (tmp_path / "o" / "loo.json").exists()
    res = runner.invoke(app, ["loo", "-m", minilm_path, "-t", "rotten_tomatoes", "-o", str(tmp_path / "p"),
                              "--act-estimator", "percentile", "-q"], catch_exceptions=False)
    assert res.exit_code == 2 and "percentile" in res.output
    res = runner.invoke(app, ["--help"])
    assert "loo" in res.output


def test_trimmed_loader_gives_the_padded_logits(minilm_path):
    """Length-sorted batches cut to their longest sequence: same examples, labels and logits (to float
    rounding) as the 128-padded pipeline loader, with a quantized model (static ranges)."""
    import numpy as np
    import torch

    from pegq.api import calibrate, predict, quantize
    from pegq.config import get_preset
    from pegq.loo import TrimmedLoader, eval_loader
    from pegq.pipeline import calibration_batches, dev_loader, load_task_and_model

    task, model, tok = load_task_and_model(minilm_path, "rotten_tomatoes")
    qm = quantize(model, "peg-6p")
    calibrate(qm, calibration_batches(task, tok, get_preset("peg-6p")), progress=False)
    padded = dev_loader(task, tok, batch_size=8, max_examples=24)
    trimmed = eval_loader(task, tok, batch_size=8, max_examples=24)
    assert isinstance(trimmed, TrimmedLoader) and len(trimmed) == 3
    widths = [b["input_ids"].shape[1] for b in trimmed]
    assert widths == sorted(widths, reverse=True) and widths[0] < 128
    lp, yp = predict(qm, padded, progress=False)
    lt, yt = predict(qm, trimmed, progress=False)
    order = torch.argsort(padded.dataset.tensors["attention_mask"].sum(1), descending=True, stable=True).numpy()
    np.testing.assert_array_equal(yt, yp[order])
    np.testing.assert_allclose(lt, lp[order], rtol=0, atol=1e-5)
    assert (lt.argmax(-1) == lp[order].argmax(-1)).all()
