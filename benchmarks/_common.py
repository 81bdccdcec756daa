"""Shared helpers of the benchmark scripts: arguments, environment report, models, timing, tables.

Every benchmark measures medsa and the reference (Meta's ``segment_anything``) in the SAME process,
on the same random weights and inputs, interleaving the variants round-robin so that load from other
processes hits all of them alike. Timings are medians over ``--iters`` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from reference_medsa import reference_encoder
from torch import nn

from medsa._platform import cpu_flags
from medsa.engine.perf import PeakMemory, resolve_device, synchronize
from medsa.sam.image_encoder import VIT_PRESETS, ImageEncoderViT, ViTConfig

BACKBONES = ("vit_b", "vit_l", "vit_h", "vit_tiny")


def add_common_args(parser: argparse.ArgumentParser, *, iters: int = 3, batch: int = 1) -> None:
    """``--device --backbone --batch --img-size --iters --warmup --threads --seed --json --markdown``."""
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    parser.add_argument("--backbone", default="vit_b", choices=BACKBONES)
    parser.add_argument("--batch", type=int, default=batch, help="images per step")
    parser.add_argument(
        "--img-size", type=int, default=None, help="encoder input side (default: the backbone's)"
    )
    parser.add_argument("--iters", type=int, default=iters, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: all cores)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table (md)")


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``/``--seed`` and resolve ``--device``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return resolve_device(args.device)


def environment(device: torch.device) -> dict[str, Any]:
    """Machine and library versions, recorded next to every number."""
    import segment_anything

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "segment_anything": getattr(segment_anything, "__version__", "1.0"),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    flags = cpu_flags()
    info["amx_bf16"] = "amx_bf16" in flags
    info["avx512_bf16"] = "avx512_bf16" in flags
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def vit_config(backbone: str, img_size: int | None) -> ViTConfig:
    """The medsa preset, optionally at another input size (rel-pos tables sized for it)."""
    base = VIT_PRESETS[backbone]
    kwargs = dict(base.__dict__)
    if img_size is not None:
        kwargs["img_size"] = img_size
    return ViTConfig(**kwargs)


def randomize_(model: nn.Module, seed: int) -> None:
    """Non-trivial random weights (incl. rel-pos / abs-pos, zero-initialised in SAM) in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def encoder_pair(cfg: ViTConfig, seed: int) -> tuple[ImageEncoderViT, nn.Module]:
    """medsa and segment-anything encoders holding the SAME random weights (strict load)."""
    torch.manual_seed(seed)
    ours = ImageEncoderViT(cfg)
    randomize_(ours, seed)
    ref = reference_encoder(cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


@dataclass
class Result:
    """One row of a benchmark table."""

    name: str
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time (all threads)
    items_per_call: int = 1
    peak_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    output: Any = None  # return value of the first (warm-up) call, for accuracy checks

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else float("nan")

    @property
    def throughput(self) -> float:
        return self.items_per_call / self.median_s if self.seconds else float("nan")

    def to_json(self) -> dict[str, Any]:
        """The row as written to ``--json``: raw timings, throughput, peak memory, extras."""
        return {
            "name": self.name,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "img_per_s": self.throughput,
            "peak_bytes": self.peak_bytes,
            **self.extra,
        }


def args_json(args: argparse.Namespace) -> dict[str, str]:
    """Command-line arguments as strings, recorded in every ``--json`` payload."""
    return {k: str(v) for k, v in vars(args).items()}


def round_robin(
    fns: dict[str, Callable[[], object]],
    iters: int,
    warmup: int,
    device: torch.device,
    items_per_call: int = 1,
    calls_per_round: int = 1,
    measure_memory: bool = True,
) -> dict[str, Result]:
    """Time every variant ``iters`` times, interleaved (v1, v2, ..., v1, v2, ...).

    The first warm-up call of each variant also measures its peak memory and its return value is
    kept in ``Result.output``. With
    ``calls_per_round > 1`` one timing covers that many back-to-back calls (for sub-ms work).
    """
    results = {name: Result(name, items_per_call=items_per_call) for name in fns}
    for name, fn in fns.items():
        for i in range(max(warmup, 1 if measure_memory else 0)):
            if i == 0 and measure_memory:
                with PeakMemory(device) as pm:
                    results[name].output = fn()
                results[name].peak_bytes = pm.peak_bytes
            else:
                fn()
    for _ in range(iters):
        for name, fn in fns.items():
            synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls_per_round):
                fn()
            synchronize(device)
            results[name].seconds.append((time.perf_counter() - t0) / calls_per_round)
            results[name].cpu_seconds.append((time.process_time() - c0) / calls_per_round)
    return results


def fmt_ms(seconds: float) -> str:
    """Milliseconds with 3 significant digits."""
    ms = seconds * 1000
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table (also readable as plain text)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join([line, sep, *body])


def env_line(env: dict[str, Any]) -> str:
    parts = [
        f"torch {env['torch']}",
        f"segment-anything {env['segment_anything']}",
        f"device {env['device']}" + (f" ({env['gpu']})" if "gpu" in env else ""),
        f"CPU {env['cpu']} ({env['threads']} threads, {env['cpu_capability']}"
        + (", AVX512-BF16" if env.get("avx512_bf16") else "")
        + (", AMX-BF16" if env.get("amx_bf16") else "")
        + ")",
        f"load avg {env['loadavg']}",
        env["date_utc"] + " UTC",
    ]
    return "; ".join(parts)


def emit(
    title: str,
    table: str,
    env: dict[str, Any],
    args: argparse.Namespace,
    payload: dict[str, Any],
) -> None:
    """Print the table and write ``--markdown`` / ``--json`` outputs if requested."""
    text = f"### {title}\n\n{env_line(env)}\n\n{table}\n"
    print(text, flush=True)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"title": title, "env": env, **payload}, indent=2))


def run_cli(main: Callable[[list[str]], object]) -> None:
    """``main(sys.argv[1:])``, printing user errors (bad device / dtype / backbone) without a traceback."""
    import sys

    from medsa.errors import MedsaError

    try:
        main(sys.argv[1:])
    except MedsaError as e:
        sys.exit(f"error: {e}")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp32."""
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))
