"""Declared, copyable state: the one save/load mechanism every part shares.

A part lists the attributes it saves in `_state_keys`; `state_dict()` copies
them (tensors cloned) and `load_state_dict()` checks the keys before it writes
anything, so a bad state leaves the part unchanged. Values are restricted to
what `torch.load(weights_only=True)` accepts: tensors, numbers, strings,
bools, None, and lists/dicts of those.
"""
from __future__ import annotations

import copy
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
