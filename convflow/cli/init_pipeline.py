"""`convflow init NAME SOURCE`: a pipeline proposed from what the source holds (convflow.data.survey),
each choice stated in a YAML comment, appended to a pipelines file without touching a byte of
what the file already holds."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from convflow.config.errors import ConfigError
from convflow.config.load import load_pipelines
from convflow.config.schema import PIPELINE_NAME
from convflow.core.skips import skipped_by_reason, skipped_summary
from convflow.core.storage import atomic_file
from convflow.data.survey import SourceSurvey

# The longer image side a model trained from scratch sees: on a CPU each doubling costs four times
# the time, and the tutorial CNN gains little above it. A pretrained MobileNet keeps more detail.
SCRATCH_MAX_SIDE = 96
PRETRAINED_MAX_SIDE = 160
SMALL_IMAGE_SIDE = 32
# Epochs: about this many training images seen in all, within the bounds below.
IMAGES_SEEN = 30_000
MIN_EPOCHS, MAX_EPOCHS = 3, 20
IMBALANCE_RATIO = 1.5
NEW_FILE_HEADER = "# convflow pipelines. Run one with: convflow run NAME\npipelines:\n"
# Keras Applications' weight files: MobileNet v1 ('2_5' is alpha 0.25, '1_0' is 1.0) and v2.
MOBILENET_V1_FILE = re.compile(r"mobilenet_(\d)_(\d)_\d+_tf_no_top\.h5$")
MOBILENET_V2_FILE = re.compile(r"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_(\d(?:\.\d+)?)_\d+_no_top\.h5$")


class InitError(ValueError):
    """A name, source, weights file or pipelines file init cannot use; the message says which and why."""


@dataclass(frozen=True)
class Appended:
    file: Path
    created: bool
    first_line: int  # where the new pipeline starts in the file, from 1


# ----------------------------------------------------------------------------- choices


def check_name(name: str) -> None:
    if not PIPELINE_NAME.match(name):
        raise InitError(f"NAME {name!r}: must be 1-64 of a-z 0-9 _ . - and start with a letter or digit")


def mobilenet_of(weights: Path) -> tuple[str, float]:
    """The base and alpha a Keras Applications MobileNet weights file was saved from.

    Raises:
        InitError: the file is missing, or its name is not one Keras Applications gives.
    """
    if not weights.is_file():
        raise InitError(f"--weights {weights}: no such file")
    if match := MOBILENET_V1_FILE.search(weights.name):
        whole, tenths = match.groups()
        return "mobilenet", 1.0 if whole == "1" else float(f"0.{whole}{tenths}")
    if match := MOBILENET_V2_FILE.search(weights.name):
        return "mobilenet_v2", float(match.group(1))
    raise InitError(
        f"--weights {weights}: not a Keras Applications MobileNet file name "
        "(mobilenet_2_5_224_tf_no_top.h5, mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5, "
        "...); write model: by hand"
    )


def _model_size(survey: SourceSurvey, max_side: int, min_side: int) -> list[int]:
    """The median image size, shrunk to `max_side` (aspect kept, multiples of 8) or grown to `min_side`."""
    height, width = survey.typical_size
    longest = max(height, width)
    if longest <= SMALL_IMAGE_SIDE and min(height, width) >= min_side:
        return [height, width]
    scale = min(max_side, max(longest, min_side)) / longest
    return [max(min_side, round(side * scale / 8) * 8) for side in (height, width)]


def _seed_cnn(survey: SourceSurvey) -> tuple[str, str]:
    if max(survey.typical_size) <= SMALL_IMAGE_SIDE:
        if survey.channels == 1:
            return "mnist_cnn", "the MNIST tutorial's CNN: small grayscale images, trained from scratch"
        return "cifar_cnn", "the CIFAR-10 tutorial's CNN: small colour images, trained from scratch"
    return "augment_cnn", "the image classification tutorial's CNN, trained from scratch (no --weights given)"


def _train_images(survey: SourceSurvey, split: dict[str, float]) -> int:
    """About how many examples the train split gets: the carved share of what no folder assigns elsewhere."""
    unassigned = survey.images - sum(count for name, count in survey.split_counts.items() if name != "train")
    carved = [name for name in split if name == "train" or name not in survey.split_counts]
    return max(1, round(unassigned * split["train"] / sum(split[name] for name in carved)))


def _split(survey: SourceSurvey) -> tuple[dict[str, float], list[str]]:
    defined = set(survey.split_counts)
    if not defined:
        return (
            {"train": 0.8, "validation": 0.1, "test": 0.1},
            ["split by each image's content hash: an image keeps its split as the data grows"],
        )
    kept = ", ".join(
        f"{name} ({survey.split_counts[name]:,})" for name in ("train", "validation", "test") if name in defined
    )
    if defined >= {"validation", "test"}:
        return {"train": 0.8, "validation": 0.1, "test": 0.1}, [
            f"the source's own splits are kept: {kept}",
            "(the fractions below are then unused)",
        ]
    if "validation" in defined:
        return (
            {"train": 0.75, "validation": 0.0, "test": 0.25},
            [
                f"the source's own splits are kept: {kept}; the test split the gate",
                "scores is carved from train, a quarter of it (validation: 0.0, it has its own)",
            ],
        )
    return (
        {"train": 0.8, "validation": 0.1, "test": 0.1},
        [
            f"the source's own splits are kept: {kept}; validation is carved from train",
            "(train : validation = 0.8 : 0.1; the test fraction is unused)",
        ],
    )


def _gate(survey: SourceSurvey) -> tuple[float, list[str]]:
    chance = 1 / len(survey.class_counts)
    gate = round(chance + (1 - chance) / 4, 2)
    return gate, [
        f"the gate: a quarter of the way from guessing ({chance:.2f}) to perfect;",
        "raise it once you know what this data allows",
    ]


# ----------------------------------------------------------------------------- the YAML text


def _quoted(value: str) -> str:
    return yaml.safe_dump(value, default_style='"', width=10_000).strip()


def _comment(lines: list[str], indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in lines]


def pipeline_text(name: str, survey: SourceSurvey, file_dir: Path, weights: Path | None, indent: str = "  ") -> str:
    """The pipeline `name` for `survey`, as YAML lines at `indent` under `pipelines:`, choices in comments."""
    one, two = indent + "  ", indent + "    "
    model_lines, max_side, min_side, pretrained = _model_lines(survey, file_dir, weights, two)
    size = _model_size(survey, max_side, min_side)
    lines = [
        f"{indent}# Written by convflow init from {survey.source}: {len(survey.class_counts)} classes, "
        f"{survey.images:,} images.",
        f"{indent}{name}:",
        f"{one}data:",
        *_data_lines(survey, file_dir, size, max_side, pretrained, two),
        f"{one}model:",
        *model_lines,
        f"{one}train:",
        *_train_lines(survey, size, pretrained, two),
        f"{one}evaluate:",
        *_comment(_gate(survey)[1], two),
        f"{two}min_accuracy: {_gate(survey)[0]}",
    ]
    return "\n".join(lines) + "\n"


def _data_lines(
    survey: SourceSurvey, file_dir: Path, size: list[int], max_side: int, pretrained: bool, indent: str
) -> list[str]:
    scheme, _, location = survey.source.partition(":")
    channels = 3 if pretrained else survey.channels
    split, split_notes = _split(survey)
    height, width = survey.typical_size
    return [
        f"{indent}source: {_quoted(_relative_source(scheme, location, file_dir))}",
        *_comment(
            [
                f"the images' median size is {height}x{width}; the model sees {size[0]}x{size[1]} "
                f"(longer side at most {max_side})"
            ],
            indent,
        ),
        f"{indent}image_size: [{size[0]}, {size[1]}]",
        *_comment(
            [
                "pretrained weights take RGB"
                if pretrained
                else ("every image is grayscale" if channels == 1 else "colour images")
            ],
            indent,
        ),
        f"{indent}channels: {channels}",
        *(
            _comment(["the images differ in shape: keep their aspect ratio, pad the rest"], indent)
            + [f"{indent}resize: pad"]
            if survey.shapes_vary
            else []
        ),
        *_comment(split_notes, indent),
        f"{indent}split: {{train: {split['train']}, validation: {split['validation']}, test: {split['test']}}}",
    ]


def _train_lines(survey: SourceSurvey, size: list[int], pretrained: bool, indent: str) -> list[str]:
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, round(IMAGES_SEEN / _train_images(survey, _split(survey)[0]))))
    lines = [
        *_comment(
            [
                f"about {IMAGES_SEEN:,} training images seen in all ({MIN_EPOCHS} to {MAX_EPOCHS} "
                "epochs): a first model in minutes on a CPU"
            ],
            indent,
        ),
        f"{indent}epochs: {epochs}",
    ]
    if not pretrained and max(size) > SMALL_IMAGE_SIDE:
        lines += [
            *_comment(["random flips, rotations and zooms: photos seen from scratch need them"], indent),
            f"{indent}augment: true",
        ]
    return lines


def _model_lines(
    survey: SourceSurvey, file_dir: Path, weights: Path | None, indent: str
) -> tuple[list[str], int, int, bool]:
    """The model section's lines, the largest and smallest image side for that model, and whether it is pretrained."""
    if weights is None:
        base, why = _seed_cnn(survey)
        return [*_comment([why], indent), f"{indent}base: {base}"], SCRATCH_MAX_SIDE, 8, False
    base, alpha = mobilenet_of(weights)
    lines = [
        *_comment([f"{weights.name}: ImageNet features, frozen; only the new head trains"], indent),
        f"{indent}base: {base}",
        f"{indent}alpha: {alpha}",
        f"{indent}weights: {_quoted(_path_from(file_dir, weights))}",
        f"{indent}dropout: 0.2",
    ]
    return lines, PRETRAINED_MAX_SIDE, 32, True


def _relative_source(scheme: str, location: str, file_dir: Path) -> str:
    """Path sources relative to the pipelines file's folder, as the file resolves them."""
    if scheme in ("folder", "idx", "parquet"):
        return f"{scheme}:{_path_from(file_dir, Path(location))}"
    return f"{scheme}:{location}"


def _path_from(file_dir: Path, path: Path) -> str:
    """`path` relative to the pipelines file's folder when they share a folder below the root (the
    file moves with its data, as pipelines.yaml and ../shared/data do), else absolute."""
    path = path.resolve()
    if Path(os.path.commonpath([file_dir.resolve(), path])) == Path(path.anchor):
        return str(path)
    return os.path.relpath(path, file_dir)


# ----------------------------------------------------------------------------- the pipelines file


def existing_pipelines(file: Path) -> dict:
    """The pipelines `file` holds ({} when it does not exist yet).

    Raises:
        InitError: the file is not a pipelines file init can append to.
    """
    if not file.exists():
        return {}
    try:
        document = yaml.safe_load(file.read_bytes())
    except yaml.YAMLError as error:
        raise InitError(f"{file}: not valid YAML, left as it is: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("pipelines"), dict):
        raise InitError(f"{file}: has no 'pipelines:' mapping; left as it is")
    return document["pipelines"]


def check_new_name(file: Path, name: str) -> None:
    """Raises InitError when `file` already has a pipeline `name`: init never overwrites one."""
    if name in existing_pipelines(file):
        raise InitError(
            f"{file}: already has a pipeline {name!r}; convflow init never replaces one: "
            f"choose another NAME, or edit pipelines.{name} by hand"
        )


def append_pipeline(file: Path, name: str, survey: SourceSurvey, weights: Path | None) -> Appended:
    """Add pipeline `name` to `file` (created if missing), after checking the result validates.

    Raises:
        InitError: the name is taken, the file's layout leaves no safe place for the pipeline, or the
            proposal does not validate.
    """
    check_new_name(file, name)
    created = not file.exists()
    old = NEW_FILE_HEADER.encode() if created else file.read_bytes()
    file.parent.mkdir(parents=True, exist_ok=True)
    at, indent = _insertion_point(file, old)
    newline = b"\r\n" if b"\r\n" in old else b"\n"  # the file's own line ends
    text = pipeline_text(name, survey, file.resolve().parent, weights, indent).encode().replace(b"\n", newline)
    # A blank line between pipelines; a last line without its newline gets one first.
    separator = (newline if not old[:at].endswith(b"\n") else b"") + (b"" if created else newline)
    new = old[:at] + separator + text + old[at:]
    _check_appended(file, name, old, new)
    _write_keeping_mode(file, new)
    return Appended(file, created, first_line=new[: at + len(separator)].count(b"\n") + 1)


def _insertion_point(file: Path, content: bytes) -> tuple[int, str]:
    """Where the `pipelines:` block mapping ends (before the next top-level key), and its entries' indent."""
    lines = content.splitlines(keepends=True)
    starts = [sum(len(line) for line in lines[:index]) for index in range(len(lines) + 1)]
    header = next((index for index, line in enumerate(lines) if re.match(rb"pipelines:\s*(#.*)?$", line)), None)
    if header is None:
        raise InitError(
            f"{file}: 'pipelines:' is not written as a block mapping on a line of its own; add the pipeline by hand"
        )
    end = next((index for index in range(header + 1, len(lines)) if re.match(rb"[^\s#]", lines[index])), len(lines))
    while end > header + 1 and lines[end - 1].strip() == b"":  # before the blank lines that separate blocks
        end -= 1
    entry = next((line for line in lines[header + 1 : end] if re.match(rb"\s+[^\s#]", line)), b"  x")
    indent = re.match(rb"\s+", entry).group().decode()
    return starts[end], indent


def _check_appended(file: Path, name: str, old: bytes, new: bytes) -> None:
    """The new content holds what the old one did plus pipeline `name`, which validates with the
    file's defaults (relative paths resolving as in `file`); else nothing is written."""
    before, after = yaml.safe_load(old) or {}, yaml.safe_load(new)
    added = after["pipelines"].pop(name, None)
    if added is None or after != {**before, "pipelines": before.get("pipelines") or {}}:
        raise InitError(f"{file}: cannot find a safe place for pipeline {name!r} in its layout; add it by hand")
    alone = {**after, "pipelines": {name: added}}
    with tempfile.NamedTemporaryFile("w", dir=file.resolve().parent, prefix=".convflow-init-", suffix=".yaml") as probe:
        yaml.safe_dump(alone, probe, sort_keys=False)
        probe.flush()
        try:
            load_pipelines(probe.name)
        except ConfigError as error:
            raise InitError(f"the proposed pipeline {name!r} does not validate: {'; '.join(error.problems)}") from None


def _write_keeping_mode(file: Path, content: bytes) -> None:
    existed = file.exists()
    with atomic_file(file) as temporary:
        temporary.write_bytes(content)
        if existed:
            shutil.copymode(file, temporary)


# ----------------------------------------------------------------------------- what init says


def report_lines(name: str, survey: SourceSurvey, appended: Appended, file_argument: str) -> list[str]:
    """What init found and did, and the command to type next."""
    height, width = survey.typical_size
    colour = "grayscale" if survey.channels == 1 else "colour"
    widest = max(len(label) for label in survey.class_counts)
    lines = [
        f"{survey.source}: {len(survey.class_counts)} classes, {survey.images:,} images "
        f"({colour}, median {height}x{width}{', shapes vary' if survey.shapes_vary else ''})"
    ]
    lines += [f"  {label:<{widest}}  {count:>7,}" for label, count in survey.class_counts.items()]
    if survey.split_counts:
        lines.append(
            "  splits defined by the source: "
            + ", ".join(f"{split} {count:,}" for split, count in survey.split_counts.items())
        )
    lines += _unusable_lines(survey.unusable)
    lines.append(_balance_line(survey.class_counts))
    action = "created" if appended.created else "added to"
    lines.append(
        f"{action} {appended.file}: pipeline {name!r} at line {appended.first_line}, its choices explained "
        "in comments there"
    )
    option = "" if file_argument == "pipelines.yaml" else f" -f {file_argument}"
    lines.append(f"next: convflow run {name}{option}")
    return lines


def _unusable_lines(unusable: list[str], shown: int = 3) -> list[str]:
    """How many files a run will skip, by reason, and the first `shown` of each reason."""
    if not unusable:
        return ["  skipped: none"]
    lines = [f"  {skipped_summary(unusable)} (a run skips them too)"]
    for reason, group in skipped_by_reason(unusable).items():
        lines += [f"    {problem}" for problem in group[:shown]]
        if len(group) > shown:
            lines.append(f"    ... and {len(group) - shown} more {reason}")
    return lines


def _balance_line(counts: dict[str, int]) -> str:
    largest = max(counts, key=counts.get)
    smallest = min(counts, key=counts.get)
    ratio = counts[largest] / counts[smallest]
    if ratio == 1:
        return f"  balance: every class has {counts[largest]:,} images"
    if ratio < IMBALANCE_RATIO:
        return f"  balance: fair, largest class {largest} is {ratio:.1f}x the smallest, {smallest}"
    return (
        f"  imbalance: {largest} has {ratio:.1f}x the images of {smallest} ({counts[largest]:,} vs "
        f"{counts[smallest]:,}); accuracy then favours the large classes: check the report's per-class "
        "scores, or add images of the small ones"
    )
