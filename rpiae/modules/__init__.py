"""Building blocks of RPiAE, named after the parts of the paper."""

from rpiae.modules.bridge import DiagonalGaussian, VBDecoder, VBEncoder
from rpiae.modules.encoder import DinoV2Encoder, RepresentationEncoder
from rpiae.modules.pixel_decoder import PixelDecoder

__all__ = [
    "DiagonalGaussian",
    "DinoV2Encoder",
    "PixelDecoder",
    "RepresentationEncoder",
    "VBDecoder",
    "VBEncoder",
]
