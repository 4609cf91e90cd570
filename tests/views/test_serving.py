"""The slot view: a timeline of which request held which slot when, built from ServingMetrics (a real run on a
tiny decoder) and live from generate's events; the metrics tables; the stored-notebook HTML fallback."""
import re

import pytest

from qeff_lab import QEFFAutoModelForCausalLM
from qeff_lab.pipeline import show
from qeff_lab.views.serving import SlotView, render_serving, timeline_html
from tests.transforms.tiny_decoders import prompts, tiny_model


@pytest.fixture(scope="module")
def run():
    model = QEFFAutoModelForCausalLM.from_model(tiny_model("llama", seed=5), "tiny-slot-view", continuous_batching=True)
    model.compile(prefill_seq_len=8, ctx_len=64, full_batch_size=2)
    view = SlotView(2, refresh_s=0.0)
    result = model.generate_from_ids(prompts(seed=2, lengths=(4, 9, 3, 6, 12)), [5, 2, 7, 3, 4], on_event=view.on_event)
    return view, result


def _bars(html):
    return re.findall(r"title='request (\d+):", html)


def test_live_view_draws_every_request_on_its_slot(run):
    view, result = run
    live = view.widget.value
    assert sorted(map(int, _bars(live))) == list(range(5)) and "0 running" in live
    assert all(view.spans[r.index]["slot"] == r.slot for r in result.metrics.requests)
    rows = live.split("slot ")[1:]
    for r in result.metrics.requests:  # each bar sits in its slot's row
        assert f"title='request {r.index}:" in rows[r.slot]
    bundle = view._repr_mimebundle_()
    assert bundle["text/html"] == live and "application/vnd.jupyter.widget-view+json" in bundle


def test_final_view_and_metrics_tables(run):
    view, result = run
    view.finish(result)
    final = view.widget.value
    assert final == render_serving(result.metrics) == show(result.metrics) == result.metrics._repr_html_()
    assert "5 requests on 2 slots" in final and ">queue wait s<" in final and ">decode tok/s<" in final
    assert ">throughput<" in final and sorted(map(int, _bars(final))) == list(range(5))


def test_timeline_of_a_running_request_reaches_now():
    html = timeline_html([{"request": 3, "slot": 1, "start": 1.0, "first": None, "end": None}], 2, now_s=3.0)
    width = float(re.search(r"left:[\d.]+px;width:([\d.]+)px", html).group(1))
    assert "running" in html and width == pytest.approx((3.0 - 1.0) / 3.0 * 640, abs=0.2)
