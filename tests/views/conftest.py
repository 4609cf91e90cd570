"""Fixtures for the view tests: a tiny real encoder taken through load, transform, export and compile; for the browser
tests, a JupyterLab server and a headless Chromium."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from qeff_lab import QEFFAutoModel
from qeff_lab.views.precision import HEATMAP_LABEL_PT

TINY = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64, vocab_size=120,
            max_position_embeddings=64)


def tiny_model(name: str = "tiny-bert") -> QEFFAutoModel:
    torch.manual_seed(0)
    return QEFFAutoModel.from_model(BertModel(BertConfig(**TINY)).eval(), pooling="mean", name=name)


@pytest.fixture(scope="session")
def compiled_tiny():
    """load -> transform -> export -> compile on the embedded backend (a real ONNX file on disk)."""
    model = tiny_model()
    model.compile(seq_len=[16, 32])
    return model


@pytest.fixture
def fresh_tiny():
    return tiny_model()


# --- The browser tests (test_browser*.py): one JupyterLab server and one headless Chromium for the session. Real parts
# only: JupyterLab on a free loopback port (with jupyter-server-proxy, and the kernel told it is behind a hub prefix,
# so netron's frame goes through the proxy as on Binder), Debian's Chromium driven by Playwright.
ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
TOUR = ROOT / "notebooks" / "00_tour.ipynb"
# The stored notebooks of this area, opened as saved (executed by nbconvert, untrusted in this JupyterLab).
STORED = ["00_tour", "01_embeddings_quickstart", "03_precision_and_overflow", "04_compile_and_run"]
ARTIFACTS = ROOT / "test-artifacts"  # screenshots for a person to look at (git-ignored)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# A closed network: no background connections, no updates, no sync (JUPYTER.md).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1400, "height": 1000}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_copy(src: Path, dest: Path) -> None:
    """A notebook without its stored outputs, so that whatever renders was produced by this run."""
    nb = json.loads(src.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb["metadata"].pop("widgets", None)
    dest.write_text(json.dumps(nb))


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """JupyterLab on a free loopback port, rooted in a temporary folder holding a clean copy of the tour (at the root),
    clean copies of every notebook (notebooks/, next to a link to docs/ as in the repository) and the notebooks of
    this area as saved (stored/). The repository's notebooks are never written to."""
    root = tmp_path_factory.mktemp("lab")
    clean_copy(TOUR, root / TOUR.name)
    (root / "notebooks").mkdir()
    for nb in NOTEBOOKS:
        clean_copy(nb, root / "notebooks" / nb.name)
    (root / "docs").symlink_to(ROOT / "docs")  # notebook 02 reads ../docs/support_matrix.md
    stored = root / "stored"
    stored.mkdir()
    for name in STORED:  # as saved, outputs and all
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", stored / f"{name}.ipynb")
    tmp = root / "tmp"
    tmp.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1",
           # The kernel believes it is behind a hub: netron's frame is then served through jupyter-server-proxy.
           "JUPYTERHUB_SERVICE_PREFIX": "/"}
    env.pop("MPLBACKEND", None)  # the notebooks' inline backend (Agg would drop their plt.show() figures)
    if Path(env.get("QEFF_LAB_CACHE", "")).name.startswith("qeff_lab-test-cache-"):
        # not tests/conftest.py's empty cache: the user's own (QEFF_LAB_CACHE or the default), as `make test`'s nbval
        env.pop("QEFF_LAB_CACHE")
    # No "get Jupyter news?" prompt over the page (it would also try the network).
    settings = root / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env["JUPYTERLAB_SETTINGS_DIR"] = str(root / "settings")
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(root / "workspaces")  # not the user's: each page asks for its own workspace
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", "--IdentityProvider.token=", "--ServerApp.password=",
         "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/api/status", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{(root / 'lab.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield {"url": url, "root": root, "tmp": tmp, "port": port}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: `make setup` installs the Debian package "
                    "(apt-get install chromium).", pytrace=False)
    from playwright import sync_api  # pinned in requirements.lock; never `playwright install`

    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


KERNEL_STATUS = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return k ? k.status : null;
}"""
PROMPTS = """() => Array.from(document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt'))
  .map(e => e.textContent.trim())"""
ERRORS = """() => Array.from(document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"], .jp-NotebookPanel:not(.lm-mod-hidden) .jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]')).map(e => e.textContent.slice(0, 2000))"""


def run_all(page, url: str, timeout_s: float) -> None:
    """Open the notebook at `url` in JupyterLab, Run All, and return once every code cell shows its execution count
    and the kernel is idle again; fail at the first error output."""
    page.goto(url, wait_until="domcontentloaded", timeout=90_000)
    page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=90_000)
    page.wait_for_function(f"({KERNEL_STATUS})() === 'idle'", timeout=90_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    deadline = time.time() + timeout_s
    while True:
        prompts = page.evaluate(PROMPTS)
        if prompts and all(p.startswith("[") and p[1:-2].strip().isdigit() for p in prompts) \
                and page.evaluate(KERNEL_STATUS) == "idle":
            break
        errors = page.evaluate(ERRORS)
        assert not [e for e in errors if "Traceback" in e or "Error" in e], errors
        assert time.time() < deadline, f"run-all did not finish in {timeout_s}s; prompts: {prompts}"
        time.sleep(1)


def cell_index(name: str, needle: str) -> int:
    cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
    return next(i for i, c in enumerate(cells) if needle in "".join(c["source"]))


def show_cell(page, index: int):
    """Scroll JupyterLab's (windowed) notebook to cell `index` and return that cell once it is drawn."""
    page.evaluate("i => window.jupyterapp.shell.currentWidget.content.scrollToItem(i, 'start')", index)
    cell = page.locator(f".jp-NotebookPanel:visible .jp-Cell[data-windowed-list-index='{index}']")
    cell.wait_for(timeout=15_000)
    page.wait_for_timeout(500)
    return cell


def notebook_url(lab, path: str, workspace: str) -> str:
    """A notebook in a workspace of its own: JupyterLab does not reopen the other tests' notebooks (and kernels)."""
    return f"{lab['url']}/lab/workspaces/{workspace}/tree/{path}"


MAX_SHOT_PX = 30_000  # a taller notebook is shot down to this height (Chromium draws larger pages, slowly)


def show_whole_notebook(page) -> int:
    """Make the viewport as tall as the current notebook, so every cell is drawn (JupyterLab skips drawing cells out of
    view) and measurable, and one screenshot holds the notebook; returns the height. VIEWPORT restores it."""
    height = VIEWPORT["height"]
    for _ in range(5):  # cells drawn for the first time take their real height: measure until it settles
        wanted = page.evaluate("""() => {
          const o = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer');
          o.scrollTop = 0;  // from the top (Run All scrolled down)
          const cells = o.querySelectorAll('.jp-Cell'), last = cells[cells.length - 1].getBoundingClientRect();
          return Math.ceil(window.innerHeight - o.clientHeight + last.bottom - o.getBoundingClientRect().top + 40);
        }""")
        wanted = min(MAX_SHOT_PX, wanted)
        if abs(wanted - height) <= 2:
            break
        height = wanted
        page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
        page.wait_for_timeout(1500)
    return height


# What a person sees, checked mechanically over every output of the notebook on screen (whole notebook drawn).
READING = """maxTable => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer');
  const right = panel.getBoundingClientRect().right, problems = [];
  const where = el => { const c = el.closest('.jp-Cell');
    return 'cell ' + (c ? c.dataset.windowedListIndex : '?') + ': ' + (el.textContent || '').trim().slice(0, 80); };
  for (const out of panel.querySelectorAll('.jp-OutputArea-output')) {
    if (out.offsetParent === null) continue;
    const r = out.getBoundingClientRect();
    if (r.right > right + 1) problems.push(`output wider than the notebook (${r.right} > ${right}) in ${where(out)}`);
    for (const el of [out, ...out.querySelectorAll('*')]) {
      if (el.offsetParent === null && el !== out) continue;
      const style = getComputedStyle(el);
      const scrolls = ['auto', 'scroll'].includes(style.overflowX) || el === out;
      if (scrolls && el.scrollWidth > el.clientWidth + 1 && el.tagName !== 'IFRAME')
        problems.push(`cut on the right (${el.scrollWidth} px in ${el.clientWidth} px; scroll sideways to read) in ${where(el)}`);
    }
    for (const t of out.querySelectorAll('table')) {
      const h = t.getBoundingClientRect().height;
      if (h > maxTable && !t.closest('details'))
        problems.push(`table ${Math.round(h)} px tall, taller than a screen, not folded in <details> in ${where(t)}`);
    }
    for (const img of out.querySelectorAll('img')) {
      if (!img.complete || img.naturalWidth === 0) problems.push(`image not drawn in ${where(out)}`);
      else if (img.clientWidth < 0.9 * img.naturalWidth)
        problems.push(`image scaled down to ${img.clientWidth} of its ${img.naturalWidth} px in ${where(out)}`);
    }
    const text = out.innerText || '';
    const raw = text.match(/<[\\w.]+ object at 0x[0-9a-f]+>|<Figure size \\d+x\\d+ with \\d+ Axes>/);
    if (raw) problems.push(`raw repr ${raw[0]} in ${where(out)}`);
    if (text.includes('Error displaying widget')) problems.push(`widget not displayed in ${where(out)}`);
  }
  return problems;
}"""


def reading_problems(page) -> list[str]:
    """Outputs cut on the right or wider than the notebook, tables taller than a screen outside <details>, plots
    scaled down or not drawn, raw reprs, widgets that failed to display. Call after show_whole_notebook."""
    return page.evaluate(READING, VIEWPORT["height"])


MIN_LABEL_PX = 8  # smaller than this on screen, a heatmap's layer numbers and site names are hard to read
# The heatmaps of notebook 03: the cell that draws each, and its smallest label (the pair's layer numbers are 1 pt less).
HEATMAPS = {"fig = profile_heatmap(report.profile)": HEATMAP_LABEL_PT,
            "fig = heatmap_pair_figure(report.profile, fixed_report.profile)": HEATMAP_LABEL_PT - 1}


def rendered_label_px(page, img, label_pt: float) -> dict:
    """The height in screen pixels of a `label_pt` label in the PNG `img` (a locator) as displayed: the figure's dpi
    (the PNG's pHYs chunk, which matplotlib writes) x the displayed / natural width of the image."""
    import base64
    import io

    from PIL import Image

    img.scroll_into_view_if_needed()
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle(), timeout=15_000)
    shown = img.evaluate("el => ({src: el.src, natural: el.naturalWidth, client: el.clientWidth})")
    assert shown["src"].startswith("data:image/png;base64,"), shown["src"][:80]
    png = Image.open(io.BytesIO(base64.b64decode(shown["src"].split(",", 1)[1])))
    assert "dpi" in png.info, "the PNG carries no dpi (pHYs): was it written by matplotlib's savefig?"
    dpi = float(png.info["dpi"][0])
    px = label_pt * dpi / 72 * shown["client"] / shown["natural"]
    return {"px": px, "dpi": dpi, "natural": shown["natural"], "client": shown["client"]}
