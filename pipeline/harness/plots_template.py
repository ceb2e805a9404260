"""The page `dvc plots show` writes, made to draw without network: DVC's own page with Vega, Vega-Lite and
Vega-Embed inlined instead of loaded from a CDN.

    python -m pipeline.harness.plots_template    # write .dvc/html/offline.html, name it in .dvc/config.local
                                                 # (make plots; make install runs it)

DVC's page (dvc_render) puts three `<script src="https://cdn.jsdelivr.net/...">` tags where its template says
`{scripts}`, and draws each chart with a `vegaEmbed('#<id>', spec)` call: offline those tags load nothing and
every chart stays blank. This template is DVC's page with one inline script in their place (and no `{scripts}`,
so no CDN tag is added): vl-convert-python's bundle of the three libraries, whose default snippet defines the
globals `vegaEmbed`, `vegaLite` and `vega`, at the Vega-Lite major DVC's chart templates are written for. The
bundle is ~0.9 MB, so it is generated at install, never committed (.gitignore).

DVC reads `plots.html_template` relative to .dvc/, and on a path that is not a file fails with "HTML template has
to contain '{plot_divs}'", which names no fix. So the committed .dvc/config names .dvc/html/cdn.html, DVC's page
as it always was (the CDN's scripts) under a line that says what to run, and this command points the clone's own
.dvc/config.local (never committed) at the offline template it writes.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline import paths

TEMPLATE = Path("html") / "offline.html"  # as DVC's config names it: relative to .dvc/
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")  # what dvc_render replaces in a template's text


def vegalite_version() -> str:
    """The newest Vega-Lite vl-convert bundles of the major DVC's chart templates declare (their `$schema`)."""
    import vl_convert
    from dvc_render.vega_templates import TEMPLATES

    majors = {re.search(r"/v(\d+)\.json$", t.DEFAULT_CONTENT["$schema"]).group(1) for t in TEMPLATES}
    if len(majors) != 1:
        raise ValueError(f"DVC's chart templates declare Vega-Lite majors {sorted(majors)}: pick one here")
    (major,) = majors
    versions = [v for v in vl_convert.get_vegalite_versions() if v.split(".")[0] == major]
    if not versions:
        raise ValueError(f"vl-convert-python {vl_convert.__version__} bundles no Vega-Lite {major}.x, which DVC's "
                         "templates are written for: install the version requirements/lock.txt pins")
    return max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))


def render(bundle: str) -> str:
    """DVC's page with `bundle` inlined where DVC would put its CDN scripts."""
    from dvc_render.html import PAGE_HTML

    if "{scripts}" not in PAGE_HTML:
        raise ValueError("dvc_render's page has no {scripts} placeholder any more: update render()")
    found = [p for p in PLACEHOLDERS if p in bundle]
    if found:  # dvc_render would replace them inside the script
        raise ValueError(f"the Vega bundle holds DVC's placeholders {found}: it cannot be inlined as it is")
    # "</script" inside the code would end the inline script early; "<\/script" is the same string to JavaScript
    script = "<script>\n" + bundle.replace("</script", "<\\/script") + "\n</script>"
    return PAGE_HTML.replace("{scripts}", script)


def install(root: Path = paths.PROJECT_ROOT) -> Path:
    """Write the offline template into `root`'s .dvc/ and name it in its .dvc/config.local; return its path."""
    try:
        import vl_convert
    except ImportError:
        raise SystemExit("vl-convert-python is not installed, and the offline page of `dvc plots show` needs its "
                         "bundle of Vega: pip install -e '.[plots]' (make install installs it)") from None
    from dvc.config import Config

    dvc_dir = root / ".dvc"
    out = dvc_dir / TEMPLATE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(render(vl_convert.javascript_bundle(vl_version=vegalite_version())), encoding="utf8")
    os.replace(tmp, out)
    with Config(dvc_dir=str(dvc_dir)).edit("local") as local:
        local.setdefault("plots", {})["html_template"] = TEMPLATE.as_posix()
    return out


def main() -> int:
    out = install()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB: Vega, Vega-Lite {vegalite_version()} and Vega-Embed), "
          f"named in {out.parent.parent / 'config.local'}: `dvc plots show` draws offline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
