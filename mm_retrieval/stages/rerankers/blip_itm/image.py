"""BLIP's image side, run at index time: its own preprocessing and its vision transformer.

:class:`BlipImageTransform` reproduces ``BlipImageProcessor`` (transformers' default, torchvision
backend) for one PIL image: transparency composited onto white, RGB, a square bicubic resize with
antialiasing on the uint8 image, then ``(x - 255 mean) / (255 std)`` in float32. It is a plain
picklable object (it runs in the indexer's decoding workers) and does not import transformers, so
the tokens an image gets do not depend on the installed transformers version.

:class:`BlipImageSide` runs ``vision_model(pixel_values, interpolate_pos_encoding=...)`` and
returns its ``last_hidden_state``: the post-layernorm tokens, CLS first, that the text encoder
cross-attends to. At a size other than the checkpoint's (e.g. 224 px for a 384 px model) the
position embeddings are interpolated (bicubic), as transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# PIL resample codes (as in preprocessor configs) -> torchvision interpolation names.
_RESAMPLE = {0: "NEAREST", 2: "BILINEAR", 3: "BICUBIC"}


@dataclass(frozen=True)
class BlipImageTransform:
    """PIL image -> float32 tensor [3, size, size], equal to ``BlipImageProcessor``'s pixel_values."""

    size: int = 384
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resample: int = 3  # PIL.Image.BICUBIC
    rescale_factor: float = 1 / 255

    def __call__(self, image: Any):
        import torch
        from PIL import Image
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvF

        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
        x = tvF.resize(x, [self.size, self.size], interpolation=getattr(InterpolationMode, _RESAMPLE[self.resample]), antialias=True)
        # transformers fuses rescale into normalize: (x - mean / r) / (std / r) on the float image
        mean = torch.tensor(self.mean) * (1.0 / self.rescale_factor)
        std = torch.tensor(self.std) * (1.0 / self.rescale_factor)
        return tvF.normalize(x.to(torch.float32), mean, std)

    @classmethod
    def from_processor(cls, processor: Any, size: int | None = None) -> "BlipImageTransform":
        """The transform a ``BlipImageProcessor`` describes, at ``size`` (default: its own)."""
        from ....errors import ConfigError

        resample = int(getattr(processor, "resample", 3))
        if resample not in _RESAMPLE:
            raise ConfigError(f"unsupported resample {resample} in the BLIP preprocessor config (supported: {sorted(_RESAMPLE)})")
        own = processor.size
        own = own["height"] if isinstance(own, dict) else own.height
        return cls(
            size=int(size or own),
            mean=tuple(float(v) for v in processor.image_mean),
            std=tuple(float(v) for v in processor.image_std),
            resample=resample,
            rescale_factor=float(processor.rescale_factor),
        )


class BlipImageSide:
    """What an index run calls to get BLIP's tokens for a batch of images.

    ``transform`` (picklable) runs in the decoding workers, :meth:`encode` on the batch they
    produce; the token writer of the reranker stores the result. ``shape`` is one image's
    ``[tokens, width]``.
    """

    def __init__(self, model: Any, transform: BlipImageTransform, *, native_size: int, device: str, autocast: Any):
        self.model = model  # BlipForImageTextRetrieval (only vision_model is used here)
        self.transform = transform
        self.native_size = native_size
        self.device = device
        self._autocast = autocast
        vc = model.config.vision_config
        grid = transform.size // vc.patch_size
        self.grid = (grid, grid)
        self.shape = (grid * grid + 1, int(vc.hidden_size))

    def tokens(self, pixels: Any):
        """[n, 3, S, S] pixels -> [n, P, W] torch tensor on the device (autocast dtype on CUDA)."""
        import torch

        with torch.inference_mode(), self._autocast():
            out = self.model.vision_model(
                pixel_values=pixels.to(self.device, non_blocking=True),
                interpolate_pos_encoding=self.transform.size != self.native_size,
            )
        return out.last_hidden_state

    def encode(self, pixels: Any) -> np.ndarray:
        """[n, 3, S, S] pixels -> [n, P, W] float32 numpy (the token writer quantises it)."""
        return self.tokens(pixels).float().cpu().numpy()
