"""tokenbook.floors: the logistic-regression floor is independent of the machine's BLAS thread count."""
import numpy as np
import torch


class _DS:
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.x = torch.rand(n, 1, 6, 6, generator=g) + self.y.view(-1, 1, 1, 1) * 0.3

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class _Bundle:
    def __init__(self):
        self.train, self.val = _DS(90, 0), _DS(30, 1)


def test_logistic_floor_fits_with_one_blas_thread(monkeypatch):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_info

    from tokenbook import floors

    seen = []
    fit = LogisticRegression.fit

    def spy(self, *a, **k):
        seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])
        return fit(self, *a, **k)

    monkeypatch.setattr(LogisticRegression, "fit", spy)
    r = floors.logistic_floor(_Bundle())
    assert seen and all(n == 1 for n in seen[0]), seen  # lbfgs's end point would depend on the thread count
    assert 0 <= r["top1"] <= 100 and r["params"] == 36 * 3 + 3
    assert np.isfinite(r["train_s"])


def test_failed_baseline_runs_names_every_run_below_the_logistic_floor_and_the_table_puts_rows_beside_floors():
    import pandas as pd

    from tokenbook import floors

    table = pd.DataFrame([{"model": "logistic regression on pixels", "top1": 80.0, "top5": 99.0, "params": 10,
                           "train_s": 1.0},
                          {"model": "small CNN", "top1": 88.0, "top5": 99.5, "params": 20, "train_s": 2.0}])
    assert floors.failed_baseline_runs({"vit": {0: 81.0, 1: 82.0}, "t2t": {0: 90.0}}, table) == ""
    why = floors.failed_baseline_runs({"vit": {0: 81.0, 1: 79.5, 2: 60.0}, "t2t": {0: 90.0}}, table)
    assert why == ("failed runs below the logistic-regression floor 80.00 % on the same split: "
                   "vit seeds 1 (79.5 %), 2 (60.0 %)")
    df = floors.beside_floors([{"model": "vit", "kind": "from scratch", "top1": 83.0, "params": 5, "train_s": 3.0,
                                "worst_seed_top1": 82.0}], table)
    assert list(df["kind"]) == ["from scratch", "floor", "floor"]
    assert list(df["vs_logistic_floor_pts"]) == [3.0, 0.0, 8.0]


def test_floors_are_fitted_once_per_split_and_kept_in_the_store(monkeypatch, tmp_path):
    """floors_table without loaders is fitted once per split for the workbook (00-03 share the cpu scale's split):
    the second call reads the store; another split (one pixel changed), other arguments or store=False fit again."""
    from tokenbook import floors

    monkeypatch.setenv("TOKENBOOK_RUNS", str(tmp_path / "store"))
    calls = []

    def logistic(bundle, seed=0, **kw):
        calls.append(("logistic", seed))
        return {"model": "logistic regression on pixels", "top1": 50.0 + len(calls), "top5": None, "train_s": 1.0,
                "params": 21}

    def cnn(bundle, tl, vl, epochs=5, seed=0, **kw):
        calls.append(("cnn", epochs))
        return {"model": "small CNN", "top1": 60.0, "top5": 90.0, "train_s": 2.0, "params": 99}

    monkeypatch.setattr(floors, "logistic_floor", logistic)
    monkeypatch.setattr(floors, "cnn_floor", cnn)
    monkeypatch.setattr("tokenbook.data.make_loaders", lambda *a, **k: (None, None))
    b = _Bundle()
    first = floors.floors_table(b, cnn_epochs=3)
    again = floors.floors_table(b, cnn_epochs=3)
    assert len(calls) == 2 and again.equals(first)  # read back: the same table, nothing fitted
    floors.floors_table(b, cnn_epochs=4)  # another recipe
    assert len(calls) == 4
    other = _Bundle()
    other.val.x = other.val.x.clone()
    other.val.x[0, 0, 0, 0] += 1.0  # one pixel of the split differs
    assert floors.data_fingerprint(other) != floors.data_fingerprint(b)
    floors.floors_table(other, cnn_epochs=3)
    assert len(calls) == 6
    floors.floors_table(b, cnn_epochs=3, store=False)  # asked not to keep it
    assert len(calls) == 8
