"""`train(cfg)`: one stage, read top to bottom.

context -> build model -> init/resume -> stage policy -> data -> callbacks -> fit -> save.
Each step is one builder with typed inputs; this module only wires them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from vlmlab import checkpoints, launch, schema, stages
from vlmlab.checkpoints import CheckpointMeta
from vlmlab.data import features as features_mod
from vlmlab.data.build import build_datamodule, data_checksum
from vlmlab.data.features import FeatureCache
from vlmlab.data.mixture import Source
from vlmlab.data.prepare import ResolvedDataset, resolve_dataset
from vlmlab.data.remote import as_location
from vlmlab.data.split import Layout
from vlmlab.data.tokenize import TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.eval.callback import BenchmarkEval, SampleAnswers, build_eval_callback
from vlmlab.logs import setup_logging
from vlmlab.models import as_dict, build_vlm
from vlmlab.models.encoder import VLM_KEYS
from vlmlab.schema import TrainerConfig
from vlmlab.stages.policy import format_table
from vlmlab.text.templates import get_template
from vlmlab.tracking import callbacks as tracking
from vlmlab.tracking.datasets import stage_inputs
from vlmlab.tracking.journal import close_logger
from vlmlab.tracking.logger import (
    RunIdentity,
    RunStart,
    build_logger,
    log_checkpoint,
    log_run_start,
    logger_settings,
    store_uri,
)
from vlmlab.tracking.models import model_name
from vlmlab.tracking.outcome import ExceptionRecorder, track_outcome
from vlmlab.tracking.runs import RunState, checkpoint_of_run
from vlmlab.training import strategy as strategies
from vlmlab.training.callbacks import extra_callbacks, training_callbacks
from vlmlab.training.deepspeed import optimizer_class
from vlmlab.training.emulate import emulate_ranks
from vlmlab.training.module import VLMModule
from vlmlab.training.precision import apply_master_weights

log = logging.getLogger(__name__)

COMPONENTS = ("encoder", "connector", "llm")
# Keys that do not change what a run computes: a resumed run may differ in them.
_NOT_IDENTITY = (
    "resume",
    "checkpoint",
    "trainer.max_steps",
    "trainer.enable_progress_bar",
    "logger.run_name",
    "debug",
    "trainer.peak_tflops",
    "trainer.fail_after_nonfinite_steps",  # a run failed on NaNs may resume with another K
    "trainer.devices",  # elastic resume: the same run on another world size or worker count
    "trainer.num_nodes",  # (the data stream and the global batch do not depend on them)
    "data.num_workers",
    "data.elastic",  # how such a resume orders the rest of the data (exact: as if never stopped)
    "logger.http_timeout",  # how tracking reaches a server, not what the run computes
    "logger.http_retries",
    "logger.retry_interval",
    "logger.flush_timeout",
    "logger.ui_url",  # what the MLflow UI shows, not what the run computes
    "logger.system_metrics",
    "logger.system_metrics_interval",
    "logger.model_name",
)


def hydra_choices(cfg: DictConfig) -> dict[str, str]:
    """Config-group choices (encoder=clip336 ...) of the current Hydra run, if any."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        return {
            k: str(v) for k, v in choices.items() if not k.startswith("hydra") and v is not None
        }
    return {}


def task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def without_hydra(cfg: DictConfig) -> DictConfig:
    return (
        OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    )


def accumulation(cfg: DictConfig, trainer: TrainerConfig) -> int:
    """Gradient accumulation so that micro batch x devices x nodes x accumulation = global batch."""
    per_step = int(cfg.data.batch_size) * strategies.world_size(trainer)
    global_batch = int(cfg.stage.global_batch_size)
    if global_batch % per_step:
        raise ConfigError(
            "stage.global_batch_size",
            f"{global_batch} is not divisible by data.batch_size x devices x nodes = {per_step}.",
            "change stage.global_batch_size or data.batch_size.",
        )
    return global_batch // per_step


def identity_config(cfg: DictConfig) -> dict[str, Any]:
    """The config that says what a run computes (less _NOT_IDENTITY): hashed into the run key,
    recorded in every resumable checkpoint and compared on resume (CheckpointIdentity)."""
    data = OmegaConf.to_container(without_hydra(cfg), resolve=True)
    assert isinstance(data, dict)
    for dotted in _NOT_IDENTITY:
        *parents, leaf = dotted.split(".")
        node = data
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return {str(k): v for k, v in data.items()}


def run_key(cfg: DictConfig) -> str:
    """Identity of a run's computation: equal keys may resume each other's checkpoints."""
    data = identity_config(cfg)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"stage{cfg.stage.name}-{digest}"


def resolve_resume(cfg: DictConfig, resume_dir: Path) -> tuple[Path | None, RunState]:
    """`resume`: null, auto (this config's unfinished run) or a Lightning .ckpt path."""
    value = cfg.get("resume")
    requeued = launch.requeued_checkpoint(resume_dir)  # this SLURM job saved, then requeued
    if requeued is not None:
        path = requeued
    elif value in (None, "", "null"):
        return None, RunState()
    elif value == "auto":
        # the newest checkpoint that loads: a save killed midway never wins (checkpoints.py);
        # one older than the run's FINISHED mark belongs to that finished run
        last = checkpoints.newest_loadable(resume_dir)
        finished = resume_dir / "FINISHED"
        if last is None or (
            finished.is_file() and checkpoints.saved_at(last) <= finished.stat().st_mtime_ns
        ):
            log.info("resume=auto: no unfinished run of this config; starting fresh")
            return None, RunState()
        path = last
    else:
        path = Path(value)
        if not checkpoints.is_loadable(path):  # a .ckpt file, or an FSDP sharded .ckpt folder
            raise ConfigError(
                "resume",
                f"{path} is not a loadable checkpoint.",
                "use auto or a path to a .ckpt.",
            )
    log.info("resuming from %s", path)
    return path, RunState.read(path.parent)


def resolve_init(
    cfg: DictConfig,
    fingerprints: dict[str, str],
    ckpt_root: Path,
    choices: dict[str, str],
    uri: str | None,
) -> Path | None:
    """`stage.init_from`: null, a checkpoint folder, an MLflow run (id or runs:/), or `auto`."""
    init_from = cfg.stage.get("init_from")
    previous = cfg.stage.get("previous")
    if init_from in (None, "", "null") or (init_from == "auto" and previous is None):
        return None
    if init_from != "auto":
        path = (
            checkpoint_of_run(init_from, uri, "stage.init_from")
            if checkpoints.is_run_reference(init_from)
            else Path(init_from)
        )
        if not (path / checkpoints.META).is_file():
            raise ConfigError(
                "stage.init_from", f"{path} is not a vlmlab checkpoint folder (no meta.json)."
            )
        configs = {c: as_dict(cfg[c]) for c in COMPONENTS}
        differ = checkpoints.describe_differences(
            checkpoints.read_meta(path), fingerprints, configs
        )
        if differ:
            raise ConfigError(
                "stage.init_from", f"{path} was trained with another component config: {differ}."
            )
        return path
    found = checkpoints.find_latest(ckpt_root, str(previous), fingerprints)
    if found is None:
        keep = [o for o in task_overrides() if not o.startswith(("stage=", "stage.", "+stage"))]
        command = " ".join(["python train.py", f"stage={previous}", *keep])
        parts = " ".join(f"{c}={choices.get(c, '?')}" for c in COMPONENTS)
        raise ConfigError(
            "stage.init_from",
            f"auto found no finished stage-{previous} run with {parts} under {ckpt_root}.",
            f"run `{command}` first, or set stage.init_from=<checkpoint folder> (or null to start from the base weights).",
        )
    return found


@dataclass
class RunContext:
    """Where a stage runs and what it continues: decided before any model is built."""

    root: Path  # paths.root
    choices: dict[str, str]  # Hydra group choices
    key: str  # run_key: the identity resume and rank agreement check
    resume_dir: Path
    resume_from: Path | None  # a Lightning checkpoint to continue, if any
    state: RunState  # what the resumed run started from
    trainer: TrainerConfig  # cfg.trainer, typed
    trainer_args: dict[str, Any]  # validated L.Trainer arguments
    store_uri: str | None  # the MLflow store (None: logger=none)

    @property
    def ckpt_root(self) -> Path:
        return self.root / "checkpoints"


@dataclass(frozen=True)
class StageStart:
    """What the stage's weights start from, below the base weights."""

    init: Path | None = None  # a vlmlab checkpoint (its chain is loaded)
    hf_base: str | None = None  # an HF Llava folder (every weight)


@dataclass
class _Tracked:
    """What `train` needs to end the MLflow run when `_train` raises."""

    logger: Any = None
    recorder: ExceptionRecorder = field(default_factory=ExceptionRecorder)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one stage; returns the checkpoint folder and the final metrics.

    A run that raises ends FAILED (KILLED on Ctrl-C) with its error, see tracking.outcome.
    """
    tracked = _Tracked()
    try:
        return _train(cfg, tracked)
    except BaseException:
        with track_outcome(tracked.logger, tracked.recorder):
            raise
    finally:  # a journaled logger sends its backlog, or says where it is (logger.flush_timeout)
        close_logger(tracked.logger)


def _train(cfg: DictConfig, tracked: _Tracked) -> dict[str, Any]:
    started = time.time()
    ctx = run_context(cfg)
    features = feature_cache(cfg, ctx)  # frozen encoder: its outputs, computed once (or None)
    model, tokenizer = build_model(cfg, features)  # embed -> encode -> project -> scatter -> decode
    start, plan = start_and_policy(cfg, ctx, model)  # init/resume, then what trains
    data = stage_data(cfg, ctx, model, tokenizer, features)
    logger = tracked.logger = start_logger(cfg, ctx, data)
    module = training_module(cfg, ctx, model, plan, start, data, logger)
    stage_callbacks = build_callbacks(
        callback_settings(cfg, ctx, logger), model, data.text_encoder, data.dataset
    )
    tracked.recorder = stage_callbacks.recorder
    trainer = L.Trainer(
        **ctx.trainer_args,
        max_epochs=int(cfg.stage.epochs),
        accumulate_grad_batches=accumulation(cfg, ctx.trainer),
        logger=logger if logger is not None else False,
        callbacks=stage_callbacks.callbacks,
        # last.ckpt written through last.ckpt.tmp + rename; the replaced one kept as .prev
        plugins=[
            checkpoints.atomic_checkpoint_io(
                bool(cfg.checkpoint.keep_previous),
                checkpoints.CheckpointIdentity.of(identity_config(cfg)),  # refused if another
            )
        ],
        default_root_dir=str(launch.lightning_root(ctx.resume_dir)),  # hpc_ckpt_* of this run
    )
    if trainer.is_global_zero:
        record_start(cfg, ctx, start, plan, logger, data)
    resume = str(ctx.resume_from) if ctx.resume_from is not None else None
    trainer.fit(module, datamodule=data.datamodule, ckpt_path=resume)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if stage_callbacks.evaluation is not None and stage_callbacks.evaluation.results is not None:
        metrics.update(stage_callbacks.evaluation.results.metrics)
    result = save_stage(cfg, ctx, trainer, model, start, plan, metrics, logger)
    result["seconds"] = time.time() - started
    log.info("stage %s done in %.1fs: %s", cfg.stage.name, result["seconds"], metrics)
    return result


# ---- the recipe's steps ------------------------------------------------------------------------


def run_context(cfg: DictConfig) -> RunContext:
    """Validate, seed, check the stage and trainer, and find what a resume continues."""
    setup_logging()
    schema.validate(cfg)  # every unknown key at once, before any model is built
    root = Path(cfg.paths.root).resolve()
    L.seed_everything(int(cfg.seed), workers=True)
    trainer = schema.typed(cfg.trainer, TrainerConfig)
    stages.check_before_build(cfg.stage, trainer)
    for key in ("llm.template", "stage.template"):  # a template name the registry lacks
        get_template(str(OmegaConf.select(cfg, key)), key=key)
    # every trainer problem before a model is built
    trainer_args = strategies.trainer_kwargs(trainer, int(cfg.data.batch_size))
    key = run_key(cfg)
    resume_dir = root / "resume" / key
    resume_from, state = resolve_resume(cfg, resume_dir)
    return RunContext(
        root=root,
        choices=hydra_choices(cfg),
        key=key,
        resume_dir=resume_dir,
        resume_from=resume_from,
        state=state,
        trainer=trainer,
        trainer_args=trainer_args,
        store_uri=store_uri(logger_settings(cfg.logger), root),
    )


def build_model(cfg: DictConfig, features: FeatureCache | None = None) -> tuple[Any, Any]:
    """The VLM and its tokenizer (base weights; quantized when the stage says so). On a
    feature cache the encoder slot holds a stand-in: the tower is never built or loaded."""
    quantize = as_dict(cfg.stage.quantize) if cfg.stage.get("quantize") else None
    vision = features.stand_in() if features is not None else None
    return build_vlm(cfg.encoder, cfg.connector, cfg.llm, quantization=quantize, vision=vision)


def _chain_has_encoder(init: Path | None, hf_base: str | None) -> bool:
    """Whether the weights a stage starts from replace the preset encoder's (an HF Llava
    folder, or a checkpoint in the chain that trained the encoder)."""
    from safetensors import safe_open

    if hf_base:
        return True
    current = init
    while current is not None:
        meta = checkpoints.read_meta(current)
        if meta.hf_base:
            return True
        with safe_open(str(current / checkpoints.WEIGHTS), framework="pt") as weights:
            if any(str(k).startswith("encoder.") for k in weights.keys()):  # noqa: SIM118
                return True
        current = Path(meta.parent) if meta.parent else None
    return False


def feature_cache(cfg: DictConfig, ctx: RunContext) -> FeatureCache | None:
    """`data.features`: the stage's encoder outputs from a cache (computed here once, under a
    lock parallel jobs share), or None to read pixels. `auto` uses the cache when the stage
    can, `require` fails naming every reason it cannot."""
    mode = str(cfg.data.get("features", "off"))
    if mode not in features_mod.MODES:
        raise ConfigError(
            "data.features", f"got {mode!r}.", f"use one of {list(features_mod.MODES)}."
        )
    if mode == "off":
        return None
    reasons = []
    encoder = as_dict(cfg.encoder)
    if features_mod.encoder_trains(as_dict(cfg.stage)):
        reasons.append(
            f"stage {cfg.stage.name} trains the encoder (stage.train / train_last / lora)"
        )
    if bool(cfg.stage.get("evaluate")):
        reasons.append("stage.evaluate=true generates from pixels, which needs the tower")
    key = features_mod.feature_key(encoder, cfg.data.get("feature_dtype"))
    if isinstance(key, str):
        reasons.append(key)
    if not reasons:
        init_from = str(cfg.stage.get("init_from") or "")
        hf_base = init_from.removeprefix("hf:") if init_from.startswith("hf:") else None
        if ctx.resume_from is not None:
            init = Path(ctx.state.init) if ctx.state.init else None
            hf_base = ctx.state.hf_base
        else:
            try:
                found = resolve_init(
                    cfg, fingerprints_of(cfg), ctx.ckpt_root, ctx.choices, ctx.store_uri
                )
                init = None if hf_base else found
            except ConfigError:
                init = None  # start_and_policy raises it with every other problem
        if _chain_has_encoder(init, hf_base):
            reasons.append("the weights this stage starts from replace the preset's encoder")
    sources: list[Source] = []
    if not reasons:
        data_cfg = schema.typed(cfg.data, schema.DataConfig)
        dataset = resolve_dataset(data_cfg, str(cfg.stage.dataset))
        if dataset["prepare"] is not None:
            dataset["prepare"]()  # the image shards must exist before their features
        sources = dataset["sources"] or [
            Source("data", as_location(str(dataset["shard_dir"])), key="stage.dataset")
        ]
        remote = [str(s.shard_dir) for s in sources if not features_mod.is_local(s.shard_dir)]
        if remote:
            reasons.append(f"the cache is written next to local shards, not at {remote[0]}")
    if reasons:
        if mode == "require":
            raise ConfigError(
                "data.features",
                "require: this stage cannot train on cached features: " + "; ".join(reasons) + ".",
                "use data.features=auto (pixels when the cache cannot serve) or off.",
            )
        log.info("data.features=auto: reading pixels (%s)", "; ".join(reasons))
        return None
    assert not isinstance(key, str)
    return features_mod.ensure_features(sources, encoder, key)


def fingerprints_of(cfg: DictConfig) -> dict[str, str]:
    """What each component's weights depend on. The encoder's image strategy (`encoder.image`,
    `encoder.anyres`) changes how pixels reach the tower, not its weights: LLaVA-NeXT's stage 2
    switches to AnyRes on stage 1's weights."""
    fps = {c: checkpoints.component_fingerprint(cfg[c]) for c in COMPONENTS}
    encoder = {k: v for k, v in as_dict(cfg.encoder).items() if k not in VLM_KEYS}
    fps["encoder"] = checkpoints.component_fingerprint(OmegaConf.create(encoder))
    return fps


def start_and_policy(
    cfg: DictConfig, ctx: RunContext, model: Any
) -> tuple[StageStart, stages.StagePlan]:
    """Load what the stage starts from, apply its policy and master weights.

    init_from and the policy are validated together: one message lists every problem.
    """
    problems: list[ConfigError] = []
    init: Path | None = None
    init_from = str(cfg.stage.get("init_from") or "")
    hf_base = init_from.removeprefix("hf:") if init_from.startswith("hf:") else None
    try:
        if ctx.resume_from is not None:
            init = Path(ctx.state.init) if ctx.state.init else None
            hf_base = ctx.state.hf_base
        elif hf_base is None:
            init = resolve_init(
                cfg, fingerprints_of(cfg), ctx.ckpt_root, ctx.choices, ctx.store_uri
            )
        if hf_base is not None:  # an HF Llava directory: every weight, then this stage trains on it
            from vlmlab.models.hf_llava import load_hf_weights

            load_hf_weights(model, hf_base)
    except ConfigError as err:
        problems.append(err)
    if init is not None:
        checkpoints.load_chain(model, init)
    plan: stages.StagePlan | None = None
    try:
        plan = stages.apply(cfg.stage, model)
    except ConfigError as err:
        problems.append(err)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ConfigError(
            "stage", "problems found before training:\n  " + "\n  ".join(map(str, problems))
        )
    assert plan is not None
    # fp32 master weights for everything that trains, one dtype per FSDP unit (training/precision.py)
    strategy = strategies.strategy_name(ctx.trainer)
    units = (
        strategies.fsdp_units(model, strategies.fsdp_settings(ctx.trainer).wrap)
        if strategy == "fsdp"
        else None
    )
    apply_master_weights(model, str(ctx.trainer.precision), strategy, units)
    log.info("stage %s parameters:\n%s", cfg.stage.name, format_table(plan.table))
    return StageStart(init, hf_base), plan


@dataclass
class StageData:
    text_encoder: TextEncoder
    dataset: ResolvedDataset
    datamodule: Any  # VLMDataModule (or its N-rank emulation)
    total_steps: int  # optimizer steps of the whole stage


def stage_data(
    cfg: DictConfig,
    ctx: RunContext,
    model: Any,
    tokenizer: Any,
    features: FeatureCache | None = None,
) -> StageData:
    """Text encoding for this model, the stage's dataset and DataModule, the schedule length.
    On a feature cache the DataModule reads the feature shards: the same samples, cut and
    ordered as the image shards (data/features.py)."""
    data_cfg = schema.typed(cfg.data, schema.DataConfig)
    text_encoder = TextEncoder.for_model(
        model,
        tokenizer,
        str(cfg.stage.template),
        data_cfg.max_length,
        image_placement=data_cfg.image_placement,  # None: the template's own (LLaVA's for LLaVA)
        special_text=data_cfg.special_text,
    )
    dataset = resolve_dataset(data_cfg, str(cfg.stage.dataset))
    read = dict(dataset) if features is None else {**dataset, "shard_dir": None}
    if features is not None:
        read["sources"] = features.sources
    datamodule = build_datamodule(
        data_cfg,
        read,  # type: ignore[arg-type]
        text_encoder,
        model.image_processor,
        seed=int(cfg.seed),
    )
    datamodule = emulate_ranks(datamodule, strategies.emulated_ranks(ctx.trainer, cfg.resume))
    world = strategies.world_size(ctx.trainer)
    if ctx.resume_from is not None and ctx.state.layout:  # the checkpoint confirms it on load
        datamodule.expect_origin(Layout(**ctx.state.layout), world)
    # micro-batches of all ranks per epoch / per step: the run's own count after an elastic
    # resume (the same schedule as if it had never stopped)
    batches = int(cfg.stage.epochs) * datamodule.micro_batches_per_epoch(world)
    steps = max(1, batches // (accumulation(cfg, ctx.trainer) * world))
    return StageData(text_encoder, dataset, datamodule, steps)


def start_logger(cfg: DictConfig, ctx: RunContext, data: StageData) -> Any:
    """The run's logger (None for logger=none); a resumed run continues its MLflow run."""
    identity = RunIdentity(
        stage=str(cfg.stage.name),
        root=ctx.root,
        choices=ctx.choices,
        overrides=task_overrides(),
        resume_run_id=ctx.state.mlflow_run_id,
        tags={"data.manifest_sha256": data_checksum(data.dataset, data.datamodule)},
    )
    return build_logger(logger_settings(cfg.logger), identity)


def training_module(
    cfg: DictConfig,
    ctx: RunContext,
    model: Any,
    plan: stages.StagePlan,
    start: StageStart,
    data: StageData,
    logger: Any,
) -> VLMModule:
    """The LightningModule: optimizer groups and schedule, the strategy's loss and sharding."""
    return VLMModule(
        model,
        as_dict(cfg.stage.optim),
        data.total_steps,
        groups=plan.groups,
        extra_state={
            "init": str(start.init) if start.init else None,
            "mlflow_run_id": getattr(logger, "run_id", None),
        },
        parallelize=strategies.fsdp_parallelizer(ctx.trainer),
        global_token_loss=strategies.uses_global_token_loss(ctx.trainer),
        sharded=strategies.shards_parameters(ctx.trainer),  # every forward runs every sharded unit
        optimizer_cls=optimizer_class(ctx.trainer),  # DeepSpeedCPUAdam under ZeRO-Offload
        fail_after_nonfinite_steps=ctx.trainer.fail_after_nonfinite_steps,
    )


def record_start(
    cfg: DictConfig,
    ctx: RunContext,
    start: StageStart,
    plan: stages.StagePlan,
    logger: Any,
    data: StageData,
) -> None:
    """Rank zero, before fit: the run state a resume continues, and a fresh run's record."""
    run_id = getattr(logger, "run_id", None)
    init = str(start.init) if start.init else None
    layout = ctx.state.layout  # the run's own, from its first start
    if layout is None and ctx.resume_from is None:
        layout = data.datamodule.layout_at(strategies.world_size(ctx.trainer)).as_dict()
    RunState(init, start.hf_base, run_id, final=ctx.state.final, layout=layout).write(
        ctx.resume_dir
    )
    if logger is not None and ctx.resume_from is None:
        inputs = stage_inputs(data.dataset, str(cfg.stage.dataset))
        log_run_start(logger, dataclasses.replace(run_start(cfg, ctx, plan, start), inputs=inputs))


@dataclass(frozen=True)
class CallbackSettings:
    """What decides a stage's callbacks (built by `callback_settings` from the config)."""

    resume_dir: Path  # resumable checkpoints of this run
    run_key: str  # the identity every rank must share
    every_n_steps: int  # checkpoint.every_n_steps
    sharded: bool  # FSDP / ZeRO-3: weights are sharded over ranks
    tracked: bool  # a logger is attached
    eval_dir: Path  # end-of-stage benchmark outputs
    evaluate: bool = False  # stage.evaluate
    eval: schema.EvalConfig | None = None
    samples: int = 0  # logger.samples: held-out answers logged at the end
    peak_flops: float | None = None
    record_samples: str | None = None  # debug.record_samples
    system_metrics: tracking.SystemMetrics | None = None  # logger.system_metrics
    extra: list[dict[str, Any]] = field(default_factory=list)  # trainer.extra_callbacks


@dataclass
class StageCallbacks:
    callbacks: list[L.Callback]
    evaluation: BenchmarkEval | None  # its `results` hold the benchmark metrics after fit
    recorder: ExceptionRecorder  # the exception Lightning saw, for the run's outcome


def build_callbacks(
    settings: CallbackSettings,
    model: Any,
    text_encoder: TextEncoder,
    dataset: ResolvedDataset,
) -> StageCallbacks:
    """Every callback of the stage, in order; fails (ConfigError) on a bad benchmark entry or
    extra callback.

    Order matters: an evaluation callback runs before the tracking callback that logs what it
    returned, and the exception recorder sees errors before Lightning rewrites them. Under
    sharded weights (FSDP, ZeRO-3) rank-0-only generation cannot run (the other ranks would
    not join the gathers): benchmarks and sample answers are left out, with a warning.
    """
    callbacks = training_callbacks(
        model,
        settings.resume_dir,
        settings.every_n_steps,
        settings.peak_flops,
        settings.record_samples,
    )
    evaluation = build_eval_callback(
        settings.eval, settings.evaluate, dataset, text_encoder, settings.eval_dir
    )
    if settings.sharded and evaluation is not None:
        log.warning(
            "eval.benchmarks are skipped under FSDP / ZeRO-3 (sharded weights): run "
            "`vlmlab eval <checkpoint> --bench ...` on the saved checkpoint instead"
        )
        evaluation = None
    if evaluation is not None:  # eval.benchmarks at the end of the stage; eval/accuracy aliased
        callbacks += [evaluation, tracking.LogEvalResults(evaluation)]
    if settings.tracked:
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks += [LearningRateMonitor(logging_interval="step"), tracking.GradNorm()]
        samples = 0 if settings.sharded else settings.samples
        heldout, images = dataset["heldout"], dataset["image_root"]
        if getattr(model.encoder, "cached", False):  # no tower to answer from pixels
            samples = 0
        if samples and heldout is not None and images is not None:
            answers = SampleAnswers(
                text_encoder, model.image_processor, heldout, images, num_samples=samples
            )
            callbacks += [answers, tracking.LogSamples(answers)]
        if settings.system_metrics is not None:
            callbacks.append(settings.system_metrics)
    recorder = ExceptionRecorder()
    callbacks.append(tracking.RankAgreement(settings.run_key))
    callbacks.append(launch.SlurmRequeue(settings.resume_dir))  # inactive outside a SLURM job
    callbacks.append(recorder)
    callbacks.extend(extra_callbacks(settings.extra))
    return StageCallbacks(callbacks, evaluation, recorder)


def callback_settings(cfg: DictConfig, ctx: RunContext, logger: Any) -> CallbackSettings:
    debug = cfg.get("debug") or {}
    return CallbackSettings(
        resume_dir=ctx.resume_dir,
        run_key=ctx.key,
        every_n_steps=int(cfg.checkpoint.every_n_steps),
        sharded=strategies.shards_parameters(ctx.trainer),
        tracked=logger is not None,
        eval_dir=ctx.root / "eval" / ctx.key,
        evaluate=bool(cfg.stage.get("evaluate")),
        eval=schema.typed(cfg.eval, schema.EvalConfig) if cfg.get("eval") is not None else None,
        samples=int(cfg.logger.get("samples", 0) or 0),
        peak_flops=strategies.peak_flops(ctx.trainer),
        record_samples=debug.get("record_samples"),
        system_metrics=system_metrics(cfg, ctx, logger),
        extra=list(ctx.trainer.extra_callbacks),
    )


def system_metrics(cfg: DictConfig, ctx: RunContext, logger: Any) -> tracking.SystemMetrics | None:
    """MLflow's system-metrics monitor when `logger.system_metrics` (null: on GPU runs) and the
    run logs to MLflow."""
    import torch

    wanted = cfg.logger.get("system_metrics")
    if wanted is None:
        wanted = str(ctx.trainer.accelerator) in ("gpu", "cuda") or (
            str(ctx.trainer.accelerator) == "auto" and torch.cuda.is_available()
        )
    if not wanted or logger is None or ctx.store_uri is None:
        return None
    return tracking.SystemMetrics(
        ctx.store_uri, float(cfg.logger.get("system_metrics_interval", 10.0))
    )


def run_start(
    cfg: DictConfig, ctx: RunContext, plan: stages.StagePlan, start: StageStart
) -> RunStart:
    return RunStart(
        config=without_hydra(cfg),
        overrides=task_overrides(),
        stage=str(cfg.stage.name),
        table=format_table(plan.table),
        trainable={row["component"]: row["trainable"] for row in plan.table},
        lrs={group["name"]: group["lr"] for group in plan.groups},
        world_size=strategies.world_size(ctx.trainer),
        accumulation=accumulation(cfg, ctx.trainer),
        init=start.init,
    )


def save_stage(
    cfg: DictConfig,
    ctx: RunContext,
    trainer: L.Trainer,
    model: Any,
    start: StageStart,
    plan: stages.StagePlan,
    metrics: dict[str, float],
    logger: Any,
) -> dict[str, Any]:
    """The stage checkpoint (trainable weights + CheckpointMeta) and the run's result."""
    # Stopped early (max_steps, Ctrl-C) = resumable, not complete: never picked by init_from=auto.
    hit_max_steps = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
    complete = (
        trainer.current_epoch >= int(cfg.stage.epochs)
        and not trainer.interrupted
        and not hit_max_steps
    )
    result: dict[str, Any] = {"metrics": metrics, "checkpoint": None, "complete": complete}
    # every rank takes part: FSDP-sharded weights are gathered one tensor at a time
    final_weights = checkpoints.gather_trainable(model, keep=trainer.is_global_zero)
    if not trainer.is_global_zero:
        return result
    meta = CheckpointMeta(
        stage=str(cfg.stage.name),
        complete=complete,
        parent=str(start.init) if start.init is not None else None,
        hf_base=start.hf_base,  # the root of the chain when it started from an HF Llava folder
        choices=ctx.choices,
        fingerprints={
            c: fp
            for c, fp in fingerprints_of(cfg).items()
            if c in list(cfg.stage.get("uses") or COMPONENTS)
        },
        config={c: as_dict(cfg[c]) for c in COMPONENTS},
        template=str(cfg.stage.template),
        lora=plan.lora,
        mlflow_run_id=getattr(logger, "run_id", None),
        global_step=trainer.global_step,
        metrics=metrics,
    )
    parts = "-".join(ctx.choices.get(c, c) for c in COMPONENTS)
    name = (
        f"{time.strftime('%Y%m%d-%H%M%S')}-stage{cfg.stage.name}-{parts}-"
        f"{time.time_ns() % 10**6:06d}"
    )
    # Finishing is idempotent: the final folder is named in run.json before it is written, and
    # FINISHED comes last; a run killed in between resumes into the same folder (one run, one
    # final checkpoint, one MLflow run).
    path = Path(ctx.state.final) if complete and ctx.state.final else ctx.ckpt_root / name
    if complete and (path / checkpoints.META).is_file():
        log.info("stage checkpoint %s was saved before an interruption: kept", path)
        result["metrics"] = checkpoints.read_meta(path).metrics
    else:
        if complete:
            dataclasses.replace(RunState.read(ctx.resume_dir), final=str(path)).write(
                ctx.resume_dir
            )
        path = checkpoints.save_trainable(model, path, meta, final_weights)
    result["checkpoint"] = str(path)
    if logger is not None:
        model = model_name(
            cfg.logger.get("model_name"), str(cfg.logger.experiment_name), str(cfg.stage.name)
        )
        log_checkpoint(logger, path, checkpoints.read_meta(path), model if complete else None)
    if complete:
        (ctx.resume_dir / "FINISHED").write_text(result["checkpoint"] + "\n")
    return result
