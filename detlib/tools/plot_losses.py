"""Draw box-regression losses and their gradients (autograd through detlib.losses) over a residual range.

    uv run tools/plot_losses.py                       # loss_plots/loss_shapes.png: L1, L2, smooth L1 and Huber
    uv run tools/plot_losses.py --preset beta         # loss_plots/smooth_l1_beta.png: smooth L1, beta 1, 0.1, 0.01
    uv run tools/plot_losses.py --preset all          # both
    uv run tools/plot_losses.py --run RUN_DIR         # the run's own box loss next to L1 and L2;
                                                      # RUN/loss_shape.png and TensorBoard "loss/shape"

Left panel: the loss of one coordinate against the residual x = prediction - target; right panel:
dloss/dx. A run's loss is called as the heads call it, on a unit box predicted x widths to the right of its
ground truth: a delta-space loss sees the residual dx = x (unit coder weights), an IoU-family loss
the shifted box.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from hydra.utils import instantiate
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.models.detection._utils import BoxCoder

from detlib import losses, runs
from detlib.engine.restore import check_targets, load_run_config
from detlib.losses import BoxLoss
from detlib.tools.cli import ToolError, cli, prog_name

Curve = tuple[str, Callable[[Tensor], Tensor], float | None]  # label, residual (N,) -> loss (N,), kink at |x|
FILES = {"compare": "loss_shapes.png", "beta": "smooth_l1_beta.png"}


def elementwise(fn: Callable, **params: float) -> Callable[[Tensor], Tensor]:
    """A delta-space loss of the residual alone (target 0), one value per element."""
    return lambda x: fn(x, torch.zeros_like(x), reduction="none", **params)


UNIT_CODER = BoxCoder((1.0, 1.0, 1.0, 1.0))  # unit weights: a prediction dx = x is a shift of x box widths


def shifted_box(loss: BoxLoss) -> Callable[[Tensor], Tensor]:
    """Any box loss, called as the heads call it, of a unit box predicted ``x`` box widths to the right of its
    ground truth (its anchor): a delta-space loss sees the residual ``dx = x``, a box-space loss the shift."""
    def f(x: Tensor) -> Tensor:
        zero = torch.zeros_like(x)
        unit = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=x.dtype).expand(x.shape[0], 4)
        return loss(torch.stack([x, zero, zero, zero], dim=1), unit, unit, UNIT_CODER, reduction="none")
    return f


def preset(name: str) -> tuple[list[Curve], str, float | None]:
    """The curves, title and inset zoom (half-width, or None) of a named figure."""
    if name == "compare":
        return [("L1", elementwise(losses.l1), None), ("L2", elementwise(losses.l2), None),
                ("smooth L1 (beta=1)", elementwise(losses.smooth_l1, beta=1.0), 1.0),
                ("Huber (delta=1), dashed", elementwise(losses.huber, delta=1.0), 1.0)], \
            "Box-regression losses (smooth L1 with beta=1 and Huber with delta=1 coincide; dots: the kink)", None
    if name == "beta":
        return [(f"smooth L1 (beta={b:g})", elementwise(losses.smooth_l1, beta=b), b) for b in (1.0, 0.1, 0.01)], \
            "Smooth L1: the kink (quadratic -> linear, dots) sits at |x| = beta", 0.15
    raise ToolError(f"unknown preset {name!r}; choose compare, beta or all")


def value_and_grad(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``fn(x)`` and ``d fn(x) / dx`` elementwise, by autograd (float64)."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), g.detach()


def figure(curves: Sequence[Curve], title: str, r: float, zoom: float | None = None,
           xlabel: str = "residual x = prediction - target") -> Figure:
    """Two panels, loss and its derivative over ``[-r, r]``; kinks as dots; optional inset of ``[-zoom, zoom]``."""
    x = torch.linspace(-r, r, 2401, dtype=torch.float64)
    fig = Figure(figsize=(11, 4.4))
    ax_v, ax_g = fig.subplots(1, 2)
    inset = ax_v.inset_axes([0.3, 0.5, 0.4, 0.45]) if zoom else None
    for i, (label, fn, kink) in enumerate(curves):
        y, g = value_and_grad(fn, x)
        style = dict(color=f"C{i}", ls="--" if "dashed" in label else "-", lw=1.6)
        ax_v.plot(x, y, label=label, **style)
        ax_g.plot(x, g, label=label, **style)
        if kink is not None and kink < r:
            k = torch.tensor([-kink, kink], dtype=torch.float64)
            ky, kg = value_and_grad(fn, k)
            ax_v.plot(k, ky, "o", color=f"C{i}", ms=4)
            ax_g.plot(k, kg, "o", color=f"C{i}", ms=4)
        if inset is not None:
            xz = torch.linspace(-zoom, zoom, 801, dtype=torch.float64)
            inset.plot(xz, value_and_grad(fn, xz)[0], **style)
            if kink is not None and kink < zoom:
                k = torch.tensor([-kink, kink], dtype=torch.float64)
                inset.plot(k, value_and_grad(fn, k)[0], "o", color=f"C{i}", ms=3)
    ax_v.set(xlabel=xlabel, ylabel="loss", title="value")
    ax_g.set(xlabel=xlabel, ylabel="d loss / dx", title="gradient")
    ymax = max(line.get_ydata().max() for line in ax_v.lines if line.get_label() != "L2")
    ax_v.set_ylim(-0.05 * ymax, 1.15 * ymax)  # L2 would flatten the others
    if inset is not None:
        inset.set_title(f"zoom |x| < {zoom:g}", fontsize=8)
        inset.tick_params(labelsize=7)
        inset.grid(alpha=0.3)
    for ax in (ax_v, ax_g):
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3)
    ax_v.legend(fontsize=8, loc="lower right" if inset is not None else "upper center")
    ax_g.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def run_figure(run_dir: Path, r: float) -> Figure:
    """The run's box loss (its config's ``loss`` node) next to L1 and L2."""
    cfg = load_run_config(run_dir)
    check_targets(cfg)  # a run folder is data: instantiate only trusted classes from it
    loss: BoxLoss = instantiate(cfg.loss)
    ref: list[Curve] = [("L1", elementwise(losses.l1), None), ("L2", elementwise(losses.l2), None)]
    kink = loss.params.get("beta", loss.params.get("delta"))
    return figure([(repr(loss), shifted_box(loss), kink if isinstance(kink, float) else None)] + ref,
                  f"{run_dir.name}\nbox loss {loss!r} of a unit box shifted along x by x widths "
                  "(= the residual of one encoded coordinate)", r, xlabel="x: shift in box widths = residual dx")


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name("plot_losses.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="compare", choices=["compare", "beta", "all"],
                   help="compare: L1, L2, smooth L1, Huber; beta: smooth L1 with beta 1, 0.1, 0.01; all: both")
    p.add_argument("--range", type=float, default=3.0, help="residuals from -RANGE to RANGE (default 3)")
    p.add_argument("--out-dir", type=Path, default=Path("loss_plots"),
                   help="folder for the preset figures (default loss_plots; the README's are docs/, --out-dir docs)")
    p.add_argument("--run", type=Path, help="draw this run's box loss; saves RUN/loss_shape.png and logs it to RUN/tb")
    args = p.parse_args(argv)
    if args.range <= 0:
        p.error(f"--range must be > 0, got {args.range}")
    return args


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run is not None:
        fig = run_figure(args.run, args.range)
        path = save(fig, args.run / "loss_shape.png")
        with SummaryWriter(str(args.run / runs.TB)) as writer:
            writer.add_figure("loss/shape", fig)  # closes the figure
        print(f"wrote {path} and TensorBoard figure 'loss/shape' in {args.run / runs.TB}")
        return 0
    for name in (["compare", "beta"] if args.preset == "all" else [args.preset]):
        curves, title, zoom = preset(name)
        fig = figure(curves, title, args.range, zoom)
        print(f"wrote {save(fig, args.out_dir / FILES[name])}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv, "plot_losses.py")
