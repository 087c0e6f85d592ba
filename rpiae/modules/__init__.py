"""Building blocks of RPiAE and PS-VAE, named after the parts of the RPiAE paper."""

from rpiae.modules.bridge import DiagonalGaussian, VBDecoder, VBEncoder
from rpiae.modules.encoder import DinoV2Encoder, RepresentationEncoder, Siglip2Encoder
from rpiae.modules.pixel_decoder import PixelDecoder

__all__ = [
    "DiagonalGaussian",
    "DinoV2Encoder",
    "PixelDecoder",
    "RepresentationEncoder",
    "Siglip2Encoder",
    "VBDecoder",
    "VBEncoder",
]
