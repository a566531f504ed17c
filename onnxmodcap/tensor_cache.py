"""The tensors reconstruction trains on: every unit's inputs and outputs over all calibration
images, kept in memory up to a budget and spilled to memory-mapped files beyond it
(`TensorCache`), carried from unit to unit as the float or the quantized model computes them
(`TensorStream`), and gathered per unit into `UnitData`."""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .mirror import NetworkMirror, UnitMirror, as_tuple

if TYPE_CHECKING:
    from .pdquant import FloatRest

DEFAULT_CACHE_BYTES = 4 << 30


class CachedTensor:
    """A tensor of all calibration images, in memory or memory-mapped from a .npy file; indexing
    with a slice or an index tensor gives a torch tensor, channels-last where it is image-shaped
    (see `image_layout`)."""

    def __init__(self, data: torch.Tensor | np.ndarray, path: Path | None = None):
        self.data = data
        self.path = path

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(self.data, torch.Tensor):
            return gather_rows(self.data, index) if isinstance(index, torch.Tensor) else self.data[index]
        rows = index.numpy() if isinstance(index, torch.Tensor) else index
        return image_layout(torch.from_numpy(np.array(self.data[rows])))  # a writable copy of the mapped rows


def image_layout(tensor: torch.Tensor) -> torch.Tensor:
    """Image-shaped (4-D) tensors in channels-last memory layout, the same values. At real
    resolution oneDNN runs a convolution's forward and backward faster in it: on 32 images of 32
    channels at 120x120, one thread, a depthwise 3x3 in 49 ms against 86 ms, a pointwise one in 38
    against 70 (docs/benchmarks/reconstruct.md, "Layout"). On 14x14 and 7x7 maps of a ResNet-50 it is 5-36 %
    slower; one layout for every unit keeps the data path simple."""
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor


def gather_rows(data: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of `data`, keeping a channels-last layout (index_select itself returns a
    contiguous tensor, transposing every row). index_select takes a third of the time of advanced
    indexing for a batch of rows (2.8 against 7.4 µs on 1024x512, 10.3 against 30.0 µs on
    1024x64x7x7, one thread)."""
    if data.dim() == 4 and data.is_contiguous(memory_format=torch.channels_last):
        return torch.index_select(data.permute(0, 2, 3, 1), 0, index).permute(0, 3, 1, 2)
    return torch.index_select(data, 0, index)


class TensorCache:
    """Keeps cached unit inputs and outputs in memory up to `budget` bytes and spills the rest to
    .npy files in `folder`, so large models with many calibration images fit in RAM."""

    def __init__(self, budget: int, folder: Path):
        self.budget = budget
        self.folder = folder
        self.used = 0
        self.files = 0

    def __enter__(self) -> TensorCache:
        shutil.rmtree(self.folder, ignore_errors=True)  # left behind by a killed run
        return self

    def __exit__(self, *exc) -> None:
        """Remove every spilled file, also after an interrupted or failed run."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def store(self, batches: Iterable[Sequence[torch.Tensor]], count: int) -> list[CachedTensor]:
        """Gather consecutive row batches of one or more float tensors of `count` rows each. Every
        batch is written into place as it arrives, so no tensor is ever held twice."""
        stored: list[CachedTensor] = []
        start = 0
        for batch in batches:
            if not stored:
                stored = [self.allocate((count, *tensor.shape[1:])) for tensor in batch]
            for cached, tensor in zip(stored, batch):
                cached.data[start:start + len(tensor)] = tensor if cached.path is None else tensor.numpy()
            start += len(batch[0])
        for cached in stored:
            if cached.path is not None:
                cached.data.flush()
                cached.data = np.load(cached.path, mmap_mode="r")
        return stored

    def store_graph_inputs(self, graph_inputs: dict[str, torch.Tensor]) -> dict[str, CachedTensor]:
        """The calibration images, stored once for the float and the quantized stream alike."""
        return {name: self.store([(value,)], len(value))[0] for name, value in graph_inputs.items()}

    def allocate(self, shape: tuple[int, ...]) -> CachedTensor:
        size = math.prod(shape) * 4  # float32
        if self.used + size <= self.budget:
            self.used += size
            memory_format = torch.channels_last if len(shape) == 4 else torch.contiguous_format
            return CachedTensor(torch.empty(shape, memory_format=memory_format))
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.folder / f"{self.files}.npy"
        self.files += 1
        return CachedTensor(np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape), path)

    def release(self, cached: CachedTensor) -> None:
        """Free `cached`; once only, as both streams release the graph inputs they share."""
        if cached.data is None:
            return
        if cached.path is None:
            self.used -= cached.data.numel() * cached.data.element_size()
        else:
            cached.path.unlink(missing_ok=True)
        cached.data = None


class TensorStream:
    """The tensors between units for all calibration images, as the float or the quantized model
    computes them `batch_size` images at a time, starting from the stored graph inputs (see
    `TensorCache.store_graph_inputs`); tensors no later unit reads are released."""

    def __init__(self, mirror: NetworkMirror, cache: TensorCache, graph_inputs: dict[str, CachedTensor],
                 batch_size: int):
        self.mirror = mirror
        self.cache = cache
        self.batch_size = batch_size
        self.tensors = dict(graph_inputs)
        self.retired: list[CachedTensor] = []  # no longer needed, but the caller may read them until the next step

    def inputs_of(self, unit: UnitMirror) -> list[CachedTensor]:
        return [self.tensors[name] for name in unit.unit.inputs]

    def advance(self, index: int, unit: UnitMirror, quantized: bool, device: torch.device) -> list[CachedTensor]:
        for cached in self.retired:
            self.cache.release(cached)
        inputs = self.inputs_of(unit)
        with unit.quantization(quantized):
            outputs = self.cache.store(run_in_batches(unit, inputs, device, self.batch_size), len(inputs[0]))
        self.tensors.update(zip(unit.unit.outputs, outputs))
        needed = self.mirror.needed_after[index]
        self.retired = [self.tensors.pop(name) for name in list(self.tensors) if name not in needed]
        return outputs


def run_in_batches(unit: UnitMirror, inputs: list[CachedTensor], device: torch.device,
                   batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """The unit's outputs over all images, one batch at a time: a unit holds its every intermediate
    tensor of the batch until it returns, which at 640x640 is tens of MB per image and tensor."""
    with torch.no_grad():
        for start in range(0, len(inputs[0]), batch_size):
            result = unit(*(t[start:start + batch_size].to(device) for t in inputs))
            yield tuple(r.cpu() for r in as_tuple(result))


@dataclass
class UnitData:
    """The tensors one unit trains on, rows aligned with the calibration images: its quantized
    input, the float counterpart QDrop mixes in, the training target, and the float output the
    reported loss is measured against. pdquant adds the float rest of the network. A float input
    that is the very CachedTensor of its quantized input (a graph input, the same images in both
    networks) has nothing to mix in."""

    quantized_inputs: list[CachedTensor]
    float_inputs: list[CachedTensor]
    targets: list[CachedTensor]
    reference_outputs: list[CachedTensor]
    rest: FloatRest | None = None
    correction: str = ""
    correction_seconds: float = 0.0
    temporary: list[CachedTensor] = field(default_factory=list)  # released after the unit
