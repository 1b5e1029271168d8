"""Distributed mistakes fail loudly: divergent layers, conditional computation, NaN, dead peers."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import syncbn
from syncbn import SyncBatchNorm


def _expect_error(fn) -> str:
    try:
        fn()
    except (RuntimeError, FloatingPointError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _different_layers() -> str:
    rank = dist.get_rank()
    model = syncbn.convert_sync_batchnorm(
        nn.ModuleDict({"stem": nn.BatchNorm2d(3), "head": nn.BatchNorm2d(4)})
    )
    for layer in model.values():
        layer.debug = True
    name, channels = ("stem", 3) if rank == 0 else ("head", 4)
    return _expect_error(lambda: model[name](torch.randn(2, channels, 3, 3)))


def test_debug_mode_names_each_ranks_layer_when_they_differ(run_ranks):
    errors = run_ranks(_different_layers, 2)
    for error in errors:  # every rank raises, with the full picture
        assert error.startswith("RuntimeError: SyncBatchNorm expected every rank"), error
        assert "rank 0: forward of layer 'stem' (3 channels, torch.float32)" in error
        assert "rank 1: forward of layer 'head' (4 channels, torch.float32)" in error


def _conditional_computation() -> dict:
    """Rank 1 skips the optional block: without the check its collectives would pair with the
    wrong layer's. SYNCBN_DEBUG=1 in the environment turns the check on."""
    os.environ["SYNCBN_DEBUG"] = "1"
    try:
        model = syncbn.convert_sync_batchnorm(
            nn.ModuleDict({"optional": nn.BatchNorm1d(5), "always": nn.BatchNorm1d(5)})
        )
    finally:
        del os.environ["SYNCBN_DEBUG"]

    def step():
        x = torch.randn(4, 5, requires_grad=True)
        h = model["optional"](x) if dist.get_rank() == 0 else x
        model["always"](h).sum().backward()

    return {"debug": model["always"].debug, "error": _expect_error(step)}


def test_ranks_that_skip_a_layer_get_an_error_not_a_deadlock(run_ranks):
    results = run_ranks(_conditional_computation, 2, timeout=30)
    for result in results:
        assert result["debug"] is True
        error = result["error"]
        assert "rank 0: forward of layer 'optional'" in error, error
        assert "rank 1: forward of layer 'always'" in error, error
        assert "run the skipped layers on every rank" in error


def _non_finite(bad_rank: int) -> str:
    layer = SyncBatchNorm(3, check_finite=True)
    layer.layer_name = "encoder.bn1"
    x = torch.randn(4, 3, 2)
    if dist.get_rank() == bad_rank:
        x[1, 2, 0] = float("nan")
    return _expect_error(lambda: layer(x))


def test_nan_in_the_statistics_names_the_layer_and_the_rank_with_bad_input(run_ranks):
    errors = run_ranks(_non_finite, 2, 1)
    for rank, error in enumerate(errors):
        assert error.startswith("FloatingPointError: SyncBatchNorm expected finite batch"), error
        assert "'encoder.bn1'" in error and "channels [2]" in error
        assert ("NOT finite" in error) == (rank == 1)


def _non_finite_leaves_running_statistics(momentum: float | None) -> dict:
    """Rank 1's input holds a NaN: the check raises on both ranks, and neither rank's running
    statistics (non-trivial ones, after a finite batch) take in the NaN batch."""
    layer = SyncBatchNorm(3, momentum=momentum, check_finite=True)
    layer(torch.randn(4, 3, 2) * 2 + 1)  # finite: running statistics move away from 0 and 1
    before = (layer.running_mean.clone(), layer.running_var.clone())
    x = torch.randn(4, 3, 2)
    if dist.get_rank() == 1:
        x[1, 2, 0] = float("nan")
    return {
        "error": _expect_error(lambda: layer(x)),
        "before": before,
        "after": (layer.running_mean.clone(), layer.running_var.clone()),
    }


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_non_finite_statistics_leave_the_running_statistics_untouched(run_ranks, momentum):
    for r in run_ranks(_non_finite_leaves_running_statistics, 2, momentum):
        error = r["error"]
        assert error.startswith("FloatingPointError: SyncBatchNorm expected finite"), error
        assert torch.isfinite(r["before"][0]).all() and (r["before"][0] != 0).all()
        assert_close(r["after"], r["before"], rtol=0, atol=0)


def _finite_check_is_off_by_default() -> bool:
    layer = SyncBatchNorm(3)
    x = torch.randn(4, 3)
    x[0, 0] = float("inf")
    y = layer(x)
    return bool(torch.isnan(y[:, 0]).all()) and not layer.check_finite and not layer.debug


def test_checks_are_off_by_default(run_ranks):
    assert run_ranks(_finite_check_is_off_by_default, 2) == [True, True]


def _peer_never_arrives() -> str:
    if dist.get_rank() == 1:
        time.sleep(6)  # past the group's 3 s timeout: rank 0's collective cannot complete
        return "slept"
    layer = syncbn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(2)))
    return _expect_error(lambda: layer(torch.randn(3, 2)))


def test_a_collective_that_cannot_complete_fails_naming_the_layer(run_ranks):
    started = time.monotonic()
    error, slept = run_ranks(_peer_never_arrives, 2, timeout=3)
    assert slept == "slept"
    assert "SyncBatchNorm layer '0': the forward all_reduce of 6 values failed" in error, error
    assert "SYNCBN_DEBUG=1" in error
    assert time.monotonic() - started < 30


ON = ["1", "true", "TRUE", "True", " 1", "1\n", "yes", "ON"]
OFF = ["0", "", "false", "FALSE", " no", "Off"]


@pytest.mark.parametrize("env", ON + OFF)
def test_environment_flags(monkeypatch, env):
    monkeypatch.setenv("SYNCBN_DEBUG", env)
    monkeypatch.setenv("SYNCBN_CHECK_FINITE", env)
    layer = SyncBatchNorm(2)
    assert layer.debug == layer.check_finite == (env in ON)
    assert SyncBatchNorm(2, debug=False).debug is False


@pytest.mark.parametrize("name", ["SYNCBN_DEBUG", "SYNCBN_CHECK_FINITE"])
@pytest.mark.parametrize("env", ["2", "enabled", "ture", "-1"])
def test_environment_flags_reject_other_values(monkeypatch, name, env):
    """A misspelt flag is an error, not a debug mode silently left off."""
    monkeypatch.setenv(name, env)
    with pytest.raises(ValueError, match=rf"expected {name} to be 1/true/yes/on or 0/false/no/off"):
        SyncBatchNorm(2)
    SyncBatchNorm(2, debug=False, check_finite=False)  # an explicit argument does not read it


def _same_name_different_width() -> str:
    """Two layers that share a name but not a width: the fingerprint must compare widths, or
    the collectives of different sizes meet (gloo then aborts the process)."""
    width = 3 if dist.get_rank() == 0 else 4
    layer = SyncBatchNorm(width, debug=True)
    layer.layer_name = "shared.name"
    return _expect_error(lambda: layer(torch.randn(2, width)))


def test_debug_fingerprint_compares_channel_counts(run_ranks):
    for error in run_ranks(_same_name_different_width, 2):
        assert "rank 0: forward of layer 'shared.name' (3 channels" in error, error
        assert "rank 1: forward of layer 'shared.name' (4 channels" in error, error


def _backward_order_differs() -> str:
    """Forwards agree, backwards do not: rank 0 backpropagates through 'a' first, rank 1 through
    'b'. Both layers have the same width, so without a check before the backward collective the
    two layers' gradient sums would be silently swapped between ranks."""
    model = syncbn.convert_sync_batchnorm(
        nn.ModuleDict({"a": nn.BatchNorm1d(3), "b": nn.BatchNorm1d(3)})
    )
    for layer in model.values():
        layer.debug = True
    x = torch.randn(4, 3, requires_grad=True)
    outputs = {"a": model["a"](x), "b": model["b"](x)}
    first, second = ("a", "b") if dist.get_rank() == 0 else ("b", "a")

    def backward():
        outputs[first].square().sum().backward()
        outputs[second].square().sum().backward()

    return _expect_error(backward)


def test_debug_mode_checks_before_the_backward_collective(run_ranks):
    errors = run_ranks(_backward_order_differs, 2)
    for error in errors:
        assert "rank 0: backward of layer 'a'" in error, error
        assert "rank 1: backward of layer 'b'" in error, error


def _groups_run_different_layers() -> str:
    """Groups of 2 on 4 ranks: ranks {0, 1} run 'a', ranks {2, 3} run 'b'. Each group agrees
    with itself, so the fingerprint, gathered over the layer's group, finds nothing wrong."""
    group = syncbn.new_sync_group(2)
    model = syncbn.convert_sync_batchnorm(
        nn.ModuleDict({"a": nn.BatchNorm1d(3), "b": nn.BatchNorm1d(3)}), process_group=group
    )
    for layer in model.values():
        layer.debug = True
    name = "a" if dist.get_rank() < 2 else "b"
    return _expect_error(lambda: model[name](torch.randn(4, 3)).sum().backward())


def test_debug_fingerprint_is_gathered_over_the_layers_group(run_ranks):
    assert run_ranks(_groups_run_different_layers, 4) == ["no error"] * 4


def _diverges_inside_the_second_group() -> str:
    """Groups of 2 on 4 ranks: ranks 0 and 1 agree; in the group {2, 3}, rank 2 runs 'a' and
    rank 3 runs 'b'. The error must name them as ranks 2 and 3, not as positions 0 and 1."""
    group = syncbn.new_sync_group(2)
    model = syncbn.convert_sync_batchnorm(
        nn.ModuleDict({"a": nn.BatchNorm1d(3), "b": nn.BatchNorm1d(3)}), process_group=group
    )
    for layer in model.values():
        layer.debug = True
    name = "b" if dist.get_rank() == 3 else "a"
    return _expect_error(lambda: model[name](torch.randn(4, 3)))


def test_divergence_inside_a_group_names_global_ranks(run_ranks):
    errors = run_ranks(_diverges_inside_the_second_group, 4)
    assert errors[:2] == ["no error"] * 2
    for error in errors[2:]:
        assert "rank 2: forward of layer 'a'" in error, error
        assert "rank 3: forward of layer 'b'" in error, error
        assert "rank 0" not in error and "rank 1" not in error, error


def _infinite_variance() -> str:
    """float64 values of +-1e200: a finite mean (0) but an infinite variance (1e400)."""
    layer = SyncBatchNorm(2, check_finite=True, dtype=torch.float64)
    layer.layer_name = "huge"
    x = torch.randn(4, 2, dtype=torch.float64)
    x[:, 1] = torch.tensor([1e200, -1e200, 1e200, -1e200], dtype=torch.float64)
    return _expect_error(lambda: layer(x))


def test_check_finite_checks_the_variance_too(run_ranks):
    for error in run_ranks(_infinite_variance, 2):
        assert error.startswith("FloatingPointError: SyncBatchNorm expected finite batch"), error
        assert "'huge'" in error and "channels [1]" in error
