"""Checkpoints of a reconstruction run: after every unit, the state of every quantizer and of the
random generators, so that `--resume` continues from the last finished unit and produces the same
file as an uninterrupted run.

A checkpoint is `state.pt` (tensors only, loaded with `weights_only=True`: no pickled code) and
`state.json` (what run it belongs to, how many units are done, and the SHA-256 of `state.pt`). Both
are written atomically; a checkpoint whose hash or run does not match is discarded with a message.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import first_line
from .files import write_atomically
from .quantizers import QuantizerSet

STATE, INDEX = "state.pt", "state.json"
log = logging.getLogger(__name__)


@dataclass
class Resumed:
    completed: int
    results: list[dict]
    generator_state: torch.Tensor
    device_state: torch.Tensor  # torch's default generator on the run's device


class Checkpointer:
    def __init__(self, folder: Path, fingerprint: str):
        self.folder = folder
        self.fingerprint = fingerprint

    def save(self, completed: int, quantizers: QuantizerSet, results: list[dict], generator: torch.Generator,
             device: torch.device) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        state = quantizer_state(quantizers)
        state["rng/generator"] = generator.get_state()
        state["rng/torch"] = device_rng_state(device)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        write_atomically(self.folder / STATE, payload, private=True)
        index = {"fingerprint": self.fingerprint, "completed": completed, "results": results,
                 "sha256": hashlib.sha256(payload).hexdigest()}
        write_atomically(self.folder / INDEX, json.dumps(index).encode(), private=True)

    def load(self, quantizers: QuantizerSet) -> Resumed | None:
        """The saved progress, with the quantizers restored; None when there is nothing usable."""
        index_path, state_path = self.folder / INDEX, self.folder / STATE
        if not index_path.exists() or not state_path.exists():
            log.info("no checkpoint in %s: starting from the first unit", self.folder)
            return None
        try:
            index = json.loads(index_path.read_text())
            payload = state_path.read_bytes()
            if hashlib.sha256(payload).hexdigest() != index["sha256"]:
                raise ValueError("hash mismatch")
            if index["fingerprint"] != self.fingerprint:
                log.info("checkpoint in %s belongs to another model, data or settings: discarded", self.folder)
                return None
            state = torch.load(state_path, weights_only=True)
            restore_quantizers(quantizers, state)
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            log.info("checkpoint in %s is corrupted (%s): discarded", self.folder, first_line(err))
            return None
        log.info("resuming after unit %d from %s", index["completed"], self.folder)
        return Resumed(index["completed"], index["results"], state["rng/generator"], state["rng/torch"])

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def device_rng_state(device: torch.device) -> torch.Tensor:
    """The state of torch's default generator on `device`, which draws the seeds of QDrop's masks."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_device_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def quantizer_state(quantizers: QuantizerSet) -> dict[str, torch.Tensor]:
    state = {}
    for kind, group in (("weight", quantizers.weights), ("activation", quantizers.activations)):
        for name, quantizer in group.items():
            state[f"{kind}/{name}/scale"] = quantizer.scale.detach().cpu().clone()
            state[f"{kind}/{name}/zero_point"] = quantizer.zero_point.detach().cpu().clone()
            if quantizer.alpha is not None:
                state[f"{kind}/{name}/alpha"] = quantizer.alpha.detach().cpu().clone()  # hardened
    return state


def restore_quantizers(quantizers: QuantizerSet, state: dict[str, torch.Tensor]) -> None:
    for kind, group in (("weight", quantizers.weights), ("activation", quantizers.activations)):
        for name, quantizer in group.items():
            with torch.no_grad():
                quantizer.scale.copy_(state[f"{kind}/{name}/scale"])
                quantizer.zero_point.copy_(state[f"{kind}/{name}/zero_point"])
            alpha = state.get(f"{kind}/{name}/alpha")
            quantizer.alpha = None if alpha is None else torch.nn.Parameter(alpha.to(quantizer.scale.device),
                                                                            requires_grad=False)
            quantizer.soft_rounding = None


def run_fingerprint(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()
