"""Split one dataset's example indices across federated clients.

- "iid": a seeded shuffle cut into near-equal parts; every client sees the global label mix.
- "dirichlet": label skew as in Hsu et al. (2019), in its common per-class form: for each class, draw
  proportions p ~ Dirichlet(alpha, ..., alpha) over the clients and give client j a p_j share of that
  class. Small alpha (0.1) gives each client a few dominant classes; large alpha (100) is close to iid.
  A draw that leaves some client with fewer than ``min_size`` examples is redrawn, a bounded number of
  times, because a client with no data cannot train.

All randomness comes from ``numpy.random.default_rng(seed)``, so one seed gives one partition. Every
index appears in exactly one client; each client's indices are returned in ascending order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedspec.data.examples import DataError

SCHEMES: tuple[str, ...] = ("iid", "dirichlet")
MAX_DIRICHLET_DRAWS = 1000


def partition(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    *,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> list[list[int]]:
    """Indices of ``labels`` for each of ``num_clients`` clients (exact cover, deterministic for ``seed``)."""
    label_array = _as_label_array(labels)
    _check_arguments(len(label_array), num_clients, scheme, alpha, min_size)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return _iid(len(label_array), num_clients, rng)
    return _dirichlet(label_array, num_clients, float(alpha), min_size, rng)


def partition_summary(
    labels: Sequence[int] | np.ndarray, parts: Sequence[Sequence[int]], num_classes: int | None = None
) -> list[dict[str, Any]]:
    """Per client: size, label histogram and the share of its largest class (JSON-ready, for logs)."""
    label_array = _as_label_array(labels)
    classes = num_classes if num_classes is not None else int(label_array.max(initial=-1)) + 1
    summary = []
    for client, indices in enumerate(parts):
        counts = np.bincount(label_array[np.asarray(indices, dtype=np.int64)], minlength=classes)
        size = int(counts.sum())
        summary.append(
            {
                "client": client,
                "size": size,
                "label_counts": counts.tolist(),
                "max_class_share": float(counts.max() / size) if size else 0.0,
            }
        )
    return summary


# --------------------------------------------------------------------------------------------------


def _as_label_array(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise DataError("partition: labels must be a flat sequence of integer class ids")
    if array.size and array.min() < 0:
        raise DataError("partition: labels must be class ids 0 or more")
    return array.astype(np.int64)


def _check_arguments(num_examples: int, num_clients: int, scheme: str, alpha: float, min_size: int) -> None:
    if scheme not in SCHEMES:
        raise DataError(f"partition scheme={scheme!r} is unknown; allowed: {', '.join(SCHEMES)}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise DataError(f"partition: num_clients={num_clients!r} must be an integer of at least 1")
    if num_clients > num_examples:
        raise DataError(
            f"partition: {num_clients} clients but only {num_examples} examples; "
            "use fewer clients or more data"
        )
    if min_size < 0 or num_clients * min_size > num_examples:
        raise DataError(
            f"partition: min_size={min_size} per client is impossible with {num_clients} clients and "
            f"{num_examples} examples; lower min_size or use fewer clients"
        )
    if scheme == "dirichlet" and not alpha > 0:
        raise DataError(
            f"partition: alpha={alpha!r} must be greater than 0 (small = skewed, large = near iid)"
        )


def _iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    shuffled = rng.permutation(num_examples)
    return [np.sort(part).tolist() for part in np.array_split(shuffled, num_clients)]


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[list[int]]:
    class_members = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    best_smallest_client = 0
    for _ in range(MAX_DIRICHLET_DRAWS):
        counts = _draw_class_counts(class_members, num_clients, alpha, rng)
        smallest_client = int(counts.sum(axis=0).min())
        if smallest_client >= min_size:
            return _assign(class_members, counts, rng)
        best_smallest_client = max(best_smallest_client, smallest_client)
    raise DataError(
        f"partition: after {MAX_DIRICHLET_DRAWS} Dirichlet draws some client still had fewer than "
        f"min_size={min_size} examples (best draw: {best_smallest_client}; {len(labels)} examples, "
        f"{num_clients} clients, alpha={alpha}); use a larger alpha, fewer clients or a smaller min_size"
    )


def _draw_class_counts(
    class_members: list[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """counts[c, j]: how many examples of class c client j gets, from one Dirichlet draw per class."""
    counts = np.empty((len(class_members), num_clients), dtype=np.int64)
    for row, members in enumerate(class_members):
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.minimum((np.cumsum(proportions) * len(members)).astype(np.int64), len(members))
        cuts[-1] = len(members)  # float round-off must not lose or invent the last example
        counts[row] = np.diff(cuts, prepend=0)
    return counts


def _assign(class_members: list[np.ndarray], counts: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(counts.shape[1])]
    for members, class_counts in zip(class_members, counts):
        shuffled = rng.permutation(members)
        for client, chunk in enumerate(np.split(shuffled, np.cumsum(class_counts)[:-1])):
            parts[client].extend(chunk.tolist())
    return [sorted(part) for part in parts]
