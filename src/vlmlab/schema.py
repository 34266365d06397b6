"""The config's schema: one dataclass per group, and `validate(cfg)` run once at the entry.

Why: code below the entry reads keys with `.get`, so a misspelt key in an experiment file (or on
the command line with `+`) used to be ignored silently. `validate` walks every key of the
composed config against these dataclasses and raises ONE `ConfigError` that lists every problem
with the closest valid key (`llm.tempalte: unknown key (did you mean 'template'?)`).

What is free-form, on purpose: `encoder.config` / `llm.config` (HF architecture numbers),
`llm.tokenizer` (AutoTokenizer keyword arguments), `encoder.timm_kwargs`, `data.sets`,
`stage.train_last`, `trainer.extra_callbacks` items. Connector keys come from the connector
`_target_`'s signature (inspect), so a new connector needs no edit here.

The dataclasses are also the types handed down instead of the raw `DictConfig` (`typed`):
the trainer code takes a `TrainerConfig`, the data sources a `DataConfig`. Only key names are
checked here; values are checked where they are used, with the key named.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union

from omegaconf import DictConfig, ListConfig, Node, OmegaConf

from vlmlab.errors import ConfigError

# Keys Hydra's `instantiate` reads next to `_target_`.
INSTANTIATE_KEYS = frozenset({"_target_", "_recursive_", "_convert_", "_partial_", "_args_"})
RECIPE_HOME = "conf/recipe/<experiment>/<stage>.yaml"
_T = TypeVar("_T")


# ---------------------------------------------------------------------------------- groups
@dataclass
class PathsConfig:
    root: str = "runs"
    data_dir: str = "${paths.root}/data"


@dataclass
class ImageTransformConfig:
    """models.image_transform.ImageTransform, less `size` (from encoder.config.image_size)."""

    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    resize: str = "shortest_edge"
    aspect: str = "pad"
    resample: str = "bicubic"


@dataclass
class AnyResConfig:
    """`encoder.anyres` (read when `encoder.image: anyres`): LLaVA-NeXT tiling, models/anyres.py.

    The tile size is the encoder's `image_size`. `grid_pinpoints`: a list of [a, b] pixel pairs
    (multiples of the tile size; (height, width) in mode transformers, (width, height) in mode
    llava, exactly as each reference reads them) or the range form "(1x1),...,(3x3)".
    """

    grid_pinpoints: Any = "(1x1),...,(2x2)"  # list of [a, b] pairs | "(1x1),...,(NxM)"
    mode: str = "transformers"  # transformers (HF export/eval equal) | llava (LLaVA-NeXT's own)
    newline: bool = True  # a learned image_newline after every row of the tile grid
    max_tiles: int | None = None  # drop pinpoints with more tiles (bounds encoder work)
    pool_budget_tiles: int | None = None  # LLaVA-OneVision anyres_max_N pooling; None: off


@dataclass
class EncoderConfig:
    """`_target_: vlmlab.models.encoder.build_encoder`: HFVisionEncoder or TimmVisionEncoder.

    `image` and `anyres` are read by `build_vlm` (the VLM's image strategy), not the encoder."""

    _target_: str = "vlmlab.models.encoder.build_encoder"
    family: str = "clip"
    backend: str = "transformers"
    name_or_path: str | None = None
    timm_name: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # timm.create_model kwargs
    timm_checkpoint: str | None = None
    pretrained: bool = False
    config: dict[str, Any] = field(default_factory=dict)  # architecture numbers
    select_layer: int = -2
    select_feature: str = "patch"
    init_seed: int = 0
    dtype: str = "float32"
    attn_implementation: str | None = None
    transform: ImageTransformConfig = field(default_factory=ImageTransformConfig)
    image: str = "pad"  # pad: one square per image | anyres: LLaVA-NeXT tiles (encoder.anyres)
    anyres: AnyResConfig = field(default_factory=AnyResConfig)


@dataclass
class LLMConfig:
    _target_: str = "vlmlab.models.llm.build_llm"  # the LLM builder (vlmlab.models.build_vlm)
    name_or_path: str | None = None
    pretrained: bool = False
    dtype: str = "float32"
    init_seed: int = 0
    attn_implementation: str | None = None
    template: str = "vicuna_v1"
    warmup_stage: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # HF config.json numbers
    # tokenizer kwargs + pad_token + backend (auto | sentencepiece: vlmlab.models.llm)
    tokenizer: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    betas: list[float] | None = None
    eps: float | None = None


@dataclass
class LoraConfig:
    target: str = "llm"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False


@dataclass
class QuantizeConfig:
    bits: int = 4


@dataclass
class ParamGroupConfig:
    name: str = ""
    match: Any = None  # a glob or a list of globs
    lr: float | None = None
    weight_decay: float | None = None


@dataclass
class StageConfig:
    name: str = "1"
    title: str = ""
    train: list[str] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)
    train_last: dict[str, int] = field(default_factory=dict)  # {component: N}
    uses: list[str] = field(default_factory=list)
    lora: LoraConfig | None = None
    quantize: QuantizeConfig | None = None
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    global_batch_size: int = 256
    gradient_checkpointing: bool = False
    template: str = "plain"
    dataset: str = "align"
    previous: str | None = None
    init_from: str | None = None
    epochs: int = 1
    evaluate: bool = False


@dataclass
class GeneratorConfig:
    """data.shapes.ShapesSpec."""

    num_images: int = 2000
    num_heldout: int = 200
    image_size: int = 64
    seed: int = 0


@dataclass
class HeldoutConfig:
    max_samples: int | None = None
    batch_size: int = 32
    max_new_tokens: int = 8


@dataclass
class MixtureSourceConfig:
    name: str | None = None
    set: str | None = None
    path: str | None = None
    weight: float | None = None
    count: int | None = None


@dataclass
class FetchConfig:
    """`data.fetch` (data/remote.py): reading shards from URLs / object stores / pipe: commands."""

    retries: int = 8  # failed tries in a row before a read gives up (each resumes at its byte)
    timeout: float = 60.0  # seconds a connection may stall
    backoff: float = 0.5  # first pause between tries, doubling up to 30 s


@dataclass
class DataConfig:
    name: str = "shapes"
    _target_: str = "vlmlab.data.prepare.ShapesSource"  # the data-source kind (data/prepare.py)
    root: str = ""
    generator: GeneratorConfig | None = None
    sets: dict[str, str] = field(default_factory=dict)  # {dataset: set name or path}
    samples_per_shard: int = 250
    batch_size: int = 16
    num_workers: int = 0
    shuffle_buffer: int = 500
    max_length: int = 2048
    heldout: HeldoutConfig | str | None = None  # shapes: eval sizes; files: a JSON path
    mixtures: dict[str, list[MixtureSourceConfig]] | None = None
    mixture_size: int | None = None
    group_by_length: bool = False
    group_megabatch: int = 16
    # rows of whole samples up to max_length, packed from a look-ahead of group_megabatch
    # batches (data/packing.py); group_by_length then has no effect
    packing: bool = False
    # data.tokenize.TextEncoder; None: the stage template's own (vicuna_v1/plain: front, reject)
    image_placement: str | None = None  # front (LLaVA's preprocess_multimodal) | as_is
    special_text: str | None = None  # reject | as_text: control-token text inside the data
    # data/features.py: auto | off | require; stored dtype (None: the encoder's, exact)
    features: str = "off"
    feature_dtype: str | None = None
    # a shard that cannot be read (missing, unreachable after data.fetch.retries): error (naming
    # it) | skip (its samples counted as data/skipped/missing_shard)
    missing_shards: str = "error"
    fetch: FetchConfig = field(default_factory=FetchConfig)
    # a resume at another world size / worker count: exact (replay the run's own batches: the
    # weights of an uninterrupted run; ungrouped batches, same batch_size) | replan (every
    # untrained sample once, in another order; grouped and packed batches too)
    elastic: str = "exact"


@dataclass
class EvalConfig:
    benchmarks: list[str] = field(default_factory=list)
    alias: str | None = None
    batch_size: int = 32
    max_new_tokens: int = 8
    max_samples: int | None = None
    short_answer_prompt: bool = False
    circular: bool = False
    scoring: dict[str, dict[str, str]] = field(default_factory=dict)  # {type: {setting: value}}


@dataclass
class LoggerConfig:
    kind: str = "mlflow"
    tracking_uri: str | None = None
    experiment_name: str = "vlmlab"
    run_name: str | None = None
    samples: int = 4
    # A remote (http) server that goes away: tracking/journal.py
    http_timeout: int = 10  # seconds per request (MLFLOW_HTTP_REQUEST_TIMEOUT)
    http_retries: int = 0  # MLflow's retries per request (vlmlab's sender retries itself)
    retry_interval: float = 5.0  # longest pause between tries while the server is away
    flush_timeout: float = 30.0  # at the end, seconds to wait for an absent server
    # The MLflow UI (tracking/ui.py, models.py, callbacks.SystemMetrics)
    ui_url: str | None = None  # where the UI is served; null: the http(s) store, else :5000
    system_metrics: bool | None = None  # CPU/memory/GPU metrics; null: on when training on a GPU
    system_metrics_interval: float = 10.0  # seconds between samples
    model_name: str | None = None  # registered model of a stage; null: <experiment>-stage<N>


@dataclass
class FsdpConfig:
    """`trainer.fsdp` (training/strategy.py): how FSDP2 shards and saves."""

    state_dict: str = "sharded"  # sharded (one file per rank) | full (gathered on rank 0)
    reshard_after_forward: bool = True
    wrap: list[str] = field(default_factory=lambda: ["llm", "encoder"])  # sharded per block
    cpu_offload: bool = False


@dataclass
class DeepSpeedConfig:
    """`trainer.deepspeed` (training/deepspeed.py): LLaVA's zero*.json as data; the stage-3
    numbers left None take DeepSpeed's values from LLaVA's files."""

    stage: int = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False
    pin_memory: bool = True
    allgather_bucket_size: float = 2e8
    reduce_bucket_size: float = 2e8
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    sub_group_size: float = 1e9
    max_live_parameters: float | None = None
    max_reuse_distance: float | None = None
    prefetch_bucket_size: float | None = None
    param_persistence_threshold: float | None = None
    gather_16bit_weights_on_model_save: bool | None = None


@dataclass
class TrainerConfig:
    """`L.Trainer` keyword arguments plus vlmlab's own keys (removed before `L.Trainer`)."""

    # Other `lightning.Trainer.__init__` arguments a user may pass straight through (a test
    # checks this list against the installed Lightning's signature).
    PASSTHROUGH: ClassVar[frozenset[str]] = frozenset({
        "fast_dev_run", "min_epochs", "min_steps", "max_time", "limit_train_batches",
        "limit_val_batches", "limit_test_batches", "limit_predict_batches", "overfit_batches",
        "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps",
        "enable_checkpointing", "gradient_clip_algorithm", "deterministic", "benchmark",
        "inference_mode", "use_distributed_sampler", "profiler", "detect_anomaly", "barebones",
        "sync_batchnorm", "reload_dataloaders_every_n_epochs", "enable_autolog_hparams",
        "model_registry",
    })  # fmt: skip
    # `L.Trainer` arguments vlmlab sets itself: passing them too would be a duplicate argument.
    RESERVED: ClassVar[dict[str, str]] = {
        "max_epochs": "set stage.epochs",
        "accumulate_grad_batches": "derived from stage.global_batch_size / (data.batch_size x ranks)",
        "logger": "choose logger=mlflow|none",
        "callbacks": "use trainer.extra_callbacks",
        "default_root_dir": "set paths.root",
        "plugins": "set by vlmlab (atomic checkpoint IO)",
    }

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    max_steps: int = -1
    strategy: str = "auto"
    precision: str = "32-true"
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 50
    enable_progress_bar: bool = True
    enable_model_summary: bool = False
    peak_tflops: float | None = None
    emulate_ranks: int | None = None
    fail_after_nonfinite_steps: int = 3  # skipped non-finite steps in a row that fail a run
    fsdp: FsdpConfig | None = None
    deepspeed: DeepSpeedConfig | None = None
    extra_callbacks: list[dict[str, Any]] = field(default_factory=list)
    # Not a YAML key: `typed()` collects the PASSTHROUGH arguments given here.
    lightning: dict[str, Any] = field(default_factory=dict, metadata={"collects": "PASSTHROUGH"})


@dataclass
class CheckpointConfig:
    every_n_steps: int = 50
    keep_previous: bool = True


@dataclass
class DebugConfig:
    record_samples: str | None = None


@dataclass
class RunConfig:
    """The composed `train.yaml` (less `hydra`). `connector` is checked against its `_target_`."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    connector: dict[str, Any] = field(default_factory=dict)
    llm: LLMConfig = field(default_factory=LLMConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    resume: str | None = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


# ------------------------------------------------------------------------------ validation
def _hints(schema: type) -> dict[str, Any]:
    """Config key -> resolved annotation (ClassVars and fields that collect others are not keys)."""
    hints = typing.get_type_hints(schema)
    return {
        f.name: hints[f.name] for f in dataclasses.fields(schema) if "collects" not in f.metadata
    }


def keys_of(schema: type) -> set[str]:
    """The config keys a group's schema accepts (what code that takes plain dicts checks)."""
    return set(_hints(schema)) | set(getattr(schema, "PASSTHROUGH", ()))


GROUP_SCHEMAS: dict[str, type] = {
    name: tp
    for name, tp in _hints(RunConfig).items()
    if isinstance(tp, type) and dataclasses.is_dataclass(tp)
}


def _dataclasses_in(tp: Any) -> tuple[type | None, type | None]:
    """(dataclass for a mapping value, dataclass for list items) that the annotation `tp` names."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        node = item = None
        for arg in typing.get_args(tp):
            n, i = _dataclasses_in(arg)
            node, item = node or n, item or i
        return node, item
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp, None
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return None, arg if isinstance(arg, type) and dataclasses.is_dataclass(arg) else None
    return None, None


def _mapping_of_lists(tp: Any) -> type | None:
    """`dict[str, list[X]]` (optionally `| None`) -> X: a free mapping whose values are X lists."""
    for arg in typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,):
        if typing.get_origin(arg) is dict:
            _, value = typing.get_args(arg)
            _, item = _dataclasses_in(value)
            if item is not None:
                return item
    return None


def _unknown(path: str, key: str, allowed: set[str], why: str = "") -> str:
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{path}{key}: unknown key{hint}{why}"


def _keys(node: DictConfig) -> list[str]:
    return [str(k) for k in node]


def _child(node: DictConfig | ListConfig, key: Any) -> Any:
    """The child node, or None where it is an interpolation, missing or null (nothing to walk)."""
    if OmegaConf.is_interpolation(node, key):
        return None
    child = node._get_node(key)
    if not isinstance(child, Node) or child._is_none() or child._is_missing():
        return None
    return child


def _check(node: DictConfig, schema: type, path: str, problems: list[str]) -> None:
    hints = _hints(schema)
    allowed = set(hints) | set(getattr(schema, "PASSTHROUGH", ()))
    reserved: dict[str, str] = getattr(schema, "RESERVED", {})
    for key in _keys(node):
        if key in reserved:
            problems.append(f"{path}{key}: set by vlmlab, not here ({reserved[key]})")
            continue
        if key not in allowed:
            problems.append(_unknown(path, key, allowed))
            continue
        if key not in hints:
            continue
        _check_value(_child(node, key), hints[key], f"{path}{key}", problems)


def _check_value(child: Any, tp: Any, where: str, problems: list[str]) -> None:
    if child is None:
        return
    sub, item = _dataclasses_in(tp)
    if isinstance(child, DictConfig) and sub is not None:
        _check(child, sub, f"{where}.", problems)
    elif isinstance(child, ListConfig) and item is not None:
        for i in range(len(child)):
            entry = _child(child, i)
            if isinstance(entry, DictConfig):
                _check(entry, item, f"{where}[{i}].", problems)
    elif isinstance(child, DictConfig) and (lists := _mapping_of_lists(tp)) is not None:
        for name in _keys(child):
            _check_value(_child(child, name), list[lists], f"{where}.{name}", problems)  # type: ignore[valid-type]


def target_keys(target: str) -> set[str] | None:
    """Keyword arguments `_target_` accepts (None: it takes **kwargs, anything goes).

    Raises ImportError/AttributeError when the target does not exist.
    """
    from hydra.utils import get_object

    obj = get_object(target)
    params = inspect.signature(obj).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL}


# Connector arguments build_vlm passes from the built parts, and the seed it pops.
CONNECTOR_GIVEN = {"in_features": "the encoder width", "out_features": "the LLM width"}
CONNECTOR_EXTRA = {"init_seed"}


def _check_connector(node: DictConfig, problems: list[str]) -> None:
    if OmegaConf.is_interpolation(node, "_target_") or "_target_" not in node:
        problems.append("connector._target_: missing; name the connector class")
        return
    target = str(node._target_)
    try:
        accepted = target_keys(target)
    except Exception as err:  # any import failure is a config problem here
        problems.append(f"connector._target_: cannot import {target!r} ({err})")
        return
    if accepted is None:
        return
    allowed = (accepted - set(CONNECTOR_GIVEN)) | CONNECTOR_EXTRA | INSTANTIATE_KEYS
    for key in _keys(node):
        if key in CONNECTOR_GIVEN:
            problems.append(f"connector.{key}: set by vlmlab from {CONNECTOR_GIVEN[key]}, not here")
        elif key not in allowed:
            problems.append(_unknown("connector.", key, allowed, f" for {target}"))


def problems(cfg: DictConfig) -> list[str]:
    """Every schema problem of a composed config, one line each (empty: valid)."""
    found: list[str] = []
    top = _hints(RunConfig)
    for key in _keys(cfg):
        if key == "hydra":
            continue
        if key == "stage_overrides":
            found.append(
                "stage_overrides: per-stage deltas are no longer a config key; put each stage's "
                f"delta in {RECIPE_HOME} (`# @package _global_`), which Hydra composes after the "
                "experiment so the command line still wins"
            )
            continue
        if key not in top:
            found.append(_unknown("", key, set(top) | {"hydra"}))
            continue
        child = _child(cfg, key)
        if key == "connector":
            if isinstance(child, DictConfig):
                _check_connector(child, found)
            continue
        _check_value(child, top[key], key, found)
    return found


def validate(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every unknown key of `cfg` (run before any model is built)."""
    found = problems(cfg)
    if not found:
        return
    where = _where(cfg)
    lines = "\n".join(f"  - {p}" for p in found)
    raise ConfigError(
        found[0].split(":", 1)[0],
        f"{len(found)} config problem(s):\n{lines}\n",
        f"correct these keys {where}.",
    )


def _where(cfg: DictConfig) -> str:
    """Which files and overrides the keys came from, to point the user at them."""
    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None)
    experiment = choices.get("experiment") if choices is not None else None
    if experiment:
        stage = choices.get("stage")
        return (
            f"in conf/experiment/{experiment}.yaml, conf/recipe/{experiment}/{stage}.yaml "
            "or the command line"
        )
    return "in the group presets under conf/ or the command line"


# --------------------------------------------------------------------------- typed objects
def typed(node: Any, schema: type[_T]) -> _T:
    """A validated config group (DictConfig or dict) as its schema dataclass, nested groups too.

    Why: builders below the entry point take these objects, not the raw DictConfig, so what
    they read is declared by a type. Free-form mappings stay plain dicts; trainer PASSTHROUGH
    arguments are collected into `TrainerConfig.lightning`.
    """
    data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return _typed(data, schema)


def _typed(data: Any, schema: type[_T]) -> _T:
    hints = _hints(schema)
    values = {str(k): _typed_value(v, hints[str(k)]) for k, v in data.items() if str(k) in hints}
    for f in dataclasses.fields(schema):  # type: ignore[arg-type]
        if "collects" in f.metadata:
            collected = getattr(schema, f.metadata["collects"])
            values[f.name] = {str(k): v for k, v in data.items() if str(k) in collected}
    return schema(**values)


def _typed_value(value: Any, tp: Any) -> Any:
    sub, item = _dataclasses_in(tp)
    if isinstance(value, dict) and sub is not None:
        return _typed(value, sub)
    if isinstance(value, list) and item is not None:
        return [_typed(v, item) if isinstance(v, dict) else v for v in value]
    lists = _mapping_of_lists(tp)
    if isinstance(value, dict) and lists is not None:
        return {
            k: [_typed(v, lists) if isinstance(v, dict) else v for v in vs]
            for k, vs in value.items()
        }
    return value
