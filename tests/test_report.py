"""The report: every section present, and it renders in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SECTIONS = (
    "summary", "dataset", "augmentation", "model", "training", "confusion", "per-class", "samples",
    "mistakes", "feature-maps", "production", "stages", "lineage",
)
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=20000",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    pipelines = root / "pipelines.yaml"
    pipelines.write_text(
        "pipelines:\n  report:\n"
        "    data: {source: 'sklearn:digits', image_size: [12, 12], channels: 1}\n"
        "    model: {base: mnist_cnn}\n"
        "    train: {epochs: 1, batch_size: 128, augment: true}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "convflow.cli", "run", "report", "-f", str(pipelines),
         "--artifacts", str(root / "artifacts"), "--json"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(json.loads(result.stdout.strip().splitlines()[-1])["report"])


def test_report_is_self_contained_with_every_section(report):
    page = report.read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in page, section
    assert "data:image/png;base64," in page
    samples = page.split('id="samples"')[1].split("<h2")[0]
    assert samples.count("<figure>") == samples.count("<figcaption>") == 16  # each test image with its caption
    assert "src=\"http" not in page and "href=\"http" not in page  # nothing to fetch


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return path


def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = _chromium()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, *profile, "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in SECTIONS:
        assert f'id="{section}"' in dom.stdout, section
    screenshot = tmp_path / "report.png"
    shot = subprocess.run([chromium, *CHROMIUM_FLAGS, *profile, "--window-size=1200,3000",
                           f"--screenshot={screenshot}", report.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 50_000  # a rendered page with figures, not a blank one
