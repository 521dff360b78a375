"""What an index run computes from each decoded image, decided in one place."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..stages.base import Encoder, ImageSide


class ImageEncoding:
    """The encoder's embedding of each image, and the tokens a token cache keeps of it: none
    (``tokens`` false), the encoder's patch tokens, or, given a reranker's own image encoder
    (``image_side``, :meth:`~mm_retrieval.stages.base.Reranker.image_side`, e.g. BLIP's), that
    side's tokens instead; an image side without ``tokens`` is not used. Each image is then decoded
    once for both models: the decoding workers apply both preprocessings (:attr:`transform`, built
    once) and every batch goes through both.

    Everything that encodes files takes one: :func:`~mm_retrieval.encoding.encode_files`, Ray's
    encoder actors, :func:`~mm_retrieval.encoding.encode_videos`,
    :func:`~mm_retrieval.encoding.segment_tokens`."""

    def __init__(self, encoder: Encoder, *, tokens: bool = False, image_side: ImageSide | None = None):
        self.encoder = encoder
        self.tokens = tokens
        self.image_side = image_side if tokens else None
        self._transform: Callable[[Any], Any] | None = None

    @property
    def encoder_tokens(self) -> bool:
        """Whether the tokens are the encoder's own patch tokens."""
        return self.tokens and self.image_side is None

    @property
    def transform(self) -> Callable[[Any], Any]:
        """PIL image -> what a decoding worker hands over: the encoder's input, or with an image
        side both models' inputs (:class:`~mm_retrieval.decode.Transforms`). Picklable; needs a
        warm encoder (its transform may come with the model)."""
        if self._transform is None:
            from ..decode import Transforms

            own = self.encoder.image_transform
            self._transform = own if self.image_side is None else Transforms(own, self.image_side.transform)
        return self._transform

    @property
    def token_transform(self) -> Callable[[Any], Any]:
        """PIL image -> the input :meth:`encode_tokens` takes (an image decoded for its tokens alone)."""
        return self.encoder.image_transform if self.image_side is None else self.image_side.transform

    def split(self, pixels: Any) -> tuple[Any, Any]:
        """A stacked batch of :attr:`transform` outputs -> (the encoder's inputs, the image side's
        inputs or None)."""
        return (pixels[0], pixels[1]) if self.image_side is not None else (pixels, None)

    def encode(self, pixels: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """A stacked batch of :attr:`transform` outputs -> (embeddings [n, D], tokens [n, P, W] or None)."""
        first, side = self.split(pixels)
        emb, tokens = self.encoder.encode_pixels(first, with_tokens=self.encoder_tokens)
        return emb, (self.image_side.encode(side) if self.image_side is not None else tokens)

    def encode_tokens(self, pixels: Any) -> np.ndarray:
        """A stacked batch of :attr:`token_transform` outputs (or the image side's half of a
        :meth:`split`) -> their tokens [n, P, W]."""
        if self.image_side is not None:
            return np.asarray(self.image_side.encode(pixels))
        _, tokens = self.encoder.encode_pixels(pixels, with_tokens=True)
        return np.asarray(tokens)
