"""Batch profiles `min:opt:max` for engines and packages (TensorRT optimisation profiles,
AOTInductor dynamic-batch ranges)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchProfile:
    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {self}")

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        """`8` (fixed), `1:32` (min:max, opt = max) or `1:8:32`."""
        try:
            parts = [int(p) for p in str(text).split(":")]
        except ValueError:
            raise ValueError(f"batch profile {text!r}: expected N, MIN:MAX or MIN:OPT:MAX (integers)") from None
        if len(parts) == 1:
            return cls(parts[0], parts[0], parts[0])
        if len(parts) == 2:
            return cls(parts[0], parts[1], parts[1])
        if len(parts) == 3:
            return cls(*parts)
        raise ValueError(f"batch profile {text!r}: expected N, MIN:MAX or MIN:OPT:MAX")

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}
