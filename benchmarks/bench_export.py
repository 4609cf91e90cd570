"""Export and session memory at scale: random-weight Llamas of about 135M, 360M and 1B parameters, each saved
as safetensors to a temporary folder and loaded with QEFFAutoModelForCausalLM.from_pretrained(path) like a
user's checkpoint. Each step runs in its own child process; its peak RSS (getrusage ru_maxrss) is printed in
GB and as a ratio to the checkpoint's weight bytes, with the seconds it took.

    python benchmarks/bench_export.py                      # 135m and 360m, the route export() chooses
    python benchmarks/bench_export.py --sizes 1b           # ~12 GiB of RAM while the random checkpoint is saved
    python benchmarks/bench_export.py --route traced --sizes 135m   # today's route, for comparison
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import Machine

# Llama shapes: SmolLM2-135M, SmolLM2-360M, Llama-3.2-1B (all with tied embeddings)
CONFIGS = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=True,
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}),
}


def _peak_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


# ----------------------------------------------------------------------------- the child steps
def child_make(size: str, folder: str, dtype: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**CONFIGS[size], torch_dtype=dtype)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    model.save_pretrained(folder)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def child_export(folder: str, route: str | None) -> dict:
    from qeff_lab.models.causal_lm import QEFFAutoModelForCausalLM

    start = time.perf_counter()
    model = QEFFAutoModelForCausalLM.from_pretrained(folder)
    loaded, load_peak = time.perf_counter() - start, _peak_gb()
    start = time.perf_counter()
    path = model.export(route=route)
    result = model.export_result
    return {"load_s": loaded, "load_peak_gb": load_peak, "export_s": time.perf_counter() - start,
            "peak_gb": _peak_gb(), "path": str(path), "route": result.route, "why": result.route_reason}


def child_session(path: str) -> dict:
    from qeff_lab.runtime.session import OrtSession

    start = time.perf_counter()
    session = OrtSession(Path(path), threads=os.cpu_count())
    return {"create_s": time.perf_counter() - start, "peak_gb": _peak_gb(), **session.creation}


def _run_child(step: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", step, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="135m,360m", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--route", choices=["streamed", "traced"], default=None,
                        help="export route (default: the one export() chooses)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the saved checkpoint (bf16 is converted to fp32 tensor by tensor)")
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in CONFIGS]
    if unknown:
        parser.error(f"unknown size(s) {unknown}: choose from {', '.join(CONFIGS)}")
    machine = Machine.start(os.cpu_count() or 1)
    print(f"{'model':>6} {'params':>8} {'weights':>8} | {'route':>8} {'export peak':>14} {'export s':>9} | "
          f"{'session peak':>14} {'create s':>9} {'mapped':>6}")
    for size in sizes:
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-export-{size}-"))
        env_cache = os.environ.get("QEFF_LAB_CACHE")
        os.environ["QEFF_LAB_CACHE"] = str(tmp / "cache")
        try:
            made = _run_child("make", size, str(tmp / "ckpt"), args.dtype)
            weights = sum(p.stat().st_size for p in (tmp / "ckpt").glob("*.safetensors"))
            exp = _run_child("export", str(tmp / "ckpt"), args.route or "")
            ses = _run_child("session", exp["path"])
            print(f"{size:>6} {made['parameters'] / 1e6:7.0f}M {weights / 1e9:7.2f}G | {exp['route']:>8} "
                  f"{exp['peak_gb']:5.2f}G ({exp['peak_gb'] * 1e9 / weights:4.2f}x) {exp['export_s']:8.1f}s | "
                  f"{ses['peak_gb']:5.2f}G ({ses['peak_gb'] * 1e9 / weights:4.2f}x) {ses['create_s']:8.1f}s "
                  f"{'yes' if ses['weights_mapped'] else 'no':>6}", flush=True)
            print(f"       load {exp['load_s']:.1f} s (peak {exp['load_peak_gb']:.2f} G); route: {exp['why']}", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if env_cache is None:
                os.environ.pop("QEFF_LAB_CACHE", None)
            else:
                os.environ["QEFF_LAB_CACHE"] = env_cache
    print(machine.finish())
    print("peak = the child process's ru_maxrss (file-backed pages of mapped weights count while resident); "
          "ratios are to the checkpoint's bytes")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        step, rest = sys.argv[2], sys.argv[3:]
        if step == "make":
            result = child_make(*rest)
        elif step == "export":
            result = child_export(rest[0], rest[1] or None)
        else:
            result = child_session(rest[0])
        print(json.dumps(result))
    else:
        main()
