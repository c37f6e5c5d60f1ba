"""Parameter and GMAC counts against the spec's table (measured from the authors' code)."""

import pytest

import cvt
from cvt.flops import model_cost
from cvt.variants import precomputed_cost

# name: (params exact, GMACs @224, GMACs @384), from shared/SPEC.md
SPEC = {
    "cvt_13": (19_997_480, 4.57, 16.27),
    "cvt_21": (31_622_696, 7.18, 24.85),
    "cvt_w24": (277_196_392, 60.92, 194.22),
}


def test_every_registered_model_has_spec_figures():
    assert set(cvt.list_models()) == set(SPEC)


@pytest.mark.parametrize("name", list(SPEC))
def test_params_and_macs(name):
    params, gmacs224, gmacs384 = SPEC[name]
    cfg = cvt.model_config(name)
    p224, m224 = model_cost(cfg, (224, 224))
    _, m384 = model_cost(cfg, (384, 384))
    assert p224 == params
    assert m224 / 1e9 == pytest.approx(gmacs224, rel=0.01)
    assert m384 / 1e9 == pytest.approx(gmacs384, rel=0.01)
    # what `cvt list` prints without counting: the same counts, and the spec's figures to the printed digits
    assert precomputed_cost(name, 224) == (p224, m224) and precomputed_cost(name, 384) == (params, m384)
    assert (round(m224 / 1e9, 2), round(m384 / 1e9, 2)) == (gmacs224, gmacs384)


def test_kv_stride_1_costs_more():
    # the paper's ablation: k/v stride 1 costs 6.64 GMACs, same parameters
    params, macs = model_cost(cvt.model_config("cvt_13", stride_kv=1), (224, 224))
    assert params == 19_997_480
    assert macs / 1e9 == pytest.approx(6.64, rel=0.01)


def test_real_model_counts_match_meta_count():
    model = cvt.create_model("cvt_13", depths=(1, 1, 1))
    assert cvt.count_params(model) == model_cost(model.cfg)[0]
    assert cvt.count_macs(model, (224, 224)) == model_cost(model.cfg)[1]
