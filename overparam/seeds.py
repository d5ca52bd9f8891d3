"""Seeded random streams: every random choice derived from a user's seed, in one place.

Each use draws from its own CPU ``torch.Generator``: a CPU generator gives the same numbers on
every device and every DDP rank, and a stream of its own means that changing one option (the
label noise, the analysis size, the number of probes) does not reshuffle the others. The
derivations are the ones the project has always used, so runs stay bit-identical across
versions; the multipliers and offsets are primes chosen to keep streams apart. Two pairs
coincide for the same integer seed, harmlessly, since each pair draws different things from it:
``analysis_subset(s)`` and ``trace_probe(s, 0)``, ``lanczos_restarts(s)`` and
``noise_minibatches(s, 0)``. Seeds a user gives directly (``init_seed``, a direction's or a
probe's ``seed``, ``coupling_seed``) are used as given and are not listed here.
"""

from __future__ import annotations

import torch


def _generator(value: int) -> torch.Generator:
    return torch.Generator().manual_seed(value)


def data_stream(seed: int, stream: int) -> torch.Generator:
    """One independent use (``stream`` = 1, 2, ...) of a DataModule's ``seed`` in building its
    splits: validation carving, subsamples, label and input noise, pairings."""
    return _generator(seed * 1_000_003 + stream)


def pass_order(seed: int, pass_index: int) -> torch.Generator:
    """The permutation of the training set for pass ``pass_index`` (0, 1, ...) over it."""
    return _generator(seed * 100_003 + pass_index)


def analysis_subset(seed: int) -> torch.Generator:
    """The fixed subset the analysis callbacks evaluate on (the same at every call)."""
    return _generator(seed + 7919)


def lanczos_restarts(seed: int) -> torch.Generator:
    """Fresh directions when a Lanczos basis breaks down (an invariant subspace is found)."""
    return _generator(seed + 104_729)


def noise_minibatches(seed: int, measurement: int) -> torch.Generator:
    """The minibatches of GradientNoise's ``measurement``-th tail-index estimate."""
    return _generator(seed + 104_729 + measurement)


def augmentation(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """Random crops and flips of ``epoch`` on DDP ``rank``, drawn on the data's device (each rank
    augments its own slice)."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + epoch) * 1009 + rank)
    return generator


def trace_probe(seed: int, probe: int) -> torch.Generator:
    """The ``probe``-th (0, 1, ...) Rademacher vector of a Hutchinson trace estimate."""
    return _generator(seed + 7_919 * (probe + 1))
