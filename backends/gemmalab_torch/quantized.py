"""The quantized linear (blockwise affine int4 / int8) of the PyTorch backend: a linears.Wrapper.

The numbers are the core's (gemmalab.quantize, equal to MLX's ``mx.quantize``): per group g of
``group_size`` inputs of a row, a scale s_g and a bias b_g in the model's dtype and codes q in [0, 2^bits):
w = s_g * q + b_g. Which of torch 2.13's weight-only kernels multiplies by them, and why:

* int4, bfloat16, CPU: ``torch._weight_int4pack_mm_for_cpu`` (codes packed by
  ``torch._convert_weight_to_int4pack_for_cpu``, half a byte per weight). It is group-wise and computes
  ``w = (q - 8) * scale + zero`` from ``scales_and_zeros`` [in / g, out, 2] in the activations' dtype
  (torch's tinygemm convention: torch/testing/_internal/common_quantization.py ``_group_quantize_tensor``
  makes ``zero = min + 8 * scale``), dequantizing and accumulating in float32. So the affine numbers feed
  it as they are: scale = s, zero = b + 8 s (computed in float32, stored in the model's dtype: the one
  rounding it adds is bfloat16's of each group's offset, the size of bfloat16's own rounding of a weight).
  Its CPU layout needs out % 16 == 0: the codes are padded with zero rows up to a multiple of 64 (Gemma's
  dimensions all are already) and the output sliced back. Its bfloat16 kernel is vectorised (AVX2,
  AVX-512, NEON); a one-token product reads half a byte per weight.
* int4, float32 / float16, CPU: the same kernel computes them exactly too (``kernel="int4pack"``: in
  float32 x @ W.T up to float32 rounding of ``zero``), but for those dtypes it is a scalar loop (tens of
  times slower than the dense matmul in a quick check here), so by default they dequantize per call, as below.
* int8 (CPU and CUDA): ``torch._weight_int8pack_mm`` is per-output-channel symmetric
  (``x @ (w_int8 * scales[:, None]).T``, one scale per row, no zero point): group-wise affine numbers do
  not map onto it (a row has in / g different scales and biases). So int8 keeps the codes as uint8 (a byte
  per weight) and dequantizes them per call exactly as gemmalab.quantize.dequantize does (the model's
  dtype, rounded after the product and after the sum), then ``F.linear``: the same function, bit for bit,
  as a dense layer holding ``fuse()``, with a transient dense weight of one linear at a time
  (``torch.compile`` can fuse the dequantization into the matmul). int4 on this path keeps two codes a byte.
* int4, bfloat16, CUDA (untested: this machine has no GPU): ``torch._weight_int4pack_mm`` (tinygemm),
  which takes bfloat16 activations only, with the same (q - 8) * scale + zero convention and the codes
  packed by ``torch._convert_weight_to_int4pack`` from uint8 [out, in / 2] (even input in the high
  nibble). Other dtypes on CUDA dequantize per call.

``kernel`` names the path a wrapper took ("int4pack_cpu", "int4pack_cuda" or "dequantize"); ``from_base``
takes ``kernel="auto"`` (the choice above), ``"int4pack"`` or ``"dequantize"``. The int4 kernels have no
derivative: they run in a ``torch.autograd.Function`` whose backward is ``grad @ W`` with the dequantized
W, so gradients reach the layer's input. The quantized numbers are buffers, never parameters: frozen, and
no optimizer sees them. The packed layout is the device's: move a model before wrapping it, not after.

``QUANTIZED`` maps the core's wrapper name to the class (the lead wires it into wrappers.WRAPPERS).
"""

from __future__ import annotations

import functools
import warnings

import ml_dtypes
import numpy as np
import torch
from torch import Tensor, nn

from gemmalab.errors import BackendError, InputError
from gemmalab.quantize import check_shape, checked_arrays, pack, quantize, quantized_shapes, unpack

from .linears import Wrapper

_BF16 = np.dtype(ml_dtypes.bfloat16)
_ROWS = 64  # int4 CPU layouts pack rows in blocks of up to 64: pad the output features to a multiple


def _to_torch(array: np.ndarray, dtype: torch.dtype | None, device: torch.device) -> Tensor:
    array = np.ascontiguousarray(array)
    bf16 = array.dtype == _BF16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays make from_numpy warn; we copy
        tensor = torch.from_numpy(array.view(np.int16) if bf16 else array)
    if bf16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.to(device=device, dtype=dtype or tensor.dtype, copy=True)


def _to_numpy(tensor: Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(_BF16).copy()
    return tensor.numpy().copy()


def dequantize_codes(codes: Tensor, scales: Tensor, biases: Tensor) -> Tensor:
    """``s * q + b`` for codes [out, in] and scales, biases [out, in / g] in the scales' dtype, rounded
    after the product and after the sum: gemmalab.quantize.dequantize_codes (and ``mx.dequantize``)."""
    out_features, groups = scales.shape
    dtype = scales.dtype
    q = codes.reshape(out_features, groups, -1).float()
    product = (q * scales.float()[..., None]).to(dtype)
    return (product.float() + biases.float()[..., None]).to(dtype).reshape(out_features, -1)


# --- the int4 CPU kernel's packed layout -----------------------------------------------------------------
# torch._convert_weight_to_int4pack_for_cpu packs [N, K] codes into uint8 [N, K / 2] in blocks of rows that
# depend on the CPU capability it dispatches to (aten/src/ATen/native/cpu/int4mm_kernel.cpp,
# weight_to_int4pack_kernel): AVX-512 blocks of 64 rows, byte d of a column holding rows d and d + 32 and byte
# 16 + d rows d + 16 and d + 48; AVX2 blocks of 32 rows, byte d rows d and d + 16; otherwise blocks of
# 4 x (float lanes) rows in pairs (rows 2i and 2i + 1). Which one this process uses is found once by packing a
# probe and decoding it with each; ``fuse`` decodes with it (and every wrapper checks its own codes).
def _decode_lanes(packed: Tensor, rows: int, cols: int, block: int) -> Tensor:
    lanes = packed.reshape(rows // block, cols, block // 2)
    low, high = lanes & 0xF, lanes >> 4
    if block == 64:
        order = torch.cat([low[..., :16], low[..., 16:], high[..., :16], high[..., 16:]], -1)
    else:
        order = torch.cat([low, high], -1)
    return order.permute(0, 2, 1).reshape(rows, cols)


def _decode_pairs(packed: Tensor, rows: int, cols: int, block: int) -> Tensor:
    pairs = packed.reshape(rows // block, cols, block // 2)
    order = torch.stack([pairs & 0xF, pairs >> 4], -1).reshape(rows // block, cols, block)
    return order.permute(0, 2, 1).reshape(rows, cols)


_LAYOUTS = {
    "avx512": functools.partial(_decode_lanes, block=64),
    "avx2": functools.partial(_decode_lanes, block=32),
    "pairs16": functools.partial(_decode_pairs, block=16),
    "pairs32": functools.partial(_decode_pairs, block=32),
    "pairs64": functools.partial(_decode_pairs, block=64),
}


@functools.cache
def _cpu_int4_layout() -> str:
    probe = torch.from_numpy(np.random.default_rng(0).integers(0, 16, (128, 64)).astype(np.int32))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for name, decode in _LAYOUTS.items():
        if torch.equal(decode(packed, 128, 64).to(torch.int32), probe):
            return name
    raise BackendError(
        "this torch packs int4 weights for CPU in a layout gemmalab does not know: quantize with bits=8, "
        "or use a torch version whose int4 layout is known (2.5 to 2.13)"
    )


def _cuda_int4_codes(packed: Tensor, scales_and_zeros: Tensor, group_size: int, in_features: int) -> Tensor:
    """The codes [rows, in] held by a tinygemm-packed CUDA weight, read through the kernel itself: unit
    scales and zeros 8 make it compute (q - 8) * 1 + 8 = q, exactly, on slices of the identity. (Untested.)"""
    unit = torch.empty_like(scales_and_zeros)
    unit[..., 0], unit[..., 1] = 1.0, 8.0
    cols = []
    for start in range(0, in_features, 1024):
        count = min(1024, in_features - start)
        eye = torch.zeros(count, in_features, dtype=torch.bfloat16, device=packed.device)
        eye[:, start: start + count].fill_diagonal_(1.0)  # rows start .. start + count of the identity
        cols.append(torch._weight_int4pack_mm(eye, packed, group_size, unit).T)
    return torch.cat(cols, 1).round().to(torch.uint8)


def _kernel(choice: str, bits: int, device: torch.device, dtype: torch.dtype) -> str:
    """The path a wrapper of these numbers takes (the module docstring says why); shapes only on 'meta'."""
    if choice not in ("auto", "int4pack", "dequantize"):
        raise InputError(f"unknown quantized kernel {choice!r}: choose 'auto', 'int4pack' or 'dequantize'")
    if device.type == "meta":
        return "dequantize"
    int4 = {"cpu": "int4pack_cpu", "cuda": "int4pack_cuda"}.get(device.type)
    fits = bits == 4 and (device.type == "cpu" or (device.type == "cuda" and dtype == torch.bfloat16))
    if choice == "auto":
        return int4 if fits and dtype == torch.bfloat16 else "dequantize"
    if choice == "int4pack":
        if not fits:
            raise InputError(
                f"torch's int4 kernel takes 4-bit weights on CPU, or bfloat16 on CUDA; not {bits}-bit {dtype} "
                f"on {device.type}: use kernel='dequantize' (or 'auto')"
            )
        return int4  # type: ignore[return-value]
    return "dequantize"


class _Int4Matmul(torch.autograd.Function):
    """x [M, K] @ W.T through an int4 kernel; backward: grad [M, N] @ W with the dequantized W."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantizedLinear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer._kernel_matmul(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad @ ctx.layer.fuse().to(grad.dtype), None


class QuantizedLinear(Wrapper):
    """A linear whose weight is stored blockwise-affine quantized: ``y = x @ dequantize(...).T``. Buffers
    (frozen, not parameters): ``weight`` (the codes in the kernel's layout), ``scales`` and ``biases``
    [out, in / group_size] in the model's dtype, and for the int4 kernels ``scales_and_zeros``. The module
    docstring says which kernel runs and why; ``kernel`` names it."""

    def __init__(
        self, codes: Tensor | None, scales: Tensor, biases: Tensor, *, bits: int, group_size: int,
        in_features: int, out_features: int, kernel: str = "auto",
    ) -> None:
        """``codes`` uint8 [out, in] (None on the 'meta' device: shapes only); scales, biases [out, in / g];
        ``kernel`` as ``from_base`` takes it."""
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = in_features, out_features
        device, dtype = scales.device, scales.dtype
        self.register_buffer("scales", scales)
        self.register_buffer("biases", biases)
        self.kernel = _kernel(kernel, bits, device, dtype)
        if self.kernel == "dequantize":
            self.register_buffer("weight", self._plain_weight(codes, device))
            return
        rows = -(-out_features // _ROWS) * _ROWS  # the int4 layouts take whole blocks of rows
        self.register_buffer("weight", self._packed_weight(codes, rows, device))
        # scale = s and zero = b + 8 s (float32, then the model's dtype), [in / g, rows, 2]; padded rows give 0
        pairs = torch.zeros(in_features // group_size, rows, 2, dtype=dtype, device=device)
        pairs[:, :out_features, 0] = scales.T
        pairs[:, :out_features, 1] = (biases.float() + 8.0 * scales.float()).T.to(dtype)
        self.register_buffer("scales_and_zeros", pairs)
        if codes is not None and self.kernel == "int4pack_cpu" and not torch.equal(self.codes(), codes):
            raise BackendError("torch's int4 CPU packing did not round-trip the codes: quantize with bits=8")

    def _plain_weight(self, codes: Tensor | None, device: torch.device) -> Tensor:
        """The codes as uint8: one a byte (int8), two a byte (int4: the even input in the low nibble)."""
        if codes is None:
            return torch.empty(self.out_features, self.in_features * self.bits // 8, dtype=torch.uint8, device=device)
        return codes.contiguous() if self.bits == 8 else (codes[:, ::2] | (codes[:, 1::2] << 4)).contiguous()

    def _packed_weight(self, codes: Tensor | None, rows: int, device: torch.device) -> Tensor:
        """The codes in the int4 kernel's layout, padded with zero rows to ``rows``."""
        cols = self.in_features
        if self.kernel == "int4pack_cpu":
            if codes is None:
                return torch.empty(rows, cols // 2, dtype=torch.uint8, device=device)
            # blocks of 64 rows pack independently into consecutive bytes: pack a slice of rows at a time
            # (the kernel takes int32 codes: 4 bytes a weight, so never the whole matrix at once)
            step = _ROWS * max(1, (1 << 22) // (_ROWS * cols))
            parts = []
            for start in range(0, rows, step):
                part = torch.zeros(min(step, rows - start), cols, dtype=torch.int32, device=device)
                held = codes[start: start + step]
                part[: held.shape[0]] = held
                parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(part, 1))
            return torch.cat(parts)
        tiles = self._inner_k_tiles()
        if codes is None:
            return torch.empty(rows // 8, cols // (tiles * 16), 32, tiles // 2, dtype=torch.int32, device=device)
        padded = torch.zeros(rows, cols, dtype=torch.uint8, device=device)
        padded[: self.out_features] = codes
        high_low = (padded[:, ::2] << 4) | padded[:, 1::2]  # tinygemm's uint8 [N, K / 2]: even input high
        return torch.ops.aten._convert_weight_to_int4pack(high_low.contiguous(), tiles)

    def _inner_k_tiles(self) -> int:
        return next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)

    @classmethod
    def from_base(
        cls, base: nn.Module, *, bits: int = 4, group_size: int = 64, kernel: str = "auto"
    ) -> QuantizedLinear:
        """Quantize the weight of ``base`` (an ``nn.Linear`` without bias) with gemmalab.quantize.quantize;
        scales and biases in the weight's dtype, on its device (on 'meta': shapes only). ``kernel``:
        "auto" (the module docstring's choice), "int4pack" (torch's int4 kernel, 4 bits on CPU, or bfloat16
        on CUDA) or "dequantize" (dequantize per call, then F.linear)."""
        if not isinstance(base, nn.Linear) or base.bias is not None:
            raise InputError(f"QuantizedLinear wraps a plain linear (nn.Linear without bias), got {type(base).__name__}")
        weight = base.weight
        out_features, in_features = weight.shape
        bits, group_size = check_shape((out_features, in_features), bits, group_size)
        options = dict(bits=bits, group_size=group_size, in_features=in_features, out_features=out_features,
                       kernel=kernel)
        _kernel(kernel, bits, weight.device, weight.dtype)  # refuse a bad choice before quantizing
        if weight.device.type == "meta":
            shape = quantized_shapes(out_features, in_features, bits, group_size)["scales"]
            empty = torch.empty(shape, dtype=weight.dtype, device="meta")
            return cls(None, empty, empty.clone(), **options)
        packed, scales, biases = quantize(_to_numpy(weight), bits, group_size)
        device = weight.device
        codes = _to_torch(unpack(packed, bits), torch.uint8, device)
        return cls(codes, _to_torch(scales, weight.dtype, device), _to_torch(biases, weight.dtype, device), **options)

    @classmethod
    def from_arrays(
        cls, packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, *, bits: int, group_size: int,
        dtype: str | None = None, device: str | torch.device | None = None, kernel: str = "auto",
    ) -> QuantizedLinear:
        """The wrapper holding exactly these numbers, re-quantizing nothing: MLX-layout arrays as numpy
        (packed uint32 [out, in * bits / 32], scales and biases [out, in / group_size]), e.g. a quantized
        checkpoint's (gemmalab.checkpoint.Weights.quantized_arrays), on ``device`` (default CPU). ``dtype``
        (a gemmalab dtype name) casts the scales and biases to the model's dtype; default: theirs. The
        codes are unpacked to uint8 on the way (one linear's, transiently), never to a dense float weight;
        ``kernel`` as ``from_base`` takes it."""
        packed, scales, biases, bits, group_size = checked_arrays(packed, scales, biases, bits, group_size, dtype)
        out_features, in_features = packed.shape[0], packed.shape[1] * 32 // bits
        target = torch.device(device or "cpu")
        scales_t, biases_t = _to_torch(scales, None, target), _to_torch(biases, None, target)
        _kernel(kernel, bits, target, scales_t.dtype)  # refuse a bad choice before unpacking
        codes = _to_torch(unpack(packed, bits), torch.uint8, target)
        return cls(codes, scales_t, biases_t, bits=bits, group_size=group_size, in_features=in_features,
                   out_features=out_features, kernel=kernel)

    # -- the codes, and the quantized numbers in MLX's layout ----------------------------------------------
    def codes(self) -> Tensor:
        """The codes uint8 [out, in], whatever layout the kernel keeps them in."""
        if self.kernel == "int4pack_cpu":
            rows = self.weight.shape[0]
            decoded = _LAYOUTS[_cpu_int4_layout()](self.weight, rows, self.in_features)
            return decoded[: self.out_features].to(torch.uint8)
        if self.kernel == "int4pack_cuda":
            codes = _cuda_int4_codes(self.weight, self.scales_and_zeros, self.group_size, self.in_features)
            return codes[: self.out_features]
        if self.bits == 8:
            return self.weight
        return torch.stack([self.weight & 0xF, self.weight >> 4], -1).reshape(self.out_features, self.in_features)

    def quantized(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(packed uint32, scales, biases)`` as numpy in MLX's layout: what gemmalab.quantize.quantize gave."""
        return pack(_to_numpy(self.codes()), self.bits), _to_numpy(self.scales), _to_numpy(self.biases)

    # -- computing --------------------------------------------------------------------------------------------
    def _kernel_matmul(self, x: Tensor) -> Tensor:
        """x [M, in] (contiguous) @ W.T through the int4 kernel: [M, out]."""
        if self.kernel == "int4pack_cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x, self.weight, self.group_size, self.scales_and_zeros)
        return y[:, : self.out_features]

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == "dequantize":
            return nn.functional.linear(x, self.fuse())
        if x.dtype != self.scales.dtype:
            raise InputError(f"a {self.scales.dtype} quantized linear got {x.dtype} inputs: cast them to the model's dtype")
        flat = x.reshape(-1, self.in_features).contiguous()
        y = _Int4Matmul.apply(flat, self) if torch.is_grad_enabled() and flat.requires_grad else self._kernel_matmul(flat)
        return y.reshape(*x.shape[:-1], self.out_features)

    def fuse(self) -> Tensor:
        """The dequantized weight [out, in] in the model's dtype: gemmalab.quantize.dequantize's numbers."""
        return dequantize_codes(self.codes(), self.scales, self.biases)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, kernel={self.kernel}")


QUANTIZED: dict[str, type[Wrapper]] = {"quantized": QuantizedLinear}

__all__ = ["QUANTIZED", "QuantizedLinear", "dequantize_codes"]
