"""Doctor checks of the model files, by the configured model family (`ModelFamily.check_weights`).

The family checks its own layout, tensor names and shapes (from safetensors headers or a
memory-mapped `.pt`, no tensor values read, compared with a model built on the meta device through
the loaders' own comparison, so a file that passes here passes the loaders too) and its encoder
and tokenizer folders. Before that, a weights folder of another family is named as such.
"""

from __future__ import annotations

from hvbatch.config import ModelConfig
from hvbatch.doctor.checks import Check, one_line
from hvbatch.models.family import family_of, folder_family_problem


def check_weights(model: ModelConfig) -> list[Check]:
    """The weights root's layout, then one check per component."""
    problem = folder_family_problem(model)
    if problem is not None:
        fix = "use a preset of the checkpoint's family (model=<preset>), or this model's weights"
        return [Check("weights", "fail", problem, fix)]
    return [
        Check(report.check, report.status, one_line(report.detail), report.fix)  # type: ignore[arg-type]
        for report in family_of(model).check_weights(model)
    ]
