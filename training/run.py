"""Fine-tune a LLaVE checkpoint with the hardness-weighted contrastive loss.

Single process (GPU if present, else CPU):

    python training/run.py --model zhibinlan/LLaVE-0.5B --train-data mmeb_train.jsonl \\
        --image-root MMEB-train --output-dir runs/llave-0.5b

Several GPUs (one process each; negatives are gathered across all of them):

    torchrun --nproc_per_node 8 training/run.py --model ... --per-device-batch-size 32 \\
        --grad-cache-chunk-size 8 ...

A 7B model (parameters, gradients and AdamW state sharded over the ranks with FSDP2):

    torchrun --nproc_per_node 8 training/run.py --model zhibinlan/LLaVE-7B --fsdp \\
        --learning-rate 5e-6 --per-device-batch-size 32 --grad-cache-chunk-size 4 ...

CPU smoke test (a tiny random model and synthetic shapes):

    python -m model.tiny /tmp/tiny
    python -m training.synthetic /tmp/shapes --n 256 --seed 0
    python training/run.py --model /tmp/tiny --train-data /tmp/shapes/train.jsonl \\
        --image-root /tmp/shapes --output-dir /tmp/run --max-steps 20 \\
        --per-device-batch-size 16 --learning-rate 1e-3 --no-gradient-checkpointing \\
        --eval-data /tmp/shapes/eval.jsonl

Defaults follow the paper: vision tower frozen, projector and LLM trained, AdamW with
lr 1e-5 (use 5e-6 for 7B), cosine schedule with 3% warmup, no weight decay, one epoch,
bf16 autocast on GPU, gradient checkpointing, alpha 9, logit scale 50; global batch
256 = processes x --per-device-batch-size. The final checkpoint is --output-dir itself
(HF layout, servable with ``python -m service --model OUT``); metrics go to
OUT/metrics.jsonl (one JSON object per logged step), evaluations to OUT/eval.jsonl and
the loss curve to OUT/loss.png, and in a multi-process run what each rank holds of the
training state to OUT/memory.json (after step 1). Only rank 0 writes files (and each rank
its RNG state, and under --fsdp its shards of a resumable checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # `python training/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.checkpoint import (  # noqa: E402
    latest_checkpoint,
    load_training_state,
    prune_checkpoints,
    save_hf_checkpoint,
    save_training_state,
)
from training.data import GroupedBatchSampler, PairDataset, collate_pairs, load_train_pairs  # noqa: E402
from training.distributed import (  # noqa: E402
    all_reduce_mean,
    barrier,
    destroy_distributed,
    gather_no_grad,
    init_distributed,
)
from training.fsdp import (  # noqa: E402
    SHARDED_DIR,
    full_state_dict,
    load_sharded,
    local_bytes,
    plain_copy,
    save_sharded,
    shard_model,
)
from training.progress import Progress  # noqa: E402
from training.reporting import append_jsonl, plot_loss, truncate_jsonl, write_model_card  # noqa: E402
from training.step import (  # noqa: E402
    ADAPTERS_FILE,
    StepConfig,
    configure_trainable,
    enable_gradient_checkpointing,
    load_adapters,
    lora_merged,
    lr_multiplier,
    make_encode,
    save_adapters,
    train_step,
)

logger = logging.getLogger("training.run")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="training/run.py",
        description="Fine-tune a LLaVE embedding model with the hardness-weighted contrastive loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    flag = argparse.BooleanOptionalAction
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="checkpoint folder or hub id to start from (either layout)")
    g.add_argument(
        "--freeze-vision-tower", action=flag, default=True, help="keep SigLIP frozen (the paper does)"
    )
    g.add_argument("--lora", action="store_true", help="train LoRA adapters on the LLM instead (needs peft)")
    g.add_argument("--lora-rank", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=int, default=32, help="LoRA scaling numerator")
    g.add_argument(
        "--attn-implementation", default="sdpa", choices=["sdpa", "eager"], help="attention kernel"
    )
    g.add_argument("--max-length", type=int, default=None, help="tokens per input (default: checkpoint's)")

    g = p.add_argument_group("data")
    g.add_argument("--train-data", required=True, nargs="+", help="MMEB-train .jsonl or .parquet file(s)")
    g.add_argument("--image-root", default=None, help="folder the image paths are relative to")
    g.add_argument("--bad-rows", choices=["skip", "error"], default="skip", help="skip (and report) or stop")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader processes for preprocessing")
    g.add_argument(
        "--hard-negatives",
        type=int,
        default=0,
        metavar="N",
        help="up to N neg_* targets per row as extra candidates (training.mine writes them)",
    )

    g = p.add_argument_group("loss")
    g.add_argument("--alpha", type=float, default=9.0, help="hardness weight (0 = InfoNCE)")
    g.add_argument("--logit-scale", type=float, default=50.0, help="1 / temperature")
    g.add_argument(
        "--mask-duplicates",
        action="store_true",
        help="pairs with an identical query or target are not negatives",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--learning-rate", type=float, default=1e-5, help="peak lr (paper: 1e-5; 5e-6 for 7B)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="warmup as a fraction of all steps")
    g.add_argument("--warmup-steps", type=int, default=None, help="warmup steps (overrides --warmup-ratio)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    g.add_argument("--num-epochs", type=float, default=1.0, help="passes over the data if --max-steps is 0")
    g.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0 = --num-epochs)")
    g.add_argument("--per-device-batch-size", type=int, default=32, help="pairs per process per step")
    g.add_argument("--seed", type=int, default=42, help="data order and RNG seed")

    g = p.add_argument_group("memory and speed")
    g.add_argument("--grad-cache-chunk-size", type=int, default=0, help="gradient-cache chunk (0 = off)")
    g.add_argument("--gradient-checkpointing", action=flag, default=True, help="recompute activations")
    g.add_argument(
        "--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 autocast on CUDA"
    )
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard parameters, gradients and optimizer state over the ranks "
        "(FSDP2, one unit per decoder layer / vision block) instead of DDP",
    )

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--output-dir", required=True, type=Path, help="final checkpoint, metrics and plots")
    g.add_argument("--logging-steps", type=int, default=1, help="a metrics line every N steps")
    g.add_argument("--save-steps", type=int, default=0, help="resumable checkpoint every N steps (0 = none)")
    g.add_argument("--save-total-limit", type=int, default=2, help="checkpoints to keep (0 = all)")
    g.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest' in --output-dir")
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="a log line every --logging-steps instead of the progress (a bar on a terminal; "
        "elsewhere, e.g. into a log file, a line every 10%% of the steps or 30 s)",
    )

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-data", default=None, help="MMEB-eval rows scored with Precision@1 (on rank 0)")
    g.add_argument("--eval-image-root", default=None, help="images of --eval-data (default: --image-root)")
    g.add_argument("--eval-steps", type=int, default=0, help="evaluate every N steps (0 = at the end)")
    g.add_argument("--eval-limit", type=int, default=None, help="only the first N eval rows")
    g.add_argument("--eval-batch-size", type=int, default=32, help="inputs per forward pass in evaluation")
    return p


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every save


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lora:
        try:
            import peft  # noqa: F401
        except ImportError:
            parser.error("--lora needs the peft package (pip install peft)")
    if args.lora and args.fsdp:
        parser.error("--lora with --fsdp is not supported (adapters are small: use DDP)")

    # -- processes, logging, where to start from
    ctx = init_distributed(args.device)
    setup_logging(ctx.rank)
    device = ctx.device
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    resume_dir = None
    if args.resume:
        resume_dir = latest_checkpoint(out) if args.resume == "latest" else Path(args.resume)
        if resume_dir is None:
            logger.info("no checkpoint in %s to resume from; starting fresh", out)
        elif not (resume_dir / "trainer_state.json").is_file():
            parser.error(f"--resume {resume_dir}: not a training checkpoint (no trainer_state.json)")
    sharded_resume = resume_dir is not None and (resume_dir / SHARDED_DIR).is_dir()
    fsdp = args.fsdp and ctx.world_size > 1
    if args.fsdp and not fsdp:
        logger.info("--fsdp in a single process: nothing to shard, training unsharded")
    if sharded_resume and not fsdp:
        parser.error(f"--resume {resume_dir}: a sharded (--fsdp) checkpoint needs --fsdp under torchrun")
    resolved = {**vars(args), "precision": precision, "world_size": ctx.world_size, "device": str(device)}
    logger.info("config: %s", json.dumps(resolved, default=str))
    seed_everything(args.seed + ctx.rank)  # distinct dropout draws per rank; data order uses args.seed

    # -- model: fp32 master weights, bf16 only inside autocast
    from model import load_embedder

    # A sharded checkpoint holds no HF files: build the model from --model, then load the shards.
    start_from = args.model if sharded_resume or resume_dir is None else resume_dir
    source = Path(str(start_from))
    embedder = load_embedder(
        start_from, device=str(device), dtype="float32",
        max_length=args.max_length, attn_implementation=args.attn_implementation,
    )  # fmt: skip
    model = embedder.model
    lora_rank = args.lora_rank if args.lora else 0
    configure_trainable(
        model, freeze_vision_tower=args.freeze_vision_tower, lora_rank=lora_rank, lora_alpha=args.lora_alpha
    )
    if args.lora and resume_dir is not None:  # the adapters (and their moments) continue
        if not (resume_dir / ADAPTERS_FILE).is_file():
            parser.error(f"--resume {resume_dir} with --lora: no {ADAPTERS_FILE} (saved without --lora?)")
        load_adapters(model, resume_dir)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("parameters: %.1fM trainable of %.1fM", n_trainable / 1e6, n_all / 1e6)
    ddp = None
    if fsdp:  # fp32 master weights; bf16 compute through the mixed-precision policy
        compute_dtype = torch.bfloat16 if precision == "bf16" else None
        shard_model(model, device, compute_dtype=compute_dtype)
    elif ctx.world_size > 1:
        # A text-only micro-batch leaves the projector unused: find_unused_parameters.
        device_ids = [device.index] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
    trainable = [p for p in model.parameters() if p.requires_grad]  # sharded ones under FSDP
    autocast = contextlib.nullcontext
    if precision == "bf16" and not fsdp:
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    encode = make_encode(ddp or model, next(model.parameters()).dtype, autocast)
    step_config = StepConfig(
        alpha=args.alpha, logit_scale=args.logit_scale,
        mask_duplicates=args.mask_duplicates, chunk_size=args.grad_cache_chunk_size,
    )  # fmt: skip

    # -- data: micro-batches whose queries share a modality, split over ranks
    pairs, report = load_train_pairs(
        args.train_data, args.image_root, on_bad=args.bad_rows, hard_negatives=args.hard_negatives
    )
    logger.info("training data: %s", report.summary())
    dataset = PairDataset(
        pairs, embedder, args.image_root, on_bad=args.bad_rows, hard_negatives=args.hard_negatives
    )
    if args.hard_negatives:
        found = sum(len(p.negatives) for p in pairs)
        logger.info(
            "hard negatives: %d in %d rows (up to %d per row)", found, len(pairs), args.hard_negatives
        )
    sampler = GroupedBatchSampler(
        dataset.modalities(),
        args.per_device_batch_size,
        world_size=ctx.world_size,
        rank=ctx.rank,
        seed=args.seed,
    )
    global_batch = args.per_device_batch_size * ctx.world_size
    if len(sampler) == 0:
        parser.error(f"not enough pairs of one query modality for one global batch of {global_batch}")
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_pairs, num_workers=args.num_workers
    )
    eval_rows = None
    if args.eval_data and (ctx.is_main or fsdp):  # a sharded model needs every rank to run
        from training.evaluate import load_eval_rows

        eval_root = args.eval_image_root or args.image_root
        eval_rows, eval_report = load_eval_rows(
            args.eval_data, eval_root, on_bad=args.bad_rows, limit=args.eval_limit
        )
        logger.info("evaluation data: %s", eval_report.summary())

    # -- optimiser, schedule, and the state a resume restores
    total_steps = args.max_steps or max(1, int(args.num_epochs * len(sampler)))
    warmup = (
        args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup_ratio * total_steps)
    )
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, warmup=warmup, total=total_steps)
    )
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "base_model": str(args.model)}
    if resume_dir is not None:
        state = load_training_state(
            resume_dir,
            optimizer=None if fsdp else optimizer,
            scheduler=schedule,
            rank=ctx.rank,
            device=device,
        )
        if fsdp:
            load_sharded(resume_dir, model, optimizer)
        logger.info("resumed from %s at step %d", resume_dir, state["step"])
    logger.info(
        "%d steps (%d per epoch), global batch %d, warmup %d", total_steps, len(sampler), global_batch, warmup
    )

    metrics_path = out / "metrics.jsonl"
    if ctx.is_main:  # a fresh run starts empty files; a resumed one drops lines past its step
        for path in (metrics_path, out / "eval.jsonl"):
            truncate_jsonl(path, after_step=state["step"] if resume_dir is not None else 0)
    last_loss: float | None = None
    evaluation: dict | None = None

    def run_eval() -> None:
        nonlocal evaluation
        if ctx.is_main or fsdp:
            from training.evaluate import evaluate

            model.eval()
            evaluation = evaluate(
                embedder, eval_rows, args.eval_image_root or args.image_root, batch_size=args.eval_batch_size
            )
            model.train()
            if ctx.is_main:
                append_jsonl(out / "eval.jsonl", {"step": state["step"], **evaluation})
                logger.info("step %d: eval P@1 %.4f", state["step"], evaluation["precision_at_1"])
        barrier()

    def save(folder: Path, *, resumable: bool) -> None:
        if fsdp and resumable:  # every rank writes its shards; no HF files until the end
            save_sharded(folder, model, optimizer)
        elif fsdp:  # the final checkpoint: gather the full state on rank 0, write it once
            full = full_state_dict(model)
            if ctx.is_main:
                plain = plain_copy(model, full)
                save_hf_checkpoint(plain, embedder.tokenizer, embedder.image_processor, folder, source=source)
                del plain, full
        elif ctx.is_main:
            with lora_merged(model):
                save_hf_checkpoint(model, embedder.tokenizer, embedder.image_processor, folder, source=source)
        if ctx.is_main:
            card = {
                "base_model": state["base_model"], "train_data": args.train_data, "pairs": len(pairs),
                "step": state["step"], "total_steps": total_steps, "global_batch_size": global_batch,
                "world_size": ctx.world_size, "per_device_batch_size": args.per_device_batch_size,
                "alpha": args.alpha, "logit_scale": args.logit_scale, "mask_duplicates": args.mask_duplicates,
                "learning_rate": args.learning_rate, "warmup_steps": warmup, "weight_decay": args.weight_decay,
                "precision": precision, "freeze_vision_tower": args.freeze_vision_tower,
                "final_loss": last_loss, "eval": evaluation,
            }  # fmt: skip
            write_model_card(folder, card)
            plot_loss(metrics_path, out / "loss.png")
        if resumable and args.lora and ctx.is_main:
            save_adapters(model, folder)
        if resumable:
            save_training_state(
                folder, optimizer=None if fsdp else optimizer, scheduler=schedule, state=state, rank=ctx.rank
            )
        barrier()

    # -- the loop
    progress = None
    if ctx.is_main and not args.no_progress:  # a bar on a terminal, a line every 10% in a log
        progress = Progress(total_steps, "train", "step", initial=state["step"], log=logger.info)
    start = tick = time.perf_counter()
    while state["step"] < total_steps:
        sampler.set_epoch(state["epoch"], skip=state["batch_in_epoch"])
        for batch in loader:
            loss = train_step(
                batch,
                embedder=embedder,
                encode=encode,
                ddp=ddp or (model if fsdp else None),
                device=device,
                config=step_config,
            )
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            lr = schedule.get_last_lr()[0]
            optimizer.step()
            if state["step"] == 0 and ctx.world_size > 1:  # what each rank holds (bench/README)
                held = gather_no_grad(torch.tensor(list(local_bytes(model, optimizer).values())))
                if ctx.is_main:
                    fields = list(local_bytes(model, optimizer))
                    per_rank = [
                        dict(zip(fields, row.tolist(), strict=True)) for row in held.view(ctx.world_size, -1)
                    ]
                    memory = {"world_size": ctx.world_size, "fsdp": fsdp, "per_rank": per_rank}
                    (out / "memory.json").write_text(json.dumps(memory, indent=2) + "\n")
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batch_in_epoch"] += 1
            last_loss = float(all_reduce_mean(loss))
            seconds, tick = time.perf_counter() - tick, time.perf_counter()
            if ctx.is_main and (state["step"] % args.logging_steps == 0 or state["step"] == total_steps):
                line = {
                    "step": state["step"], "epoch": state["epoch"], "loss": last_loss, "lr": lr,
                    "grad_norm": float(grad_norm), "pairs_per_s": global_batch / seconds, "step_s": seconds,
                    "elapsed_s": tick - start,
                }  # fmt: skip
                append_jsonl(metrics_path, line)
                if progress is None:
                    logger.info(
                        "step %d loss %.4f lr %.2e %.1f pairs/s",
                        state["step"],
                        last_loss,
                        lr,
                        line["pairs_per_s"],
                    )
            if progress is not None:
                progress.update(
                    1, loss=f"{last_loss:.3f}", lr=f"{lr:.1e}", pairs_s=f"{global_batch / seconds:.0f}"
                )
            if args.eval_data and args.eval_steps and state["step"] % args.eval_steps == 0:
                run_eval()
            if args.save_steps and state["step"] % args.save_steps == 0 and state["step"] < total_steps:
                save(out / f"checkpoint-{state['step']}", resumable=True)
                if ctx.is_main:
                    prune_checkpoints(out, args.save_total_limit)
            if state["step"] >= total_steps:
                break
        else:  # the data ran out before the step budget: next epoch
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    if progress is not None:
        progress.close()

    # -- final evaluation and checkpoint (the output folder itself)
    if args.eval_data and (not args.eval_steps or state["step"] % args.eval_steps != 0):
        run_eval()
    save(out, resumable=False)
    logger.info("saved the final checkpoint to %s after %.1f s", out, time.perf_counter() - start)
    destroy_distributed()


if __name__ == "__main__":
    main()
