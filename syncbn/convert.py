"""Swap BatchNorm layers for SyncBatchNorm in a model, and back, without changing what it computes.

A ``_BatchNorm`` subclass may compute more than batch normalization: timm's ``BatchNormAct2d``
applies an activation in its own ``forward``. Replacing it by a plain SyncBatchNorm, as
``nn.SyncBatchNorm.convert_sync_batchnorm`` does, silently drops the activation. Here every layer
is converted by a *converter* looked up in a registry by the layer's class:

- ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, and every ``_BatchNorm`` subclass that keeps
  ``_BatchNorm.forward`` (overriding ``_check_input_dim`` or ``__init__`` changes no output)
  become :class:`syncbn.SyncBatchNorm`;
- timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` (matched by module and class name, so timm
  is never imported) become :class:`syncbn.SyncBatchNormAct`, keeping ``drop`` and ``act``;
- classes registered with :func:`register_converter` use their converter;
- any other subclass with a ``forward`` of its own is refused before anything is changed, with an
  error naming each such layer's path and class, unless ``strict=False`` (then it is left as it
  is, unsynchronized, with a warning).

A class's converter also serves its subclasses as long as they do not override ``forward``.
:func:`revert_sync_batchnorm` works the same way with a registry of reverters.

Imports point one way: :mod:`syncbn.batchnorm` <- :mod:`syncbn.norm_act` <- this module. The
layer does not know how models are converted, so ``SyncBatchNorm.convert_sync_batchnorm`` (kept
for parity with ``nn.SyncBatchNorm.convert_sync_batchnorm``) is defined here and attached to the
class when this module is imported. ``syncbn/__init__.py`` imports this module, and Python runs
``syncbn/__init__.py`` before any ``syncbn.*`` submodule, so the classmethod is there wherever
``SyncBatchNorm`` can be reached (``tests/layer/test_imports.py`` checks both).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from .batchnorm import SyncBatchNorm
from .distributed import as_process_group

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
from .norm_act import BatchNormAct, SyncBatchNormAct

__all__ = [
    "BatchNormNd",
    "convert_sync_batchnorm",
    "register_converter",
    "register_reverter",
    "revert_sync_batchnorm",
    "to_batchnorm",
    "to_batchnorm_act",
    "to_sync_batchnorm",
    "to_sync_batchnorm_act",
]

Converter = Callable[[nn.Module, "ProcessGroup | None"], nn.Module]
Reverter = Callable[[nn.Module], nn.Module]

# class, or "module.QualName" for classes we must not import (timm) -> function
_CONVERTERS: dict[type | str, Converter] = {}
_REVERTERS: dict[type | str, Reverter] = {}

_TIMM_MODULES = ("timm.layers.norm_act", "timm.models.layers.norm_act")  # timm >= 0.9, older


class BatchNormNd(_BatchNorm):
    """Plain ``nn.BatchNorm`` for input of any rank >= 2: what a SyncBatchNorm of unknown origin
    reverts to (SyncBatchNorm accepts every rank, so no single BatchNorm1d/2d/3d fits it)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"BatchNormNd expected input of at least 2 dimensions (N, C, *) "
                f"(got {input.dim()}D input of shape {tuple(input.shape)})"
            )


# ---------------------------------------------------------------------------- public API


def convert_sync_batchnorm(
    module: nn.Module,
    process_group: ProcessGroup | DeviceMesh | None = None,
    *,
    strict: bool = True,
    mesh_dim: int | str | None = None,
) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` with its synchronized equivalent, recursively.

    Plain layers (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, subclasses that keep
    ``_BatchNorm.forward``) become :class:`SyncBatchNorm`; timm's ``BatchNormAct2d`` becomes
    :class:`SyncBatchNormAct` with the same ``drop`` and ``act`` modules; classes registered with
    :func:`register_converter` use their converter (module docstring: the rules). The new layers
    share the *same* parameter and buffer tensors (an optimizer built before the conversion keeps
    working) and keep the training flag, ``qconfig``, the hyper-parameters and the module hooks
    registered on the old layer. A layer that appears several times in the model is converted once.
    The root itself may be a BatchNorm layer; the converted module is returned (use the return
    value). Existing :class:`SyncBatchNorm` layers are left as they are.

    Any other ``_BatchNorm`` subclass with its own ``forward`` has no known synchronized
    equivalent: converting it to a plain SyncBatchNorm would silently change what the model
    computes. Such layers raise a ``TypeError`` naming their paths and classes *before* anything
    is converted, unless ``strict=False``.

    Args:
        module: the model (or layer) to convert, in place where possible.
        process_group: group to synchronize over (``None``: the world), or a ``DeviceMesh``
            (FSDP2, HSDP, 2-D parallelism) whose dimension ``mesh_dim`` is that group.
            Default: ``None``
        strict: refuse layers without a converter. ``False`` leaves them unconverted (plain,
            per-rank BatchNorm with their own ``forward``) and warns naming them. Default: ``True``
        mesh_dim: with a ``DeviceMesh``, the index or name of its data-parallel dimension (not
            needed for a 1-D mesh). Default: ``None``

    Example::

        >>> model = convert_sync_batchnorm(model, process_group=new_sync_group(8))
        >>> model = convert_sync_batchnorm(model, mesh, mesh_dim="dp")  # a ("dp", "tp") mesh
    """
    process_group = as_process_group(process_group, mesh_dim)  # a DeviceMesh's dimension
    converted = _replace(
        module,
        candidate=lambda m: isinstance(m, _BatchNorm) and not isinstance(m, SyncBatchNorm),
        registry=_CONVERTERS,
        apply=lambda fn, m: fn(m, process_group),
        strict=strict,
        caller="convert_sync_batchnorm",
        hint=(
            "register one with syncbn.register_converter(cls, fn), e.g. "
            "syncbn.register_converter(cls, syncbn.convert.to_sync_batchnorm_act) for a norm + "
            "activation layer whose forward is BN, then self.drop, then self.act"
        ),
    )
    for name, layer in converted.named_modules():
        if isinstance(layer, SyncBatchNorm):
            layer.layer_name = name or type(layer).__name__  # its path, for error messages
    return converted


def revert_sync_batchnorm(
    module: nn.Module, bn_class: type[_BatchNorm] | None = None, *, strict: bool = True
) -> nn.Module:
    """Replace every SyncBatchNorm (ours or ``nn.SyncBatchNorm``) with a plain equivalent.

    The inverse of :func:`convert_sync_batchnorm`: a layer converted from ``nn.BatchNorm2d`` comes
    back as ``nn.BatchNorm2d``, one converted from timm's ``BatchNormAct2d`` as that class with the
    same ``drop`` and ``act``; a :class:`SyncBatchNorm` of unknown origin becomes
    :class:`BatchNormNd` (any input rank), a :class:`SyncBatchNormAct` (or timm's
    ``SyncBatchNormAct``) of unknown origin :class:`BatchNormAct`. Parameters, buffers and module
    hooks are shared, not copied. The result runs and exports without ``torch.distributed``.

    A SyncBatchNorm subclass with its own ``forward`` and no reverter registered with
    :func:`register_reverter` raises a ``TypeError`` naming its path and class before anything is
    reverted, unless ``strict=False`` (then it is left as it is, with a warning).

    Args:
        module: the model to revert.
        bn_class: force this BatchNorm class for every reverted *plain* SyncBatchNorm layer; layers
            with an activation keep theirs and revert as described above. Default: ``None``
        strict: refuse layers without a reverter (``False``: leave them, warn). Default: ``True``
    """

    def apply(fn, layer):
        return fn(layer, bn_class) if fn is to_batchnorm else fn(layer)

    return _replace(
        module,
        candidate=lambda m: isinstance(m, SyncBatchNorm | nn.SyncBatchNorm),
        registry=_REVERTERS,
        apply=apply,
        strict=strict,
        caller="revert_sync_batchnorm",
        hint="register one with syncbn.register_reverter(cls, fn)",
    )


def register_converter(cls: type[_BatchNorm] | str, fn: Converter | None = None):
    """Tell :func:`convert_sync_batchnorm` how to synchronize layers of class ``cls``.

    ``fn(module, process_group)`` returns the synchronized layer that replaces ``module``; it owns
    the layer's whole subtree (its children are not converted again). The converter also serves
    subclasses of ``cls`` that do not override ``forward``; registering a class replaces its
    previous converter. Building blocks: :func:`to_sync_batchnorm` (plain SyncBatchNorm) and
    :func:`to_sync_batchnorm_act` (a layer with ``drop`` and ``act`` submodules). Give
    :func:`register_reverter` the inverse if the result is not a :class:`SyncBatchNorm` or
    :class:`SyncBatchNormAct` (whose reverters restore the original class on their own).

    Args:
        cls: a ``_BatchNorm`` subclass, or its ``"module.QualName"`` to match a class without
            importing its package.
        fn: the converter; leave it out to use ``register_converter`` as a decorator.

    Examples::

        >>> syncbn.register_converter(MyBNAct, syncbn.convert.to_sync_batchnorm_act)
        >>> @syncbn.register_converter(ScaledBN)
        ... def to_sync(module, process_group):
        ...     return SyncScaledBN.from_layer(module, process_group)
    """
    return _register(_CONVERTERS, "register_converter", cls, fn, base=_BatchNorm)


def register_reverter(cls: type[nn.Module] | str, fn: Reverter | None = None):
    """Tell :func:`revert_sync_batchnorm` how to turn synchronized layers of class ``cls`` back.

    ``fn(module)`` returns the plain layer that replaces ``module`` (and its subtree). Needed only
    for synchronized classes of your own whose ``forward`` differs from :class:`SyncBatchNorm`'s
    and :class:`SyncBatchNormAct`'s. Use it like :func:`register_converter`.
    """
    return _register(
        _REVERTERS, "register_reverter", cls, fn, base=(SyncBatchNorm, nn.SyncBatchNorm)
    )


# ---------------------------------------------------------------------------- converters


def to_sync_batchnorm(module: _BatchNorm, process_group: ProcessGroup | None) -> SyncBatchNorm:
    """A :class:`SyncBatchNorm` sharing ``module``'s tensors: the converter of plain layers.

    Registered for a class with its own ``forward``, it reproduces only the normalization.
    """
    new = _swap(module, SyncBatchNorm, process_group=process_group)
    if not isinstance(module, nn.SyncBatchNorm):
        new._syncbn_source_class = type(module)  # lets revert_sync_batchnorm restore it exactly
    return new


def to_sync_batchnorm_act(
    module: _BatchNorm, process_group: ProcessGroup | None
) -> SyncBatchNormAct:
    """A :class:`SyncBatchNormAct` sharing ``module``'s tensors and its ``drop`` and ``act``.

    The converter of timm's ``BatchNormAct2d``: for any layer whose ``forward`` is batch norm,
    then ``self.drop`` (if it has one), then ``self.act``.
    """
    drop, act = _drop_and_act(module)
    new = _swap(module, SyncBatchNormAct, process_group=process_group)
    new.drop, new.act = drop, act
    if not isinstance(module, nn.SyncBatchNorm):
        new._syncbn_source_class = type(module)
    return new


def to_batchnorm(module: _BatchNorm, bn_class: type[_BatchNorm] | None = None) -> _BatchNorm:
    """The plain layer a :class:`SyncBatchNorm` came from (else :class:`BatchNormNd`)."""
    target = bn_class or getattr(module, "_syncbn_source_class", None) or BatchNormNd
    return _swap(module, target)


def to_batchnorm_act(module: _BatchNorm) -> _BatchNorm:
    """The layer a :class:`SyncBatchNormAct` came from (else :class:`BatchNormAct`), same act."""
    drop, act = _drop_and_act(module)
    target = getattr(module, "_syncbn_source_class", None) or BatchNormAct
    new = _swap(module, target)
    if not (hasattr(new, "drop") or isinstance(drop, nn.Identity)):
        raise TypeError(
            f"revert_sync_batchnorm expected {target.__qualname__} to have a drop submodule for "
            f"the layer's {type(drop).__name__} (got none); register a reverter"
        )
    if hasattr(new, "drop"):
        new.drop = drop
    new.act = act
    return new


# ---------------------------------------------------------------------------- machinery


def _register(registry, caller: str, cls, fn, base):
    if isinstance(cls, str):
        if "." not in cls:
            raise ValueError(
                f'{caller} expected a class or its "module.QualName" (got {cls!r}); e.g. '
                f'"timm.layers.norm_act.BatchNormAct2d"'
            )
    elif not (isinstance(cls, type) and issubclass(cls, base)):
        names = " or ".join(b.__name__ for b in (base if isinstance(base, tuple) else (base,)))
        raise TypeError(f"{caller} expected a subclass of {names} (got {cls!r})")

    def register(function):
        if not callable(function):
            raise TypeError(f"{caller} expected a callable (got {type(function).__name__})")
        registry[cls] = function
        return function

    return register if fn is None else register(fn)


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _lookup(registry, cls: type):
    """The function registered for ``cls`` or the nearest base class it inherits ``forward`` from.

    A subclass that overrides ``forward`` computes something else: it needs its own entry.
    """
    for base in cls.__mro__:
        fn = registry.get(base) or registry.get(_dotted(base))
        if fn is not None:
            return fn if cls.forward is base.forward else None
    return None


def _replace(root, *, candidate, registry, apply, strict: bool, caller: str, hint: str):
    """Plan every replacement (and refuse) first, then apply them: an error changes nothing."""
    plan: dict[int, tuple[nn.Module, Callable]] = {}
    unknown: list[str] = []

    def visit(module: nn.Module, path: str) -> None:
        if candidate(module):
            if id(module) in plan:
                return
            fn = _lookup(registry, type(module))
            if fn is None:
                unknown.append(f"{path or '(root)'!r} ({_dotted(type(module))})")
            else:
                _check_swappable(module, path, caller)
                plan[id(module)] = (module, fn)
            return  # a layer's converter owns its subtree; an unknown layer stays as it is
        for name, child in _children(module):
            visit(child, f"{path}.{name}" if path else name)

    visit(root, "")
    if unknown:
        message = (
            f"{caller} expected only layers it can replace without changing what they compute "
            f"(got {', '.join(unknown)}: a forward of their own and no registered function)"
        )
        if strict:
            raise TypeError(
                f"{message}; {hint}, or pass strict=False to leave these layers as they are"
            )
        warnings.warn(f"{message}; left them unchanged (strict=False)", stacklevel=3)

    done: dict[int, nn.Module] = {}

    def rebuild(module: nn.Module) -> nn.Module:
        if id(module) in plan:
            if id(module) not in done:
                old, fn = plan[id(module)]
                new = apply(fn, old)
                if not isinstance(new, nn.Module):
                    raise TypeError(
                        f"{caller} expected {getattr(fn, '__qualname__', fn)} to return an "
                        f"nn.Module (got {type(new).__name__})"
                    )
                done[id(module)] = new
            return done[id(module)]
        if candidate(module):
            return module  # unknown, strict=False
        for name, child in _children(module):
            new = rebuild(child)
            if new is not child:
                module.add_module(name, new)
        return module

    return rebuild(root)


def _children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every child slot, also a module held twice (``named_children`` lists it once)."""
    return [(name, child) for name, child in module._modules.items() if child is not None]


def _check_swappable(module: _BatchNorm, path: str, caller: str) -> None:
    where = f"{path or '(root)'!r} ({type(module).__name__})"
    tensors = (*module.parameters(recurse=False), *module.buffers(recurse=False))
    if any(is_lazy(t) for t in tensors):
        raise ValueError(
            f"{caller} expected initialized parameters (got an uninitialized layer {where}); run "
            f"one forward pass before converting"
        )
    if parametrize.is_parametrized(module):
        raise ValueError(
            f"{caller} expected plain parameters (got parametrized ones in {where}); call "
            f"torch.nn.utils.parametrize.remove_parametrizations on it first"
        )


def _drop_and_act(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The ``drop`` and ``act`` submodules of a norm + act layer; a missing one is an identity.

    (timm before 0.6 had no ``drop``; timm's ``SyncBatchNormAct`` applies each only if present.)
    """
    parts = []
    for name in ("drop", "act"):
        part = getattr(module, name, None)
        part = nn.Identity() if part is None else part
        if not isinstance(part, nn.Module):
            raise TypeError(
                f"to_sync_batchnorm_act expected a layer with an nn.Module {name!r} (got "
                f"{type(part).__name__} in {type(module).__name__}); register a converter of "
                f"your own for this class"
            )
        parts.append(part)
    return parts[0], parts[1]


# Module hook dictionaries, moved to the new layer so that hooks (and their handles) keep working.
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _swap(old: _BatchNorm, new_class: type[_BatchNorm], **kwargs) -> _BatchNorm:
    """A ``new_class`` layer with the hyper-parameters, tensors, flags and hooks of ``old``."""
    try:
        new = new_class(
            old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats, **kwargs
        )
    except TypeError as error:
        raise TypeError(
            f"syncbn.convert expected {new_class.__qualname__}(num_features, eps, momentum, "
            f"affine, track_running_stats) to build a layer (got {error}); register a converter or "
            f"reverter that builds it"
        ) from error
    # Share the tensors themselves so optimizers and hooks holding them keep working.
    for name in ("weight", "bias"):
        setattr(new, name, getattr(old, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = old._buffers.get(name)
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    for name in _HOOK_DICTS:
        hooks = getattr(old, name, None)
        if hooks:  # the same dict object: removing a handle still removes the hook
            hooks.update(getattr(new, name, {}))
            setattr(new, name, hooks)
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook
    return new


# ------------------------------------------------------ SyncBatchNorm.convert_sync_batchnorm


def _convert_sync_batchnorm_classmethod(
    cls, module: nn.Module, process_group: ProcessGroup | None = None, **kwargs
) -> nn.Module:
    """Same as :func:`syncbn.convert_sync_batchnorm`, spelled like ``nn.SyncBatchNorm``'s."""
    return convert_sync_batchnorm(module, process_group, **kwargs)


# Attached here rather than written in the class body: batchnorm.py must not import this module
# (module docstring). The names make help() and tracebacks read as if it were written there.
_convert_sync_batchnorm_classmethod.__name__ = "convert_sync_batchnorm"
_convert_sync_batchnorm_classmethod.__qualname__ = "SyncBatchNorm.convert_sync_batchnorm"
SyncBatchNorm.convert_sync_batchnorm = classmethod(_convert_sync_batchnorm_classmethod)


# ---------------------------------------------------------------------------- built-in entries

for _cls in (_BatchNorm, nn.SyncBatchNorm):
    register_converter(_cls, to_sync_batchnorm)
for _cls in (SyncBatchNorm, nn.SyncBatchNorm):
    register_reverter(_cls, to_batchnorm)
register_converter(BatchNormAct, to_sync_batchnorm_act)
register_reverter(SyncBatchNormAct, to_batchnorm_act)
for _module in _TIMM_MODULES:
    register_converter(f"{_module}.BatchNormAct2d", to_sync_batchnorm_act)
    register_converter(f"{_module}.SyncBatchNormAct", to_sync_batchnorm_act)
    register_reverter(f"{_module}.SyncBatchNormAct", to_batchnorm_act)
