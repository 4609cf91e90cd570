"""The compile view says what its command line is: the device's command, run or not."""
from qeff_lab.views.compile import render_compile_result


def test_the_command_is_labelled_as_the_devices_when_onnx_runtime_ran(compiled_tiny):
    html = render_compile_result(compiled_tiny.compile_result)
    assert compiled_tiny.compile_result.backend == "onnxruntime"
    label = html.index("device compile command (not run here: onnxruntime ran this graph")
    assert label < html.index("qaic-compile")  # the label comes before the command it names
