"""Where user features come from: the store (system of record) behind one small interface."""

from typing import Protocol

import numpy as np


class StoreUnavailable(Exception):
    """The store cannot be reached right now; the request may succeed later."""


class StoredFeaturesInvalid(Exception):
    """A stored feature vector does not fit the model; retrying will not help."""


class FeatureStore(Protocol):
    """Looks up one user's features by id."""

    n_users: int

    async def features(self, user_id: str) -> np.ndarray | None:
        """The user's features, shape (n_features,), float64; None for an unknown user.

        Raises
        ------
        StoreUnavailable
            If the store cannot answer now.
        """
        ...

    async def status(self) -> dict[str, str]:
        """Each part of the store (``store``, ``cache``) and its state: ``ok`` or why not."""
        ...

    async def open(self) -> None:
        """Connect; called in each worker process after it starts."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...
