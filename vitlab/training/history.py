"""What a training run records: one row per epoch and one row per optimizer step, as plain dicts of numbers.

Epoch rows: ``epoch`` (1 for the first), ``step`` (optimizer steps so far), ``train_loss``,
``train_accuracy``, ``n_train`` (images seen in the epoch), with validation data also ``val_loss`` and
``val_accuracy``, then ``lr`` (after the epoch's last step) and ``time`` (seconds since the run began,
validation included). Step rows: ``step`` (1 for the first), ``epoch``, ``loss``, ``lr`` (the rate that
step used) and ``time``. Accuracies are fractions in [0, 1]; losses are batch-weighted means of the
loss that was minimised (label smoothing included) for training, plain cross-entropy for validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class History:
    """Rows of numbers, ``epochs`` and ``steps``, that survive a round trip through ``to_dict``/``from_dict``."""

    epochs: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)

    def epoch_column(self, name: str) -> list:
        """name -> [value per epoch], e.g. ``history.epoch_column("val_accuracy")`` for a plot."""
        return self._column(self.epochs, name, "epoch")

    def step_column(self, name: str) -> list:
        """name -> [value per optimizer step], e.g. ``history.step_column("loss")``."""
        return self._column(self.steps, name, "step")

    @staticmethod
    def _column(rows: list[dict], name: str, kind: str) -> list:
        if rows and name not in rows[0]:
            raise KeyError(f"no {kind} column {name!r}; the {kind} rows have {sorted(rows[0])}")
        return [row[name] for row in rows]

    def best_epoch(self) -> dict | None:
        """The epoch row with the highest val_accuracy (the earliest of equals), or None without validation."""
        rows = [row for row in self.epochs if "val_accuracy" in row]
        return max(rows, key=lambda row: row["val_accuracy"], default=None)

    def to_dict(self) -> dict:
        """-> ``{"epochs": [row, ...], "steps": {name: [value per step], ...}}``, plain containers for a checkpoint.

        Epoch rows stay rows (their columns vary with validation). Step rows, one per optimizer step and
        all with the same names, are stored as columns: pickled, that is about 35 bytes a step instead of
        55, which keeps a long run's model file small. Steps whose rows differ in their names stay rows.
        """
        epochs = [dict(row) for row in self.epochs]
        names = list(self.steps[0]) if self.steps else []
        if any(list(row) != names for row in self.steps):
            return {"epochs": epochs, "steps": [dict(row) for row in self.steps]}
        return {"epochs": epochs, "steps": {name: [row[name] for row in self.steps] for name in names}}

    @classmethod
    def from_dict(cls, values: dict) -> "History":
        """The inverse of ``to_dict``; the steps may also be a list of rows, as ``to_dict`` wrote them before."""
        if not isinstance(values, dict) or set(values) != {"epochs", "steps"}:
            found = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise ValueError(f"expected a history dict with keys ['epochs', 'steps']; got {found}")
        steps = values["steps"]
        if isinstance(steps, dict):
            lengths = {name: len(column) for name, column in steps.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"expected step columns of one length; got lengths {lengths}")
            steps = [dict(zip(steps, row)) for row in zip(*steps.values())]
        return cls([dict(row) for row in values["epochs"]], [dict(row) for row in steps])
