"""Pack the Python packages the lent GPU machine lacks into one archive that travels with a call.

The lent H200 (`/work/.library/device`) has torch, transformers, tokenizers, safetensors and
rich, but not Ray, Optuna, MLflow or datasets, and it reaches no package index. A call carries at
most 64 MiB; Ray's wheel alone is 79 MB, which is why autotune, the predictor and the deadline
benchmark had no GPU figures (sessions 10-12). Installed for the machine's Python 3.12, with what a
Python-only Ray and a headless MLflow never load taken out (PRUNE), and xz-compressed, the set fits.

Here, once (a few minutes; needs the package index):
    python -m benchmarks.gpu_site            # writes .gpu-site/site.tar.xz (git-ignored)
Then through the device tool, e.g.:
    run(command="bash benchmarks/gpu.sh <commit> ray predictor", carry=[".whl", ".gpu-site"])
`benchmarks/gpu.sh` unpacks the archive into /tmp/site, which it puts on PYTHONPATH.

The versions are this checkout's virtual environment's, so the GPU runs the code the CPU tests ran.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".gpu-site"
LIMIT = 60 * 2 ** 20  # the call's 64 MiB, less the working tree and the corpus wheel

# The lent machine's image ('cuda'), as /work/.library/device/KINDS.md listed it on 2026-11-17.
DEVICE_HAS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split())

# The machine: CPython 3.12 on x86-64 Linux (requirement markers are evaluated for it).
MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux1_x86_64"]

# Never loaded by what the GPU runs: Ray's Java worker (32 MB), MLflow's web UI build (the UI
# runs here, on the store the results come back to), JavaScript source maps.
PRUNE = ["ray/jars", "mlflow/server/js", "**/*.js.map", "bin"]


def missing_packages(project: str = "pufferfish") -> list[str]:
    """`name==version` for every runtime dependency of the project, recursively, that the lent
    machine lacks, at the versions installed here."""
    wanted: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in metadata.distribution(project).requires or []
            if "extra ==" not in r]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in DEVICE_HAS or (name in wanted and set(req.extras) <= wanted[name]):
            continue
        wanted[name] = wanted.get(name, set()) | set(req.extras)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"error: {name} is not installed here; run `make setup` first") from None
        for r in map(Requirement, dist.requires or []):
            if r.marker is None or any(r.marker.evaluate(MARKERS | {"extra": e}) for e in wanted[name] | {""}):
                todo.append(r)
    return sorted(f"{n}=={metadata.version(n)}" for n in wanted)


def build(out: Path = OUT) -> Path:
    pins = missing_packages()
    stage = Path(tempfile.mkdtemp(prefix="gpu-site-"))
    platforms = [f"--platform={p}" for p in PLATFORMS]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                    str(stage), "--only-binary=:all:", "--python-version=3.12", "--implementation=cp",
                    *platforms, *pins], check=True)
    for pattern in PRUNE:
        for path in list(stage.glob(pattern)):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(exist_ok=True)
    archive = out / "site.tar.xz"
    partial = archive.with_suffix(".tmp")
    # xz -9 on every core: about 4x smaller than the files; the machine unpacks it in seconds
    with open(partial, "wb") as f:
        tar = subprocess.Popen(["tar", "-C", str(stage), "-cf", "-", "."], stdout=subprocess.PIPE)
        subprocess.run(["xz", "-9", "-T0"], stdin=tar.stdout, stdout=f, check=True)
        if tar.wait() != 0:
            raise SystemExit("error: tar failed")
    partial.replace(archive)  # a failed build never leaves a truncated archive behind
    (out / "packages.txt").write_text("\n".join(pins) + "\n")
    shutil.rmtree(stage)
    size = archive.stat().st_size
    print(f"{archive.relative_to(ROOT)}: {len(pins)} packages, {size / 2 ** 20:.1f} MiB")
    if size > LIMIT:
        raise SystemExit(f"error: the archive is {size / 2 ** 20:.1f} MiB, over the {LIMIT / 2 ** 20:.0f} MiB a call "
                         "can carry; add what the GPU runs never load to PRUNE")
    return archive


if __name__ == "__main__":
    build()
