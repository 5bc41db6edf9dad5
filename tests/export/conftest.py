"""Fixtures for the export tests: a calibrated PEG-PTQ MiniLM (built once), tiny models of each family."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parents[1] / "models"))  # models_helpers (tiny configs)

import pytest  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello!",
    "Quantizing transformer encoders is hard because of strong outliers in the residual stream.",
    "A cat sat on the mat, and then it slept for a long, long time.",
]
OTHER = [
    "an utterly charming and hilarious film that reaches for the stars",
    "dull",
    "the plot is thin, the acting is wooden and the jokes fall flat more often than not",
]


@pytest.fixture(scope="session")
def minilm(minilm_path):
    import transformers

    from pegq.models import load_model

    transformers.logging.set_verbosity_error()
    model, tok = load_model(minilm_path, num_labels=2)
    return model, tok


@pytest.fixture(scope="session")
def minilm_peg(minilm):
    """MiniLM (random 2-class head) with the paper's PEG-PTQ preset, calibrated on 4 sentences."""
    import copy

    import pegq

    model, tok = minilm
    qm = pegq.quantize(copy.deepcopy(model), "peg-ptq")
    calib = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    pegq.calibrate(qm, [calib], progress=False)
    batch = dict(tok(OTHER, padding=True, return_tensors="pt"))
    return qm, tok, batch


@pytest.fixture(scope="session")
def minilm_peg_onnx(minilm_peg, tmp_path_factory):
    """The PEG MiniLM exported with uint8 weights (bit-exact on every x86 CPU) and int8 weights."""
    from pegq.export.onnx import export_onnx

    qm, _, _ = minilm_peg
    d = tmp_path_factory.mktemp("onnx")
    exact = export_onnx(qm, d / "peg_u8w.onnx", weight_dtype="uint8")
    return qm, exact
