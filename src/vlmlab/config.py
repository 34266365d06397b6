"""Where the Hydra config tree lives, and composing it in-process (tests, `vlmlab demo`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig


def conf_dir() -> Path:
    """$VLMLAB_CONF, else the repo's `conf/` (editable install or source checkout)."""
    env = os.environ.get("VLMLAB_CONF")
    if env:
        return Path(env).resolve()
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "conf" / "train.yaml"
        if candidate.is_file():
            return candidate.parent
    raise FileNotFoundError(
        "vlmlab config tree not found: install with `pip install -e .` from the repo or set VLMLAB_CONF=<repo>/conf."
    )


_NUMERIC_CHOICE = re.compile(r"^(?P<key>[+~]{0,2}[A-Za-z_][\w/@.]*)=(?P<value>\d+(,\d+)*)$")


def quote_numeric_choices(overrides: list[str], root: Path | None = None) -> list[str]:
    """`stage=2` -> `stage='2'`: Hydra parses 2 as an int and rejects it as a group option.

    Only keys that are config groups (folders of conf/) are touched, so `seed=1,2` stays numeric.
    """
    root = root or conf_dir()
    out = []
    for item in overrides:
        match = _NUMERIC_CHOICE.match(item)
        group = match and match["key"].lstrip("+~").split("@")[0]
        if match and group and (root / group).is_dir():
            values = ",".join(f"'{v}'" for v in match["value"].split(","))
            item = f"{match['key']}={values}"
        out.append(item)
    return out


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose like `python train.py <overrides>` and register it as the current Hydra config.

    Per-stage deltas are part of the composition (conf/recipe/<experiment>/<stage>.yaml, see
    conf/train.yaml), so what this returns is what runs. Raises ConfigError on unknown keys.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(
            config_name=config_name,
            overrides=quote_numeric_choices(list(overrides or [])),
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    from vlmlab.schema import validate

    validate(cfg)  # every misspelt key, at once, before anything is built
    return cfg
