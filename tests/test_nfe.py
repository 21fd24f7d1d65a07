"""nfe_per_image: the network evaluations per image that `generate` counts as they happen, for
every sampler in SAMPLERS (a new one is covered when it is added), with and without
classifier-free guidance, checked against a forward hook on the network module itself (an
independent count of what really ran) and, for the samplers of one call per step, against
steps x (2 with guidance)."""

import json
import logging

import pytest
from conftest import compose_config, tiny_conditional_module
from PIL import Image

from ddpm.cli import sample as sampling
from ddpm.cli.eval import fid_vs_nfe, write_table
from ddpm.generate import Evaluations, generate_all
from ddpm.module import DiffusionModule
from ddpm.samplers import SAMPLERS

ONE_CALL_PER_STEP = {"ddpm", "ddim", "dpmpp_2m", "abm"}


@pytest.fixture(scope="module")
def module() -> DiffusionModule:
    return tiny_conditional_module()


@pytest.mark.parametrize("guidance", [0.0, 2.0])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_nfe_per_image_is_what_the_network_really_ran(module, name, guidance):
    seen = []  # every call of the EMA network's forward, by its batch size
    hook = module.ema.module.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    tally = Evaluations()
    try:
        # 5 images in batches of 2: a partial last batch counts its own images only
        generate_all(
            module,
            5,
            sampler={"sampler": name, "steps": 4},
            labels="cycle",
            guidance=guidance,
            batch_size=2,
            progress=False,
            evaluations=tally,
        )
    finally:
        hook.remove()
    assert tally.images == 5 and tally.calls == len(seen) and not tally.compiled
    assert tally.evaluations == sum(seen)
    assert tally.per_image == sum(seen) / 5
    if name in ONE_CALL_PER_STEP:
        assert tally.per_image == 4 * (2 if guidance else 1)
        assert tally.calls == 3 * 4  # 3 batches x 4 steps, one call each (a doubled batch)


def test_eval_table_plots_fid_against_nfe_one_line_per_sampler(tmp_path):
    values = {"fid70_train_x": 9.0, "kid70_train_x": 0.01, "kid70_train_x_std": 0.001}
    rows = [  # (sampler, steps, metrics, nfe_per_image): two ddim entries, one dpmpp_2m
        ("ddim", 10, values, 20.0),
        ("dpmpp_2m", 5, {k: v / 2 for k, v in values.items()}, 10.0),
        ("ddim", 5, {k: v * 2 for k, v in values.items()}, 10.0),
    ]
    write_table(rows, tmp_path / "t", 70, "train")
    assert Image.open(tmp_path / "t.fid_vs_nfe.png").size == (600, 400)
    figure = fid_vs_nfe([(name, nfe, v["fid70_train_x"]) for name, _, v, nfe in rows], 70, "t")
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert sorted(lines) == ["ddim", "dpmpp_2m"]
    assert list(lines["ddim"].get_xdata()) == [10.0, 20.0]  # in order of NFE
    assert list(lines["ddim"].get_ydata()) == [18.0, 9.0]
    assert list(lines["dpmpp_2m"].get_xdata()) == [10.0]
    assert "| ddim | 10 | 20 | 9.00 |" in (tmp_path / "t.table.md").read_text()


def test_sample_json_records_the_counted_nfe_and_says_it(trained_run, tmp_path, caplog):
    """sample.py: 3 images, 2 DDIM steps at guidance 1.5 (a doubled batch): 4 evaluations per
    image, in sample.json and in the log; a resume may change compile=, not the pixels."""
    args = [f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 's'}"]
    args += ["n=3", "batch_size=2", "sampler=ddim", "steps=2", "guidance=1.5", "precision=32"]
    with caplog.at_level(logging.INFO, logger="ddpm.cli.sample"):
        out = sampling.sample(compose_config([*args, "compile=auto"], name="sample"))
    record = json.loads((out / "sample.json").read_text())
    assert record["nfe_per_image"] == 4 and record["compiled"] is False
    assert record["img_per_s"] > 0
    assert "3 images in" in caplog.text and ": 4 network evaluations per image" in caplog.text
    sampling.sample(compose_config([*args, "n=4", "resume=true", "compile=false"], name="sample"))
    assert json.loads((out / "sample.json").read_text())["nfe_per_image"] == 4
