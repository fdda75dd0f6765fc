"""tokenbook.params: the typed parameters of each notebook (issue 23, item 1)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import dataclasses

import pytest

from tokenbook.params import Params, ParamsError, as_list, cell_params_class, param, params_class
from tokenbook.runner import list_notebooks

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Demo(Params):
    NOTEBOOK = "99_demo"
    seeds: list[int] = param([0, 1], "training seeds [0, inf)")
    epochs: int = param(3, "training epochs [1, inf)")
    lr: float = param(1e-3, "learning rate (0, inf)")
    train_subset: int = param(0, "train images, 0 means all [0, inf)", none=0)
    data_dir: str = param("", "folder of the data, empty for the default", none="")
    names: list[str] = param(["a"], "arm names")


def test_types_lists_and_sentinels():
    p = Demo()
    assert p.seeds == [0, 1] and p.train_subset is None and p.data_dir is None and p["epochs"] == 3
    assert p.to_dict()["train_subset"] == 0 and p.to_dict()["data_dir"] == ""  # as written
    assert Demo.from_mapping(p.to_dict()) == p  # round trip
    q = Demo(seeds=[3, 4, 5], lr=1, epochs=2.0, train_subset=500)
    assert q.lr == 1.0 and isinstance(q.lr, float) and q.epochs == 2 and isinstance(q.epochs, int)
    assert q.train_subset == 500 and q.text("seeds") == "3,4,5" and q.text("epochs") == "2"
    assert dict(q)["seeds"] == [3, 4, 5] and len(q) == len(Demo.specs())
    assert q.replace(epochs=9).epochs == 9 and q.epochs == 2
    with pytest.raises(Exception):
        q.epochs = 5  # frozen


def test_comma_string_for_a_list_is_refused_with_the_yaml_spelling():
    with pytest.raises(ParamsError, match=r"'seeds' must be a list of int \(YAML: seeds: \[0, 1, 2\]"):
        Demo(seeds="0,1,2")
    with pytest.raises(TypeError, match="must be a list"):
        as_list("a,b", "names")
    assert as_list(("a", "b"), "names") == ["a", "b"]


def test_bad_values_name_every_problem():
    with pytest.raises(ParamsError) as e:
        Demo(epochs=0, lr=-1.0, seeds=[0, "x"], names=[1])
    msg = str(e.value)
    for part in ("'epochs' = 0 is out of its range [1, inf)", "'lr' = -1.0 is out of its range (0, inf)",
                 "element 1 of parameter 'seeds' must be int", "element 0 of parameter 'names' must be str"):
        assert part in msg, msg
    with pytest.raises(ParamsError, match="'seeds' = -1 is out of its range"):
        Demo(seeds=[-1])
    with pytest.raises(ParamsError, match="not a whole number"):
        Demo(epochs=1.5)
    with pytest.raises(ParamsError, match="must be int, got bool"):
        Demo(epochs=True)


def test_choices_are_enforced_with_the_list():
    @dataclasses.dataclass(frozen=True)
    class WithChoices(Params):
        executor: str = param("kernel", "where runs go", choices=("kernel", "processes"))

    assert WithChoices(executor="processes").executor == "processes"
    with pytest.raises(ParamsError, match="'executor' = 'procs' is not one of 'kernel', 'processes'"):
        WithChoices(executor="procs")
    with pytest.raises(ValueError, match="not one of the choices"):
        param("x", "bad default", choices=("a", "b"))


def test_unknown_names_get_a_suggestion():
    with pytest.raises(ParamsError, match=r"unknown parameter\(s\) epoch \(did you mean 'epochs'\?\)"):
        Demo.from_mapping({"epoch": 3}, where="99_demo (smoke.yaml)")


def test_a_subclass_without_the_dataclass_decorator_is_refused():
    class Bare(Params):
        epochs: int = 3

    with pytest.raises(TypeError, match="must be decorated"):
        Bare()


def test_from_namespace_needs_the_parameters_cell():
    ns = {k: v for k, v in Demo().to_dict().items()}
    assert Demo.from_namespace({**ns, "epochs": 4, "other": 1}).epochs == 4
    del ns["lr"]
    with pytest.raises(NameError, match="lr"):
        Demo.from_namespace(ns)


def test_parameters_cell_is_typed_python_with_a_comment_per_line():
    src = Demo.parameters_cell()
    tree = ast.parse(src)
    assert len(tree.body) == len(Demo.specs()) and all(isinstance(s, ast.AnnAssign) for s in tree.body)
    assert 'seeds: list[int] = [0, 1]  # training seeds [0, inf)' in src
    assert 'data_dir: str = ""  #' in src
    ns = {}
    exec(src, {}, ns)
    assert Demo.from_namespace(ns) == Demo()


@pytest.mark.parametrize("nb", list_notebooks(ROOT))
def test_every_notebook_has_a_params_class_whose_cell_is_in_sync(nb):
    import nbformat

    cls = params_class(nb)
    assert cls.NOTEBOOK == nb
    cls()  # defaults are valid
    book = nbformat.read(str(ROOT / "notebooks" / f"{nb}.ipynb"), as_version=4)
    cells = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1 and cells[0].source.rstrip("\n") == cls.parameters_cell(), \
        f"{nb}: run python -m tokenbook.params --sync"
    # the notebook reads its parameters through the object: the setup cell builds it from the parameters cell
    code = "\n".join(c.source for c in book.cells if c.cell_type == "code")
    assert "Params.from_namespace(globals())" in code
    # and no code cell reads a parameter as a bare global after that
    names = set(cls.specs())
    for c in book.cells:
        if c.cell_type != "code" or c is cells[0]:
            continue
        bare = {n.id for n in ast.walk(ast.parse(c.source)) if isinstance(n, ast.Name) and n.id in names
                and "from_namespace" not in c.source}
        assert not bare, f"{nb}: a cell reads {sorted(bare)} as bare globals; use p.<name>"


def test_check_cli_finds_a_stale_cell(tmp_path):
    import shutil

    import nbformat

    (tmp_path / "notebooks").mkdir()
    nb = tmp_path / "notebooks" / "03_toe.ipynb"
    shutil.copy(ROOT / "notebooks" / "03_toe.ipynb", nb)
    env = {"TOKENBOOK_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "tokenbook.params", "--check"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    book = nbformat.read(str(nb), as_version=4)
    cell = next(c for c in book.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = cell.source.replace("# ", "# stale ", 1)
    nbformat.write(book, str(nb))
    bad = subprocess.run([sys.executable, "-m", "tokenbook.params", "--check"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "03_toe.ipynb" in bad.stdout
    fix = subprocess.run([sys.executable, "-m", "tokenbook.params", "--sync"], env=env, capture_output=True, text=True)
    assert fix.returncode == 0 and "03_toe.ipynb" in fix.stdout
    assert subprocess.run([sys.executable, "-m", "tokenbook.params", "--check"], env=env).returncode == 0


def test_a_notebook_without_an_experiments_module_gets_params_from_its_cell(tmp_path):
    import nbformat

    book = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell('profile: str = "cpu"  # run profile\nresults_root: str = "results"  # out\n'
                                     'epochs: int = 2  # epochs [1, inf)\nseeds: list = [0, 1]  # seeds\n'
                                     'name: str = "x"  # a name')
    cell.metadata["tags"] = ["parameters"]
    book.cells = [cell]
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "77_mine.ipynb"
    path.write_text(json.dumps(book))
    cls = cell_params_class("77_mine", path)
    assert cls().epochs == 2 and cls(epochs=5).epochs == 5 and cls().name == "x"
    with pytest.raises(ParamsError, match="out of its range"):
        cls(epochs=0)


def test_launch_params_give_the_launcher_keywords():
    """LaunchParams (02 and 03): executor alone, or for submitit the cluster, the job resources and wait."""
    from tokenbook.experiments.toe import Params as ToeParams

    assert ToeParams().launch_options() == {"executor": "kernel"}
    assert ToeParams(executor="processes").launch_options() == {"executor": "processes"}
    sub = ToeParams(executor="submitit", cluster="local", slurm_partition="gpu", gpus_per_node=4, job_timeout_min=60,
                    wait_for_jobs=False, num_workers=3).launch_options()
    assert sub == {"executor": "submitit", "cluster": "local", "wait": False,
                   "resources": {"gpus_per_node": 4, "timeout_min": 60, "cpus_per_task": 4,
                                 "slurm_partition": "gpu"}}
    # no gpus_per_node: the launcher takes nodes, tasks and GPUs from each run's recipe (runs.job_resources)
    assert ToeParams(executor="submitit").launch_options()["resources"] == {"timeout_min": 4320, "cpus_per_task": 1}
    with pytest.raises(ParamsError, match="executor"):
        ToeParams(executor="ray")


@pytest.mark.parametrize("nb", ["00_baselines", "01_vittm", "02_t2t_vit", "03_toe"])
def test_the_cpu_scale_is_one_scale(nb):
    """The workbook's cpu scale (issue 19) is the same in every notebook that uses it: 10,000 / 2,000 Fashion-MNIST
    images, 28 px, 16 tokens into the backbone, 15 epochs of batch 128, AdamW lr 2e-3, label smoothing 0.1, so the
    floors are the same and the sweep in 00's cpu.yaml holds for all of them."""
    import timm

    import tokenbook.models  # noqa: F401
    from tokenbook.runner import profile_parameters

    p = profile_parameters(ROOT, nb, "cpu")
    assert (p.train_subset, p.val_subset, p.img_size, p.epochs, p.batch_size, p.lr, p.label_smoothing) == \
        (10000, 2000, 28, 15, 128, 0.002, 0.1), nb
    names = {"00_baselines": [p.get("model_name")], "03_toe": [p.get("model_name")],
             "01_vittm": [p.get("vit_name")], "02_t2t_vit": []}[nb]
    for name in names:
        assert timm.create_model(name, num_classes=10).patch_embed.num_patches == 16, name
    if nb == "02_t2t_vit":
        assert p.tokens == 16
    if nb == "01_vittm":
        m = timm.create_model(p.model_name, num_classes=10)
        assert (m.num_memory_tokens, m.num_process_tokens) == (16, 16)


def test_launch_params_refuse_a_strategy_the_executor_cannot_start():
    """A run over several devices needs its ranks started once: by the launcher (torchrun, submitit: strategy ddp)
    or from the kernel (strategy ddp_notebook with executor kernel); the two other pairings are refused up front."""
    from tokenbook.experiments.toe import Params as ToeParams

    assert ToeParams(devices=4, strategy="ddp", executor="torchrun").launch_options() == {"executor": "torchrun"}
    assert ToeParams(devices=4, strategy="ddp_notebook").executor == "kernel"
    assert ToeParams(devices=1, strategy="ddp").executor == "kernel"  # one device: nothing to start
    with pytest.raises(ParamsError, match="needs ranks started from outside: executor torchrun"):
        ToeParams(devices=4, strategy="ddp")
    with pytest.raises(ParamsError, match="starts the 4 ranks of a run itself: use strategy 'ddp'"):
        ToeParams(devices=4, strategy="ddp_notebook", executor="submitit")


def test_the_full_toe_profile_is_one_ddp_run_per_arm_over_the_node():
    """03's full profile: each (arm, seed) is one torchrun DDP run over the recipe's 4 GPUs; as a submitit job it is
    4 tasks with 4 GPUs (taken from the recipe)."""
    import yaml

    from tokenbook import runs
    from tokenbook.experiments import toe
    from tokenbook.experiments.toe import Params as ToeParams

    p = ToeParams.from_mapping(yaml.safe_load((ROOT / "notebooks/params/03_toe/full.yaml").read_text()))
    assert p.launch_options() == {"executor": "torchrun"} and (p.devices, p.strategy) == (4, "ddp")
    spec = toe.arm_spec(p.model_name, None, None, 0, {"dataset": "folder:/data/imagenet"}, p.train_config(),
                        p.batch_size, p.seeds[0])
    assert spec.args["train"]["devices"] == 4 and runs._nproc(spec, None) == 4
    assert runs.job_resources(spec) == {"tasks_per_node": 4, "gpus_per_node": 4}


def test_the_workbook_vit_is_one_stored_run_for_00_01_and_03():
    """Issue 19 item 4: at the cpu scale 00's small ViT, 01's ViT baseline and 03's full-token arm are the same run
    (model, recipe, data, batch, seed, executor threads), built the way each notebook builds it, so the store trains
    each seed once for the workbook. Fails when one notebook's profile or spec drifts from the others."""
    import dataclasses

    import yaml

    from tokenbook import runs
    from tokenbook.experiments import baselines, toe, vittm
    from tokenbook.experiments.vittm_runs import run_spec

    def load(nb, cls):
        return cls.from_mapping(yaml.safe_load((ROOT / "notebooks/params" / nb / "cpu.yaml").read_text()))

    p0, p1, p3 = load("00_baselines", baselines.Params), load("01_vittm", vittm.Params), load("03_toe", toe.Params)
    assert p0.seeds == p1.seeds == p3.seeds and p0.executor == p1.executor == p3.executor == "processes"
    classes = 10
    t1 = vittm.make_train_config(p1, p1.recipe)
    for s in p0.seeds:
        s0 = baselines.small_vit_spec(p0.model_name, p0.data_config(), dataclasses.replace(p0.train_config(), seed=s),
                                      p0.num_workers, classes)
        s1 = run_spec(p1.vit_name, {"drop_path_rate": p1.drop_path_rate, "img_size": p1.img_size,
                                    "num_classes": classes}, p1.data_config(), dataclasses.replace(t1, seed=s),
                      p1.batch_size, p1.num_workers)
        s3 = toe.arm_spec(p3.model_name, {"num_classes": classes, "img_size": p3.img_size,
                                          "drop_path_rate": p3.drop_path_rate}, None, p3.toe_block_index,
                          p3.data_config(), toe.train_config(p3), p3.batch_size, s, p3.num_workers)
        assert s0.trainer == s1.trainer == s3.trainer == "tokenbook.experiments.baselines_runs:train_classifier"
        assert s0.args == s1.args == s3.args, (s0.args, s1.args, s3.args)
        assert runs.run_key(s0, 1) == runs.run_key(s1, 1) == runs.run_key(s3, 1)
