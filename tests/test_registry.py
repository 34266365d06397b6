"""Acceptance 1 (connector and scorer part): extension points are registries.

A new connector (one .py in a temp package + one YAML in a temp config dir) and a new scorer
(one class in one file of a temp package) are written to tmp_path; the parametrised tests of
tests/test_connectors.py and tests/test_scorers.py enumerate them from the registries (Hydra's
`connector` group on `hydra.searchpath`, the scorer registry via $VLMLAB_SCORERS) and pass
on them, with no edit anywhere else. The LLM preset + chat template part is not covered here.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import test_connectors as connectors_tests
from tests import test_scorers as scorers_tests
from vlmlab.eval import scorers
from vlmlab.eval.scorers import base as scorer_base

PACKAGE = "vlmlab_ext_pkg"

GATED = '''
"""A gated linear connector: Linear, then a learned scalar gate (tanh), as Flamingo gates."""

import torch
from torch import nn


class GatedLinearConnector(nn.Module):
    def __init__(self, in_features: int, out_features: int, gate_init: float = 0.5) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    @classmethod
    def expected_num_parameters(cls, in_features, out_features, gate_init=0.5):
        return in_features * out_features + out_features + {extra}

    def num_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.gate) * self.proj(features)
'''

GATED_YAML = f"""# a connector from outside the package
_target_: {PACKAGE}.gated.GatedLinearConnector
gate_init: 0.5
init_seed: 0
"""

CONTAINS = '''
"""`type: contains`: right when any answer appears in the prediction (a lenient VQA reading)."""

from vlmlab.eval.scorers import Query, Scorer, normalize_exact


class ContainsScorer(Scorer):
    name = "contains"
    prompt = None
    example = {"question": "What is shown?", "answers": ["red circle"]}
    example_right, example_wrong = "I see a red circle.", "a blue square"

    def score(self, query: Query, prediction: str) -> float:
        text = f" {normalize_exact(prediction)} "
        return float(any(f" {normalize_exact(a)} " in text for a in query.item.answers))
'''


@pytest.fixture
def extension(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temp package on sys.path and a temp config dir; the registries restored afterwards."""
    root = tmp_path / "ext"
    (root / PACKAGE).mkdir(parents=True)
    (root / PACKAGE / "__init__.py").write_text("")
    (root / "conf" / "connector").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(root))
    saved = dict(scorer_base._REGISTRY)
    yield root
    scorer_base._REGISTRY.clear()
    scorer_base._REGISTRY.update(saved)
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def _write_connector(root: Path, extra_parameters: int = 1) -> Path:
    (root / PACKAGE / "gated.py").write_text(textwrap.dedent(GATED.format(extra=extra_parameters)))
    (root / "conf" / "connector" / "gated.yaml").write_text(GATED_YAML)
    return root / "conf"


def test_a_new_connector_is_picked_up_by_the_connector_tests(extension: Path, compose_cfg) -> None:
    conf = _write_connector(extension)
    assert "gated" not in connectors_tests.OPTIONS  # conf/ alone does not have it
    assert "gated" in connectors_tests.connector_options(conf)  # Hydra's group, search path on
    with_ext = connectors_tests.SearchPathCompose(compose_cfg, conf)
    # the parametrised connector tests, run on the new option (composed + built via build_vlm)
    connectors_tests.test_every_option_names_a_connector_with_a_size_formula(with_ext, "gated")
    connectors_tests.test_shape_tokens_and_gradients(with_ext, "gated")
    connectors_tests.test_vlm_forward_gives_finite_loss(with_ext, "gated")
    connectors_tests.test_shipped_size_matches_its_class_formula(with_ext, "gated")
    connectors_tests.test_built_connector_size_matches_formula(with_ext, "gated")


def test_a_new_connector_with_a_wrong_formula_fails_the_size_tests(
    extension: Path, compose_cfg
) -> None:
    """The enumeration is not a formality: a formula off by one is caught on the new option."""
    conf = _write_connector(extension, extra_parameters=2)
    with_ext = connectors_tests.SearchPathCompose(compose_cfg, conf)
    with pytest.raises(AssertionError):
        connectors_tests.test_shipped_size_matches_its_class_formula(with_ext, "gated")
    with pytest.raises(AssertionError):
        connectors_tests.test_built_connector_size_matches_formula(with_ext, "gated")


def test_a_new_scorer_is_registered_and_scored_by_the_runner(
    extension: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (extension / PACKAGE / "contains.py").write_text(textwrap.dedent(CONTAINS))
    assert "contains" not in scorers.registered()
    monkeypatch.setenv(scorers.ENV_MODULES, f"{PACKAGE}.contains")
    assert "contains" in scorers.registered()
    # the registry-parametrised scorer test, on the new type: read, prompt, score, summarise
    scorers_tests.test_every_scorer_scores_its_example_through_the_runner("contains", tmp_path)
    scorers_tests.test_an_unknown_type_is_rejected_listing_every_registered_type(tmp_path)
    bench = tmp_path / "unknown.jsonl"
    bench.write_text('{"id": "a", "question": "Q", "answer": "x", "type": "essay"}\n')
    from vlmlab.eval.runner import read_benchmark

    _, rejected = read_benchmark(bench)
    assert "contains" in rejected[0]["reason"]  # the unknown-type error lists the new type


def test_an_unimportable_scorer_module_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlmlab.errors import ConfigError

    monkeypatch.setenv(scorers.ENV_MODULES, "no_such_scorer_module_xyz")
    with pytest.raises(ConfigError, match=r"VLMLAB_SCORERS.*no_such_scorer_module_xyz") as info:
        scorers.discover()
    assert info.value.key == scorers.ENV_MODULES
