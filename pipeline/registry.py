"""The MLflow Model Registry as the single place finished models live.

A finished run is logged as an MLflow model: a `pyfunc` wrapper (`PufferfishLM`) whose
artifacts are the run's model folder (native safetensors + config + tokenizer, and the Hugging
Face export for dense models). `mlflow.pyfunc.load_model("models:/NAME@champion").predict(
["Once upon a time"])` returns generated text with nothing imported beyond the installed package.

Aliases: `champion` moves only when the new version's validation bits-per-byte beats the current
champion's on the same data and tokenizer. MLflow reserves the alias name `latest`: the newest
version is always `models:/NAME/latest`, built in, so no alias is needed for it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc

from pipeline.errors import UserError

NATIVE = "native"


class PufferfishLM(mlflow.pyfunc.PythonModel):
    """pyfunc: list of prompts → list of generations (params: see PARAMS)."""

    # predict has no type hints on purpose (MLflow would infer a signature from them that drops
    # `params`); this flag tells MLflow not to wrap it for type-hint validation.
    _skip_type_hint_validation = True

    def load_context(self, context):
        from pipeline.generate import load_generator

        self.generator = load_generator(Path(context.artifacts["model"]))

    def predict(self, context, model_input, params=None):
        params = dict(params or {})
        if hasattr(model_input, "columns"):  # a DataFrame (MLflow's schema enforcement makes one)
            model_input = model_input[model_input.columns[0]].tolist()
        prompts = [model_input] if isinstance(model_input, str) else [str(p) for p in model_input]
        top_k, top_p = int(params.get("top_k", 0)), float(params.get("top_p", 1.0))
        return [self.generator.complete(p, max_new_tokens=int(params.get("max_new_tokens", 64)),
                                        temperature=float(params.get("temperature", 0.0)),
                                        top_k=top_k or None, top_p=top_p if top_p < 1 else None,
                                        seed=int(params.get("seed", 0)))
                for p in prompts]


# Inference-time parameters the pyfunc accepts (top_k 0 and top_p 1.0 mean "off").
PARAMS = {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}


@dataclass
class Registration:
    name: str
    version: str
    champion: bool
    reason: str
    model_uri: str


def default_name(data_source: str) -> str:
    """A registry name from the data source: `embedded:wiki-en` → `pufferfish-wiki-en`."""
    tail = data_source.split(":", 1)[-1]
    tail = Path(tail).stem if "/" in tail or "." in tail else tail
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", tail).strip("-").lower() or "model"
    return f"pufferfish-{slug}"[:60]


def register(model_dir: Path, name: str, *, run_id: str, val_bpb: float, data_fingerprint: str,
             tokenizer_hash: str, tags: dict | None = None, description: str = "",
             log=print) -> Registration:
    """Log `model_dir` as a pyfunc model under `run_id`, register it, and set the aliases."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    tags = {**(tags or {}), "val_bpb": f"{val_bpb:.6f}", "data_fingerprint": data_fingerprint,
            "tokenizer_hash": tokenizer_hash}
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                                       artifacts={"model": str(model_dir)}, pip_requirements=[],
                                       signature=mlflow.models.infer_signature(["prompt"], ["text"], params=PARAMS),
                                       input_example=(["Once upon a time"], {"max_new_tokens": 8}))
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="Pufferfish models trained on one data source")
    mv = client.create_model_version(name, info.model_uri, run_id=run_id, tags=tags,
                                     description=description)
    champion, reason = _champion_decision(client, name, mv.version, val_bpb, data_fingerprint, tokenizer_hash)
    if champion:
        client.set_registered_model_alias(name, "champion", mv.version)
    log(f"registered {name} version {mv.version} (models:/{name}/latest); {reason}")
    return Registration(name, str(mv.version), champion, reason, f"models:/{name}/{mv.version}")


def _champion_decision(client, name: str, version: str, bpb: float, data_fp: str, tok_hash: str):
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return True, f"@champion set to version {version}: first model of {name}"
    cur_bpb = float(current.tags.get("val_bpb", "inf"))
    same = (current.tags.get("data_fingerprint") == data_fp and current.tags.get("tokenizer_hash") == tok_hash)
    if not same:
        return False, (f"@champion stays at version {current.version}: it was evaluated on other data or "
                       "another tokenizer, so bits-per-byte are not comparable")
    if bpb < cur_bpb:
        return True, (f"@champion moved from version {current.version} to {version}: val bpb {bpb:.4f} "
                      f"beats {cur_bpb:.4f}")
    return False, f"@champion stays at version {current.version}: its val bpb {cur_bpb:.4f} ≤ {bpb:.4f}"


def resolve_model_dir(uri: str) -> Path:
    """A local model folder for `models:/NAME@alias`, `models:/NAME/3`, `runs:/ID/...` or a path."""
    path = Path(uri).expanduser()
    if path.exists():
        return _model_root(path)
    if not uri.startswith(("models:/", "runs:/")):
        raise UserError(f"--model {uri}: no such folder, and not a models:/ or runs:/ URI")
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if uri.startswith("models:/"):
        ref = uri[len("models:/"):]
        name = re.split(r"[@/]", ref, maxsplit=1)[0]
        client = MlflowClient()
        try:
            client.get_registered_model(name)
        except MlflowException:
            models = [m.name for m in client.search_registered_models()]
            if not models:
                raise UserError("the registry has no models yet; train one with "
                                "`python -m pipeline.autotune --minutes 10`") from None
            raise UserError(f"no registered model {name!r}; registered: {', '.join(models)}") from None
        if "@" in ref:
            alias = ref.split("@", 1)[1]
            try:
                client.get_model_version_by_alias(name, alias)
            except MlflowException:
                aliases = sorted(client.get_registered_model(name).aliases)
                raise UserError(f"model {name} has no alias {alias!r}; aliases: {', '.join(aliases) or 'none'}") from None
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except MlflowException as exc:
        raise UserError(f"--model {uri} could not be loaded ({str(exc).splitlines()[0][:160]})") from exc
    return _model_root(Path(local))


def _model_root(path: Path) -> Path:
    """The folder holding `native/` (accepts the pyfunc folder, the model folder or native/)."""
    # The pyfunc keeps the model folder under artifacts/<folder name>/ (MLflow names it after
    # the logged folder), so look one level into artifacts/ as well.
    for candidate in (path, path / "model", *sorted(path.glob("artifacts/*")), path.parent):
        if (candidate / NATIVE / "config.json").is_file():
            return candidate
    if (path / "config.json").is_file():
        return path
    raise UserError(f"{path} is not a Pufferfish model (no {NATIVE}/config.json); the artifact is "
                    "incomplete or corrupt")
