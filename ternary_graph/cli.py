"""``ternary-graph``: trace | train | eval | generate | viz."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from .config import PRESETS
from .precision import DTYPE_CHOICES
from .train.device import DEVICE_HELP, resolve_device
from .viz.cli import add_viz_parser


def _none_or_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def parse_model_overrides(items: list[str]) -> dict:
    """``["vq_input_norm=false", "num_experts=8"]`` -> ModelConfig field values of the field's type."""
    from .config import ModelConfig
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in defaults:
            raise ValueError(f"--model takes FIELD=VALUE with FIELD one of {', '.join(defaults)}, got {item!r}")
        if name == "routing":
            raise ValueError("--model routing=...: choose the router with --routing (the run config records it)")
        kind = type(defaults[name])
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--model {name} takes true or false, got {text!r}")
            out[name] = text.lower() in ("true", "1")
        else:
            try:
                out[name] = kind(text)
            except ValueError:
                raise ValueError(f"--model {name} takes {kind.__name__} values, got {text!r}") from None
    return out


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .train.loop import TrainConfig
    d = TrainConfig()
    p.add_argument("--preset", default=d.preset, choices=sorted(PRESETS), help="model preset (default %(default)s)")
    p.add_argument("--weights", default=d.weights, choices=("ternary", "float"),
                   help="ternary int8-vote training, or the float AdamW baseline of the same architecture")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate of float parameters")
    p.add_argument("--threshold", type=int, default=d.threshold, help="vote threshold θ at step 0")
    p.add_argument("--threshold-final", type=_none_or_int, default=d.threshold_final,
                   help="θ at the last step, ramped linearly ('none': constant)")
    p.add_argument("--threshold-ramp-from", type=float, default=d.threshold_ramp_from,
                   help="fraction of the run after which θ starts ramping to --threshold-final (0: all of it)")
    p.add_argument("--scale-threshold", type=int, default=d.scale_threshold, help="row-scale vote threshold (0 freezes)")
    p.add_argument("--decay-shift", type=_none_or_int, default=d.decay_shift, help="accumulator decay shift ('none')")
    p.add_argument("--vote-magnitude", type=int, default=d.vote_magnitude)
    p.add_argument("--flip-prob", type=float, default=d.flip_prob)
    p.add_argument("--routing", default=d.routing,
                   help="MoEGraph router: graph (learned edges + centroids), or an ablation baseline: frozen "
                        "(edges frozen neutral), topk / topk-float (softmax router + load-balancing loss), "
                        "hash (experts by code id)")
    p.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                   help="change one field of the preset's ModelConfig (repeatable), e.g. vq_input_norm=true")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help="validation windows per pass (0: all)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between metrics.jsonl lines")
    p.add_argument("--keep-last", type=int, default=d.keep_last)
    p.add_argument("--device", default=d.device, help=f"{DEVICE_HELP} (default %(default)s)")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPE_CHOICES,
                   help="activation precision: auto is bf16 on CUDA, fp32 on CPU (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data", default=None, help="text file or folder (default: this Python's stdlib sources)")
    p.add_argument("--out", default=None, help="run folder (default runs/<preset>-<weights>)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: default)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--task", default="lm", choices=("lm", "kg", "lm+kg"),
                   help="lm: next-byte LM; kg: the ternary KG scorer alone on the stdlib KG; "
                        "lm+kg: LM plus the composite head's KG loss")
    p.add_argument("--kg-weight", type=float, default=d.kg_weight, help="lm+kg: weight of the KG loss")
    p.add_argument("--epochs", type=int, default=None, help="kg: epochs over the training triples (default 100)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--micro-batches", type=int, default=d.micro_batches,
                   help="backward passes per step over all ranks, each casting its own votes (default %(default)s)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each training step as one CUDA graph (ternary models on CUDA; see docs/kernels.md)")
    p.add_argument("--distributed", action="store_true",
                   help="data parallel over the ranks torchrun starts (see docs/distributed.md)")
    p.add_argument("--backend", default="auto", choices=("auto", "nccl", "gloo"),
                   help="--distributed: nccl for CUDA devices, gloo for CPU (auto: by --device)")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="--distributed: seconds a rank waits for its peers before it stops with an error")


def _train_kg(args: argparse.Namespace) -> int:
    from .kg.task import KGTrainConfig, train_kg
    d = KGTrainConfig()
    cfg = KGTrainConfig(epochs=args.epochs or d.epochs, seed=args.seed, device=resolve_device(args.device),
                        out=args.out or "runs/kg", threads=args.threads, progress=not args.no_progress)
    s = train_kg(cfg)
    print(f"\ndone: {s.epochs} epochs of the ternary KG scorer in {s.seconds:.0f} s")
    print(f"  test filtered MRR   {s.test['mrr']:.4f}  (Hits@1 {s.test['hits@1']:.4f}, Hits@10 {s.test['hits@10']:.4f})")
    print(f"  random ranking MRR  {s.random_mrr:.5f}")
    print(f"  parameter bytes     {s.inference_bytes:,} (training state {s.training_bytes:,})")
    print(f"  run folder          {s.run_dir}")
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.task == "kg":
        return _train_kg(args)
    from .train.loop import TrainConfig, train
    out = args.out or f"runs/{args.preset}-{args.weights}"
    cfg = TrainConfig(preset=args.preset, weights=args.weights, steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, lr=args.lr, threshold=args.threshold,
                      threshold_final=args.threshold_final, threshold_ramp_from=args.threshold_ramp_from,
                      routing=args.routing,
                      scale_threshold=args.scale_threshold,
                      decay_shift=args.decay_shift, vote_magnitude=args.vote_magnitude, flip_prob=args.flip_prob,
                      eval_every=args.eval_every, eval_windows=args.eval_windows,
                      checkpoint_every=args.checkpoint_every, log_every=args.log_every, keep_last=args.keep_last,
                      device=resolve_device(args.device), dtype=args.dtype,
                      seed=args.seed, data=args.data, out=out, threads=args.threads, task=args.task,
                      kg_weight=args.kg_weight, cuda_graph=args.cuda_graph)
    cfg = dataclasses.replace(cfg, micro_batches=args.micro_batches, model_overrides=parse_model_overrides(args.model))
    if args.distributed:
        from .train.distributed import DistributedError, init_distributed, shutdown
        try:
            vote_sync, cfg.device = init_distributed(args.backend, device=cfg.device, timeout_s=args.dist_timeout)
            s = train(cfg, resume=args.resume, progress=not args.no_progress, vote_sync=vote_sync)
        except DistributedError as exc:
            print(f"ternary-graph train: error: {exc}", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            # Exit without interpreter shutdown: destroying a process group whose peer died or
            # hangs can block, or abort the process (SIGABRT) instead of returning this status.
            os._exit(3)
        shutdown()
        if vote_sync.rank != 0:
            return 128 + int(s.stop_signal) if s.interrupted else 0
    else:
        s = train(cfg, resume=args.resume, progress=not args.no_progress)
    status = "interrupted" if s.interrupted else "done"
    code = 128 + int(s.stop_signal) if s.interrupted else 0  # 130 after SIGINT, 143 after SIGTERM
    print(f"\n{status}: {s.steps} steps of {cfg.preset}/{cfg.weights} in {s.seconds:.0f} s "
          f"({s.tokens_per_second:,.0f} tokens/s)")
    print(f"  device              {s.device} ({s.dtype} activations)")
    print(f"  train loss          {s.final_train_loss:.4f} nats/byte")
    print(f"  validation loss     {s.val_loss_nats:.4f} nats/byte = {s.val_bits_per_byte:.4f} bits/byte")
    print(f"  unigram baseline    {s.unigram_bits_per_byte:.4f} bits/byte")
    print(f"  run folder          {s.run_dir}  (metrics.jsonl, loss.png, routing.png, checkpoints)")
    if not s.interrupted:
        _print_sample(cfg, s.run_dir)
    return code


SAMPLE_PROMPT_BYTES = 48  # validation bytes that prompt the post-training sample
SAMPLE_NEW_BYTES = 64  # bytes the post-training sample writes: ~2 s for tiny on one CPU core
SAMPLE_TEMPERATURE = 0.8  # seeded sampling: greedy decoding of a young model mostly repeats one byte


def validation_prompt(data, length: int) -> bytes:
    """``length`` bytes of the validation text from the line start after its middle (the
    same prompt for every run on the same corpus)."""
    middle = len(data) // 2
    tail = bytes(data[middle:middle + 4096])
    start = middle + tail.find(b"\n") + 1 if b"\n" in tail else middle
    start = min(start, max(0, len(data) - length))
    return bytes(data[start:start + length])


def _print_sample(cfg, run_dir: str) -> None:
    """A short continuation of a validation prompt by the final checkpoint: what the model writes."""
    import time
    import torch
    from .train.loop import load_model_from_checkpoint, prepare_data
    device = _generate_device(cfg.device)
    model, _, _, _ = load_model_from_checkpoint(run_dir, device=device)
    _, val, _ = prepare_data(cfg)
    limit = model.cfg.max_seq_len
    prompt = validation_prompt(val.data, min(SAMPLE_PROMPT_BYTES, limit // 2))
    new = min(SAMPLE_NEW_BYTES, limit - len(prompt))
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    t0 = time.perf_counter()
    out = model.generate(ids, new, temperature=SAMPLE_TEMPERATURE, seed=cfg.seed)
    seconds = time.perf_counter() - t0
    written = bytes(out[0, len(prompt):].tolist())
    print(f"  sample              {new} bytes, temperature {SAMPLE_TEMPERATURE}, seed {cfg.seed} ({seconds:.1f} s)")
    print(f"    prompt            {prompt.decode('utf-8', errors='replace')!r}")
    print(f"    continuation      {written.decode('utf-8', errors='replace')!r}")


GENERATE_FLAGS = ("--max-new-bytes", "--temperature", "--top-k", "--top-p")


def _read_prompt(args: argparse.Namespace) -> tuple[bytes, str]:
    """The prompt bytes and how to name them in errors."""
    if args.prompt_file is not None:
        name = f"--prompt-file {args.prompt_file!r}"
        try:
            with open(args.prompt_file, "rb") as f:
                prompt = f.read()
        except OSError as exc:
            raise ValueError(f"{name}: cannot read it ({exc.strerror or exc})") from exc
    else:
        # surrogateescape gives back the exact bytes of a non-UTF-8 command-line argument.
        name, prompt = "--prompt", args.prompt.encode("utf-8", errors="surrogateescape")
    if not prompt:
        raise ValueError(f"{name} is empty; the model needs at least one byte to continue")
    return prompt, name


def _check_prompt_fits(prompt: bytes, name: str, max_new: int, max_seq_len: int) -> None:
    """Prompt and new bytes must fit in the model's context: an error up front, no sliding window."""
    if len(prompt) >= max_seq_len:
        raise ValueError(f"{name} has {len(prompt)} bytes; the model's max_seq_len is {max_seq_len}, so a prompt "
                         f"may have at most {max_seq_len - 1} bytes")
    if len(prompt) + max_new > max_seq_len:
        raise ValueError(f"--max-new-bytes {max_new} after a {len(prompt)}-byte prompt exceeds the model's "
                         f"max_seq_len={max_seq_len}; at most {max_seq_len - len(prompt)} new bytes fit")


def _generate_device(device: str) -> str:
    """``auto`` (CUDA when available, else CPU) resolved, others checked; the name to build on."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine")
    return device


def _generate(args: argparse.Namespace) -> int:
    import codecs
    import time
    import torch
    from .models.generate import check_sampling_args, decode_stream
    from .train.loop import load_model_from_checkpoint
    check_sampling_args(args.max_new_bytes, args.temperature, args.top_k, args.top_p, names=GENERATE_FLAGS)
    prompt, name = _read_prompt(args)
    device = _generate_device(args.device)
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, _, _, _ = load_model_from_checkpoint(args.checkpoint, device=device)
    except (KeyError, TypeError) as exc:  # e.g. a `train --task kg` run: a checkpoint, but of no LM
        raise ValueError(f"--checkpoint {args.checkpoint!r} holds no language model ({type(exc).__name__}: "
                         f"{exc} in its metadata)") from exc
    except ValueError as exc:
        # Checkpoint errors already start with the path; others get the flag's value.
        where = "" if args.checkpoint in str(exc) else f" {args.checkpoint!r}"
        raise ValueError(f"--checkpoint{where}: {exc}") from exc
    except KeyboardInterrupt:
        print("interrupted before generating", file=sys.stderr)
        return 130
    _check_prompt_fits(prompt, name, args.max_new_bytes, model.cfg.max_seq_len)
    if torch.device(device).type == "cuda":
        model.prepare_inference()  # the decode GEMVs' copies of the ternary weights (used on CUDA only)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    stream = decode_stream(model, ids, args.max_new_bytes, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, compile_backend="inductor" if args.compile else None)
    # Bytes arrive one at a time; a UTF-8 character may span several, so decode incrementally.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    written, first, interrupted = 0, None, False
    t0 = time.perf_counter()
    try:
        for token in stream:
            first = first if first is not None else time.perf_counter() - t0
            sys.stdout.write(decoder.decode(bytes([int(token[0])])))
            sys.stdout.flush()
            written += 1
    except KeyboardInterrupt:
        interrupted = True
    seconds = time.perf_counter() - t0
    sys.stdout.write(decoder.decode(b"", final=True) + ("\n" if sys.stdout.isatty() else ""))
    sys.stdout.flush()
    rate = written / seconds if seconds > 0 else 0.0
    ttfb = "" if first is None else f"; first byte after {first:.2f} s"
    print(f"{'interrupted: ' if interrupted else ''}{written} bytes in {seconds:.2f} s, {rate:.1f} tokens/s "
          f"({len(prompt)}-byte prompt{ttfb})", file=sys.stderr)
    return 130 if interrupted else 0


def _dtype_name(dtype: str, device: str) -> str:
    import torch
    from .precision import resolve_dtype
    return "bf16" if resolve_dtype(dtype, device) == torch.bfloat16 else "fp32"


def _eval(args: argparse.Namespace) -> int:
    import math
    from .train.loop import corpus_mismatch, evaluate, load_model_from_checkpoint, prepare_data
    if args.windows is not None and args.windows < 0:
        raise ValueError(f"--windows must be >= 0 (0: all), got {args.windows}")
    model, cfg, meta, _ = load_model_from_checkpoint(args.checkpoint, device=resolve_device(args.device),
                                                     dtype=args.dtype)
    if args.windows is not None:
        cfg = dataclasses.replace(cfg, eval_windows=args.windows)
    _, val, corpus = prepare_data(cfg)
    mismatch = corpus_mismatch(meta, corpus)
    if mismatch is not None:
        print(f"ternary-graph eval: warning: {mismatch}; the loss below is on the corpus as it is now",
              file=sys.stderr)
    nats = evaluate(model, val, cfg)
    print(f"checkpoint step {meta['data_position']['next_step']} ({cfg.preset}/{cfg.weights}, "
          f"{cfg.device}, {_dtype_name(cfg.dtype, cfg.device)} activations)")
    print(f"validation loss: {nats:.4f} nats/byte = {nats / math.log(2):.4f} bits/byte")
    return 0


def _trace(args: argparse.Namespace) -> int:
    from .models.trace import format_trace, trace_model
    print(format_trace(trace_model(args.preset, weights=args.weights)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ternary-graph", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model on real text (default: the stdlib sources)")
    _add_train_args(p)
    p.set_defaults(func=_train)
    p = sub.add_parser("eval", help="validation loss of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint .json/.safetensors or run folder")
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default %(default)s)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="activation precision (default %(default)s)")
    p.add_argument("--windows", type=int, default=None, help="validation windows (default: as trained)")
    p.set_defaults(func=_eval)
    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint, streaming to stdout",
                       description="Writes only the new bytes to stdout (invalid UTF-8 as U+FFFD) and the "
                                   "speed to stderr. Prompt plus new bytes must fit in the model's max_seq_len.")
    p.add_argument("--checkpoint", required=True, help="checkpoint .json/.safetensors or run folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (UTF-8)")
    source.add_argument("--prompt-file", help="file whose bytes are the prompt")
    p.add_argument("--max-new-bytes", type=int, default=256, help="bytes to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely bytes")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="fixes the draws (default: unseeded)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (inductor): fewer, fused kernels per byte, "
                        "after a compilation at the first byte")
    p.set_defaults(func=_generate)
    p = sub.add_parser("trace", help="count a preset on the meta device (allocates nothing)")
    p.add_argument("--preset", default="default_3b", choices=sorted(PRESETS))
    p.add_argument("--weights", default="ternary", choices=("ternary", "float"))
    p.set_defaults(func=_trace)
    add_viz_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as exc:  # OSError: unwritable or full --out; DeviceError is a ValueError
        print(f"ternary-graph {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
