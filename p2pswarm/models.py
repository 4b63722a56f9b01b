"""Loading a policy: the embedded default, a local folder, or a Hugging Face hub name; device and dtype."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from p2pswarm.errors import UserError

if TYPE_CHECKING:  # torch loads lazily so that `p2pswarm --help` answers at once
    import torch

log = logging.getLogger(__name__)

EMBEDDED = "embedded"


class ModelError(UserError, RuntimeError):
    pass


def embedded_path() -> Path:
    return Path(str(resources.files("p2pswarm.assets").joinpath("default_policy")))


def resolve(name_or_path: str) -> str:
    """`embedded` means the shipped default policy; anything else is a folder or a hub name."""
    if name_or_path == EMBEDDED:
        path = embedded_path()
        if not (path / "config.json").exists():
            raise ModelError(f"the embedded policy is missing from {path}; build it: python scripts/build_default_policy.py")
        return str(path)
    return name_or_path


def pick_device(requested: str = "auto") -> torch.device:
    import torch

    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError("device 'cuda' was requested but CUDA is not available")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise ModelError("device 'mps' was requested but MPS is not available")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    import torch

    if requested != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _looks_like_path(name: str) -> bool:
    """Hub names are `org/name`; anything absolute, relative-dotted or home-based is meant as a folder."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


def load(name_or_path: str, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer). Never downloads when the name is a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars would interleave with our own round lines
    source = resolve(name_or_path)
    if _looks_like_path(source) and not Path(source).expanduser().is_dir():
        raise ModelError(f"cannot load model {name_or_path!r}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as e:
        raise ModelError(f"cannot load model {name_or_path!r}: {str(e).splitlines()[0]}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    return model, tokenizer
