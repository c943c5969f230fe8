"""The pipeline's whole configuration: one typed tree, loaded from a YAML profile plus overrides.

Everything a stage needs is read from here, so a profile in `jobs/` is the single place a user edits.
Validation happens before anything is submitted and fails with one message naming key and value.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from dataclasses import field as dc_field  # not `field`: EvaluateConfig has a setting of that name
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CLUSTERS = ("slurm", "local", "debug")
SPLITS = ("train", "test")
NAMINGS = ("file_name", "image_id")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "tf32", "fp16", "bf16")
RESIZES = ("auto", "device", "cpu")
WINNER_GDRIVE_ID = "1dr0BQJm2G9edhJNRu9vaUCdA4lMNeeRo"
NO_CLI = {"cli": False}  # field metadata: not a command-line option of the stage (fathompipe.cli)


class ConfigError(ValueError):
    """A profile or override is wrong; the message names the file, key and value."""


@dataclass
class Resources:
    """What one Slurm job (or each task of an array) asks for."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    cpus_per_task: int = 2
    mem_gb: float = 4.0
    timeout_min: int = 60
    gpus_per_node: int = 0
    array_parallelism: int = 32
    signal_delay_s: int = 90  # Slurm warns the job (USR2) this long before its time limit: checkpoint, requeue
    extra: Dict[str, str] = dc_field(default_factory=dict)  # any other sbatch option, e.g. constraint


@dataclass
class SplitData:
    annotations: Optional[str] = None  # COCO json; required for every selected split
    images_dir: Optional[str] = None


@dataclass
class DataConfig:
    splits: List[str] = dc_field(default_factory=lambda: ["test"])
    train: SplitData = dc_field(default_factory=SplitData)
    test: SplitData = dc_field(default_factory=SplitData)
    naming: str = "file_name"  # or image_id: {image_id}.png, the winner's layout (download, infer and evaluate)

    def source(self, split: str) -> "SplitSource":
        data: SplitData = getattr(self, split)
        return SplitSource(str(data.annotations), str(data.images_dir), split, self.naming)


@dataclass(frozen=True)
class SplitSource:
    """One split's inputs as each stage job reads them: its annotations, where its images are, how they are named."""

    annotations: str = dc_field(metadata={"help": "FathomNet COCO json (train or test)"})
    images_dir: str = dc_field(metadata={"help": "where the split's images are (or are downloaded to)"})
    split: str = dc_field(default="test", metadata={"choices": SPLITS})
    naming: str = dc_field(default="file_name", metadata={"choices": NAMINGS, "help": "file_name: as in the "
                                                        "annotations; image_id: {image_id}.png, the winner's layout"})


@dataclass
class DownloadConfig:
    num_shards: int = 8
    concurrency: int = 32  # requests in flight per shard
    per_host: int = 16  # open connections per host per shard
    processes: int = 0  # download processes per shard; 0: one per CPU the job may use
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0  # longest silence while reading a body
    max_attempts: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    resources: Resources = dc_field(default_factory=lambda: Resources(cpus_per_task=2, mem_gb=2, timeout_min=120),
                                 metadata=NO_CLI)


@dataclass
class CheckpointConfig:
    path: str = dc_field(default="checkpoints/last-002.ckpt",
                      metadata={"flag": "checkpoint", "help": "the Lightning .ckpt (downloaded there if absent)"})
    gdrive_id: str = WINNER_GDRIVE_ID
    url: Optional[str] = dc_field(default=None, metadata={"help": "a mirror to download from instead of Google Drive"})
    resources: Resources = dc_field(default_factory=lambda: Resources(cpus_per_task=2, mem_gb=8, timeout_min=180),
                                 metadata=NO_CLI)


@dataclass
class InferConfig:
    device: str = dc_field(default="auto", metadata={"choices": DEVICES})
    precision: str = dc_field(default="auto", metadata={"choices": PRECISIONS, "help": "auto: fp32 on the CPU, the "
                                                     "measured fastest agreeing mode on a GPU"})
    batch_size: int = 64
    num_workers: int = 4
    shards: int = dc_field(default=1, metadata={"flag": "num-shards", "help": "GPU array tasks over disjoint image "
                                             "sets, merged at the end"})
    encoder_config: Optional[str] = dc_field(default=None, metadata={"help": "Dinov2Config fields as JSON (e.g. the "
                                                                  "parity fixture's); default: 64-dim heads"})
    embeddings: bool = dc_field(default=True, metadata={"help": "write OUT.embeddings.npy, the per-ROI embeddings "
                                                        "(1024 floats a ROI: 100 MB for the train split, 8.2 GB "
                                                        "for 2M ROIs)"})
    resize: str = dc_field(default="cpu", metadata={"choices": RESIZES, "help": "where crops are cut and resized: cpu "
                                                 "(Pillow in the DataLoader workers), device (the workers only "
                                                 "decode; bit-identical crops on the inference device), auto "
                                                 "(device on a GPU, cpu on the CPU)"})
    resources: Resources = dc_field(
        default_factory=lambda: Resources(cpus_per_task=8, mem_gb=32, timeout_min=120, gpus_per_node=1),
        metadata=NO_CLI)


@dataclass
class EvaluateConfig:
    """Where and how the evaluate stage writes in FiftyOne. Never holds a secret: a FiftyOne Enterprise deployment
    is a name, its URI and key are read inside the job; a database password is refused in `database_uri` (which
    travels in the job's pickle and the run's config.yaml) and belongs in FIFTYONE_DATABASE_URI in the environment
    or .env, which the job reads."""

    resources: Resources = dc_field(default_factory=lambda: Resources(cpus_per_task=2, mem_gb=8, timeout_min=60),
                                 metadata=NO_CLI)
    fiftyone: bool = dc_field(default=True, metadata={"help": "import the predictions into FiftyOne and "
                                                               "evaluate them there (--no-fiftyone: report only)"})
    dataset: str = "fathomnet-2025"
    field: str = dc_field(default="model_predictions", metadata={"help": "the predictions field of a sample"})
    eval_key: str = dc_field(default="eval_model", metadata={"help": "split S is stored as EVAL_KEY_S"})
    database_uri: Optional[str] = dc_field(
        default=None, metadata={"help": "an external MongoDB (default: fathompipe's private database)"})
    database_dir: Optional[str] = dc_field(
        default=None, metadata={"help": "data directory of fathompipe's private database, FiftyOne's mongod on a "
                                        "socket only you can open (default: FiftyOne's, ~/.fiftyone/var/lib/mongo)"})
    database_cache_gb: Optional[float] = dc_field(
        default=None, metadata={"help": "WiredTiger cache of the private database when the job starts it, in GB "
                                        "(default: a quarter of evaluate.resources.mem_gb, at least 0.25)"})
    deployment: Optional[str] = dc_field(
        default=None, metadata={"help": "FiftyOne Enterprise deployment NAME: NAME_FIFTYONE_API_URI and "
                                        "NAME_FIFTYONE_API_KEY from the environment or .env"})
    env_file: Optional[str] = dc_field(
        default=None, metadata={"help": ".env file the job reads (default: .env in its directory or above)"})
    expected_distance_csv: bool = dc_field(
        default=False, metadata={"help": "also write REPORT_DIR/predictions.expected_distance.csv: the competition CSV "
                                         "with the expected-distance rule's answers (needs the logits, "
                                         "predictions.parquet); the infer stage's predictions.csv stays argmax"})


@dataclass
class PipelineConfig:
    run_dir: str = "runs/default"
    cluster: str = "local"
    data: DataConfig = dc_field(default_factory=DataConfig)
    download: DownloadConfig = dc_field(default_factory=DownloadConfig)
    checkpoint: CheckpointConfig = dc_field(default_factory=CheckpointConfig)
    infer: InferConfig = dc_field(default_factory=InferConfig)
    evaluate: EvaluateConfig = dc_field(default_factory=EvaluateConfig)


@dataclass(frozen=True)
class Origins:
    """Where each key's value came from (a key=value override, the profile, or the base: the defaults or a run's
    config.yaml), so that a message about a wrong value sends the user to the place that set it."""

    profile: Optional[str] = None
    overrides: Tuple[str, ...] = ()
    base: str = "defaults"

    def override(self, key: str) -> Optional[str]:
        """The last `key=value` (or `parent=value`) override that sets `key`, if any."""
        for item in reversed(self.overrides):
            name = item.split("=", 1)[0].strip()
            if key == name or key.startswith(name + "."):
                return item
        return None

    def where(self, key: str) -> str:
        """`command line`, the profile's path or the base: the prefix of a message about `key`'s value."""
        return "command line" if self.override(key) else (self.profile or self.base)

    def change(self, key: str) -> str:
        """How to change `key`: `on the command line (infer.resources.qos=x)`, `in jobs/pace.yaml`, or, without a
        profile, `with infer.resources.qos=... on the command line`."""
        item = self.override(key)
        if item:
            return f"on the command line ({redact({'v': item})['v']})"
        return f"in {self.profile}" if self.profile else f"with {key}=... on the command line"


def origins(profile: Optional[str | Path], overrides: Sequence[str], base: str = "defaults") -> Origins:
    return Origins(str(profile) if profile is not None else None, tuple(overrides), base)


def expand_path(value: str, key: str, source: str) -> str:
    """Expand `~` and `$VARS` (an unset variable is an error, never a literal `$HOME` folder) and make the path
    absolute: the run's config.yaml then means the same files from any directory and in every job."""
    expanded = os.path.expanduser(os.path.expandvars(value))
    leftover = re.search(r"\$\{?\w+\}?", expanded)
    if leftover:
        raise ConfigError(f"{source}: {key}={value!r}: environment variable {leftover.group(0)} is not set")
    return os.path.abspath(expanded)


def load_config(profile: Optional[str | Path] = None, overrides: List[str] | None = None) -> PipelineConfig:
    """Profile YAML, then `key=value` overrides, over the typed defaults; validated."""
    schema = OmegaConf.structured(PipelineConfig)
    origin = origins(profile, overrides or [])
    layers: List[DictConfig] = []
    if profile is not None:
        path = Path(profile)
        if not path.is_file():
            raise ConfigError(f"profile {path} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # yaml errors carry line numbers; keep them
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: the profile must be a mapping of keys, not {type(loaded).__name__}")
        layers.append(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. download.concurrency=64")
        layers.append(OmegaConf.from_dotlist([item]))
    merged = schema
    for i, layer in enumerate(layers):
        where = str(profile) if (profile is not None and i == 0) else "command line"
        _refuse_moved_keys(layer, where)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(_describe(exc, where)) from None
    cfg: PipelineConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _expand_paths(cfg, origin)
    validate(cfg, origin)
    return cfg


MOVED_KEYS = {("download", "naming"): "data.naming"}  # image naming steers infer and evaluate too


def _refuse_moved_keys(layer: DictConfig, where: str) -> None:
    for (section, key), target in MOVED_KEYS.items():
        part = layer.get(section)
        if isinstance(part, DictConfig) and key in part:
            raise ConfigError(f"{where}: {section}.{key} has moved to {target}; write {target}: {part[key]} "
                              f"instead (it names the images for every stage)")


def _describe(exc: OmegaConfBaseException, where: str) -> str:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    if "Key" in type(exc).__name__ or "not in" in msg:
        return f"{where}: unknown key {key!r} ({msg})"
    return f"{where}: key {key!r}: {msg}"


def _expand_paths(cfg: PipelineConfig, origin: Origins) -> None:
    cfg.run_dir = expand_path(cfg.run_dir, "run_dir", origin.where("run_dir"))
    for split in SPLITS:
        data: SplitData = getattr(cfg.data, split)
        for attr in ("annotations", "images_dir"):
            value = getattr(data, attr)
            key = f"data.{split}.{attr}"
            if value is not None:
                setattr(data, attr, expand_path(value, key, origin.where(key)))
    cfg.checkpoint.path = expand_path(cfg.checkpoint.path, "checkpoint.path", origin.where("checkpoint.path"))
    for section, attr in (("infer", "encoder_config"), ("evaluate", "env_file"), ("evaluate", "database_dir")):
        value = getattr(getattr(cfg, section), attr)
        if value:
            key = f"{section}.{attr}"
            setattr(getattr(cfg, section), attr, expand_path(value, key, origin.where(key)))


def _check(ok: bool, origin: Origins, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{origin.where(key)}: {key}={value!r}: {why}")


def validate(cfg: PipelineConfig, where: str | Origins = "config") -> None:
    """Reject impossible values, missing inputs and secrets before a single job is queued."""
    origin = where if isinstance(where, Origins) else Origins(where)
    _check(cfg.cluster in CLUSTERS, origin, "cluster", cfg.cluster, f"must be one of {', '.join(CLUSTERS)}")
    _check(bool(cfg.data.splits), origin, "data.splits", cfg.data.splits, "select at least one split")
    for split in cfg.data.splits:
        _check(split in SPLITS, origin, "data.splits", cfg.data.splits, f"unknown split {split!r}; use train, test")
        data: SplitData = getattr(cfg.data, split)
        key = f"data.{split}.annotations"
        _check(data.annotations is not None, origin, key, None, f"required because split {split!r} is selected")
        _check(Path(data.annotations).is_file(), origin, key, data.annotations, "file does not exist")
        _check(data.images_dir is not None, origin, f"data.{split}.images_dir", None, "required")
    d = cfg.download
    for key, value in [("num_shards", d.num_shards), ("concurrency", d.concurrency), ("per_host", d.per_host),
                       ("max_attempts", d.max_attempts)]:
        _check(value >= 1, origin, f"download.{key}", value, "must be at least 1")
    for key, value in [("connect_timeout_s", d.connect_timeout_s), ("read_timeout_s", d.read_timeout_s),
                       ("backoff_base_s", d.backoff_base_s), ("backoff_max_s", d.backoff_max_s)]:
        _check(value > 0, origin, f"download.{key}", value, "must be positive")
    _check(d.processes >= 0, origin, "download.processes", d.processes, "must be 0 (one per CPU) or more")
    _check(cfg.data.naming in NAMINGS, origin, "data.naming", cfg.data.naming, f"must be one of {', '.join(NAMINGS)}")
    i = cfg.infer
    _check(i.device in DEVICES, origin, "infer.device", i.device, f"must be one of {', '.join(DEVICES)}")
    _check(i.precision in PRECISIONS, origin, "infer.precision", i.precision, f"must be one of {', '.join(PRECISIONS)}")
    _check(i.resize in RESIZES, origin, "infer.resize", i.resize, f"must be one of {', '.join(RESIZES)}")
    _check(i.batch_size >= 1, origin, "infer.batch_size", i.batch_size, "must be at least 1")
    _check(i.num_workers >= 0, origin, "infer.num_workers", i.num_workers, "must be 0 or more")
    _check(i.shards >= 1, origin, "infer.shards", i.shards, "must be at least 1")
    if i.encoder_config:
        _check(Path(i.encoder_config).is_file(), origin, "infer.encoder_config", i.encoder_config,
               "file does not exist")
    e = cfg.evaluate
    _check(bool(re.fullmatch(r"[A-Za-z0-9_]+", e.eval_key)), origin, "evaluate.eval_key", e.eval_key,
           "letters, digits and _ only (FiftyOne stores it as a field name)")
    _check(bool(e.dataset.strip()), origin, "evaluate.dataset", e.dataset, "must not be empty")
    if e.deployment is not None:
        _check(bool(re.fullmatch(r"[A-Za-z0-9_]+", e.deployment)), origin, "evaluate.deployment", e.deployment,
               "letters, digits and _ only (it prefixes NAME_FIFTYONE_API_URI and NAME_FIFTYONE_API_KEY)")
        _check(not e.database_uri, origin, "evaluate.database_uri", "(set)",
               "choose one of evaluate.database_uri and evaluate.deployment")
    if e.database_uri:
        _check(e.database_uri.startswith(("mongodb://", "mongodb+srv://")), origin, "evaluate.database_uri",
               redact({"uri": e.database_uri})["uri"], "must start with mongodb:// or mongodb+srv://")
    if e.database_dir:
        _check(not e.database_uri and not e.deployment, origin, "evaluate.database_dir", e.database_dir,
               "is for fathompipe's private database; evaluate.database_uri or evaluate.deployment selects another")
    if e.database_cache_gb is not None:
        _check(e.database_cache_gb >= 0.25, origin, "evaluate.database_cache_gb", e.database_cache_gb,
               "must be at least 0.25 (mongod's minimum)")
    _refuse_secrets(to_dict(cfg), origin)
    for stage in ("download", "checkpoint", "infer", "evaluate"):
        r: Resources = getattr(cfg, stage).resources
        prefix = f"{stage}.resources"
        _check(r.cpus_per_task >= 1, origin, f"{prefix}.cpus_per_task", r.cpus_per_task, "must be at least 1")
        _check(r.mem_gb > 0, origin, f"{prefix}.mem_gb", r.mem_gb, "must be positive")
        _check(r.timeout_min >= 1, origin, f"{prefix}.timeout_min", r.timeout_min, "must be at least 1 minute")
        _check(r.gpus_per_node >= 0, origin, f"{prefix}.gpus_per_node", r.gpus_per_node, "must be 0 or more")
        _check(r.array_parallelism >= 1, origin, f"{prefix}.array_parallelism", r.array_parallelism,
               "must be at least 1")
        _check(0 <= r.signal_delay_s < r.timeout_min * 60, origin, f"{prefix}.signal_delay_s", r.signal_delay_s,
               f"must be 0 or more and less than the time limit ({r.timeout_min * 60} s)")


def _refuse_secrets(tree: Dict[str, Any], origin: Origins, prefix: str = "") -> None:
    """A secret (what `redact` masks, masked already or not) never sits in the configuration: it would travel in
    job pickles and config.yaml, and a run rebuilt from the redacted config.yaml (resubmit, resume) would get `***`
    (as a config.yaml written by an older fathompipe still holds: refused too)."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _refuse_secrets(value, origin, name + ".")
        elif isinstance(value, str) and ((_SECRET_KEY.search(str(key)) and value) or _URI_CREDENTIALS.search(value)):
            where = ("FIFTYONE_DATABASE_URI, in the environment or in the .env file the evaluate job reads "
                     "(evaluate.env_file, or .env in the directory you submit from)" if name == "evaluate.database_uri"
                     else "the environment or a .env file, never the configuration")
            raise ConfigError(f"{origin.where(name)}: {name}={redact({key: value})[key]!r}: holds a password or "
                              f"secret, which would be copied into every job's pickle and the run's config.yaml. "
                              f"Put it in {where}, and leave {name} out.")


_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_key|apikey)$", re.I)
_URI_CREDENTIALS = re.compile(r"(://[^:/@]+:)[^@]+@")


def redact(value: Any, key: str = "") -> Any:
    """A copy fit for logs and run state: secret-named values and passwords in URIs masked."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if _SECRET_KEY.search(key) and value:
            return "***"
        return _URI_CREDENTIALS.sub(r"\1***@", value)
    return value


def to_dict(cfg: PipelineConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: PipelineConfig) -> str:
    """The resolved configuration, secrets redacted, as written into the run directory."""
    return OmegaConf.to_yaml(OmegaConf.create(redact(to_dict(cfg))))
