"""The model's steps table (its notebook repr) as a person reads it."""
import re


def test_model_steps_table_keeps_each_time_on_one_line(fresh_tiny):
    page = fresh_tiny._repr_html_()
    assert "<th" in page and "tiny-bert" in page
    times = re.findall(r"<td[^>]*>(\d+\.\d\d\s)s</td>", page)
    assert times and all(t.endswith("\u00a0") for t in times), times  # "0.53 s" does not wrap after its number
