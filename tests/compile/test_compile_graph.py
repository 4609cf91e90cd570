"""compile_graph end to end against the fake SDK (a TEST DOUBLE of the AI 100 compiler, tests/fake_sdk):
artifacts, the content-addressed folder, reuse only when complete, streaming, exit codes, failure advice, cleanup."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qeff_lab.compile import CompileError, CompileOptionError, compile_graph
from qeff_lab.runtime import open_session

SPEC = [{"batch_size": 1, "seq_len": 8}]
PD = [{"batch_size": 1, "seq_len": 8, "ctx_len": 32}, {"batch_size": 1, "seq_len": 1, "ctx_len": 32}]
KV = {"past_key.0": "float16", "past_value.0": "float16",
      "past_key.0_RetainedState": "float16", "past_value.0_RetainedState": "float16"}


def leftovers(cache: Path) -> list[str]:
    """Everything in the compile cache except finished folders, kept failure logs and the folders' lock files
    (pipeline.build_artifact keeps `.<folder>.lock` on purpose: removing it would race another process)."""
    root = cache / "compile"
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")
                  ) if root.exists() else []


def strip_folder(argv: list[str], folder: str) -> list[str]:
    return [a.replace(folder, "<F>") for a in argv]


# ----------------------------------------------------------------------------- no SDK
def test_without_sdk_auto_picks_onnxruntime_and_still_writes_the_artifacts(no_sdk, tiny_onnx):
    r = compile_graph(tiny_onnx, SPEC, num_cores=8)
    assert r.backend == "onnxruntime" and "no Cloud AI 100 SDK" in r.reason
    assert r.folder.name.startswith("onnxruntime-") and not r.dry_run
    assert json.loads((r.folder / "specializations.json").read_text()) == {
        "specializations": [{"batch_size": "1", "seq_len": "8"}]}
    assert "-aic-num-cores=8" in r.command and not r.qpc_path.exists()
    q = r.qconfig
    assert q["backend"] == "onnxruntime" and q["options"]["num_cores"] == 8 and q["sdk"]["present"] is False
    assert q["command"] == r.command


def test_backend_qaic_without_sdk_is_a_clear_error(no_sdk, tiny_onnx, isolated_cache):
    with pytest.raises(RuntimeError) as e:
        compile_graph(tiny_onnx, SPEC, backend="qaic")
    msg = str(e.value)
    assert str(no_sdk) in msg and "backend='onnxruntime'" in msg and "dry_run=True" in msg
    assert "QEFF_LAB_QAIC_ROOT" in msg
    assert not (isolated_cache / "compile").exists()  # nothing written for a compile that cannot happen


def test_dry_run_without_sdk_writes_everything_and_runs_nothing(no_sdk, tiny_onnx):
    r = compile_graph(tiny_onnx, PD, spec_names=["Prefill", "Decode"], custom_io=KV,
                      options={"mxfp6_matmul": True, "num_devices": 2}, dry_run=True)
    assert r.dry_run and r.backend == "qaic" and r.folder.name.startswith("dryrun-")
    assert set(r.artifacts) == {"custom_io.yaml", "manifest.json", "mdp_partition.json", "qconfig.json",
                                "specializations.json"}
    assert r.command[0] == str(no_sdk / "exec" / "qaic-compile")
    assert f"-mdp-load-partition-config={r.folder}/mdp_partition.json" in r.command
    assert r.command_line.startswith(str(no_sdk / "exec" / "qaic-compile") + " -aic-hw ")
    assert r.qconfig["dry_run"] is True and r.qconfig["num_devices"] == 2
    with pytest.raises(RuntimeError, match="is a dry run"):
        open_session(r)


def test_dry_run_with_onnxruntime_backend_is_refused(no_sdk, tiny_onnx):
    with pytest.raises(ValueError, match="no compiler to dry-run"):
        compile_graph(tiny_onnx, SPEC, backend="onnxruntime", dry_run=True)


def test_unknown_option_fails_before_anything_is_written(no_sdk, tiny_onnx, isolated_cache):
    with pytest.raises(CompileOptionError, match="Did you mean 'mxfp6_matmul'"):
        compile_graph(tiny_onnx, SPEC, options={"mxfp6": True})
    with pytest.raises(CompileOptionError, match="given twice"):
        compile_graph(tiny_onnx, SPEC, num_cores=8, options={"num_cores": 4})
    assert not (isolated_cache / "compile").exists()


def test_missing_onnx_is_a_clear_error(no_sdk, tmp_path):
    with pytest.raises(FileNotFoundError, match="export the model first"):
        compile_graph(tmp_path / "nope.onnx", SPEC)


# ----------------------------------------------------------------------------- the folder's name
def test_folder_hash_covers_command_files_and_onnx(no_sdk, tiny_onnx, tmp_path, make_onnx):
    base = compile_graph(tiny_onnx, SPEC)
    assert compile_graph(tiny_onnx, SPEC).folder == base.folder
    assert compile_graph(tiny_onnx, SPEC).reused
    other_onnx = make_onnx(tmp_path / "other" / "model.onnx", scale=3.0)
    same_onnx_elsewhere = make_onnx(tmp_path / "copy" / "model.onnx", scale=2.0)
    folders = {
        "base": base.folder,
        "options": compile_graph(tiny_onnx, SPEC, mxfp6_matmul=True).folder,
        "cores": compile_graph(tiny_onnx, SPEC, num_cores=4).folder,
        "specs": compile_graph(tiny_onnx, [{"batch_size": 1, "seq_len": 16}]).folder,
        "custom_io": compile_graph(tiny_onnx, SPEC, custom_io={"output": "float16"}).folder,
        "mdp": compile_graph(tiny_onnx, SPEC, options={"num_devices": 2}).folder,
        "onnx": compile_graph(other_onnx, SPEC).folder,
    }
    assert len(set(folders.values())) == len(folders)
    # the ONNX is named by its content, not its path
    assert compile_graph(same_onnx_elsewhere, SPEC).folder == base.folder
    # options that only steer the run do not change the folder
    assert compile_graph(tiny_onnx, SPEC, options={"stream": False, "timeout_s": 60}).folder == base.folder


def test_external_data_is_part_of_the_onnx_hash(no_sdk, tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def build(folder: Path, value: float) -> Path:
        w = numpy_helper.from_array(np.full((64, 64), value, np.float32), "w")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 64])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 64])
        m = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
        folder.mkdir(parents=True)
        onnx.save(m, str(folder / "model.onnx"), save_as_external_data=True, location="model.data",
                  size_threshold=0)
        return folder / "model.onnx"

    a, b = build(tmp_path / "a", 1.0), build(tmp_path / "b", 2.0)
    assert a.read_bytes() == b.read_bytes()  # same graph file: only the external weights differ
    spec = [{"batch_size": 1}]
    assert compile_graph(a, spec).folder != compile_graph(b, spec).folder
    (tmp_path / "b" / "model.data").unlink()
    with pytest.raises(FileNotFoundError, match="model.data"):
        compile_graph(b, [{"batch_size": 2}])


# ----------------------------------------------------------------------------- with the fake compiler
def test_compiles_with_the_fake_sdk_and_reuses_only_when_complete(fake_sdk, tiny_onnx, isolated_cache):
    r = compile_graph(tiny_onnx, PD, spec_names=["Prefill", "Decode"], custom_io=KV, mxfp6_matmul=True,
                      options={"stream": False}, model_info={"name": "tiny", "transforms": ["KVCache"]})
    assert r.backend == "qaic" and r.folder.name.startswith("qaic-") and not r.reused
    assert (r.qpc_path / "programqpc.bin").is_file()
    calls = fake_sdk.calls()
    assert len(calls) == 1
    # the compiler ran in the temporary build folder; the recorded command names the final one
    ran = calls[0]
    build_dir = next(a for a in ran if a.startswith("-aic-binary-dir=")).split("=", 1)[1].rsplit("/qpc", 1)[0]
    assert Path(build_dir).name.startswith(f".{r.folder.name}.tmp-")
    assert strip_folder(ran, build_dir) == strip_folder(r.command, str(r.folder))
    assert {"-retained-state", "-mxfp6-matmul"} <= set(r.command)
    q = r.qconfig
    assert q["model"] == {"name": "tiny", "transforms": ["KVCache"]} and q["sdk"]["version"] == "1.23.0"
    assert q["retained_state"] is True and q["specializations_format"] == "named"
    assert "Compilation done." in (r.folder / "compile.log").read_text()

    again = compile_graph(tiny_onnx, PD, spec_names=["Prefill", "Decode"], custom_io=KV, mxfp6_matmul=True,
                          options={"stream": False})
    assert again.reused and again.folder == r.folder and len(fake_sdk.calls()) == 1  # compiler not run again

    # a folder whose QPC went missing (or was never finished) is removed and rebuilt, never trusted
    (r.qpc_path / "programqpc.bin").unlink()
    rebuilt = compile_graph(tiny_onnx, PD, spec_names=["Prefill", "Decode"], custom_io=KV, mxfp6_matmul=True,
                            options={"stream": False})
    assert not rebuilt.reused and len(fake_sdk.calls()) == 2 and (rebuilt.qpc_path / "programqpc.bin").is_file()
    # a QPC changed after the build fails the manifest check: rebuilt too
    (rebuilt.qpc_path / "programqpc.bin").write_bytes(b"tampered")
    compile_graph(tiny_onnx, PD, spec_names=["Prefill", "Decode"], custom_io=KV, mxfp6_matmul=True,
                  options={"stream": False})
    assert len(fake_sdk.calls()) == 3 and leftovers(isolated_cache) == []


def test_dry_run_with_the_sdk_present_does_not_run_the_compiler(fake_sdk, tiny_onnx):
    r = compile_graph(tiny_onnx, SPEC, dry_run=True)
    assert r.dry_run and fake_sdk.calls() == [] and not r.qpc_path.exists()
    assert r.command[0] == str(fake_sdk.root / "exec" / "qaic-compile")


def test_old_sdk_gets_qaic_exec_compile_only_and_flat_specializations(fake_sdk_factory, tiny_onnx):
    sdk = fake_sdk_factory("qaic-exec")
    r = compile_graph(tiny_onnx, PD, spec_names=["Prefill", "Decode"], custom_io=KV, options={"stream": False})
    assert r.command[:2] == [str(sdk.root / "exec" / "qaic-exec"), "-compile-only"]
    assert json.loads((r.folder / "specializations.json").read_text())["specializations"][1] == {
        "batch_size": "1", "seq_len": "1", "ctx_len": "32"}
    assert (r.qpc_path / "programqpc.bin").is_file()


def test_output_streams_while_the_compiler_runs(fake_sdk, tiny_onnx, tmp_path, monkeypatch):
    """The fake compiler prints a line, then waits until the caller has seen it: only live streaming passes."""
    handshake = tmp_path / "seen"
    monkeypatch.setenv("FAKE_QAIC_HANDSHAKE", str(handshake))
    seen = []

    def sink(line: str) -> None:
        seen.append(line)
        if "parsing arguments" in line:
            handshake.touch()

    r = compile_graph(tiny_onnx, SPEC, options={"stream": sink})
    assert "handshake: seen by the caller while running" in seen
    assert seen[-1] == "Compilation done."
    assert "handshake: seen by the caller while running" in (r.folder / "compile.log").read_text()


def test_terminal_streaming_goes_to_stderr(fake_sdk, tiny_onnx, capsys):
    compile_graph(tiny_onnx, SPEC)
    err = capsys.readouterr().err
    assert "  [compiler] qaic-compile (qeff_lab test double): parsing arguments" in err
    assert "  [compiler] Compilation done." in err


@pytest.mark.parametrize("mode, options, expect_rc, advice_words", [
    ("ok", {"extra_flags": ["-not-a-real-flag"]}, 1, ["does not accept -not-a-real-flag", "came from extra_flags"]),
    ("oom", {}, 1, ["ran out of memory", "mxfp6_matmul=True", "num_devices=2"]),
    ("killed", {}, -9, ["ran out of memory", "host RAM"]),
    ("partial", {}, 1, []),
    ("crash", {}, 3, []),
    ("no-qpc", {}, 0, ["exited 0 but left no qpc/programqpc.bin"]),
])
def test_failures_are_translated_and_nothing_half_written_remains(fake_sdk, tiny_onnx, isolated_cache, mode,
                                                                  options, expect_rc, advice_words):
    fake_sdk.mode(mode)
    with pytest.raises(CompileError) as e:
        compile_graph(tiny_onnx, SPEC, options={"stream": False, **options})
    err = e.value
    assert err.returncode == expect_rc
    for words in advice_words:
        assert any(words in a for a in err.advice), (words, err.advice)
    if not advice_words:
        assert err.advice == [] and "No known failure pattern matched" in str(err)
    assert "half-written compile folder was removed" in str(err) and "Full log:" in str(err)
    compile_dir = isolated_cache / "compile"
    assert [p for p in compile_dir.iterdir() if p.is_dir()] == []  # no folder, no temporary folder
    assert err.log_path.is_file() and err.log_path.parent == compile_dir
    assert "(qeff_lab test double): parsing arguments" in err.log_path.read_text()
    # a later good compile of the same thing works and is not confused by the failure
    fake_sdk.mode("ok")
    r = compile_graph(tiny_onnx, SPEC, options={"stream": False, **options} if mode != "ok" else {"stream": False})
    assert (r.qpc_path / "programqpc.bin").is_file()


def test_modeled_flag_unknown_to_an_old_sdk_names_the_option(fake_sdk, tiny_onnx):
    # the fake SDK does not know -aic-perf-metrics? It does; make it not know one by editing its known flags
    script = fake_sdk.root / "exec" / "qaic-compile"
    script.write_text(script.read_text().replace('"-aic-perf-metrics", ', ""))
    with pytest.raises(CompileError) as e:
        compile_graph(tiny_onnx, SPEC, options={"aic_perf_metrics": True, "stream": False})
    assert any("qeff_lab adds for aic_perf_metrics=True" in a and "SDK 1.23.0" in a for a in e.value.advice)


def test_named_specializations_on_an_old_sdk_advise_the_flat_format(fake_sdk_factory, tiny_onnx):
    fake_sdk_factory("qaic-exec")
    with pytest.raises(CompileError) as e:
        compile_graph(tiny_onnx, PD, spec_names=["Prefill", "Decode"],
                      options={"specializations_format": "named", "stream": False})
    assert any("specializations_format='flat'" in a for a in e.value.advice)


def test_timeout_stops_the_compiler(fake_sdk, tiny_onnx, isolated_cache):
    fake_sdk.mode("slow")
    with pytest.raises(CompileError) as e:
        compile_graph(tiny_onnx, SPEC, options={"timeout_s": 1, "stream": False})
    assert "timeout" in str(e.value) and e.value.advice[0].startswith("Stopped after timeout_s=1")
    assert [p for p in (isolated_cache / "compile").iterdir() if p.is_dir()] == []


def test_stale_build_of_a_dead_process_is_removed(fake_sdk, tiny_onnx, isolated_cache):
    first = compile_graph(tiny_onnx, SPEC, options={"stream": False})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = first.folder.parent / f".{first.folder.name}.tmp-deadbeef"
    stale.mkdir()
    (stale / ".build.pid").write_text(str(dead.pid))
    live = first.folder.parent / f".{first.folder.name}.tmp-0badf00d"
    live.mkdir()
    (live / ".build.pid").write_text(str(os.getpid()))  # a build in progress in a live process: left alone
    compile_graph(tiny_onnx, SPEC, options={"stream": False})
    assert not stale.exists() and live.exists()


def test_compile_dir_option_places_the_folder(fake_sdk, tiny_onnx, tmp_path):
    r = compile_graph(tiny_onnx, SPEC, options={"compile_dir": tmp_path / "mine", "stream": False})
    assert r.folder.parent == tmp_path / "mine" and (r.qpc_path / "programqpc.bin").is_file()


def test_npi_yaml_is_copied_and_passed(fake_sdk, tiny_onnx, tmp_path):
    npi = tmp_path / "npi.yaml"
    npi.write_text("FP32NodeInstanceNames:\n- output\n")
    r = compile_graph(tiny_onnx, SPEC, options={"npi": npi, "stream": False})
    assert (r.folder / "node_precision_info.yaml").read_text() == npi.read_text()
    assert f"-node-precision-info={r.folder}/node_precision_info.yaml" in r.command
    npi.write_text("FP32NodeInstanceNames:\n- xf\n")  # new content: a new folder
    assert compile_graph(tiny_onnx, SPEC, options={"npi": npi, "stream": False}).folder != r.folder


def test_npi_names_must_be_node_outputs_of_this_graph(no_sdk, tiny_onnx, tmp_path, isolated_cache):
    npi = tmp_path / "stale.yaml"
    npi.write_text("FP32NodeInstanceNames:\n- /model/layers.0/Add_output_0\n- output\n")
    with pytest.raises(ValueError, match=r"1 node output name\(s\) that model.onnx does not have.*Add_output_0"):
        compile_graph(tiny_onnx, SPEC, dry_run=True, options={"npi": npi})
    assert not (isolated_cache / "compile").exists()


def test_npi_from_the_precision_lab_writer(no_sdk, tiny_onnx, tmp_path):
    from qeff_lab.precision.npi import write_npi_yaml

    npi = tmp_path / "npi.yaml"
    write_npi_yaml({"xf": "cast output kept in fp32 (test)"}, npi)
    r = compile_graph(tiny_onnx, SPEC, dry_run=True, options={"npi": npi})
    assert f"-node-precision-info={r.folder}/node_precision_info.yaml" in r.command
    assert "- xf" in (r.folder / "node_precision_info.yaml").read_text()


# ----------------------------------------------------------------------------- what the SDK generation takes
def test_qaic_compile_of_sdk_1_22_gets_flat_specializations(fake_sdk_factory, tiny_onnx):
    """qaic-compile alone does not mean named entries: SDK 1.22's takes flat ones (QEfficient issue #1129)."""
    fake_sdk_factory(version="1.22.0")
    r = compile_graph(tiny_onnx, PD, spec_names=["Prefill", "Decode"], custom_io=KV, options={"stream": False})
    assert r.qconfig["specializations_format"] == "flat" and r.command[0].endswith("/qaic-compile")
    assert json.loads((r.folder / "specializations.json").read_text())["specializations"][0] == {
        "batch_size": "1", "seq_len": "8", "ctx_len": "32"}
    assert (r.qpc_path / "programqpc.bin").is_file()


def test_named_entries_on_sdk_1_22_fail_as_upstream_users_saw_and_advise_flat(fake_sdk_factory, tiny_onnx):
    fake_sdk_factory(version="1.22.0")
    with pytest.raises(CompileError) as e:
        compile_graph(tiny_onnx, PD, spec_names=["Prefill", "Decode"],
                      options={"specializations_format": "named", "stream": False})
    assert e.value.returncode == 255 and "type must be string, but is object" in str(e.value)
    assert any("reads only flat specializations" in a and "specializations_format='flat'" in a
               for a in e.value.advice)


def test_hardware_version_comes_from_the_card(fake_sdk, tiny_onnx):
    fake_sdk.cards(variant="AIC200.REL")
    r = compile_graph(tiny_onnx, SPEC, options={"stream": False})
    assert "-aic-hw-version=ai200" in r.command and r.qconfig["aic_hw_version"] == "ai200"
    fake_sdk.cards(variant="AIC100.REL")
    r100 = compile_graph(tiny_onnx, SPEC, options={"stream": False})
    assert "-aic-hw-version=ai100" in r100.command and r100.folder != r.folder
    # the option wins over the card
    assert "-aic-hw-version=ai100" in compile_graph(tiny_onnx, SPEC, options={"aic_hw_version": "ai100",
                                                                              "stream": False}).command


def test_no_card_means_ai100(no_sdk, tiny_onnx):
    assert "-aic-hw-version=ai100" in compile_graph(tiny_onnx, SPEC, dry_run=True).command


def test_prefill_len_1_compiles_one_decode_specialization(fake_sdk, tiny_onnx):
    same = [PD[1], dict(PD[1])]
    r = compile_graph(tiny_onnx, same, spec_names=["Prefill", "Decode"], custom_io=KV, options={"stream": False})
    assert r.specializations == [PD[1]] and r.spec_names == ["Decode"]
    assert json.loads((r.folder / "specializations.json").read_text()) == {
        "specializations": [{"name": "Decode", "symbols": {"batch_size": "1", "seq_len": "1", "ctx_len": "32"}}]}
    assert r.qconfig["specialization_names"] == ["Decode"] and r.qconfig["specializations"] == [PD[1]]
