"""The ClientApp's side of the `ClientRule` hooks: what `finish` is given, and how the node
state it returns comes back (`RoundStart.node_state`) next round."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedsim import records as R
from fedsim.clients.app import finish_job, prepare_job, run_job
from tests.clients.test_vectorized import BASE, _jobs


def _finish_with(job, finish):
    """Train `job` with Opacus, then reply through `finish_job` with `finish` as the rule's hook."""
    job.rule = dataclasses.replace(job.rule, finish=finish)
    return finish_job(job, run_job(job))


def test_finish_gets_the_rounds_hyper_and_the_steps_taken(tiny):
    cfg = tiny(**BASE, **{"strategy.name": "fedprox", "strategy.fedprox.mu": 0.25, "client.local_steps": 3})
    (job,), _ = _jobs(cfg, [0], dp_reference=False)
    seen = {}

    def finish(start, state, final, steps, hyper):
        seen.update(hyper=hyper, steps=steps, final=final)
        return {}, {}

    _finish_with(job, finish)
    assert seen["hyper"] is job.start.hyper and seen["hyper"].params.mu == 0.25
    assert seen["hyper"].lr == cfg.client.lr and seen["steps"] == 3
    for name, p in job.model.named_parameters():
        assert torch.equal(seen["final"][name], p.detach().cpu())


def test_node_state_goes_out_and_comes_back_as_tensors_and_empty_keeps_it(tiny):
    cfg = tiny(**BASE, **{"client.local_steps": 1})
    (job,), _ = _jobs(cfg, [0], dp_reference=False)
    kept = torch.tensor([1.5, -2.0], dtype=torch.float64)
    reply = _finish_with(job, lambda *args: ({"delta": torch.ones(3)}, {"c": kept}))
    np.testing.assert_array_equal(R.record_to_numpy(reply.content[R.ALGORITHM_ARRAYS])["delta"], np.ones(3))

    def next_round(finish):
        again = prepare_job(job.msg, job.context)
        node_state = again.start.node_state
        assert set(node_state) == {"c"} and isinstance(node_state["c"], torch.Tensor)
        assert torch.equal(node_state["c"], kept)  # dtype and bits as returned
        _finish_with(again, finish)

    next_round(lambda *args: ({}, {}))  # {}: the state stays as it was
    next_round(lambda *args: ({}, {}))
    state = job.context.state[R.ALGORITHM_STATE]
    assert isinstance(state, ArrayRecord) and set(state) == {"c"}


def test_finish_must_return_tensors(tiny):
    cfg = tiny(**BASE, **{"client.local_steps": 1})
    (job,), _ = _jobs(cfg, [0], dp_reference=False)
    with pytest.raises(TypeError, match=r"node state\['c'\] must be a torch.Tensor \(got ndarray\)"):
        _finish_with(job, lambda *args: ({}, {"c": np.zeros(2)}))
    assert R.ALGORITHM_STATE not in job.context.state
