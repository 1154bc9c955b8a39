"""train/engine.py `clamp_param_` under ZeRO 1, 2 and 3 on two CPU ranks: a logit scale pushed past
the bound (ln 200, train/model.py ``LOGIT_SCALE_MAX``) comes back clamped in the model copy *and*
in the optimiser's fp32 master copy, and the next step does not undo it. The ranks run
tests/train/logit_clamp_probe.py (one process per rank, all three stages in each)."""

from __future__ import annotations

import json
import math

import pytest

from tests.support.s3server import free_port
from tests.train.fixtures_train import PYTHON, rank_env_of, start_ranks
from train.model import LOGIT_SCALE_MAX

NPROC = 2


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("clamp")
    out, port = folder / "values.json", free_port()
    envs = [rank_env_of(rank, NPROC, port) for rank in range(NPROC)]
    ranks = start_ranks([PYTHON, "-m", "tests.train.logit_clamp_probe", str(out)], envs, str(folder), port=port)
    try:
        assert ranks.wait() == 0, ranks.output()
    finally:
        ranks.kill()
    with open(out) as f:
        return json.load(f)


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_clamp_reaches_the_master_copy(probed, stage):
    assert LOGIT_SCALE_MAX == pytest.approx(math.log(200))
    assert probed["world_size"] == NPROC
    values = probed[str(stage)]
    assert values["initial"] == {"module": pytest.approx(2.66), "master": pytest.approx(2.66)}  # tiny.yaml
    assert values["pushed"] == {"live": 6.0, "master": 6.0}  # the step copied the pushed master into the model
    bound = pytest.approx(LOGIT_SCALE_MAX, abs=1e-6)
    assert values["next_forward"] == bound  # the forward after the clamp
    assert values["after_step"] == {"module": bound, "master": bound}  # that step kept the clamped master
    assert values["clamped"] == {"module": bound, "master": bound}  # read right after the clamp
    assert values["forward_after_read"] == bound
