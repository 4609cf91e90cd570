"""Failure translation on compiler output, and the output sinks (no SDK needed)."""
from __future__ import annotations

import pytest

from qeff_lab.compile import explain_failure
from qeff_lab.compile.runner import FailureContext, make_sink, run_streaming

CTX = FailureContext("qaic-compile", "1.18.2", "named", {"-mos": "mos=2"})


@pytest.mark.parametrize("output, rc, words", [
    ("qaic-compile: Unknown command line argument '-mos=2'.  Try: 'qaic-compile -help'", 1,
     "qeff_lab adds for mos=2"),
    ("error: unrecognized option '-foo-bar'", 1, "does not accept -foo-bar: this SDK version may not know it"),
    ("Error: Failed to parse network specialization config", 1, "specializations_format='flat'"),
    ("terminate called after throwing an instance of 'std::bad_alloc'", 134, "ran out of memory"),
    ("", -9, "ran out of memory"),
    ("Error: custom IO name past_key.7 not found in the network", 1, "custom_io.yaml"),
    ("Error: Unsupported op CtxScatter in node /model/layers.0/CtxScatter", 1, "operator this compiler does not"),
    ("Error: node precision info: node /x/Add_output_0 not found", 1, "node-precision-info"),
    ("Error: cannot open /x/model.onnx: No such file or directory", 1, "could not open a file"),
])
def test_known_failures_get_advice(output, rc, words):
    advice = explain_failure(output, rc, CTX)
    assert any(words in a for a in advice), advice


def test_unknown_failure_gets_no_made_up_advice():
    assert explain_failure("Segmentation fault", 139, CTX) == []


def test_sinks(tmp_path, capsys):
    got = []
    assert make_sink(got.append) == got.append
    make_sink(False)("quiet")
    make_sink(None)("to the terminal")  # not in a notebook here
    assert capsys.readouterr().err == "  [compiler] to the terminal\n"


def test_run_streaming_logs_every_line_and_the_exit_code(tmp_path):
    import sys

    got = []
    out = run_streaming([sys.executable, "-c", "import sys; print('a'); print('b', file=sys.stderr); sys.exit(5)"],
                        tmp_path / "log.txt", got.append)
    assert out.returncode == 5 and sorted(got) == ["a", "b"] and not out.timed_out
    log = (tmp_path / "log.txt").read_text()
    assert log.startswith("$ ") and "# exit code 5" in log


def test_missing_compiler_binary_is_a_compile_error(tmp_path):
    from qeff_lab.compile import CompileError

    with pytest.raises(CompileError, match="Could not start the compiler"):
        run_streaming([str(tmp_path / "no-such-compiler")], tmp_path / "log.txt", lambda line: None)


def test_notebook_log_updates_one_output_area_in_place(monkeypatch):
    """NotebookLog shows the last lines in one display, updated as lines arrive (recorded here without a kernel)."""
    import IPython.display

    from qeff_lab.compile.runner import NotebookLog

    class Handle:
        def __init__(self):
            self.updates = []

        def update(self, obj):
            self.updates.append(obj.data)

    shown = []

    def display(obj, display_id=False):
        shown.append(obj.data)
        return handle

    handle = Handle()
    monkeypatch.setattr(IPython.display, "display", display)
    log = NotebookLog("qaic-compile: qaic-HASH", keep=3, every_s=0.0)
    for i in range(5):
        log(f"line {i} <tag>")
    log.close()
    assert len(shown) == 1 and len(handle.updates) == 6  # one area, updated per line and at the end
    final = handle.updates[-1]
    assert "line 4 &lt;tag&gt;" in final and "line 1" not in final and "(last 3 of 5 lines)" in final


def test_a_c_program_writing_into_the_pipe_still_streams_line_by_line(tmp_path):
    """A real compiler is a C++ program: its stdout into a pipe is block-buffered unless stdbuf makes it
    line-buffered. Built here from C when a C compiler is present."""
    import shutil
    import subprocess
    import time

    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc or not shutil.which("stdbuf"):
        pytest.skip("needs a C compiler and coreutils' stdbuf")
    src = tmp_path / "two_lines.c"
    src.write_text('#include <stdio.h>\n#include <unistd.h>\n'
                   'int main(void){ printf("first\\n"); sleep(2); printf("second\\n"); return 0; }\n')
    subprocess.run([cc, "-o", str(tmp_path / "two_lines"), str(src)], check=True)
    start, seen = time.monotonic(), []
    run_streaming([str(tmp_path / "two_lines")], tmp_path / "log.txt", lambda line: seen.append(
        (line, time.monotonic() - start)))
    assert [line for line, _ in seen] == ["first", "second"]
    assert seen[0][1] < 1.5 < seen[1][1]  # the first line arrived while the program was still sleeping
