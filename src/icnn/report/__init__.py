"""The self-contained HTML report of a run and its figures (paper Fig. 4-6, SPEC §6).

``figures`` turns arrays into PNG bytes; ``html`` lays sections of tables and figures out as
one HTML file with everything inlined (no CDN, no network, no JavaScript).
"""

from .html import (
    Figure,
    ReportError,
    Section,
    Table,
    comparison_section,
    format_value,
    render_report,
    write_report,
)
from .figures import (  # noqa: E402 (figures needs ReportError from html)
    filter_panel,
    location_density,
    location_heatmap,
    metric_bars,
    part_heatmap,
    top_images,
)

__all__ = [
    "Figure",
    "ReportError",
    "Section",
    "Table",
    "comparison_section",
    "filter_panel",
    "format_value",
    "location_density",
    "location_heatmap",
    "metric_bars",
    "part_heatmap",
    "render_report",
    "top_images",
    "write_report",
]
