"""A run's configuration: model + training + data, read from YAML with unknown keys named."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.config import ConfigError, ModelConfig
from pipeline.data.cache import DataSettings


@dataclass
class TrainConfig:
    lr: float = 3e-3
    schedule: str = "linear"        # "linear": warmup, then linear decay to zero at the deadline
    #                                 "wsd": warmup, constant, (1 - sqrt) cooldown over decay_frac
    warmup_frac: float = 0.02       # share of the budget spent warming up
    decay_frac: float = 0.2         # wsd only: share of the budget spent cooling down
    weight_decay: float = 0.1       # matrices only; norms and biases are never decayed
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: str = "adamw"        # "adamw" or "adafactor" (low memory)
    batch_tokens: int = 16384       # global batch per optimizer step, in tokens
    micro_batch: int = 16           # sequences per forward/backward
    seq_len: int = 256
    precision: str = "auto"         # auto | fp32 | bf16 | fp16
    compile: bool = False
    eval_every_s: float = 120.0
    eval_tokens: int = 32768        # fixed validation sample for periodic evaluation
    stop_on_overfit: bool = True    # past one epoch, rising periodic validation bpb cools the
    #                                 learning rate to zero and ends the run (OverfitCooldown)
    final_eval_tokens: int = 1_000_000  # cap on the "full" validation split at the end
    checkpoint_every_s: float = 300.0
    keep_checkpoints: int = 2
    seed: int = 0
    data_fraction: float = 1.0      # train on the first share of the training tokens only
    parallel: str = "ddp"           # with several workers: "ddp" (replicas) or "fsdp" (sharded
    #                                 weights, gradients and optimizer state, for models DDP can't fit)

    def validate(self) -> None:
        checks = [
            (self.lr > 0, "train.lr must be positive"),
            (self.schedule in ("linear", "wsd"), "train.schedule must be 'linear' or 'wsd'"),
            (0 <= self.warmup_frac < 1, "train.warmup_frac must be in [0, 1)"),
            (0 < self.decay_frac <= 1, "train.decay_frac must be in (0, 1]"),
            (self.optimizer in ("adamw", "adafactor"), "train.optimizer must be 'adamw' or 'adafactor'"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision must be auto, fp32, bf16 or fp16"),
            (self.micro_batch > 0, "train.micro_batch must be positive"),
            (self.seq_len > 0, "train.seq_len must be positive"),
            (self.batch_tokens >= self.seq_len, "train.batch_tokens must be at least one sequence (seq_len)"),
            (self.keep_checkpoints >= 1, "train.keep_checkpoints must be ≥ 1"),
            (0 < self.data_fraction <= 1, "train.data_fraction must be in (0, 1]"),
            (self.parallel in ("ddp", "fsdp"), "train.parallel must be 'ddp' or 'fsdp'"),
            (self.eval_tokens > 0 and self.final_eval_tokens > 0, "train.eval_tokens must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def accumulation(self) -> int:
        return max(1, self.batch_tokens // (self.micro_batch * self.seq_len))


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataSettings = field(default_factory=DataSettings)

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "train": dataclasses.asdict(self.train),
                "data": dataclasses.asdict(self.data)}

    def fingerprint(self) -> str:
        """Identity of what is trained (the data cache location is not part of it)."""
        d = self.to_dict()
        d["data"].pop("cache_dir", None)
        d["train"].pop("parallel", None)  # how it is spread over workers, not what is trained
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        raw = dict(raw or {})
        unknown = sorted(set(raw) - {"model", "train", "data"})
        if unknown:
            raise ConfigError(f"unknown config sections: {', '.join(unknown)} (known: model, train, data)")
        train = _build(TrainConfig, raw.get("train") or {}, "train")
        model_raw = dict(raw.get("model") or {})
        model_raw.setdefault("max_seq_len", train.seq_len)
        model = ModelConfig.from_dict(model_raw)
        data = _build(DataSettings, raw.get("data") or {}, "data")
        cfg = cls(model=model, train=train, data=data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        self.train.validate()
        self.model.validate()
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len "
                              f"({self.model.max_seq_len})")

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping with model/train/data sections")
        return cls.from_dict(raw or {})


def _build(kind, raw: dict, section: str):
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown {section} config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        return kind(**raw)
    except TypeError as exc:
        raise ConfigError(f"bad {section} config: {exc}") from exc


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """`--set train.lr=1e-3 model.n_layers=6`: values parsed as YAML scalars."""
    d = cfg.to_dict()
    for item in overrides or []:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or not name or section not in d:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE with SECTION in model, train, data")
        if name not in d[section]:
            raise ConfigError(f"--set {item!r}: {section} has no key {name!r}")
        d[section][name] = yaml.safe_load(value)
    return RunConfig.from_dict(d)
