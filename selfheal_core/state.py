"""Declared, copyable state: the one save/load mechanism every part shares.

A part lists the attributes it saves in `_state_keys`; `state_dict()` copies
them (tensors cloned) and `load_state_dict()` checks the keys before it writes
anything, so a bad state leaves the part unchanged. Values are restricted to
what `torch.load(weights_only=True)` accepts: tensors, numbers, strings,
bools, None, and lists/dicts of those.
"""
from __future__ import annotations

import copy
from collections import deque
from typing import Any

import torch


def clone_state(value: Any) -> Any:
    """Deep copy with tensors detached and cloned."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clone_state(v) for v in value]
    return copy.copy(value)


class DequeState:
    """A bounded deque attribute saved as a 1-D tensor of `dtype`, read back into a deque of the
    owner's `window` (declare it in the owner's `_state_keys`).

    >>> from collections import deque
    >>> class Window(StateMixin):
    ...     _state_keys = ("_values_state",)
    ...     _values_state = DequeState("_values", torch.float64)
    ...     def __init__(self): self.window, self._values = 3, deque(maxlen=3)
    >>> w = Window(); w._values.extend([1.0, 2.0, 3.0, 4.0])
    >>> other = Window(); other.load_state_dict(w.state_dict()); list(other._values)
    [2.0, 3.0, 4.0]
    """

    def __init__(self, attr: str, dtype: torch.dtype) -> None:
        self.attr, self.dtype = attr, dtype

    def __get__(self, owner: Any, cls: type | None = None) -> Any:
        if owner is None:
            return self
        return torch.tensor(list(getattr(owner, self.attr)), dtype=self.dtype)

    def __set__(self, owner: Any, value: torch.Tensor) -> None:
        setattr(owner, self.attr, deque(value.to(self.dtype).tolist(), maxlen=owner.window))


class StateMixin:
    """Save and load the attributes named in `_state_keys`."""

    _state_keys: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        return {key: clone_state(getattr(self, key)) for key in self._state_keys}

    def check_state_keys(self, state: dict[str, Any], optional: tuple[str, ...] = ()) -> None:
        """ValueError unless `state` holds exactly `_state_keys` (those in `optional` may be missing)."""
        if not isinstance(state, dict):
            raise ValueError(f"{type(self).__name__} state is {type(state).__name__}, not a mapping")
        missing = set(self._state_keys) - set(state) - set(optional)
        unknown = set(state) - set(self._state_keys)
        if missing or unknown:
            raise ValueError(
                f"{type(self).__name__} state mismatch: missing {sorted(missing)}, unknown {sorted(unknown)}"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_keys(state)
        for key in self._state_keys:
            setattr(self, key, clone_state(state[key]))
