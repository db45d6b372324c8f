"""Encoder_Choice.md: choose's result as a short page (pure text): the table, the pick, why, and
what would change it."""

from __future__ import annotations

from deft_mine.schemas import artifacts
from deft_mine.schemas.results import ChooseResult, EncoderScore


def _cell(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _row(score: EncoderScore, result: ChooseResult) -> str:
    if not score.available:
        why = score.error.message if score.error else "?"
        return f"| {score.name} | unavailable: {why[:120]} | | | | | |"
    speed = "reused" if score.seconds_per_image is None else f"{score.seconds_per_image * 1000:.1f} ms"
    target = _cell(score.target_agreement) + (f" ({score.targets_scored})" if score.targets_scored else "")
    mark = " **pick**" if score.name == result.pick else ""
    return (f"| {score.name}{mark} | {_cell(score.at_topn)} ± {_cell(score.at_topn_se)} | "
            f"{_cell(score.agreement[0])} | {_cell(score.agreement[-1])} | {sum(score.images.values())} | {target} | "
            f"{speed} |")


def render_choice(result: ChooseResult) -> str:
    """The page; every number comes from the result (choice.json holds them all)."""
    pick = next(s for s in result.encoders if s.name == result.pick)
    lines = [
        "# Encoder choice", "",
        f"Leave-one-out label agreement on {result.sample} images sampled by label from {result.listing_rows} "
        f"(seed {result.seed}; {result.scored_images} scored): for each image, the share of its k nearest other "
        f"sampled images (exact {result.metric} similarity) that carry its label, averaged per label, then over "
        f"the labels. ± is one binomial standard error. An image that could not be read is left out: "
        f"*scored* counts the images each score rests on.", "",
        f"| encoder | agreement at topn={result.topn} | at k=1 | at k={result.k_max} | scored | targets at topn | "
        "embed / image |",
        "|---|---|---|---|---|---|---|",
        *(_row(score, result) for score in result.encoders), "",
        "## Pick", "",
        f"**{result.pick}**: the best agreement at topn={result.topn} ({_cell(pick.at_topn)}).",
    ]
    if result.runner_up is not None:
        lines.append(
            f"The runner-up, {result.runner_up}, is {_cell(result.margin)} lower; the noise (standard error of the "
            f"difference) is {_cell(result.noise)}. " + (
                "The difference exceeds two standard errors: a clear winner." if result.clear_winner else
                "**No clear winner**: the difference is within two standard errors; either will do, and a larger "
                "sample would tell them apart."))
    lines += ["", "## topn and floor", "",
              f"Suggested `topn={result.suggested_topn}`: the largest n whose agreement stays within "
              f"{result.tolerance:g} of n = 1 ({_cell(pick.agreement[0])} at n = 1, "
              f"{_cell(pick.agreement[result.suggested_topn - 1])} at n = {result.suggested_topn}"
              + (f", {_cell(pick.agreement[result.suggested_topn])} at n = {result.suggested_topn + 1}"
                 if result.suggested_topn < result.k_max else "") + ")."]
    floor = result.floor
    if floor.min_similarity is not None:
        lines.append(f"Suggested `min_similarity={floor.min_similarity:.4f}`: {floor.reason} — of the "
                     f"{floor.pairs} neighbour pairs (each scored image's {result.k_max} nearest), {floor.below} lie "
                     f"below it, {_cell(floor.below_cross_label_share)} of them cross-label; {floor.above} at or "
                     f"above it, {_cell(floor.above_same_label_share)} of them same-label.")
    else:
        lines.append(f"No floor suggested: {floor.reason} ({floor.pairs} neighbour pairs).")
    lines += ["", f"`{artifacts.EMBEDDING_SPEC}` and `{artifacts.MINING_SPEC}` hold these; run with "
                  f"`deft-mine run --targets T --source POOL --output-dir runs -e {artifacts.EMBEDDING_SPEC} "
                  f"-m {artifacts.MINING_SPEC}`. `{artifacts.CHOICE_PLOT}` shows the curves and the pick's "
                  "same- vs cross-label similarities.", "",
              "## What would change it", "",
              "- Labels that do not say what look-alike means (one label for several defect kinds) lower every "
              "encoder alike; split them.",
              "- A larger `sample` narrows the standard errors; a different `topn` may reorder close encoders.",
              "- An encoder listed as unavailable was not compared: make its weights available and run again."]
    if result.unscored_labels:
        lines += ["", f"Not scored (fewer than two sampled images the pick could read): "
                      f"{', '.join(result.unscored_labels)}."]
    return "\n".join(lines) + "\n"
