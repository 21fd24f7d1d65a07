"""Experiments at scale, offline: a Hydra sweep with offline W&B runs and its results table,
DDP on CPU (2 gloo processes) inside a multirun, Optuna, every paper preset for one step,
and the same seed giving the same losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CONF, FAST, compose_config, run_script, tiny_fid, train_config
from fakes import _fake_emnist, _fake_ffhq, fake_mnist
from PIL import Image
from wandb_records import summary

from ddpm.cli import eval as evaluation
from ddpm.cli import train as training
from ddpm.cli.results import main as results_main
from ddpm.cli.results import summarize
from ddpm.metrics.inception import fid_helper_file


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if (p / "run.json").is_file())


@pytest.mark.slow
def test_sweep_over_schedules_with_offline_wandb_and_results_table(tmp_path: Path):
    sweep = tmp_path / "sweep"
    env_free = run_script(
        "train.py",
        "-m",
        *FAST,
        "logger=csv_wandb",
        "schedule=linear,cosine,sigmoid",
        "callbacks.sample_grid.animate=true",
        f"hydra.sweep.dir={sweep}",
    )
    assert "logging offline" in env_free.stdout and "wandb sync" in env_free.stdout
    jobs = job_dirs(sweep)
    common = "callbacks.sample_grid.animate=True,debug=fast,logger=csv_wandb"
    assert [p.name for p in jobs] == [
        f"{k}_{common},schedule={s}" for k, s in enumerate(["linear", "cosine", "sigmoid"])
    ]
    runs = [summary(p) for p in jobs]
    # one W&B run each, grouped by the sweep, named by its overrides
    assert len({r["run"][0] for r in runs}) == 3
    assert {r["run"][1] for r in runs} == {"sweep"}
    assert [r["run"][2] for r in runs] == [p.name.split("_", 1)[1] for p in jobs]
    # the logged config says which schedule each used, and how the run was made
    targets = [r["config"]["schedule"]["_target_"].rsplit(".", 1)[1] for r in runs]
    assert targets == ["linear", "cosine", "sigmoid"]
    assert all(r["config"]["run"]["effective_batch_size"] == 8 for r in runs)
    assert all(len(r["config"]["run"]["git"]["commit"] or "x" * 40) == 40 for r in runs)
    # the logged metrics: losses per step (also per quarter of t), which differ by schedule
    losses = [[h["train/loss"] for h in r["history"] if "train/loss" in h] for r in runs]
    assert all(len(x) == 4 for x in losses) and len({tuple(x) for x in losses}) == 3
    assert all(any("train/loss_q3" in h for h in r["history"]) for r in runs)
    assert all(any("val/loss" in h for h in r["history"]) for r in runs)
    # media: the grids at each validation and the final denoising animation
    assert all(sum("samples/filenames" in h for h in r["history"]) == 3 for r in runs)
    assert all(any(h.get("denoising/_type") == "videos" for h in r["history"]) for r in runs)

    markdown = results_main([str(sweep), "--metrics", "val/loss", "train/loss"])
    # the bound every sweep over schedules can be ranked on, logged by each run
    assert all(any(h.get("val/bpd", 0) > 0 for h in r["history"]) for r in runs)
    table = (sweep / "results.md").read_text()
    assert table == markdown
    rows = table.splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == [
        f"{common.replace(',', ' ')} schedule={s}" for s in ["cosine", "linear", "sigmoid"]
    ]
    val = sorted(json.loads((p / "metrics.json").read_text())["val/loss"] for p in jobs)
    assert sorted(float(r.split("|")[3]) for r in rows) == pytest.approx(val, rel=1e-3)
    assert len((sweep / "results.csv").read_text().splitlines()) == 4


@pytest.mark.slow
def test_resumed_run_continues_its_wandb_run(trained_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    run_script("train.py", *FAST, "logger=csv_wandb", f"hydra.run.dir={run}")
    run_script("train.py", *FAST, "logger=csv_wandb", f"hydra.run.dir={run}", "trainer.max_steps=6")
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1  # one run id, two sessions
    assert files[0].name == f"run-{(run / 'wandb_run_id').read_text().strip()}.wandb"


def test_results_mean_and_std_over_seeds(tmp_path: Path):
    for k, (schedule, seed, loss) in enumerate(
        [("linear", 0, 1.0), ("linear", 1, 3.0), ("cosine", 0, 2.0), ("cosine", 1, 2.0)]
    ):
        job = tmp_path / str(k)
        job.mkdir()
        overrides = [f"schedule={schedule}", f"seed={seed}", "debug=fast"]
        (job / "run.json").write_text(json.dumps({"overrides": overrides, "seed": seed}))
        (job / "metrics.json").write_text(json.dumps({"val/loss": loss}))
    results_main([str(tmp_path)])
    csv = (tmp_path / "results.csv").read_text().splitlines()
    assert csv[0] == "configuration,seeds,val/loss,val/loss_std"
    assert csv[1] == '"debug=fast schedule=cosine",2,2,0'
    assert csv[2] == f'"debug=fast schedule=linear",2,2,{math.sqrt(2):.6g}'


def test_results_rank_on_comparable_metrics_and_name_what_is_missing(tmp_path: Path, capsys):
    """The default columns: bpd, FID/KID, then the losses (the epoch mean, not one batch's);
    an unfinished job is warned about and footnoted; a cut metrics.json and an unknown
    --metrics column are named, without a traceback."""
    for k, (schedule, bpd, loss) in enumerate([("linear", 3.1, 0.17), ("cosine", 2.9, 0.33)]):
        job = tmp_path / str(k)
        job.mkdir()
        (job / "run.json").write_text(json.dumps({"overrides": [f"schedule={schedule}"]}))
        metrics = {
            "val/loss": loss,
            "val/bpd": bpd,
            "val/fid70_train_ddpm2": 9.0,
            "train/loss": 0.5,
            "train/loss_mean": 0.4,
        }
        (job / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "run.json").write_text(json.dumps({"overrides": ["schedule=sigmoid"]}))
    markdown = results_main([str(tmp_path)])
    header = markdown.splitlines()[0]
    assert header == (
        "| configuration | seeds | val/bpd | val/fid70_train_ddpm2 | val/loss | train/loss_mean |"
    )
    assert "1 run(s) did not finish" in markdown and str(tmp_path / "2") in markdown
    assert f"WARNING: {tmp_path / '2'} has no metrics.json" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        results_main([str(tmp_path), "--metrics", "val/fid"])
    assert "no run logged 'val/fid'; the runs logged: " in capsys.readouterr().err
    (tmp_path / "1" / "metrics.json").write_text('{"val/loss": 0.3')  # cut by a kill
    with pytest.raises(SystemExit):
        results_main([str(tmp_path)])
    assert f"{tmp_path / '1' / 'metrics.json'}: not readable JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        results_main([str(tmp_path / "0" / "nothing")])
    assert "no finished runs" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_cpu_trains_checkpoints_and_measures_fid_inside_a_multirun(tmp_path: Path):
    """trainer=ddp_cpu: 2 gloo processes per job, 2 jobs in one Hydra multirun. Each job
    trains, checkpoints and measures FID/KID sharded over both ranks, in its own directory
    (Lightning's own DDP launcher would restart the whole sweep in every child)."""
    sweep = tmp_path / "sweep"
    proc = run_script(
        "train.py",
        "-m",
        *FAST,
        "trainer=ddp_cpu",
        "seed=0,1",
        *tiny_fid(tmp_path / "cache"),
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.stdout.count("Launching 2 jobs") == 1  # no child restarted the sweep
    jobs = job_dirs(sweep)
    assert len(jobs) == 2
    fids = []
    for job in jobs:
        info = json.loads((job / "run.json").read_text())
        assert info["world_size"] == 2 and info["effective_batch_size"] == 16
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 4 and len(ckpt["rng_states"]) == 2  # both ranks' RNG
        metrics = json.loads((job / "metrics.json").read_text())
        fids.append(metrics["val/fid70_train_ddpm2"])
        assert metrics["val/kid70_train_ddpm2"] > 0
    assert all(f > 1 for f in fids) and fids[0] != fids[1]  # seeds 0 and 1 differ


@pytest.mark.slow
def test_optuna_search_runs_trials_and_reports_the_best(tmp_path: Path):
    sweep = tmp_path / "optuna"
    run_script(
        "train.py",
        "hparams_search=optuna",
        *FAST,
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
    )
    assert len(job_dirs(sweep)) == 2
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in best and "module.optimizer.lr" in best and "best_value" in best


def test_launcher_and_search_configs_compose():
    cfg = compose_config(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.nodes == 1
    cfg = compose_config(["hparams_search=optuna"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert set(cfg.hydra.sweeper.params) == {"module.optimizer.lr", "module.ema_decay", "schedule"}


@pytest.mark.slow
def test_same_seed_same_losses(tmp_path: Path):
    curves = []
    for k in range(2):
        run = tmp_path / str(k)
        run_script("train.py", *FAST, f"hydra.run.dir={run}")
        curves.append(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True))
    assert curves[0]["callbacks"]["LossCurve"] == curves[1]["callbacks"]["LossCurve"]
    for name, value in curves[0]["state_dict"].items():
        assert torch.equal(value, curves[1]["state_dict"][name]), name
    info = json.loads((tmp_path / "0" / "run.json").read_text())
    assert info["seed"] == 0 and "train.py" in info["command"]  # what reruns it
    assert (tmp_path / "0" / "config.yaml").is_file()


PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# the autoencoder and latent presets have their own test below
TRAINING_PRESETS = [
    p for p in PRESETS if p != "ddim_cifar10_eval" and not p.startswith(("autoencoder_", "latent_"))
]
# the reduced size: a tiny network, batch 2, one step, grids of 2 images in 2 steps
REDUCED = [
    "model.ch=8",
    "model.num_res_blocks=1",
    "dataset.batch_size=2",
    "+trainer.fast_dev_run=1",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.precision=32-true",
    "+trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks.sample_grid.n=2",
    "callbacks.sample_grid.steps=2",
    "callbacks.sample_grid.final_steps=2",
]
# the ADM presets' network at reduced size: GroupNorm's 32 groups need 32 channels
ADM_REDUCED = [
    "model.model_channels=32",
    "model.channel_mult=[1,2]",
    "model.attention_resolutions=[16]",
]


@pytest.mark.slow
@pytest.mark.parametrize("preset", TRAINING_PRESETS)
def test_every_preset_runs_one_step(preset, fake_cifar, fake_stl10, tmp_path):  # noqa: F811
    fake_mnist(tmp_path, n=40)
    _fake_emnist(tmp_path)
    _fake_ffhq(tmp_path)
    base = compose_config([f"experiment={preset}", "hydra.runtime.output_dir=/tmp/x"])
    extra = ["~callbacks.fid"] if "fid" in base.callbacks else []  # FID: its own tests
    if not base.dataset.get("val_split"):  # hold some of the few fake images out
        extra.append("dataset.val_fraction=0.2")
    if base.dataset.name == "ffhq":  # the fake FFHQ images are 64 px
        extra.append("dataset.image_size=64")
    reduced = REDUCED
    if base.model._target_ == "ddpm.adm.ADM":
        reduced = [*ADM_REDUCED, *(o for o in REDUCED if not o.startswith("model.ch="))]
    overrides = [f"experiment={preset}", *reduced, *extra, f"paths.data_dir={tmp_path}"]
    metrics = training.train(train_config(tmp_path / "run", overrides))
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/bpd"])
    assert (tmp_path / "run" / "samples" / "final.png").is_file()


def test_iddpm_presets_are_improved_diffusions_cifar10_flags():
    """Every flag of improved-diffusion's README for its two CIFAR-10 checkpoints, and the
    defaults of its scripts they leave, as the composed presets set them (the headers say
    which key is which flag)."""
    hybrid, vlb = (
        compose_config([f"experiment={p}", "hydra.runtime.output_dir=/tmp/x"])
        for p in ("iddpm_cifar10_cosine", "iddpm_cifar10_vlb")
    )
    T = 4000
    for cfg in (hybrid, vlb):
        net, module = cfg.module.net, cfg.module
        assert net._target_ == "ddpm.adm.ADM" and (net.image_size, net.in_channels) == (32, 3)
        assert (net.model_channels, list(net.channel_mult), net.num_res_blocks) == (
            128,
            [1, 2, 2, 2],
            3,
        )
        assert (list(net.attention_resolutions), net.num_heads, net.num_heads_upsample) == (
            [16, 8],
            4,
            -1,
        )
        assert net.dropout == 0.3 and net.use_scale_shift_norm and not net.use_new_attention_order
        assert net.num_classes is None and net.timestep_scale == 1000 / T  # rescale_timesteps
        assert module.schedule._target_.endswith(".cosine") and module.schedule.timesteps == T
        assert module.learn_sigma and module.objective == "eps"
        assert module.vlb_weight == 1 / 1000  # rescale_learned_sigmas: L_t · T/1000 = λ T L_t
        assert module.optimizer._target_ == "torch.optim.AdamW"
        assert module.optimizer.lr == 1e-4 and module.optimizer.weight_decay == 0
        assert module.lr_scheduler is None and module.ema_decay == 0.9999 and not module.ema_warmup
        assert cfg.dataset.batch_size == 128 and not cfg.dataset.hflip
        assert cfg.trainer.gradient_clip_val is None and cfg.trainer.max_steps == 500_000
    assert (hybrid.module.loss, hybrid.module.timestep_sampler) == ("mse", "uniform")
    assert (vlb.module.loss, vlb.module.timestep_sampler) == ("vlb", "loss_second_moment")


# the large-image presets at reduced size: 32 px images, a narrow KL-f4 autoencoder (8 px
# latents) and a narrow UNet, batches of 2 of the few fake images
LARGE_AE = [
    "dataset.image_size=32",
    "dataset.batch_size=2",
    "dataset.val_fraction=0.25",
    "module.net.block_out_channels=[8,8,8]",
    "module.net.norm_num_groups=4",
    "module.net.layers_per_block=1",
]
LARGE_LATENT = [
    "dataset.image_size=32",
    "dataset.batch_size=2",
    "dataset.val_fraction=0.25",
    "model.image_size=8",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[4]",
]
LATENT_PRESETS = [
    ("autoencoder_mnist5k", "latent_mnist5k", [], []),
    ("autoencoder_letters", "latent_letters", [], []),
    ("autoencoder_stl10_96", "latent_stl10_96", LARGE_AE, LARGE_LATENT),
    ("autoencoder_ffhq_128", "latent_ffhq_128", LARGE_AE, LARGE_LATENT),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "second", "first_extra", "second_extra"),
    LATENT_PRESETS,
    ids=[p[1] for p in LATENT_PRESETS],
)
def test_latent_presets_run_one_step_each(
    first, second, first_extra, second_extra, fake_stl10, tmp_path
):  # noqa: F811
    """Each autoencoder preset runs a step and writes its reconstructions; the latent preset
    then trains a step on that autoencoder's cached latents and draws its (decoded) grid. The
    STL-10 / FFHQ pairs compose at full size (their latent UNet fits their autoencoder's
    latents) and run at reduced size."""
    _fake_ffhq(tmp_path)
    common = [
        "+trainer.fast_dev_run=1",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "+trainer.enable_progress_bar=false",
        "logger=none",
        f"paths.data_dir={tmp_path}",
    ]
    full_ae = compose_config([f"experiment={first}", "hydra.runtime.output_dir=/tmp/x"])
    full = compose_config([f"experiment={second}", "autoencoder=x", "hydra.runtime.output_dir=/x"])
    f = 2 ** (len(full_ae.module.net.block_out_channels) - 1)
    assert full.model.image_size * f == full.dataset.image_size == full_ae.dataset.image_size
    assert full.model.in_channels == full_ae.module.net.latent_channels
    metrics = training.train(
        train_config(tmp_path / "ae", [f"experiment={first}", *common, *first_extra])
    )
    assert math.isfinite(metrics["val/psnr"])
    assert (tmp_path / "ae" / "samples" / "recon_final.png").is_file()
    ae = tmp_path / "ae" / "checkpoints" / "last.ckpt"
    latent = [
        f"experiment={second}",
        *common,
        *second_extra,
        f"autoencoder={ae}",
        "model.ch=8",
        "callbacks.sample_grid.n=2",
        "callbacks.sample_grid.steps=2",
        "callbacks.sample_grid.final_steps=2",
        f"dataset.cache_dir={tmp_path / 'cache'}",
    ]
    metrics = training.train(train_config(tmp_path / "latent", latent))
    assert math.isfinite(metrics["train/loss"])
    grid = Image.open(tmp_path / "latent" / "samples" / "final.png")
    # decoded 32 px images (cells of 32 px and a 2 px border), not 8 px latents
    assert (grid.width - 2) % 34 == 0 and (grid.height - 2) % 34 == 0


@pytest.mark.slow
def test_ddim_table_preset_on_a_checkpoint(trained_run: Path, tmp_path: Path):
    """ddim_cifar10_eval for eval.py: DDIM, eta 0, quadratic steps, the paper's step counts;
    run here on the tiny checkpoint with fewer images and steps (overrides)."""
    cfg = compose_config(["+experiment=ddim_cifar10_eval", "source=x.ckpt"], name="eval")
    assert list(cfg.table) == ["ddim:10", "ddim:20", "ddim:50", "ddim:100", "ddpm:1000"]
    assert cfg.sampler.name == "ddim" and cfg.sampler.spacing == "quadratic"
    assert cfg.dataset.name == "cifar10" and cfg.n == 50000
    cfg = compose_config(
        [
            "+experiment=ddim_cifar10_eval",
            f"source={trained_run / 'checkpoints' / 'last.ckpt'}",
            "dataset=mnist5k",
            "n=70",
            "reference_n=100",
            "features=64",
            f"weights={fid_helper_file()}",
            "table=[ddim:2,ddim:3]",
            "batch_size=35",
            f"cache_dir={tmp_path}",
            f"out={tmp_path / 'table.json'}",
        ],
        name="eval",
    )
    result = evaluation.evaluate(cfg)
    assert result["fid70_train_ddim2"] > 0 and result["fid70_train_ddim3"] > 0
    assert (tmp_path / "table.table.md").read_text().count("| ddim |") == 2


def test_metrics_json_is_valid_json_when_a_metric_is_not_finite(tmp_path: Path, monkeypatch):
    """A diverged metric is written as null (JSON has no NaN), and the results table skips it."""
    cfg = train_config(tmp_path, [*FAST, "trainer.max_steps=1"])
    real_fit = training.L.Trainer.fit

    def fit_then_diverge(trainer, *args, **kwargs):
        real_fit(trainer, *args, **kwargs)
        trainer.callback_metrics["val/loss"] = torch.tensor(float("nan"))

    monkeypatch.setattr(training.L.Trainer, "fit", fit_then_diverge)
    training.train(cfg)
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text  # Python's json reads NaN, other languages' parsers do not
    final = json.loads(text)
    assert final["val/loss"] is None and final["step"] == 1
    runs = [("a", "0", {"val/loss": None}), ("a", "1", {"val/loss": 2.0})]
    assert summarize(runs, ["val/loss"])[1][0]["val/loss"][0] == 2.0
