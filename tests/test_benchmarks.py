"""The benchmark scripts whose figures the README and benchmarks/RESULTS.md quote: their pieces, and each
script run end to end on a budget of a second or two (the figures themselves are not checked here), on
one thread as every test is (conftest.py)."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from vitlab import ViTConfig
from vitlab.training.precision import native_bf16

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tta():
    return load("time_to_accuracy")


@pytest.fixture(scope="module")
def throughput():
    return load("throughput")


# --- time_to_accuracy.py -----------------------------------------------------------------------------


def test_budget_recipe_is_the_defaults_with_the_documented_changes(tta):
    config, settings = tta.vitlab_recipe({})
    assert config == ViTConfig(depth=4, pool="mean")
    assert settings["lr"] == 5e-3 and settings["elastic"] == 1.0 and settings["compile"] is True
    assert settings["precision"] == ("bf16" if native_bf16() else "fp32")
    assert settings["batch_size"] == 128 and settings["ema"] == 0.999  # fit's defaults, untouched
    assert "seed" not in settings  # --seeds sets it


def test_set_overrides_the_budget_recipe_and_refuses_unknown_keys(tta):
    config, settings = tta.vitlab_recipe(tta.parse_overrides(["depth=6", "lr=2e-3", "pool=mean", "ema=None"]))
    assert (config.depth, config.pool, settings["lr"], settings["ema"]) == (6, "mean", 2e-3, None)
    with pytest.raises(SystemExit, match=r"\['colour'\]"):
        tta.vitlab_recipe({"colour": 1})
    with pytest.raises(SystemExit, match="key=value.*'depth'"):
        tta.parse_overrides(["depth"])


def test_an_epoch_whose_first_batch_is_made_past_the_budget_is_none(tta):
    class Clock:  # advanced by a second each time a batch is made
        t = 0.0

        def __call__(self) -> float:
            return self.t

    def batches(clock: Clock):
        for i in range(3):
            clock.t += 1.0
            yield i, i

    late = Clock()
    late.t = 0.2
    assert tta._epoch(batches(late), late, budget=0.5) is None  # checked at 0.2, first batch ready at 1.2
    clock = Clock()
    assert [images for images, _ in tta._epoch(batches(clock), clock, budget=2.5)] == [0, 1]


def test_evaluation_time_is_taken_off_the_training_clock(tta, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(tta.time, "perf_counter", lambda: now[0])
    clock = tta.Clock()

    def evaluate(model, test):
        now[0] += 50.0  # a slow evaluation
        return {"accuracy": 0.5}

    monkeypatch.setattr(tta, "evaluate", evaluate)
    checkpoints = tta.Checkpoints([20, 10], clock, torch.nn.Identity, None, "run")
    now[0] += 9.0
    checkpoints(step=1)
    assert checkpoints.scores == {}  # 9 s < 10 s
    now[0] += 1.0
    checkpoints(step=2)
    assert checkpoints.scores == {10: 0.5} and clock() == pytest.approx(10.0)  # the 50 s are not training time
    checkpoints(step=3, done=True)  # the run ended before 20 s: scored where it stopped
    assert checkpoints.scores == {10: 0.5, 20: 0.5} and checkpoints.steps == {10: 2, 20: 3}


def test_table_gives_the_mean_over_seeds_then_each_seed(tta):
    text = tta.table({"vitlab": {0: {60: 0.97, 300: 0.99}, 1: {60: 0.98, 300: 0.985}}}, [60, 300])
    assert text.splitlines() == [
        "| recipe | 60 s | 300 s |",
        "|---|---|---|",
        "| vitlab (seeds 0, 1) | **97.50** (97.00 / 98.00) | **98.75** (99.00 / 98.50) |",
    ]


def test_step_table_gives_the_fewest_and_most_steps_over_seeds(tta):
    text = tta.step_table({"vitlab": {0: {60: 2121, 300: 11821}, 1: {60: 2486, 300: 11316}},
                           "seed": {0: {60: 3965, 300: 20677}}}, [60, 300])
    assert text.splitlines() == [
        "| steps | 60 s | 300 s |",
        "|---|---|---|",
        "| vitlab | 2,121-2,486 | 11,316-11,821 |",
        "| seed | 3,965 | 20,677 |",
    ]


def test_time_to_accuracy_runs_both_recipes_end_to_end(tta, capsys):
    status = tta.main([
        "--val-split", "1", "--threads", "1", "--budget", "2", "--checkpoints", "1", "2", "--seeds", "0",
        "--set", "compile=False", "dim=32", "heads=2", "mlp_dim=64", "batch_size=64",
    ])
    out = capsys.readouterr().out
    assert status == 0
    assert "4,500 training images, 500 validation images (split 1)" in out
    rows = {line.split(" (seeds")[0]: line for line in out.splitlines() if " (seeds " in line}
    assert set(rows) == {"| vitlab", "| seed"}
    for row in rows.values():
        scores = [float(s) for s in re.findall(r"\*\*(\d+\.\d\d)\*\*", row)]
        assert len(scores) == 2 and all(0.0 <= s <= 100.0 for s in scores)
    # One run per checkpoint for vitlab: a 1-s run and a 2-s run, each scored once, at its end.
    runs = [int(n) for n in re.findall(r"vitlab seed 0: (\d+) steps", out)]
    assert len(runs) == 2
    steps_row = next(line for line in out.splitlines() if line.startswith("| vitlab |"))
    assert steps_row == "| vitlab | " + " | ".join(f"{n:,}" for n in runs) + " |"


def test_time_to_accuracy_scores_one_run_at_each_checkpoint_with_runs_one(tta, capsys):
    status = tta.main([
        "--val-split", "2", "--threads", "1", "--budget", "2", "--checkpoints", "1", "2", "--seeds", "0",
        "--recipes", "vitlab", "--runs", "one", "--set", "compile=False", "dim=32", "heads=2", "mlp_dim=64",
    ])
    out = capsys.readouterr().out
    assert status == 0 and len(re.findall(r"vitlab seed 0: \d+ steps", out)) == 1
    at = [int(n) for n in re.findall(r"vitlab seed 0 +\d s: \d+\.\d\d%  \(at [\d.]+ s, step (\d+)\)", out)]
    assert len(at) == 2 and at[0] <= at[1]
    steps_row = next(line for line in out.splitlines() if line.startswith("| vitlab |"))
    assert steps_row == f"| vitlab | {at[0]:,} | {at[1]:,} |"


def test_epochs_for_rounds_step_counts_up_to_whole_epochs(tta):
    assert [tta.epochs_for(n, 39) for n in (1000, 2500, 5000)] == [26, 65, 129]
    assert [tta.epochs_for(n, 39) * 39 for n in (1014, 2496, 4992)] == [1014, 2496, 4992]  # already whole
    assert tta.epochs_for(1, 39) == 1 and tta.epochs_for(40, 39) == 2


def test_steps_table_gives_the_mean_over_seeds_then_each_seed(tta):
    rows = [{"seed": 0, "epochs": 26, "steps": 1014, "accuracy": 0.944, "seconds": 30.0},
            {"seed": 1, "epochs": 26, "steps": 1014, "accuracy": 0.939, "seconds": 31.0},
            {"seed": 0, "epochs": 64, "steps": 2496, "accuracy": 0.976, "seconds": 70.0}]
    assert tta.steps_table(rows).splitlines() == [
        "| steps (epochs) | mean | per seed |",
        "|---|---|---|",
        "| 1,014 (26) | **94.15** | 94.40 (seed 0) / 93.90 (seed 1) |",
        "| 2,496 (64) | **97.60** | 97.60 (seed 0) |",
    ]


def test_steps_mode_trains_fit_for_whole_epochs_and_repeats_to_the_image(tta, capsys):
    argv = ["--val-split", "1", "--threads", "1", "--steps", "30", "40", "--seeds", "0",
            "--set", "compile=False", "dim=16", "heads=2", "mlp_dim=32", "depth=1", "precision=fp32"]
    assert tta.main(argv) == 0
    out = capsys.readouterr().out
    assert "36 steps per epoch; epochs 1, 2" in out  # 4,500 images in batches of 128, the last one kept
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["seed"], r["epochs"], r["steps"]) for r in rows] == [(0, 1, 36), (0, 2, 72)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["seconds"] > 0 for r in rows)
    assert "| 36 (1) | **" in out and "| 72 (2) | **" in out
    tta.main(argv[:5] + ["30"] + argv[7:])  # the first run again, alone
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert again[0]["accuracy"] == rows[0]["accuracy"]  # same seed, same ops, same order: the same run


def test_steps_mode_refuses_a_count_below_one(tta):
    with pytest.raises(SystemExit, match="--steps must be at least 1; got 0"):
        tta.main(["--val-split", "1", "--steps", "0"])


# --- throughput.py -----------------------------------------------------------------------------------


def test_every_model_in_the_throughput_table_is_the_same_architecture(throughput):
    """The same parameters, but for vit-pytorch's two LayerNorms around its patch projection and its q/k/v
    without bias, and the same inference FLOPs per image, so that images/s compare like with like.

    Training FLOPs differ by what each backward pass computes: timm's and torchvision's fused attention
    counts its backward as 2.5 forwards (it recomputes), and vit-pytorch's LayerNorm before the patch
    projection makes that projection's input gradient needed. Within 2% of each other."""
    models = {"vitlab": throughput.build_vitlab(), "timm": throughput.build_timm(),
              "torchvision": throughput.build_torchvision(), "vit-pytorch": throughput.build_vit_pytorch()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert params["vitlab"] == params["timm"] == params["torchvision"]
    patch_dim = throughput.PATCH**2 * throughput.CHANNELS
    layer_norms, qkv_biases = 2 * patch_dim + 2 * throughput.DIM, throughput.DEPTH * 3 * throughput.DIM
    assert params["vit-pytorch"] == params["vitlab"] + layer_norms - qkv_biases
    batch = torch.randn(4, throughput.CHANNELS, throughput.IMAGE, throughput.IMAGE)
    labels = torch.randint(0, throughput.CLASSES, (4,))
    infer = {name: throughput.flops_per_image(m, batch, labels, train=False) for name, m in models.items()}
    assert len(set(infer.values())) == 1, infer
    train = {name: throughput.flops_per_image(m, batch, labels, train=True) for name, m in models.items()}
    assert max(train.values()) / min(train.values()) < 1.02, train
    patches = (throughput.IMAGE // throughput.PATCH) ** 2
    assert train["vitlab"] == 3 * infer["vitlab"] - 2 * patches * patch_dim * throughput.DIM  # no input gradient


def test_throughput_runs_end_to_end_and_reports_every_bound(throughput, capsys):
    figures = throughput.main(["--threads", "1", "--rounds", "1", "--burst", "1", "--batch", "8", "--no-compile",
                               "--import-runs", "1"])
    out = capsys.readouterr().out
    assert re.search(r"fp32 matmul peak \d+ GFLOP/s", out)
    for name in ("vitlab", "timm", "torchvision", "vit-pytorch"):
        assert re.search(rf"^{re.escape(name)} +205,\d\d\d +[\d,]+ ", out, re.MULTILINE), name  # a training row
    for name in ("vitlab (recording)", "vitlab, batch 1", "vitlab (recording), batch 1"):
        assert re.search(rf"^{re.escape(name)} +[\d,]+ +\d+\.\d\d +\d+\.\d\d$", out, re.MULTILINE), name
    assert "compiled" not in out  # --no-compile
    assert figures["fastest_peer"] in throughput.PEERS
    for line in ("eager step: ", "recording at batch 8: ", "recording at batch 1: ", "import vitlab: ",
                 "vitlab.ViT(): "):
        assert re.search(rf"^{re.escape(line)}\d+\.\d+.* \((>=|<=|<) .*: (holds|MISSED)\)$", out, re.MULTILINE), line
    assert 0 < figures["import"] < 60 and 0 < figures["build"] < 10
    assert figures["recording"] > 0 and figures["recording_batch_1"] > 0 and figures["eager"] > 0


def test_recorded_inference_reads_what_a_learner_reads(throughput, monkeypatch):
    """The recorded pass is timed as a learner records: the model inside vitlab.record, the attentions read."""
    from vitlab.inside.record import Recording

    read = []
    attentions = Recording.attentions
    monkeypatch.setattr(Recording, "attentions", property(lambda rec: read.append(attentions.fget(rec).shape)))
    model = throughput.build_vitlab()
    throughput.infer_fn(model, torch.randn(2, 1, 28, 28), recording=True)()
    assert read == [(2, throughput.DEPTH, throughput.HEADS, 17, 17)]
    assert not model.training  # inference in eval mode
    read.clear()
    throughput.infer_fn(model, torch.randn(2, 1, 28, 28))()
    assert read == []  # the plain pass records nothing


def test_a_bf16_training_step_runs_under_autocast(throughput, monkeypatch):
    seen = []
    real = throughput.autocast
    monkeypatch.setattr(throughput, "autocast", lambda device, precision: seen.append(precision) or real(device, precision))
    model = throughput.build_vitlab()
    before = [p.detach().clone() for p in model.parameters()]
    throughput.train_step_fn(model, torch.randn(4, 1, 28, 28), torch.arange(4), precision="bf16")()
    assert seen == ["bf16"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves the weights in fp32
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the optimizer stepped


# --- attention_crossover.py --------------------------------------------------------------------------


def test_attention_crossover_runs_end_to_end(capsys):
    crossover = load("attention_crossover")
    crossover.main(["--threads", "1", "--tokens", "17", "65", "--token-budget", "256", "--rounds", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["17", "15"], ["65", "3"]]  # tokens, batch = 256 // tokens
    assert all(float(value) > 0 for row in rows for value in row[2:])


# --- validation_sweep.py -----------------------------------------------------------------------------


def test_validation_sweep_builds_the_recipe_from_the_defaults_and_refuses_unknown_keys():
    sweep = load("validation_sweep")
    config, settings = sweep.recipe({"elastic": 1.0, "depth": 4})
    assert config == ViTConfig(depth=4)
    assert settings["elastic"] == 1.0 and settings["compile"] is True and settings["lr"] == 2e-3
    assert settings["precision"] == ("bf16" if native_bf16() else "fp32")
    with pytest.raises(SystemExit, match=r"--set \['colour'\]"):
        sweep.recipe({"colour": 1})


def test_validation_sweep_runs_end_to_end_and_repeats_to_the_image(capsys):
    sweep = load("validation_sweep")
    argv = ["--epochs", "1", "--splits", "3", "--set", "dim=16", "heads=2", "mlp_dim=32", "depth=1",
            "compile=False", "precision='fp32'"]
    assert sweep.main(argv) == 0
    sweep.main(argv)
    first, again = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (first["split"], first["epochs"], first["steps"], first["n_val"]) == (3, 1, 32, 1000)  # 4,000 images
    assert first["config"] == {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32}
    assert 0.0 <= first["val_accuracy"] <= 1.0
    assert {k: v for k, v in first.items() if k != "seconds"} == {k: v for k, v in again.items() if k != "seconds"}
