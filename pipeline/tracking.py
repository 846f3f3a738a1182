"""MLflow plumbing shared by every stage: where the store is, the experiment, explicit runs.

The default store is `mlflow/mlflow.db` (SQLite: tracking and registry) with artifacts in
`mlflow/artifacts`, both under the working directory and resolved to absolute paths, so Ray
trials that chdir into their own folders still write to the same store. `--mlflow-uri` and
`MLFLOW_TRACKING_URI` override. Runs are addressed by id through `MlflowClient` (no fluent
"active run" state), which is what lets a resumed process continue the same run.
"""
from __future__ import annotations

import logging
import math
import os
import subprocess
from pathlib import Path

from pipeline.errors import UserError

EXPERIMENT = "pufferfish"


def store_root() -> Path:
    return Path(os.environ.get("PUFFERFISH_HOME", Path.cwd())).resolve() / "mlflow"


def resolve_uri(cli_uri: str | None = None) -> str:
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if "://" not in uri and not uri.startswith("sqlite:"):  # a bare path: a SQLite file
            uri = f"sqlite:///{Path(uri).expanduser().resolve()}"
        return uri
    return f"sqlite:///{store_root() / 'mlflow.db'}"


def _local_sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def setup(cli_uri: str | None = None, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the store, create it and the experiment once (driver side); return its id."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    # A new store announces its schema migrations at INFO, which would bury a user's one-line
    # error (or the first lines of a run) under database chatter.
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)

    uri = resolve_uri(cli_uri)
    db = _local_sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            if db.exists() and not os.access(db, os.W_OK) or not os.access(db.parent, os.W_OK):
                raise PermissionError(str(db))
        except OSError as exc:
            raise UserError(f"the MLflow store {db} is not writable; fix its permissions or pass "
                            "--mlflow-uri") from exc
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if db is not None:  # explicit, absolute artifact root beside the database
                location = (db.parent / "artifacts").resolve().as_uri()
            return mlflow.create_experiment(experiment, artifact_location=location)
        return exp.experiment_id
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"the MLflow store at {uri} cannot be used ({str(exc).splitlines()[0][:160]}); "
                        "check --mlflow-uri") from exc


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Run:
    """One MLflow run addressed by id: create (optionally nested) or reattach on resume."""

    def __init__(self, experiment_id: str, run_id: str | None = None, name: str | None = None,
                 parent_id: str | None = None, tags: dict | None = None):
        from mlflow import MlflowClient

        self.client = MlflowClient()
        tags = dict(tags or {})
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id  # how MLflow itself nests runs
        if run_id is None:
            run = self.client.create_run(experiment_id, run_name=name, tags=tags)
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
            for k, v in tags.items():
                self.client.set_tag(run_id, k, v)
        self.id = run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = _flatten(params)
        existing = self.client.get_run(self.id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in flat.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.id, params=fresh[i:i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        import time as _t

        from mlflow.entities import Metric

        now = int(_t.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if items:
            self.client.log_batch(self.id, metrics=items)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.id, k, str(v))

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        self.client.log_artifact(self.id, str(path), subdir)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.id, text, name)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.id, status=status)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
