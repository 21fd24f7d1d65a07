"""Bad-input cases of round three (issue 23), values: the layout of test_bad_inputs.CASES
((case, entry point, overrides, the message it must give)); `files` makes the files they name
(its keys fill {placeholders} in the overrides, beside the shared ones).

Each of these ran before without a word and did something else than asked (no attention, an
effective batch of -16, a loss of 0 or one ascended, all T steps recorded as 0, black images, a
504,000 px wide PNG, another seed's images) or failed deep inside without the key."""

from __future__ import annotations

from pathlib import Path

GUIDANCE = r"classifier-free guidance w must be a finite number >= 0 \(0: the conditional model"
STEPS = r"sampler steps must be in \[1, 1000\] \(the schedule's T\), got 0"
SEED = r"is out of range: give an integer in \[0, 4294967295\] \(2\^32 - 1, numpy's and Lightning's"

CASES: list[tuple[str, str, list[str], str]] = [
    # train.py: the network (debug=fast: model=tiny on 28 px digits, levels 28 and 14)
    (
        "attention at a size that is no level",
        "train",
        ["model.attn_resolutions=[5]"],
        r"^model.attn_resolutions=\[5\] names no level of the network \(\[5\]\): its levels are "
        r"at 28, 14 px \(model.image_size / 2\^k\); use some of those, \[\] or model.attn_levels",
    ),
    (
        "attention sizes not a list",
        "train",
        ["model.attn_resolutions=14"],
        r"^model.attn_resolutions must be a list of feature-map sizes, e.g. \[14\] or \[\], got 14",
    ),
    (
        "no attention heads",
        "train",
        ["model.num_heads=0"],
        r"^model.num_heads must be an integer >= 1 \(attention heads; 1 as in Ho et al.\), got 0",
    ),
    (
        "attention heads that do not divide the width",
        "train",
        ["model.num_heads=3"],
        r"^model.num_heads=3 does not divide the attention widths \[16\] .*model.num_heads=1",
    ),
    # train.py: the trainer and the module
    (
        "accumulating 0 batches",
        "train",
        ["trainer.accumulate_grad_batches=0"],
        r"^trainer.accumulate_grad_batches must be an integer >= 1 \(batches per optimizer step; "
        r"1: no accumulation\), got 0",
    ),
    (
        "accumulating a negative number of batches",
        "train",
        ["trainer.accumulate_grad_batches=-2"],
        r"^trainer.accumulate_grad_batches must be an integer >= 1 .*got -2",
    ),
    (
        "min-SNR cap 0",
        "train",
        ["module.loss_weighting=min_snr", "module.min_snr_gamma=0"],
        r"^module.min_snr_gamma must be a number > 0 \(the cap γ of min\(SNR, γ\); Hang et al. "
        r"use 5, module.min_snr_gamma=5\); got 0",
    ),
    (
        "min-SNR cap negative",
        "train",
        ["module.loss_weighting=min_snr", "module.min_snr_gamma=-5"],
        r"^module.min_snr_gamma must be a number > 0 .*got -5",
    ),
    (
        "L_vlb without learned variances",
        "train",
        ["module.loss=vlb"],
        r"^module.loss=vlb trains the bound L_vlb through the learned variance \(iDDPM's "
        r"--use_kl True --learn_sigma True\): set module.learn_sigma=true$",
    ),
    (
        "an unknown timestep sampler",
        "train",
        ["module.timestep_sampler=loss-second-moment"],
        r"^module.timestep_sampler must be one of \('uniform', 'loss_second_moment'\) "
        r"\(uniform: Ho et al.; loss_second_moment: iDDPM's importance sampling of t\), got "
        r"'loss-second-moment'$",
    ),
    (
        "negative weight decay",
        "train",
        ["module.optimizer.weight_decay=-0.1"],
        r"^module.optimizer.weight_decay must be a finite number >= 0 \(0: none; e.g. 0.01 with "
        r"torch.optim.AdamW\), got -0.1",
    ),
    ("train: negative seed", "train", ["seed=-1"], rf"^seed=-1 {SEED}"),
    ("train: seed beyond 32 bits", "train", ["seed=4294967296"], rf"^seed=4294967296 {SEED}"),
    (
        "training grid guidance nan",
        "train",
        ["callbacks.sample_grid.guidance=nan"],
        rf"^callbacks.sample_grid.guidance=nan: {GUIDANCE}",
    ),
    # sample.py
    ("sample: zero steps", "sample", ["steps=0"], rf"^{STEPS} \(steps=0\); give steps=N"),
    (
        "sample: zero steps in the sampler group",
        "sample",
        ["sampler=ddim", "steps=null", "sampler.steps=0"],
        rf"^{STEPS} \(sampler.steps=0\); give sampler.steps=N",
    ),
    ("sample: guidance nan", "sample", ["guidance=nan"], rf"^guidance=nan: {GUIDANCE}"),
    (
        "sample: negative guidance",
        "sample",
        ["guidance=-2"],
        rf"^guidance=-2: {GUIDANCE}.*a negative w would weaken or reverse the class \(-1: the "
        r"unconditional model\); give guidance=0 or more",
    ),
    (
        "sample: empty grid",
        "sample",
        ["grid_max=0"],
        r"^grid_max must be an integer >= 1 \(grid.png shows the first grid_max images, e.g. "
        r"grid_max=256\), got 0",
    ),
    ("sample: negative grid", "sample", ["grid_max=-1"], r"^grid_max must be .*got -1"),
    (
        "sample: a word wider than the text",
        "sample",
        ["text=1234567890 12", "text_width=4"],
        r"^text= holds a word of 10 letters \('1234567890'\), longer than text_width=4 "
        r"characters per line; give text_width=10 or more, or split the word",
    ),
    (
        "sample: labels as words",
        "sample",
        ["n=2", "labels=[a,b]"],
        r"^labels=\[a, b\] must be class indices 0..9 \(e.g. labels=\[3,3,7\]\), cycle, auto or "
        r"null; for a class by its name give class_name=NAME",
    ),
    ("sample: negative seed", "sample", ["seed=-1"], rf"^seed=-1 {SEED}"),
    # eval.py (source: the trained checkpoint)
    (
        "eval: a table entry of 0 steps",
        "eval",
        ["table=[ddim:0]"],
        r"^table entry 'ddim:0' asks for 0 steps: give sampler:steps with steps >= 1, e.g. "
        r"ddim:50",
    ),
    (
        "eval: a table entry beyond T",
        "eval",
        ["table=[ddim:5000]"],
        r"^table entry 'ddim:5000' asks for 5000 steps, more than the checkpoint's T=1000",
    ),
    (
        "eval: a table entry of no sampler",
        "eval",
        ["table=[dim:50]"],
        r"^table entry 'dim:50' names no sampler: 'dim' is not one of \[",
    ),
    ("eval: zero steps", "eval", ["steps=0"], rf"^{STEPS} \(steps=0\)"),
    ("eval: guidance nan", "eval", ["guidance=nan"], rf"^guidance=nan: {GUIDANCE}"),
    ("eval: negative seed", "eval", ["seed=-1"], rf"^seed=-1 {SEED}"),
]


def files(root: Path, ckpt: Path) -> dict[str, str]:
    """Files for the cases above, made under `root`; `ckpt` is the tiny trained run's
    last.ckpt (read it, never change it)."""
    return {}
