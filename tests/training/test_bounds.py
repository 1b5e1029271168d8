"""Values past any sane range are configuration errors (exit 78) naming the key, not tracebacks:
upper bounds in the schema, the in-memory dataset's size against the memory available, and a
checkpoint whose tensors do not fit the model built from the config."""

from __future__ import annotations

import pytest

from syncbn.training import ConfigError, data, loop
from syncbn.training.config import validate
from syncbn.training.data import memory
from tests.support.config import compose_config


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "trainer.sync_every=10000000000",
            "trainer.sync_every expected > 0 and <= 10000 (got 10000000000)",
        ),
        ("dist.timeout_s=1e300", "dist.timeout_s expected at most 604800 seconds (got 1e+300)"),
        ("dist.timeout_s=1e-7", "dist.timeout_s expected at least 1 second (got 1e-07)"),
        ("dist.orphan_grace_s=1e300", "dist.orphan_grace_s expected at most 3600 seconds"),
        ("logger.init_timeout_s=1e300", "logger.init_timeout_s expected at most 3600 seconds"),
    ],
)
def test_values_past_any_sane_range_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as caught:
        validate(compose_config(override), world_size=1, cuda=False)
    assert message in str(caught.value)


def test_an_in_memory_dataset_larger_than_the_memory_is_refused_before_allocating(monkeypatch):
    cfg = compose_config("data=synthetic", "data.num_samples=2000", "data.image_size=64")
    monkeypatch.setattr(memory, "available_bytes", lambda: 10 * 2**20)  # 10 MiB free
    with pytest.raises(ConfigError) as caught:
        data.load(cfg.data)
    message = str(caught.value)
    assert "data.num_samples x data.channels x data.image_size^2" in message, message
    assert "10 MiB available" in message, message
    monkeypatch.undo()  # this machine's real memory: 983 GB is more than any test machine has
    big = compose_config("data=synthetic", "data.num_samples=20000000", "data.image_size=64")
    with pytest.raises(ConfigError, match="expected to fit in memory"):
        data.load(big.data)


def test_eval_only_on_data_the_model_was_not_built_for_names_the_key(tmp_path):
    base = [f"run_dir={tmp_path}", "logger.mode=disabled", "trainer.progress=false"]
    assert loop.run(compose_config(*base, "trainer.max_steps=1")).exit_code == 0
    checkpoint = tmp_path / "checkpoints" / "last.pt"
    other = compose_config(
        *base, "data=synthetic", "data.channels=3", "data.num_classes=4", "data.image_size=8",
        "data.num_samples=64", "trainer.eval_only=true", f"trainer.resume={checkpoint}",
    )  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        loop.run(other)
    message = str(caught.value)
    assert "checkpoint" in message and "features.0.weight" in message, message
    assert "[32, 1, 3, 3]" in message and "[32, 3, 3, 3]" in message, message
