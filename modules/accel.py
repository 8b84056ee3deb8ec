"""Which accelerator a module runs on: ONNX Runtime execution providers and LiteRT delegates, chosen per device.

Pure: the caller passes what the runtime offers (``onnxruntime.get_available_providers()``, the delegate
libraries it could find), the device's facts and the module's preferences; :func:`choose` returns the
ordered list to try, always ending with the CPU, and why each preference was skipped. The runner tries the
list in order and reports the one it got (``Runner.accelerator``), which the agent reports to the hub.

Preferences come from the module's configuration (the desired state's per-module ``config``, see
docs/protocol.md), keys:

* ``accelerators``: comma-separated, most wanted first: ``cuda,tensorrt,openvino,coreml,dml,rocm,qnn,
  nnapi,xnnpack`` (ONNX Runtime provider names are accepted too) or ``gpu,edgetpu,hexagon,xnnpack`` (LiteRT);
  ``cpu`` is always the last resort and need not be named.
* ``threads``: intra-op threads (ONNX Runtime) / interpreter threads (LiteRT), 1..64; default 1.

A device's facts may carry ``accelerators`` (comma-separated hardware it has, e.g. ``cuda,npu``, set by the
integrator with ``--fact``): when present, a preference needing hardware the device does not list is skipped
even if the runtime build offers it. Without that fact the runtime's own list decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CPU = "CPUExecutionProvider"
MAX_THREADS = 64

ONNX_ALIASES = {
    "cpu": CPU, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider",
    "rocm": "ROCMExecutionProvider", "qnn": "QNNExecutionProvider", "nnapi": "NnapiExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}
# the hardware fact each provider or delegate needs ("" = runs on the CPU, never ruled out by the device's facts)
ONNX_HARDWARE = {
    CPU: "", "XnnpackExecutionProvider": "", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda",
    "OpenVINOExecutionProvider": "openvino", "CoreMLExecutionProvider": "coreml", "DmlExecutionProvider": "dml",
    "ROCMExecutionProvider": "rocm", "QNNExecutionProvider": "npu", "NnapiExecutionProvider": "npu",
}
# LiteRT delegates: name -> (shared library to load, hardware fact it needs); "cpu" is the interpreter's own kernels
TFLITE_DELEGATES = {
    "gpu": ("libtensorflowlite_gpu_delegate.so", "gpu"),
    "edgetpu": ("libedgetpu.so.1", "edgetpu"),
    "hexagon": ("libhexagon_interface.so", "npu"),
}
TFLITE_CPU = "cpu"  # LiteRT's built-in CPU kernels (XNNPACK by default): the last resort


class AccelError(ValueError):
    """A module configuration whose accelerator settings cannot be understood."""


@dataclass(frozen=True)
class Preferences:
    accelerators: tuple[str, ...] = ()  # most wanted first, as written (aliases or runtime names)
    threads: int = 1


@dataclass(frozen=True)
class Choice:
    order: tuple[str, ...]  # what to try, in order; the last is always the CPU
    skipped: dict[str, str] = field(default_factory=dict)  # preference -> why it is not tried
    threads: int = 1

    def describe(self, got: str) -> str:
        """What the hub sees: the one in use, and why the preferred ones were not."""
        notes = "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        return f"{got} ({notes})" if notes else got


def preferences(config: Mapping[str, Any] | None) -> Preferences:
    """The accelerator preferences in a module's configuration; AccelError names a bad value."""
    config = config or {}
    raw = config.get("accelerators", "")
    if not isinstance(raw, str):
        raise AccelError(f"config accelerators must be a comma-separated string, not {type(raw).__name__}")
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    threads = config.get("threads", 1)
    try:
        threads = int(threads)
    except (TypeError, ValueError):
        raise AccelError(f"config threads must be an integer, not {threads!r}") from None
    if not 1 <= threads <= MAX_THREADS:
        raise AccelError(f"config threads must be 1..{MAX_THREADS}, not {threads}")
    return Preferences(names, threads)


def _hardware(facts: Mapping[str, str]) -> set[str] | None:
    raw = facts.get("accelerators")
    return None if raw is None else {h.strip().lower() for h in raw.split(",") if h.strip()}


def choose(runtime: str, prefs: Preferences, available: list[str], facts: Mapping[str, str]) -> Choice:
    """The ordered accelerators to try for ``runtime`` ("onnx", "tflite"), CPU last; others run on the CPU.

    ``available``: onnx, the providers this onnxruntime build offers; tflite, the delegate names whose
    library was found. A preference is skipped (with the reason) if unknown, not offered by the runtime, or
    needing hardware the device's ``accelerators`` fact does not list.
    """
    hardware = _hardware(facts)
    order: list[str] = []
    skipped: dict[str, str] = {}
    cpu = CPU if runtime == "onnx" else TFLITE_CPU
    for wanted in prefs.accelerators:
        if runtime == "onnx":
            name = ONNX_ALIASES.get(wanted.lower(), wanted)
            need = ONNX_HARDWARE.get(name)
        elif runtime == "tflite":
            name = wanted.lower()
            need = TFLITE_DELEGATES[name][1] if name in TFLITE_DELEGATES else "" if name in ("cpu", "xnnpack") else None
            if name == "xnnpack":
                name = TFLITE_CPU
        else:
            skipped[wanted] = f"the {runtime} runtime has no accelerators"
            continue
        if name == cpu or name in order:
            continue
        if need is None:
            skipped[wanted] = "unknown accelerator"
        elif name not in available:
            skipped[wanted] = "not available in this runtime build"
        elif need and hardware is not None and need not in hardware:
            skipped[wanted] = f"the device does not list {need!r} in its accelerators fact"
        else:
            order.append(name)
    return Choice((*order, cpu), skipped, prefs.threads)
