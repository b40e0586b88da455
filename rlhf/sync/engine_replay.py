"""Replay the copies vLLM's weight loaders made, instead of running the loaders again (`sync.engine_reload=replay`).

vLLM's `model.load_weights` walks every received tensor through Python: name mapping, stacked
parameters (q/k/v into qkv_proj, gate/up into gate_up_proj), tensor-parallel narrowing, and finally
a `copy_` into a view of the live parameter. For an unquantized model on a GPU those copies are all
that touches the parameters, and they are the same on every push: same bucket layout, same views.
So the first push of each bucket layout runs `load_weights` under a `TorchFunctionMode` that records
every `copy_` (destination: which parameter, and the view's offset/size/stride; source: which bytes
of the bucket buffer, as a view) and every constant `fill_` (the vocabulary padding rows), and later
pushes replay them as one `torch._foreach_copy_`.

A recording is only kept when it explains the whole load: every write into a parameter was a
`copy_` from bytes of the bucket or a constant `fill_` (no casts, concatenations, other in-place ops
or reallocated parameters), and no two writes touch the same bytes. Otherwise that layout keeps going through `load_weights`, and
the reason is reported once. The sync audit (engine vs learner logprobs) checks the result either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _View:
    """A strided view into a storage, by element offset: enough to rebuild it on the same storage."""

    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> _View:
        return cls(t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)

    def extent(self) -> tuple[int, int]:
        """[first, last] element of the storage this view can touch (an over-approximation)."""
        span = sum((s - 1) * abs(st) for s, st in zip(self.size, self.stride) if s > 0)
        return self.offset, self.offset + span


@dataclass(frozen=True)
class _Copy:
    param: str  # name of the destination parameter (or buffer)
    dst: _View  # inside the parameter's storage
    src: _View | None  # inside the bucket buffer, viewed as `src.dtype` from the buffer's first byte
    value: float = 0.0  # src None: a constant fill (vLLM zeroes the vocabulary padding rows)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (t.device.type, t.untyped_storage().data_ptr())


class _CopyRecorder(TorchFunctionMode):
    """Records `copy_` calls from the bucket buffer into parameters; flags any other parameter write."""

    def __init__(self, params: dict[tuple[str, int], tuple[str, torch.Tensor]], buffer: torch.Tensor):
        super().__init__()
        self.params = params
        self.buffer_key = _storage_key(buffer)
        self.buffer_byte0 = buffer.storage_offset() * buffer.element_size()
        self.copies: list[_Copy] = []
        self.problem: str | None = None

    def _param_of(self, t) -> tuple[str, torch.Tensor] | None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return None
        return self.params.get(_storage_key(t))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.problem is None and args:
            target = self._param_of(args[0])
            if target is not None and name == "copy_":
                self._record(target[0], args[0], args[1])
            elif target is not None and name in ("fill_", "zero_"):
                value = args[1] if name == "fill_" else 0.0
                if isinstance(value, torch.Tensor) or not isinstance(value, int | float | bool):
                    self.problem = f"{name} writes a computed value into {target[0]}"
                elif args[0].numel():
                    self.copies.append(_Copy(target[0], _View.of(args[0]), None, float(value)))
            elif target is not None and (
                name.endswith("_") and not name.startswith("__") or name == "__setitem__"
            ):
                self.problem = f"{name} writes into {target[0]}"
            elif any(self._param_of(v) is not None for v in _outs(kwargs)):
                self.problem = f"{name}(out=...) writes into a parameter"
        return func(*args, **kwargs)

    def _record(self, param_name: str, dst: torch.Tensor, src) -> None:
        if not isinstance(src, torch.Tensor) or _storage_key(src) != self.buffer_key:
            self.problem = f"{param_name} is written from a computed tensor, not from the received bytes"
            return
        src_bytes = src.storage_offset() * src.element_size() - self.buffer_byte0
        if src_bytes % src.element_size():
            self.problem = f"{param_name}: source view not aligned to its dtype"
            return
        src_view = _View(src_bytes // src.element_size(), tuple(src.shape), tuple(src.stride()), src.dtype)
        if dst.shape != src.shape:
            self.problem = f"{param_name}: copy_ broadcasts {tuple(src.shape)} into {tuple(dst.shape)}"
            return
        if dst.dtype != self.params[_storage_key(dst)][1].dtype:
            self.problem = f"{param_name} is written through a view of another dtype"
            return
        self.copies.append(_Copy(param_name, _View.of(dst), src_view))


def _outs(kwargs: dict) -> list:
    out = kwargs.get("out")
    return list(out) if isinstance(out, tuple | list) else [out]


def _overlap(copies: list[_Copy]) -> str | None:
    """Name a parameter two copies both write (then their order would matter in one batched copy)."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for copy in copies:
        spans.setdefault(copy.param, []).append(copy.dst.extent())
    for name, ranges in spans.items():
        ranges.sort()
        for (_, end), (start, _) in zip(ranges, ranges[1:]):
            if start <= end:
                return name
    return None


class WeightReplay:
    """Per engine worker: load buckets through `load_weights` once per bucket layout, then replay.

    `layout` identifies a bucket's contents (names, shapes, dtypes, byte offsets); the learner sends
    the same layouts on every push, so each is recorded once."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.plans: dict[tuple, list[_Copy] | None] = {}
        self.replayed = 0  # buckets replayed / loaded through load_weights, over this worker's life
        self.loaded = 0

    def _named_storages(self) -> dict[tuple[str, int], tuple[str, torch.Tensor]]:
        named = {}
        for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
            named.setdefault(_storage_key(tensor), (name, tensor))
        return named

    def load(self, layout: tuple, buffer: torch.Tensor, named_tensors, load_weights: Callable) -> bool:
        """Write one bucket (`named_tensors` are views into `buffer`). True when it was replayed."""
        plan = self.plans.get(layout, ())
        if plan:
            self._replay(plan, buffer)
            self.replayed += 1
            return True
        if plan is None:  # recorded before and found not replayable
            load_weights(named_tensors)
            self.loaded += 1
            return False
        params = self._named_storages()
        before = {name: t.data_ptr() for name, t in params.values()}
        recorder = _CopyRecorder(params, buffer)
        with recorder:
            load_weights(named_tensors)
        self.loaded += 1
        problem = recorder.problem
        if problem is None and not recorder.copies:
            problem = "the loaders copied nothing"
        if problem is None:
            moved = [n for n, t in self._named_storages().values() if before.get(n) != t.data_ptr()]
            if moved:
                problem = f"{moved[0]} was reallocated while loading"
        if problem is None and (name := _overlap(recorder.copies)) is not None:
            problem = f"two copies write the same part of {name}"
        if problem is not None:
            logger.warning(
                "weight sync: replaying this bucket's loads is not possible (%s); using load_weights", problem
            )
        self.plans[layout] = None if problem else recorder.copies
        return False

    def params_written(self, layout: tuple) -> set[str]:
        """Names of the parameters a replay of `layout` writes (what `load_weights` would report)."""
        return {copy.param for copy in self.plans.get(layout) or ()}

    def _replay(self, plan: list[_Copy], buffer: torch.Tensor) -> None:
        params = dict([*self.model.named_parameters(), *self.model.named_buffers()])
        typed: dict[torch.dtype, torch.Tensor] = {}
        dsts, srcs = [], []
        for copy in plan:
            dst = params[copy.param].data.as_strided(copy.dst.size, copy.dst.stride, copy.dst.offset)
            src = copy.src
            if src is None:
                dst.fill_(copy.value)  # no copy writes the same bytes (checked when recorded)
                continue
            if src.dtype not in typed:
                typed[src.dtype] = buffer.view(src.dtype)
            base = typed[src.dtype]
            srcs.append(base.as_strided(src.size, src.stride, base.storage_offset() + src.offset))
            dsts.append(dst)
        torch._foreach_copy_(dsts, srcs)


def bucket_layout(metas) -> tuple:
    """What must match for a recorded plan to apply to another bucket: every tensor's place in the buffer."""
    return tuple((m.name, tuple(m.shape), m.dtype, m.offset, m.nbytes) for m in metas)
