"""The claims lists of the five papers' reference sheets (issue 12): they parse, cover every paper with at least 4
claims (at least 25 in all, at least 8 empirical), and every claim that cannot be tested here names the run that
would test it."""
import pytest

from tokenbook.claims import KINDS, load_claims

PAPERS = ("vittm", "t2t_vit", "toe", "seit", "memory")


@pytest.mark.parametrize("paper", PAPERS)
def test_sheet_has_claims(paper):
    claims = load_claims(paper)
    assert len(claims) >= 4, f"{paper}: {len(claims)} claims"
    for c in claims:
        assert c.kind in KINDS and c.statement and c.source
        assert "[" in c.source and "]" in c.source, f"{c.id}: the source names its kind, e.g. '[paper]'"
        assert c.id.startswith(f"{paper}."), c.id
        if c.not_testable_here:
            assert any(w in c.not_testable_here for w in ("full", "gpu")), f"{c.id}: name the full or gpu run"
        elif c.kind in ("empirical", "composition", "hardware"):
            assert c.a and c.metric, f"{c.id}: compare needs arms and a metric"


def test_ledger_size():
    claims = [c for p in PAPERS for c in load_claims(p)]
    assert len(claims) >= 25
    assert sum(c.kind == "empirical" and not c.not_testable_here for c in claims) >= 8
    assert len({c.id for c in claims}) == len(claims)
