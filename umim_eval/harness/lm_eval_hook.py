"""Registers the lm-evaluation-harness model ``umim`` without importing anything heavy.

lm-eval (0.4.x) has no plugin mechanism: ``--model NAME`` is looked up in
``lm_eval.api.registry.model_registry``, which only knows its built-ins (the lazy ``"module:Class"``
strings of ``lm_eval/models/__init__.py::MODEL_MAPPING``) and whatever code imported before the
CLI parsed its arguments registered. Two routes make ``umim`` known:

1. ``umim-eval lm-eval ARGS...`` (:mod:`umim_eval.cli`) calls :func:`register` and then lm-eval's own
   CLI main with ``ARGS`` — the same options, the same output.
2. Plain ``lm_eval --model umim ...`` / ``lm-eval ...`` / ``python -m lm_eval ...`` / any script that
   uses lm-eval's registry: a one-line ``.pth`` file in site-packages (``umim-lm-eval.pth``, the
   copy shipped as ``umim_eval/harness/umim-lm-eval.pth``) imports this module at interpreter start-up. That
   costs one small module and no third-party import: it only appends :class:`_RegistryHook` to
   ``sys.meta_path``. The first time anything imports ``lm_eval.api.registry``, the hook lets the
   normal loader execute it and then registers ``"umim"`` as a *lazy placeholder*
   (``"umim_eval.harness.lm_eval_model:UMIMLM"``; torch/transformers/umim are imported only when a run
   asks for ``--model umim``) and removes itself from ``sys.meta_path``.

   It also imports ``lm_eval.models`` (a dict of strings, no model code) right away: lm-eval's
   ``get_model`` fills the registry with its built-ins only when the registry is *empty*, so
   registering ``umim`` first would otherwise hide ``hf`` and the rest.

Both routes are idempotent and never raise: a broken or missing lm-eval leaves the interpreter
and lm-eval exactly as they were. ``UMIM_NO_LM_EVAL_HOOK=1`` disables route 2.
"""

from __future__ import annotations

import os
import sys

MODEL_NAME = "umim"
TARGET = "umim_eval.harness.lm_eval_model:UMIMLM"
_WATCHED = "lm_eval.api.registry"


def _register_into(registry_module) -> None:
    reg = registry_module.model_registry
    if MODEL_NAME not in reg:
        reg.register(MODEL_NAME, target=TARGET)
    import lm_eval.models  # noqa: F401  (built-in placeholders; see the module docstring)


def register() -> bool:
    """Register ``umim`` in lm-eval's model registry now (imports only lm-eval's light registry).

    Returns False when lm-eval is not installed."""
    try:
        import lm_eval.api.registry as registry_module
    except ImportError:
        return False
    _register_into(registry_module)
    return True


class _Loader:
    """Wraps the real loader of ``lm_eval.api.registry``: execute it, then register."""

    def __init__(self, inner, finder):
        self._inner, self._finder = inner, finder

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        self._finder.remove()
        try:
            _register_into(module)
        except Exception:  # never break lm-eval because of the hook
            pass

    def __getattr__(self, name):  # get_code, get_source, ... for tracebacks and tools
        return getattr(self._inner, name)


class _RegistryHook:
    """A ``sys.meta_path`` finder that only reacts to ``lm_eval.api.registry`` (one string compare
    per import otherwise)."""

    def find_spec(self, name, path, target=None):
        if name != _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, self)
                return spec
        return None

    def remove(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def install() -> None:
    """Put the hook on ``sys.meta_path`` (what the ``.pth`` file does); a no-op when lm-eval's
    registry is already imported (then register directly) or when disabled by the environment."""
    if os.environ.get("UMIM_NO_LM_EVAL_HOOK"):
        return
    if _WATCHED in sys.modules:
        try:
            _register_into(sys.modules[_WATCHED])
        except Exception:
            pass
        return
    if not any(isinstance(f, _RegistryHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryHook())


def pth_path() -> str:
    """The ``.pth`` file shipped with the package (to copy into site-packages)."""
    return os.path.join(os.path.dirname(__file__), "umim-lm-eval.pth")
