"""Burst training: heavy jobs (fine-tune, distill, quantisation-aware training) on GPU/TPU workers.

:mod:`federated.burst.spec` (cheap to import: msgspec only) describes a job and estimates its cost;
:mod:`federated.burst.worker` (imports torch) runs it, in-process or as ``python -m federated.burst.worker``
(a Ray job's entrypoint). The weights it writes go through the same build -> gate -> sign -> rollout path as a
federated round's.
"""

from __future__ import annotations

from federated.burst.spec import JobSpec, estimate_cost, load_spec

__all__ = ["JobSpec", "estimate_cost", "load_spec"]
