"""Run the compiler as a subprocess: stream its output live (notebook or terminal), log it, and turn its common
failures into advice."""
from __future__ import annotations

import html
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

LineSink = Callable[[str], None]


class CompileError(RuntimeError):
    """The compiler failed. `advice` holds what to try; `log_path` the full output (kept after the folder is gone)."""

    def __init__(self, message: str, returncode: int | None = None, advice: list[str] | None = None,
                 log_path: Path | None = None, command: list[str] | None = None):
        super().__init__(message)
        self.returncode = returncode
        self.advice = advice or []
        self.log_path = log_path
        self.command = command or []


# ----------------------------------------------------------------------------- live output
def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class NotebookLog:
    """A `<pre>` in the cell's output area showing the last lines, updated in place as they arrive."""

    def __init__(self, title: str, keep: int = 30, every_s: float = 0.25):
        from IPython.display import HTML, display

        self._html, self.title, self.keep, self.every_s = HTML, title, keep, every_s
        self.lines: list[str] = []
        self.count = 0
        self._last = 0.0
        self.handle = display(self._render(), display_id=True)

    def _render(self):
        body = html.escape("\n".join(self.lines[-self.keep:]))
        more = f" (last {self.keep} of {self.count} lines)" if self.count > self.keep else ""
        return self._html(f"<div style='font-size:12px'><b>{html.escape(self.title)}</b>{more}</div>"
                          f"<pre style='max-height:20em;overflow:auto;font-size:11px;margin:0'>{body}</pre>")

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        self.lines = self.lines[-self.keep:]
        self.count += 1
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.handle.update(self._render())

    def close(self) -> None:
        self.handle.update(self._render())


class TerminalLog:
    """Each line to stderr as it comes, prefixed so it reads apart from qeff_lab's own output."""

    def __init__(self, prefix: str = "  [compiler] "):
        self.prefix = prefix

    def __call__(self, line: str) -> None:
        print(self.prefix + line, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def make_sink(stream, title: str = "compiler output") -> LineSink:
    """None/True: the notebook output area when in a notebook, else the terminal. False: quiet. A function: used."""
    if stream is False:
        return lambda line: None
    if callable(stream) and not isinstance(stream, bool):
        return stream
    return NotebookLog(title) if _in_notebook() else TerminalLog()


@dataclass
class RunOutcome:
    returncode: int
    seconds: float
    timed_out: bool = False
    lines: list[str] = field(default_factory=list)  # the last lines, for messages


def run_streaming(command: list[str], log_path: Path, sink: LineSink, timeout_s: float | None = None,
                  keep: int = 60, cwd: Path | None = None) -> RunOutcome:
    """Run `command`, stdout and stderr merged, each line to `sink` and to `log_path` as it arrives.

    Interrupting (Ctrl-C, a notebook's stop button) kills the compiler before re-raising, so nothing keeps
    writing into a folder that is about to be removed."""
    start = time.monotonic()
    tail: list[str] = []
    timed_out = threading.Event()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        # A C/C++ program writing into a pipe buffers its stdout in blocks, so nothing would show until it
        # exits; stdbuf (coreutils) makes its stdio line-buffered. The log shows the command as given.
        if shutil.which(command[0]) is None:
            raise CompileError(f"Could not start the compiler {command[0]!r}: not found or not executable. Check the "
                               "SDK installation (or set QEFF_LAB_QAIC_ROOT to its root).", command=command)
        stdbuf = shutil.which("stdbuf")
        launch = [stdbuf, "-oL", "-eL", *command] if stdbuf else list(command)
        try:
            proc = subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", bufsize=1, cwd=cwd)
        except OSError as e:
            raise CompileError(f"Could not start the compiler {command[0]!r}: {e}. Check the SDK installation "
                               f"(or set QEFF_LAB_QAIC_ROOT to its root).", command=command) from e
        timer = None
        if timeout_s:
            def _kill():
                timed_out.set()
                proc.kill()
            timer = threading.Timer(timeout_s, _kill)
            timer.daemon = True
            timer.start()
        try:
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                log.write(raw if raw.endswith("\n") else raw + "\n")
                log.flush()
                tail.append(line)
                if len(tail) > keep:
                    del tail[0]
                sink(line)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
            if proc.stdout:
                proc.stdout.close()
            close = getattr(sink, "close", None)
            if close:
                close()
        log.write(f"# exit code {rc}\n")
    return RunOutcome(rc, time.monotonic() - start, timed_out.is_set(), tail)


# ----------------------------------------------------------------------------- failures -> advice
@dataclass
class FailureContext:
    """What the advice may refer to."""

    compiler: str = "qaic-compile"
    sdk_version: str | None = None
    specializations_format: str = "named"
    flag_sources: dict[str, str] = field(default_factory=dict)  # flag name -> the option that added it
    timeout_s: float | None = None


_UNKNOWN_FLAG = re.compile(
    r"(?i)(?:unknown command line argument|unrecognized (?:command line )?(?:option|argument)|unknown (?:option|flag)"
    r"|invalid (?:option|argument))\W*(-[A-Za-z][\w\-]*)")
_SPECIALIZATION = re.compile(r"(?i)(specializ\w*[^\n]*\b(error|invalid|fail\w*|unable|cannot|expected|unknown|mismatch)\b"
                             r"|\b(error|fail\w*|invalid|unable)\b[^\n]*specializ)")
# What a flat-only compiler's JSON reader (nlohmann) says when it meets a named entry's "symbols" object, with exit
# 255. Source: QEfficient issue #1129 (qaic-compile, 2026-06-26): "[json.exception.type_error.302] type must be
# string, but is object".
_SPEC_JSON_TYPE = re.compile(r"json\.exception\.type_error\.302[^\n]*type must be string, but is (object|number)")
_OOM = re.compile(r"(?i)(out of memory|bad_alloc|cannot allocate memory|insufficient memory|not enough memory"
                  r"|memory allocation failed|exceed\w* [^\n]*memory|\bOOM\b)")
_CUSTOM_IO = re.compile(r"(?i)custom.?io[^\n]*(not found|invalid|unknown|mismatch|error|fail)")
_UNSUPPORTED = re.compile(r"(?i)(unsupported (?:op|operator|node|type)|(?:op|operator|node)[^\n]* is not supported"
                          r"|no (?:kernel|implementation) for)")
_NPI = re.compile(r"(?i)node.?precision[^\n]*(error|invalid|not found|unknown|fail)")
_MISSING_FILE = re.compile(r"(?i)(no such file|cannot open|failed to open|unable to open|could not open)")


def explain_failure(output: str, returncode: int | None, ctx: FailureContext) -> list[str]:
    """Advice for a failed compile, most specific first; empty when nothing known matched."""
    advice: list[str] = []
    sdk = f"{ctx.compiler} (SDK {ctx.sdk_version or 'version unknown'})"
    m = _UNKNOWN_FLAG.search(output)
    if m:
        flag = m.group(1).split("=")[0]
        source = ctx.flag_sources.get(flag)
        if source == "extra_flags":
            advice.append(f"{sdk} does not accept {flag}, which came from extra_flags: remove it, or look up this "
                          f"SDK's spelling with `{ctx.compiler} -h`.")
        elif source:
            advice.append(f"{sdk} does not accept {flag}, which qeff_lab adds for {source}: this SDK version may "
                          f"predate it. Leave {source.split('=')[0]} at its default, or update the SDK.")
        else:
            advice.append(f"{sdk} does not accept {flag}: this SDK version may not know it. Check "
                          f"`{ctx.compiler} -h`; drop the option that adds it, or update the SDK.")
    if _SPEC_JSON_TYPE.search(output) and ctx.specializations_format == "named":
        advice.append(f"{sdk} reads only flat specializations (string maps) and met the named entries "
                      "({name, symbols}) in specializations.json. Compile with specializations_format='flat' (what "
                      "qeff_lab picks by itself for SDKs before 1.23), or update the SDK.")
    elif _SPECIALIZATION.search(output) or _SPEC_JSON_TYPE.search(output):
        other = "flat" if ctx.specializations_format == "named" else "named"
        advice.append(f"The compiler could not use specializations.json (written in the {ctx.specializations_format!r} "
                      f"format). SDKs before 1.23 and qaic-exec take flat entries, newer qaic-compile also "
                      f"{{name, symbols}}: try specializations_format={other!r}. Also check that every symbol "
                      "(batch_size, seq_len, ctx_len, ...) is a dynamic axis name of the ONNX graph.")
    if _OOM.search(output) or returncode in (-9, 137):
        advice.append("The compiler ran out of memory (host RAM when it was killed, else device memory for the "
                      "program). Try: a smaller ctx_len, batch_size or prefill length; mxfp6_matmul=True (smaller "
                      "weights); mos=1 and aic_enable_depth_first=True; num_devices=2 or more to split the model; "
                      "and, for host RAM, fewer parallel compiles or a bigger machine.")
    if _CUSTOM_IO.search(output):
        advice.append("The compiler rejected custom_io.yaml: every IOName must be an input or output of the ONNX "
                      "graph (past_key.{i}, past_value.{i} and their _RetainedState outputs) with a precision this "
                      "SDK supports (float16, mxint8, bfloat16 on newer hardware).")
    if _UNSUPPORTED.search(output):
        advice.append("The graph has an operator this compiler does not support: check the transforms' reports "
                      "(custom ops must be in their qeff_lab domains) and the export opset.")
    if _NPI.search(output):
        advice.append("The compiler rejected the node-precision-info YAML: its names must be ONNX node output "
                      "names of this exact graph (re-run the precision lab on this export).")
    if _MISSING_FILE.search(output) and not advice:
        advice.append("The compiler could not open a file it was given: check that the ONNX file (and its external "
                      "data next to it) still exists, then compile again.")
    if returncode == 0 and not advice:
        advice.append(f"The compiler exited 0 but left no qpc/programqpc.bin: the folder is not trusted and was "
                      f"removed. Check the log; this usually means {ctx.compiler} was interrupted or is not a "
                      "compiler.")
    return advice
