"""The k-NN metrics, as an enum shared by specs and the search."""

from enum import StrEnum


class Metric(StrEnum):
    cosine = "cosine"
    euclidean = "euclidean"
    manhattan = "manhattan"

    @property
    def higher_is_nearer(self) -> bool:
        return self is Metric.cosine
