"""Typed configuration: one dataclass per component, presets as YAML, `key=value` overrides.

A run's config is resolved in this order (later wins):
    dataclass defaults -> preset YAML (raydd/presets/<name>.yaml) -> preset's `smoke:` section
    (with --smoke) -> command-line `key=value` overrides.
Keys are dotted paths: `ipc=10`, `data.image_size=16`, `eval.students=[convnet_d3,resnet18]`,
and a method's own fields under its name: `igds.beta=0.1`. Unknown keys and invalid values raise
ConfigError naming the key and the allowed keys / values, before any heavy work starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raydd.errors import RayddError

PRESET_DIR = Path(__file__).parent / "presets"
RECIPE_DIR = Path(__file__).parent / "recipes"     # the papers' evaluation recipes (eval.recipe)


class ConfigError(RayddError, ValueError):
    """A configuration key or value is invalid; the message names the allowed values."""


# --------------------------------------------------------------------------------------------
# Component configs
# --------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    dataset: str = "digits"        # "digits" (scikit-learn, built in) | "imagefolder" | "webdataset" | "huggingface"
    root: str = ""                 # imagefolder: dir with train/<class>/... and optionally val/<class>/...;
                                   #   webdataset: dir or URI of tar shards, each sample an image (.jpg/.jpeg/.png/
                                   #   .webp) and its integer label (.cls); huggingface: a dataset's parquet files
                                   #   as the hub lays them out, or save_to_disk's .arrow files (columns image,
                                   #   label); the split of a file is named
                                   #   by its folder or name (train/, val/, *-validation-*: raydd.data.source_files)
    source_classes: str = "imagenet1k"  # webdataset / huggingface: the class of each integer label, in label order:
                                   #   a subset name (imagenet1k: the 1000 wnids sorted, ImageNet's label order)
                                   #   or a comma list
    classes: str = ""              # subset name (imagenette, imagewoof, imageidc, imagenet100, imagenet1k),
                                   # a comma list of class names (digits: "0,3,8"), or "" = all classes
    image_size: int = 16           # side length images are resized to (digits: 8x8 upsampled)
    channels: int = 1              # 1 (grayscale) or 3 (RGB)
    val_fraction: float = 0.15     # held out of train as val, stratified per class (ImageNet presets: 0, train on all
                                   #   of it; sweeps then hold out 0.15 for their trials, named in their params)
    test_fraction: float = 0.25    # digits only (an imagefolder's val/ is its test split)
    split_seed: int = 0            # the split is a deterministic function of this seed
    max_train_per_class: int = 0   # cap on real train images per class (0 = all); an ImageFolder decodes only
                                   #   the first ~cap / (1 - hold-out) files of each class (file-name order)
    store: str = ""                # where prepared stores live (a directory or a pyarrow URI: s3://...); the data
                                   #   is decoded once into <store>/<key> (raydd.prepare) and read from there;
                                   #   "" = every process decodes the ImageFolder itself (other sources need one)
    latents: bool = False          # with a store and a latent backbone (backbone.vae not identity): the train split is
                                   #   also kept as the VAE's latents (fp16 [c, h, w], posterior mean x scale), encoded
                                   #   once on the actor pool (GPUs when compute.gpus_per_actor > 0) into
                                   #   <store>/<key>/latents/<VAE key>/ (raydd.prepare.prepare_latents); fine-tunes and
                                   #   RSM's class means read them instead of encoding every batch


@dataclass
class BackboneConfig:
    source: str = "tiny"           # "tiny" (trained on first use, cached) | hub id | diffusers dir | .pt/.safetensors
    checkpoint: str = ""           # optional weights applied on top (original DiT .pt, maybe `ema`-nested)
    vae: str = "identity"          # "identity" (pixel space) | "tiny" (trained on first use, cached) | hub id |
                                   # local AutoencoderKL dir
    vae_scale: float = 0.18215     # SD VAE latent scale (a tiny VAE brings its own: 1 / std of its latents)
    latent_size: int = 32          # non-tiny backbones: latent side (256 px / 8)
    # tiny DiT (digits): trained with the DiT recipe (L_simple + L_vlb, learned-range variance)
    hidden_size: int = 128
    depth: int = 4
    heads: int = 4
    patch_size: int = 2
    train_steps: int = 3000
    train_batch: int = 128
    train_lr: float = 1e-3         # (labels drop to the null class with DiT's p = 0.1, once per sample)
    # tiny VAE (digits-latent): diffusers AutoencoderKL, blocks (w, 2w, 2w), 4 latent channels, side / 4
    vae_width: int = 16
    vae_train_steps: int = 800


@dataclass
class SamplerConfig:
    scheduler: str = "ddpm"        # diffusers': "ddpm" (ancestral, learned-range variance) | "ddim" (eta = 0)
                                   #   | "dpm++" | "dpm++sde" (stochastic) | "unipc" | "euler" (few-step solvers); raydd.sampling.Steps
    steps: int = 50                # model calls per sample (DiT: 50 ddpm steps; dpm++/unipc: 10-25)
    train_timesteps: int = 1000    # linear beta schedule length
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cfg_scale: float = 4.0         # classifier-free guidance scale (1.0 = off)
    cfg_first3_quirk: bool = False # original DiT code: CFG on the first 3 channels only
    clip_x0: bool = False          # clip x0_hat to [-1, 1] (pixel-space backbones)
    guidance_norm: str = "variance"  # guided methods' step size rho_t: "variance" (IGD's code: beta_t·‖ε̂‖/‖g‖)
                                   #   | "eps" (the LGD summary: sqrt(1 − abar_t)·‖ε̂‖/‖g‖); raydd.sampling.Guidance
    guidance_micro_batch: int = 0  # rows per guided backward pass (0 = the whole batch): bounds its memory,
                                   #   results unchanged
    guidance_checkpoint: bool = False  # activation checkpointing in a guided step: the DiT's and the VAE decoder's
                                   #   blocks are recomputed in the backward pass instead of kept (less memory,
                                   #   one more forward; results unchanged)


STAGE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "abfs", "abfss")   # pyarrow's filesystems


@dataclass
class ComputeConfig:
    ray_address: str = ""          # "" = start a local Ray (or join RAY_ADDRESS if set)
    num_cpus: int = 0              # local Ray only: CPUs to give it (0 = all)
    dashboard_port: int = 8265     # local Ray only: the dashboard's port on 127.0.0.1 (taken: a free one)
    num_actors: int = 1            # sampling actors (raydd.distributed.pool), and map_part's Ray Data pool
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    memory_per_actor_gib: float = 0.0  # host memory Ray reserves per sampling/map actor (0 = none), so a node runs
                                   #   no more actors than fit (#20 reports ~9 GiB for DiT-XL/2 + VAE + LGD's classifiers)
    batch_size: int = 32           # samples per sampling batch (a batch mixes classes)
    train_workers: int = 1         # Ray Train workers per training job
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    memory_per_worker_gib: float = 0.0  # host memory Ray reserves per Train worker (0 = none)
    parallel_jobs: int = 0         # evaluation jobs run side by side (0 = as resources allow)
    precision: str = "fp32"        # "fp32" | "bf16": the backbone under bf16 autocast (CUDA; CPUs with native bf16)
    share_stages: bool = True      # generation stages shared across runs by content (the cache's stages/);
                                   #   false: kept in the run's own work dir only
    stages: str = ""               # where shared stages live: "" = <cache_dir>/stages, a path on the driver's machine
                                   #   (actors elsewhere send their units to the driver), or a pyarrow URI every node
                                   #   reaches (s3://..., gs://..., file:///shared/...): every actor writes its units


@dataclass
class FaultConfig:
    """Fault injection, for the tests and for drills on a real cluster (off by default)."""
    actor_after: int = -1          # one sampling actor exits once after N batches (-1 = off)
    driver_after: int = -1         # the driver exits after saving N sampled units (-1 = off)


@dataclass
class EvalConfig:
    students: list = field(default_factory=lambda: ["convnet_d3"])  # timm names or convnet_dN / resnetap10
    protocol: str = "hard"         # "hard" (IDC/Minimax) | "soft" (RDED teacher relabelling)
    seeds: int = 3                 # repeats; report mean +- std
    epochs_by_ipc: list = field(default_factory=lambda: [[1, 3000], [10, 2000], [50, 1500], [200, 1000]])
    epochs: int = 0                # > 0 overrides epochs_by_ipc
    soft_epochs: int = 300
    batch_size: int = 64
    lr: float = 0.01               # hard: SGD
    momentum: float = 0.9
    weight_decay: float = 5e-4
    soft_lr: float = 1e-3          # soft: AdamW
    soft_weight_decay: float = 0.01
    temperature: float = 20.0
    cosine_half_quirk: bool = True # soft: cosine schedule ends at lr/2 (reference code)
    cutmix_beta: float = 1.0
    rrc_scale_min: float = 0.5     # RandomResizedCrop scale (min, 1)
    flip: bool = True              # random horizontal flip (off for digits: a flipped digit is another glyph)
    recipe: str = ""               # a paper's evaluation recipe, raydd/recipes/<name>.yaml (its eval.* settings over
                                   #   the preset's; command-line eval.* keys still win); "" = the shared protocol
    optimizer: str = "sgd"         # hard protocol: "sgd" (IDC/Minimax) | "adamw" (IGD), with eval.lr / weight_decay
    randaugment: list = field(default_factory=lambda: [0, 9])  # RandAugment [num_ops, magnitude] after the crop
                                   #   (0 ops = off; IMS3's run.sh: [1, 6])
    color_jitter: float = 0.0      # brightness/contrast/saturation strength (Minimax/IMS3: 0.4)
    lighting: float = 0.0          # AlexNet PCA lighting noise std, RGB only (Minimax/IMS3: 0.1)
    shuffle_patches: int = 0       # soft protocol: RDED's ShufflePatches(k), strips in random order (RDED/CaO2: 2)
    eval_every: int = 0            # epochs between test evaluations (0 = ~20 times per run)
    split: str = "test"            # "test" | "val" (sweeps tune on val)
    teacher: str = ""              # soft: teacher checkpoint (safetensors); "" = train one (cached)
    teacher_arch: str = "convnet_d3"
    teacher_epochs: int = 100
    ranking: bool = True           # DD-Ranking HLR/IOR/LRS (trains real + random references, cached)
    real_acc: dict = field(default_factory=dict)  # {student: top-1 in [0, 1]}: DD-Ranking's acc(real, hard) as given
                                   #   (e.g. a published number), instead of training that student on the whole
                                   #   real train split (at ImageNet-1K, a full ResNet-18 training)
    real_checkpoint: dict = field(default_factory=dict)  # {student: a safetensors state dict of that student}
                                   #   trained on the real data (another run's, a shared one): scored on the
                                   #   eval split for acc(real, hard) instead of training it


@dataclass
class TrackingConfig:
    uri: str = ""                  # "" = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "raydd"
    log_images: bool = True


@dataclass
class Config:
    method: str = "dit"
    preset: str = "digits"
    ipc: int = 10                  # images per class
    seed: int = 0                  # run seed: every sample's noise derives from (seed, class, slot)
    out_dir: str = "outputs"       # distilled sets go to <out_dir>/<run_name>/ (a path or a pyarrow URI: s3://...)
    run_name: str = ""             # "" = <preset>-<method>-ipc<ipc>-s<seed>
    cache_dir: str = ""            # "" = $RAYDD_CACHE or ~/.cache/raydd (backbones, teachers, references)
    smoke: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    methods: dict = field(default_factory=dict)  # method name -> {field: value} (validated by the method)

    # ---- derived helpers --------------------------------------------------------------------
    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.preset}-{self.method}-ipc{self.ipc}-s{self.seed}"

    def resolved_cache_dir(self) -> Path:
        d = self.cache_dir or os.environ.get("RAYDD_CACHE") or "~/.cache/raydd"
        return Path(d).expanduser().resolve()

    def output_dir(self) -> str:
        """<out_dir>/<run_name>: an absolute path, or a URI (s3://, gs://, file://: where every node reads the set)."""
        if "://" in self.out_dir:
            return f"{self.out_dir.rstrip('/')}/{self.resolved_run_name()}"
        return str(Path(self.out_dir).expanduser().resolve() / self.resolved_run_name())

    def scratch_dir(self) -> Path:
        """The run's work dir on the driver's machine (stage units, Ray Train checkpoints; removed when the run
        finishes, kept for a rerun to resume): next to a local output, `.<run_name>.work`; for an output on a URI,
        under the cache, named by the output."""
        out = self.output_dir()
        if "://" in out:
            return self.resolved_cache_dir() / "work" / f"{self.resolved_run_name()}-{config_hash(out)}"
        return Path(out).parent / f".{self.resolved_run_name()}.work"


ALLOWED = {
    "data.dataset": ("digits", "imagefolder", "webdataset", "huggingface"),
    "data.channels": (1, 3),
    "sampler.scheduler": ("ddpm", "ddim", "dpm++", "dpm++sde", "unipc", "euler"),   # each built by raydd.sampling.Steps
    "sampler.guidance_norm": ("variance", "eps"),
    "compute.precision": ("fp32", "bf16"),
    "eval.protocol": ("hard", "soft"),
    "eval.optimizer": ("sgd", "adamw"),
    "eval.split": ("test", "val"),
}


# --------------------------------------------------------------------------------------------
# Loading, overrides, validation
# --------------------------------------------------------------------------------------------
def list_presets() -> list[str]:
    """Preset names (files starting with "_" are shared bases that presets extend, not presets)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def read_preset(name: str, directory: Path = PRESET_DIR) -> dict:
    """A preset (or recipe) file's mapping; `extends: <base>` merges it over that base file (nested sections key
    by key)."""
    raw = yaml.safe_load((directory / f"{name}.yaml").read_text()) or {}
    base = raw.pop("extends", None)
    return _merge(read_preset(base, directory), raw) if base else raw


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(preset: str = "digits", overrides: list[str] | None = None, smoke: bool = False,
                method: str | None = None) -> Config:
    """Resolve defaults <- preset <- smoke section <- overrides, then validate."""
    if preset not in list_presets():
        raise ConfigError(f"unknown preset {preset!r}; allowed: {', '.join(list_presets())}")
    raw = read_preset(preset)
    smoke_section = raw.pop("smoke", {}) or {}
    cfg = Config(preset=preset)
    apply_dict(cfg, raw)
    if smoke:
        apply_dict(cfg, smoke_section)
        cfg.smoke = True
    if method is not None:
        cfg.method = method
    for item in overrides or []:
        key, value = parse_override(item)
        set_key(cfg, key, value)
    if cfg.eval.recipe:                   # a paper's evaluation recipe over the preset, then the user's keys again
        if cfg.eval.recipe not in list_recipes():
            raise ConfigError(f"eval.recipe={cfg.eval.recipe!r} is not allowed; allowed: {', '.join(list_recipes())} "
                              f"(or empty: the shared protocol)")
        apply_dict(cfg, read_preset(cfg.eval.recipe, RECIPE_DIR))
        for item in overrides or []:
            set_key(cfg, *parse_override(item))
    for key in ("data.root", "data.store", "compute.stages"):   # local paths absolute: Ray's workers run elsewhere
        value = get_key(cfg, key)
        if value and "://" not in value:
            set_key(cfg, key, str(Path(value).expanduser().resolve()))
    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. ipc=10, data.image_size=16)")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
    return key.strip(), value


def apply_dict(cfg: Config, d: dict, prefix: str = "") -> None:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "methods" and not _is_method_section(cfg, key):
            apply_dict(cfg, v, prefix=f"{key}.")
        elif k == "methods" and not prefix:
            for m, fields in (v or {}).items():
                for fk, fv in (fields or {}).items():
                    set_key(cfg, f"{m}.{fk}", fv)
        else:
            set_key(cfg, key, v)


def _is_method_section(cfg: Config, key: str) -> bool:
    return "." not in key and key not in {f.name for f in dataclasses.fields(cfg)}


def set_key(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    top = {f.name: f for f in dataclasses.fields(cfg)}
    if parts[0] not in top or parts[0] == "methods":
        if len(parts) == 2:  # <method>.<field>: validated against the method's Config later
            cfg.methods.setdefault(parts[0], {})[parts[1]] = value
            return
        allowed = [n for n in top if n != "methods"]
        raise ConfigError(f"unknown config key {key!r}; allowed top-level keys: {', '.join(allowed)} "
                          f"(or <method>.<field> for a method's own settings)")
    obj, name = cfg, parts[0]
    for p in parts[1:]:
        sub = getattr(obj, name)
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"config key {key!r}: {name!r} has no sub-keys")
        fields = {f.name for f in dataclasses.fields(sub)}
        if p not in fields:
            raise ConfigError(f"unknown config key {key!r}; allowed keys under {name!r}: {', '.join(sorted(fields))}")
        obj, name = sub, p
    if len(parts) == 1 and dataclasses.is_dataclass(getattr(cfg, name)):
        raise ConfigError(f"config key {key!r} is a section; set one of its fields, e.g. {key}.<field>=...")
    setattr(obj, name, coerce(key, value, _field_type(obj, name)))


def _field_type(obj: Any, name: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    return hints[name]


def coerce(key: str, value: Any, typ: Any) -> Any:
    """Check and convert a value to the field's type, naming the key on failure."""
    origin = typing.get_origin(typ) or typ
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise TypeError
        if typ is int:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
                raise TypeError
            return int(value)
        if typ is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            return float(value)
        if typ is str:
            return "" if value is None else str(value)
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return list(value)
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    tname = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"config key {key!r}: expected {tname}, got {value!r}")


def validate(cfg: Config) -> None:
    for key, allowed in ALLOWED.items():
        value = get_key(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
    checks = [
        (cfg.ipc >= 1, f"ipc={cfg.ipc} must be >= 1"),
        (cfg.data.image_size >= 4, f"data.image_size={cfg.data.image_size} must be >= 4"),
        (0 <= cfg.data.val_fraction < 1 and 0 <= cfg.data.test_fraction < 1
         and cfg.data.val_fraction + cfg.data.test_fraction < 1,
         "data.val_fraction and data.test_fraction must be in [0, 1) and sum to < 1"),
        (cfg.data.dataset == "digits" or cfg.data.root, f"data.root must be set when data.dataset={cfg.data.dataset}"),
        (cfg.data.dataset in ("digits", "imagefolder") or cfg.data.store,
         f"data.dataset={cfg.data.dataset} needs data.store=DIR_OR_URI: its files are decoded once into a store"),
        (not cfg.data.latents or (cfg.data.store and cfg.backbone.vae != "identity"),
         f"data.latents=true needs data.store=DIR_OR_URI and a latent backbone (backbone.vae: tiny, a hub id or a "
         f"diffusers dir; not identity); got data.store={cfg.data.store!r}, backbone.vae={cfg.backbone.vae!r}"),
        (1 <= cfg.sampler.steps <= cfg.sampler.train_timesteps,
         f"sampler.steps={cfg.sampler.steps} must be in [1, sampler.train_timesteps={cfg.sampler.train_timesteps}]"),
        (0 < cfg.sampler.beta_start < cfg.sampler.beta_end < 1, "need 0 < sampler.beta_start < sampler.beta_end < 1"),
        (not (cfg.sampler.clip_x0 and cfg.sampler.scheduler == "euler"),
         "sampler.clip_x0=true needs a scheduler that clips x0_hat; allowed with it: ddpm, ddim, dpm++, dpm++sde, unipc"),
        (cfg.sampler.cfg_scale >= 1.0, f"sampler.cfg_scale={cfg.sampler.cfg_scale} must be >= 1 (1 = no guidance)"),
        (cfg.sampler.guidance_micro_batch >= 0,
         f"sampler.guidance_micro_batch={cfg.sampler.guidance_micro_batch} must be >= 0 (0 = the whole batch)"),
        (cfg.compute.num_actors >= 1, f"compute.num_actors={cfg.compute.num_actors} must be >= 1"),
        (cfg.compute.batch_size >= 1, f"compute.batch_size={cfg.compute.batch_size} must be >= 1"),
        (cfg.compute.train_workers >= 1, "compute.train_workers must be >= 1"),
        (not cfg.compute.stages or cfg.compute.share_stages,
         "compute.stages is where shared stages live; with compute.share_stages=false none are shared (unset one)"),
        ("://" not in cfg.compute.stages or cfg.compute.stages.split("://")[0] in STAGE_SCHEMES,
         f"compute.stages={cfg.compute.stages!r}: allowed: a path, or a URI of {', '.join(STAGE_SCHEMES)}"),
        (min(cfg.compute.cpus_per_actor, cfg.compute.gpus_per_actor, cfg.compute.cpus_per_worker,
             cfg.compute.gpus_per_worker, cfg.compute.memory_per_actor_gib, cfg.compute.memory_per_worker_gib) >= 0,
         "compute.cpus_per_actor, gpus_per_actor, memory_per_actor_gib, cpus_per_worker, gpus_per_worker and "
         "memory_per_worker_gib must be >= 0"),
        (cfg.eval.seeds >= 1, f"eval.seeds={cfg.eval.seeds} must be >= 1"),
        (cfg.eval.split != "val" or cfg.data.val_fraction > 0,
         "eval.split=val needs a val split: set data.val_fraction > 0 (e.g. 0.15)"),
        (len(cfg.eval.students) >= 1, "eval.students must name at least one student"),
        (len(cfg.eval.randaugment) == 2 and cfg.eval.randaugment[0] >= 0 and 0 <= cfg.eval.randaugment[1] <= 30,
         f"eval.randaugment={cfg.eval.randaugment} must be [num_ops >= 0, magnitude in 0..30] (e.g. [1, 6])"),
        (all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in cfg.eval.real_acc.values()),
         f"eval.real_acc={cfg.eval.real_acc}: accuracies are fractions in [0, 1], e.g. {{resnet18: 0.87}}"),
        (not (both := sorted(set(cfg.eval.real_acc) & set(cfg.eval.real_checkpoint))),
         f"eval.real_acc and eval.real_checkpoint both give {both}: give one reference per student"),
        (not (missing := {s: p for s, p in cfg.eval.real_checkpoint.items()
                          if not str(p).endswith(".safetensors") or not Path(str(p)).is_file()}),
         f"eval.real_checkpoint: {missing} not a .safetensors file; allowed: the path of a student's state dict "
         f"saved with safetensors, e.g. {{resnet18: /models/resnet18-real.safetensors}}"),
        (cfg.eval.color_jitter >= 0 and cfg.eval.lighting >= 0 and cfg.eval.shuffle_patches >= 0,
         "eval.color_jitter, eval.lighting and eval.shuffle_patches must be >= 0"),
        (cfg.backbone.hidden_size % cfg.backbone.heads == 0, "backbone.hidden_size must be divisible by backbone.heads"),
        (cfg.data.image_size % cfg.backbone.patch_size == 0 or cfg.backbone.source != "tiny",
         "data.image_size must be divisible by backbone.patch_size"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    from raydd.students import list_students  # local import: students imports torch
    unknown = [s for s in cfg.eval.students if s not in list_students()]
    if unknown:
        raise ConfigError(f"unknown student(s) {unknown}; allowed: {', '.join(list_students())}")


def get_key(cfg: Config, key: str) -> Any:
    obj = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def run_params(cfg: Config, method_cfg: Any = None) -> dict[str, Any]:
    """An MLflow run's params: the resolved config without other methods' settings (`methods`), values left
    empty and fault injection that is off; the run's own method's resolved settings as <method>.<field>."""
    plain = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("methods", "faults")}
    if cfg.faults != FaultConfig():
        plain["faults"] = dataclasses.asdict(cfg.faults)
    if method_cfg is not None:
        plain[cfg.method] = dataclasses.asdict(method_cfg)
    return {k: v for k, v in flatten(plain).items() if v != ""}


def run_tags(cfg: Config) -> dict[str, str]:
    """Tags every raydd run carries (the git commit and raydd version come from raydd.tracking), so runs of
    every kind filter and group alike in the MLflow UI."""
    return {"method": cfg.method, "preset": cfg.preset, "ipc": str(cfg.ipc), "seed": str(cfg.seed),
            "smoke": str(cfg.smoke).lower()}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become JSON strings (MLflow params are strings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, prefix=f"{key}."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def config_hash(*parts: Any, length: int = 12) -> str:
    """Stable hash of JSON-able parts (dataclasses allowed) for cache keys."""
    blob = json.dumps([_content(p) for p in parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _content(obj: Any) -> Any:
    """What a key hashes. data.store says where the real data is read from, not what it is (a store reads back
    byte-identical to decoding), so it is left out wherever a data config appears: turning a store on retrains
    nothing. data.latents too: the jobs that read stored latents say so in their own configs (a fine-tune's
    stored_latents), so turning it on retrains only those. Except for the digits: their store holds each split in
    class order, not scikit-learn's, which changes the order a model trains in, so there a store counts (by that,
    not by where it is)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        if {f.name for f in dataclasses.fields(DataConfig)} <= obj.keys():            # a data config
            in_class_order = obj["dataset"] == "digits" and bool(obj["store"])
            obj = {k: v for k, v in obj.items() if k not in ("store", "latents")} | (
                {"store": "class order"} if in_class_order else {})
        return {k: _content(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_content(v) for v in obj]
    return obj


def make_method_config(method_cls: type, values: dict, method: str) -> Any:
    """Build a method's Config dataclass from `<method>.<field>` values, with errors that list fields."""
    cfg = method_cls()
    fields = {f.name for f in dataclasses.fields(cfg)}
    for k, v in (values or {}).items():
        if k not in fields:
            raise ConfigError(f"unknown config key '{method}.{k}'; allowed: "
                              f"{', '.join(f'{method}.{f}' for f in sorted(fields)) or '(none)'}")
        setattr(cfg, k, coerce(f"{method}.{k}", v, _field_type(cfg, k)))
    return cfg
