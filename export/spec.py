"""What a graph is, declared once: its name, input and output (names, shapes from the model
config, dtype), the dynamic batch axis, a sample input; and the vocabularies of graphs and
precisions every layer takes from here.

    encode: images (batch, 3, S, S) float32 in [0, 1] -> latent (batch, C, G, G) float32
    decode: latent (batch, C, G, G) float32            -> image  (batch, 3, S, S) float32

S = config.image_size (256), C = config.latent_channels (64 RPiAE, 96 PS-VAE), G =
config.grid_size (16). Only axis 0 (`batch`) is dynamic; TensorRT engines and AOTInductor
packages bound it with a `BatchProfile`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rpiae.config import RPiAEConfig
# the model's submodules each graph runs (also their state-dict key prefixes), declared with the model
from rpiae.model import GRAPH_MODULES  # noqa: F401
# the precision vocabularies, declared with each precision's record; re-exported for the layers above
from rpiae.precisions import ONNX_PRECISIONS, PRECISIONS, TORCH_PRECISIONS  # noqa: F401

GRAPHS = ("encode", "decode")
BATCH_AXIS = "batch"


@dataclass(frozen=True)
class GraphSpec:
    name: str  # encode | decode
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]  # one item, without the batch axis
    output_shape: tuple[int, ...]
    dtype: str = "float32"  # of the input and the output, whatever the graph's precision
    input_range: tuple[float, float] | None = None  # the values the input must lie in (images: [0, 1])

    def sample(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        """A seeded input of `batch` items: images uniform in [0, 1], latents standard normal."""
        g = torch.Generator().manual_seed(seed)
        if self.name == "encode":
            return torch.rand((batch, *self.input_shape), generator=g)
        return torch.randn((batch, *self.input_shape), generator=g)

    def shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.input_shape)


def graph_spec(config: RPiAEConfig, graph: str) -> GraphSpec:
    if graph == "encode":
        return GraphSpec("encode", "images", "latent", config.image_shape, config.latent_shape, input_range=(0.0, 1.0))
    if graph == "decode":
        return GraphSpec("decode", "latent", "image", config.latent_shape, config.image_shape)
    raise ValueError(f"unknown graph {graph!r}; expected one of {', '.join(GRAPHS)}")


def graph_specs(config: RPiAEConfig) -> dict[str, GraphSpec]:
    return {g: graph_spec(config, g) for g in GRAPHS}


def parse_precisions(value: str | list[str] | tuple[str, ...], allowed: tuple[str, ...] = ONNX_PRECISIONS) -> list[str]:
    """`fp32,int8` (or a list) -> the named precisions in canonical order; unknown names are a
    one-line ValueError."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [p.strip().lower() for p in items if p.strip()]
    bad = [p for p in items if p not in allowed]
    if bad or not items:
        raise ValueError(f"unknown precision {', '.join(bad) or '(none)'}; choose from: {', '.join(allowed)}")
    return [p for p in allowed if p in items]
