"""`qeff-lab export`, `qeff-lab compile`, `qeff-lab execute`: the device path from the command line, with
QEfficient's argument names (--model-name, --num-cores, --prompt-len, --ctx-len, --mxfp6, --mxint8,
--device-group, --generation-len, ...; the underscore spellings work too), plus --backend and --dry-run.

    qeff-lab compile --model-name HuggingFaceTB/SmolLM2-135M-Instruct --prompt-len 32 --ctx-len 256 --mxfp6 --dry-run
    qeff-lab execute --model-name sentence-transformers/all-MiniLM-L6-v2 --prompt "My name is"
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

KINDS = ("auto", "encoder", "causal-lm")


def _flag(p: argparse.ArgumentParser, name: str, **kw) -> None:
    """--dash-name and --underscore_name, as QEfficient's CLI accepts both."""
    names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    p.add_argument(*names, **kw)


def parse_device_group(text: str | None) -> list[int] | None:
    """QEfficient's `--device-group [0,1]` (or `0,1`, or `0 1`) -> [0, 1]."""
    if text is None:
        return None
    parts = [t for t in re.split(r"[\s,\[\]]+", text) if t]
    if not parts or not all(t.isdigit() for t in parts):
        raise ValueError(f"--device-group {text!r}: expected device ids like [0] or [0,1].")
    return [int(t) for t in parts]


def _sizes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers like 32 or 32,64, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _model_args(p: argparse.ArgumentParser) -> None:
    _flag(p, "model-name", dest="model_name", required=True, help="hub card or local folder")
    p.add_argument("--kind", choices=KINDS, default="auto",
                   help="encoder or causal-lm (auto: from the model's config)")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls", "max", "avg", "none"],
                   help="encoders only (default: mean)")


def _compile_args(p: argparse.ArgumentParser) -> None:
    _flag(p, "num-cores", dest="num_cores", type=int, default=16, help="NSP cores per device (default 16)")
    _flag(p, "batch-size", dest="batch_size", type=int, default=1)
    _flag(p, "prompt-len", dest="prompt_len", type=int, default=32, help="decoders: prefill length (default 32)")
    _flag(p, "ctx-len", dest="ctx_len", type=int, default=128, help="decoders: context length (default 128)")
    _flag(p, "seq-len", dest="seq_len", type=_sizes, nargs="+", default=[[32]],
          help="encoders: compiled seq_len(s), e.g. 32 or 32,64,128 (default 32)")
    p.add_argument("--mxfp6", "--mxfp6-matmul", "--mxfp6_matmul", dest="mxfp6", action="store_true",
                   help="compress MatMul weights to MXFP6")
    p.add_argument("--mxint8", "--mxint8-kv-cache", "--mxint8_kv_cache", dest="mxint8", action="store_true",
                   help="decoders: KV cache in MXINT8 (custom IO)")
    _flag(p, "device-group", dest="device_group", default=None,
          help="device ids, e.g. [0] or [0,1]: compiles for that many devices and runs on them")
    _flag(p, "num-devices", dest="num_devices", type=int, default=None, help="devices to compile for")
    p.add_argument("--mos", type=int, default=None)
    _flag(p, "mdts-mos", dest="mdts_mos", type=int, default=None)
    _flag(p, "aic-enable-depth-first", dest="aic_enable_depth_first", action="store_true")
    _flag(p, "aic-hw-version", dest="aic_hw_version", default=None, choices=["ai100", "ai200"],
          help="target hardware (default: the first card's, from qaic-util -q FW IMAGE_VARIANT; else ai100)")
    p.add_argument("--npi", "--node-precision-info", dest="npi", default=None,
                   help="node-precision-info YAML (from the precision lab)")
    _flag(p, "extra-flag", dest="extra_flags", action="append", default=None,
          help="a raw compiler flag, repeatable; write it with '=': --extra-flag=-stats-level=70")
    p.add_argument("--backend", choices=["qaic", "onnxruntime"], default=None,
                   help="default: qaic when the AI 100 SDK is present, else the embedded ONNX Runtime")
    _flag(p, "dry-run", dest="dry_run", action="store_true",
          help="write every artifact and print the compiler command without running it")
    _flag(p, "compile-dir", dest="compile_dir", default=None, help="parent folder for the compile folder")
    p.add_argument("--quiet", action="store_true", help="do not stream the compiler's output")


def _kind(model_name: str, kind: str) -> str:
    if kind != "auto":
        return kind
    from transformers import AutoConfig

    from qeff_lab.loading import resolve
    from qeff_lab.transforms.encoders import encoder_obstacle

    config = AutoConfig.from_pretrained(resolve(model_name).path)
    return "encoder" if encoder_obstacle(config) is None else "causal-lm"


def _load(args: argparse.Namespace):
    kind = _kind(args.model_name, args.kind)
    if kind == "encoder":
        from qeff_lab import QEFFAutoModel

        return kind, QEFFAutoModel.from_pretrained(args.model_name, pooling=None if args.pooling == "none"
                                                   else args.pooling)
    from qeff_lab.models.causal_lm import QEFFAutoModelForCausalLM

    return kind, QEFFAutoModelForCausalLM.from_pretrained(args.model_name)


def _options(args: argparse.Namespace) -> dict:
    group = parse_device_group(args.device_group)
    num_devices = args.num_devices or (len(group) if group else 1)
    if group and args.num_devices and args.num_devices != len(group):
        raise ValueError(f"--num-devices {args.num_devices} disagrees with --device-group {group}.")
    options = {"num_devices": num_devices, "mos": args.mos, "mdts_mos": args.mdts_mos,
               "aic_enable_depth_first": args.aic_enable_depth_first, "aic_hw_version": args.aic_hw_version,
               "npi": args.npi, "extra_flags": args.extra_flags, "dry_run": args.dry_run,
               "compile_dir": args.compile_dir, "stream": False if args.quiet else None}
    defaults = {"num_devices": 1, "aic_enable_depth_first": False, "dry_run": False}
    return {k: v for k, v in options.items() if v is not None and defaults.get(k, None) != v}


def _compile(kind: str, model, args: argparse.Namespace):
    options = _options(args)
    if kind == "encoder":
        if args.mxint8:
            raise ValueError("--mxint8 sets the KV-cache dtype of a decoder; an encoder has no KV cache.")
        seq_lens = sorted({s for group in args.seq_len for s in group})
        model.compile(num_cores=args.num_cores, seq_len=seq_lens, batch_size=args.batch_size,
                      backend=args.backend, mxfp6_matmul=args.mxfp6, **options)
    else:
        model.compile(prefill_seq_len=args.prompt_len, ctx_len=args.ctx_len, batch_size=args.batch_size,
                      num_cores=args.num_cores, mxfp6_matmul=args.mxfp6, mxint8_kv_cache=args.mxint8,
                      backend=args.backend, **options)
    return model.compile_result


def _print_compile(kind: str, model_name: str, result) -> None:
    print(f"model    {model_name} ({kind})")
    what = "qaic, dry run (compiler not run)" if result.dry_run else result.backend
    print(f"backend  {what}: {result.reason}{' [reused]' if result.reused else ''}")
    print(f"folder   {result.folder}")
    print(f"files    {', '.join(result.artifacts)}")
    print("command  " + result.command_line)
    if result.dry_run:
        print("Run the command above on a machine with the AI 100 SDK; qconfig.json in the folder records the rest.")


def cmd_export(args: argparse.Namespace) -> int:
    kind, model = _load(args)
    path = model.export()
    print(f"model    {args.model_name} ({kind})")
    print(f"onnx     {path}")
    print(f"export   {model.steps['export'].summary}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    kind, model = _load(args)
    result = _compile(kind, model, args)
    _print_compile(kind, args.model_name, result)
    return 0


def cmd_execute(args: argparse.Namespace) -> int:
    """Compile (or reuse the content-addressed folder) and run on the chosen backend and devices."""
    if args.dry_run:
        raise ValueError("execute runs the compiled model; use `qeff-lab compile --dry-run` for the command only.")
    kind, model = _load(args)
    result = _compile(kind, model, args)
    _print_compile(kind, args.model_name, result)
    device_ids = parse_device_group(args.device_group) if result.backend == "qaic" else None
    prompts = args.prompt or ["My name is"]
    try:
        if kind == "encoder":
            start = time.perf_counter()
            emb = model.embed(prompts) if not device_ids else _embed_on(model, prompts, device_ids)
            seconds = time.perf_counter() - start
            if args.json:
                json.dump({"shape": list(emb.shape), "embeddings": emb.tolist()}, sys.stdout)
                print()
                return 0
            print(f"output   embeddings {tuple(emb.shape)} in {seconds:.3f}s ({len(prompts) / seconds:.1f} sentences/s)")
            for text, row in zip(prompts, emb):
                print(f"  {text[:40]!r:<44} {' '.join(f'{v:+.4f}' for v in row.reshape(-1)[:6])} ...")
            return 0
        tokenizer = model.tokenizer
        out = model.generate(tokenizer, prompts, generation_len=args.generation_len, device_ids=device_ids,
                             verbose=not args.json)
    except ImportError as e:  # qaicrt missing: say it like every other error
        raise RuntimeError(str(e)) from e
    if args.json:
        json.dump({"texts": out.texts, "ids": [list(map(int, t)) for t in out.ids]}, sys.stdout)
        print()
        return 0
    for prompt, text in zip(prompts, out.texts):
        print(f"prompt   {prompt!r}\n  -> {text!r}")
    return 0


def _embed_on(model, prompts, device_ids):
    tok = model.tokenizer(prompts, padding=True, truncation=True, max_length=max(model.seq_lens), return_tensors="np")
    return model.generate(tok, device_ids=device_ids)["output"]


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a model to ONNX (the content-addressed export cache)")
    _model_args(p)
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("compile", help="compile for AI 100 (or the embedded backend); --dry-run: "
                                              "artifacts and the exact command only")
    _model_args(p)
    _compile_args(p)
    p.set_defaults(func=cmd_compile)

    p = subparsers.add_parser("execute", help="compile (or reuse) and run: embeddings for an encoder, "
                                              "generation for a causal LM")
    _model_args(p)
    _compile_args(p)
    p.add_argument("--prompt", action="append", default=None, help="repeatable; text to embed or to continue")
    _flag(p, "generation-len", dest="generation_len", type=int, default=None, help="decoders: new tokens at most")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_execute)
