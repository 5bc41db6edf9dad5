"""pegq: quantize transformer encoders despite their activation outliers.

The public Python API (imported lazily, so ``import pegq`` stays cheap and has no side effects)::

    import pegq
    qm = pegq.quantize(model, "w8a8")                 # wrap + configure every quantizer
    pegq.calibrate(qm, batches)                       # static range estimation, then freeze
    pegq.evaluate(qm, loader, task.spec)              # the task's metric
    pegq.run_ptq(model_dir, "rotten_tomatoes", "peg-ptq", "runs/x")   # the whole `pegq ptq` job
"""

__version__ = "0.1.0"

_API = {
    "quantize": "api",
    "apply_config": "api",
    "calibrate": "api",
    "evaluate": "api",
    "predict": "api",
    "quantizer_summary": "api",
    "run_ptq": "pipeline",
    "QuantConfig": "config",
    "QuantizerSettings": "config",
    "get_preset": "config",
    "resolve_config": "config",
    "PRESETS": "config",
    "load_model": "models",
    "wrap": "models",
    "load_task": "data",
    "run_analysis": "analysis",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'pegq' has no attribute {name!r}")
