"""The page of ``dvc plots show``, made to draw with no network: an HTML template that carries vega, vega-lite and
vega-embed itself, from the vl-convert package, instead of loading them from a CDN as DVC's own page does.

    python -m pipeline.plots      # once per clone (`make install` runs it)

writes ``.dvc/plots-offline.html`` and points this clone's DVC configuration (``.dvc/config.local``) at it. A
clone without it keeps DVC's page, which draws only online. It also writes DVC's two confusion-matrix templates,
as the installed DVC has them, with axis labels that thin out instead of overlapping when there are many classes.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError, run_stage
from pipeline.files import replaced

log = logging.getLogger(__name__)

TEMPLATE = "plots-offline.html"  # DVC reads plots.html_template relative to .dvc/

# vegaEmbed as DVC's page calls it, drawing SVG: crisp text, and a page whose charts can be checked as elements
EMBED = "window.vegaEmbed = (el, spec, opts) => vegaEmbed(el, spec, {renderer: 'svg', ...opts});"


def offline_page(bundle: str) -> str:
    """DVC's own page template with the script bundle inlined in place of its CDN ``<script src=…>`` tags."""
    from dvc_render.html import PAGE_HTML

    if "</script" in bundle.lower():
        raise PipelineError("this vl-convert's bundle contains '</script' and cannot be inlined in a page")
    return PAGE_HTML.replace("{scripts}", f"<script>\n{bundle}\n</script>")


def vega_bundle() -> str:
    """vega, vega-lite (the newest 5.x, the version of DVC's plot templates) and vega-embed as one script."""
    import vl_convert as vlc

    v5 = [v for v in vlc.get_vegalite_versions() if v.startswith("5.")]
    newest = max(v5, key=lambda v: tuple(map(int, v.split(".")))) if v5 else None
    return vlc.javascript_bundle(snippet=EMBED, vl_version=newest)


def thinned_confusion_templates() -> dict[str, dict[str, Any]]:
    """DVC's ``confusion`` and ``confusion_normalized`` templates with ``labelOverlap`` on both axes: with 100
    classes their labels otherwise overlap into a black band."""
    from dvc_render.vega_templates import TEMPLATES

    templates = {}
    for template in TEMPLATES:
        if template.DEFAULT_NAME in ("confusion", "confusion_normalized"):
            content = copy.deepcopy(template.DEFAULT_CONTENT)
            for axis in ("x", "y"):
                content["spec"]["encoding"][axis]["axis"] = {"labelOverlap": True}
            templates[template.DEFAULT_NAME] = content
    return templates


def install(dvc_dir: Path) -> Path:
    """Write the offline page into ``dvc_dir`` and make it this clone's ``plots.html_template``; write the
    thinned confusion templates where DVC looks for a project's own (``.dvc/plots/<name>.json``)."""
    from dvc.config import Config

    if not dvc_dir.is_dir():
        raise PipelineError(f"no {dvc_dir} directory here: run from the project root")
    for name, content in thinned_confusion_templates().items():
        with replaced(dvc_dir / "plots" / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(content, indent=2) + "\n")
    path = dvc_dir / TEMPLATE
    with replaced(path) as tmp:
        tmp.write_text(offline_page(vega_bundle()), encoding="utf-8")
    with Config(dvc_dir=str(dvc_dir)).edit("local") as conf:
        conf["plots"]["html_template"] = TEMPLATE
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dvc-dir", type=Path, default=Path(".dvc"), help="the project's .dvc directory")
    args = parser.parse_args()
    path = install(args.dvc_dir)
    log.info("wrote %s (%.1f MB); `dvc plots show` now draws offline", path, path.stat().st_size / 1e6)


if __name__ == "__main__":
    run_stage(main)
