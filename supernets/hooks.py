"""dipgo's forwards installed through diffusers' own hook machinery, and taken out exactly.

Every wrapped forward (a reuse unit's compute / replay / forecast, an installed plan's step
bookkeeping) is a :class:`diffusers.hooks.ModelHook` in the module's
:class:`~diffusers.hooks.HookRegistry`, like ``apply_first_block_cache`` installs its hooks. So
dipgo composes with diffusers' other registry hooks (group offloading, layerwise casting, another
cache) in either order, a pipeline's ``cache_context(name, step_index=...)`` reaches dipgo's
stateful hook, and ``maybe_free_model_hooks`` resets it at the end of a pipeline call. The model
stays a plain diffusers model: :func:`attach` returns a remover that leaves the module as it
found it (no ``forward`` or ``_diffusers_hook`` attribute left behind when dipgo added them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

HOOK_PREFIX = "dipgo_"


class ForwardHook(ModelHook):
    """A registry hook whose forward is ``fn(original_forward, args, kwargs)``."""

    def __init__(self, fn: Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]) -> None:
        super().__init__()
        self._fn = fn

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self._fn(self.fn_ref.original_forward, args, kwargs)


def attach(module: nn.Module, name: str, hook: ModelHook) -> Callable[[], None]:
    """Register ``hook`` as ``dipgo_<name>`` on ``module``; returns the function that removes it.

    Removing raises when something outside the registry replaced ``module.forward`` after dipgo
    (taking dipgo's hook out would silently drop that patch): remove that one first.
    """
    full = HOOK_PREFIX + name
    created = not hasattr(module, "_diffusers_hook")
    had_own, own = "forward" in module.__dict__, module.__dict__.get("forward")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, full)
    installed = module.__dict__["forward"]

    def remove() -> None:
        if full not in registry.hooks:
            return
        if registry._hook_order[-1] == full and module.__dict__.get("forward") is not installed:
            raise RuntimeError(
                f"the forward of {type(module).__name__} was replaced by another hook after dipgo's; "
                "remove that hook first"
            )
        registry.remove_hook(full, recurse=False)
        if not registry.hooks:
            if had_own:
                module.forward = own
            else:
                module.__dict__.pop("forward", None)
            if created:
                del module._diffusers_hook

    return remove
