"""Real int8 execution of pegq models (see ``docs/architecture.md``, "Real int8 execution").

* :mod:`.rewrite` -- PEG rewritten into per-tensor operations (paper section 4): ``rewrite_peg(qm)``;
* :mod:`.onnx`    -- QDQ ONNX export run by ONNX Runtime's int8 kernels: ``export_onnx(qm, path)``,
  ``kernel_report``, ``per_tensor_parity``;
* :mod:`.packed`  -- bit-packed checkpoints: ``save_packed`` / ``load_packed``;
* :mod:`.jobs`, :mod:`.cli` -- ``pegq export onnx`` / ``pegq export packed``.

    qm = pegq.quantize(model, "peg-ptq"); pegq.calibrate(qm, batches)
    from pegq.export import export_onnx, save_packed
    export_onnx(qm, "model.onnx")          # PEG rewritten automatically
    save_packed(qm, "packed/", tokenizer)
"""

# imported lazily: `pegq --help` loads the `export` sub-app (cli.py) without torch
_API = {
    "ExportError": "onnx",
    "export_onnx": "onnx",
    "kernel_report": "onnx",
    "per_tensor_parity": "onnx",
    "PackedError": "packed",
    "load_packed": "packed",
    "save_packed": "packed",
    "RewriteError": "rewrite",
    "rewrite_peg": "rewrite",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'pegq.export' has no attribute {name!r}")
