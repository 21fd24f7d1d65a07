"""Bad-input cases of train.py for tests/test_bad_inputs.py (the layout of its CASES:
(case, entry point, overrides, the message it must give))."""

import torch

TRAIN_CASES: list[tuple[str, str, list[str], str]] = [
    (
        "network of no width",
        "train",
        ["model.ch=0"],
        r"^model.ch \(the base width\) must be an integer >= 4, got 0",
    ),
    (
        "validation every 0 steps",
        "train",
        ["trainer.val_check_interval=0"],
        r"^trainer.val_check_interval must be > 0 .* got 0",
    ),
    (
        "max_steps not a number",
        "train",
        ["trainer.max_steps=ten"],
        r"^trainer.max_steps must be an integer \(optimizer steps, -1: no limit\), got 'ten'",
    ),
    (
        "max_steps 0 trains nothing",
        "train",
        ["trainer.max_steps=0"],
        r"^trainer.max_steps=0 trains nothing: .*trainer.max_steps=10000",
    ),
    (
        "learning rate nan",
        "train",
        ["module.optimizer.lr=nan"],
        r"^module.optimizer.lr must be a finite number > 0, e.g. 2e-4; got nan",
    ),
    (
        "negative learning rate",
        "train",
        ["module.optimizer.lr=-1"],
        r"^module.optimizer.lr must be a finite number > 0, e.g. 2e-4; got -1",
    ),
    (
        "resume from a directory",
        "train",
        ["resume={tmp}"],
        r"^resume=.* is a directory; resume takes a .ckpt file.*hydra.run.dir=",
    ),
    ("seed not a number", "train", ["seed=abc"], r"^seed must be an integer, e.g. seed=0; got 'ab"),
    (
        "grid with more steps than the schedule",
        "train",
        ["callbacks.sample_grid.steps=5000"],
        r"^callbacks.sample_grid.steps must be a number of sampling steps in \[1, 1000\] "
        r"\(the schedule's T, schedule.timesteps\), got 5000",
    ),
    (
        "resume with another T",
        "train",
        ["resume={ckpt}", "schedule.timesteps=500"],
        r"last.ckpt was trained with schedule.timesteps=1000 \(this run: 500\)\. .*"
        r"resume_changes=allow",
    ),
    (
        "resume with another objective",
        "train",
        ["resume={ckpt}", "module.objective=eps"],  # the quickstart's is v
        r"last.ckpt was trained with module.objective='v' \(this run: 'eps'\)",
    ),
    (
        "resume with another loss",
        "train",
        ["resume={ckpt}", "module.loss=l1"],
        r"last.ckpt was trained with module.loss='mse' \(this run: 'l1'\)",
    ),
    (
        "resume with another schedule type",
        "train",
        ["resume={ckpt}", "schedule=linear"],  # the quickstart's is cosine
        r"last.ckpt was trained with schedule=cosine \(this run: linear\)\. Resume with",
    ),
    (
        "unknown resume_changes",
        "train",
        ["resume_changes=maybe"],
        r"^resume_changes must be refuse or allow, got 'maybe'",
    ),
]

if not torch.cuda.is_available():  # the case only exists on a machine without a GPU
    TRAIN_CASES.append(
        (
            "trainer=gpu without a GPU",
            "train",
            ["trainer=gpu", "trainer.accelerator=gpu"],  # debug=fast sets cpu
            r"^trainer.accelerator=gpu \(trainer=gpu\) needs a GPU, and torch sees none here: "
            r"use trainer=cpu",
        )
    )
