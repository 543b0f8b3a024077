"""What report.html and comparison.html share: figures as inline HTML tags, and the Jinja2
environment of the page templates that embed them."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np
from markupsafe import Markup

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"

# Autoescape: every value a template prints is escaped unless it is Markup, which only figure code
# makes (these tag builders, and the reports' own figures). StrictUndefined: a misspelt name fails
# the report instead of printing nothing.
_PAGES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render_page(template: str, **context: Any) -> str:
    """templates/`template` rendered with `context`."""
    return _PAGES.get_template(template).render(**context)


def page_sources() -> list[Path]:
    """This module and the templates: what a report looks like depends on them besides its own module."""
    return [Path(__file__).resolve(), *sorted(TEMPLATE_DIR.glob("*.j2"))]


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend: reports are drawn where there is no display."""
    import matplotlib

    matplotlib.use("Agg")  # a no-op once Agg is set; pyplot picks its backend when first imported
    import matplotlib.pyplot as plt

    return plt


def _png_data_tag(png: bytes, alt: str) -> Markup:
    return Markup('<img alt="{}" src="data:image/png;base64,{}">').format(alt, base64.b64encode(png).decode())


def figure_tag(figure: Figure) -> Markup:
    """A matplotlib figure as an inline PNG <img>; the figure is closed (pyplot keeps open ones alive)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    pyplot().close(figure)
    return _png_data_tag(buffer.getvalue(), "figure")


def png_tag(image: np.ndarray) -> Markup:
    """uint8 pixels (H x W x C) as an inline PNG <img> of their own size."""
    from PIL import Image

    pixels = np.asarray(image, np.uint8)
    if pixels.shape[-1] == 1:  # grayscale: PIL takes H x W
        pixels = pixels[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return _png_data_tag(buffer.getvalue(), "")


def image_grid(images: np.ndarray, titles: list[str], columns: int = 8) -> Markup:
    """Images (uint8) with captions as an HTML grid, each a PNG of its own pixels that the browser
    scales up: a matplotlib figure of 16 subplots took ~0.4 s to draw, this a few milliseconds."""
    if len(images) == 0:
        return Markup("<p>None.</p>")
    cells = Markup("").join(
        Markup("<figure>{}<figcaption>{}</figcaption></figure>").format(png_tag(image), title)
        for image, title in zip(images, titles)
    )
    return Markup('<div class="grid" style="grid-template-columns:repeat({},112px)">{}</div>').format(columns, cells)
