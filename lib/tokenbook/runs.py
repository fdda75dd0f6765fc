"""One store of finished training runs for the whole workbook, and the launcher that fills it (issues 19 and 20).

A training run is described by a :class:`RunSpec`: the trainer (``"package.module:function"``, a function that takes
JSON-able keyword arguments and returns a picklable result, typically a :class:`TrainedRun`), its arguments (model
name, data and train configs as dicts, seed, ...) and a label for people. The run's **key** is a sha256 of

- the trainer and its arguments (canonical JSON),
- the code version (:func:`code_version`: every source file of the ``tokenbook`` package and the versions of torch,
  timm and numpy),
- the float environment that decides the result bit for bit: the device kind (CPU model or GPU name) and the number
  of torch threads the run uses (CPU kernels may reduce in another order with another thread count).

A run is therefore reused exactly where it would come out the same; any change of the code, the recipe, the data,
the seed or the machine trains it again.

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

__all__ = ["RunSpec", "Run", "TrainedRun", "RunFailedError", "store_dir", "code_version", "float_environment",
           "run_key", "launch", "runs_table", "EXECUTORS"]

EXECUTORS = ("kernel", "processes")


class RunFailedError(RuntimeError):
    """A run of :func:`launch` raised; its label, key and the original error are in the message."""


@dataclass(frozen=True)
class RunSpec:
    """What determines one training run: the trainer's import path, its JSON-able keyword arguments, and a label."""

    trainer: str
    args: dict = field(default_factory=dict)
    label: str = ""

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
_CODE_VERSION: Optional[str] = None


def code_version() -> str:
    """sha256 (first 16 hex digits) over every ``.py`` and ``.yaml`` file of the installed ``tokenbook`` package
    (path and bytes) and the versions of torch, timm and numpy. Computed once per process."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        import numpy
        import timm
        import torch

        pkg = Path(__file__).resolve().parent
        h = hashlib.sha256()
        for p in sorted(q for q in pkg.rglob("*") if q.suffix in (".py", ".yaml") and "__pycache__" not in q.parts):
            h.update(p.relative_to(pkg).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
        h.update(f"torch {torch.__version__} timm {timm.__version__} numpy {numpy.__version__}".encode())
        _CODE_VERSION = h.hexdigest()[:16]
    return _CODE_VERSION


def float_environment(threads: int, accelerator: str = "auto") -> dict:
    """The part of the machine that decides a run's floats: device kind and torch threads."""
    import torch

    if accelerator in ("cuda", "auto", "gpu") and torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(0), "threads": int(threads)}
    from .results import _cpu_model

    return {"device": _cpu_model().get("cpu_model", "cpu"), "threads": int(threads)}


def run_key(spec: RunSpec, threads: int) -> str:
    """The store key of ``spec`` trained with ``threads`` torch threads on this machine with this code."""
    accel = str(spec.args.get("train", {}).get("accelerator", spec.args.get("accelerator", "auto")))
    payload = json.dumps({"run": json.loads(spec.canonical()), "code": code_version(),
                          "env": float_environment(threads, accel)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def store_dir(path: Optional[str | Path] = None) -> Path:
    """Where the store lives: ``path``, else ``$TOKENBOOK_RUNS``, else ``$TOKENBOOK_CACHE/runs``, else
    ``~/.cache/tokenbook/runs``."""
    if path:
        return Path(path).expanduser()
    if os.environ.get("TOKENBOOK_RUNS"):
        return Path(os.environ["TOKENBOOK_RUNS"]).expanduser()
    base = os.environ.get("TOKENBOOK_CACHE") or Path.home() / ".cache" / "tokenbook"
    return Path(base).expanduser() / "runs"


# ----------------------------------------------------------------------------------------------------------
# the store (joblib.Memory) and the executors
# ----------------------------------------------------------------------------------------------------------
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


def _worker(location: str, key: str, trainer: str, args: dict, threads: int) -> float:
    """Runs in a spawned process: train one run with ``threads`` threads into the store; returns seconds."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    _cached(Path(location))(key, trainer, args)
    return time.perf_counter() - t0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def launch(specs: Sequence[RunSpec], executor: str = "kernel", workers: Optional[int] = None,
           threads: Optional[int] = None, store: Optional[str | Path] = None, verbose: bool = True) -> list[Run]:
    """Every run of ``specs`` from the store, training the missing ones with ``executor`` (see the module text);
    returns one :class:`Run` per spec, in order. ``workers`` (processes): default ``min(missing runs, cores)``;
    ``threads``: torch threads per run (default: the kernel's own for ``kernel``, cores // workers for
    ``processes``). Identical specs are trained once."""
    import torch

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    specs = list(specs)
    location = store_dir(store)
    location.mkdir(parents=True, exist_ok=True)
    if executor == "kernel":
        threads = int(threads or torch.get_num_threads())
    else:
        missing_n = len({s.canonical() for s in specs})
        workers = max(1, int(workers or min(missing_n, _cores())))
        threads = int(threads or max(1, _cores() // workers))
    keys = [run_key(s, threads) for s in specs]
    todo = {}
    for s, k in zip(specs, keys):
        if k not in todo and not _in_store(location, k, s):
            todo[k] = s
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
                    _cached(location)(k, s.trainer, s.args)
                except Exception as e:  # the others still run; reported together below
                    errors[k] = e
                seconds[k] = time.perf_counter() - t0
        finally:
            torch.set_num_threads(old)
    elif todo:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn")) as pool:
            futs = {k: pool.submit(_worker, str(location), k, s.trainer, s.args, threads) for k, s in todo.items()}
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
