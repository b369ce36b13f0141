"""convert() over timm's zoo: the share of normalisation layers swapped (at least 95% over
30+ models) -- the same survey as bench/timm_zoo.py (models built on the meta device: no memory,
about 15 s on a 2-core CPU)."""
import os
import sys

import pytest

pytest.importorskip("timm")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import timm_zoo  # noqa: E402


def test_convert_reaches_95_percent_of_timm_norm_layers():
    s = timm_zoo.survey(timm_zoo.MODELS)
    assert len(s["models"]) >= 30
    left = {k: v for k, v in s["classes"].items() if v[1]}
    assert s["fraction"] >= 0.95, (s["fraction"], left)
    # every timm norm-act class the zoo uses is swapped everywhere
    assert not [k for k in left if k.startswith("timm.layers.norm_act.")], left
