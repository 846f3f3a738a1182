"""`python -m pipeline.models`: the registered models, their versions, aliases and val bpb."""
from __future__ import annotations


from rich.console import Console
from rich.table import Table

from pipeline import tracking
from pipeline.errors import ArgumentParser, cli, run_script


def rows() -> list[dict]:
    from mlflow import MlflowClient

    client = MlflowClient()
    out = []
    for rm in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            out.append({"name": rm.name, "version": int(mv.version),
                        "aliases": ", ".join(sorted(aliases.get(str(mv.version), []))),
                        "val_bpb": mv.tags.get("val_bpb", ""), "params": mv.tags.get("params", ""),
                        "budget": mv.tags.get("budget", ""), "run_id": mv.run_id})
    return sorted(out, key=lambda r: (r["name"], -r["version"]))


@cli
def main(argv=None):
    p = ArgumentParser(prog="python -m pipeline.models", description=__doc__)
    p.add_argument("--mlflow-uri")
    args = p.parse_args(argv)
    tracking.setup(args.mlflow_uri)
    found = rows()
    console = Console()
    if not found:
        console.print("No registered models yet; train one with `python -m pipeline.autotune --minutes 10`.")
        return
    table = Table(title="Registered models")
    for col in ("name", "version", "aliases", "val_bpb", "params", "budget", "run_id"):
        table.add_column(col)
    for r in found:
        table.add_row(*(str(r[c]) for c in ("name", "version", "aliases", "val_bpb", "params", "budget", "run_id")))
    console.print(table)


if __name__ == "__main__":
    run_script(main)
