"""A warning, once, when a GP adapter with stored tasks trains with no projection attached.

A GP model trained by a plain ``transformers.Trainer``, TRL's ``SFTTrainer`` without ``GPCallback``, or any loop
without ``GPProjector`` drifts like plain PEFT: nothing in the model itself stops it. So once an adapter's memory
holds a task, each of its protected parameters carries a gradient hook (a removable handle, no patching) that checks
one counter: the projectors attached for that adapter. None attached while gradients arrive means the step about to
happen is unprotected.
"""

from __future__ import annotations

import warnings
import weakref

from torch import nn


class GPCapacityWarning(UserWarning):
    """Layers' feature spaces are full (a memory update filled them, or a task's gradient was almost all removed):
    they can no longer learn."""


class UnprotectedTrainingWarning(UserWarning):
    """A GP adapter with stored tasks gets gradients while no projector is attached: old tasks are not protected."""


class TrainingGuard:
    """The gradient hooks of one adapter's protected parameters and the count of projectors attached to it."""

    def __init__(self, parameters: list[nn.Parameter], adapter_name: str, memory_of, sliced: bool = False) -> None:
        self.adapter_name = adapter_name
        self.sliced = sliced  # gp_task_slices: the first task must train under a projector too (only its slice)
        self.attached = 0
        self.warned = False
        self._memory_of = memory_of  # () -> the adapter's current GPMemory (it may be replaced on resume)
        guard = weakref.ref(self)
        self._handles = [
            param.register_post_accumulate_grad_hook(lambda _param: _check(guard)) for param in parameters
        ]

    def check(self) -> None:
        if self.attached or self.warned:
            return
        tasks = self._memory_of().tasks_seen
        if tasks == 0 and not self.sliced:
            return
        self.warned = True
        what = (
            f"has a GP memory of {tasks} task(s), but it is being trained with no gradient projection attached: the "
            "earlier tasks are not protected and will be forgotten"
            if tasks
            else "has gp_task_slices, but it is being trained with no projector attached: every slice trains, not "
            "only the first, and later tasks will change this one's outputs"
        )
        warnings.warn(
            f"Adapter {self.adapter_name!r} {what}. Train it with "
            "peft_gp.GPTrainer, add peft_gp.GPCallback() to the callbacks of your Trainer (transformers.Trainer, "
            "Seq2SeqTrainer, TRL's SFTTrainer, ...), or call peft_gp.GPProjector(model).attach(optimizer) in your own "
            "loop.",
            UnprotectedTrainingWarning,
            stacklevel=3,
        )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _check(guard: weakref.ref) -> None:
    live = guard()
    if live is not None:
        live.check()
