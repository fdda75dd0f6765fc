"""One store of finished training runs for the whole workbook, and the launcher that fills it (issues 19 and 20).

A training run is described by a :class:`RunSpec`: the trainer (``"package.module:function"``, a function that takes
JSON-able keyword arguments and returns a picklable result, typically a :class:`TrainedRun`), its arguments (model
name, data and train configs as dicts, seed, ...) and a label for people. The run's **key** is a sha256 of

- the trainer and its arguments (canonical JSON),
- the code version (:func:`code_version`: the source files of the trainer's import closure in the ``tokenbook``
  package, every ``.yaml`` file of it, and the versions of torch, timm and numpy),
- the float environment that decides the result bit for bit: the device kind (CPU model or GPU name) and the number
  of torch threads the run uses (CPU kernels may reduce in another order with another thread count).

A run is therefore reused exactly where it would come out the same; any change of the code it runs, the recipe, the
data, the seed or the machine trains it again.

**Store.** The finished runs live in a :class:`joblib.Memory` cache (a well-kept, content-addressed, process-safe
on-disk cache; its writes are atomic renames): ``$TOKENBOOK_RUNS``, else ``$TOKENBOOK_CACHE/runs``, else
``~/.cache/tokenbook/runs``. A notebook that needs a run the store holds reads it instead of training it, so an
interrupted ``./run_all.sh`` resumes from the runs that had finished, and a second run with nothing changed trains
nothing.

**Launcher.** :func:`launch` makes sure every spec is in the store and returns the :class:`Run` records in order:

- ``executor="kernel"``: trained one after the other in the calling process (the notebook's kernel), with its
  threads;
- ``executor="processes"``: the missing runs trained side by side in ``workers`` spawned processes, each with
  ``threads`` torch threads (default: the cores divided among the workers), for independent seeds and arms. Each
  process writes its run into the store itself, so a run that finished survives the others failing.
- ``executor="torchrun"``: each missing run as one DDP job on this node, ``torchrun --standalone
  --nproc-per-node N`` (N: ``resources["nproc_per_node"]``, else the spec's ``train["devices"]``): every rank runs
  the trainer (whose train config says ``strategy="ddp"`` and ``devices=N``; Fabric joins the ranks torchrun
  started), rank 0 writes the store. One run after the other; a killed run resumes like the others.
- ``executor="submitit"``: one job per missing run through `submitit <https://github.com/facebookincubator/submitit>`_
  (SLURM on a cluster, ``cluster="local"`` for processes on this machine, ``"debug"`` in this process); the
  job's shape comes from the run's recipe (:func:`job_resources`: ``nodes`` = ``num_nodes``, one task and GPU per
  device), then ``resources``, then the spec's own (``timeout_min``, ``slurm_partition``, ...). A job of several
  tasks is one DDP run over all of them (train config ``strategy="ddp"``): global rank 0 writes the store. A preempted or timed-out job is requeued by submitit and resumes from its
  checkpoint. ``wait=False`` returns at once with :class:`RunsPendingError` naming the jobs; the next
  ``launch`` of the same specs does not submit them again, it waits for them (or reads them, once finished).
  The store must be on a file system the jobs see.

**Resumable runs.** A trainer whose arguments carry the train config as a dict (``args["train"]``, the fields of
:class:`tokenbook.train.TrainConfig`) gets ``checkpoint_dir`` = ``<store>/checkpoints/<key>`` and ``resume=True``
from the launcher, outside the key: a run killed in the middle (a preempted job, an interrupted ``./run_all.sh``)
continues from its last epoch when it is launched again, with the same result as an uninterrupted run (``fit``
restores weights, optimizer, schedule, RNG states and history). The checkpoint is removed once the run is in the
store. ``RunSpec(resumable=False)`` opts out (a trainer that checkpoints by itself or cannot, like an ensemble).

A run that fails raises :class:`RunFailedError` naming its label and key after the other runs finished; nothing is
written for it. Shared core: imports no paper code (trainers are named by import path, never imported here).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["RunSpec", "Run", "TrainedRun", "RunFailedError", "RunsPendingError", "store_dir", "code_version",
           "code_closure", "module_imports", "read", "read_ref", "stored_ref", "submitit_cluster", "run_environment",
           "config_dict", "float_environment", "fit_args", "job_resources", "run_key", "checkpoint_dir", "launch", "runs_table", "EXECUTORS", "probe_trainer"]

EXECUTORS = ("kernel", "processes", "torchrun", "submitit")


class RunFailedError(RuntimeError):
    """A run of :func:`launch` raised; its label, key and the original error are in the message."""


class RunsPendingError(RuntimeError):
    """``launch(executor="submitit", wait=False)``: runs are submitted or still running; ``pending`` lists
    ``(label, key, job_id)``, ``keys`` the key of every spec of the launch in order (finished or not), so that runs
    which read these by key can be specified and submitted to wait for them (``launch(after=...)``). Launch the
    same specs again to collect them."""

    def __init__(self, message: str, pending: list, keys: Sequence[str] = ()):
        super().__init__(message)
        self.pending = pending
        self.keys = list(keys)

    @property
    def job_ids(self) -> list[str]:
        """The scheduler's ids of the jobs still pending."""
        return [str(j) for _, _, j in self.pending]


@dataclass(frozen=True)
class RunSpec:
    """What determines one training run: the trainer's import path, its JSON-able keyword arguments, and a label."""

    trainer: str
    args: dict = field(default_factory=dict)
    label: str = ""
    #: job resources for executor="submitit" (nodes, gpus_per_node, timeout_min, ...); not part of the key
    resources: dict = field(default_factory=dict)
    #: checkpoint and resume through args["train"] (see the module text); not part of the key
    resumable: bool = True

    def __post_init__(self):
        if ":" not in self.trainer:
            raise ValueError(f"trainer must be 'package.module:function', got {self.trainer!r}")
        try:
            canonical = json.loads(json.dumps(self.args, sort_keys=True, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"run {self.label or self.trainer}: arguments must be JSON-able ({e})") from e
        object.__setattr__(self, "args", canonical)

    def canonical(self) -> str:
        return json.dumps({"trainer": self.trainer, "args": self.args}, sort_keys=True)


@dataclass
class TrainedRun:
    """What a trainer returns for a model trained with :func:`tokenbook.train.fit`: everything a notebook reads
    afterwards, without the live model (``state_dict`` on the CPU; ``ema_state_dict`` when EMA was on)."""

    state_dict: dict
    history: Any  # pandas DataFrame, one row per epoch
    final: dict
    timing: dict
    trainable_params: int = 0
    ema_state_dict: Optional[dict] = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_fit(cls, result: Any, **extra: Any) -> "TrainedRun":
        cpu = lambda m: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}  # noqa: E731
        return cls(state_dict=cpu(result.model), history=result.history, final=dict(result.final),
                   timing=dict(result.timing), trainable_params=int(result.trainable_params),
                   ema_state_dict=cpu(result.ema) if result.ema is not None else None, extra=extra)

    def load_into(self, model: Any) -> Any:
        """``model`` (built as the trainer built it) with the stored weights, strictly; returns it."""
        model.load_state_dict(self.state_dict)
        return model


@dataclass
class Run:
    """One entry of :func:`launch`'s answer: the spec, its key, the trainer's output, and where it came from."""

    spec: RunSpec
    key: str
    output: Any
    source: str  # "store" (read, not trained) or "trained" (by this launch)
    seconds: float  # wall time of this launch for it (training, or reading the store)
    executor: str
    threads: int

    @property
    def cached(self) -> bool:
        return self.source == "store"


# ----------------------------------------------------------------------------------------------------------
# keys
# ----------------------------------------------------------------------------------------------------------
_CODE_VERSIONS: dict = {}


def _module_file(pkg: Path, name: str) -> Optional[Path]:
    """The source file of module ``name`` (``tokenbook.x.y``) under the package folder ``pkg``, or None."""
    base = pkg.joinpath(*name.split(".")[1:])
    for f in (base / "__init__.py", base.with_suffix(".py")):
        if f.is_file():
            return f
    return None


def module_imports(path: Path, name: str) -> tuple[set[str], bool]:
    """What the source of module ``name`` (file ``path``) imports anywhere, module level or inside functions: the
    dotted names, relative imports resolved, ``from m import x`` giving ``m`` and ``m.x`` (x may be a module); and
    whether it imports by ``importlib.import_module``. Shared by :func:`code_closure` and the layout test."""
    import ast

    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    dynamic = False
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = (".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                   if node.level else node.module or "")
            found.update([mod, *(f"{mod}.{a.name}" for a in node.names)])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            dynamic = True
    return found, dynamic


def _imported(pkg: Path, name: str, path: Path) -> set[str]:
    """The package's modules that the source of ``name`` imports anywhere (:func:`module_imports`; ``from m import
    sub`` counted as ``m.sub`` where that is a module), their parent packages, and, for a package whose
    ``__init__`` imports by ``importlib.import_module`` (``tokenbook.models`` registers its families so), every
    module below it."""
    top = pkg.name
    is_pkg = path.name == "__init__.py"
    found, dynamic = module_imports(path, name)
    if dynamic and is_pkg:
        found.update(f"{name}.{q.relative_to(path.parent).with_suffix('').as_posix().replace('/', '.')}"
                     .removesuffix(".__init__") for q in path.parent.rglob("*.py") if "__pycache__" not in q.parts)
    out = set()
    for m in found:
        parts = m.split(".")
        if parts[0] != top:
            continue
        out.update(q for q in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if _module_file(pkg, q))
    return out


def code_closure(module: str, pkg: Optional[Path] = None) -> list[Path]:
    """The source files of the ``tokenbook`` package that module ``module`` runs: its own, its parent packages',
    and, transitively, those of every package module it imports anywhere in its text (:func:`_imported`), sorted.
    ``pkg``: the package folder (default: the installed ``tokenbook``)."""
    pkg = Path(pkg) if pkg is not None else Path(__file__).resolve().parent
    start = _module_file(pkg, module)
    if start is None:
        raise ValueError(f"{module!r} is not a module of the package at {pkg}")
    parts = module.split(".")
    todo = [q for q in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if _module_file(pkg, q)]
    seen: dict[str, Path] = {}
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen[m] = _module_file(pkg, m)
        todo.extend(_imported(pkg, m, seen[m]) - seen.keys())
    return sorted(seen.values())


def code_version(module: Optional[str] = None, pkg: Optional[Path] = None) -> str:
    """sha256 (first 16 hex digits) of the code that decides a run, and the versions of torch, timm and numpy.

    - ``module`` None: every ``.py`` and ``.yaml`` file of the ``tokenbook`` package (path and bytes).
    - ``module`` a module of the package (a trainer's, ``"tokenbook.experiments.seit"``): the files of its import
      closure (:func:`code_closure`) and every ``.yaml`` file of the package (recipes and references are data the
      code reads by name). Editing a module that the trainer never imports (a report, the ledger, another paper's
      experiments) leaves its runs' keys as they were, so the store keeps them; editing one it imports, even inside
      a function, trains them again. Modules that the shared core imports by name for reporting (the runner's
      notebooks, the GPU budget's loops) are not training code and are not followed.
    - a module outside the package (a user's trainer): as for None.

    ``pkg``: the package folder (default: the installed ``tokenbook``; for tests). Computed once per process and
    module."""
    pkg = Path(pkg) if pkg is not None else Path(__file__).resolve().parent
    inside = module is not None and module.split(".")[0] == pkg.name and _module_file(pkg, module) is not None
    memo = (str(pkg), module if inside else None)
    if memo not in _CODE_VERSIONS:
        import numpy
        import timm
        import torch

        files = set(code_closure(module, pkg)) if inside else set()
        files.update(q for q in pkg.rglob("*") if (q.suffix == ".yaml" or (q.suffix == ".py" and not inside))
                     and "__pycache__" not in q.parts)
        h = hashlib.sha256()
        for q in sorted(files):
            h.update(q.relative_to(pkg).as_posix().encode() + b"\0" + q.read_bytes() + b"\0")
        h.update(f"torch {torch.__version__} timm {timm.__version__} numpy {numpy.__version__}".encode())
        _CODE_VERSIONS[memo] = h.hexdigest()[:16]
    return _CODE_VERSIONS[memo]


def float_environment(threads: int, accelerator: str = "auto") -> dict:
    """The part of the machine that decides a run's floats: device kind and torch threads."""
    import torch

    if accelerator in ("cuda", "auto", "gpu") and torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(0), "threads": int(threads)}
    from .repro import cpu_model

    return {"device": cpu_model().get("cpu_model", "cpu"), "threads": int(threads)}


def config_dict(config: Any) -> dict:
    """A config as a run spec's arguments hold it: a dataclass (``DataConfig``, ``TrainConfig``) as a dict of its
    fields, a dict copied."""
    import dataclasses

    return dict(config) if isinstance(config, dict) else dataclasses.asdict(config)


def fit_args(model_name: str, model_kwargs: dict, data_config: Any, train_config: Any, batch_size: int,
             num_workers: int = 0, **extra: Any) -> dict:
    """The arguments of a trainer that fits one timm model on one data set (the notebooks' store trainers): model
    name and keywords, the data and train configs as dicts (dataclasses or dicts), batch, loader workers, and any
    ``extra`` argument of that trainer. Everything that decides such a run, in one shape for every notebook."""
    return {"model_name": model_name, "model_kwargs": dict(model_kwargs), "data": config_dict(data_config),
            "train": config_dict(train_config), "batch_size": int(batch_size), "num_workers": int(num_workers), **extra}


def _accelerator(spec: RunSpec) -> str:
    return str(spec.args.get("train", {}).get("accelerator", spec.args.get("accelerator", "auto")))


def submitit_cluster(cluster: Optional[str] = None) -> str:
    """The cluster a submitit launch with ``cluster`` submits to: the one named, else the one submitit's
    ``AutoExecutor`` picks on this machine (``slurm`` where SLURM is, else ``local``)."""
    import submitit

    return cluster or submitit.AutoExecutor.which()


def run_environment(spec: RunSpec, threads: int, executor: str = "kernel", cluster: Optional[str] = None,
                    resources: Optional[dict] = None) -> dict:
    """The float environment a run's key names: where it will train. On this machine (kernel, processes,
    torchrun, and submitit's local and debug clusters) that is this machine's device and threads
    (:func:`float_environment`). A SLURM job trains on a node the submitting machine does not know, so its key
    names the job instead: the cluster, the partition, the job's GPUs per node (:func:`job_resources` under
    ``resources`` and the spec's own), the accelerator and the threads. The same launch from a login node or from a
    compute node then asks for the same run, and a job computes nothing about its own key (it trains into the key
    it was given, :func:`read` reads it back)."""
    if executor == "submitit":
        cluster = submitit_cluster(cluster)
        if cluster not in ("local", "debug"):
            res = {**job_resources(spec), **(resources or {}), **spec.resources}
            return {"device": f"submitit:{cluster}", "partition": str(res.get("slurm_partition", "") or ""),
                    "gpus_per_node": int(res.get("gpus_per_node", 0) or 0), "accelerator": _accelerator(spec),
                    "threads": int(threads)}
    return float_environment(threads, _accelerator(spec))


def run_key(spec: RunSpec, threads: int, env: Optional[dict] = None) -> str:
    """The store key of ``spec`` trained with ``threads`` torch threads with this code, on this machine or in the
    environment ``env`` (:func:`run_environment`)."""
    payload = json.dumps({"run": json.loads(spec.canonical()), "code": code_version(spec.trainer.split(":")[0]),
                          "env": env if env is not None else float_environment(threads, _accelerator(spec))},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def store_dir(path: Optional[str | Path] = None) -> Path:
    """Where the store lives: ``path``, else ``$TOKENBOOK_RUNS``, else ``$TOKENBOOK_CACHE/runs``, else
    ``~/.cache/tokenbook/runs``."""
    if path:
        return Path(path).expanduser()
    if os.environ.get("TOKENBOOK_RUNS"):
        return Path(os.environ["TOKENBOOK_RUNS"]).expanduser()
    from .io import cache_root

    return cache_root() / "runs"


# ----------------------------------------------------------------------------------------------------------
# the store (joblib.Memory) and the executors
# ----------------------------------------------------------------------------------------------------------
def checkpoint_dir(location: Path, key: str) -> Path:
    """Where the run ``key`` of the store at ``location`` keeps its ``last.ckpt`` while it trains."""
    return Path(location) / "checkpoints" / key[:16]


def _resumable_args(spec: RunSpec, location: Path, key: str) -> dict:
    """``spec.args`` with the train config's ``checkpoint_dir`` and ``resume`` set (see the module text)."""
    if not spec.resumable or not isinstance(spec.args.get("train"), dict):
        return spec.args
    return {**spec.args, "train": {**spec.args["train"], "checkpoint_dir": str(checkpoint_dir(location, key)),
                                   "resume": True}}


def _execute(key: str, trainer: str, args: dict) -> Any:
    """The cached call: ``key`` (which already covers trainer, args, code and environment) is what joblib hashes;
    ``trainer`` and ``args`` are ignored by the hash (see :func:`_cached`)."""
    mod, _, fn = trainer.partition(":")
    try:
        func = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise RunFailedError(f"trainer {trainer!r} cannot be imported: {e}") from e
    return func(**args)


def _cached(location: Path):
    from joblib import Memory

    return Memory(str(location), verbose=0).cache(_execute, ignore=["trainer", "args"])


def _in_store(location: Path, key: str, spec: RunSpec) -> bool:
    return _cached(location).check_call_in_cache(key, spec.trainer, spec.args)


def read(key: str, spec: RunSpec, store: Optional[str | Path] = None) -> Any:
    """The stored output of the run ``key`` names (the key its launch computed: a job on another node or device
    reads the same run, where recomputing the key there would name that machine's float environment).
    :class:`RunFailedError` when the store lacks it; never trains."""
    location = store_dir(store)
    if not _in_store(location, key, spec):
        raise RunFailedError(f"run {spec.label or spec.trainer} ({key[:12]}) is not in the run store at {location}: "
                             "launch it first")
    return _cached(location)(key, spec.trainer, spec.args)


def stored_ref(key: str, spec: RunSpec, store: Optional[str | Path] = None) -> dict:
    """How a run spec names another stored run that its trainer reads (a pre-training): the key its launch
    computed, its trainer and arguments, and the store (empty: the default). :func:`read_ref` reads it back."""
    return {"key": key, "trainer": spec.trainer, "args": spec.args, "store": str(store) if store else ""}


def read_ref(ref: dict, label: str = "", hint: str = "") -> Any:
    """The stored output of the run a :func:`stored_ref` names (:func:`read` by its key: never trained here);
    :class:`RunFailedError` when the store lacks it, ending with ``hint`` (what launches it)."""
    try:
        return read(ref["key"], RunSpec(ref["trainer"], ref["args"], label=label), ref.get("store") or None)
    except RunFailedError as e:
        if not hint:
            raise
        raise RunFailedError(f"{e} ({hint})") from e


def _train_into_store(location: Path, key: str, spec: RunSpec) -> None:
    """Train ``spec`` into the store (resuming from its checkpoint when one is there); drop the checkpoint after."""
    import shutil

    _cached(location)(key, spec.trainer, _resumable_args(spec, location, key))
    shutil.rmtree(checkpoint_dir(location, key), ignore_errors=True)


def _run_rank(location: str, key: str, spec: RunSpec, threads: int, rank: int = 0) -> float:
    """One process of a run with ``threads`` torch threads; returns seconds. The rule every launcher path shares:
    rank 0 trains into the store (resuming from the run's checkpoint, dropping it after), any other rank of a
    DDP run runs the same trainer uncached, so that only one process writes the store."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if rank == 0:
        _train_into_store(Path(location), key, spec)
    else:
        _execute(key, spec.trainer, _resumable_args(spec, Path(location), key))
    return time.perf_counter() - t0


def _worker(location: str, key: str, spec: RunSpec, threads: int) -> float:
    """Runs in a spawned process or a one-task job: train one run into the store (:func:`_run_rank`, rank 0)."""
    return _run_rank(location, key, spec, threads)


def _torchrun(location: Path, key: str, spec: RunSpec, threads: int, nproc: int) -> float:
    """One run as a ``torchrun --standalone`` DDP job of ``nproc`` ranks (:func:`_rank_main` in each); seconds."""
    import pickle
    import subprocess
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".pkl", dir=location, delete=False) as f:
        pickle.dump((str(location), key, spec, threads), f)
    t0 = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={nproc}", "-m", "tokenbook.runs", "--rank-main", f.name],
                             capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-12:]
        raise RunFailedError(f"torchrun exited with {out.returncode}: " + " | ".join(tail))
    return time.perf_counter() - t0


def _rank_main(job_file: str) -> None:
    """Each torchrun rank: :func:`_run_rank` with the rank torchrun gives it."""
    import pickle

    with open(job_file, "rb") as f:
        location, key, spec, threads = pickle.load(f)
    _run_rank(location, key, spec, threads, int(os.environ.get("RANK", "0")))


def _nproc(spec: RunSpec, resources: Optional[dict]) -> int:
    n = (resources or {}).get("nproc_per_node") or (spec.args.get("train") or {}).get("devices") or 1
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"torchrun needs an integer number of processes per node, got {n!r} (resources "
                         "nproc_per_node or the train config's devices)")
    return n


def job_resources(spec: RunSpec) -> dict:
    """The job shape a run's recipe asks for (``executor="submitit"``), from its train config (``args["train"]``):
    ``nodes`` = ``num_nodes``, and for ``devices`` > 1 one task per device on each node (``tasks_per_node``), each
    task one DDP rank (``strategy="ddp"``), with ``gpus_per_node`` = ``devices`` on a GPU recipe (accelerator
    ``cuda``/``gpu``/``auto``; none on ``cpu``). ``{}`` for a one-process run or a trainer without a train config.
    :func:`launch` lays ``resources`` and then the spec's own ``resources`` over it."""
    train = spec.args.get("train")
    if not isinstance(train, dict):
        return {}
    devices, nodes = train.get("devices", 1), train.get("num_nodes", 1) or 1
    if not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"run {spec.label or spec.trainer}: num_nodes must be a positive integer, got {nodes!r}")
    out: dict = {"nodes": nodes} if nodes > 1 else {}
    if isinstance(devices, int) and devices > 1:
        out["tasks_per_node"] = devices
        if train.get("accelerator", "auto") in ("cuda", "gpu", "auto"):
            out["gpus_per_node"] = devices
    elif nodes > 1:
        raise ValueError(f"run {spec.label or spec.trainer}: {nodes} nodes need an integer number of devices per "
                         f"node in the train config, got {devices!r}")
    return out


def _export_ddp_env() -> int:
    """In a task of a multi-task submitit job: the torch.distributed variables of this task (master address and
    port, rank, world size, local rank, node as ``GROUP_RANK``) and ``TORCHELASTIC_RUN_ID``, so that Fabric joins
    the job's tasks as it joins torchrun's ranks (its TorchElastic environment, which it prefers inside SLURM
    too). Every task keeps all of its node's GPUs visible (Fabric picks the one of its local rank). Returns the
    global rank."""
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    env = JobEnvironment()
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    os.environ["GROUP_RANK"] = str(env.node)
    os.environ["TORCHELASTIC_RUN_ID"] = f"tokenbook-{env.job_id}"
    return int(env.global_rank)


class _Job:
    """What a submitit job calls: :func:`_worker` for one run. A job of several tasks (a run over several GPUs or
    nodes, :func:`job_resources`) is one DDP run: every task is a rank (:func:`_export_ddp_env`), global rank 0
    trains into the store, the others run the same trainer uncached, as under torchrun. On preemption or timeout
    submitit calls :meth:`checkpoint` and requeues the same call, which resumes from the run's ``last.ckpt``."""

    def __init__(self, location: str, key: str, spec: RunSpec, threads: int):
        self.location, self.key, self.spec, self.threads = location, key, spec, threads

    def __call__(self) -> float:
        from submitit import JobEnvironment

        rank = _export_ddp_env() if JobEnvironment().num_tasks > 1 else 0
        return _run_rank(self.location, self.key, self.spec, self.threads, rank)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def _job_record(location: Path, key: str) -> Path:
    return location / "jobs" / "pending" / f"{key[:16]}.pkl"


def _pending_job(location: Path, key: str) -> Any:
    """The submitit job of ``key`` submitted by an earlier launch, or None."""
    import pickle

    path = _job_record(location, key)
    if not path.is_file():
        return None
    try:
        return pickle.loads(path.read_bytes())
    except Exception:  # an unreadable record: submit again
        return None


def _submit(location: Path, todo: dict, threads: int, cluster: Optional[str], resources: Optional[dict],
            verbose: bool, after: Sequence[str] = ()) -> dict:
    """Jobs for the runs of ``todo`` (those an earlier launch submitted are taken over, not submitted again); with
    ``after``, new jobs start only once those jobs have ended well (SLURM ``--dependency=afterok``)."""
    import pickle

    import submitit

    from .io import atomic_write

    jobs = {}
    executor = None
    for k, s in todo.items():
        job = _pending_job(location, k)
        if job is None:
            if executor is None:
                executor = submitit.AutoExecutor(folder=str(location / "jobs" / "%j"), cluster=cluster)
                if after and executor.cluster != "slurm":
                    raise ValueError(f"jobs that wait for other jobs ({', '.join(map(str, after))}) need SLURM's "
                                     f"dependencies, and the cluster is {executor.cluster!r}: wait for the first "
                                     "jobs instead (wait_for_jobs true)")
            params = {"timeout_min": 24 * 60, "name": "tokenbook", **job_resources(s), **(resources or {}),
                      **s.resources}
            if after:
                params["slurm_additional_parameters"] = {**params.get("slurm_additional_parameters", {}),
                                                         "dependency": "afterok:" + ":".join(map(str, after))}
            executor.update_parameters(**params)
            job = executor.submit(_Job(str(location), k, s, threads))
            _job_record(location, k).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(_job_record(location, k), pickle.dumps(job))
            if verbose:
                print(f"runs: submitted {s.label or s.trainer} as job {job.job_id}", flush=True)
        jobs[k] = job
    return jobs


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def launch(specs: Sequence[RunSpec], executor: str = "kernel", workers: Optional[int] = None,
           threads: Optional[int] = None, store: Optional[str | Path] = None, verbose: bool = True,
           wait: bool = True, cluster: Optional[str] = None, resources: Optional[dict] = None,
           after: Sequence[str] = ()) -> list[Run]:
    """Every run of ``specs`` from the store, training the missing ones with ``executor`` (see the module text);
    returns one :class:`Run` per spec, in order. ``workers`` (processes): default ``min(missing runs, cores)``;
    ``threads``: torch threads per run (default: the kernel's own for ``kernel`` and ``submitit``, cores // workers
    for ``processes``). Identical specs are trained once. ``submitit`` only: ``cluster`` (None: SLURM when there is
    one, else local), ``resources`` for every job, ``wait=False`` (raise :class:`RunsPendingError` instead of
    waiting for jobs that have not finished) and ``after``: job ids the new jobs wait for (SLURM only; runs that
    read another launch's runs by key, submitted before those have finished)."""
    import torch

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if after and executor != "submitit":
        raise ValueError(f"after (jobs to wait for) is for executor 'submitit', got {executor!r}")
    specs = list(specs)
    location = store_dir(store)
    location.mkdir(parents=True, exist_ok=True)
    if executor in ("kernel", "submitit", "torchrun"):
        threads = int(threads or torch.get_num_threads())
    else:
        missing_n = len({s.canonical() for s in specs})
        workers = max(1, int(workers or min(missing_n, _cores())))
        threads = int(threads or max(1, _cores() // workers))
    keys = [run_key(s, threads, run_environment(s, threads, executor, cluster, resources)) for s in specs]
    todo = {}
    for s, k in zip(specs, keys):
        if k not in todo and not _in_store(location, k, s):
            todo[k] = s
        elif k not in todo:
            _job_record(location, k).unlink(missing_ok=True)  # a job of an earlier launch that has finished
    if verbose:
        print(f"runs: {len(specs)} requested, {len(specs) - sum(k in todo for k in keys)} from the store "
              f"({location}), {len(todo)} to train ({executor}, {threads} thread(s) each"
              + (f", {workers} processes" if executor == "processes" and todo else "") + ")", flush=True)
    seconds: dict[str, float] = {}
    errors: dict[str, BaseException] = {}
    if todo and executor == "kernel":
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for k, s in todo.items():
                t0 = time.perf_counter()
                try:
                    _train_into_store(location, k, s)
                except Exception as e:  # the others still run; reported together below
                    errors[k] = e
                seconds[k] = time.perf_counter() - t0
        finally:
            torch.set_num_threads(old)
    elif todo and executor == "torchrun":
        for k, s in todo.items():
            try:
                seconds[k] = _torchrun(location, k, s, threads, _nproc(s, resources))
            except Exception as e:  # the others still run; reported together below
                errors[k] = e
    elif todo and executor == "submitit":
        jobs = _submit(location, todo, threads, cluster, resources, verbose, after)
        running = [(todo[k].label or todo[k].trainer, k, j.job_id) for k, j in jobs.items() if not j.done()]
        if not wait and running:
            raise RunsPendingError(f"{len(running)} run(s) submitted or still running (jobs "
                                   f"{', '.join(str(r[2]) for r in running)}); launch them again to collect them",
                                   running, keys)
        for k, job in jobs.items():
            try:
                seconds[k] = job.results()[0]  # task 0's (the only one, or DDP rank 0 of a multi-task job)
            except Exception as e:
                errors[k] = e
            finally:
                _job_record(location, k).unlink(missing_ok=True)  # finished either way: a later launch resubmits
    elif todo:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn")) as pool:
            futs = {k: pool.submit(_worker, str(location), k, s, threads) for k, s in todo.items()}
            for k, f in futs.items():
                try:
                    seconds[k] = f.result()
                except Exception as e:
                    errors[k] = e
    if errors:
        lines = [f"{todo[k].label or todo[k].trainer} (key {k[:12]}): {type(e).__name__}: {e}"
                 for k, e in errors.items()]
        raise RunFailedError(f"{len(errors)} of {len(todo)} run(s) failed; the others are in the store: "
                             + "; ".join(lines)) from next(iter(errors.values()))
    out = []
    for s, k in zip(specs, keys):
        t0 = time.perf_counter()
        output = _cached(location)(k, s.trainer, s.args)  # a read: every key is in the store now
        out.append(Run(spec=s, key=k, output=output, source="trained" if k in todo else "store",
                       seconds=seconds.get(k, time.perf_counter() - t0), executor=executor, threads=threads))
    return out


def runs_table(runs: Sequence[Run]) -> "Any":
    """One row per run for the notebook: label, key, whether it was trained now or read from the store, seconds,
    executor and threads."""
    import pandas as pd

    return pd.DataFrame([{"run": r.spec.label or r.spec.trainer, "key": r.key[:12], "source": r.source,
                          "seconds": round(r.seconds, 2), "executor": r.executor, "threads": r.threads}
                         for r in runs])


def probe_trainer(train: dict, n: int = 256, dim: int = 32, classes: int = 4) -> TrainedRun:
    """A small real training run on seeded random tensors (a 2-layer MLP, :func:`tokenbook.train.fit_launched`), for
    checking a launcher path on a device (``scripts/gpu_check.py``'s ``launcher`` row; ``"tokenbook.runs:probe_trainer"``):
    no data files, seconds on any device, resumable like every trainer with a train config."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from .train import TrainConfig, fit_launched

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.GELU(), torch.nn.Linear(64, classes))
    return TrainedRun.from_fit(fit_launched(model, loader, loader, TrainConfig(**train), num_classes=classes))


if __name__ == "__main__":  # a torchrun rank (executor="torchrun"): python -m tokenbook.runs --rank-main JOB
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "--rank-main":
        sys.exit("usage: python -m tokenbook.runs --rank-main JOB_FILE (started by launch(executor='torchrun'))")
    from tokenbook import runs as _runs  # the module itself, not __main__: joblib keys its cache by module name

    _runs._rank_main(sys.argv[2])
