"""Training backends: the seam between medft's pipeline and the library that runs the model.

Two implementations share one small interface: ``hf`` (transformers + peft, any machine) and ``unsloth``
(Unsloth's patched kernels, CUDA only). Every GPU-only import lives inside ``job.backends.unsloth`` and
is reached only through :func:`select_backend`, so the CPU path imports nothing that needs a GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from job.config import JobConfig
from registry import logs
from registry.errors import ConfigError
from registry.records import TrainPlanRecord


@dataclass(frozen=True)
class TrainPlan:
    """Settings a backend picked for this machine, with the reason for each (logged and stored)."""

    batch_size: int
    grad_accum: int
    packing: bool
    gradient_checkpointing: bool | str
    load_in_4bit: bool
    precision: str  # "bf16", "fp16" or "fp32"
    optim: str
    compile: bool = False  # unsloth's per-block torch.compile (train.compile)
    reasons: dict[str, str] = field(default_factory=dict)

    def record(self) -> TrainPlanRecord:
        """The plan as the run record stores it (``metrics.plan``), field for field."""
        return TrainPlanRecord(**dataclasses.asdict(self))


class TrainingBackend(Protocol):
    """What the train stage needs from a backend. Implementations raise MedftError subclasses only."""

    name: str

    def plan(self, cfg: JobConfig) -> TrainPlan:
        """Resolve ``auto`` settings for the hardware found; pure, no model loaded."""
        ...

    def load(self, weights_dir: Path, cfg: JobConfig, plan: TrainPlan) -> tuple[Any, Any]:
        """Load the base model from a local safetensors directory and wrap it with fresh LoRA adapters.

        Returns ``(peft_model, tokenizer)``; the tokenizer has a pad token set.
        """
        ...

    def trainer_class(self) -> type:
        """The SFTTrainer class to use (Unsloth patches TRL's; hf returns TRL's own)."""
        ...

    def sft_args(self, cfg: JobConfig, plan: TrainPlan) -> dict[str, Any]:
        """Backend-specific ``trl.SFTConfig`` keyword arguments (precision, optimizer, checkpointing)."""
        ...

    def for_inference(self, model: Any) -> Any:
        """Switch a model to fast generation in eval mode; returns the model to call ``generate`` on."""
        ...

    def for_training(self, model: Any) -> Any:
        """Undo :meth:`for_inference` on a model that goes on training: training mode, the gradient
        checkpointing its plan chose at :meth:`load`, and no decoding state left on the GPU. Returns the model."""
        ...

    def load_for_inference(self, weights_dir: Path, *, max_seq_length: int, load_in_4bit: bool = False,
                           trust_remote_code: bool = False) -> Any:
        """A causal LM from a local safetensors folder, on the GPU when there is one, ready for an adapter.

        ``weights_dir`` was checked before (:mod:`job.inference.checks`): it holds safetensors weights only,
        and every load passes ``use_safetensors``. ``max_seq_length`` is the length the model was trained
        for; ``load_in_4bit`` asks for the 4-bit weights an adapter trained against (a backend without 4-bit
        inference loads the 16-bit ones, which the adapter applies to as well). ``trust_remote_code`` is
        passed on as given. Call :meth:`for_inference` on the result (or the adapter wrapped around it).
        """
        ...


def unsloth_available() -> bool:
    """CUDA present and unsloth installed, checked without importing unsloth (it fails without a GPU)."""
    if importlib.util.find_spec("unsloth") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _routed(backend: TrainingBackend) -> TrainingBackend:
    """``backend``, once transformers' warnings log as medft events: only now, because unsloth (imported by its
    backend) must come before transformers."""
    logs.route_library_logs()
    return backend


def select_backend(cfg: JobConfig) -> TrainingBackend:
    """Return the backend ``model.backend`` names; ``auto`` picks unsloth when it can run here.

    Raises ConfigError when ``unsloth`` is asked for on a machine that cannot run it.
    """
    name = cfg.model.backend
    if name == "auto":
        name = "unsloth" if unsloth_available() else "hf"
    if name == "unsloth":
        if not unsloth_available():
            raise ConfigError("model.backend: unsloth needs a CUDA GPU and the medft[gpu] extra; "
                              "use --set model.backend=hf (or auto) on this machine")
        from job.backends.unsloth import UnslothBackend  # GPU-only imports stay behind this line

        return _routed(UnslothBackend())
    from job.backends.hf import HFBackend

    return _routed(HFBackend())


def inference_backend() -> TrainingBackend:
    """The backend that runs a model for ``generate``/``chat``: unsloth when it can run here, else hf."""
    if unsloth_available():
        from job.backends.unsloth import UnslothBackend  # imports unsloth before transformers and peft

        return _routed(UnslothBackend())
    from job.backends.hf import HFBackend

    return _routed(HFBackend())
