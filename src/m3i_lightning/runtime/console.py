"""What a training run prints: Lightning's console, less what misleads here.

- :class:`ParameterSummary`: the module table without Lightning's FLOPs column and total,
  which read 0 unless a module defines ``example_input_array`` (none here does).
- :func:`progress_bar` (``progress=rich|simple``): every objective's loss term next to
  ``train/loss``, and an epoch
  counter that says where the run stops when ``trainer.max_steps`` bounds it, instead of
  "Epoch 0/49".
- :func:`quiet_lightning`: drops Lightning's deprecation of its own use of torch's pytree
  ``LeafSpec``, the advertisement for a cloud logger and the note that our summary replaces
  Lightning's. (Other lines are silenced where they arise: the teacher's eval mode in
  :class:`~m3i_lightning.engine.teacher.TargetEncoder`, FSDP2's deprecated collective in
  :func:`~m3i_lightning.engine.sharding.shard`, the text tower's save bar in
  :meth:`~m3i_lightning.components.text.TextTower.save`, the ``sync_dist`` advice on
  reduced values in :class:`~m3i_lightning.finetune.module.FineTuning`.)
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from m3i_lightning.core.errors import ConfigError

log = logging.getLogger(__name__)

TERM_PREFIX = "train/loss/"
PYTREE_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
LIGHTNING_INFO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class ParameterSummary(ModelSummary):
    """Name, type, parameters and mode of the top-level modules, and the totals."""

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes, total_flops, **kwargs) -> None:
        columns = {name: values for name, values in summary_data if name != "FLOPs"}
        names = [name for name in ("Name", "Type", "Params", "Mode") if name in columns]
        width = {name: max(len(name), *map(len, columns[name])) for name in names}
        rows = [" | ".join(f"{name:<{width[name]}}" for name in names)]
        rows += [" | ".join(f"{columns[name][i]:<{width[name]}}" for name in names)
                 for i in range(len(columns[names[0]]))]
        frozen = total_parameters - trainable_parameters
        rows.append(f"{get_human_readable_count(trainable_parameters)} trainable parameters, "
                    f"{get_human_readable_count(frozen)} frozen, {model_size:.1f} MB")
        log.info("model:\n%s", "\n".join(rows))


class ShowsTerms:
    """Adds every ``train/loss/<objective>`` term to a Lightning progress bar's metrics."""

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        for key, value in trainer.callback_metrics.items():
            if key.startswith(TERM_PREFIX):
                items[key.removeprefix(TERM_PREFIX)] = f"{float(value):.3f}"
        return items


class RichTermsBar(ShowsTerms, RichProgressBar):
    """Lightning's rich bar, whose "Epoch 0/49" becomes "Epoch 0 (stops at step N)" when
    ``max_steps`` bounds the run."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_steps is not None and self.trainer.max_steps >= 0:
            return f"Epoch {current_epoch} (stops at step {self.trainer.max_steps})"
        return super()._get_train_description(current_epoch)


class TQDMTermsBar(ShowsTerms, TQDMProgressBar):
    """The plain bar (``progress=simple``, or rich not installed); it shows no epoch count to
    mislead."""


PROGRESS_BARS = ("rich", "simple")


def progress_bar(kind: str = "rich") -> ProgressBar:
    """The bar ``progress=`` names: ``rich`` (Lightning's RichProgressBar; the plain one when
    rich is not installed) or ``simple`` (tqdm lines, for logs and dumb terminals)."""
    if kind not in PROGRESS_BARS:
        raise ConfigError(f"progress={kind}: choose one of {list(PROGRESS_BARS)}")
    return RichTermsBar() if kind == "rich" and importlib.util.find_spec("rich") else TQDMTermsBar()


NOISE = ("litlogger", "Skipping setting a default `ModelSummary` callback")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in NOISE)


def quiet_lightning() -> None:
    """Silence the Lightning lines that mislead in this library's runs (see the module
    docstring); idempotent."""
    warnings.filterwarnings("ignore", message=PYTREE_WARNING, category=FutureWarning)
    info = logging.getLogger(LIGHTNING_INFO_LOGGER)
    if not any(isinstance(f, _DropNoise) for f in info.filters):
        info.addFilter(_DropNoise())
