"""Finding a TFLite interpreter: LiteRT first, tflite-runtime as the fallback."""

from __future__ import annotations

import importlib
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Literal

from edged.errors import ModelError, RuntimeUnavailable

__all__ = ["Runtime", "RuntimeName", "load_runtime"]

RuntimeName = Literal["auto", "ai-edge-litert", "tflite-runtime"]
_MODULES = {
    "ai-edge-litert": "ai_edge_litert.interpreter",
    "tflite-runtime": "tflite_runtime.interpreter",
}
# tflite-runtime does not verify flatbuffers and segfaults on a truncated one; such runtimes
# load a model in a throwaway child process first, so a bad model never kills the daemon.
_VERIFIES_FLATBUFFERS = {"ai-edge-litert": True, "tflite-runtime": False}
_PROBE = (
    "import sys; from {module} import Interpreter; "
    "Interpreter(model_content=sys.stdin.buffer.read()).allocate_tensors()"
)


@dataclass(frozen=True, slots=True)
class Runtime:
    """One importable TFLite runtime and how to make interpreters with it."""

    name: str
    version: str
    module: Any

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    def interpreter(self, model: bytes, *, num_threads: int, xnnpack: bool) -> Any:
        """A new interpreter for `model`, tensors allocated; ModelError if the runtime refuses."""
        if not _VERIFIES_FLATBUFFERS.get(self.name, False):
            self._probe_in_child(model)
        options: dict[str, Any] = {"model_content": model, "num_threads": num_threads}
        if not xnnpack:
            options["experimental_op_resolver_type"] = (
                self.module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            )
        try:
            interpreter = self.module.Interpreter(**options)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"the {self.name} runtime refused the model: {reason}") from exc
        return interpreter

    def _probe_in_child(self, model: bytes) -> None:
        try:
            result = subprocess.run(
                [sys.executable, "-c", _PROBE.format(module=self.module.__name__)],
                input=model,
                capture_output=True,
                timeout=120,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ModelError(f"the {self.name} runtime hung loading the model") from exc
        if result.returncode < 0:
            name = signal.Signals(-result.returncode).name
            raise ModelError(
                f"the {self.name} runtime crashed ({name}) loading the model: the flatbuffer "
                "is malformed"
            )


def load_runtime(preferred: RuntimeName = "auto") -> Runtime:
    """The preferred runtime, or with "auto" LiteRT and then tflite-runtime."""
    names = list(_MODULES) if preferred == "auto" else [preferred]
    errors = []
    for name in names:
        try:
            module = importlib.import_module(_MODULES[name])
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        package = importlib.import_module(_MODULES[name].split(".")[0])
        return Runtime(name, str(getattr(package, "__version__", "unknown")), module)
    raise RuntimeUnavailable(
        "no TFLite runtime could be imported (install ai-edge-litert with "
        "`pip install 'edged[device]'`, or tflite-runtime with numpy<2): " + "; ".join(errors)
    )
