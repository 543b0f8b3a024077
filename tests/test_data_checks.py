"""Data checks (convflow.checks): image properties, and each check blocking when its fault is
injected into generated images, naming the classes or files; no false alarm on random halves of
generated images and of the real flower photos in ../shared/data/flowers."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

from convflow.checks.checks import (
    CheckResult,
    check_class_balance,
    check_drift,
    check_label_conflicts,
    check_leakage,
    check_min_count,
    ks_statistic,
    near_copies,
    results_table,
    run_data_checks,
    verdict,
)
from convflow.checks.config import ValidateConfig
from convflow.checks.image_properties import PROPERTIES, difference_hash, image_properties, popcount
from convflow.checks.schemas import CHECK_RESULTS_SCHEMA, IMAGE_PROPERTIES_SCHEMA, image_properties_table

FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers"
SIZE = 48
# Class colours of the generated images; each image is a random 5 x 5 field of colours around its
# class's, smoothly upsampled (so its dHash is stable under re-encoding), with pixel noise.
HUES = {"apple": (200, 80, 60), "fern": (60, 160, 70), "sea": (70, 90, 200), "sand": (180, 180, 60)}
PER_CLASS = 150


def _generated_image(rng: np.random.Generator, hue: tuple[int, int, int]) -> np.ndarray:
    coarse = np.clip(rng.normal(scale=45, size=(5, 5, 3)) + np.array(hue), 0, 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.Resampling.BICUBIC), np.float64)
    return np.clip(image + rng.normal(scale=4, size=image.shape), 0, 255).astype(np.uint8)


def _split_of(digest: str) -> str:
    """download_and_split's rule at the default 0.8 / 0.1 / 0.1: the first 15 hex digits as a fraction."""
    position = int(digest[:15], 16) / 16**15
    return "train" if position < 0.8 else "validation" if position < 0.9 else "test"


def _table(examples: list[tuple[str, str, np.ndarray]], splits: dict[str, str] | None = None) -> pa.Table:
    """The per-image table of (id, label, pixels) examples, hashed as in-memory sources are (their pixel
    bytes) and split by that hash unless `splits` names an example's split."""
    digests = [hashlib.sha256(pixels.tobytes()).hexdigest() for _, _, pixels in examples]
    return image_properties_table(
        [example_id for example_id, _, _ in examples],
        [(splits or {}).get(example_id) or _split_of(digest) for (example_id, _, _), digest in zip(examples, digests)],
        [label for _, label, _ in examples],
        digests,
        [image_properties(pixels, "RGB") for _, _, pixels in examples],
    )


def _generated(seed: int, classes: dict[str, tuple[int, int, int]] = HUES, per_class: int = PER_CLASS):
    rng = np.random.default_rng(seed)
    return [
        (f"s{seed}/{name}/{index:03d}.png", name, _generated_image(rng, hue))
        for name, hue in classes.items()
        for index in range(per_class)
    ]


@pytest.fixture(scope="module")
def production():
    """The examples that made 'production', and their table (the baseline)."""
    examples = _generated(0)
    return examples, _table(examples)


@pytest.fixture(scope="module")
def fresh():
    """A fresh sample of the same kind of data."""
    return _generated(1)


def _failed(results: list[CheckResult], check: str) -> list[CheckResult]:
    return [row for row in results if row.check == check and row.verdict != "pass"]


def _jpeg(pixels: np.ndarray, quality: int = 90) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


# Image properties


def test_image_properties_match_their_definitions():
    rng = np.random.default_rng(3)
    pixels = _generated_image(rng, (120, 90, 200))[:41, :37]
    luma = pixels.astype(np.float64) @ [0.299, 0.587, 0.114]
    laplacian = 4 * luma[1:-1, 1:-1] - luma[:-2, 1:-1] - luma[2:, 1:-1] - luma[1:-1, :-2] - luma[1:-1, 2:]
    found = image_properties(pixels, "RGB")
    assert (found["width"], found["height"], found["channels"], found["mode"]) == (37, 41, 3, "RGB")
    assert found["brightness"] == pytest.approx(luma.mean(), rel=1e-5)
    assert found["contrast"] == pytest.approx(luma.std(), rel=1e-4)
    assert found["sharpness"] == pytest.approx(laplacian.var(), rel=1e-4)
    assert [found["mean_r"], found["mean_g"], found["mean_b"]] == pytest.approx(pixels.mean(axis=(0, 1)), rel=1e-6)
    assert 0 <= found["dhash"] < 2**64


def test_grayscale_properties_repeat_the_gray_mean():
    gray = np.tile(np.arange(64, dtype=np.uint8)[None, :], (32, 1))
    found = image_properties(gray, "L")
    assert found["channels"] == 1 and found["mean_r"] == found["mean_g"] == found["mean_b"] == pytest.approx(31.5)
    assert found["sharpness"] == 0.0  # a linear ramp has no second derivative
    assert found["dhash"] == 0  # every cell is darker than its right neighbour
    assert image_properties(gray[..., None], "L") == found
    flat = (200 + np.random.default_rng(0).integers(0, 2, (64, 64, 3))).astype(np.uint8)
    luma = flat.astype(np.float64) @ [0.299, 0.587, 0.114]
    assert image_properties(flat, "RGB")["contrast"] == pytest.approx(luma.std(), rel=1e-3)  # no float32 cancellation


def test_dhash_thumbnail_is_pillows_box_resize():
    luma = np.asarray(Image.fromarray(_generated_image(np.random.default_rng(4), (90, 90, 90))).convert("F"))
    box = np.asarray(Image.fromarray(luma, "F").resize((9, 8), Image.Resampling.BOX))
    expected = int(np.packbits(box[:, :-1] > box[:, 1:]).view(">u8")[0])
    assert int(popcount(np.uint64(difference_hash(luma)) ^ np.uint64(expected))) <= 1  # float rounding at ties


def test_bad_pixels_are_refused_with_their_shape():
    with pytest.raises(ValueError, match=r"uint8 pixels .* got float32 \(8, 8, 3\)"):
        image_properties(np.zeros((8, 8, 3), np.float32), "RGB")
    with pytest.raises(ValueError, match=r"got uint8 \(8, 8, 4\)"):
        image_properties(np.zeros((8, 8, 4), np.uint8), "RGBA")


def test_tables_round_trip_through_parquet(tmp_path, production, fresh):
    _, table = production
    assert table.schema.equals(IMAGE_PROPERTIES_SCHEMA, check_metadata=True)
    assert all(field.metadata[b"description"] for field in IMAGE_PROPERTIES_SCHEMA)
    results = results_table(run_data_checks(_table(fresh), table, ValidateConfig()))
    for name, written in (("images", table), ("checks", results)):
        pq.write_table(written, tmp_path / f"{name}.parquet")
        assert pq.read_table(tmp_path / f"{name}.parquet").equals(written)
    assert results.schema.equals(CHECK_RESULTS_SCHEMA) and results.num_rows > 0


# The statistics and the leakage search


def test_ks_statistic_is_scipys():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    for sample, reference in (
        (rng.normal(size=300), rng.normal(0.3, size=200)),
        (rng.integers(0, 4, 100).astype(float), rng.integers(0, 5, 80).astype(float)),
    ):
        statistic, _, _ = ks_statistic(sample, reference)
        assert statistic == pytest.approx(stats.ks_2samp(sample, reference).statistic)


def test_near_copies_finds_what_brute_force_finds():
    rng = np.random.default_rng(6)
    pool = rng.integers(0, 2**63, 3000, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 3000, dtype=np.uint64)
    queries = rng.integers(0, 2**64 - 1, 500, dtype=np.uint64)
    flips = [np.uint64(0)] + [np.uint64(1) << np.uint64(bit) for bit in (0, 17, 40, 63)]
    for at in range(0, 500, 5):  # every fifth query: a pool hash with up to three bits flipped
        queries[at] = pool[at] ^ flips[at % 5] ^ flips[(at // 5) % 5] ^ flips[(at // 25) % 5]
    queries[1:4] = 0  # identical hashes, found once for all
    pool[7] = 1
    for max_distance in (0, 2, 3):
        partner, distance = near_copies(queries, pool, max_distance)
        bits = popcount(queries[:, None] ^ pool[None, :])
        assert np.array_equal(partner >= 0, (bits <= max_distance).any(axis=1))
        found = partner >= 0
        assert np.array_equal(distance[found], bits[found].min(axis=1))
        assert np.array_equal(bits[found, partner[found]], distance[found])


# Faults injected into generated images: each blocks and names what is wrong


def test_a_class_removed_blocks_naming_it(production, fresh):
    examples, baseline = production
    current = _table([example for example in fresh if example[1] != "sea"])
    results = run_data_checks(current, baseline, ValidateConfig())
    assert [(row.subject, row.value, row.baseline) for row in _failed(results, "class_set")] == [("sea", 0, 150)]
    assert "disappeared" in _failed(results, "class_set")[0].detail
    assert verdict(results)[0] == "block"


def test_a_class_added_blocks_naming_it_and_its_files(production, fresh):
    _, baseline = production
    added = _generated(2, {"moss": (40, 120, 40)}, per_class=30)
    results = run_data_checks(_table(fresh + added), baseline, ValidateConfig())
    [row] = _failed(results, "class_set")
    assert (row.subject, row.value, row.baseline, row.verdict) == ("moss", 30, 0, "block")
    assert row.files == [example_id for example_id, _, _ in added[:20]] and "30 in all, 20 named" in row.detail


def test_half_of_a_class_moved_into_another_blocks_on_balance(production, fresh):
    _, baseline = production
    moved = [
        (example_id, "fern" if label == "apple" and index % 2 else label, pixels)
        for index, (example_id, label, pixels) in enumerate(fresh)
    ]
    results = check_class_balance(_table(moved), baseline, ValidateConfig().class_balance)
    assert {row.subject for row in results if row.verdict == "block"} == {"apple", "fern"}
    fern = next(row for row in results if row.subject == "fern")
    assert fern.value == pytest.approx(225 / 600) and fern.baseline == pytest.approx(0.25)


def test_production_images_relabelled_block_naming_the_files(production):
    examples, baseline = production
    relabelled = {example_id for example_id, label, _ in examples if label == "sea"}
    relabelled = set(sorted(relabelled)[:75])
    current = _table(
        [(example_id, "sand" if example_id in relabelled else label, pixels) for example_id, label, pixels in examples]
    )
    results = run_data_checks(current, baseline, ValidateConfig())
    [conflict] = _failed(results, "label_conflicts")
    assert (conflict.subject, conflict.value) == ("sand vs production", 75)
    assert set(conflict.files) <= relabelled and len(conflict.files) == 20 and "(sea)" in conflict.detail
    assert {row.subject for row in _failed(results, "class_balance")} == {"sea", "sand"}


def test_every_image_darkened_blocks_on_brightness_naming_dark_files(production, fresh):
    _, baseline = production
    darker = [(example_id, label, (pixels * 0.6).astype(np.uint8)) for example_id, label, pixels in fresh]
    results = check_drift(_table(darker), baseline, ValidateConfig().drift)
    failed = {row.subject for row in results if row.verdict == "block"}
    assert {"brightness", "mean_r", "mean_g", "mean_b"} <= failed
    assert {f"brightness / {name}" for name in HUES} <= failed
    brightness = next(row for row in results if row.subject == "brightness")
    assert brightness.value > 0.5 and len(brightness.files) == 20
    darkest = min(darker, key=lambda example: image_properties(example[2], "RGB")["brightness"])
    assert brightness.files[0] == darkest[0]


def test_one_class_darkened_blocks_naming_that_class(production, fresh):
    _, baseline = production
    darker = [
        (example_id, label, (pixels * 0.7).astype(np.uint8) if label == "fern" else pixels)
        for example_id, label, pixels in fresh
    ]
    results = check_drift(_table(darker), baseline, ValidateConfig().drift)
    per_class = {row.subject.split(" / ")[1] for row in results if row.verdict == "block" and " / " in row.subject}
    assert per_class == {"fern"}


def test_identical_files_under_two_labels_block_naming_them(production, fresh):
    copied = [example for example in fresh if example[1] == "apple"][:3]
    twins = [(f"s1/sea/copy-{index}.png", "sea", pixels) for index, (_, _, pixels) in enumerate(copied)]
    results = check_label_conflicts(_table(fresh + twins), None, ValidateConfig().label_conflicts)
    failed = {row.subject: row for row in results if row.verdict == "block"}
    assert set(failed) == {"apple", "sea"}
    assert sorted(failed["apple"].files) == sorted(example_id for example_id, _, _ in copied)
    assert sorted(failed["sea"].files) == sorted(example_id for example_id, _, _ in twins)
    assert "(sea)" in failed["apple"].detail


def test_copies_of_test_images_in_train_block_leakage_naming_the_pairs(fresh):
    table = _table(fresh)
    splits = dict(zip(table.column("example_id").to_pylist(), table.column("split").to_pylist()))
    tests = [example for example in fresh if splits[example[0]] == "test"][:9]
    altered = {  # a byte copy would have the same hash and so the same split: copies in train are altered ones
        "jpeg": lambda pixels: _jpeg(pixels),
        "smaller": lambda pixels: np.asarray(Image.fromarray(pixels).resize((SIZE - 1, SIZE - 1))),
        "larger": lambda pixels: np.asarray(Image.fromarray(pixels).resize((SIZE + 1, SIZE + 1))),
    }
    copies = [
        (f"train/copy-{name}-{Path(example_id).name}", label, alter(pixels))
        for index, (example_id, label, pixels) in enumerate(tests)
        for name, alter in [list(altered.items())[index % 3]]
    ]
    current = _table(fresh + copies, splits={example_id: "train" for example_id, _, _ in copies})
    results = check_leakage(current, ValidateConfig().leakage)
    [row] = [row for row in results if row.verdict == "block"]
    assert row.subject == "test ~ train" and row.value >= 9 / splits_count(splits, "test")
    pairs = dict(zip(row.files[::2], row.files[1::2]))
    for (example_id, _, _), (copy_id, _, _) in zip(tests, copies):
        assert pairs[example_id] == copy_id


def splits_count(splits: dict[str, str], split: str) -> int:
    return sum(value == split for value in splits.values())


def test_too_few_examples_of_a_class_in_a_split_blocks_naming_both(fresh):
    table = _table(fresh)
    keep = [
        not (label == "sand" and split == "test")
        for label, split in zip(table.column("label").to_pylist(), table.column("split").to_pylist())
    ]
    results = check_min_count(table.filter(pa.array(keep)), ValidateConfig().min_count)
    assert [(row.subject, row.value) for row in results if row.verdict == "block"] == [("sand / test", 0)]
    assert len(results) == 3 * len(HUES)


# Configuration and verdicts


def test_validate_section_takes_bare_actions_and_refuses_unknown_keys():
    config = ValidateConfig.model_validate(
        yaml.safe_load(
            "{leakage: warn, drift: off, class_balance: {max_distance: 0.2}}"  # YAML reads off as false
        )
    )
    assert (config.leakage.action, config.leakage.max_distance, config.drift.action) == ("warn", 2, "off")
    assert config.class_balance.action == "block" and config.class_balance.max_distance == 0.2
    with pytest.raises(ValidationError, match="min_cout"):
        ValidateConfig.model_validate({"min_cout": 3})
    with pytest.raises(ValidationError, match="properties"):
        ValidateConfig.model_validate({"drift": {"properties": ["hue"]}})
    asking = ValidateConfig.model_validate({"on_block": "ask", "ask_timeout": 600})
    assert (asking.on_block, asking.ask_timeout) == ("ask", 600)
    with pytest.raises(ValidationError, match="on_block"):
        ValidateConfig.model_validate({"on_block": "wait"})
    with pytest.raises(ValidationError, match="ask_timeout"):
        ValidateConfig.model_validate({"ask_timeout": 0})
    assert all(field.description for field in ValidateConfig.model_fields.values())


def test_warn_checks_warn_off_checks_do_not_run_and_no_baseline_runs_three(production, fresh):
    examples, baseline = production
    darker = _table([(example_id, label, (pixels * 0.6).astype(np.uint8)) for example_id, label, pixels in fresh])
    config = ValidateConfig.model_validate({"drift": "warn", "class_set": "off"})
    results = run_data_checks(darker, baseline, config)
    assert verdict(results)[0] == "warn" and all(row.verdict in ("pass", "warn") for row in results)
    assert "class_set" not in {row.check for row in results}
    status, reasons = verdict(results)
    assert reasons[0].startswith("warn: drift")
    alone = run_data_checks(darker, None, ValidateConfig())
    assert {row.check for row in alone} == {"min_count", "label_conflicts", "leakage"}
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['dhash'\]"):
        run_data_checks(darker.drop_columns(["dhash"]), None, ValidateConfig())


# No false alarm


def _halves(table: pa.Table, seed: int) -> tuple[pa.Table, pa.Table]:
    order = np.random.default_rng(seed).permutation(table.num_rows)
    return table.take(order[: table.num_rows // 2]), table.take(order[table.num_rows // 2 :])


def _assert_all_pass(results: list[CheckResult]) -> None:
    status, reasons = verdict(results)
    assert status == "pass", "\n".join(reasons)


def test_random_halves_of_generated_images_pass(production):
    _, table = production
    for seed in range(3):
        first, second = _halves(table, seed)
        _assert_all_pass(run_data_checks(second, first, ValidateConfig()))
        _assert_all_pass(run_data_checks(table, first, ValidateConfig()))


def _flowers_table() -> pa.Table:
    """Every flower photo, decoded at full size as the pipeline decodes it, split by its file's hash."""
    rows = {"example_id": [], "split": [], "label": [], "sha256": [], "properties": []}
    for path in sorted(FLOWERS.glob("*/*.jpg")):
        content = path.read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        with Image.open(io.BytesIO(content)) as image:
            rows["properties"].append(image_properties(np.asarray(image.convert("RGB")), image.mode))
        for name, value in (
            ("example_id", str(path)),
            ("split", _split_of(digest)),
            ("label", path.parent.name),
            ("sha256", digest),
        ):
            rows[name].append(value)
    return image_properties_table(rows["example_id"], rows["split"], rows["label"], rows["sha256"], rows["properties"])


@pytest.fixture(scope="module")
def flowers() -> pa.Table:
    if not FLOWERS.is_dir():
        pytest.skip(f"no {FLOWERS}")
    return _flowers_table()


def test_random_halves_of_flowers_pass_with_every_figure_recorded(flowers):
    classes = sorted(set(flowers.column("label").to_pylist()))
    for seed in range(3):
        first, second = _halves(flowers, seed)
        for current in (second, flowers):  # a fresh half; the whole, as a scheduled run over all of it
            results = run_data_checks(current, first, ValidateConfig())
            _assert_all_pass(results)
            subjects = {(row.check, row.subject) for row in results}
            assert {("drift", f"{name} / {label}") for name in PROPERTIES for label in classes} <= subjects
            assert {("class_balance", label) for label in classes} <= subjects


def test_flowers_with_one_class_darkened_or_half_relabelled_block(flowers):
    first, _ = _halves(flowers, 0)
    labels = np.array(flowers.column("label").to_pylist(), object)
    daisy = np.flatnonzero(labels == "daisy")
    darker = [
        image_properties((np.asarray(Image.open(path).convert("RGB")) * 0.7).astype(np.uint8), "RGB")
        for path in np.array(flowers.column("example_id").to_pylist())[daisy]
    ]
    columns = {name: flowers.column(name).to_pylist() for name in flowers.column_names}
    for at, found in zip(daisy, darker):
        for name in IMAGE_PROPERTIES_SCHEMA.names[4:]:
            columns[name][at] = found[name]
    results = run_data_checks(pa.Table.from_pydict(columns, schema=IMAGE_PROPERTIES_SCHEMA), first, ValidateConfig())
    assert {row.subject.split(" / ")[-1] for row in _failed(results, "drift") if " / " in row.subject} == {"daisy"}

    moved = labels.copy()
    moved[np.flatnonzero(labels == "tulip")[::2]] = "rose"
    relabelled = flowers.set_column(2, IMAGE_PROPERTIES_SCHEMA.field("label"), pa.array(moved.tolist(), pa.string()))
    results = run_data_checks(relabelled, first, ValidateConfig())
    assert {row.subject for row in _failed(results, "class_balance")} == {"rose", "tulip"}
    assert "rose vs production" in {row.subject for row in _failed(results, "label_conflicts")}


# The stage: check_images over what to_tfrecords measured


def test_check_data_records_every_figure_and_names_conflicting_files_with_thumbnails(tmp_path):
    """A folder whose same photo is filed under two classes: to_tfrecords measures each image,
    check_images blocks on label_conflicts with no production yet, writes checks.parquet with every
    figure, and checks.html names both files and shows their thumbnails."""
    from conftest import make_image_folder
    from convflow.config.schema import DataConfig
    from convflow.tasks.check_data import check_images
    from convflow.tasks.download_and_split import split_dataset
    from convflow.tasks.to_tfrecords import write_tfrecords

    images = make_image_folder(tmp_path / "images", per_class=30, size=(40, 40))
    (images / "dog" / "from-cat.png").write_bytes((images / "cat" / "img-003.png").read_bytes())
    data = DataConfig(source=f"folder:{images}", image_size=(32, 32), channels=3)
    split_set = split_dataset(data, tmp_path / "split")
    tfrecords = write_tfrecords(split_set, data, tmp_path / "tfr")
    checks = check_images(split_set, tfrecords, ValidateConfig(), None, None, tmp_path / "checks", "p", "run-1")

    assert checks.verdict == "block" and checks.baseline_version is None
    assert checks.reasons[0].startswith("block: label_conflicts")
    rows = pq.read_table(checks.results_parquet).to_pylist()
    assert len(rows) == checks.checks and {row["check"] for row in rows} == {"min_count", "label_conflicts", "leakage"}
    conflict = [row for row in rows if row["verdict"] == "block"]
    assert sorted(file for row in conflict for file in row["files"]) == ["cat/img-003.png", "dog/from-cat.png"]
    page = Path(checks.report_html).read_text()
    assert "cat/img-003.png" in page and "dog/from-cat.png" in page and "Data and model checks" in page
    assert page.count("data:image/png;base64") == 2  # the two conflicting files' thumbnails
