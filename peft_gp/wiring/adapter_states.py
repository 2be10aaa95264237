"""The per-model store of GP states, keyed by adapter name, that forgets an adapter PEFT deleted or replaced.

``PeftModel.delete_adapter`` removes an adapter's layers and config, and ``add_adapter`` may then create another one
under the same name: a state built for the old one (its groups hold the old parameters) must not survive either. Each
entry remembers the adapter's config object; an entry whose adapter is gone from ``peft_config``, or holds another
config object, is dropped the moment the store is read, so no state (nor its memory) outlives its adapter and a new
adapter under an old name starts with a fresh one.
"""

from __future__ import annotations

import copy
import weakref


class AdapterStates(dict):
    def __init__(self, peft_model, states: dict | None = None) -> None:
        super().__init__()
        self._model = weakref.ref(peft_model)
        self._configs: dict = {}
        for name, state in (states or {}).items():
            self[name] = state

    def __deepcopy__(self, memo) -> AdapterStates:
        """A copy of the model gets a copy of its states, tied to the copied model (and its copied configs)."""
        model = self._model()
        copied = AdapterStates(memo.get(id(model), model))
        copied._configs = copy.deepcopy(self._configs, memo)
        for name, state in dict.items(self):
            dict.__setitem__(copied, name, copy.deepcopy(state, memo))
        return copied

    def _config(self, name):
        model = self._model()
        return None if model is None else getattr(model, "peft_config", {}).get(name)

    def prune(self) -> None:
        for name in [name for name in dict.keys(self) if self._config(name) is not self._configs.get(name)]:
            dict.__delitem__(self, name)
            self._configs.pop(name, None)

    def __setitem__(self, name, state) -> None:
        self._configs[name] = self._config(name)
        dict.__setitem__(self, name, state)

    def __contains__(self, name) -> bool:
        self.prune()
        return dict.__contains__(self, name)

    def __getitem__(self, name):
        self.prune()
        return dict.__getitem__(self, name)

    def get(self, name, default=None):
        self.prune()
        return dict.get(self, name, default)

    def keys(self):
        self.prune()
        return dict.keys(self)

    def values(self):
        self.prune()
        return dict.values(self)

    def items(self):
        self.prune()
        return dict.items(self)

    def __iter__(self):
        self.prune()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self.prune()
        return dict.__len__(self)
