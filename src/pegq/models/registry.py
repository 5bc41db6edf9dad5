"""Pick the adapter for a model (from ``config.model_type``) and load models from disk or the hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn
from torch.nn.utils import parametrize

from . import bert, distilbert, mobilebert, mpnet, roberta
from .base import ATTN_ATTR, QuantizedModel, _AdapterForward

ADAPTERS = {
    "bert": bert.wrap,
    "roberta": roberta.wrap,
    "mpnet": mpnet.wrap,
    "distilbert": distilbert.wrap,
    "mobilebert": mobilebert.wrap,
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(ADAPTERS)


class ModelError(ValueError):
    """A user-facing model problem (unsupported architecture, missing folder, no hub access, ...); the
    message is one line saying what to do."""


ModelLoadError = ModelError  # older name


def check_family(model_type: str | None) -> str:
    if model_type not in ADAPTERS:
        raise ModelError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return model_type


def wrap(hf_model: nn.Module) -> QuantizedModel:
    """Wrap a Hugging Face encoder in place: every weight and activation quantizer, all off."""
    if isinstance(hf_model, QuantizedModel):
        raise ValueError("this model is already a QuantizedModel")
    config = getattr(hf_model, "config", None)
    if config is None:
        raise ValueError(f"{type(hf_model).__name__} has no .config; pass a Hugging Face PreTrainedModel")
    family = check_family(getattr(config, "model_type", None))
    for m in hf_model.modules():
        adapted = isinstance(m.__dict__.get("forward"), _AdapterForward)
        if parametrize.is_parametrized(m) or ATTN_ATTR in m.__dict__ or adapted:
            raise ValueError(
                "this model already carries pegq hooks/parametrizations (wrapped twice?); "
                "call .unwrap() on the existing QuantizedModel first"
            )
    return ADAPTERS[family](hf_model)


# --------------------------------------------------------------------------- loading


class LoadedModel(NamedTuple):
    model: nn.Module
    tokenizer: Any


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _looks_like_path(src: str) -> bool:
    if src.startswith(("/", "./", "../", "~", ".")) or "\\" in src or src.endswith("/"):
        return True
    if src.count("/") > 1:
        return True
    parent = Path(src).parent
    return str(parent) not in ("", ".") and parent.exists()


def load_model(
    path_or_hub_id: str | os.PathLike,
    task_num_labels: int | None = None,
    for_classification: bool = True,
    *,
    num_labels: int | None = None,
) -> LoadedModel:
    """Load ``(model, tokenizer)``.

    * local folder: must exist and hold ``config.json``;
    * anything else that looks like a hub id (``name`` or ``org/name``) goes to ``from_pretrained``
      (works with internet access; without, a one-line :class:`ModelError` says to pass a folder).

    With ``for_classification`` the model is ``AutoModelForSequenceClassification`` with
    ``task_num_labels`` labels (the checkpoint's own count if None; problem type ``regression`` for 1
    label), otherwise the bare ``AutoModel``. ``num_labels`` is an alias of ``task_num_labels``.
    The architecture must be one of :data:`SUPPORTED_FAMILIES`. Errors: :class:`ModelError`.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    if num_labels is not None:
        if task_num_labels is not None and task_num_labels != num_labels:
            raise ModelError(f"task_num_labels={task_num_labels} and num_labels={num_labels} disagree")
        task_num_labels = num_labels
    src = os.fspath(path_or_hub_id)
    path = Path(src).expanduser()
    local = path.exists()
    if local:
        if not path.is_dir():
            raise ModelError(f"model path '{src}' is not a folder; pass a Hugging Face model folder")
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model folder '{src}' has no config.json; pass a folder written by save_pretrained()"
            )
        src = str(path)
    elif _looks_like_path(src):
        raise ModelError(f"model folder '{src}' does not exist")

    def fail(what: str, e: BaseException) -> ModelError:
        if local:
            return ModelError(f"cannot load the {what} from '{src}': {_one_line(e)}")
        return ModelError(
            f"cannot load '{src}' ({what}) from the Hugging Face hub: no hub access or no such model "
            f"({_one_line(e, 100)}); pass a local model folder instead"
        )

    try:
        config = AutoConfig.from_pretrained(src)
    except (OSError, ValueError, KeyError) as e:
        raise fail("config", e) from e
    check_family(getattr(config, "model_type", None))

    try:
        if for_classification:
            if task_num_labels is not None:
                if task_num_labels < 1:
                    raise ModelError(f"task_num_labels must be >= 1, got {task_num_labels}")
                archs = getattr(config, "architectures", None) or []
                if any(a.endswith("ForSequenceClassification") for a in archs) and (
                    config.num_labels != task_num_labels
                ):
                    raise ModelError(
                        f"'{src}' is a classifier with {config.num_labels} labels but the task has "
                        f"{task_num_labels}; use a checkpoint without a head or one fine-tuned for this task"
                    )
                config.num_labels = task_num_labels
            if config.num_labels == 1:
                config.problem_type = "regression"
            elif config.problem_type == "regression":
                config.problem_type = None
            model = AutoModelForSequenceClassification.from_pretrained(src, config=config)
        else:
            model = AutoModel.from_pretrained(src, config=config)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise fail("model weights", e) from e

    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise fail("tokenizer", e) from e
    model.eval()
    return LoadedModel(model, tokenizer)
