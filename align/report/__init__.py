"""HTML reports: one self-contained page (``Report``) and the section builders every report shares."""
from .page import Report, Titled, png_data_uri, thumbnail
from .sections import (
    AblationRecord,
    AdditivityRow,
    DescribedComponent,
    HeatmapRow,
    TopImages,
    ablation_section,
    additivity_section,
    heatmap_rows,
    overlay,
    ranking_section,
    textspan_section,
    top_images_section,
)
from .stopwatch import Stopwatch

__all__ = ["AblationRecord", "AdditivityRow", "DescribedComponent", "HeatmapRow", "Report", "Stopwatch", "Titled", "TopImages",
           "ablation_section", "additivity_section", "heatmap_rows", "overlay", "png_data_uri", "ranking_section",
           "textspan_section", "thumbnail", "top_images_section"]
