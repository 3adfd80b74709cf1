"""SimCLR data augmentation (Chen et al. 2020, Appendix A), drawn per image on a whole batch tensor.

`SimCLRAugment` is the fast path (no Python loop over images, no host-device synchronisation); `reference_view` is
the readable per-image torchvision path the tests check it against; `pil_pipeline` is the popular repositories'
per-image PIL pipeline, for statistics tests and speed comparisons. `normalize` is the package's one normalisation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torch import Tensor

from .data import CIFAR10_MEAN, CIFAR10_STD

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # luma weights of torchvision's rgb_to_grayscale (ITU-R 601-2)
CROP_ATTEMPTS = 10  # as in torchvision's RandomResizedCrop
MAX_COLOR_STRENGTH = 2.5  # the hue shift 0.2 s must stay in torchvision's [-0.5, 0.5]

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def to_unit_float(images: Tensor) -> Tensor:
    """Convert uint8 images in [0, 255] to float32 in [0, 1]; float images are only cast to float32."""
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"expected uint8 or floating-point images, got {images.dtype}")
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def normalize(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """uint8 or [0, 1] float images (B, 3, H, W) -> float32 (x - mean) / std per channel, as torchvision's normalize;
    `mean` and `std` are 3 floats each or tensors broadcastable to (1, 3, 1, 1), e.g. a model's buffers."""
    x = to_unit_float(images)
    mean, std = (torch.as_tensor(v, dtype=torch.float32, device=x.device).reshape(-1, 1, 1) for v in (mean, std))
    return x.sub(mean).div_(std)  # sub makes a new tensor: a float input is never modified


@dataclass(eq=False)  # tensors have no single truth value, so no generated __eq__
class ViewParams:
    """Random parameters of one view per image; every field has leading dim B and lives on one device."""

    crop: Tensor  # (B, 4) float32: top, left, height, width in input pixels (integer-valued)
    flip: Tensor  # (B,) bool: horizontal flip
    jitter: Tensor  # (B,) bool: colour jitter applied to this image
    brightness: Tensor  # (B,) float32 factor
    contrast: Tensor  # (B,) float32 factor
    saturation: Tensor  # (B,) float32 factor
    hue: Tensor  # (B,) float32 shift in [-0.5, 0.5]
    order: Tensor  # (B, 4) int64 permutation of the ops 0 brightness, 1 contrast, 2 saturation, 3 hue
    gray: Tensor  # (B,) bool: convert to grayscale
    blur: Tensor  # (B,) bool: Gaussian blur
    sigma: Tensor  # (B,) float32 blur standard deviation in output pixels

    def to(self, device: torch.device | str) -> ViewParams:
        """Return a copy with every field moved to `device`."""
        return ViewParams(**{name: value.to(device) for name, value in vars(self).items()})

    def rows(self, start: int, stop: int) -> ViewParams:
        """The parameters of images start..stop-1 (e.g. one process's share of a global batch)."""
        return ViewParams(**{name: value[start:stop] for name, value in vars(self).items()})


def _color_transform(images: Tensor, matrix: Tensor, bias: Tensor) -> Tensor:
    """out[b] = matrix[b] @ pixel + bias[b] for every pixel: one batched matmul, matrix (B, 3, 3), bias (B, 3, 1).
    On a CPU this is several times faster than the equivalent broadcast elementwise ops; on a GPU one kernel."""
    return torch.baddbmm(bias, matrix, images.reshape(images.shape[0], 3, -1)).view_as(images)


def _gray_matrix(device: torch.device, dtype: torch.dtype) -> Tensor:
    """The 3x3 matrix that replaces each channel by the luma: every row is the gray weights."""
    return torch.tensor(GRAY_WEIGHTS, device=device, dtype=dtype).expand(3, 3)


def _shift_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue of (B, 3, H, W) images in [0, 1] by a per-image `shift` (B,), as torchvision does.
    A hue rotation keeps V = max(r, g, b) and the chroma max - min, so the result is written directly
    with the closed form of HSV -> RGB instead of building the full H, S, V stack."""
    r, g, b = images.unbind(dim=1)
    maxc, minc = images.amax(dim=1), images.amin(dim=1)
    chroma = maxc - minc
    # Grey pixels (chroma 0) have hue 0 by convention; a divisor of 1 keeps them finite.
    divisor = chroma.masked_fill(chroma == 0, 1.0)
    # Hue in sixths of a turn, in (-1, 5]; which channel is largest picks the sector (ties: r, then g).
    # (In-place ops on fresh temporaries save allocations, which dominate on CPU at this size.)
    hue6 = torch.where(maxc == r, (g - b).div_(divisor),
                       torch.where(maxc == g, (b - r).div_(divisor).add_(2.0), (r - g).div_(divisor).add_(4.0)))
    # Shifting by `shift` turns adds 6 * shift sixths; one mod 6 on the single hue channel wraps it to [0, 6).
    hue6 = hue6.add_(6.0 * shift.view(-1, 1, 1)).remainder_(6.0).unsqueeze(1)
    # HSV -> RGB for hue h in [0, 6): each channel is min + chroma * clamp(a * |h - c| + b, 0, 1), a piecewise
    # linear ramp with (c, a, b) = (3, 1, -1) for red, (2, -1, 2) for green and (4, -1, 2) for blue.
    centre, slope, offset = (torch.tensor(v, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
                             for v in ((3.0, 2.0, 4.0), (1.0, -1.0, -1.0), (-1.0, 2.0, 2.0)))
    ramp = torch.addcmul(offset, slope, (hue6 - centre).abs_()).clamp_(0.0, 1.0)
    return torch.addcmul(minc.unsqueeze(1), chroma.unsqueeze(1), ramp)


def _jitter_maps(ops: Tensor, params: ViewParams, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Affine colour maps of the brightness, contrast or saturation op chosen by `ops` (B, K); other values: identity.
    Each is torchvision's blend clamp(f x + (1 - f) ref) with ref = 0, the mean grey level or the grey image:
    f I, f I + (1 - f) mean grey, f I + (1 - f) 1 w^T (w the luma weights). Returns the matrices (B, K, 3, 3)
    and the weight of the mean grey level in the bias (B, K)."""
    brightness, contrast, saturation = (v.to(dtype).view(-1, 1) for v in (params.brightness, params.contrast,
                                                                            params.saturation))
    factor = torch.where(ops == BRIGHTNESS, brightness,
                         torch.where(ops == CONTRAST, contrast, torch.where(ops == SATURATION, saturation, 1.0)))
    rest, eye, gray = 1.0 - factor, torch.eye(3, device=ops.device, dtype=dtype), _gray_matrix(ops.device, dtype)
    matrix = factor[..., None, None] * eye + (rest * (ops == SATURATION))[..., None, None] * gray
    return matrix, rest * (ops == CONTRAST)


def _color_jitter(images: Tensor, params: ViewParams) -> Tensor:
    """Colour jitter with a per-image random order of the four ops, for the images where `params.jitter`.
    Hue is the costly op, so it runs once for the whole batch: the cheap ops that come before hue in an image's
    order run in three "pre" stages, then hue, then the remaining cheap ops in three "post" stages."""
    order = params.order
    # Position of hue in each image's order (0..3); the cheap ops in order are the others (B, 3).
    hue_rank = (order == HUE).long().argmax(dim=1, keepdim=True)
    rank = torch.arange(3, device=order.device).view(1, 3)
    cheap_ops = torch.where(rank < hue_rank, order[:, :3], order[:, 1:])
    jitter = params.jitter.view(-1, 1)
    before_hue = torch.where(jitter & (rank < hue_rank), cheap_ops, -1)  # -1: no op
    after_hue = torch.where(jitter & (rank >= hue_rank), cheap_ops, -1)
    matrices, mean_weights = _jitter_maps(torch.cat([before_hue, after_hue], dim=1), params, images.dtype)
    luma = _gray_matrix(images.device, images.dtype)[0]
    out = images
    for stage in range(6):
        if stage == 3:
            # A zero shift (no jitter) is a round trip through HSV: the identity up to float rounding (~1e-7),
            # far cheaper than selecting between two full-size tensors.
            out = _shift_hue(out, params.hue.to(out.dtype) * params.jitter.to(out.dtype))
        # The mean of the luma (contrast's reference) is the luma of the channel means.
        bias = (mean_weights[:, stage] * (out.mean(dim=(2, 3)) @ luma)).view(-1, 1, 1).expand(-1, 3, 1)
        out = _color_transform(out, matrices[:, stage], bias).clamp_(0.0, 1.0)
    return out


def resize_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """Per-image resampling matrices (B, out_size, in_size) for resizing the window [start, start + length).
    Row o holds the weights of output pixel o: a triangle (bilinear) filter centred on the output pixel's
    position in the input, widened by the scale factor when downscaling (antialiasing) and normalised over
    the pixels inside the window - the same weights as torchvision's `resize(antialias=True)` of the crop."""
    dtype = start.dtype if start.is_floating_point() else torch.float32
    start, length = start.to(dtype), length.to(dtype)
    scale = length / out_size
    support = scale.clamp(min=1.0)
    centre = start.view(-1, 1, 1) + (torch.arange(out_size, device=start.device, dtype=dtype).view(1, -1, 1)
                                      + 0.5) * scale.view(-1, 1, 1)
    pixel = torch.arange(in_size, device=start.device, dtype=dtype).view(1, 1, -1) + 0.5
    inside = (pixel > start.view(-1, 1, 1)) & (pixel < (start + length).view(-1, 1, 1))
    weights = (1.0 - ((pixel - centre) / support.view(-1, 1, 1)).abs()).clamp_(min=0.0) * inside
    return weights / weights.sum(dim=2, keepdim=True)


def _gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur every image with its own sigma as torchvision does: reflect padding, then a separable grouped conv."""
    batch, channels, height, width = images.shape
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, device=sigma.device, dtype=sigma.dtype)
    pdf = torch.exp(-0.5 * (x.view(1, -1) / sigma.view(-1, 1)).pow(2))
    kernels = (pdf / pdf.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (B*C, k), normalised
    # Fold the batch into the channels so a single grouped conv gives each image its own kernel.
    pad = kernel_size // 2
    x = F.pad(images.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernels.view(-1, 1, 1, kernel_size), groups=batch * channels)
    x = F.conv2d(x, kernels.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return x.view(batch, channels, height, width)


class SimCLRAugment(torch.nn.Module):
    """SimCLR's random view of each image of a batch (B, 3, H, W), every parameter drawn per image.
    Pipeline (paper, Appendix A): random resized crop + horizontal flip, colour jitter of strength s in a
    random order with probability `color_prob`, random grayscale, optional Gaussian blur, normalisation.
    Crop, resize and colour ops are batched matrices, so the step costs a handful of batched matmuls."""

    def __init__(self, image_size: int = 32, crop_scale: tuple[float, float] = (0.08, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_prob: float = 0.5,
                 color_strength: float = 0.5, color_prob: float = 0.8, gray_prob: float = 0.2, blur_prob: float = 0.0,
                 blur_sigma: tuple[float, float] = (0.1, 2.0), mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD) -> None:
        super().__init__()
        if not 0.0 <= color_strength <= MAX_COLOR_STRENGTH:
            raise ValueError(f"color_strength must be in [0, {MAX_COLOR_STRENGTH}], got {color_strength}")
        probs = {"flip_prob": flip_prob, "color_prob": color_prob, "gray_prob": gray_prob, "blur_prob": blur_prob}
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.image_size, self.color_strength = int(image_size), float(color_strength)
        self.flip_prob, self.color_prob, self.gray_prob, self.blur_prob = map(float, probs.values())
        pairs = (crop_scale, crop_ratio, blur_sigma)
        self.crop_scale, self.crop_ratio, self.blur_sigma = ((float(low), float(high)) for low, high in pairs)
        # Buffers follow `.to(device)`, so normalising never copies host memory to the device.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def blur_kernel_size(self) -> int:
        """Blur kernel size: 10 % of the output size rounded to the nearest odd number, at least 3."""
        return max(3, 2 * math.floor(0.05 * self.image_size) + 1)

    def sample_params(self, batch_size: int, height: int, width: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> ViewParams:
        """Draw one view's parameters per image for a batch of `height` x `width` inputs, as tensors.
        Parameters are drawn on the generator's device (or `device` with the default generator) and
        returned on `device` if given; use a generator on the images' device to avoid any copy."""
        draw_device = generator.device if generator is not None else torch.device(device or "cpu")
        target = torch.device(device) if device is not None else draw_device

        def uniform(shape: tuple[int, ...], low: float, high: float) -> Tensor:
            # float32 U(low, high) computed as torchvision's `uniform_` does: low + (high - low) * u.
            return low + (high - low) * torch.rand(shape, generator=generator, device=draw_device)

        def bernoulli(p: float) -> Tensor:
            return torch.rand(batch_size, generator=generator, device=draw_device) < p

        crop = self._sample_crops(batch_size, height, width, uniform)
        flip, jitter = bernoulli(self.flip_prob), bernoulli(self.color_prob)
        s = self.color_strength  # jitter factors in [max(0, 1 - 0.8 s), 1 + 0.8 s], hue shift in +-0.2 s
        factors = {name: uniform((batch_size,), max(0.0, 1.0 - 0.8 * s), 1.0 + 0.8 * s)
                   for name in ("brightness", "contrast", "saturation")}
        hue = uniform((batch_size,), -0.2 * s, 0.2 * s)
        # argsort of i.i.d. uniforms is a uniformly random permutation per row.
        order = torch.rand((batch_size, 4), generator=generator, device=draw_device).argsort(dim=1)
        gray, blur = bernoulli(self.gray_prob), bernoulli(self.blur_prob)
        params = ViewParams(crop=crop, flip=flip, jitter=jitter, **factors, hue=hue, order=order, gray=gray, blur=blur,
                            sigma=uniform((batch_size,), *self.blur_sigma))
        return params if target == draw_device else params.to(target)

    def _sample_crops(self, B: int, height: int, width: int, uniform: Callable[..., Tensor]) -> Tensor:
        """RandomResizedCrop's (top, left, height, width) per image: first valid attempt, else centre."""
        target_area = height * width * uniform((B, CROP_ATTEMPTS), *self.crop_scale)
        aspect = torch.exp(uniform((B, CROP_ATTEMPTS), math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])))
        w = torch.round(torch.sqrt(target_area * aspect))
        h = torch.round(torch.sqrt(target_area / aspect))
        valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = valid.int().argmax(dim=1, keepdim=True)  # argmax returns the first maximum: the first valid attempt
        h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
        # Uniform integer in [0, H - h]; the clamp guards against u * n rounding up to n in float32.
        top = torch.minimum(torch.floor(uniform((B,), 0.0, 1.0) * (height - h + 1)), height - h)
        left = torch.minimum(torch.floor(uniform((B,), 0.0, 1.0) * (width - w + 1)), width - w)
        crops = torch.stack([top, left, h, w], dim=1)
        # No attempt fits: torchvision's centre crop, the largest with an allowed aspect ratio.
        low, high = min(self.crop_ratio), max(self.crop_ratio)
        fb_h = round(width / low) if width / height < low else height
        fb_w = round(height * high) if width / height > high else width
        fallback = crops.new_tensor([(height - fb_h) // 2, (width - fb_w) // 2, fb_h, fb_w])
        return torch.where(valid.any(dim=1, keepdim=True), crops, fallback)

    def crop_flip_resize(self, images: Tensor, params: ViewParams) -> Tensor:
        """Crop, flip and resize uint8 or [0, 1] float images to float image_size x image_size: two batched matmuls.
        Resizing is separable: view = Wy @ image @ Wx^T per channel with the `resize_weights` of each crop, and a
        flip reverses the rows of Wx - what torchvision's `resized_crop(antialias=True)` + `hflip` compute."""
        batch, channels, height, width = images.shape
        size = self.image_size
        images = to_unit_float(images)
        top, left, h, w = params.crop.to(images.dtype).unbind(dim=1)
        rows = resize_weights(top, h, height, size)  # (B, S, H)
        cols = resize_weights(left, w, width, size)  # (B, S, W)
        cols = torch.where(params.flip.view(-1, 1, 1), cols.flip(1), cols)
        x = torch.bmm(images.reshape(batch, channels * height, width), cols.transpose(1, 2))  # (B, C*H, S)
        return torch.matmul(rows.unsqueeze(1), x.view(batch, channels, height, size))  # (B, C, S, S)

    def apply(self, images: Tensor, params: ViewParams) -> Tensor:
        """Apply `params` to uint8 or [0, 1] float images (B, 3, H, W); returns normalised float32 views."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = self.crop_flip_resize(images, params)
        if self.color_prob > 0 and self.color_strength > 0:
            x = _color_jitter(x, params)
        # For speed the normalisation (`normalize`'s (x - mean) / std) is not a separate pass: with grayscale it is
        # one affine colour map, folded into a single per-image colour matrix and applied by one batched matmul.
        scale = (1.0 / self.std.to(x)).view(1, 3, 1)
        eye = torch.eye(3, device=x.device, dtype=x.dtype)
        gray = torch.where(params.gray.view(-1, 1, 1), _gray_matrix(x.device, x.dtype), eye)
        x = _color_transform(x, scale * gray, (-self.mean.to(x).view(1, 3, 1) * scale).expand(x.shape[0], 3, 1))
        if self.blur_prob > 0:
            # Blurring after normalising is the same (a normalised kernel commutes with an affine map per
            # channel), so the blur runs last and only where chosen.
            blurred = _gaussian_blur(x, params.sigma.to(x.dtype), self.blur_kernel_size)
            x = torch.where(params.blur.view(-1, 1, 1, 1), blurred, x).contiguous()
        return x

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One random view per image of a batch (B, 3, H, W): `sample_params` then `apply`."""
        batch, _, height, width = images.shape
        return self.apply(images, self.sample_params(batch, height, width, generator, images.device))

    def extra_repr(self) -> str:
        """Settings shown by print(module)."""
        return (f"image_size={self.image_size}, crop_scale={self.crop_scale}, color_strength={self.color_strength}, "
                f"color_prob={self.color_prob}, gray_prob={self.gray_prob}, blur_prob={self.blur_prob}")


def reference_view(image: Tensor, params: ViewParams, index: int, augment: SimCLRAugment) -> Tensor:
    """The readable per-image torchvision path: one uint8 or [0, 1] `image` (3, H, W) with row `index` of `params`."""
    x = to_unit_float(image)
    top, left, h, w = (int(v) for v in params.crop[index].tolist())
    x = TF.resized_crop(x, top, left, h, w, [augment.image_size, augment.image_size], antialias=True)
    if params.flip[index]:
        x = TF.hflip(x)
    if params.jitter[index]:
        ops = {BRIGHTNESS: (TF.adjust_brightness, params.brightness), CONTRAST: (TF.adjust_contrast, params.contrast),
               SATURATION: (TF.adjust_saturation, params.saturation), HUE: (TF.adjust_hue, params.hue)}
        for op in params.order[index].tolist():
            adjust, values = ops[op]
            x = adjust(x, float(values[index]))
    if params.gray[index]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if params.blur[index]:
        k, sigma = augment.blur_kernel_size, float(params.sigma[index])
        x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    return TF.normalize(x, augment.mean.flatten().tolist(), augment.std.flatten().tolist())


def pil_pipeline(image_size: int = 32, color_strength: float = 0.5, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD, crop_scale: tuple[float, float] = (0.08, 1.0)) -> T.Compose:
    """The popular SimCLR repos' classic per-image PIL pipeline (CIFAR: no blur); torchvision draws its parameters."""
    s = color_strength
    return T.Compose([T.RandomResizedCrop(image_size, scale=crop_scale), T.RandomHorizontalFlip(),
                      T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                      T.RandomGrayscale(p=0.2), T.ToTensor(), T.Normalize(mean, std)])
