"""Parameter accounting: total / tunable counts per component and per adapter kind."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .modules import AdapterModule

__all__ = ["ParamCounts", "count_parameters"]


@dataclass
class ParamCounts:
    """Result of :func:`count_parameters`.

    ``modules``: top-level component -> ``(total, tunable)``; a component's numbers include the
    adapters installed inside it, except for parameters it shares with an earlier component
    (MA-SAM's head re-uses SAM's decoder transformer, counted once, under ``mask_decoder``).
    ``adapters``: adapter kind -> ``(total, tunable)``, a breakdown of the adapter parameters.
    ``backbone``: parameters of the pre-trained model alone (everything not added by a method).
    """

    modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    adapters: dict[str, tuple[int, int]] = field(default_factory=dict)
    backbone: int = 0

    @property
    def total(self) -> int:
        return sum(t for t, _ in self.modules.values())

    @property
    def tunable(self) -> int:
        return sum(t for _, t in self.modules.values())

    @property
    def added(self) -> int:
        """Parameters added by the method (adapters and new heads)."""
        return sum(t for t, _ in self.adapters.values())

    def format(self) -> str:
        """A plain-text table (what ``medsa params`` prints)."""

        def pct(n: int) -> str:
            return f"{100.0 * n / self.backbone:6.2f}%" if self.backbone else "      -"

        lines = [f"{'module':<22}{'total':>14}{'tunable':>14}{'% of SAM':>10}"]
        rule = "-" * len(lines[0])
        lines.append(rule)
        for name, (tot, tun) in self.modules.items():
            lines.append(f"{name:<22}{tot:>14,}{tun:>14,}{pct(tun):>10}")
        for kind, (tot, tun) in self.adapters.items():
            lines.append(f"{'  adapter: ' + kind:<22}{tot:>14,}{tun:>14,}{pct(tun):>10}")
        lines.append(rule)
        lines.append(f"{'total':<22}{self.total:>14,}{self.tunable:>14,}{pct(self.tunable):>10}")
        lines.append(f"{'pre-trained SAM':<22}{self.backbone:>14,}")
        lines.append(f"{'added by the method':<22}{self.added:>14,}")
        return "\n".join(lines)


def count_parameters(model: nn.Module) -> ParamCounts:
    """Count parameters of ``model`` per top-level component and per adapter kind.

    Shared parameters are counted once (under the name PyTorch lists first). Works on the meta
    device, so ``vit_h`` is counted without allocating its weights.
    """
    adapter_prefixes: dict[str, str] = {}  # module name -> kind, outermost adapters only
    for name, mod in model.named_modules():
        if isinstance(mod, AdapterModule) and not any(
            name.startswith(p + ".") for p in adapter_prefixes
        ):
            adapter_prefixes[name] = mod.kind

    out = ParamCounts()
    for name, p in model.named_parameters():  # de-duplicated: shared tensors appear once
        top = name.split(".", 1)[0]
        tot, tun = out.modules.get(top, (0, 0))
        n = p.numel()
        out.modules[top] = (tot + n, tun + (n if p.requires_grad else 0))
        kind = next((k for pre, k in adapter_prefixes.items() if name.startswith(pre + ".")), None)
        if kind is None:
            out.backbone += n
        else:
            tot, tun = out.adapters.get(kind, (0, 0))
            out.adapters[kind] = (tot + n, tun + (n if p.requires_grad else 0))
    return out
