"""compile=auto|true|false (ddpm/compile.py): auto picks eager for a small job and compiles a
long one, a partial last batch is padded instead of compiled again, a failing compile falls
back to eager with one warning, and the compiled forward (inductor, freezing) draws the eager
pixels within bf16 rounding without leaving the global inductor config changed (slow tier:
compiling takes tens of seconds here)."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_conditional_module

from bench.gpu_bench import TINY
from ddpm import generate as generating
from ddpm.compile import CompiledForward, check_setting, worth_compiling
from ddpm.generate import Evaluations, generate_all
from ddpm.module import DiffusionModule
from ddpm.unet import UNet

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def module() -> DiffusionModule:
    return tiny_conditional_module()


def draw(module, compile, n=3, **kwargs):
    tally = Evaluations()
    images = generate_all(
        module,
        n,
        sampler={"sampler": "ddim", "steps": 3},
        labels="cycle",
        guidance=1.5,
        batch_size=2,
        progress=False,
        compile=compile,
        evaluations=tally,
        **kwargs,
    )
    return images, tally


def test_the_rule_weighs_calls_against_compile_time(module):
    net = module.ema.module
    small, why = worth_compiling(net, CPU, calls=10, seconds_per_call=0.1, freezing=True)
    large, _ = worth_compiling(net, CPU, calls=100_000, seconds_per_call=0.1, freezing=True)
    assert not small and large
    assert "10 network calls" in why and "compiling" in why
    assert not worth_compiling(net, torch.device("mps"), 10**9, 1.0, True)[0]
    for value, text in (("auto", "auto"), (True, "true"), (False, "false"), ("FALSE", "false")):
        assert check_setting(value) == text
    with pytest.raises(ValueError, match=r"compile='yes': give compile=auto .*true .*false"):
        check_setting("yes")


def test_auto_draws_a_small_job_eagerly_and_says_why(module, caplog):
    with caplog.at_level(logging.INFO, logger="ddpm.generate"):
        images, tally = draw(module, "auto")
    assert not tally.compiled and "compile=auto: eager, since" in caplog.text
    assert tally.per_image == 3 * 2  # the probe's calls are not counted
    assert torch.equal(images, draw(module, "false")[0])


def counting_backend(compiles: list):
    """A dynamo backend that runs the traced graph as it is and counts the compiles."""

    def backend(gm, example_inputs):
        compiles.append([tuple(x.shape) for x in example_inputs if hasattr(x, "shape")])
        return gm.forward

    return backend


def test_a_partial_last_batch_is_padded_not_compiled_again(module, monkeypatch):
    compiles: list = []

    def compiled(net, device, freezing=True):
        return CompiledForward(net, device, freezing=freezing, backend=counting_backend(compiles))

    monkeypatch.setattr(generating, "compiled_forward", compiled)
    torch._dynamo.reset()
    images, tally = draw(module, "true")  # batches of 2, 2 and 1 (4, 4, 2 with guidance)
    assert tally.compiled and len(compiles) == 1, compiles
    assert tally.per_image == 6  # the padding is not counted: 3 steps x 2
    assert torch.allclose(images, draw(module, "false")[0], atol=1e-5)


def test_a_failing_compile_falls_back_to_eager_with_one_warning(module, monkeypatch, caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    def compiled(net, device, freezing=True):
        return CompiledForward(net, device, freezing=freezing, backend=broken)

    monkeypatch.setattr(generating, "compiled_forward", compiled)
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING):
        images, tally = draw(module, "true")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "sampling eagerly" in warnings[0].getMessage()
    assert "no C++ compiler found" in warnings[0].getMessage()
    assert torch.equal(images, draw(module, "false")[0]) and tally.per_image == 6


@pytest.mark.slow
def test_compiled_forward_draws_the_eager_pixels_within_bf16_rounding(module):
    """Inductor with freezing, under bf16 autocast as sample.py runs on a CPU with native bf16;
    the freezing option is this compile's only: the global config is untouched."""
    assert not torch._inductor.config.freezing
    torch._dynamo.reset()

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    compiled, tally = draw(module, "true", context=bf16)
    eager, _ = draw(module, "false", context=bf16)
    assert tally.compiled and not torch._inductor.config.freezing
    assert (compiled - eager).abs().max() < 0.05  # bf16 keeps 8 bits: ~0.4 % per operation
    assert (compiled - eager).abs().mean() < 5e-3


BLOCKER = """import sys
class _Missing:  # the GPU machine has none of these: importing one fails the benchmark
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {MISSING}:
            raise ImportError(f"{name} is not installed on the GPU machine")
sys.meta_path.insert(0, _Missing())
"""
MISSING = {"hydra", "omegaconf", "antlr4", "diffusers", "torch_fidelity", "wandb", "mlxtend"}


def gpu_sh(tmp_path, *args: str) -> dict:
    """bench/gpu.sh as the GPU machine runs it, without the packages that machine lacks."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER.replace("{MISSING}", repr(MISSING)))
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(site)}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "out"
    subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), *args, str(out)], env=env,
                   check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads((out / "gpu_bench.json").read_text())


def test_gpu_sh_runs_on_a_cpu_without_hydra_and_reads_a_student(tmp_path):
    """The CPU check of the GPU benchmark (tiny sizes, a subset of its sections): figures in
    the JSON, a student checkpoint read without Hydra; a failed section would say its error."""
    torch.manual_seed(0)
    net = UNet(**TINY, num_classes=3)
    hparams = {
        "net": {"_target_": "ddpm.unet.UNet", **TINY, "num_classes": 3},
        "schedule": {"_target_": "ddpm.schedule.NoiseSchedule.cosine", "timesteps": 100},
        "objective": "v",
    }
    state = {f"ema.module.{k}": v for k, v in net.state_dict().items()}
    ckpt = tmp_path / "student.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": state, "sampling": {"steps": 2}}, ckpt)
    only = ["--only", "train_eager", "student"]  # the student's: sample_*'s code
    result = gpu_sh(tmp_path, *only, "--device", "cpu", "--tiny", "--student", str(ckpt))
    assert result["tiny"] and set(only[1:]) <= set(result)
    assert "error" not in json.dumps(result), result
    train = result["train_eager"]
    assert train["img_per_s"] > 0 and train["flops_per_image"] > 0 and train["mfu"] is None
    student = result["student"]
    assert student["steps"] == 2 and student["eager_img_per_s"] > 0
    assert student["compiled_img_per_s"] > 0 and student["speedup"] > 0
