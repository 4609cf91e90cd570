"""In a real browser: each notebook after Run All reads well (what a person sees, not what nbval compares).

JupyterLab runs a clean copy of each notebook (the repository's are never written to): no error output, no output
cut on the right or wider than the notebook, no table taller than a screen outside <details>, no plot scaled down, no
raw repr; the precision heatmaps' labels at a readable size on screen. A screenshot of each whole notebook goes to
test-artifacts/nb-<name>.png. The tour runs in test_browser.py (its page serves the dashboard tests too).
"""
from __future__ import annotations

import time

import pytest

from tests.views.conftest import (ARTIFACTS, HEATMAPS, MIN_LABEL_PX, NOTEBOOKS, VIEWPORT, cell_index, notebook_url, reading_problems,
                                  rendered_label_px, run_all, show_cell, show_whole_notebook)

RUN_ALL_TIMEOUT_S = 600  # the longest, 03 (profiles, island search, fixes, accuracy ladder): ~8 min on 2 busy cores
PRECISION = "03_precision_and_overflow"


@pytest.fixture(scope="module")
def context(browser):
    context = browser.new_context(viewport=VIEWPORT)
    yield context
    context.close()


@pytest.mark.parametrize("name", [nb.stem for nb in NOTEBOOKS if nb.stem != "00_tour"])
def test_notebook_reads_well_after_run_all(name, context, lab):
    page = context.new_page()
    try:
        start = time.time()
        run_all(page, notebook_url(lab, f"notebooks/{name}.ipynb", name), RUN_ALL_TIMEOUT_S)
        print(f"{name}: run all {time.time() - start:.0f} s")
        page.wait_for_timeout(2000)  # the last outputs (widgets, images) finish drawing
        if name == PRECISION:  # measured at the usual window size, before the viewport grows
            for needle, label_pt in HEATMAPS.items():
                img = show_cell(page, cell_index(name, needle)).locator(".jp-OutputArea-output img")
                assert img.count() == 1, f"no plot under the cell `{needle}`"
                size = rendered_label_px(page, img, label_pt)
                assert size["px"] >= MIN_LABEL_PX, f"`{needle}`: labels {size['px']:.1f} px tall on screen, {size}"
        height = show_whole_notebook(page)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"nb-{name}.png"))
        problems = reading_problems(page)
        assert not problems, f"{name} after Run All (screenshot test-artifacts/nb-{name}.png, {height} px):\n" + \
            "\n".join(problems)
    finally:
        # the kernel goes with the page (each holds its models; five at once would not fit beside the other tests)
        page.evaluate("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                      " && window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
        page.close()
