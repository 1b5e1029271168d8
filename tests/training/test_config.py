"""Configuration: the real conf/ composes under its schema, and every bad value fails before any
work with one message naming the key (Hydra for types and choices, config.checks for ranges)."""

from __future__ import annotations

import copy
import functools
import math
import re
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from syncbn.training.config import checks, reference, schema, validate
from syncbn.training.errors import ConfigError
from tests.support.config import compose_config, composition_error
from tests.support.launch import ROOT, command, env


def test_default_config_composes_and_validates():
    cfg = compose_config()
    assert (cfg.norm.name, cfg.data.name, cfg.logger.mode) == ("syncbn", "digits", "offline")
    validate(cfg, world_size=2, cuda=False)
    for overrides in (
        ["norm=bn", "optim=adamw", "data=synthetic"],
        ["data=cifar10", "norm=none"],
        ["data=imagefolder", "data.root=/somewhere", "model=resnet_cifar"],
        ["model=custom", "model._target_=tests.support.toy_models.TinyNet", "+model.width=4"],
    ):
        validate(compose_config(*overrides), world_size=1, cuda=False)


def test_task_segmentation_brings_its_data_model_and_defaults_and_the_command_line_wins():
    cfg = compose_config("task=segmentation")
    assert (cfg.task.name, cfg.data.name) == ("segmentation", "digit_scenes")
    assert cfg.optim.name == "adamw"
    assert cfg.model._target_ == "syncbn.training.models.DeepLab"
    assert (cfg.trainer.batch_size, cfg.trainer.best_metric) == (4, "miou")
    validate(cfg, world_size=2, cuda=False)
    cfg = compose_config("task=segmentation", "optim=sgd", "trainer.batch_size=1")
    assert (cfg.optim.name, cfg.trainer.batch_size) == ("sgd", 1)


def test_every_key_of_every_yaml_file_is_commented():
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            top_level_key = line and not line.startswith((" ", "#", "-")) and ":" in line
            if top_level_key and not line.startswith(("defaults:", "hydra:")):
                assert "#" in line, f"{path.relative_to(ROOT)}:{number} has no comment: {line}"


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("optim.lr=abc", "optim.lr", "could not be converted to Float"),
        ("trainer.compile=no_thanks", "trainer.compile", "is not a valid bool"),
        ("dist.backend=mpi", "dist.backend", "expected one of [auto, nccl, gloo]"),
        ("norm.name=groupnorm", "norm.name", "expected one of [syncbn, bn, none]"),
        ("logger.mode=cloud", "logger.mode", "expected one of [offline, online, disabled]"),
        ("trainer.nonfinite=ignore", "trainer.nonfinite", "expected one of [stop, skip]"),
        ("trainer.max_steps=ten", "trainer.max_steps", "could not be converted to Integer"),
        ("trainer.ckpt_every_step=5", "ckpt_every_step", "not in 'TrainerConfig'"),  # typo
        ("trainer.precision=fp16", "trainer.precision", "expected one of [fp32, bf16]"),
        ("task.name=detection", "task.name", "expected one of [classification, segmentation]"),
        ("loader.workers=two", "loader.workers", "could not be converted to Integer"),
    ],
)
def test_wrong_types_and_choices_fail_while_composing_naming_the_key(override, key, expected):
    message = composition_error(override)
    assert key in message and expected in message, message


BAD_VALUES = [
    ("trainer.max_steps=-1", r"trainer.max_steps expected > 0 or null \(got -1\)"),
    ("optim.lr=inf", r"optim.lr expected a finite number > 0 \(got inf\)"),
    ("optim.lr=nan", r"optim.lr expected a finite number > 0 \(got nan\)"),
    ("optim.lr=0", r"optim.lr expected a finite number > 0 \(got 0.0\)"),
    ("trainer.grad_clip=-1", r"trainer.grad_clip expected a finite max norm > 0 or null"),
    ("trainer.log_every=0", r"trainer.log_every expected > 0 \(got 0\)"),
    ("data.val_fraction=0", r"data.val_fraction expected a fraction in \(0, 1\) \(got 0.0\)"),
    ("data.val_fraction=1", r"data.val_fraction expected a fraction in \(0, 1\) \(got 1.0\)"),
    ("dist.timeout_s=0", r"dist.timeout_s expected a finite number of seconds > 0 \(got 0.0\)"),
    ("dist.backend=nccl", r"dist.backend=nccl expected CUDA GPUs .* use dist.backend=auto"),
    ("trainer.batch_size=0", r"trainer.batch_size expected > 0 \(got 0\)"),
    ("trainer.epochs=0", r"trainer.epochs expected > 0 \(got 0\); or set trainer.max_steps"),
    ("trainer.ckpt_every_steps=0", r"trainer.ckpt_every_steps expected > 0 or null"),
    ("trainer.keep_last=0", r"trainer.keep_last expected > 0 \(got 0\)"),
    ("trainer.precise_bn_batches=0", r"trainer.precise_bn_batches expected > 0 or null"),
    ("trainer.bn_telemetry_every=-1", r"trainer.bn_telemetry_every expected > 0 or null"),
    ("optim.momentum=1.5", r"optim.momentum expected a number in \[0, 1\)"),
    ("optim.warmup_steps=-1", r"optim.warmup_steps expected >= 0"),
    ("norm.group_size=3", r"norm.group_size expected a divisor of the world size 2"),
    ("trainer.resume=/no/such.pt", r"trainer.resume expected a checkpoint file"),
    ("trainer.eval_only=true", r"trainer.eval_only=true expected a checkpoint .*resume=null"),
    ("model.widths=[]", r"model.widths expected a non-empty list"),
    ("trainer.accumulate=3", r"trainer.accumulate expected a divisor of trainer.batch_size=32"),
    ("trainer.sync_every=0", r"trainer.sync_every expected > 0 \(got 0\)"),
    ("trainer.eval_batch_size=0", r"trainer.eval_batch_size expected > 0 \(got 0\)"),
    ("loader.workers=-1", r"loader.workers expected >= 0 \(got -1\)"),
    ("task.label_smoothing=1.0", r"task.label_smoothing expected a number in \[0, 1\)"),
    ("task.ignore_index=3", r"task.ignore_index expected data.ignore_index=255"),
    ("dist.init_method=/tmp/x", r"dist.init_method expected null, file:///path"),
    ("data.digit_scale=[3,9]", r"data.digit_scale expected digits .* fit the 64-pixel canvas"),
    ("data.rim=[8,3]", r"data.rim expected \[low, high\] with 0 < low <= high"),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_are_rejected_before_work_naming_the_key(override, message):
    overrides = [override] + (["trainer.resume=null"] if "eval_only" in override else [])
    if override.startswith(("task.ignore", "data.digit", "data.rim")):
        overrides.insert(0, "task=segmentation")
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(*overrides), world_size=2, cuda=False)


def test_w_and_b_start_must_be_bounded_below_the_collective_timeout():
    cfg = compose_config("logger.mode=online", "logger.init_timeout_s=60", "dist.timeout_s=30")
    with pytest.raises(ConfigError, match=r"logger.init_timeout_s expected less than dist"):
        validate(cfg, world_size=2, cuda=False)
    validate(cfg, world_size=1, cuda=False)  # nobody waits for rank 0


def test_several_bad_values_are_reported_together():
    cfg = compose_config("optim.lr=inf", "trainer.log_every=0", "dist.timeout_s=0")
    with pytest.raises(ConfigError) as caught:
        validate(cfg, world_size=1, cuda=False)
    lines = str(caught.value).splitlines()
    assert lines[0] == "bad configuration:" and len(lines) == 4, lines
    assert [line.split()[1] for line in lines[1:]] == [
        "trainer.log_every",
        "optim.lr",
        "dist.timeout_s",
    ]


@pytest.mark.slow
def test_a_bad_value_under_torchrun_ends_every_rank_with_one_line_and_exit_78(tmp_path):
    cmd = command(tmp_path / "run", "trainer.max_steps=-1", nproc=2)
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    lines = [line for line in output.splitlines() if "trainer.max_steps expected > 0" in line]
    assert sorted(line.split(":")[0] for line in lines) == ["train.py", "train.py (rank 1)"]
    assert output.count("exitcode  : 78") >= 1, output  # torchrun's summary: the workers' code
    assert "syncbn/training" not in output, output  # no traceback from our code
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_wrong_type_exits_78_naming_the_key(tmp_path):
    cmd = command(tmp_path / "run", "optim.lr=abc")
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 78, done.stderr
    assert "optim.lr" in done.stderr and "could not be converted to Float" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_yaml_files_set_exactly_the_keys_their_schema_declares():
    for group in reference.GROUPS:
        for choice, (schema_class, values) in reference.group_files(group).items():
            declared = {f.name for f in fields(schema_class)}
            assert set(values) == declared, (f"conf/{group}/{choice}.yaml", set(values) ^ declared)


def test_docs_training_md_key_reference_is_generated_from_the_current_schema_and_conf():
    text = reference.DOC.read_text()
    assert reference.rewrite(text) == text, (
        "docs/training.md's key reference is stale: run "
        "`python -m syncbn.training.config.reference --write`"
    )
    for group in reference.GROUPS:  # every key of every group has a row
        for schema_class, _ in reference.group_files(group).values():
            for f in fields(schema_class):
                assert f"| `{group}.{f.name}` |" in text, f"{group}.{f.name}"


# ------------------------------------------------------------------------ range boundaries


@functools.cache
def _composed(*overrides: str):
    return compose_config(*overrides)


def _with(key: str, value, *overrides: str):
    """The real config (composed once per ``overrides``) with ``key`` set to ``value``."""
    cfg = copy.deepcopy(_composed(*overrides))
    OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _rejections(cfg, world_size: int = 2) -> str:
    """What validate() says about ``cfg``: its ConfigError's message, "" when all is well."""
    try:
        validate(cfg, world_size=world_size, cuda=False)
    except ConfigError as error:
        return str(error)
    return ""


def below(x: float) -> float:
    return math.nextafter(x, -math.inf)


def above(x: float) -> float:
    return math.nextafter(x, math.inf)


def schema_boundaries(metadata) -> list[tuple[object, bool]]:
    """The values at the edges of a range :func:`schema.key` declares: (value, accepted)."""
    bound, at_most, at_least = metadata["range"], metadata["at_most"], metadata["at_least"]
    if bound == schema.SECONDS:
        if at_least:
            cases = [(below(float(at_least)), False), (float(at_least), True)]
        else:
            cases = [(below(0.0), False), (0.0, False), (above(0.0), True)]
        cases.append((math.inf, False))
        if at_most is not None:
            cases += [(float(at_most), True), (above(float(at_most)), False)]
        return cases
    cases = [(-1, False), (0, False), (1, True)]
    if bound == schema.POSITIVE_OR_NULL:
        cases.append((None, True))
    if at_most is not None:
        cases += [(int(at_most), True), (int(at_most) + 1, False)]
    return cases


def _schema_groups():
    """(group, schema class, the overrides composing a config that uses it) for every group."""
    yield "task", schema.TaskConfig, ()
    for (group, name), cls in schema.GROUPS.items():
        choice = name.removeprefix("schema_")
        if group != "data":
            yield group, cls, ()
        elif choice == "digit_scenes":  # the segmentation task's data
            yield group, cls, ("task=segmentation",)
        else:
            yield group, cls, (f"data={choice}",)


RANGED = [
    (f"{group}.{f.name}", f.metadata, overrides)
    for group, cls, overrides in _schema_groups()
    for f in fields(cls)
    if f.metadata["range"]
]
SCHEMA_CASES = [
    pytest.param(key, value, accepted, overrides, id=f"{key}={value}")
    for key, metadata, overrides in RANGED
    for value, accepted in schema_boundaries(metadata)
]


def test_every_bound_the_schema_can_declare_is_in_use():
    assert {metadata["range"] for _, metadata, _ in RANGED} == set(schema.RANGES)


@pytest.mark.parametrize(("key", "value", "accepted", "overrides"), SCHEMA_CASES)
def test_every_range_the_schema_states_is_checked_at_its_boundary(key, value, accepted, overrides):
    """Generated from the schema: a key declared with a bound (and its upper and lower limits)
    gets these cases for free."""
    said = _rejections(_with(key, value, *overrides))
    if accepted:
        assert f"{key} expected" not in said, said
    else:
        assert f"{key} expected" in said, f"{key}={value} was accepted"


def _pair(low, high) -> list:
    return [low, high]


# The ranges config/checks.py checks by hand (their own message and fix), at their boundaries:
# (key, [(value, accepted), ...], the overrides composing a config that has the key).
SEG = ("task=segmentation",)
FOLDER = ("data=imagefolder", "data.root=/somewhere")
SYNTH = ("data=synthetic",)
POSITIVE_FLOAT = [(below(0.0), False), (0.0, False), (above(0.0), True), (math.inf, False)]
HAND_RANGES = [
    ("trainer.epochs", [(-1, False), (0, False), (1, True)], ()),
    ("trainer.max_steps", [(-1, False), (0, False), (1, True), (None, True)], ()),
    ("trainer.grad_clip", [*POSITIVE_FLOAT, (None, True)], ()),
    (
        "optim.lr",
        [
            (below(0.0), False),
            (0.0, False),
            (above(0.0), True),
            (math.inf, False),
            (math.nan, False),
        ],
        (),
    ),
    ("optim.weight_decay", [(below(0.0), False), (0.0, True), (math.inf, False)], ()),
    ("optim.momentum", [(below(0.0), False), (0.0, True), (below(1.0), True), (1.0, False)], ()),
    (
        "optim.betas",
        [
            (_pair(below(0.0), 0.9), False),
            (_pair(0.0, 0.0), True),
            (_pair(0.9, below(1.0)), True),
            (_pair(0.9, 1.0), False),
            (_pair(1.0, 0.9), False),
            ([0.9], False),
        ],
        (),
    ),
    ("optim.warmup_steps", [(-1, False), (0, True)], ()),
    (
        "optim.min_lr_ratio",
        [(below(0.0), False), (0.0, True), (1.0, True), (above(1.0), False)],
        (),
    ),
    (
        "task.label_smoothing",
        [(below(0.0), False), (0.0, True), (below(1.0), True), (1.0, False)],
        (),
    ),
    (
        "data.val_fraction",
        [(0.0, False), (above(0.0), True), (below(1.0), True), (1.0, False)],
        (),
    ),
    ("data.augment_shift", [(-1, False), (0, True)], ()),
    *[
        (f"data.{k}", [(-1, False), (0, False), (1, True)], SYNTH)
        for k in ("num_samples", "image_size", "channels")
    ],
    ("data.num_classes", [(1, False), (2, True)], SYNTH),
    *[
        (f"data.{k}", [(-1, False), (0, False), (1, True)], SEG)
        for k in ("canvas", "num_train", "num_val")
    ],
    ("data.pad", [(-1, False), (0, True)], FOLDER),
    (
        "data.scale",
        [
            (_pair(0.0, 1.0), False),
            (_pair(above(0.0), 1.0), True),
            (_pair(0.5, below(0.5)), False),
            (_pair(0.5, 0.5), True),
            (_pair(0.5, above(1.0)), False),
        ],
        FOLDER,
    ),
    (
        "data.ratio",
        [
            (_pair(0.0, 1.0), False),
            (_pair(above(0.0), 1.0), True),
            (_pair(2.0, below(2.0)), False),
            (_pair(2.0, 2.0), True),
        ],
        FOLDER,
    ),
    (
        "data.resize_ratio",
        [(0.0, False), (above(0.0), True), (1.0, True), (above(1.0), False)],
        FOLDER,
    ),
    (
        "data.std",
        [([below(0.0), 1.0, 1.0], False), ([0.0, 1.0, 1.0], False), ([above(0.0), 1.0, 1.0], True)],
        FOLDER,
    ),
    (
        "data.digits_per_image",
        [(_pair(0, 1), False), (_pair(1, 1), True), (_pair(2, 1), False)],
        SEG,
    ),
    # the 64-pixel canvas holds 8 x 8-pixel digits: scale 8, not 9
    (
        "data.digit_scale",
        [
            (_pair(0, 1), False),
            (_pair(1, 1), True),
            (_pair(2, 1), False),
            (_pair(1, 8), True),
            (_pair(1, 9), False),
        ],
        SEG,
    ),
    (
        "data.rim",
        [
            (_pair(0.0, 3.0), False),
            (_pair(above(0.0), 3.0), True),
            (_pair(8.0, below(8.0)), False),
            (_pair(8.0, 8.0), True),
        ],
        SEG,
    ),
    ("model.widths", [([], False), ([0], False), ([1], True), ([1, 0], False)], ()),
    ("model.blocks_per_stage", [(-1, False), (0, False), (1, True)], ()),
    ("model.init_scale", [(0.0, False), (above(0.0), True), (math.inf, False)], ()),
    ("loader.workers", [(-1, False), (0, True)], ()),
    # dist.timeout_s, dist.orphan_grace_s, logger.init_timeout_s: ranges stated by the schema
    # online on 2 ranks: below dist.timeout_s (300), not at it
    (
        "logger.init_timeout_s",
        [(below(300.0), True), (300.0, False)],
        ("logger.mode=online", "dist.timeout_s=300"),
    ),
    # a divisor of the world size, 2
    (
        "norm.group_size",
        [(-1, False), (0, False), (1, True), (2, True), (3, False), (4, False), (None, True)],
        (),
    ),
]
HAND_CASES = [
    pytest.param(key, value, accepted, overrides, id=f"{key}={value}")
    for key, cases, overrides in HAND_RANGES
    for value, accepted in cases
]


@pytest.mark.parametrize(("key", "value", "accepted", "overrides"), HAND_CASES)
def test_every_hand_written_range_check_holds_at_its_boundary(key, value, accepted, overrides):
    said = _rejections(_with(key, value, *overrides))
    assert (f"{key} expected" not in said) == accepted, said or "accepted"


# The keys config/checks.py names in a message that are not ranges (choices, paths, pairs of keys).
NOT_RANGES = {"trainer.resume", "trainer.eval_only", "trainer.accumulate", "dist.backend",
              "dist.init_method", "model._target_", "task.ignore_index", "data.mean"}  # fmt: skip


def test_every_key_checks_py_names_has_boundary_cases():
    """A new hand-written check gets a row in HAND_RANGES (or NOT_RANGES), so its boundary is
    tested too. Keys are read from the messages, and from the ``for key in (...)`` loops."""
    source = Path(checks.__file__).read_text()
    named = set(re.findall(r'"([a-z]+\.[a-z_]+)(?:=\w+)? expected', source))
    named |= set(re.findall(r'\("([a-z]+\.[a-z_]+)", ', source))  # ("dist.timeout_s", value)
    loops = re.findall(r'for key in \(([^)]*)\):\n.*?"([a-z]+)\.\{key\}', source, flags=re.S)
    for keys, group in loops:  # for key in ("num_samples", ...): ... f"data.{key} expected"
        named |= {f"{group}.{k}" for k in re.findall(r'"(\w+)"', keys)}
    hand = {key for key, _, _ in HAND_RANGES}
    schema_ranged = {key for key, _, _ in RANGED}
    assert len(named) > 30, sorted(named)  # the patterns still read checks.py
    assert named - hand - schema_ranged - NOT_RANGES == set()
