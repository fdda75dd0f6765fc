"""The run store and launcher (tokenbook.runs, issue 19 item 4): a run is trained once and read back, its key covers
everything that decides it, runs train side by side in processes, a failure loses nothing that finished, and the
00 notebook's small ViT comes out the same from the store as from fit()."""
import json
import os
from pathlib import Path

import pytest

from tokenbook import runs

COUNTER = "TOKENBOOK_TEST_RUNS_COUNTER"


def toy_trainer(x: int, fail: bool = False, sleep: float = 0.0) -> dict:
    """A trainer importable by path (``test_runs:toy_trainer``): logs each call to the counter file, so a test can
    tell a training from a store read."""
    import time

    import torch

    with open(os.environ[COUNTER], "a") as f:
        f.write(f"{x} {os.getpid()} {torch.get_num_threads()}\n")
    time.sleep(sleep)
    if fail:
        raise ValueError(f"toy run {x} diverged")
    return {"x": x, "square": x * x, "tensor": torch.full((3,), float(x)), "threads": torch.get_num_threads()}


KILL_AT = "TOKENBOOK_TEST_RUNS_KILL_AT"


class _Pace:
    """fit hook: a pause after every epoch (time to interrupt a run), and os._exit at the start of epoch
    $TOKENBOOK_TEST_RUNS_KILL_AT (a run killed in the middle, after the checkpoint of the epoch before)."""

    def __init__(self, sleep: float):
        self.sleep = sleep

    def on_epoch_start(self, epoch, model):
        if os.environ.get(KILL_AT) and epoch == int(os.environ[KILL_AT]):
            os._exit(3)

    def on_epoch_end(self, epoch, model, row):
        import time

        time.sleep(self.sleep)


def _toy_fit_setup(tag: str, batch_size: int, dropout: float = 0.0):
    """The toy trainers' loader (96 seeded points, 3 classes, unshuffled) and MLP; logs ``tag pid`` to the counter."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    with open(os.environ[COUNTER], "a") as f:
        f.write(f"{tag} {os.getpid()}\n")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 16), torch.nn.GELU()] + ([torch.nn.Dropout(dropout)] if dropout else [])
    model = torch.nn.Sequential(*layers, torch.nn.Linear(16, 3))
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False), model


def fit_trainer(train: dict, sleep: float = 0.0):
    """A trainer with fit() and a TrainConfig dict (``test_runs:fit_trainer``), so the launcher makes it resumable."""
    from tokenbook.runs import TrainedRun
    from tokenbook.train import TrainConfig, fit

    loader, model = _toy_fit_setup("fit", batch_size=16)
    res = fit(model, loader, loader, TrainConfig(**train), hooks=[_Pace(sleep)], num_classes=3)
    return TrainedRun.from_fit(res)


def ddp_fit_trainer(train: dict):
    """``fit_trainer`` as a 2-process DDP run on the CPU (gloo; ``test_runs:ddp_fit_trainer``): ``fit_launched``
    starts the workers (``ddp_fork``), each sees half the batches, the gradients are all-reduced."""
    from tokenbook.runs import TrainedRun
    from tokenbook.train import TrainConfig, fit_launched

    # dropout: each rank draws its own masks, so a resume must restore every rank's RNG streams, not rank 0's
    loader, model = _toy_fit_setup("ddp", batch_size=8, dropout=0.3)
    res = fit_launched(model, loader, loader, TrainConfig(**train), hooks=[_Pace(0.0)], num_classes=3)
    return TrainedRun.from_fit(res)


def _fit_spec(sleep: float = 0.0, epochs: int = 6) -> "runs.RunSpec":
    train = dict(epochs=epochs, lr=1e-2, warmup_epochs=1.0, accelerator="cpu", progress=False, seed=0)
    return runs.RunSpec("test_runs:fit_trainer", {"train": train, "sleep": sleep}, label="fit toy")


def _calls(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


@pytest.fixture
def store(tmp_path, monkeypatch):
    counter = tmp_path / "calls.txt"
    monkeypatch.setenv(COUNTER, str(counter))
    monkeypatch.setenv("TOKENBOOK_RUNS", str(tmp_path / "store"))
    return counter


def _spec(x, **kw):
    return runs.RunSpec("test_runs:toy_trainer", {"x": x, **kw}, label=f"toy {x}")


def test_a_run_is_trained_once_and_read_back(store):
    (first,) = runs.launch([_spec(3)], verbose=False)
    assert first.source == "trained" and first.output["square"] == 9 and len(_calls(store)) == 1
    again = runs.launch([_spec(3), _spec(3), _spec(4)], verbose=False)
    assert [r.source for r in again] == ["store", "store", "trained"]  # identical specs: one training
    assert len(_calls(store)) == 2 and again[0].output["tensor"].tolist() == [3.0, 3.0, 3.0]
    assert again[0].key == first.key != again[2].key
    table = runs.runs_table(again)
    assert list(table["source"]) == ["store", "store", "trained"] and table["key"].str.len().eq(12).all()


def test_a_stored_run_is_read_by_its_key_and_never_trained_by_read(store):
    """runs.read: the output of the run a launch stored, by the key that launch computed (what a job on another
    machine uses); a key the store lacks is a clear error, and read never trains."""
    (first,) = runs.launch([_spec(5)], verbose=False)
    assert runs.read(first.key, _spec(5))["square"] == 25 and len(_calls(store)) == 1
    with pytest.raises(runs.RunFailedError, match="not in the run store"):
        runs.read("0" * 64, _spec(6))
    assert len(_calls(store)) == 1


def test_a_slurm_run_is_keyed_by_its_job_not_by_the_submitting_machine(monkeypatch):
    """A SLURM job's key names the job (cluster, partition, GPUs per node from the recipe, accelerator, threads), so
    a login node and a compute node, whatever their own CPUs or GPUs, ask for the same run; the job's shape and
    partition are part of it. On this machine (kernel, processes, torchrun, submitit's local/debug clusters) the
    key keeps naming this machine's float environment."""
    gpu = runs.RunSpec("test_runs:toy_trainer", {"x": 1, "train": {"devices": 4, "accelerator": "cuda"}})
    on_slurm = lambda **kw: runs.run_key(gpu, 1, runs.run_environment(gpu, 1, "submitit", "slurm", **kw))  # noqa: E731
    k = on_slurm()
    env = runs.run_environment(gpu, 1, "submitit", "slurm")
    assert env["device"] == "submitit:slurm" and env["gpus_per_node"] == 4 and env["accelerator"] == "cuda"
    here = runs.run_key(gpu, 1, runs.run_environment(gpu, 1, "kernel"))
    assert here == runs.run_key(gpu, 1) != k                       # this machine's key, as before
    assert runs.run_key(gpu, 1, runs.run_environment(gpu, 1, "submitit", "local")) == here
    monkeypatch.setattr(runs, "float_environment", lambda threads, accelerator="auto": {"device": "another host",
                                                                                          "threads": threads})
    assert on_slurm() == k and runs.run_key(gpu, 1) != here        # the submitting machine does not matter
    assert on_slurm(resources={"slurm_partition": "a100"}) != k    # the partition does
    assert on_slurm(resources={"gpus_per_node": 8}) != k           # and the job's shape


def test_the_key_covers_arguments_code_and_threads(store, monkeypatch):
    k = runs.run_key(_spec(1), threads=2)
    assert runs.run_key(_spec(1), threads=2) == k
    assert runs.run_key(_spec(2), threads=2) != k                                # the arguments
    assert runs.run_key(_spec(1), threads=1) != k                                # the float environment
    assert runs.run_key(runs.RunSpec("test_runs:other", {"x": 1}), threads=2) != k  # the trainer
    assert runs.run_key(runs.RunSpec("test_runs:toy_trainer", {"x": 1}, label="another label"), 2) == k  # not the label
    monkeypatch.setattr(runs, "code_version", lambda module=None, pkg=None: "0" * 16)  # the code version
    assert runs.run_key(_spec(1), threads=2) != k
    # dict order does not matter, JSON-ability does
    assert runs.RunSpec("m:f", {"a": 1, "b": [1, 2]}).canonical() == runs.RunSpec("m:f", {"b": [1, 2], "a": 1}).canonical()
    with pytest.raises(ValueError, match="JSON-able"):
        runs.RunSpec("m:f", {"model": object()})
    with pytest.raises(ValueError, match="module:function"):
        runs.RunSpec("no_colon", {})


def test_code_version_hashes_the_package_sources():
    v = runs.code_version()
    assert len(v) == 16 and int(v, 16) >= 0 and runs.code_version() == v
    assert runs.code_version("user_module") == v  # a trainer outside the package: the whole package


def _fake_package(root: Path) -> Path:
    pkg = root / "tokenbook"
    files = {
        "__init__.py": "",
        "a.py": "import os\n\ndef f():\n    from tokenbook import b\n    import tokenbook.models\n",
        "b.py": "from .sub import helper\n",
        "sub/__init__.py": "",
        "sub/helper.py": "X = 1\n",
        "c.py": "from tokenbook import a\n",  # imports a; a never imports c
        "models/__init__.py": "import importlib\nfor _n in ('x',):\n    importlib.import_module(f'{__name__}.{_n}')\n",
        "models/x.py": "",
        "models/y.py": "",
        "recipes.yaml": "lr: 1\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_code_version_of_a_trainer_follows_its_import_closure(tmp_path, monkeypatch):
    """A run's key names the code its trainer runs: its module, what that imports anywhere (inside functions too,
    relative imports resolved), parent packages, every module of a package that imports its modules by name, and the
    package's YAML; editing any of them changes the version, editing a module the trainer never imports does not."""
    pkg = _fake_package(tmp_path)
    got = {p.relative_to(pkg).as_posix() for p in runs.code_closure("tokenbook.a", pkg)}
    assert got == {"__init__.py", "a.py", "b.py", "sub/__init__.py", "sub/helper.py", "models/__init__.py",
                   "models/x.py", "models/y.py"}
    monkeypatch.setattr(runs, "_CODE_VERSIONS", {})

    def version():
        runs._CODE_VERSIONS.clear()
        return runs.code_version("tokenbook.a", pkg)

    base = version()
    (pkg / "c.py").write_text("from tokenbook import a\nY = 2\n")
    assert version() == base  # not imported by the trainer
    for rel in ("sub/helper.py", "models/y.py", "recipes.yaml", "a.py"):
        before = version()
        (pkg / rel).write_text((pkg / rel).read_text() + "\n# edited\n")
        assert version() != before, rel
    assert runs.code_version(None, pkg) != version()  # the whole package is another version
    with pytest.raises(ValueError, match="not a module"):
        runs.code_closure("tokenbook.nowhere", pkg)


def test_the_workbook_trainers_closures_hold_their_training_code_and_not_the_reports():
    """Every trainer the notebooks name: its closure holds the training engine, the data, the run store and every
    model family; the shared classifier run (00, 01, 03, 06) and 02's runs leave out the reports and the ledger,
    so editing those keeps them in the store."""
    pkg = Path(runs.__file__).resolve().parent
    trainers = ["baselines_runs", "vittm_runs", "t2t_vit_runs", "memory_runs", "seit_runs", "toe_runs"]
    for t in trainers:
        got = {p.relative_to(pkg).as_posix() for p in runs.code_closure(f"tokenbook.experiments.{t}")}
        assert {"train.py", "runs.py", "data/__init__.py", f"experiments/{t}.py", "models/__init__.py",
                "models/vit_small.py", "models/vittm.py", "models/t2t_vit.py"} <= got, t
    for t in trainers:
        got = {p.relative_to(pkg).as_posix() for p in runs.code_closure(f"tokenbook.experiments.{t}")}
        assert not got & {"report.py", "claims.py", "results.py", "runner.py", "experiments/baselines.py",
                          "experiments/seit.py", "experiments/seit_results.py", "experiments/toe.py",
                          "experiments/memory.py", "experiments/memory_report.py", "experiments/cross_paper.py"}, t
    # 04's three stored runs name the lean module
    from tokenbook.data import DataConfig
    from tokenbook.experiments import seit

    spec = seit.variant_spec("pixel", {**seit.Params().__dict__}, 0, DataConfig())
    assert spec.trainer == "tokenbook.experiments.seit_runs:train_variant_run"
    assert seit.tokenizer_spec(seit.Params().__dict__, DataConfig()).trainer.startswith("tokenbook.experiments.seit_runs:")
    # 03's ToE arm and 05's pre-training and fine-tuning runs name theirs
    from tokenbook.experiments import memory, toe
    from tokenbook.train import TrainConfig

    spec = toe.arm_spec("vit_fm_tiny_p7_28", {}, {"keep_rate": [0.5]}, 0, DataConfig(), TrainConfig(), 8, 0)
    assert spec.trainer == "tokenbook.experiments.toe_runs:train_arm_run"
    assert memory.pretrain_spec("vit_fm_tiny_p7_28", {}, DataConfig(), TrainConfig(), 8).trainer == \
        "tokenbook.experiments.memory_runs:train_source_run"
    task = memory.task_args("fm:5,6", 28, 8, 8, [0.5], [0.5])
    assert memory.finetune_spec({"kind": "stored"}, task, "head", 0, TrainConfig(), 0).trainer == \
        "tokenbook.experiments.memory_runs:train_finetune_run"
    spec = runs.RunSpec("tokenbook.experiments.baselines_runs:train_classifier", {"x": 1})
    other = runs.RunSpec("tokenbook.experiments.seit_runs:train_variant_run", {"x": 1})
    assert runs.code_version("tokenbook.experiments.baselines_runs") != runs.code_version("tokenbook.experiments.seit_runs")
    assert runs.run_key(spec, 1) != runs.run_key(other, 1)


def test_a_failed_run_loses_nothing_that_finished_and_resumes(store):
    with pytest.raises(runs.RunFailedError, match=r"1 of 3 run\(s\) failed.*toy 2 \(key [0-9a-f]{12}\).*diverged"):
        runs.launch([_spec(1), _spec(2, fail=True), _spec(3)], verbose=False)
    assert len(_calls(store)) == 3
    # an interrupted or failed workbook run resumes: the two finished runs come from the store
    got = runs.launch([_spec(1), _spec(2), _spec(3)], verbose=False)
    assert [r.source for r in got] == ["store", "trained", "store"] and len(_calls(store)) == 4


def test_runs_train_side_by_side_in_processes(store):
    got = runs.launch([_spec(5, sleep=0.5), _spec(6, sleep=0.5)], executor="processes", workers=2, verbose=False)
    assert [r.source for r in got] == ["trained", "trained"] and [r.output["x"] for r in got] == [5, 6]
    calls = [c.split() for c in _calls(store)]
    assert len({pid for _, pid, _ in calls}) == 2 and str(os.getpid()) not in {pid for _, pid, _ in calls}
    assert all(r.threads == got[0].threads == r.output["threads"] for r in got)  # each process with its threads
    # the kernel reads them back when it asks with the same threads (the key includes them)
    back = runs.launch([_spec(5, sleep=0.5)], threads=got[0].threads, verbose=False)
    assert back[0].source == "store" and len(calls) == 2
    with pytest.raises(runs.RunFailedError, match="toy 7"):
        runs.launch([_spec(7, fail=True)], executor="processes", workers=1, verbose=False)
    with pytest.raises(ValueError, match="executor"):
        runs.launch([_spec(1)], executor="slurm")


def test_a_trainer_that_cannot_be_imported_is_named(store):
    with pytest.raises(runs.RunFailedError, match="no_such_module"):
        runs.launch([runs.RunSpec("no_such_module:train", {})], verbose=False)


def test_store_location(monkeypatch, tmp_path):
    monkeypatch.delenv("TOKENBOOK_RUNS", raising=False)
    monkeypatch.setenv("TOKENBOOK_CACHE", str(tmp_path / "c"))
    assert runs.store_dir() == tmp_path / "c" / "runs"
    monkeypatch.setenv("TOKENBOOK_RUNS", str(tmp_path / "r"))
    assert runs.store_dir() == tmp_path / "r" and runs.store_dir(tmp_path / "x") == tmp_path / "x"


def test_the_small_vit_from_the_store_equals_fit(tmp_path, monkeypatch, idx_dir, one_thread):
    """00's run through the store gives the weights and history fit() gives, and is read back unchanged."""
    import timm
    import torch

    import tokenbook.models  # noqa: F401
    from tokenbook import data, repro
    from tokenbook.experiments import baselines as exp
    from tokenbook.train import TrainConfig, fit

    monkeypatch.setenv("TOKENBOOK_RUNS", str(tmp_path / "store"))
    dcfg = data.DataConfig(dataset="fashion_mnist", data_dir=str(idx_dir), img_size=28, train_subset=64, val_subset=32)
    tcfg = TrainConfig(epochs=2, batch_size=16, lr=2e-3, warmup_epochs=0.5, accelerator="cpu", progress=False, seed=1)
    (run,) = runs.launch([exp.small_vit_spec("vit_fm_tiny_p4_28", dcfg, tcfg)], verbose=False)
    assert run.source == "trained"
    bundle = data.load_data(dcfg)
    tl, vl = data.make_loaders(bundle, 16, seed=1)
    repro.seed_everything(1)
    model = timm.create_model("vit_fm_tiny_p4_28", num_classes=bundle.num_classes, img_size=28)
    ref = fit(model, tl, vl, tcfg, preprocess=bundle.preprocess)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, run.output.state_dict[k]), k
    assert run.output.history["val_top1"].tolist() == ref.history["val_top1"].tolist()
    (back,) = runs.launch([exp.small_vit_spec("vit_fm_tiny_p4_28", dcfg, tcfg)], verbose=False)
    assert back.source == "store" and back.output.final == run.output.final
    assert json.dumps(back.output.timing, sort_keys=True) == json.dumps(run.output.timing, sort_keys=True)


def _same_weights(a, b) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_run_resumes_from_its_checkpoint_with_the_same_weights(store, tmp_path, monkeypatch):
    """An interrupted run (its process killed after epoch 2's checkpoint) continues from last.ckpt on the next
    launch and ends with the weights and history of an uninterrupted run; the checkpoint goes once it is stored."""
    (ref,) = runs.launch([_fit_spec()], executor="processes", workers=1, store=tmp_path / "ref", verbose=False)
    assert not (tmp_path / "ref" / "checkpoints").exists() or not any((tmp_path / "ref" / "checkpoints").iterdir())
    monkeypatch.setenv(KILL_AT, "3")
    with pytest.raises(runs.RunFailedError, match="fit toy"):
        runs.launch([_fit_spec()], executor="processes", workers=1, store=tmp_path / "cut", verbose=False)
    key = runs.run_key(_fit_spec(), threads=ref.threads)
    ckpt = runs.checkpoint_dir(tmp_path / "cut", key) / "last.ckpt"
    assert ckpt.is_file()
    monkeypatch.delenv(KILL_AT)
    (resumed,) = runs.launch([_fit_spec()], executor="processes", workers=1, store=tmp_path / "cut", verbose=False)
    assert resumed.source == "trained" and resumed.key == ref.key == key and not ckpt.exists()
    assert _same_weights(resumed.output.state_dict, ref.output.state_dict)
    assert resumed.output.history["val_top1"].tolist() == ref.output.history["val_top1"].tolist()
    assert len(resumed.output.history) == 6


def test_a_killed_ddp_run_resumes_through_the_launcher_with_the_same_weights(store, tmp_path, monkeypatch):
    """A 2-process gloo DDP run launched as a local process: killed at the start of epoch 3 (a worker exits, the
    launcher sees the run fail, epoch 2's checkpoint stays), launched again it resumes and ends with the weights and
    history of an uninterrupted DDP run."""
    train = dict(epochs=4, lr=1e-2, warmup_epochs=1.0, accelerator="cpu", devices=2, strategy="ddp_fork",
                 progress=False, seed=0)
    spec = runs.RunSpec("test_runs:ddp_fit_trainer", {"train": train}, label="ddp toy")
    (ref,) = runs.launch([spec], executor="processes", workers=1, store=tmp_path / "ref", verbose=False)
    assert ref.output.timing["world_size"] == 2 and len(ref.output.history) == 4
    monkeypatch.setenv(KILL_AT, "2")
    with pytest.raises(runs.RunFailedError, match="ddp toy"):
        runs.launch([spec], executor="processes", workers=1, store=tmp_path / "cut", verbose=False)
    ckpt = runs.checkpoint_dir(tmp_path / "cut", runs.run_key(spec, threads=ref.threads)) / "last.ckpt"
    assert ckpt.is_file()
    monkeypatch.delenv(KILL_AT)
    (resumed,) = runs.launch([spec], executor="processes", workers=1, store=tmp_path / "cut", verbose=False)
    assert resumed.source == "trained" and not ckpt.exists()
    assert _same_weights(resumed.output.state_dict, ref.output.state_dict)
    assert resumed.output.history["val_top1"].tolist() == ref.output.history["val_top1"].tolist()


def test_torchrun_executor_runs_one_ddp_job_per_run_and_resumes_a_killed_one(store, tmp_path, monkeypatch):
    """executor='torchrun': each run is a ``torchrun --standalone`` job of 2 gloo ranks (strategy ddp; rank 0 writes
    the store), the same weights as the same DDP run started by Fabric (ddp_fork); killed at epoch 3 it resumes
    from its checkpoint to the weights of the uninterrupted run."""
    train = dict(epochs=4, lr=1e-2, warmup_epochs=1.0, accelerator="cpu", devices=2, strategy="ddp",
                 progress=False, seed=0)
    spec = runs.RunSpec("test_runs:ddp_fit_trainer", {"train": train}, label="torchrun toy")
    env_path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent)] + ([env_path] if env_path else [])))
    (ref,) = runs.launch([spec], executor="torchrun", store=tmp_path / "ref", verbose=False, threads=1)
    assert ref.source == "trained" and ref.output.timing["world_size"] == 2
    assert len([c for c in _calls(store) if c.startswith("ddp")]) == 2  # both ranks ran the trainer
    forked = runs.RunSpec("test_runs:ddp_fit_trainer", {"train": {**train, "strategy": "ddp_fork"}}, label="fork")
    (fk,) = runs.launch([forked], executor="processes", workers=1, threads=1, store=tmp_path / "fork", verbose=False)
    assert _same_weights(ref.output.state_dict, fk.output.state_dict)
    (again,) = runs.launch([spec], executor="torchrun", store=tmp_path / "ref", verbose=False, threads=1)
    assert again.source == "store"
    monkeypatch.setenv(KILL_AT, "2")
    with pytest.raises(runs.RunFailedError, match="torchrun toy.*torchrun exited"):
        runs.launch([spec], executor="torchrun", store=tmp_path / "cut", verbose=False, threads=1)
    ckpt = runs.checkpoint_dir(tmp_path / "cut", ref.key) / "last.ckpt"
    assert ckpt.is_file()
    monkeypatch.delenv(KILL_AT)
    (resumed,) = runs.launch([spec], executor="torchrun", store=tmp_path / "cut", verbose=False, threads=1)
    assert resumed.source == "trained" and not ckpt.exists()
    assert _same_weights(resumed.output.state_dict, ref.output.state_dict)
    assert resumed.output.history["val_top1"].tolist() == ref.output.history["val_top1"].tolist()
    with pytest.raises(runs.RunFailedError, match="integer number of processes"):
        runs.launch([runs.RunSpec("test_runs:toy_trainer", {"x": 1, "train": {"devices": "auto"}})],
                    executor="torchrun", store=tmp_path / "bad", verbose=False)


def test_submitit_debug_executor_trains_into_the_store(store):
    pytest.importorskip("submitit")
    got = runs.launch([_spec(11), _spec(12)], executor="submitit", cluster="debug", verbose=False)
    assert [r.source for r in got] == ["trained", "trained"] and [r.output["x"] for r in got] == [11, 12]
    back = runs.launch([_spec(11)], executor="submitit", cluster="debug", verbose=False)
    assert back[0].source == "store" and len(_calls(store)) == 2


def test_a_failed_submitit_job_is_named_and_submitted_again_next_time(store, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    for _ in range(2):  # (the debug executor would stop in pdb on the error; local runs it in a subprocess)
        with pytest.raises(runs.RunFailedError, match="(?s)toy 13.*diverged"):
            runs.launch([_spec(13, fail=True)], executor="submitit", cluster="local", threads=1, verbose=False)
    assert len(_calls(store)) == 2


def test_submitit_job_is_collected_later_and_a_preempted_job_resumes(store, tmp_path, monkeypatch):
    """The local submitit executor (a job per run, in a subprocess; what SLURM does on a cluster): wait=False
    returns with the job pending, the next launch takes the same job over instead of submitting it again, and a job
    preempted in the middle (submitit's own preemption signal) is requeued, resumes from last.ckpt and ends with
    the weights of an uninterrupted run."""
    import time

    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    (ref,) = runs.launch([_fit_spec()], threads=1, store=tmp_path / "ref", verbose=False)
    spec = _fit_spec(sleep=0.4)
    with pytest.raises(runs.RunsPendingError) as info:
        runs.launch([spec], executor="submitit", cluster="local", threads=1, wait=False, verbose=False)
    (label, key, job_id), = info.value.pending
    assert label == "fit toy" and key == runs.run_key(spec, threads=1)
    from submitit.local.local import LocalJobEnvironment

    assert runs._pending_job(runs.store_dir(), key).job_id == job_id
    ckpt = runs.checkpoint_dir(runs.store_dir(), key) / "last.ckpt"
    deadline = time.time() + 120
    while not ckpt.is_file() and time.time() < deadline:  # epoch 1 checkpointed: preempt the job now
        time.sleep(0.1)
    assert ckpt.is_file(), "the job never checkpointed"
    task_pid = int(_calls(store)[-1].split()[1])  # the job's task, as SLURM signals it before a preemption
    os.kill(task_pid, LocalJobEnvironment._usr_sig())
    (got,) = runs.launch([spec], executor="submitit", cluster="local", threads=1, verbose=False)
    assert got.source == "trained" and got.key == key
    assert len([c for c in _calls(store) if c.startswith("fit")]) == 3  # ref, the job, and its requeued restart
    assert _same_weights(got.output.state_dict, ref.output.state_dict)
    assert got.output.history["val_top1"].tolist() == ref.output.history["val_top1"].tolist()
    assert not runs._job_record(runs.store_dir(), key).exists()


def test_job_resources_come_from_the_recipe():
    """The submitit job's shape is the run's recipe: one task per device (each a DDP rank), GPUs on a GPU recipe,
    nodes from num_nodes; a one-process run asks for nothing; a multi-node run without a device count is refused."""
    def spec(**train):
        return runs.RunSpec("test_runs:toy_trainer", {"x": 1, "train": train}, label="shape")

    assert runs.job_resources(spec(devices=1)) == {}
    assert runs.job_resources(runs.RunSpec("test_runs:toy_trainer", {"x": 1})) == {}
    assert runs.job_resources(spec(devices=4, accelerator="cuda")) == {"tasks_per_node": 4, "gpus_per_node": 4}
    assert runs.job_resources(spec(devices=8, num_nodes=2)) == {"nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8}
    assert runs.job_resources(spec(devices=2, accelerator="cpu")) == {"tasks_per_node": 2}
    with pytest.raises(ValueError, match="2 nodes need an integer number of devices"):
        runs.job_resources(spec(devices="auto", num_nodes=2))


def test_a_multi_device_submitit_job_is_one_ddp_run(store, tmp_path, monkeypatch):
    """A run whose recipe says 2 devices becomes one submitit job of 2 tasks (the local executor here; SLURM tasks on
    a cluster); the tasks join as the 2 gloo ranks of one DDP run (rank 0 writes the store) and end with the
    weights of the same run under torchrun."""
    pytest.importorskip("submitit")
    train = dict(epochs=3, lr=1e-2, warmup_epochs=1.0, accelerator="cpu", devices=2, strategy="ddp",
                 progress=False, seed=0)
    spec = runs.RunSpec("test_runs:ddp_fit_trainer", {"train": train}, label="job toy")
    env_path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent)] + ([env_path] if env_path else [])))
    (job,) = runs.launch([spec], executor="submitit", cluster="local", threads=1, store=tmp_path / "job",
                         verbose=False)
    assert job.source == "trained" and job.output.timing["world_size"] == 2
    assert len([c for c in _calls(store) if c.startswith("ddp")]) == 2  # both tasks ran the trainer
    (tr,) = runs.launch([spec], executor="torchrun", threads=1, store=tmp_path / "tr", verbose=False)
    assert _same_weights(job.output.state_dict, tr.output.state_dict)
    (again,) = runs.launch([spec], executor="submitit", cluster="local", threads=1, store=tmp_path / "job",
                           verbose=False)
    assert again.source == "store"


class _FakeSlurmJob:
    """A SLURM job that never finishes (for the submission-side tests)."""

    def __init__(self, job_id: str):
        self.job_id = job_id

    def done(self) -> bool:
        return False


class _FakeSlurmExecutor:
    """submitit's AutoExecutor on a SLURM cluster, recording each submission's parameters instead of calling sbatch."""

    submitted: list = []

    def __init__(self, folder: str, cluster=None):
        self.cluster, self.params = "slurm", {}

    @staticmethod
    def which() -> str:
        return "slurm"

    def update_parameters(self, **kw):
        self.params = dict(kw)

    def submit(self, fn):
        job = _FakeSlurmJob(str(1000 + len(type(self).submitted)))
        type(self).submitted.append((dict(self.params), job.job_id))
        return job


@pytest.fixture
def fake_slurm(monkeypatch):
    submitit = pytest.importorskip("submitit")
    monkeypatch.setattr(_FakeSlurmExecutor, "submitted", [])
    monkeypatch.setattr(submitit, "AutoExecutor", _FakeSlurmExecutor)
    return _FakeSlurmExecutor


def test_jobs_submitted_after_others_wait_for_them_on_slurm(store, fake_slurm):
    """wait=False names the pending jobs and every spec's key, so that runs reading them by key can be submitted at
    once with after=...: on SLURM their jobs carry --dependency=afterok on those jobs (beside the user's own extra
    parameters); no other cluster or executor takes after."""
    first, second = _spec(1), _spec(2)
    with pytest.raises(runs.RunsPendingError) as info:
        runs.launch([first], executor="submitit", wait=False, verbose=False)
    assert info.value.keys == [info.value.pending[0][1]] and len(info.value.keys[0]) == 64
    assert info.value.job_ids == ["1000"]
    with pytest.raises(runs.RunsPendingError):
        runs.launch([second], executor="submitit", wait=False, verbose=False, after=info.value.job_ids,
                    resources={"slurm_additional_parameters": {"qos": "high"}})
    params, job_id = fake_slurm.submitted[-1]
    assert job_id == "1001" and params["slurm_additional_parameters"] == {"qos": "high", "dependency": "afterok:1000"}
    assert "slurm_additional_parameters" not in fake_slurm.submitted[0][0]
    with pytest.raises(runs.RunsPendingError):  # taken over on the next launch, not submitted again
        runs.launch([second], executor="submitit", wait=False, verbose=False, after=["1000"])
    assert len(fake_slurm.submitted) == 2
    with pytest.raises(ValueError, match="for executor 'submitit'"):
        runs.launch([_spec(3)], executor="kernel", after=["1000"], verbose=False)
    assert not _calls(store)  # nothing ran


def test_after_is_refused_where_jobs_cannot_wait_for_each_other(store):
    pytest.importorskip("submitit")
    with pytest.raises(ValueError, match="need SLURM's dependencies, and the cluster is 'local'"):
        runs.launch([_spec(4)], executor="submitit", cluster="local", after=["1000"], verbose=False)


def test_every_trainer_path_in_the_library_names_the_module_that_defines_it():
    """Every ``"tokenbook.<module>:<function>"`` written in the library resolves, and names the module where the
    function is defined, not one that re-exports it: the run's key hashes that module's closure, and code that tells
    runs apart by their trainer (06's stored ToE arms) compares these strings. A trainer moved without its path
    fails here."""
    import importlib
    import re

    pkg = Path(runs.__file__).resolve().parent
    found = set()
    for path in pkg.rglob("*.py"):
        found |= set(re.findall(r'"(tokenbook\.[A-Za-z_.]+:[A-Za-z_]+)"', path.read_text()))
    assert len(found) >= 9, found
    for target in sorted(found):
        mod, fn = target.split(":")
        obj = getattr(importlib.import_module(mod), fn, None)
        assert callable(obj), f"{target} does not resolve"
        assert obj.__module__ == mod, f"{target} is defined in {obj.__module__}"
