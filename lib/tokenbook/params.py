"""Typed notebook parameters: one :class:`Params` dataclass per experiments module.

Each ``tokenbook.experiments.<stem>`` module declares ``class Params(tokenbook.params.Params)``: one field per
parameter of its notebook, with its type, its default and its comment (``param(6, "training epochs [1, inf)")``).
That class is the single source of the notebook's parameters:

- the notebook's papermill ``parameters`` cell is generated from it (:meth:`Params.parameters_cell`; ``python -m
  tokenbook.params --sync`` rewrites the cells, ``--check`` fails when one is out of date);
- the runner validates every YAML profile and ``-p`` override against it before anything runs
  (:func:`params_class`, :meth:`Params.from_mapping`): unknown names (with a suggestion), types, ranges;
- the notebook turns its parameters cell into one typed object (``p = exp.Params.from_namespace(globals())``) and
  reads ``p.epochs`` from then on, never the bare globals.

Types: ``int``, ``float``, ``str``, ``bool`` and lists of them (``list[int]``: a YAML list, ``seeds: [0, 1, 2]``;
on the command line ``-p seeds "[0, 1, 2]"``). A comma-separated string is refused with the YAML spelling in the
message: no parameter is split by hand anywhere. A number's range ends its comment (``[1, inf)``, ``(0, 1]``,
:func:`tokenbook.results.parameter_range`) and applies to every element of a list.

"0 means None" is handled here, once: a field declared with ``param(0, ..., none=0)`` (or ``none=""`` for a
string) reads as ``None`` when it holds that value (``p.train_subset is None`` for "all images"), while
:meth:`Params.to_dict` gives the values as written (what ``meta.json`` records and papermill injects).

A ``Params`` is also a read-only mapping (``p["epochs"]``, ``dict(p)``), so functions that take the parameters
of a notebook take it directly.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Optional, Sequence

__all__ = ["Params", "ReleasedParams", "SeedPlanParams", "LaunchParams", "ParamsError", "param", "params_class", "module_name", "as_list", "cell_params_class"]


class ParamsError(ValueError):
    """Bad parameter values (unknown name, wrong type, out of range); the message names every problem."""


def param(default: Any, help: str, none: Any = dataclasses.MISSING, choices: Sequence[Any] = ()) -> Any:
    """A :class:`Params` field: its default, the comment of the parameters cell (ending in the range of a number,
    ``[1, inf)``), the value that means None (``none=0``: ``0 means all``), if any, and the values it may take
    (``choices``; anything else is refused with the list), if it is one of a few."""
    meta: dict[str, Any] = {"help": help}
    if none is not dataclasses.MISSING:
        meta["none"] = none
    if choices:
        if default not in choices:
            raise ValueError(f"default {default!r} is not one of the choices {list(choices)}")
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, tuple)):
        items = tuple(default)
        return field(default_factory=lambda: list(items), metadata=meta)
    return field(default=default, metadata=meta)


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(value: Any) -> Any:
    """A string holding a decimal number (``1e-3``, ``5E-4``, ``1e9``, ``.5``) as a float; anything else unchanged.

    YAML 1.1 (PyYAML) reads ``1e-3`` as a string (its float rule wants a dot and a signed exponent), so profile
    files and ``-p`` values would otherwise refuse scientific notation.
    """
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value.strip())
    return value


def check_param_type(name: str, value: Any, type_name: str) -> Any:
    """Check (and gently coerce) a parameter value against its annotation; clear error otherwise.

    float: ints and number strings in any notation (``1e-3``) are accepted as floats. int: a float or number string
    is accepted only when it is integral (``1e3`` -> 1000; ``1.5`` or ``1e-3`` are refused). bool is never a number.
    """
    t = _TYPES.get(type_name)
    if t is None:
        return value
    if t in (int, float):
        value = parse_number(value)
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t is int and isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise TypeError(f"parameter {name!r} must be int, got float {value!r} (not a whole number)")
    if t is int and isinstance(value, bool) or not isinstance(value, t):
        raise TypeError(f"parameter {name!r} must be {type_name}, got {type(value).__name__} {value!r}")
    return value


_RANGE_NUM = r"[-+]?(?:inf|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
_RANGE_INTERVAL = re.compile(r"([\[(])\s*(" + _RANGE_NUM + r")\s*,\s*(" + _RANGE_NUM + r")\s*([\])])\s*$")


def parameter_range(help_text: str) -> Optional[tuple[Optional[float], Optional[float], bool, bool, str]]:
    """The range a parameters cell declares for a number at the end of its comment, or None.

    An interval in the usual notation: ``# training epochs [1, inf)``, ``# EMA decay [0, 1)``, ``# keep rate (0, 1]``,
    ``# learning rate (0, inf)``; a square bracket includes the bound, a parenthesis excludes it, ``inf`` is no bound.
    (Papermill's parameter inspector refuses a line with a second ``=``, so ``>= 1`` cannot be written there.)
    Returns ``(low, high, low_closed, high_closed, text)`` with None for an unbounded side, ``text`` as written."""
    text = str(help_text or "").strip()
    m = _RANGE_INTERVAL.search(text)
    if not m:
        return None
    lo, hi = float(m.group(2)), float(m.group(3))
    if lo > hi:
        raise ValueError(f"empty range {m.group(0).strip()} in the comment {text!r}")
    return (None if lo == float("-inf") else lo, None if hi == float("inf") else hi, m.group(1) == "[",
            m.group(4) == "]", m.group(0).strip())


def check_param_range(name: str, value: Any, help_text: str) -> Any:
    """Refuse a number outside the range the parameters cell declares for ``name`` (:func:`parameter_range`):
    ``ValueError("parameter 'epochs' = -3 is out of its range [1, inf)")``. Non-numbers and undeclared ranges pass."""
    rng = parameter_range(help_text)
    if rng is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    lo, hi, lo_closed, hi_closed, text = rng
    ok = value == value  # NaN is never in range
    if ok and lo is not None:
        ok = value >= lo if lo_closed else value > lo
    if ok and hi is not None:
        ok = value <= hi if hi_closed else value < hi
    if not ok:
        raise ValueError(f"parameter {name!r} = {value!r} is out of its range {text}")
    return value




def _type_name(tp: Any) -> str:
    """``int`` -> ``"int"``, ``list[int]`` -> ``"list[int]"`` (the annotation written in the parameters cell)."""
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp) or (str,)
        return f"list[{inner.__name__}]"
    return tp.__name__


def _check_scalar(name: str, value: Any, typ: type, what: str) -> Any:
    try:
        return check_param_type(name, value, typ.__name__)
    except TypeError as e:
        raise ParamsError(str(e).replace(f"parameter {name!r}", what, 1)) from None


@dataclass(frozen=True)
class Params(Mapping):
    """The parameters every notebook has; experiments modules subclass it with their own fields."""

    profile: str = param("cpu", "run profile: smoke, cpu, gpu or full; set by run_all.sh")
    results_root: str = param("results", "results go to <results_root>/<notebook>/<profile>/, relative to the "
                                         "repo root")
    max_steps: int = param(0, "stop every training run after this many optimizer updates, its recipe unchanged "
                              "(run_all.sh --proof); 0 means no cap [0, inf)", none=0)

    #: the notebook these parameters belong to (``"03_toe"``); set by each subclass
    NOTEBOOK: ClassVar[str] = ""
    #: overrides that make the ``full`` and ``gpu`` parameter sets run on a CPU in minutes for ``run_all.sh --proof``
    #: (besides ``max_steps``): devices, precision, batch and latency budgets; the recipe otherwise as written
    PROOF: ClassVar[dict] = {}
    #: fields that name a TrainConfig field differently (``{"vit_lr": "lr"}``) are not passed to train_config
    #: unless listed here
    TRAIN_FIELDS: ClassVar[Optional[tuple]] = None

    # -- validation -------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if "__dataclass_fields__" not in type(self).__dict__:
            raise TypeError(f"{type(self).__qualname__} must be decorated with @dataclasses.dataclass(frozen=True), "
                            "like every Params subclass, so that its fields are parameters")
        hints = typing.get_type_hints(type(self))
        problems = []
        for f in fields(self):
            value, tp = getattr(self, f.name), hints[f.name]
            try:
                if "none" in f.metadata and value is None:  # already normalised (dataclasses.replace)
                    continue
                if tp is Any:  # a notebook's own parameter without annotation (cell_params_class)
                    continue
                if typing.get_origin(tp) is list:
                    (inner,) = typing.get_args(tp)
                    if not isinstance(value, (list, tuple)):
                        example = "[0, 1, 2]" if inner in (int, float) else "[a, b]"
                        raise ParamsError(f"parameter {f.name!r} must be a list of {inner.__name__} (YAML: "
                                          f"{f.name}: {example}; -p {f.name} \"{example}\"), got "
                                          f"{type(value).__name__} {value!r}")
                    value = [_check_scalar(f.name, v, inner, f"element {i} of parameter {f.name!r}")
                             for i, v in enumerate(value)]
                    for v in value:
                        check_param_range(f.name, v, f.metadata.get("help", ""))
                else:
                    value = _check_scalar(f.name, value, tp, f"parameter {f.name!r}")
                    check_param_range(f.name, value, f.metadata.get("help", ""))
                    if f.metadata.get("choices") and value not in f.metadata["choices"]:
                        raise ParamsError(f"parameter {f.name!r} = {value!r} is not one of "
                                          f"{', '.join(map(repr, f.metadata['choices']))}")
                if "none" in f.metadata and value == f.metadata["none"]:
                    value = None
            except (ParamsError, ValueError, TypeError) as e:
                problems.append(str(e))
                continue
            object.__setattr__(self, f.name, value)
        if problems:
            raise ParamsError("; ".join(problems))

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping, where: str = "") -> "Params":
        """Validate ``values`` (a YAML profile plus overrides; missing names take their defaults)."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ParamsError(f"{where + ': ' if where else ''}unknown parameter(s) {unknown_hints(unknown, names)}; "
                              f"the parameters of {cls.NOTEBOOK or cls.__qualname__} are: {', '.join(sorted(names))}")
        try:
            return cls(**dict(values))
        except ParamsError as e:
            raise ParamsError(f"{where}: {e}" if where else str(e)) from None

    @classmethod
    def from_namespace(cls, namespace: Mapping) -> "Params":
        """The parameters cell's values from a notebook's ``globals()``, typed and validated."""
        missing = [f.name for f in fields(cls) if f.name not in namespace]
        if missing:
            raise NameError(f"parameter(s) {', '.join(missing)} of {cls.NOTEBOOK} are not defined; run the "
                            "parameters cell first")
        return cls.from_mapping({f.name: namespace[f.name] for f in fields(cls)}, where=cls.NOTEBOOK)

    # -- views --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every parameter as written (None back to its sentinel: ``train_subset`` 0), lists copied."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and "none" in f.metadata:
                v = f.metadata["none"]
            out[f.name] = list(v) if isinstance(v, (list, tuple)) else v
        return out

    def text(self, name: str) -> str:
        """A parameter as captions and scale strings write it: a list joined by commas (``seeds`` -> ``0,1,2``)."""
        v = self.to_dict()[name]
        return ",".join(str(x) for x in v) if isinstance(v, list) else str(v)

    def replace(self, **changes: Any) -> "Params":
        """A copy with some parameters changed (validated like the rest)."""
        return type(self).from_mapping({**self.to_dict(), **changes}, where=self.NOTEBOOK)

    @classmethod
    def specs(cls) -> dict[str, dict]:
        """Name -> {type, default, help, none}: what the parameters cell declares."""
        hints = typing.get_type_hints(cls)
        out = {}
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[f.name] = {"type": _type_name(hints[f.name]), "default": default, "help": f.metadata.get("help", ""),
                           **({"none": f.metadata["none"]} if "none" in f.metadata else {})}
        return out

    @classmethod
    def parameters_cell(cls) -> str:
        """The source of the notebook's papermill ``parameters`` cell: one typed line with a comment per field."""
        lines = []
        for name, s in cls.specs().items():
            help = s["help"].replace("<notebook>", cls.NOTEBOOK or "<notebook>")
            lines.append(f"{name}: {s['type']} = {_literal(s['default'])}  # {help}")
        return "\n".join(lines)

    # -- configs ------------------------------------------------------------------------------------------------
    def data_config(self, **overrides: Any):
        """A :class:`tokenbook.data.DataConfig` from the fields it shares with these parameters; the subset seed
        is ``seed`` (the data subset is fixed across training seeds). ``overrides`` win."""
        from .data import DataConfig

        names = {f.name for f in fields(DataConfig)}
        kw = {k: getattr(self, k) for k in names if k in self}
        if "seed" in self and "subset_seed" not in kw:
            kw["subset_seed"] = self["seed"]
        kw.update(overrides)
        return DataConfig(**kw)

    def train_config(self, **overrides: Any):
        """A :class:`tokenbook.train.TrainConfig` from the fields it shares with these parameters (``None`` where a
        field says 0 is off); ``overrides`` win."""
        from .train import TrainConfig

        names = {f.name for f in fields(TrainConfig)}
        keep = names if self.TRAIN_FIELDS is None else names & set(self.TRAIN_FIELDS)
        kw = {k: getattr(self, k) for k in keep if k in self}
        kw.update(overrides)
        return TrainConfig(**kw)

    # -- mapping --------------------------------------------------------------------------------------------------
    # (``fields()``, not ``__dataclass_fields__``: that also holds the ClassVars NOTEBOOK and TRAIN_FIELDS)
    @classmethod
    def _names(cls) -> tuple[str, ...]:
        names = cls.__dict__.get("_NAMES")
        if names is None:
            names = tuple(f.name for f in fields(cls))
            type.__setattr__(cls, "_NAMES", names)
        return names

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, key: object) -> bool:
        return key in self._names()


@dataclass(frozen=True)
class ReleasedParams(Params):
    """The base of a notebook whose ``full`` profile evaluates the paper's released checkpoints
    (:func:`tokenbook.released.released_table`, its arguments read by :func:`tokenbook.released.params_kwargs`)."""

    released: bool = param(False, "evaluate the paper's released checkpoints on the ImageNet val data (the full "
                                  "profile does); rows say what is missing")
    released_weights: str = param("", "folder with the released weight files under their official names; empty: "
                                      "none given", none="")
    released_max_images: int = param(0, "images of the released-checkpoint evaluation, a seeded subset; 0 means all "
                                        "[0, inf)", none=0)


@dataclass(frozen=True)
class SeedPlanParams(Params):
    """The base of a notebook whose seeds are chosen by power before the run
    (:func:`tokenbook.claims.plan_seeds`): the base ``seeds`` grow to what the rule asks of a frozen pilot's
    measured spread, up to ``seed_cap``."""

    seed_pilot: str = param("", "evidence file of an earlier run of the same arms (claims_evidence.json format, "
                                "relative to the workbook root): its per-seed spread picks the seeds by the power "
                                "rule, tokenbook.claims.plan_seeds; empty keeps seeds as given", none="")
    seed_cap: int = param(8, "most seeds the power rule may ask for; a claim that needs more keeps the given seeds "
                             "[2, inf)")


@dataclass(frozen=True)
class LaunchParams(Params):
    """The base of a notebook whose training runs go through the workbook's run store and launcher
    (:func:`tokenbook.runs.launch`): where they train, and the job resources for submitit; :meth:`launch_options`
    turns them into the launcher's keywords."""

    executor: str = param("kernel", "where the training runs go: kernel (in this process, one after the other), "
                                    "processes (side by side, the cores divided among them), torchrun (one DDP job "
                                    "per run on this node) or submitit (one SLURM job per run)",
                          choices=("kernel", "processes", "torchrun", "submitit"))
    cluster: str = param("", "submitit only: slurm, local or debug; empty means SLURM when there is one, else local")
    slurm_partition: str = param("", "submitit only: the SLURM partition; empty means the cluster's default")
    gpus_per_node: int = param(0, "submitit only: GPUs of each run's job; 0 takes them from the recipe (one per "
                                  "device of a GPU run, one task per device: tokenbook.runs.job_resources) [0, inf)",
                               none=0)
    job_timeout_min: int = param(4320, "submitit only: time limit of each job in minutes; a job that reaches it is "
                                       "requeued and resumes from its checkpoint [1, inf)")
    wait_for_jobs: bool = param(True, "submitit only: wait for the jobs; False stops the notebook after submitting "
                                      "them, and the next execution collects them")

    def __post_init__(self) -> None:
        super().__post_init__()
        devices, strategy = self.get("devices", 1), str(self.get("strategy", "auto") or "auto")
        if not isinstance(devices, int) or devices <= 1 and int(self.get("num_nodes", 1) or 1) <= 1:
            return
        starts_ranks = strategy.startswith(("ddp_notebook", "ddp_fork", "ddp_spawn"))
        if self.executor in ("torchrun", "submitit") and starts_ranks:
            raise ParamsError(f"executor {self.executor!r} starts the {devices} ranks of a run itself: use strategy "
                              f"'ddp', not {strategy!r} (which starts them from the kernel)")
        if self.executor in ("kernel", "processes") and strategy.startswith("ddp") and not starts_ranks:
            raise ParamsError(f"strategy {strategy!r} over {devices} devices needs ranks started from outside: "
                              "executor torchrun (this node) or submitit (a cluster), or strategy ddp_notebook to "
                              "start them from the kernel")

    def launch_options(self) -> dict:
        """The launcher keywords these parameters say: ``executor``, and for submitit the cluster, the job
        resources (time limit, a CPU per loader worker and one for each task, the partition, and GPUs only when
        ``gpus_per_node`` is set: otherwise the launcher takes nodes, tasks and GPUs from each run's recipe,
        :func:`tokenbook.runs.job_resources`) and ``wait``."""
        if self.executor != "submitit":
            return {"executor": self.executor}
        res = {"timeout_min": self.job_timeout_min, "cpus_per_task": max(1, int(self.get("num_workers", 0) or 0) + 1)}
        if self.gpus_per_node:
            res["gpus_per_node"] = self.gpus_per_node
        if self.slurm_partition:
            res["slurm_partition"] = self.slurm_partition
        return {"executor": "submitit", "cluster": self.cluster or None, "resources": res,
                "wait": self.wait_for_jobs}


def unknown_hints(unknown: Sequence[str], names: Sequence[str]) -> str:
    """``"epoch (did you mean 'epochs'?), foo"``: each unknown name with the closest known one, if any."""
    hints = []
    for u in unknown:
        close = difflib.get_close_matches(u, list(names), 1)
        hints.append(f"{u} (did you mean {close[0]!r}?)" if close else u)
    return ", ".join(hints)


def as_list(value: Any, what: str) -> list:
    """A list parameter as a list; a string (the old comma-separated spelling) is refused with the YAML one."""
    if isinstance(value, str):
        raise TypeError(f"{what} must be a list (YAML: [a, b]; -p NAME \"[a, b]\"), got the string {value!r}")
    return list(value)


def module_name(notebook: str) -> str:
    """``"03_toe"`` -> ``"tokenbook.experiments.toe"`` (the experiments module of a notebook, by stem)."""
    stem = notebook.split("_", 1)[1] if notebook[:2].isdigit() and "_" in notebook else notebook
    if not stem.isidentifier():
        raise ValueError(f"bad notebook name {notebook!r}")
    return f"tokenbook.experiments.{stem}"


def params_class(notebook: str) -> type[Params]:
    """The :class:`Params` subclass of notebook ``NN_<stem>``, found by stem (the core never imports paper code
    by name)."""
    import importlib

    mod = importlib.import_module(module_name(notebook))
    cls = getattr(mod, "Params", None)
    if not (isinstance(cls, type) and issubclass(cls, Params)):
        raise ValueError(f"{mod.__name__} has no Params class (a tokenbook.params.Params subclass)")
    return cls


def _literal(value: Any) -> str:
    """A default as the parameters cell writes it: strings in double quotes, lists element by element."""
    import json

    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return repr(value)


def cell_params_class(notebook: str, path) -> type[Params]:
    """A :class:`Params` class read from a notebook's own ``parameters`` cell (papermill's inspector), for a
    notebook that has no experiments module (a user's own notebook run by the runner)."""
    import ast

    import papermill

    info = papermill.inspect_notebook(str(path))
    if not info:
        raise ValueError(f"{path} has no cell tagged 'parameters'")
    base = {f.name for f in fields(Params)}
    specs = []
    for name, v in info.items():
        if name in base:
            continue
        t = v["inferred_type_name"] or ""
        m = re.fullmatch(r"list\[(\w+)\]", t)
        tp = list[_TYPES[m.group(1)]] if m and m.group(1) in _TYPES else _TYPES.get(t, Any)
        try:
            default = ast.literal_eval(v["default"])
        except (ValueError, SyntaxError):
            default = v["default"]
        specs.append((name, tp, param(default, v["help"] or "")))
    cls = dataclasses.make_dataclass("Params", specs, bases=(Params,), frozen=True)
    cls.NOTEBOOK = notebook
    return cls


# ----------------------------------------------------------------------------------------------------------
# keeping the notebooks' parameters cells in sync
# ----------------------------------------------------------------------------------------------------------
def _parameters_cell(nb: dict) -> dict:
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"expected one cell tagged 'parameters', found {len(cells)}")
    return cells[0]


def sync_notebook(path, check: bool = False) -> bool:
    """Rewrite the parameters cell of notebook ``path`` from its Params class; True when it changed (with
    ``check=True`` nothing is written)."""
    from pathlib import Path

    import nbformat

    from .io import atomic_write

    path = Path(path)
    nb = nbformat.read(str(path), as_version=4)
    cell = _parameters_cell(nb)
    want = params_class(path.stem).parameters_cell()
    if cell["source"].rstrip("\n") == want:
        return False
    if not check:
        cell["source"] = want
        atomic_write(path, nbformat.writes(nb) + "\n")
    return True


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    import os
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m tokenbook.params", description=__doc__.split("\n")[0])
    ap.add_argument("--sync", action="store_true", help="rewrite every notebook's parameters cell from its Params")
    ap.add_argument("--check", action="store_true", help="exit 1 when a parameters cell differs from its Params")
    args = ap.parse_args(argv)
    stale = []
    root = Path(os.environ.get("TOKENBOOK_ROOT") or Path(__file__).resolve().parents[2])
    for nb in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        if sync_notebook(nb, check=not args.sync):
            stale.append(nb.name)
    verb = "rewrote" if args.sync else "out of date"
    print(f"{verb}: {', '.join(stale)}" if stale else "every parameters cell matches its Params")
    return 1 if stale and not args.sync else 0


if __name__ == "__main__":  # through the package's module, so that Params is the class the experiments subclass
    from tokenbook.params import main as _main

    sys.exit(_main())
