"""Benchmark scorers: one `Scorer` class per benchmark row `type`, one file each.

The built-in types are `vqa`, `exact`, `pope` and `mc`; any module of this package, or a user
module named in `$VLMLAB_SCORERS` / `EXTRA_MODULES`, adds more (see `base`). The metric
functions stay importable from here (`scorers.vqa_accuracy`, ...).
"""

from __future__ import annotations

from vlmlab.eval.scorers.base import (
    DEFAULT_TYPE,
    ENV_MODULES,
    EXTRA_MODULES,
    MC_PROMPT,
    SHORT_ANSWER_PROMPT,
    Item,
    Query,
    Row,
    RowError,
    Scorer,
    Settings,
    discover,
    get_scorer,
    register,
    registered,
    resolve_settings,
)
from vlmlab.eval.scorers.exact import ExactScorer, exact_match, normalize_exact
from vlmlab.eval.scorers.mc import (
    LETTERS,
    MC_EXTRACTS,
    MCScorer,
    choice_correct,
    circular_accuracy,
    extract_choice,
    mmbench_infer,
    rotate_options,
)
from vlmlab.eval.scorers.pope import PopeScorer, pope_metrics, pope_parse
from vlmlab.eval.scorers.vqa import (
    VQA_MODES,
    VQAScorer,
    evalai_answer_processor,
    vqa_accuracy,
    vqa_normalize,
    vqa_process_digit_article,
    vqa_process_punctuation,
)

__all__ = [
    "DEFAULT_TYPE",
    "ENV_MODULES",
    "EXTRA_MODULES",
    "LETTERS",
    "MC_EXTRACTS",
    "MC_PROMPT",
    "SHORT_ANSWER_PROMPT",
    "VQA_MODES",
    "ExactScorer",
    "Item",
    "MCScorer",
    "PopeScorer",
    "Query",
    "Row",
    "RowError",
    "Scorer",
    "Settings",
    "VQAScorer",
    "choice_correct",
    "circular_accuracy",
    "discover",
    "evalai_answer_processor",
    "exact_match",
    "extract_choice",
    "get_scorer",
    "mmbench_infer",
    "normalize_exact",
    "pope_metrics",
    "pope_parse",
    "register",
    "registered",
    "resolve_settings",
    "rotate_options",
    "vqa_accuracy",
    "vqa_normalize",
    "vqa_process_digit_article",
    "vqa_process_punctuation",
]
