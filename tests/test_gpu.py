"""The real paths on CUDA: training of every loss under bf16 and fp16 (channels_last on and off), the
non-finite guard, evaluation, the Predictor and the exported model, checkpoint and resume, the
benchmark, fp16 with gradient clipping. Marked ``gpu``: skipped where CUDA is absent (``pytest -m gpu``
runs them on the GPU machine; ``tools/gpu_check.sh`` calls that).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from detlib.data.build import build_datasets
from detlib.engine.build import build_model
from detlib.engine.guards import NonFiniteGuard, NonFiniteLossError
from detlib.engine.state import TrainState
from detlib.engine.trainer import Job, RunMeta, StepContext, step, train
from detlib.tools.bench_models import RandomDetection
from detlib.tools.benchmark import prebuilt_batches

from .conftest import compose_cfg, run_train

pytestmark = pytest.mark.gpu
LOSSES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "loss").glob("*.yaml"))
CUDA = torch.device("cuda")


def _record(name: str, value: object) -> None:
    """Add ``name: value`` to ``$GPU_CHECK_OUT/gpu_tests.json`` (what the GPU check reports)."""
    out = os.environ.get("GPU_CHECK_OUT")
    if out:
        path = Path(out) / "gpu_tests.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps(data | {name: value}, indent=1))


def _steps(loss: str, amp: str, channels_last: bool, n: int = 4, **trainer) -> list[dict[str, float]]:
    """``n`` trainer steps of the small model with ``loss`` on CUDA; the loss terms of each step."""
    cfg = compose_cfg("model=small", f"loss={loss}", "model.min_size=128", "model.max_size=128")
    torch.manual_seed(0)
    model = build_model(cfg, 5).to(CUDA)
    if channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    typed = OmegaConf.to_object(compose_cfg())
    tcfg = dataclasses.replace(typed.trainer, amp=amp, max_iters=n, warmup_iters=1, **trainer)
    state = TrainState.create(model, tcfg, CUDA, typed.optimizer)
    guard = NonFiniteGuard("stop", 1, Path("."), None, deferred=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    terms = []
    for images, targets in prebuilt_batches(RandomDetection(128, num_classes=5), 4, n, 0, CUDA):
        result = step(state, StepContext(model, dtype, tcfg.clip_grad_norm, guard), images, targets)
        terms.append({k: float(v) for k, v in result.out["losses"].items()})
    guard.raise_if_bad(n)
    return terms


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_on_cuda_without_a_non_finite_value(loss, amp):
    terms = _steps(loss, amp, channels_last=True)
    assert all(torch.isfinite(torch.tensor(list(t.values()))).all() for t in terms), terms


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_channels_first_trains_on_cuda_too(amp):
    terms = _steps("smooth_l1", amp, channels_last=False)
    assert all(torch.isfinite(torch.tensor(list(t.values()))).all() for t in terms), terms


def test_fp16_with_gradient_clipping_trains_on_cuda():
    terms = _steps("smooth_l1", "fp16", True, n=6, clip_grad_norm=1.0)
    assert all(torch.isfinite(torch.tensor(list(t.values()))).all() for t in terms)


def test_a_non_finite_loss_on_cuda_stops_naming_the_first_bad_iteration():
    guard = NonFiniteGuard("stop", 1, Path("."), None, deferred=True)
    for it, v in enumerate([1.0, float("nan"), 2.0]):
        guard.check(torch.tensor(v, device=CUDA), False, CUDA, it)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at iteration 2"):
        guard.raise_if_bad(3)


def test_one_training_step_on_cuda_has_few_host_syncs():
    """The syncs left in one trainer step (torchvision's samplers, NMS, boolean indexing), counted."""
    import warnings

    cfg = compose_cfg("model=faster_rcnn_r50_fpn", "model.min_size=512", "model.max_size=512")
    model = build_model(cfg, 5).to(CUDA)
    typed = OmegaConf.to_object(compose_cfg())
    tcfg = dataclasses.replace(typed.trainer, amp="bf16", max_iters=3)
    state = TrainState.create(model, tcfg, CUDA, typed.optimizer)
    guard = NonFiniteGuard("stop", 1, Path("."), None, deferred=True)
    batches = prebuilt_batches(RandomDetection(512, num_classes=5), 2, 2, 0, CUDA)
    how = StepContext(model, torch.bfloat16, tcfg.clip_grad_norm, guard)
    step(state, how, *batches[0])  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(state, how, *batches[1])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    _record("syncs_per_trainer_step_r50_fpn_batch2", len(syncs))
    assert len(syncs) < 60, syncs[:5]


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, data_root) -> Path:
    """A smoke run trained and evaluated on CUDA in bf16 by ``train.py``."""
    run_dir = tmp_path_factory.mktemp("cuda-smoke")
    proc = run_train("experiment=smoke", "trainer.device=cuda", "trainer.amp=bf16", f"data.root={data_root}",
                     f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_train_and_evaluate_on_cuda_write_the_metrics(cuda_run):
    metrics = json.loads((cuda_run / "metrics.json").read_text())
    assert metrics["AP"] is not None and 0 <= metrics["AP"] <= 1
    _record("smoke_bf16_AP", metrics["AP"])


def test_evaluate_tool_on_cuda_reproduces_the_runs_metrics(cuda_run, tmp_path):
    from detlib.tools import evaluate

    out = tmp_path / "m.json"
    assert evaluate.main(["--run", str(cuda_run), "--device", "cuda", "--out", str(out)]) == 0
    ours, run = json.loads(out.read_text()), json.loads((cuda_run / "metrics.json").read_text())
    assert ours["AP"] == pytest.approx(run["AP"], abs=0.01)  # bf16 in training vs the tool's setting


def test_predictor_and_exported_model_on_cuda(cuda_run, tmp_path):
    import detlib
    from detlib.export import export_torchscript

    p = detlib.Predictor.from_run(cuda_run, device="cuda")
    image = torch.rand(3, 128, 128, device=CUDA)
    assert len(p(image)["boxes"]) >= 0 and next(p.model.parameters()).is_cuda
    traced = export_torchscript(p.model, image, tmp_path / "m.ts")
    loaded = torch.jit.load(str(tmp_path / "m.ts"), map_location="cuda")
    with torch.no_grad():
        eager = p.model([image], None, detect=True)["detections"][0]
        for module in (traced, loaded):
            boxes, scores, labels = module(image)
            assert boxes.is_cuda
            torch.testing.assert_close(boxes, eager["boxes"], atol=1e-3, rtol=1e-3)
            assert torch.equal(labels, eager["labels"])


def test_checkpoint_on_cuda_resumes_to_the_same_state(tmp_path, data_root):
    """Saved on CUDA (with the current device's RNG), resumed: the same weights as a straight run, up to
    GPU non-determinism (the largest difference is recorded)."""
    cfg = compose_cfg("experiment=smoke", f"data.root={data_root}", "trainer.progress=false", "trainer.device=cuda")
    typed = OmegaConf.to_object(cfg)
    train_set, val_set = build_datasets(typed.data)
    meta = RunMeta({"seed": typed.seed})

    def run(run_dir: Path, max_iters: int) -> torch.nn.Module:
        torch.manual_seed(0)
        model = build_model(cfg, train_set.num_classes)
        tcfg = dataclasses.replace(typed.trainer, max_iters=max_iters, checkpoint_period=2, amp="bf16")
        train(Job(model, train_set, val_set, dataclasses.replace(typed, trainer=tcfg), run_dir, meta))
        return model

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4)  # trainer.resume=auto continues from iteration 2
    saved = torch.load(tmp_path / "b" / "checkpoints" / "model_0000002.pt", weights_only=True)
    assert isinstance(saved["rng"]["cuda"], torch.Tensor)  # this device's state, not a list of every GPU's
    diff = max(float((a - b).abs().max()) for a, b in zip(straight.state_dict().values(),
                                                         resumed.state_dict().values()) if a.is_floating_point())
    _record("resume_max_weight_diff", diff)
    assert diff < 1e-2


def test_benchmark_cuda_path_runs_a_few_steps(tmp_path):
    from detlib.tools import benchmark

    report = benchmark.run(["--device", "cuda", "--model", "small", "--image-size", "128", "--iters", "4",
                            "--warmup", "2", "--windows", "2", "--batch", "4", "--amp", "bf16", "--channels-last",
                            "--data", "random", "--out", str(tmp_path / "b.json")])
    assert report["ours"]["images_per_s"] > 0 and report["ours"]["syncs_per_step"] is not None
