"""strfx in the training loops people already use.

* :mod:`strfx.integrations.lightning` — ``STRCallback`` for PyTorch Lightning (``pip install strfx[lightning]``);
* :mod:`strfx.integrations.hf` — ``STRTrainerCallback`` and ``str_optimizer`` for the HuggingFace
  ``Trainer`` (``pip install strfx[hf]``);
* any other loop (plain PyTorch, accelerate): :class:`STRSession` below, or the plain API
  (``strfx.sparsify``, ``strfx.param_groups``, ``strfx.controller.steer``, ``strfx.shrink``) — see
  the README, "In your own loop".

Both callbacks do what ``strfx train`` does around its own loop, with strfx's own pieces: the STR
parameter groups (:func:`str_optimizer`), the ``target_sparsity`` controller after every optimizer
step (:func:`strfx.controller.steer`), sparsity in the logs, and at the end shrink + export
(:func:`strfx.deploy.shrink_and_export`). The submodules import Lightning / transformers; this
package does not.
"""

from __future__ import annotations

from strfx.integrations._session import STRSession, find_str_model, str_optimizer

__all__ = ["STRSession", "find_str_model", "str_optimizer"]
